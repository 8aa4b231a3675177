"""SQLite set-up shared by the daemons: WAL, durability, schema versions, group commit.

A daemon hands `open_database` its list of migrations; `PRAGMA user_version` records
how many have run. Each migration runs in its own transaction together with the version
bump, so a crash mid-migration leaves the previous version intact.

Every store writes through one `GroupCommitWriter`: the store keeps its SQL and its
policy (quotas, sign-once), the writer owns batching, savepoints and durable commits.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import aiosqlite

from revault.metrics import COMMON as METRICS
from revault.resumable_future import ResumableFuture

log = logging.getLogger("revault.storage")

T = TypeVar("T")

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


class StorageError(Exception):
    """The database cannot be used as it is (newer schema, unreadable file)."""


def storage_error_cause(exc: BaseException) -> str | None:
    """What SQLite said, fit for a log line, or None for any other exception.

    SQLite's messages name the failure (read-only database, disk full, I/O error, which
    constraint) and never quote a bound value, unlike most exceptions' messages.
    """
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorname", None)
    return f"{type(exc).__qualname__}: {exc}" + (f" ({code})" if code else "")


async def open_database(
    path: Path,
    migrations: Sequence[str],
    *,
    synchronous: str = "FULL",
) -> aiosqlite.Connection:
    """Open (creating if needed) the database at `path` and bring its schema up to date.

    `synchronous="FULL"` makes every committed transaction survive power loss in WAL mode;
    that is what lets a daemon acknowledge a write only after `commit()` returned.
    """
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}")
    path = Path(path)
    existed = path.exists()
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so that one logical write
    # is exactly one transaction and nothing is committed behind our back.
    # check_same_thread=False: see sqlite_connection; uses stay serialized by the caller.
    db = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        if not existed:
            os.chmod(path, 0o600)
        db.row_factory = aiosqlite.Row
        mode = await _pragma(db, "journal_mode=WAL")
        if str(mode).lower() != "wal":
            raise StorageError(f"{path}: cannot enable WAL journal (got {mode!r})")
        await db.execute(f"PRAGMA synchronous={synchronous}")
        await db.execute("PRAGMA foreign_keys=ON")
        # A second process on the same file waits a little instead of failing at once.
        await db.execute("PRAGMA busy_timeout=5000")
        await migrate(db, migrations, path)
        await _check_writable(db, path)
    except BaseException:
        await db.close()
        raise
    return db


async def _check_writable(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse a database SQLite opened read-only (file mode, read-only mount, ...):
    otherwise the daemon would start, say it is ready, and fail every write."""
    version = await schema_version(db)
    await db.execute("BEGIN IMMEDIATE")
    try:
        # PRAGMA takes no bound parameters; version is an int SQLite gave us.
        await db.execute(f"PRAGMA user_version={int(version)}")
    except sqlite3.Error as e:
        raise StorageError(f"{path}: database is not writable: "
                           f"{storage_error_cause(e)}") from None
    finally:
        await db.execute("ROLLBACK")


async def _pragma(db: aiosqlite.Connection, pragma: str):
    async with db.execute(f"PRAGMA {pragma}") as cursor:
        row = await cursor.fetchone()
    return row[0] if row is not None else None


async def schema_version(db: aiosqlite.Connection) -> int:
    return int(await _pragma(db, "user_version"))


async def migrate(db: aiosqlite.Connection, migrations: Sequence[str], path: Path) -> None:
    version = await schema_version(db)
    if version > len(migrations):
        raise StorageError(
            f"{path}: schema version {version} is newer than this program knows "
            f"({len(migrations)}); refusing to touch it"
        )
    for target, script in enumerate(migrations[version:], start=version + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(script):
                await db.execute(statement)
            # PRAGMA takes no bound parameters; target is an int we computed.
            await db.execute(f"PRAGMA user_version={int(target)}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements so they run inside our transaction.

    (`executescript` would COMMIT first.) sqlite3.complete_statement knows where a
    statement ends, including trigger bodies with their own semicolons.
    """
    statements, pending = [], ""
    # Cut after each semicolon, but only where the text so far is a whole statement.
    for piece in script.split(";")[:-1]:
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip().rstrip(";").strip():
                statements.append(pending.strip())
            pending = ""
    pending += script.split(";")[-1]
    if pending.strip():  # the last statement may omit its semicolon
        if not sqlite3.complete_statement(pending + ";"):
            raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:60]!r}")
        statements.append(pending.strip())
    return statements


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to use directly on the event loop thread.

    Point reads on an indexed WAL database take microseconds, while a hop to aiosqlite's
    thread waits for the GIL (up to the 5 ms switch interval when the loop is busy):
    under load that hop, not SQLite, bounded a daemon's read rate. WAL readers never
    wait for writers; the short busy timeout only covers WAL recovery by another process.
    Open it after `open_database` has created and migrated the file.
    """
    db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True,
                         isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=100")
        db.execute("PRAGMA query_only=1")
    except BaseException:
        db.close()
        raise
    return db


def submit_to_database_thread(db: aiosqlite.Connection, function) -> None:
    """Queue `function(sqlite3_connection)` on aiosqlite's database thread and return at
    once; `function` reports its own outcome (aiosqlite drops what it returns)."""
    if not db._running or db._connection is None:
        raise ValueError("Connection closed")
    db._tx.put_nowait((None, functools.partial(function, db._conn)))


def sqlite_connection(db: aiosqlite.Connection) -> sqlite3.Connection:
    """The sqlite3 connection inside `db`, for statements run on the event loop thread.

    Only for a caller that alone uses `db` and never while one of its calls is running
    on the database thread. A statement costs microseconds, while a hop to that thread
    waits for the GIL (up to the 5 ms switch interval when the loop is busy): a group of
    writes runs its statements here and sends only the COMMIT (the fsync) to the thread.

    aiosqlite has no public way to do any of this; its private `_conn`/`_tx`/`_running`/
    `_connection` are used in these two functions only, with the version
    pinned in pyproject.toml (0.22.1): check them when upgrading aiosqlite.
    """
    return db._conn


class WriterClosed(RuntimeError):
    """The writer is closing or closed: the job was not run."""


MAX_BATCH = 256  # jobs per transaction: bounds the wait of the jobs queued behind them

_Outcomes = list[tuple[Exception | None, object]]


class GroupCommitWriter:
    """Every write to one database, committed in groups: one fsync shared by many writers.

    `await writer.run(job)` queues `job`. While no batch is in flight, the writer takes
    everything queued (up to `max_batch` jobs) as one batch and runs it as one
    transaction:

        BEGIN IMMEDIATE
        for each job, in arrival order:  SAVEPOINT job; job(conn); RELEASE (or ROLLBACK TO)
        COMMIT

    - A job is a plain function `job(conn: sqlite3.Connection) -> result`. It sees the
      changes of the jobs before it in its batch. If it raises, only its own changes are
      rolled back and `run` raises that exception (after the COMMIT of the others).
    - `run` returns the job's result only once the COMMIT holding it has returned, which
      with synchronous=FULL (see open_database) makes the write durable: the caller may
      acknowledge it at once. If BEGIN or COMMIT fails, nothing of the batch is kept and
      every job of it raises that error.
    - A caller that is cancelled (its peer went away) changes nothing: its job still
      runs and commits with its batch, and the outcome is dropped.
    - Once a batch starts nothing can interleave with it, whatever happens to any
      caller: the jobs run one after the other in one event-loop callback, and the
      COMMIT is queued on the database thread before that callback returns. Only the
      writer uses the connection. So a job may read, decide and write (sign-once,
      quota admission) and know that the state it read is the state it commits on.
    - `close()` commits every job already queued, refuses new ones with
      `closed_error()` (default `WriterClosed`) and closes the connection.

    The jobs run on the event loop thread, on the connection aiosqlite holds (see
    sqlite_connection), and only the COMMIT (the fsync) goes to the database thread, in
    one hop per batch: a statement costs microseconds, while each statement run on the
    database thread would wait for the GIL held by the busy event loop. Jobs must
    therefore be short and must not block on anything but SQLite (no network, no sleep).

    There is no writer task. A batch starts in a callback of its own on the turn of the
    event loop after its first job was queued (so every write of a turn joins it), and
    the loop waits for its COMMIT up to COMMIT_WAIT: within that, the callers are
    settled in that same callback, and the callers' futures are `ResumableFuture`s,
    which a connection server resumes right there, so a write is answered in the turn
    it was committed in, as a read is. A slower COMMIT is settled by a callback from the
    database thread when it returns, and the loop goes on meanwhile. Under load a turn
    of the loop is most of a request's latency: a writer task cost each write two or
    three more of them, and writes set the server's p99.

    `after_batch(committed)` runs on the event loop once per batch, after COMMIT (True)
    or after the batch was rolled back (False), before any caller resumes and before the
    next batch's jobs run: a store that keeps in-memory state derived from its jobs (row
    counts) makes it follow the file.
    """

    def __init__(self, db: aiosqlite.Connection, *, name: str = "storage writer",
                 max_batch: int = MAX_BATCH,
                 closed_error: Callable[[], Exception] = lambda: WriterClosed("store is closed"),
                 after_batch: Callable[[bool], None] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.db = db
        self._name = name
        self._max_batch = max_batch
        self._closed_error = closed_error
        self._after_batch = after_batch
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[tuple[Callable, ResumableFuture]] = collections.deque()
        self._in_flight = False       # a batch's transaction is open or committing
        self._start_scheduled = False
        self._closing = False
        self._closed = False
        self._drained: list[asyncio.Future] = []   # close() waits on these

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """`job(conn)` in its own SAVEPOINT of the next batch; its result once committed."""
        if self._closing:
            raise self._closed_error()
        future = ResumableFuture(loop=self._loop)
        self._queue.append((job, future))
        if not self._in_flight and not self._start_scheduled:
            # On the next turn: the writes that arrive in this one join the batch.
            self._start_scheduled = True
            self._loop.call_soon(self._start_batch)
        # No shield: a caller cancelled here cancels only this future, which the writer
        # then leaves alone (it resolves futures that are not done); the job is queued
        # and runs with its batch all the same.
        return await future

    async def close(self) -> None:
        """Commit what is queued, refuse new jobs, close the connection."""
        self._closing = True
        while self._in_flight or self._queue:
            drained = self._loop.create_future()
            self._drained.append(drained)
            await drained
        if not self._closed:
            self._closed = True
            await self._close_database()

    async def _close_database(self) -> None:
        await self.db.close()

    def _start_batch(self) -> None:
        self._start_scheduled = False
        if self._in_flight:
            return              # the batch in flight schedules the next one when done
        if not self._queue:
            self._wake_closers()
            return
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
        self._in_flight = True
        self._begin(batch)

    def _begin(self, batch: list[tuple[Callable, ResumableFuture]]) -> None:
        """Run `batch` as one transaction; `_batch_done` once it committed or failed.

        The one part that knows the database: another backend's writer (the sync
        server's PostgreSQL store) overrides it and `_close_database`, and keeps the
        batching, the acknowledgements and the closing. Each backend times its COMMIT
        alone into the commit metrics (`METRICS.commit_done`).
        """
        loop = self._loop
        try:
            outcomes = self._run_jobs(sqlite_connection(self.db), [job for job, _ in batch])
        except Exception as e:
            # Settled on the next turn, not from inside this one: a database that fails
            # every BEGIN must not recurse through batch after batch.
            loop.call_soon(self._batch_done, batch, None, e)
            return
        commit = _CommitOnThread(self, batch, outcomes)
        try:
            submit_to_database_thread(self.db, commit.run)
        except Exception as e:
            _roll_back(sqlite_connection(self.db))
            loop.call_soon(self._batch_done, batch, None, e)
            return
        if commit.wait(COMMIT_WAIT):
            self._batch_done(batch, *commit.outcome)

    def _batch_done(self, batch: list[tuple[Callable, ResumableFuture]],
                    outcomes: _Outcomes | None, error: Exception | None) -> None:
        """After the COMMIT of `batch` (or its failure): after_batch, then every
        caller's outcome; the jobs queued meanwhile start on the next turn."""
        self._in_flight = False
        if error is not None:
            # Nothing of this batch is durable: every job in it fails, none is acknowledged.
            log.error("%s: transaction of %d jobs failed: %s", self._name, len(batch), error)
        if self._after_batch is not None:
            self._after_batch(error is None)
        if error is not None:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        else:
            for (_, future), (job_error, result) in zip(batch, outcomes):
                if future.done():
                    continue
                if job_error is not None:
                    future.set_exception(job_error)
                else:
                    future.set_result(result)
        if not self._queue:
            self._wake_closers()
        elif not self._start_scheduled:
            self._start_scheduled = True
            self._loop.call_soon(self._start_batch)

    def _wake_closers(self) -> None:
        drained, self._drained = self._drained, []
        for future in drained:
            if not future.done():
                future.set_result(None)

    @staticmethod
    def _run_jobs(conn: sqlite3.Connection,
                  jobs: list[Callable]) -> list[tuple[Exception | None, object]]:
        """BEGIN and every job in its savepoint; the transaction is left open for COMMIT."""
        outcomes: list[tuple[Exception | None, object]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    result = job(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((e, None))
                    continue
                conn.execute("RELEASE job")
                outcomes.append((None, result))
        except BaseException:
            _roll_back(conn)
            raise
        return outcomes

    def _finish_transaction(self, conn: sqlite3.Connection, jobs: int) -> None:
        """On the database thread: COMMIT (durable with synchronous=FULL), or roll back.

        The COMMIT's duration is the fsync every acknowledged write waits for: it goes to
        the commit metrics with the number of jobs it made durable."""
        try:
            started = time.perf_counter()
            self._commit(conn)
            METRICS.commit_done(time.perf_counter() - started, jobs)
        except BaseException:
            # A failed COMMIT (SQLITE_BUSY, I/O error) can leave the transaction open;
            # the next BEGIN IMMEDIATE would then fail forever.
            _roll_back(conn)
            raise

    @staticmethod
    def _commit(conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")


# How long the event loop waits for a batch's COMMIT (the fsync) before it goes on
# with other work. Within it, the batch's callers are answered in the same turn of the
# loop, as a read is, instead of one or two turns later (under load, a turn is most of
# a request's latency). Past it, a slow disk holds up the writes only: the loop goes on
# and the batch is settled when the COMMIT returns.
COMMIT_WAIT = 0.002


class _CommitOnThread:
    """One batch's COMMIT on the database thread, which the event loop may wait for."""

    def __init__(self, writer: GroupCommitWriter, batch: list, outcomes: _Outcomes):
        self._writer = writer
        self._batch = batch
        self._outcomes = outcomes
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._loop_waits = True
        self.outcome: tuple[_Outcomes | None, Exception | None] = (None, None)

    def run(self, conn: sqlite3.Connection) -> None:
        """On the database thread."""
        try:
            self._writer._finish_transaction(conn, len(self._batch))
        except Exception as e:
            outcome = (None, e)
        else:
            outcome = (self._outcomes, None)
        with self._lock:
            self.outcome = outcome
            if self._loop_waits:
                self._done.set()
                return
        self._writer._loop.call_soon_threadsafe(self._writer._batch_done, self._batch,
                                                *outcome)

    def wait(self, timeout: float) -> bool:
        """On the event loop: True if the COMMIT returned within `timeout` (the loop
        settles the batch), else False (the database thread will, when it returns)."""
        if self._done.wait(timeout):
            return True
        with self._lock:
            self._loop_waits = False
            return self._done.is_set()




def _roll_back(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            log.error("rollback failed: %s", e)
