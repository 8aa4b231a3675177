"""SQLite set-up shared by the daemons: WAL, durability, schema versions.

A daemon hands `open_database` its list of migrations; `PRAGMA user_version` records
how many have run. Each migration runs in its own transaction together with the version
bump, so a crash mid-migration leaves the previous version intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import aiosqlite

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


class StorageError(Exception):
    """The database cannot be used as it is (newer schema, unreadable file)."""


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
    db = await aiosqlite.connect(str(path), isolation_level=None)
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
    except BaseException:
        await db.close()
        raise
    return db


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

    (`executescript` would COMMIT first.) Migrations are our own plain DDL, without
    triggers or string literals holding semicolons, so splitting on ';' is exact.
    """
    return [s.strip() for s in script.split(";") if s.strip()]


async def run_in_database_thread(db: aiosqlite.Connection, function, *args):
    """Run `function(sqlite3_connection, *args)` on aiosqlite's own database thread.

    A group of statements in one hop instead of one hop per statement: each hop waits
    for the GIL while the event loop is busy serving peers. aiosqlite has no public call
    for this; its private `_execute`/`_conn` are used here only, with the version pinned
    in pyproject.toml (0.22.1): check this function when upgrading aiosqlite.
    """
    return await db._execute(function, db._conn, *args)


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
