"""The cosigner's once-per-outpoint store: sign once, durably, whatever the concurrency."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest

from revault.cosigner_signing import CosignerKey
from revault.cosigner_store import DATABASE_NAME, LOOKUP_SQL, MIGRATIONS, SignatureStore, StoreClosed
from revault.primitives import OutPoint
from tests.support.cosigner_psbt import assert_valid_signature, make_spend, random_key


@pytest.fixture
def key() -> CosignerKey:
    return CosignerKey(random_key())


def rows(path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT txid, vout, signature, spend_txid, manager FROM signatures").fetchall()


async def test_store_signs_once_per_outpoint(tmp_path, key):
    path = tmp_path / DATABASE_NAME
    store = await SignatureStore.open(path, key.sign)
    txid = os.urandom(32)
    first = make_spend(key.public_key, txid=txid, vout=1)
    second = make_spend(key.public_key, txid=txid, vout=1)
    a = await store.sign_once(key.prepare(first.psbt(), 0), b"m" * 32)
    b = await store.sign_once(key.prepare(second.psbt(), 0), b"n" * 32)
    assert a.new and not b.new
    assert a.stored == b.stored
    assert_valid_signature(a.stored.signature, first.digest(0), key.public_key)
    assert b.stored.manager == b"m" * 32
    assert b.stored.spend_txid == first.tx().GetTxid()[::-1].hex()
    other_vout = make_spend(key.public_key, txid=txid, vout=2)
    c = await store.sign_once(key.prepare(other_vout.psbt(), 0), b"n" * 32)
    assert c.new and c.stored.signature != a.stored.signature
    await store.close()

    # Survives a reopen, and the rule holds across it.
    store = await SignatureStore.open(path, key.sign)
    third = make_spend(key.public_key, txid=txid, vout=1)
    d = await store.sign_once(key.prepare(third.psbt(), 0), b"o" * 32)
    assert not d.new and d.stored.signature == a.stored.signature
    assert await store.get(OutPoint(txid.hex(), 1)) == a.stored
    assert await store.get(OutPoint(txid.hex(), 7)) is None
    await store.close()
    assert len(rows(path)) == 2


async def test_store_concurrent_conflicting_requests_yield_one_signature(tmp_path, key):
    calls = []

    def counting_signer(digest: bytes) -> bytes:
        calls.append(digest)
        return key.sign(digest)

    store = await SignatureStore.open(tmp_path / DATABASE_NAME, counting_signer)
    txid = os.urandom(32)
    requests = [key.prepare(make_spend(key.public_key, txid=txid).psbt(), 0) for _ in range(50)]
    assert len({r.digest for r in requests}) == 50
    outcomes = await asyncio.gather(*(store.sign_once(r, bytes([i]) * 32)
                                      for i, r in enumerate(requests)))
    await store.close()
    assert len({o.stored.signature for o in outcomes}) == 1
    assert sum(o.new for o in outcomes) == 1
    assert len(calls) == 1


async def test_store_failed_commit_returns_nothing_and_recovers(tmp_path, key):
    path = tmp_path / DATABASE_NAME
    store = await SignatureStore.open(path, key.sign)
    # Another process holds the write lock past busy_timeout: the batch must fail, and
    # no signature may come back for it.
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    await store._db.execute("PRAGMA busy_timeout=50")
    spend = make_spend(key.public_key)
    with pytest.raises(sqlite3.OperationalError):
        await store.sign_once(key.prepare(spend.psbt(), 0), b"m" * 32)
    blocker.execute("ROLLBACK")
    blocker.close()
    outcome = await store.sign_once(key.prepare(spend.psbt(), 0), b"m" * 32)
    assert outcome.new
    await store.close()
    assert len(rows(path)) == 1


async def test_store_refuses_after_close(tmp_path, key):
    store = await SignatureStore.open(tmp_path / DATABASE_NAME, key.sign)
    await store.close()
    with pytest.raises(StoreClosed):
        await store.sign_once(key.prepare(make_spend(key.public_key).psbt(), 0), b"m" * 32)


async def test_store_is_durable_full_wal(tmp_path, key):
    store = await SignatureStore.open(tmp_path / DATABASE_NAME, key.sign)
    async with store._db.execute("PRAGMA synchronous") as cursor:
        assert (await cursor.fetchone())[0] == 2  # FULL
    async with store._db.execute("PRAGMA journal_mode") as cursor:
        assert (await cursor.fetchone())[0] == "wal"
    await store.close()
    assert (tmp_path / DATABASE_NAME).stat().st_mode & 0o077 == 0



def test_lookup_uses_the_primary_key():
    # The table only grows: a lookup that scans it would slow every request down forever.
    db = sqlite3.connect(":memory:")
    db.execute(MIGRATIONS[0])
    db.executemany("INSERT INTO signatures VALUES (?, ?, x'00', x'00', '', x'00', 0)",
                   [(os.urandom(32).hex(), v) for v in range(2000) for _ in range(1)])
    db.execute("ANALYZE")
    plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {LOOKUP_SQL}", ["00" * 32, 0])]
    assert any("USING PRIMARY KEY (txid=? AND vout=?)" in step for step in plan), plan
    assert not any(step.startswith("SCAN s") or step == "SCAN signatures" for step in plan), plan


async def test_store_batch_with_repeats_and_lookups(tmp_path, key):
    # One batch mixing: the same outpoint several times, a lookup of an outpoint signed
    # earlier in that batch, and fresh outpoints. Submitted together, committed together.
    store = await SignatureStore.open(tmp_path / DATABASE_NAME, key.sign)
    txid = os.urandom(32)
    same = [key.prepare(make_spend(key.public_key, txid=txid).psbt(), 0) for _ in range(5)]
    fresh = [key.prepare(make_spend(key.public_key).psbt(), 0) for _ in range(5)]
    jobs = [store.sign_once(same[0], b"a" * 32), store.get(OutPoint(txid.hex(), 0)),
            *(store.sign_once(r, b"b" * 32) for r in same[1:] + fresh)]
    first, looked_up, *rest = await asyncio.gather(*jobs)
    await store.close()
    # The lookup was queued after the first request: it sees it (in the same transaction).
    assert looked_up == first.stored
    assert first.new and all(not o.new for o in rest[:4]) and all(o.new for o in rest[4:])
    assert {o.stored.signature for o in rest[:4]} == {first.stored.signature}
    assert len(rows(tmp_path / DATABASE_NAME)) == 6


async def test_store_failure_mid_transaction_leaks_nothing(tmp_path, key):
    # The signature made inside a transaction that then fails must never come back:
    # the caller gets the error, the row is not there, and the next request signs anew.
    made = []

    def failing_once(digest: bytes) -> bytes:
        sig = key.sign(digest)
        made.append(sig)
        if len(made) == 1:
            raise OSError("simulated failure between signing and COMMIT")
        return sig

    path = tmp_path / DATABASE_NAME
    store = await SignatureStore.open(path, failing_once)
    first = make_spend(key.public_key)
    second = make_spend(key.public_key, txid=first.inputs[0].txid)
    with pytest.raises(OSError):
        await store.sign_once(key.prepare(first.psbt(), 0), b"m" * 32)
    assert rows(path) == []
    outcome = await store.sign_once(key.prepare(second.psbt(), 0), b"m" * 32)
    await store.close()
    assert outcome.new and outcome.stored.signature == made[1] != made[0]
    assert [r[2] for r in rows(path)] == [made[1]]
