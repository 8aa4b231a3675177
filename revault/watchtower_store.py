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

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from revault.primitives import OutPoint
from revault.storage import Transaction, open_database

DATABASE_NAME = "watchtower.sqlite3"

KINDS = ("cancel", "emergency", "unvault_emergency")
VAULT_GUARDED, VAULT_RETIRED = "guarded", "retired"
LOAD_CHUNK = 5000  # rows per hop to the database thread when loading every vault

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
    """One writer (serialized by a lock: the watchtower writes a few rows per vault,
    never thousands per second), reads on the same connection."""

    def __init__(self, db: aiosqlite.Connection):
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> WatchtowerStore:
        return cls(await open_database(path, MIGRATIONS, synchronous="FULL"))

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    # --- revocations ----------------------------------------------------------------

    async def put_revocation(self, deposit: OutPoint, value: int, index: int,
                             unvault_txid: str, revocation: StoredRevocation) -> bool:
        """Store a verified, fully signed revocation, durably; returns False when one of
        that kind was already stored for this vault (the first is kept: both are valid)."""
        if revocation.kind not in KINDS:
            raise ValueError(f"unknown revocation kind {revocation.kind!r}")
        r = revocation
        async with self._lock, Transaction(self._db) as db:
            await db.execute(
                "INSERT OR IGNORE INTO vaults (deposit_txid, deposit_vout, value, "
                "derivation_index, unvault_txid, state, added_at) "
                "VALUES (?, ?, ?, ?, ?, 'guarded', ?)",
                (deposit.txid, deposit.vout, value, index, unvault_txid, int(time.time())))
            cursor = await db.execute(
                "INSERT OR IGNORE INTO revocations (deposit_txid, deposit_vout, kind, txid, "
                "signed_tx, spent_value, spent_script, output_value, output_script) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (deposit.txid, deposit.vout, r.kind, r.txid, r.signed_tx, r.spent_value,
                 r.spent_script, r.output_value, r.output_script))
            return cursor.rowcount == 1

    async def revocation(self, deposit: OutPoint, kind: str) -> StoredRevocation | None:
        async with self._lock:
            async with self._db.execute(
                    "SELECT kind, txid, signed_tx, spent_value, spent_script, output_value, "
                    "output_script FROM revocations WHERE deposit_txid = ? AND "
                    "deposit_vout = ? AND kind = ?", (deposit.txid, deposit.vout, kind)) as c:
                row = await c.fetchone()
            return _revocation(row) if row is not None else None

    async def retire(self, deposit: OutPoint, note: str) -> None:
        async with self._lock, Transaction(self._db) as db:
            await db.execute(
                "UPDATE vaults SET state = 'retired', note = ? WHERE deposit_txid = ? "
                "AND deposit_vout = ?", (note, deposit.txid, deposit.vout))

    async def vaults(self, *, include_retired: bool = False) -> list[StoredVault]:
        """Every vault with the outputs of its revocations, read in two statements (not
        one per vault), each fetched whole (not row by row through the database thread)."""
        async with self._lock:
            outputs: dict[tuple[str, int], dict[str, tuple[int, bytes]]] = {}
            async with self._db.execute(
                    "SELECT deposit_txid, deposit_vout, kind, output_value, output_script "
                    "FROM revocations") as c:
                while rows := await c.fetchmany(LOAD_CHUNK):
                    for txid, vout, kind, value, script in rows:
                        outputs.setdefault((txid, vout), {})[kind] = (value, bytes(script))
            where = "" if include_retired else "WHERE state = 'guarded'"
            vaults = []
            async with self._db.execute(
                    "SELECT deposit_txid, deposit_vout, value, derivation_index, unvault_txid, "
                    f"state FROM vaults {where}") as c:
                while rows := await c.fetchmany(LOAD_CHUNK):
                    vaults += [StoredVault(OutPoint(txid, vout), value, index, unvault_txid,
                                           state, outputs.pop((txid, vout), {}))
                               for txid, vout, value, index, unvault_txid, state in rows]
            return vaults

    # --- verdicts ---------------------------------------------------------------------

    async def verdict(self, spend_txid: str) -> Verdict | None:
        async with self._lock:
            return await self._verdict(spend_txid)

    async def _verdict(self, spend_txid: str) -> Verdict | None:
        async with self._db.execute(
                "SELECT accepted, reason, payees_value, decided_at FROM verdicts "
                "WHERE spend_txid = ?", (spend_txid,)) as c:
            row = await c.fetchone()
        if row is None:
            return None
        async with self._db.execute(
                "SELECT deposit_txid, deposit_vout FROM verdict_vaults WHERE spend_txid = ? "
                "ORDER BY deposit_txid, deposit_vout", (spend_txid,)) as c:
            vaults = tuple(OutPoint(t, v) for t, v in await c.fetchall())
        return Verdict(spend_txid, bool(row[0]), row[1], row[2], row[3], vaults)

    async def put_verdict(self, verdict: Verdict) -> Verdict:
        """Record a verdict unless one exists for that spend; returns the one that holds."""
        async with self._lock:
            async with Transaction(self._db) as db:
                existing = await self._verdict(verdict.spend_txid)
                if existing is not None:
                    return existing
                await db.execute(
                    "INSERT INTO verdicts (spend_txid, accepted, reason, payees_value, "
                    "decided_at) VALUES (?, ?, ?, ?, ?)",
                    (verdict.spend_txid, int(verdict.accepted), verdict.reason,
                     verdict.payees_value, verdict.decided_at))
                await db.executemany(
                    "INSERT INTO verdict_vaults (spend_txid, deposit_txid, deposit_vout) "
                    "VALUES (?, ?, ?)",
                    [(verdict.spend_txid, o.txid, o.vout) for o in verdict.vaults])
            return verdict

    async def accepted_value_since(self, since: int) -> int:
        """What the spends accepted at or after `since` pay to payees, in total."""
        async with self._lock:
            async with self._db.execute(
                    "SELECT COALESCE(SUM(payees_value), 0) FROM verdicts "
                    "WHERE accepted = 1 AND decided_at >= ?", (since,)) as c:
                return int((await c.fetchone())[0])

    async def accepted_spends(self) -> dict[OutPoint, set[str]]:
        """Deposit outpoint -> the spend txids accepted for that vault."""
        async with self._lock:
            out: dict[OutPoint, set[str]] = {}
            async with self._db.execute(
                    "SELECT v.deposit_txid, v.deposit_vout, v.spend_txid FROM verdict_vaults v "
                    "JOIN verdicts d ON d.spend_txid = v.spend_txid WHERE d.accepted = 1") as c:
                async for txid, vout, spend in c:
                    out.setdefault(OutPoint(txid, vout), set()).add(spend)
            return out

    # --- chain position and sync cursor -------------------------------------------------

    async def tip(self) -> tuple[int, str] | None:
        async with self._lock:
            async with self._db.execute("SELECT height, hash FROM tip") as c:
                row = await c.fetchone()
            return (row[0], row[1]) if row else None

    async def set_tip(self, height: int, block_hash: str) -> None:
        async with self._lock, Transaction(self._db) as db:
            await db.execute("INSERT OR REPLACE INTO tip (singleton, height, hash) "
                             "VALUES (0, ?, ?)", (height, block_hash))

    async def sync_cursor(self) -> str | None:
        async with self._lock:
            async with self._db.execute("SELECT cursor FROM sync_cursor") as c:
                row = await c.fetchone()
            return row[0] if row else None

    async def set_sync_cursor(self, cursor: str) -> None:
        async with self._lock, Transaction(self._db) as db:
            await db.execute("INSERT OR REPLACE INTO sync_cursor (singleton, cursor) "
                             "VALUES (0, ?)", (cursor,))



def _revocation(row) -> StoredRevocation:
    kind, txid, signed, spent_value, spent_script, output_value, output_script = row
    return StoredRevocation(kind, txid, bytes(signed), spent_value, bytes(spent_script),
                            output_value, bytes(output_script))
