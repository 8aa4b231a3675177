import sqlite3

import pytest

from revault.storage import StorageError, Transaction, open_database, schema_version

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
    db = await open_database(path, [V1])
    async with Transaction(db):
        await db.execute("INSERT INTO t VALUES ('a', 'b')")
    await db.close()
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


async def test_transaction_rolls_back_on_error(tmp_path):
    db = await open_database(tmp_path / "db.sqlite3", [V1])
    try:
        with pytest.raises(RuntimeError):
            async with Transaction(db):
                await db.execute("INSERT INTO t VALUES ('a', 'b')")
                raise RuntimeError("abort")
        async with db.execute("SELECT count(*) FROM t") as c:
            assert (await c.fetchone())[0] == 0
    finally:
        await db.close()


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
