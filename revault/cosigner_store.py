"""The cosigner's once-per-outpoint store: the first signature for an outpoint is the only one.

One table, one row per outpoint ever signed, never updated, never deleted: deleting a row
would let the cosigner sign that outpoint a second time, which is the one thing it exists
to prevent. The table therefore grows by one row (about 300 bytes) per outpoint signed;
in a deployment that is bounded by the managers' actual spends, and a misbehaving
manager key is bounded by the daemon's `requests_per_second` (one budget per key,
across all its connections).

How "exactly one signature per outpoint, even across crashes" is obtained:

- In-process, every read and write is a job of one `storage.GroupCommitWriter`, run in
  arrival order. Requests for one outpoint are therefore serialized (so are all
  requests; batching keeps that cheap), and no reader can see a row before its
  transaction committed, which a shared connection would otherwise allow.
- The database is the arbiter: the writer runs each batch as `BEGIN IMMEDIATE; for each
  request, in its SAVEPOINT: SELECT, and if absent sign + INSERT; COMMIT`, and nothing
  interleaves with a batch once it started (see GroupCommitWriter). The write lock is
  held from the read to the commit, so even a second process on the same file (an
  operator mistake) cannot interleave a second signature; the primary key on
  (txid, vout) would refuse it anyway.
- A signature is handed back only after `COMMIT` returned with `synchronous=FULL`. A
  crash before that loses an uncommitted signature nobody has seen; a crash after it
  leaves a durable row that every later request gets back. Deterministic (RFC 6979)
  nonces make a re-signed identical request yield the same bytes in any case.

Committing several requests in one transaction (group commit) lets 50 concurrent
managers share one fsync instead of queueing for 50. A request whose signing fails rolls
back alone; a failed COMMIT fails every request of its batch and returns no signature.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiosqlite

from revault.cosigner_signing import SigningRequest
from revault.errors import Refused
from revault.primitives import OutPoint
from revault.storage import GroupCommitWriter, open_database

DATABASE_NAME = "cosigner.sqlite3"

MIGRATIONS = [
    """
    CREATE TABLE signatures (
        txid TEXT NOT NULL,
        vout INTEGER NOT NULL,
        signature BLOB NOT NULL,
        digest BLOB NOT NULL,
        spend_txid TEXT NOT NULL,
        manager BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (txid, vout)
    ) WITHOUT ROWID
    """,
]

# A point read on the primary key: the table only grows, a lookup that scanned it would
# slow every request down forever.
LOOKUP_SQL = ("SELECT signature, digest, spend_txid, manager, created_at FROM signatures "
              "WHERE txid = ? AND vout = ?")


class StoreClosed(Refused):
    """The store is shutting down; the request was not signed (-32002 on the wire)."""


@dataclass(frozen=True, slots=True)
class StoredSignature:
    outpoint: OutPoint
    signature: bytes   # DER, no sighash byte
    digest: bytes      # what was signed
    spend_txid: str    # the transaction of the first request
    manager: bytes     # Noise public key of the first requester
    created_at: int


@dataclass(frozen=True, slots=True)
class SignOutcome:
    stored: StoredSignature
    new: bool  # made by this request (False: an earlier request's signature, replayed)


Signer = Callable[[bytes], bytes]


class SignatureStore:
    """Use `await SignatureStore.open(path, signer)`; `close()` when done."""

    def __init__(self, db: aiosqlite.Connection, signer: Signer):
        self._db = db
        self._signer = signer
        self._writer = GroupCommitWriter(
            db, name="cosigner-store",
            closed_error=lambda: StoreClosed("cosigner is shutting down"))

    @classmethod
    async def open(cls, path: Path, signer: Signer) -> SignatureStore:
        db = await open_database(Path(path), MIGRATIONS, synchronous="FULL")
        return cls(db, signer)

    async def sign_once(self, request: SigningRequest, manager: bytes) -> SignOutcome:
        """The signature for `request.outpoint`: made, stored and committed now if it is
        the first request for that outpoint, else the stored one. Returns only once the
        row is durable."""
        def job(conn: sqlite3.Connection) -> SignOutcome:
            # Sees every earlier job of the batch: a second request for an outpoint signed
            # earlier in the same batch gets that signature.
            stored = _lookup(conn, request.outpoint)
            if stored is not None:
                return SignOutcome(stored, new=False)
            stored = StoredSignature(request.outpoint, self._signer(request.digest),
                                     request.digest, request.spend_txid, manager, int(time.time()))
            conn.execute(
                "INSERT INTO signatures "
                "(txid, vout, signature, digest, spend_txid, manager, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stored.outpoint.txid, stored.outpoint.vout, stored.signature, stored.digest,
                 stored.spend_txid, stored.manager, stored.created_at))
            return SignOutcome(stored, new=True)

        return await self._writer.run(job)

    async def get(self, outpoint: OutPoint) -> StoredSignature | None:
        # Through the writer too: a row is seen only once its transaction committed.
        return await self._writer.run(lambda conn: _lookup(conn, outpoint))

    async def close(self) -> None:
        await self._writer.close()


def _lookup(conn: sqlite3.Connection, outpoint: OutPoint) -> StoredSignature | None:
    row = conn.execute(LOOKUP_SQL, (outpoint.txid, outpoint.vout)).fetchone()
    if row is None:
        return None
    signature, digest, spend_txid, manager, created_at = row
    return StoredSignature(outpoint, bytes(signature), bytes(digest), spend_txid,
                           bytes(manager), created_at)
