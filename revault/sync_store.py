"""What the sync server keeps: signatures by tx uid, spend requests, watchtower opinions.

Handlers see only the `SyncStore` protocol, so another backend can be added without
touching them. `SqliteSyncStore` is the one shipped: a single database file in the
daemon's data_dir, WAL with synchronous=FULL, and write methods that return only once
their write is committed durably; the caller may acknowledge as soon as one returns.

Each logical write is atomic: its checks and changes run inside one SAVEPOINT, and a
write that is refused or fails rolls back alone. Writes that arrive while a commit is
being flushed are committed together by the next transaction (group commit, see
storage.GroupCommitWriter), so that concurrent writers share one fsync instead of
queueing for one each; none is acknowledged before the COMMIT holding it has returned.

Everything here is transient: rows expire (`Retention`) and are filtered out on read
before the periodic purge deletes them. Every table is bounded (`Quotas`) so that no
peer, however many requests it sends, can grow the database without limit; a write over
a bound raises `QuotaExceeded` and stores nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import sqlite3

import aiosqlite

from revault.errors import Refused
from revault.storage import GroupCommitWriter, open_database, open_read_only

DAY = 86_400


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind of row is kept after it was last written, in seconds."""

    # A vault's revocation signatures are gathered within hours of the deposit; a month
    # covers stakeholders who are away for a while, and every wallet keeps its own copy.
    signatures: int = 30 * DAY
    # A spend request is about an unvault that happens within days; a week is generous.
    spend_requests: int = 7 * DAY
    spend_opinions: int = 7 * DAY


@dataclass(frozen=True, slots=True)
class Quotas:
    """Upper bounds on stored rows; the names are the config keys under [quotas]."""

    signatures_per_id: int = 100            # pubkeys with a signature for one tx uid
    signatures_per_peer: int = 20_000       # signatures one stakeholder has stored
    total_signatures: int = 1_000_000
    spend_requests_per_vault: int = 16      # distinct spend transactions for one vault
    spend_requests_per_manager: int = 1_000
    total_spend_requests: int = 10_000
    opinions_per_vault: int = 256           # (spend txid, opinion key) pairs for one vault
    opinions_per_watchtower: int = 10_000
    total_opinions: int = 100_000


class QuotaExceeded(Refused):
    """A write refused because it would take a table over one of its `Quotas` (-32002)."""

    def __init__(self, quota: str, limit: int):
        self.quota = quota
        self.limit = limit
        super().__init__(f"quota {quota} reached ({limit})")


@dataclass(frozen=True, slots=True)
class StoredSpendRequest:
    vault_id: str
    txid: str
    transaction: str
    timestamp: int
    stored_at: int


@dataclass(frozen=True, slots=True)
class StoredOpinion:
    vault_id: str
    txid: str
    pubkey: str
    accepted: bool
    reason: str
    sig: str
    stored_at: int


class SyncStore(Protocol):
    """The sync server's storage. Every write method returns once the write is durable."""

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

    async def get_spend_requests(self, limit: int) -> list[StoredSpendRequest]:
        """Live spend requests, most recently written first, at most `limit`."""

    async def put_opinion(self, vault_id: str, txid: str, pubkey: str, accepted: bool,
                          reason: str, sig: str, submitter: bytes) -> None:
        """Store an opinion; one for the same (vault_id, txid, pubkey) is replaced."""

    async def get_opinions(self, vault_id: str, limit: int) -> list[StoredOpinion]:
        """Live opinions about `vault_id`, most recently written first, at most `limit`."""

    async def purge_expired(self) -> int:
        """Delete expired rows; returns how many."""

    async def close(self) -> None: ...


_TABLES = ("signatures", "spend_requests", "opinions")
# Per table: the column that groups rows under one bound, and the names (Quotas fields
# and config keys) of its total, per-group and per-peer quotas.
_QUOTAS = {
    "signatures": ("tx_id", "total_signatures", "signatures_per_id", "signatures_per_peer"),
    "spend_requests": ("vault_id", "total_spend_requests", "spend_requests_per_vault",
                       "spend_requests_per_manager"),
    "opinions": ("vault_id", "total_opinions", "opinions_per_vault",
                 "opinions_per_watchtower"),
}


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
    """ + "".join(_row_count_triggers(table) for table in _TABLES),
]

DATABASE_NAME = "sync-server.sqlite3"
PURGE_BATCH = 5_000  # rows per purge write: bounds how long one write holds the writer


class SqliteSyncStore:
    """`SyncStore` on SQLite: one connection for writes, one for reads.

    Writes are jobs of the database's `GroupCommitWriter` (storage.py), which holds the
    write connection and never waits on the network; a peer that hangs up while its
    write is queued or committing changes nothing for that write or the others. This
    class adds only its SQL and its admission policy (`Quotas`). Reads use their own
    read-only connection on the event loop thread (see storage.open_read_only), so in
    WAL mode they never wait for a commit's fsync nor for the GIL.
    """

    def __init__(self, writer: aiosqlite.Connection, reader: sqlite3.Connection,
                 retention: Retention, quotas: Quotas, clock: Callable[[], float],
                 totals: dict[str, int]):
        self._reader = reader
        self._retention = retention
        self._quotas = quotas
        self._clock = clock
        # Row counts per table, kept in memory so that the total quotas cost no COUNT(*)
        # over a million rows per write. Only this object writes the file (one daemon
        # per data_dir); counts change only after a successful COMMIT.
        self._totals = totals
        # Changes by the earlier writes of the batch being built (see _after_batch).
        self._group_deltas: dict[str, int] = dict.fromkeys(_TABLES, 0)
        self._writer = GroupCommitWriter(
            writer, name="sync-store", after_batch=self._after_batch,
            closed_error=lambda: Refused("sync server is shutting down"))

    @classmethod
    async def open(cls, path: Path, retention: Retention = Retention(),
                   quotas: Quotas = Quotas(),
                   clock: Callable[[], float] = time.time) -> SqliteSyncStore:
        writer = await open_database(path, MIGRATIONS)
        try:
            reader = open_read_only(path)
        except BaseException:
            await writer.close()
            raise
        try:
            totals = {}
            for table in _TABLES:
                rows = await writer.execute_fetchall(f"SELECT COUNT(*) FROM {table}")
                totals[table] = rows[0][0]
        except BaseException:
            reader.close()
            await writer.close()
            raise
        return cls(writer, reader, retention, quotas, clock, totals)

    def _now(self) -> int:
        return int(self._clock())

    def _cutoff(self, table: str) -> int:
        """Rows of `table` with stored_at at or below this are expired."""
        ttl = {"signatures": self._retention.signatures,
               "spend_requests": self._retention.spend_requests,
               "opinions": self._retention.spend_opinions}[table]
        return self._now() - ttl

    async def _write(self, work) -> object:
        """Run `work(db, deltas)` atomically and return once it is durably committed.

        `deltas` collects the write's row-count changes; they count for the later writes
        of its batch, and for the totals once the batch committed.
        """
        def job(db: sqlite3.Connection):
            deltas = dict.fromkeys(_TABLES, 0)
            result = work(db, deltas)
            # Reached only if `work` succeeded, so a refused write's changes never count.
            for table, delta in deltas.items():
                self._group_deltas[table] += delta
            return result

        return await self._writer.run(job)

    def _after_batch(self, committed: bool) -> None:
        if committed:
            for table, delta in self._group_deltas.items():
                self._totals[table] += delta
        self._group_deltas = dict.fromkeys(_TABLES, 0)

    @staticmethod
    def _one(db: sqlite3.Connection, sql: str, args: tuple):
        return db.execute(sql, args).fetchone()

    def _check_total(self, db: sqlite3.Connection, table: str, quota: str,
                     limit: int, deltas: dict[str, int]) -> None:
        def total() -> int:
            return self._totals[table] + self._group_deltas[table] + deltas[table]

        if total() < limit:
            return
        # Expired rows may still be waiting for the periodic purge; they must not
        # refuse a live write.
        cursor = db.execute(f"DELETE FROM {table} WHERE stored_at <= ?",
                                  (self._cutoff(table),))
        deltas[table] -= cursor.rowcount
        if total() >= limit:
            raise QuotaExceeded(quota, limit)

    def _check_peer(self, db: sqlite3.Connection, table: str, submitter: bytes, quota: str,
                    limit: int, deltas: dict[str, int]) -> None:
        """Refuse one more row of `submitter` in `table` past `limit`.

        The count is the trigger-kept rows_by_submitter (expired rows included until
        purged); only at the limit are this peer's expired rows purged and the count
        read again, so a live write is never refused because of dead rows.
        """
        def used() -> int:
            row = self._one(db, "SELECT n FROM rows_by_submitter "
                                "WHERE tbl = ? AND submitter = ?", (table, submitter))
            return row[0] if row is not None else 0

        if used() < limit:
            return
        cursor = db.execute(f"DELETE FROM {table} WHERE submitter = ? AND stored_at <= ?",
                            (submitter, self._cutoff(table)))
        deltas[table] -= cursor.rowcount
        if used() >= limit:
            raise QuotaExceeded(quota, limit)

    def _admit(self, db: sqlite3.Connection, deltas: dict[str, int], table: str,
               key: dict[str, str], submitter: bytes) -> None:
        """Every quota check before writing the row of `table` that `key` identifies.

        A new row must fit the table's total and its group (the signatures of one tx uid,
        the requests or opinions of one vault), and is counted in `deltas`; a new row or
        one taken over from another peer must fit the submitter's own quota. Replacing
        one's own row is always allowed.
        """
        group_column, total, per_group, per_peer = _QUOTAS[table]
        where = " AND ".join(f"{column} = ?" for column in key)
        existing = self._one(db, f"SELECT submitter FROM {table} WHERE {where}",
                             tuple(key.values()))
        if existing is None:
            self._check_total(db, table, total, getattr(self._quotas, total), deltas)
            (count,) = self._one(
                db, f"SELECT COUNT(*) FROM {table} WHERE {group_column} = ? AND stored_at > ?",
                (key[group_column], self._cutoff(table)))
            limit = getattr(self._quotas, per_group)
            if count >= limit:
                raise QuotaExceeded(per_group, limit)
            deltas[table] += 1
        if existing is None or existing[0] != submitter:
            self._check_peer(db, table, submitter, per_peer, getattr(self._quotas, per_peer),
                             deltas)

    # --- signatures -----------------------------------------------------------

    async def put_signature(self, tx_id: str, pubkey: str, signature: str,
                            submitter: bytes) -> None:
        def work(db, deltas):
            self._admit(db, deltas, "signatures", {"tx_id": tx_id, "pubkey": pubkey}, submitter)
            db.execute(
                "INSERT INTO signatures (tx_id, pubkey, signature, submitter, stored_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tx_id, pubkey) DO UPDATE SET "
                "signature = excluded.signature, submitter = excluded.submitter, "
                "stored_at = excluded.stored_at",
                (tx_id, pubkey, signature, submitter, self._now()))

        await self._write(work)

    async def get_signatures(self, tx_id: str) -> dict[str, str]:
        rows = self._reader.execute(
            "SELECT pubkey, signature FROM signatures WHERE tx_id = ? AND stored_at > ? "
            "ORDER BY pubkey", (tx_id, self._cutoff("signatures"))).fetchall()
        return {row[0]: row[1] for row in rows}

    async def erase_signatures(self, tx_id: str) -> int:
        def work(db, deltas):
            (live,) = self._one(
                db, "SELECT COUNT(*) FROM signatures WHERE tx_id = ? AND stored_at > ?",
                (tx_id, self._cutoff("signatures")))
            cursor = db.execute("DELETE FROM signatures WHERE tx_id = ?", (tx_id,))
            deltas["signatures"] -= cursor.rowcount
            return live

        return await self._write(work)

    # --- spend requests ---------------------------------------------------------

    async def put_spend_request(self, vault_id: str, txid: str, transaction: str,
                                timestamp: int, submitter: bytes) -> None:
        def work(db, deltas):
            self._admit(db, deltas, "spend_requests", {"vault_id": vault_id, "txid": txid},
                        submitter)
            db.execute(
                "INSERT INTO spend_requests "
                "(vault_id, txid, tx, request_timestamp, submitter, stored_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (vault_id, txid) DO UPDATE SET "
                "tx = excluded.tx, request_timestamp = excluded.request_timestamp, "
                "submitter = excluded.submitter, stored_at = excluded.stored_at",
                (vault_id, txid, transaction, timestamp, submitter, self._now()))

        await self._write(work)

    async def get_spend_requests(self, limit: int) -> list[StoredSpendRequest]:
        rows = self._reader.execute(
            "SELECT vault_id, txid, tx, request_timestamp, stored_at FROM spend_requests "
            "WHERE stored_at > ? ORDER BY stored_at DESC, rowid DESC LIMIT ?",
            (self._cutoff("spend_requests"), limit)).fetchall()
        return [StoredSpendRequest(*row) for row in rows]

    # --- opinions -----------------------------------------------------------------

    async def put_opinion(self, vault_id: str, txid: str, pubkey: str, accepted: bool,
                          reason: str, sig: str, submitter: bytes) -> None:
        def work(db, deltas):
            self._admit(db, deltas, "opinions",
                        {"vault_id": vault_id, "txid": txid, "pubkey": pubkey}, submitter)
            db.execute(
                "INSERT INTO opinions "
                "(vault_id, txid, pubkey, accepted, reason, sig, submitter, stored_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (vault_id, txid, pubkey) "
                "DO UPDATE SET accepted = excluded.accepted, reason = excluded.reason, "
                "sig = excluded.sig, submitter = excluded.submitter, "
                "stored_at = excluded.stored_at",
                (vault_id, txid, pubkey, int(accepted), reason, sig, submitter, self._now()))

        await self._write(work)

    async def get_opinions(self, vault_id: str, limit: int) -> list[StoredOpinion]:
        rows = self._reader.execute(
            "SELECT vault_id, txid, pubkey, accepted, reason, sig, stored_at FROM opinions "
            "WHERE vault_id = ? AND stored_at > ? ORDER BY stored_at DESC, rowid DESC LIMIT ?",
            (vault_id, self._cutoff("opinions"), limit)).fetchall()
        return [StoredOpinion(vault_id=r[0], txid=r[1], pubkey=r[2], accepted=bool(r[3]),
                              reason=r[4], sig=r[5], stored_at=r[6]) for r in rows]

    # --- housekeeping ---------------------------------------------------------------

    async def purge_expired(self) -> int:
        purged = 0
        for table in _TABLES:
            while True:
                def work(db, deltas, table=table):
                    cursor = db.execute(
                        f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                        f"WHERE stored_at <= ? LIMIT ?)", (self._cutoff(table), PURGE_BATCH))
                    deltas[table] -= cursor.rowcount
                    return -deltas[table]

                # One batch per write: writers queued behind the purge wait for one
                # batch at most, not for the whole backlog.
                deleted = await self._write(work)
                purged += deleted
                if deleted < PURGE_BATCH:
                    break
        return purged

    def row_counts(self) -> dict[str, int]:
        return dict(self._totals)

    async def close(self) -> None:
        # Writes already queued are committed (and acknowledged) before closing.
        await self._writer.close()
        self._reader.close()
