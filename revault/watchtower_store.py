"""The watchtower's durable state: verified revocations, verdicts, the processed tip.

What a watchtower must never forget across a crash:

- every revocation transaction it acknowledged (fully signed, as the stakeholders
  signed it, before any fee bump): an ack promises the wallet that this vault can be
  cancelled, so the row is committed (synchronous=FULL) before the ack leaves;
- every spend verdict it posted: a restart must never change an answer already given
  (a refusal turning into an acceptance would let a spend through that was judged bad);
- which block it last processed, so a restart rescans the blocks it missed.

Vaults retire (a cancel or an emergency buried under 100 blocks) but are kept as rows
with their state: the table stays small per vault and the history is useful to an
operator. Everything here is read whole at start: the watcher keeps its index in memory.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from revault.errors import Refused
from revault.primitives import OutPoint
from revault.storage import GroupCommitWriter, open_database, open_read_only

DATABASE_NAME = "watchtower.sqlite3"

KINDS = ("cancel", "emergency", "unvault_emergency")
VAULT_GUARDED, VAULT_RETIRED = "guarded", "retired"

MIGRATIONS = [
    """
    CREATE TABLE vaults (
        deposit_txid TEXT NOT NULL,
        deposit_vout INTEGER NOT NULL,
        value INTEGER NOT NULL,
        derivation_index INTEGER NOT NULL,
        unvault_txid TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('guarded', 'retired')),
        note TEXT NOT NULL DEFAULT '',
        added_at INTEGER NOT NULL,
        PRIMARY KEY (deposit_txid, deposit_vout)
    ) WITHOUT ROWID;
    CREATE TABLE revocations (
        deposit_txid TEXT NOT NULL,
        deposit_vout INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('cancel', 'emergency', 'unvault_emergency')),
        txid TEXT NOT NULL,
        signed_tx BLOB NOT NULL,
        spent_value INTEGER NOT NULL,
        spent_script BLOB NOT NULL,
        output_value INTEGER NOT NULL,
        output_script BLOB NOT NULL,
        PRIMARY KEY (deposit_txid, deposit_vout, kind),
        FOREIGN KEY (deposit_txid, deposit_vout) REFERENCES vaults
    ) WITHOUT ROWID;
    CREATE TABLE verdicts (
        spend_txid TEXT NOT NULL PRIMARY KEY,
        accepted INTEGER NOT NULL,
        reason TEXT NOT NULL,
        payees_value INTEGER NOT NULL,
        decided_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE verdict_vaults (
        spend_txid TEXT NOT NULL REFERENCES verdicts,
        deposit_txid TEXT NOT NULL,
        deposit_vout INTEGER NOT NULL,
        PRIMARY KEY (spend_txid, deposit_txid, deposit_vout)
    ) WITHOUT ROWID;
    CREATE INDEX verdicts_by_time ON verdicts (accepted, decided_at);
    CREATE TABLE tip (
        singleton INTEGER NOT NULL PRIMARY KEY CHECK (singleton = 0),
        height INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TABLE sync_cursor (
        singleton INTEGER NOT NULL PRIMARY KEY CHECK (singleton = 0),
        cursor TEXT NOT NULL
    );
    """,
]


@dataclass(frozen=True, slots=True)
class StoredRevocation:
    """A revocation as the stakeholders signed it, with what its one input spends and
    its one output (which identifies it once bumped: added inputs change the txid)."""

    kind: str
    txid: str
    signed_tx: bytes  # consensus serialization with witness
    spent_value: int
    spent_script: bytes
    output_value: int
    output_script: bytes


@dataclass(frozen=True, slots=True)
class StoredVault:
    deposit: OutPoint
    value: int
    index: int
    unvault_txid: str
    state: str
    # kind -> the revocation's one output (value, scriptPubKey); the signed transaction
    # is read with `revocation()` when it is needed, not kept in memory per vault.
    revocation_outputs: dict[str, tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class Verdict:
    spend_txid: str
    accepted: bool
    reason: str
    payees_value: int
    decided_at: int
    vaults: tuple[OutPoint, ...]


class WatchtowerStore:
    """Writes through the shared group-commit writer (each returns once durable); reads
    on a read-only connection of the event loop thread, which sees every committed
    write (WAL)."""

    def __init__(self, writer: GroupCommitWriter, reader: sqlite3.Connection):
        self._writer = writer
        self._reader = reader

    @classmethod
    async def open(cls, path: Path) -> WatchtowerStore:
        db = await open_database(path, MIGRATIONS, synchronous="FULL")
        try:
            reader = open_read_only(path)
        except BaseException:
            await db.close()
            raise
        writer = GroupCommitWriter(db, name="watchtower store",
                                   closed_error=lambda: Refused("watchtower is shutting down"))
        return cls(writer, reader)

    async def close(self) -> None:
        await self._writer.close()
        self._reader.close()

    # --- revocations ----------------------------------------------------------------

    async def put_revocation(self, deposit: OutPoint, value: int, index: int,
                             unvault_txid: str, revocation: StoredRevocation) -> bool:
        """Store a verified, fully signed revocation, durably; returns False when one of
        that kind was already stored for this vault (the first is kept: both are valid)."""
        if revocation.kind not in KINDS:
            raise ValueError(f"unknown revocation kind {revocation.kind!r}")
        r = revocation

        def job(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "INSERT OR IGNORE INTO vaults (deposit_txid, deposit_vout, value, "
                "derivation_index, unvault_txid, state, added_at) "
                "VALUES (?, ?, ?, ?, ?, 'guarded', ?)",
                (deposit.txid, deposit.vout, value, index, unvault_txid, int(time.time())))
            cursor = conn.execute(
                "INSERT OR IGNORE INTO revocations (deposit_txid, deposit_vout, kind, txid, "
                "signed_tx, spent_value, spent_script, output_value, output_script) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (deposit.txid, deposit.vout, r.kind, r.txid, r.signed_tx, r.spent_value,
                 r.spent_script, r.output_value, r.output_script))
            return cursor.rowcount == 1

        return await self._writer.run(job)

    async def revocation(self, deposit: OutPoint, kind: str) -> StoredRevocation | None:
        row = self._reader.execute(
            "SELECT kind, txid, signed_tx, spent_value, spent_script, output_value, "
            "output_script FROM revocations WHERE deposit_txid = ? AND deposit_vout = ? "
            "AND kind = ?", (deposit.txid, deposit.vout, kind)).fetchone()
        return _revocation(row) if row is not None else None

    async def retire(self, deposit: OutPoint, note: str) -> None:
        await self._writer.run(lambda conn: conn.execute(
            "UPDATE vaults SET state = 'retired', note = ? WHERE deposit_txid = ? "
            "AND deposit_vout = ?", (note, deposit.txid, deposit.vout)))

    async def vaults(self, *, include_retired: bool = False) -> list[StoredVault]:
        return list(self.iter_vaults(include_retired=include_retired))

    def iter_vaults(self, *, include_retired: bool = False) -> Iterator[StoredVault]:
        """Every vault with the outputs of its revocations, one statement streamed in
        primary-key order (both tables are clustered on the deposit outpoint): a daemon
        loading 100k vaults never holds them all twice."""
        where = "" if include_retired else "WHERE v.state = 'guarded'"
        rows = self._reader.execute(
            "SELECT v.deposit_txid, v.deposit_vout, v.value, v.derivation_index, "
            "v.unvault_txid, v.state, r.kind, r.output_value, r.output_script "
            "FROM vaults v LEFT JOIN revocations r "
            "ON r.deposit_txid = v.deposit_txid AND r.deposit_vout = v.deposit_vout "
            f"{where} ORDER BY v.deposit_txid, v.deposit_vout")
        current: StoredVault | None = None
        for txid, vout, value, index, unvault_txid, state, kind, out_value, script in rows:
            if current is None or current.deposit.txid != txid or current.deposit.vout != vout:
                if current is not None:
                    yield current
                current = StoredVault(OutPoint(txid, vout), value, index, unvault_txid,
                                      state, {})
            if kind is not None:
                current.revocation_outputs[kind] = (out_value, bytes(script))
        if current is not None:
            yield current

    # --- verdicts ---------------------------------------------------------------------

    async def verdict(self, spend_txid: str) -> Verdict | None:
        return _verdict(self._reader, spend_txid)

    async def put_verdict(self, verdict: Verdict) -> Verdict:
        """Record a verdict unless one exists for that spend; returns the one that holds
        (decided in the writer's transaction: two concurrent verdicts cannot both win)."""
        def job(conn: sqlite3.Connection) -> Verdict:
            existing = _verdict(conn, verdict.spend_txid)
            if existing is not None:
                return existing
            conn.execute(
                "INSERT INTO verdicts (spend_txid, accepted, reason, payees_value, "
                "decided_at) VALUES (?, ?, ?, ?, ?)",
                (verdict.spend_txid, int(verdict.accepted), verdict.reason,
                 verdict.payees_value, verdict.decided_at))
            conn.executemany(
                "INSERT INTO verdict_vaults (spend_txid, deposit_txid, deposit_vout) "
                "VALUES (?, ?, ?)", [(verdict.spend_txid, o.txid, o.vout) for o in verdict.vaults])
            return verdict

        return await self._writer.run(job)

    async def accepted_value_since(self, since: int) -> int:
        """What the spends accepted at or after `since` pay to payees, in total."""
        row = self._reader.execute(
            "SELECT COALESCE(SUM(payees_value), 0) FROM verdicts "
            "WHERE accepted = 1 AND decided_at >= ?", (since,)).fetchone()
        return int(row[0])

    async def accepted_spends(self) -> dict[OutPoint, frozenset[str]]:
        """Deposit outpoint -> the spend txids accepted for that vault."""
        out: dict[OutPoint, frozenset[str]] = {}
        for txid, vout, spend in self._reader.execute(
                "SELECT v.deposit_txid, v.deposit_vout, v.spend_txid FROM verdict_vaults v "
                "JOIN verdicts d ON d.spend_txid = v.spend_txid WHERE d.accepted = 1"):
            key = OutPoint(txid, vout)
            out[key] = out.get(key, frozenset()) | {spend}
        return out

    # --- chain position and sync cursor -------------------------------------------------

    async def tip(self) -> tuple[int, str] | None:
        row = self._reader.execute("SELECT height, hash FROM tip").fetchone()
        return (row[0], row[1]) if row else None

    async def set_tip(self, height: int, block_hash: str) -> None:
        await self._writer.run(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO tip (singleton, height, hash) VALUES (0, ?, ?)",
            (height, block_hash)))

    async def sync_cursor(self) -> str | None:
        row = self._reader.execute("SELECT cursor FROM sync_cursor").fetchone()
        return row[0] if row else None

    async def set_sync_cursor(self, cursor: str) -> None:
        await self._writer.run(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO sync_cursor (singleton, cursor) VALUES (0, ?)", (cursor,)))


def _verdict(conn: sqlite3.Connection, spend_txid: str) -> Verdict | None:
    row = conn.execute("SELECT accepted, reason, payees_value, decided_at FROM verdicts "
                       "WHERE spend_txid = ?", (spend_txid,)).fetchone()
    if row is None:
        return None
    vaults = tuple(OutPoint(t, v) for t, v in conn.execute(
        "SELECT deposit_txid, deposit_vout FROM verdict_vaults WHERE spend_txid = ? "
        "ORDER BY deposit_txid, deposit_vout", (spend_txid,)))
    return Verdict(spend_txid, bool(row[0]), row[1], row[2], row[3], vaults)


def _revocation(row) -> StoredRevocation:
    kind, txid, signed, spent_value, spent_script, output_value, output_script = row
    return StoredRevocation(kind, txid, bytes(signed), spent_value, bytes(spent_script),
                            output_value, bytes(output_script))
