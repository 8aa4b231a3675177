"""The cosigner's once-per-outpoint store: the first signature for an outpoint is the only one.

One table, one row per outpoint ever signed, never updated, never deleted: deleting a row
would let the cosigner sign that outpoint a second time, which is the one thing it exists
to prevent. The table therefore grows by one row (about 300 bytes) per outpoint signed;
in a deployment that is bounded by the managers' actual spends, and a misbehaving
manager key is bounded by the daemon's `requests_per_second` and `max_connections`.

How "exactly one signature per outpoint, even across crashes" is obtained:

- In-process, every read and write goes through one writer task, in arrival order.
  Requests for one outpoint are therefore serialized (so are all requests; batching
  keeps that cheap), and no reader can see a row before its transaction committed,
  which a shared connection would otherwise allow.
- The database is the arbiter: the writer runs each batch as
  `BEGIN IMMEDIATE; for each request: SELECT, and if absent sign + INSERT; COMMIT`.
  The write lock is held from the read to the commit, so even a second process on the
  same file (an operator mistake) cannot interleave a second signature; the primary key
  on (txid, vout) would refuse it anyway.
- A signature is handed back only after `COMMIT` returned with `synchronous=FULL`. A
  crash before that loses an uncommitted signature nobody has seen; a crash after it
  leaves a durable row that every later request gets back. Deterministic (RFC 6979)
  nonces make a re-signed identical request yield the same bytes in any case.

Committing several requests in one transaction (group commit) lets 50 concurrent
managers share one fsync instead of queueing for 50.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiosqlite

from revault.cosigner_signing import SigningRequest
from revault.errors import Refused
from revault.primitives import OutPoint
from revault.storage import open_database, run_in_database_thread

log = logging.getLogger("revault.cosigner.store")

DATABASE_NAME = "cosigner.sqlite3"
MAX_BATCH = 256  # bounds the time one commit keeps the requests behind it waiting

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


def lookup_sql(count: int) -> str:
    """The rows of `count` outpoints (bound as txid, vout pairs) in one statement.

    A join on the primary key, not `(txid, vout) IN (VALUES ...)`: SQLite plans the
    latter as a scan of the whole table, which grows forever."""
    values = ",".join("(?, ?)" for _ in range(count))
    return ("SELECT s.txid, s.vout, s.signature, s.digest, s.spend_txid, s.manager, "
            f"s.created_at FROM (VALUES {values}) AS q "
            "JOIN signatures AS s ON s.txid = q.column1 AND s.vout = q.column2")


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


@dataclass(slots=True)
class _Job:
    outpoint: OutPoint
    request: SigningRequest | None      # None: a read-only lookup
    manager: bytes
    future: asyncio.Future


Signer = Callable[[bytes], bytes]


class SignatureStore:
    """Use `await SignatureStore.open(path, signer)`; `close()` when done."""

    def __init__(self, db: aiosqlite.Connection, signer: Signer):
        self._db = db
        self._signer = signer
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._closing = False
        self._writer = asyncio.get_running_loop().create_task(self._run(), name="cosigner-store")

    @classmethod
    async def open(cls, path: Path, signer: Signer) -> SignatureStore:
        db = await open_database(Path(path), MIGRATIONS, synchronous="FULL")
        return cls(db, signer)

    async def sign_once(self, request: SigningRequest, manager: bytes) -> SignOutcome:
        """The signature for `request.outpoint`: made, stored and committed now if it is
        the first request for that outpoint, else the stored one. Returns only once the
        row is durable."""
        return await self._submit(_Job(request.outpoint, request, manager, self._future()))

    async def get(self, outpoint: OutPoint) -> StoredSignature | None:
        outcome = await self._submit(_Job(outpoint, None, b"", self._future()))
        return outcome.stored if outcome is not None else None

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, job: _Job):
        if self._closing:
            raise StoreClosed("cosigner is shutting down")
        self._queue.put_nowait(job)
        # shield: a caller that goes away must not cancel a future the writer resolves.
        return await asyncio.shield(job.future)

    async def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(None)
        await self._writer
        await self._db.close()

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            batch: list[_Job] = []
            stop = job is None
            if job is not None:
                batch.append(job)
            while not stop and len(batch) < MAX_BATCH and not self._queue.empty():
                more = self._queue.get_nowait()
                if more is None:
                    stop = True
                else:
                    batch.append(more)
            if batch:
                await self._commit_batch(batch)
            if stop:
                while not self._queue.empty():
                    leftover = self._queue.get_nowait()
                    if leftover is not None and not leftover.future.done():
                        leftover.future.set_exception(StoreClosed("cosigner is shutting down"))
                return

    async def _commit_batch(self, batch: list[_Job]) -> None:
        work = [(job.outpoint, job.request, job.manager) for job in batch]
        try:
            # The whole transaction is one call on the database thread: once started it
            # runs to COMMIT or ROLLBACK whatever happens to this task, and nothing of
            # the event loop (a cancelled request, a closing connection) can interleave.
            results = await run_in_database_thread(self._db, _transaction, work,
                                                   self._signer, int(time.time()))
        except Exception as e:
            # Nothing of this batch leaves the process: a signature is sent only after
            # COMMIT returned. (If COMMIT did land, later requests get the stored rows.)
            log.error("signature store transaction failed (%d requests): %s", len(batch), e)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job, outcome in zip(batch, results):
            if not job.future.done():
                job.future.set_result(outcome)


def _transaction(conn: sqlite3.Connection,
                 work: list[tuple[OutPoint, SigningRequest | None, bytes]],
                 signer: Signer, now: int) -> list[SignOutcome | None]:
    """On the database thread: BEGIN IMMEDIATE, read every outpoint of the batch, sign
    the absent ones in arrival order (a later job for an outpoint signed earlier in the
    batch gets that signature), insert them, COMMIT. Rolled back on any failure."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        outpoints = list(dict.fromkeys(outpoint for outpoint, _, _ in work))
        rows = conn.execute(lookup_sql(len(outpoints)),
                            [v for op in outpoints for v in (op.txid, op.vout)]).fetchall()
        known: dict[OutPoint, StoredSignature] = {}
        for txid, vout, signature, digest, spend_txid, manager, created_at in rows:
            outpoint = OutPoint(txid, vout)
            known[outpoint] = StoredSignature(outpoint, bytes(signature), bytes(digest),
                                              spend_txid, bytes(manager), created_at)
        results: list[SignOutcome | None] = []
        fresh: list[StoredSignature] = []
        for outpoint, request, manager in work:
            stored = known.get(outpoint)
            if stored is not None:
                results.append(SignOutcome(stored, new=False))
            elif request is None:
                results.append(None)
            else:
                stored = StoredSignature(outpoint, signer(request.digest), request.digest,
                                         request.spend_txid, manager, now)
                known[outpoint] = stored
                fresh.append(stored)
                results.append(SignOutcome(stored, new=True))
        if fresh:
            conn.executemany(
                "INSERT INTO signatures "
                "(txid, vout, signature, digest, spend_txid, manager, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(st.outpoint.txid, st.outpoint.vout, st.signature, st.digest, st.spend_txid,
                  st.manager, st.created_at) for st in fresh])
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (SQLITE_BUSY, I/O error) can leave the transaction open; the
        # next BEGIN IMMEDIATE would then fail forever.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                log.error("signature store rollback failed: %s", e)
        raise
    return results
