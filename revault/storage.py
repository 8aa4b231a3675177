"""SQLite set-up shared by the daemons: WAL, durability, schema versions.

A daemon hands `open_database` its list of migrations; `PRAGMA user_version` records
how many have run. Each migration runs in its own transaction together with the version
bump, so a crash mid-migration leaves the previous version intact.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Sequence

import aiosqlite

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


async def run_in_database_thread(db: aiosqlite.Connection, function, *args):
    """Run `function(sqlite3_connection, *args)` on aiosqlite's own database thread."""
    return await db._execute(function, db._conn, *args)


def sqlite_connection(db: aiosqlite.Connection) -> sqlite3.Connection:
    """The sqlite3 connection inside `db`, for statements run on the event loop thread.

    Only for a caller that alone uses `db` and never while one of its calls is running
    on the database thread. A statement costs microseconds, while a hop to that thread
    waits for the GIL (up to the 5 ms switch interval when the loop is busy): a group of
    writes runs its statements here and sends only the COMMIT (the fsync) to the thread.

    aiosqlite has no public way to do either; its private `_execute`/`_conn` are used
    in these two functions only, with the version pinned in pyproject.toml (0.22.1):
    check them when upgrading aiosqlite.
    """
    return db._conn


class Transaction:
    """`async with Transaction(db):` one logical write, committed durably on exit.

    BEGIN IMMEDIATE takes the write lock up front, so two writers never interleave
    a read-then-write.
    """

    def __init__(self, db: aiosqlite.Connection):
        self.db = db

    async def __aenter__(self) -> aiosqlite.Connection:
        await self.db.execute("BEGIN IMMEDIATE")
        return self.db

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.db.execute("COMMIT")
        else:
            await self.db.execute("ROLLBACK")
