"""What the sync server keeps: signatures by tx uid, spend requests, watchtower opinions.

Handlers see only the `SyncStore` protocol. Two backends implement it with the same
rules (revault/sync_rules.py): `SqliteSyncStore` here, a single database file in the
daemon's data_dir, WAL with synchronous=FULL; and `PostgresSyncStore`
(revault/sync_store_postgresql.py) for several server processes on one database. Write
methods return only once their write is committed durably; the caller may acknowledge
as soon as one returns.

Each logical write is atomic: its checks and changes run inside one SAVEPOINT, and a
write that is refused or fails rolls back alone. Writes that arrive while a commit is
being flushed are committed together by the next transaction (group commit), so that
concurrent writers share one fsync instead of queueing for one each; none is
acknowledged before the COMMIT holding it has returned.

Everything here is transient: rows expire (`Retention`) and are filtered out on read
before the periodic purge deletes them. Every table is bounded (`Quotas`) so that no
peer, however many requests it sends, can grow the database without limit; a write over
a bound raises `QuotaExceeded`, one on another peer's entry raises `Taken`, and either
stores nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

import sqlite3

import aiosqlite

from revault.errors import Refused
from revault.paging import Cursor, Stream
from revault.storage import GroupCommitWriter, open_database, open_read_only
from revault.sync_mirror import DEFAULT_BUDGET, Mirror, SignatureMirror
from revault.sync_rules import (
    TABLES, Execute, Plan, QuotaExceeded, Quotas, Retention, Rules, RulesStore, Sharers,
    StoredOpinion, StoredSpendRequest, Taken,
)

__all__ = ["SyncStore", "SqliteSyncStore", "QuotaExceeded", "Taken", "Quotas", "Retention",
           "Sharers", "StoredSpendRequest", "StoredOpinion", "MIGRATIONS", "DATABASE_NAME"]


class SyncStore(Protocol):
    """The sync server's storage. Every write method returns once the write is durable."""

    epoch: str  # names this database in cursors (revault/paging.py)

    async def put_signature(self, tx_id: str, pubkey: str, signature: str,
                            submitter: bytes) -> None:
        """Store or replace the signature of `pubkey` for `tx_id`."""

    async def get_signatures(self, tx_id: str) -> dict[str, str]:
        """Live signatures for `tx_id`, pubkey -> signature."""

    async def erase_signatures(self, tx_id: str) -> int:
        """Erase every signature stored for `tx_id`; returns how many were live."""

    async def put_spend_request(self, vault_id: str, txid: str, transaction: str,
                                timestamp: int, submitter: bytes) -> None:
        """Store a spend request; one for the same (vault_id, txid) is replaced."""

    async def spend_request_streams(self, cursor: Cursor,
                                    fetch: int) -> list[Stream[StoredSpendRequest]]:
        """Each manager's live requests after `cursor`, oldest first, `fetch` at most."""

    async def put_opinion(self, vault_id: str, txid: str, pubkey: str, accepted: bool,
                          reason: str, sig: str, submitter: bytes) -> None:
        """Store an opinion; one for the same (vault_id, txid, pubkey) is replaced."""

    async def opinion_streams(self, vault_id: str,
                              cursor: Cursor) -> list[Stream[StoredOpinion]]:
        """Each watchtower's live opinions on `vault_id` after `cursor`, oldest first."""

    async def purge_expired(self) -> int:
        """Delete expired rows; returns how many."""

    async def row_counts(self) -> dict[str, int]:
        """Rows per table, expired ones included until purged."""

    async def quota_use(self) -> dict[str, tuple[int, int]]:
        """Quota name -> (rows counted against it, its bound), for the table-wide and
        per-peer quotas (sync_rules.Rules.quota_use); read at each metrics scrape."""

    def memory_bytes(self) -> int:
        """Bytes of rows held in memory besides the database (an estimate); 0 for none."""

    async def close(self) -> None: ...




def _row_count_triggers(table: str) -> str:
    """Migration 2's SQL keeping rows_by_submitter exact for `table`.

    Like every released migration this text must never change; a later schema change
    is a new migration.
    """
    return f"""
    CREATE TRIGGER {table}_count_insert AFTER INSERT ON {table} BEGIN
        INSERT INTO rows_by_submitter (tbl, submitter, n) VALUES ('{table}', NEW.submitter, 1)
            ON CONFLICT (tbl, submitter) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER {table}_count_delete AFTER DELETE ON {table} BEGIN
        UPDATE rows_by_submitter SET n = n - 1
            WHERE tbl = '{table}' AND submitter = OLD.submitter;
        DELETE FROM rows_by_submitter
            WHERE tbl = '{table}' AND submitter = OLD.submitter AND n = 0;
    END;
    CREATE TRIGGER {table}_count_update AFTER UPDATE OF submitter ON {table}
        WHEN OLD.submitter IS NOT NEW.submitter BEGIN
        UPDATE rows_by_submitter SET n = n - 1
            WHERE tbl = '{table}' AND submitter = OLD.submitter;
        DELETE FROM rows_by_submitter
            WHERE tbl = '{table}' AND submitter = OLD.submitter AND n = 0;
        INSERT INTO rows_by_submitter (tbl, submitter, n) VALUES ('{table}', NEW.submitter, 1)
            ON CONFLICT (tbl, submitter) DO UPDATE SET n = n + 1;
    END;
    INSERT INTO rows_by_submitter (tbl, submitter, n)
        SELECT '{table}', submitter, COUNT(*) FROM {table} GROUP BY submitter;
    DROP INDEX {table}_by_submitter;
    CREATE INDEX {table}_by_submitter ON {table} (submitter, stored_at);
"""


MIGRATIONS = [
    # Rowid tables (not WITHOUT ROWID) so that the purge can delete in bounded batches.
    """
    CREATE TABLE signatures (
        tx_id TEXT NOT NULL,
        pubkey TEXT NOT NULL,
        signature TEXT NOT NULL,
        submitter BLOB NOT NULL,
        stored_at INTEGER NOT NULL,
        UNIQUE (tx_id, pubkey)
    );
    CREATE INDEX signatures_by_submitter ON signatures (submitter, tx_id);
    CREATE INDEX signatures_by_age ON signatures (stored_at);

    CREATE TABLE spend_requests (
        vault_id TEXT NOT NULL,
        txid TEXT NOT NULL,
        tx TEXT NOT NULL,
        request_timestamp INTEGER NOT NULL,
        submitter BLOB NOT NULL,
        stored_at INTEGER NOT NULL,
        UNIQUE (vault_id, txid)
    );
    CREATE INDEX spend_requests_by_submitter ON spend_requests (submitter);
    CREATE INDEX spend_requests_by_age ON spend_requests (stored_at);

    CREATE TABLE opinions (
        vault_id TEXT NOT NULL,
        txid TEXT NOT NULL,
        pubkey TEXT NOT NULL,
        accepted INTEGER NOT NULL,
        reason TEXT NOT NULL,
        sig TEXT NOT NULL,
        submitter BLOB NOT NULL,
        stored_at INTEGER NOT NULL,
        UNIQUE (vault_id, txid, pubkey)
    );
    CREATE INDEX opinions_by_submitter ON opinions (submitter);
    CREATE INDEX opinions_by_age ON opinions (stored_at);
    """,
    # Version 2: rows per submitter, kept by triggers, so that a per-peer quota costs one
    # primary-key read instead of counting that peer's rows on every write (which made
    # writes slow down linearly with a busy peer's rows, for every peer). The submitter
    # indexes move to (submitter, stored_at) for purging one peer's expired rows.
    """
    CREATE TABLE rows_by_submitter (
        tbl TEXT NOT NULL,
        submitter BLOB NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (tbl, submitter)
    ) WITHOUT ROWID;
    """ + "".join(_row_count_triggers(table) for table in TABLES),
    # Version 3: cursors and bindings (issues "Hostile peers" 4 and 6, "Sync server at
    # scale" 1). Spend requests and opinions get a sequence number that grows in commit
    # order (existing rows numbered in the order they were stored); the database gets
    # a random epoch naming it in cursors; opinion keys remember their watchtower.
    """
    ALTER TABLE spend_requests ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE opinions ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE spend_requests SET seq = ordered.n FROM (
        SELECT rowid AS id, ROW_NUMBER() OVER (ORDER BY stored_at, rowid) AS n
        FROM spend_requests) AS ordered WHERE spend_requests.rowid = ordered.id;
    UPDATE opinions SET seq = ordered.n FROM (
        SELECT rowid AS id, ROW_NUMBER() OVER (ORDER BY stored_at, rowid) AS n
        FROM opinions) AS ordered WHERE opinions.rowid = ordered.id;
    CREATE INDEX spend_requests_by_seq ON spend_requests (submitter, seq);
    CREATE INDEX spend_requests_in_order ON spend_requests (seq);
    CREATE INDEX opinions_by_vault_seq ON opinions (vault_id, seq);

    CREATE TABLE sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO sequences (name, value)
        SELECT 'spend_requests', COALESCE(MAX(seq), 0) FROM spend_requests;
    INSERT INTO sequences (name, value) SELECT 'opinions', COALESCE(MAX(seq), 0) FROM opinions;

    CREATE TABLE store_meta (epoch TEXT NOT NULL);
    INSERT INTO store_meta (epoch) VALUES (lower(hex(randomblob(8))));

    CREATE TABLE opinion_keys (
        pubkey TEXT PRIMARY KEY,
        submitter BLOB NOT NULL,
        stored_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO opinion_keys (pubkey, submitter, stored_at)
        SELECT pubkey, submitter, MAX(stored_at) FROM opinions GROUP BY pubkey;
    CREATE INDEX opinion_keys_by_age ON opinion_keys (stored_at);
    """,
]

DATABASE_NAME = "sync-server.sqlite3"


def run_plan(db: sqlite3.Connection, plan: Plan):
    """Drive a sync_rules plan on `db`, synchronously; returns what the plan returns."""
    try:
        step = next(plan)
        while True:
            cursor = db.execute(step.sql, step.args)
            step = plan.send(cursor.rowcount if isinstance(step, Execute)
                             else cursor.fetchall())
    except StopIteration as stop:
        return stop.value



class SqliteSyncStore(RulesStore):
    """`SyncStore` on SQLite: one connection for writes, one for reads.

    Writes are jobs of the database's `GroupCommitWriter` (storage.py), which holds the
    write connection and never waits on the network; a peer that hangs up while its
    write is queued or committing changes nothing for that write or the others. Each job
    drives one sync_rules plan. Reads use their own read-only connection on the event
    loop thread (see storage.open_read_only), so in WAL mode they never wait for a
    commit's fsync nor for the GIL. What pollers read (spend requests, opinions,
    signatures) comes from memory instead (revault/sync_mirror.py), which follows what
    each batch's plans stored once its COMMIT returned.
    """

    def __init__(self, writer: aiosqlite.Connection, reader: sqlite3.Connection, epoch: str,
                 retention: Retention, quotas: Quotas, sharers: Sharers,
                 clock: Callable[[], float], mirror: Mirror, signatures: SignatureMirror):
        self._reader = reader
        self._configure(epoch, retention, quotas, sharers, clock)
        self._mirror = mirror
        self._signatures = signatures
        self._stored_in_batch: list = []    # write plans' results, for the mirrors
        self._writer = GroupCommitWriter(
            writer, name="sync-store",
            closed_error=lambda: Refused("sync server is shutting down"),
            after_batch=self._batch_committed)

    @classmethod
    async def open(cls, path: Path, retention: Retention = Retention(),
                   quotas: Quotas = Quotas(), clock: Callable[[], float] = time.time, *,
                   sharers: Sharers = Sharers(),
                   mirror_budget: int = DEFAULT_BUDGET) -> SqliteSyncStore:
        writer = await open_database(path, MIGRATIONS)
        try:
            reader = open_read_only(path)
        except BaseException:
            await writer.close()
            raise
        try:
            epoch = run_plan(reader, Rules.epoch())
            mirror = Mirror(mirror_budget)
            await mirror.load(reader)
            signatures = SignatureMirror(mirror_budget)
            await signatures.load(reader)
        except BaseException:
            reader.close()
            await writer.close()
            raise
        return cls(writer, reader, epoch, retention, quotas, sharers, clock, mirror, signatures)

    async def _read(self, make_plan: Callable[[Rules], Plan]):
        return run_plan(self._reader, make_plan(self._rules()))

    async def _write(self, make_plan: Callable[[Rules], Plan]) -> object:
        """Run the plan atomically and return once it is durably committed."""
        return await self._writer.run(self._job(make_plan))

    def _job(self, make_plan: Callable[[Rules], Plan]) -> Callable[[sqlite3.Connection], object]:
        def job(conn: sqlite3.Connection) -> object:
            result = run_plan(conn, make_plan(self._rules()))
            # Only a plan that finished is kept: one that raised rolled back alone.
            self._stored_in_batch.append(result)
            return result
        return job

    def _batch_committed(self, committed: bool) -> None:
        """The writer's after_batch: the mirrors follow what the batch committed."""
        results, self._stored_in_batch = self._stored_in_batch, []
        if committed:
            for result in results:
                self._mirror.apply(result)
                self._signatures.apply(result)

    async def get_signatures(self, tx_id: str) -> dict[str, str]:
        if self._signatures.active:
            return self._signatures.get_signatures(tx_id, self._rules())
        return await super().get_signatures(tx_id)

    async def spend_request_streams(self, cursor: Cursor,
                                    fetch: int) -> list[Stream[StoredSpendRequest]]:
        if self._mirror.active:
            return self._mirror.spend_request_streams(cursor, fetch, self._rules())
        return await super().spend_request_streams(cursor, fetch)

    async def opinion_streams(self, vault_id: str,
                              cursor: Cursor) -> list[Stream[StoredOpinion]]:
        if self._mirror.active:
            return self._mirror.opinion_streams(vault_id, cursor, self._rules())
        return await super().opinion_streams(vault_id, cursor)

    def memory_bytes(self) -> int:
        return sum(mirror.bytes for mirror in (self._mirror, self._signatures)
                   if mirror.active)

    async def purge_expired(self) -> int:
        rules = self._rules()
        purged = await super().purge_expired()
        # Every row expired at `rules.now` is now gone from the file.
        for mirror in (self._mirror, self._signatures):
            if mirror.active:
                mirror.drop_expired(rules)
            else:
                # It outgrew its budget: purged, the rows may fit again.
                await mirror.load(self._reader)
        return purged

    async def close(self) -> None:
        # The reader first: the writer's connection, closing last, checkpoints the WAL
        # into the file and removes it. Writes already queued are committed (and
        # acknowledged) before it closes.
        self._reader.close()
        await self._writer.close()
