"""The wallet's durable state: one SQLite file in its `data_dir`.

It holds only what the chain and the sync server cannot give back: the deposit indexes
handed out, the vaults seen, every signature this wallet verified (so a vault never
needs the server again once secured), every watchtower ack, and the manager's spends
with the stage each reached. Every write is one transaction, committed with
synchronous=FULL before the flow acts on it: a script killed at any instant resumes
from here.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from revault.storage import GroupCommitWriter, open_database, open_read_only

__all__ = ["DATABASE_NAME", "StoredVault", "StoredSpend", "WalletStore", "SPEND_STAGES"]

DATABASE_NAME = "wallet.sqlite3"

# A spend moves through these, in order; a resumed spend() starts at its stage.
SPEND_STAGES = ("requested", "cosigned", "unvaulted", "broadcast")

MIGRATIONS = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE deposit_indexes (
        idx INTEGER PRIMARY KEY CHECK (idx >= 0),
        address TEXT NOT NULL
    );
    CREATE TABLE vaults (
        outpoint TEXT PRIMARY KEY,
        value INTEGER NOT NULL CHECK (value > 0),
        idx INTEGER NOT NULL CHECK (idx >= 0),
        seen INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE signatures (
        txid TEXT NOT NULL,
        input INTEGER NOT NULL,
        pubkey TEXT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (txid, input, pubkey)
    ) WITHOUT ROWID;
    CREATE TABLE watchtower_acks (
        txid TEXT NOT NULL,
        watchtower TEXT NOT NULL,
        PRIMARY KEY (txid, watchtower)
    ) WITHOUT ROWID;
    CREATE TABLE spends (
        txid TEXT PRIMARY KEY,
        tx TEXT NOT NULL,
        timestamp INTEGER NOT NULL,
        stage TEXT NOT NULL
    );
    CREATE TABLE spend_vaults (
        txid TEXT NOT NULL REFERENCES spends (txid),
        position INTEGER NOT NULL,
        outpoint TEXT NOT NULL,
        PRIMARY KEY (txid, position)
    ) WITHOUT ROWID;
    CREATE INDEX spend_vaults_outpoint ON spend_vaults (outpoint);
    """,
]


@dataclass(frozen=True, slots=True)
class StoredVault:
    outpoint: str
    value: int
    index: int


@dataclass(frozen=True, slots=True)
class StoredSpend:
    txid: str
    tx: str          # base64, unsigned (no witness)
    timestamp: int
    stage: str
    outpoints: tuple[str, ...]  # one vault per input, in input order


class WalletStore:
    """Writes go through the shared group-commit writer (each acknowledged once
    committed, synchronous=FULL); reads use a read-only connection on the loop thread."""

    def __init__(self, writer: GroupCommitWriter, reader: sqlite3.Connection):
        self._writer = writer
        self._reader = reader

    @classmethod
    async def open(cls, data_dir: Path) -> WalletStore:
        path = Path(data_dir) / DATABASE_NAME
        db = await open_database(path, MIGRATIONS)
        return cls(GroupCommitWriter(db, name="wallet store"), open_read_only(path))

    async def close(self) -> None:
        self._reader.close()
        await self._writer.close()

    async def _all(self, sql: str, params: Iterable = ()) -> list:
        return self._reader.execute(sql, tuple(params)).fetchall()

    async def _write(self, sql: str, rows: list[tuple]) -> None:
        """One statement over `rows`, durable when this returns."""
        if rows:
            await self._writer.run(lambda conn: conn.executemany(sql, rows))

    # --- meta -----------------------------------------------------------------------

    async def meta(self, key: str) -> str | None:
        rows = await self._all("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(key, value)])

    # --- deposit indexes ----------------------------------------------------------------

    async def deposit_indexes(self) -> dict[int, str]:
        return {idx: address for idx, address in
                await self._all("SELECT idx, address FROM deposit_indexes ORDER BY idx")}

    async def add_deposit_index(self, idx: int, address: str) -> None:
        await self._write("INSERT OR IGNORE INTO deposit_indexes (idx, address) VALUES (?, ?)",
                          [(idx, address)])

    # --- vaults -------------------------------------------------------------------------

    async def add_vaults(self, vaults: Iterable[StoredVault]) -> None:
        now = int(time.time())
        await self._write(
            "INSERT OR IGNORE INTO vaults (outpoint, value, idx, seen) VALUES (?, ?, ?, ?)",
            [(v.outpoint, v.value, v.index, now) for v in vaults])

    async def vaults(self) -> list[StoredVault]:
        return [StoredVault(o, v, i) for o, v, i in
                await self._all("SELECT outpoint, value, idx FROM vaults ORDER BY seen, outpoint")]

    async def vault(self, outpoint: str) -> StoredVault | None:
        rows = await self._all("SELECT outpoint, value, idx FROM vaults WHERE outpoint = ?",
                               (outpoint,))
        return StoredVault(*rows[0]) if rows else None

    # --- signatures and acks ----------------------------------------------------------

    async def add_signatures(self, txid: str, input_index: int,
                             signatures: Mapping[bytes, bytes]) -> None:
        """Signatures verified by this wallet (DER, no sighash byte) by public key."""
        await self._write(
            "INSERT OR REPLACE INTO signatures (txid, input, pubkey, signature) "
            "VALUES (?, ?, ?, ?)",
            [(txid, input_index, k.hex(), s.hex()) for k, s in signatures.items()])

    async def signatures(self, txid: str) -> dict[int, dict[bytes, bytes]]:
        out: dict[int, dict[bytes, bytes]] = {}
        for index, pubkey, sig in await self._all(
                "SELECT input, pubkey, signature FROM signatures WHERE txid = ?", (txid,)):
            out.setdefault(index, {})[bytes.fromhex(pubkey)] = bytes.fromhex(sig)
        return out

    async def add_acks(self, acks: Iterable[tuple[str, str]]) -> None:
        """(txid, watchtower noise key hex) pairs a watchtower acked."""
        await self._write("INSERT OR IGNORE INTO watchtower_acks (txid, watchtower) VALUES (?, ?)",
                          list(acks))

    async def acks(self, txids: Iterable[str]) -> set[tuple[str, str]]:
        txids = list(txids)
        marks = ",".join("?" * len(txids))
        return {(t, w) for t, w in await self._all(
            f"SELECT txid, watchtower FROM watchtower_acks WHERE txid IN ({marks})", txids)}

    # --- spends -----------------------------------------------------------------------

    async def add_spend(self, txid: str, tx: str, timestamp: int,
                        outpoints: Iterable[str]) -> None:
        rows = [(txid, i, o) for i, o in enumerate(outpoints)]

        def add(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO spends (txid, tx, timestamp, stage) VALUES (?, ?, ?, ?)",
                         (txid, tx, timestamp, SPEND_STAGES[0]))
            conn.executemany("INSERT INTO spend_vaults (txid, position, outpoint) VALUES (?, ?, ?)",
                             rows)

        await self._writer.run(add)

    async def set_spend_stage(self, txid: str, stage: str) -> None:
        if stage not in SPEND_STAGES:
            raise ValueError(f"unknown spend stage {stage!r}")
        await self._write("UPDATE spends SET stage = ? WHERE txid = ?", [(stage, txid)])

    async def spends(self) -> list[StoredSpend]:
        rows = await self._all("SELECT txid, tx, timestamp, stage FROM spends ORDER BY rowid")
        return [await self._spend(row) for row in rows]

    async def spend_of(self, outpoints: Iterable[str]) -> StoredSpend | None:
        """The unfinished or finished spend of exactly these vaults, if one was started."""
        wanted = tuple(outpoints)
        for spend in await self.spends():
            if spend.outpoints == wanted:
                return spend
        return None

    async def _spend(self, row) -> StoredSpend:
        txid, tx, timestamp, stage = row
        outpoints = tuple(o for (o,) in await self._all(
            "SELECT outpoint FROM spend_vaults WHERE txid = ? ORDER BY position", (txid,)))
        return StoredSpend(txid, tx, timestamp, stage, outpoints)
