import asyncio
import sqlite3
import threading

import pytest

from revault.storage import (
    GroupCommitWriter, StorageError, WriterClosed, open_database, schema_version,
)

V1 = "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT NOT NULL)"
V2 = "ALTER TABLE t ADD COLUMN n INTEGER NOT NULL DEFAULT 0; CREATE INDEX t_n ON t(n)"


async def test_wal_full_sync_and_versions(tmp_path):
    path = tmp_path / "db.sqlite3"
    db = await open_database(path, [V1])
    try:
        assert await schema_version(db) == 1
        async with db.execute("PRAGMA journal_mode") as c:
            assert (await c.fetchone())[0] == "wal"
        async with db.execute("PRAGMA synchronous") as c:
            assert (await c.fetchone())[0] == 2  # FULL
    finally:
        await db.close()
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


async def test_migration_to_a_later_version_keeps_data(tmp_path):
    path = tmp_path / "db.sqlite3"
    writer = GroupCommitWriter(await open_database(path, [V1]))
    await writer.run(lambda conn: conn.execute("INSERT INTO t VALUES ('a', 'b')"))
    await writer.close()
    db = await open_database(path, [V1, V2])
    try:
        assert await schema_version(db) == 2
        async with db.execute("SELECT k, v, n FROM t") as c:
            assert [tuple(r) for r in await c.fetchall()] == [("a", "b", 0)]
    finally:
        await db.close()


async def test_newer_database_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    await (await open_database(path, [V1, V2])).close()
    with pytest.raises(StorageError, match="newer"):
        await open_database(path, [V1])


async def test_failed_migration_leaves_previous_version(tmp_path):
    path = tmp_path / "db.sqlite3"
    await (await open_database(path, [V1])).close()
    with pytest.raises(sqlite3.OperationalError):
        await open_database(path, [V1, "ALTER TABLE t ADD COLUMN x INTEGER; SELECT * FROM nope"])
    db = await open_database(path, [V1])
    try:
        assert await schema_version(db) == 1
        async with db.execute("PRAGMA table_info(t)") as c:
            assert [r[1] for r in await c.fetchall()] == ["k", "v"]
    finally:
        await db.close()


def insert(k: str, v: str = "v"):
    def job(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t VALUES (?, ?)", (k, v))
        return k
    return job


def keys(path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT k FROM t ORDER BY k")]


@pytest.fixture
async def writer(tmp_path):
    writer = GroupCommitWriter(await open_database(tmp_path / "db.sqlite3", [V1]))
    yield writer
    await writer.close()


async def test_transaction_rolls_back_on_error(writer, tmp_path):
    def failing(conn):
        conn.execute("INSERT INTO t VALUES ('a', 'b')")
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        await writer.run(failing)
    async with writer.db.execute("SELECT count(*) FROM t") as c:
        assert (await c.fetchone())[0] == 0


async def test_a_failing_job_rolls_back_alone_in_its_batch(writer, tmp_path):
    def failing(conn):
        conn.execute("INSERT INTO t VALUES ('b', 'v')")
        raise ValueError("refused")

    results = await asyncio.gather(writer.run(insert("a")), writer.run(failing),
                                   writer.run(insert("c")), writer.run(insert("a")),
                                   return_exceptions=True)
    assert results[0] == "a" and results[2] == "c"
    assert isinstance(results[1], ValueError)
    assert isinstance(results[3], sqlite3.IntegrityError)  # sees the first job's row
    assert keys(tmp_path / "db.sqlite3") == ["a", "c"]


async def test_callers_resume_only_after_the_shared_commit(tmp_path):
    commits = []
    seen_at_resume = []
    writer = GroupCommitWriter(await open_database(tmp_path / "db.sqlite3", [V1]),
                               after_batch=commits.append)

    async def write(k):
        await writer.run(insert(k))
        # Another connection already sees the row: it was committed before we resumed.
        seen_at_resume.append(k in keys(tmp_path / "db.sqlite3"))

    await asyncio.gather(*(write(f"k{i}") for i in range(10)))
    await writer.close()
    assert seen_at_resume == [True] * 10
    assert commits == [True]  # ten jobs queued together: one batch, one COMMIT


async def test_batches_are_bounded(tmp_path):
    commits = []
    writer = GroupCommitWriter(await open_database(tmp_path / "db.sqlite3", [V1]),
                               max_batch=4, after_batch=commits.append)
    await asyncio.gather(*(writer.run(insert(f"k{i}")) for i in range(10)))
    await writer.close()
    assert commits == [True, True, True]
    assert len(keys(tmp_path / "db.sqlite3")) == 10


async def test_failed_commit_fails_the_whole_batch_and_the_writer_recovers(writer, tmp_path,
                                                                           monkeypatch):
    outcomes = []
    writer._after_batch = outcomes.append
    failures = [sqlite3.OperationalError("disk I/O error")]

    def commit(conn):
        if failures:
            raise failures.pop()
        conn.execute("COMMIT")

    monkeypatch.setattr(writer, "_commit", commit)
    results = await asyncio.gather(*(writer.run(insert(f"k{i}")) for i in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
    assert outcomes == [False] and keys(tmp_path / "db.sqlite3") == []
    assert await writer.run(insert("again")) == "again"
    assert outcomes == [False, True] and keys(tmp_path / "db.sqlite3") == ["again"]


async def test_cancelled_caller_still_commits(writer, tmp_path):
    task = asyncio.create_task(writer.run(insert("a")))
    await asyncio.sleep(0)  # queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await writer.run(insert("b")) == "b"
    assert keys(tmp_path / "db.sqlite3") == ["a", "b"]


async def test_a_slow_commit_lets_the_loop_go_on_and_settles_from_the_database_thread(
        writer, tmp_path, monkeypatch):
    # A COMMIT longer than the bounded wait: the event loop stops waiting for it and
    # runs other work; the batch is settled when the database thread is done.
    release = threading.Event()

    def slow_commit(conn):
        assert release.wait(5)
        conn.execute("COMMIT")

    monkeypatch.setattr(writer, "_commit", slow_commit)
    queued = [asyncio.create_task(writer.run(insert(f"k{i}"))) for i in range(3)]
    turns = 0
    while turns < 20:           # the loop turns while the COMMIT is held
        await asyncio.sleep(0)
        turns += 1
    assert not any(task.done() for task in queued)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*queued), 5) == ["k0", "k1", "k2"]
    assert keys(tmp_path / "db.sqlite3") == ["k0", "k1", "k2"]
    assert await writer.run(insert("next")) == "next"


async def test_close_commits_what_is_queued_and_refuses_new_jobs(tmp_path):
    writer = GroupCommitWriter(await open_database(tmp_path / "db.sqlite3", [V1]),
                               max_batch=3)
    queued = [asyncio.create_task(writer.run(insert(f"k{i}"))) for i in range(7)]
    await asyncio.sleep(0)
    await writer.close()
    assert await asyncio.gather(*queued) == [f"k{i}" for i in range(7)]
    assert len(keys(tmp_path / "db.sqlite3")) == 7
    with pytest.raises(WriterClosed):
        await writer.run(insert("late"))
    await writer.close()  # twice is harmless


async def test_closed_error_is_the_stores_own(tmp_path):
    class Closing(Exception):
        pass

    writer = GroupCommitWriter(await open_database(tmp_path / "db.sqlite3", [V1]),
                               closed_error=lambda: Closing("shutting down"))
    await writer.close()
    with pytest.raises(Closing, match="shutting down"):
        await writer.run(insert("late"))


def test_migration_statements_split_around_trigger_bodies():
    from revault.storage import _split_sql
    script = """
    CREATE TABLE a (x INTEGER);
    CREATE TRIGGER t AFTER INSERT ON a BEGIN
        INSERT INTO a VALUES (1); UPDATE a SET x = 2;
    END;
    CREATE INDEX i ON a (x)
    """
    statements = _split_sql(script)
    assert len(statements) == 3
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        _split_sql("CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO a VALUES (1);")
