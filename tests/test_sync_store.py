"""The sync server's SQLite store, driven directly: replace semantics, expiry, quotas."""

from __future__ import annotations

import asyncio
import sqlite3
import pytest

from revault.sync_store import (
    MIGRATIONS, QuotaExceeded, Quotas, Retention, SqliteSyncStore,
)

ALICE = b"\xaa" * 32
BOB = b"\xbb" * 32
ID1, ID2, ID3 = "01" * 32, "02" * 32, "03" * 32
PK1, PK2, PK3 = "02" + "11" * 32, "03" + "22" * 32, "02" + "33" * 32
TXA, TXB, TXC = "a1" * 32, "b2" * 32, "c3" * 32


class Clock:
    def __init__(self, now: int = 1_700_000_000):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def open_store(tmp_path, clock):
    stores = []

    async def make(quotas: Quotas = Quotas(), retention: Retention = Retention()):
        store = await SqliteSyncStore.open(tmp_path / "sync.sqlite3", retention, quotas, clock)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def store(open_store):
    return await open_store()


async def test_signature_replaced_per_id_and_pubkey(store):
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_signature(ID1, PK2, "30bb", BOB)
    await store.put_signature(ID2, PK1, "30cc", ALICE)
    await store.put_signature(ID1, PK1, "30dd", ALICE)
    assert await store.get_signatures(ID1) == {PK1: "30dd", PK2: "30bb"}
    assert await store.get_signatures(ID2) == {PK1: "30cc"}
    assert await store.get_signatures(ID3) == {}
    assert store.row_counts()["signatures"] == 3


async def test_erase_removes_only_that_id(store):
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_signature(ID1, PK2, "30bb", BOB)
    await store.put_signature(ID2, PK1, "30cc", ALICE)
    assert await store.erase_signatures(ID1) == 2
    assert await store.get_signatures(ID1) == {}
    assert await store.get_signatures(ID2) == {PK1: "30cc"}
    assert await store.erase_signatures(ID1) == 0
    await store.put_signature(ID1, PK2, "30ee", BOB)
    assert await store.get_signatures(ID1) == {PK2: "30ee"}


async def test_spend_requests_batching_and_replace(store, clock):
    await store.put_spend_request(ID1, TXA, "tx-a", 10, ALICE)
    clock.now += 1
    await store.put_spend_request(ID2, TXA, "tx-a", 10, ALICE)  # one tx, two vaults
    clock.now += 1
    await store.put_spend_request(ID1, TXB, "tx-b", 11, BOB)    # second attempt, same vault
    clock.now += 1
    await store.put_spend_request(ID1, TXA, "tx-a", 99, ALICE)  # same (vault, txid): replaced
    got = [(r.vault_id, r.txid, r.transaction, r.timestamp)
           for r in await store.get_spend_requests(100)]
    assert got == [(ID1, TXA, "tx-a", 99), (ID1, TXB, "tx-b", 11), (ID2, TXA, "tx-a", 10)]
    assert len(await store.get_spend_requests(2)) == 2
    assert store.row_counts()["spend_requests"] == 3


async def test_latest_opinion_wins_per_vault_txid_pubkey(store, clock):
    await store.put_opinion(ID1, TXA, PK1, False, "too early", "30aa", ALICE)
    clock.now += 1
    await store.put_opinion(ID1, TXA, PK2, True, "", "30bb", BOB)
    clock.now += 1
    await store.put_opinion(ID1, TXB, PK1, True, "fine", "30cc", ALICE)
    clock.now += 1
    await store.put_opinion(ID1, TXA, PK1, True, "now ok", "30dd", ALICE)
    await store.put_opinion(ID2, TXA, PK1, False, "no", "30ee", ALICE)
    got = {(o.txid, o.pubkey): (o.accepted, o.reason, o.sig)
           for o in await store.get_opinions(ID1, 100)}
    assert got == {
        (TXA, PK1): (True, "now ok", "30dd"),
        (TXA, PK2): (True, "", "30bb"),
        (TXB, PK1): (True, "fine", "30cc"),
    }
    assert [o.reason for o in await store.get_opinions(ID2, 100)] == ["no"]


async def test_expiry_filters_on_read_and_purge_deletes(open_store, clock):
    retention = Retention(signatures=100, spend_requests=50, spend_opinions=20)
    store = await open_store(retention=retention)
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_spend_request(ID1, TXA, "tx-a", 1, ALICE)
    await store.put_opinion(ID1, TXA, PK1, True, "", "30aa", BOB)

    clock.now += 19
    assert len(await store.get_opinions(ID1, 10)) == 1
    clock.now += 1
    assert await store.get_opinions(ID1, 10) == []
    assert len(await store.get_spend_requests(10)) == 1
    clock.now += 30
    assert await store.get_spend_requests(10) == []
    assert await store.get_signatures(ID1) == {PK1: "30aa"}
    # Rewriting refreshes the age.
    await store.put_signature(ID1, PK2, "30bb", BOB)
    clock.now += 50
    assert await store.get_signatures(ID1) == {PK2: "30bb"}

    assert store.row_counts() == {"signatures": 2, "spend_requests": 1, "opinions": 1}
    assert await store.purge_expired() == 3
    assert store.row_counts() == {"signatures": 1, "spend_requests": 0, "opinions": 0}
    assert await store.purge_expired() == 0


async def test_purge_works_in_batches(open_store, clock, monkeypatch):
    import revault.sync_store as sync_store
    monkeypatch.setattr(sync_store, "PURGE_BATCH", 3)
    store = await open_store(retention=Retention(signatures=10))
    for i in range(8):
        await store.put_signature(f"{i:064x}", PK1, "30aa", ALICE)
    clock.now += 10
    assert await store.purge_expired() == 8
    assert store.row_counts()["signatures"] == 0


async def test_signatures_per_id_quota(open_store):
    store = await open_store(Quotas(signatures_per_id=2))
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_signature(ID1, PK2, "30bb", ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_signature(ID1, PK3, "30cc", ALICE)
    assert e.value.quota == "signatures_per_id"
    await store.put_signature(ID1, PK2, "30dd", BOB)  # a replacement is not a new row
    await store.put_signature(ID2, PK3, "30cc", ALICE)
    assert await store.get_signatures(ID1) == {PK1: "30aa", PK2: "30dd"}


async def test_signatures_per_peer_quota(open_store):
    store = await open_store(Quotas(signatures_per_peer=2))
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_signature(ID1, PK2, "30aa", ALICE)
    await store.put_signature(ID1, PK2, "30ab", ALICE)  # replacing her own: no new row
    with pytest.raises(QuotaExceeded) as e:
        await store.put_signature(ID2, PK1, "30aa", ALICE)
    assert e.value.quota == "signatures_per_peer"
    await store.put_signature(ID2, PK1, "30aa", BOB)  # another peer has its own allowance
    # Taking over someone else's row counts against the new submitter.
    with pytest.raises(QuotaExceeded):
        await store.put_signature(ID2, PK1, "30bb", ALICE)
    # After err_sig her rows no longer count.
    await store.erase_signatures(ID1)
    await store.put_signature(ID2, PK1, "30bb", ALICE)  # takes Bob's row over
    await store.put_signature(ID3, PK1, "30cc", BOB)
    await store.put_signature(ID3, PK2, "30cc", BOB)  # Bob's count fell with the takeover


async def test_peer_quota_purges_that_peers_expired_rows_before_refusing(open_store, clock):
    store = await open_store(Quotas(signatures_per_peer=2, spend_requests_per_manager=1,
                                    opinions_per_watchtower=1),
                             Retention(signatures=10, spend_requests=10, spend_opinions=10))
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_signature(ID2, PK1, "30aa", ALICE)
    await store.put_spend_request(ID1, TXA, "t", 1, ALICE)
    await store.put_opinion(ID1, TXA, PK1, True, "", "30aa", ALICE)
    clock.now += 10
    await store.put_signature(ID3, PK1, "30bb", BOB)  # Bob's live row survives below
    await store.put_signature(ID3, PK2, "30bb", ALICE)
    await store.put_spend_request(ID2, TXA, "t", 1, ALICE)
    await store.put_opinion(ID2, TXA, PK1, True, "", "30aa", ALICE)
    assert await store.get_signatures(ID3) == {PK1: "30bb", PK2: "30bb"}
    with pytest.raises(QuotaExceeded):
        await store.put_spend_request(ID3, TXA, "t", 1, ALICE)  # the live one counts


def _counts_match_rows(path) -> None:
    db = sqlite3.connect(path)
    try:
        kept = set(db.execute("SELECT tbl, submitter, n FROM rows_by_submitter"))
        actual = set()
        for table in ("signatures", "spend_requests", "opinions"):
            actual |= {(table, submitter, n) for submitter, n in db.execute(
                f"SELECT submitter, COUNT(*) FROM {table} GROUP BY submitter")}
        assert kept == actual
    finally:
        db.close()


async def test_per_peer_counts_follow_every_kind_of_change(open_store, clock, tmp_path):
    store = await open_store(retention=Retention(signatures=10, spend_requests=10,
                                                 spend_opinions=10))
    for i, (tx_id, submitter) in enumerate([(ID1, ALICE), (ID2, ALICE), (ID3, BOB)]):
        await store.put_signature(tx_id, PK1, f"30{i:02x}", submitter)
        await store.put_spend_request(tx_id, TXA, "t", i, submitter)
        await store.put_opinion(tx_id, TXA, PK1, True, "", "30aa", submitter)
    await store.put_signature(ID1, PK1, "30ff", BOB)              # takeover
    await store.put_spend_request(ID1, TXA, "t", 9, BOB)          # takeover
    await store.put_opinion(ID2, TXA, PK1, False, "no", "30bb", BOB)  # takeover
    await store.put_signature(ID1, PK2, "30ee", ALICE)            # a new row
    await store.erase_signatures(ID2)
    _counts_match_rows(tmp_path / "sync.sqlite3")
    clock.now += 10
    await store.put_signature(ID3, PK2, "30dd", ALICE)
    assert await store.purge_expired() > 0
    _counts_match_rows(tmp_path / "sync.sqlite3")


async def test_migration_from_version_1_counts_existing_rows(tmp_path, clock):
    from revault.storage import open_database
    path = tmp_path / "sync.sqlite3"
    db = await open_database(path, MIGRATIONS[:1])
    now = int(clock())
    await db.executemany(
        "INSERT INTO signatures (tx_id, pubkey, signature, submitter, stored_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [(ID1, PK1, "30aa", ALICE, now), (ID2, PK1, "30aa", ALICE, now),
         (ID2, PK2, "30aa", BOB, now)])
    await db.close()
    store = await SqliteSyncStore.open(path, Retention(), Quotas(signatures_per_peer=2), clock)
    try:
        _counts_match_rows(path)
        with pytest.raises(QuotaExceeded):
            await store.put_signature(ID3, PK1, "30aa", ALICE)
        await store.put_signature(ID3, PK1, "30aa", BOB)
        assert await store.get_signatures(ID2) == {PK1: "30aa", PK2: "30aa"}
    finally:
        await store.close()


async def test_total_quota_purges_expired_before_refusing(open_store, clock):
    store = await open_store(Quotas(total_signatures=2), Retention(signatures=10))
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_signature(ID2, PK1, "30aa", ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_signature(ID3, PK1, "30aa", ALICE)
    assert e.value.quota == "total_signatures"
    assert str(e.value) == "quota total_signatures reached (2)"
    clock.now += 10
    await store.put_signature(ID3, PK1, "30aa", ALICE)
    assert store.row_counts()["signatures"] == 1


async def test_spend_request_quotas(open_store):
    store = await open_store(Quotas(spend_requests_per_vault=2, spend_requests_per_manager=3,
                                    total_spend_requests=4))
    await store.put_spend_request(ID1, TXA, "t", 1, ALICE)
    await store.put_spend_request(ID1, TXB, "t", 1, ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_spend_request(ID1, TXC, "t", 1, ALICE)
    assert e.value.quota == "spend_requests_per_vault"
    await store.put_spend_request(ID1, TXB, "t", 2, ALICE)  # replacement
    await store.put_spend_request(ID2, TXA, "t", 1, ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_spend_request(ID3, TXA, "t", 1, ALICE)
    assert e.value.quota == "spend_requests_per_manager"
    await store.put_spend_request(ID3, TXA, "t", 1, BOB)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_spend_request(ID3, TXB, "t", 1, BOB)
    assert e.value.quota == "total_spend_requests"
    assert len(await store.get_spend_requests(100)) == 4


async def test_opinion_quotas(open_store):
    store = await open_store(Quotas(opinions_per_vault=2, opinions_per_watchtower=3,
                                    total_opinions=4))
    await store.put_opinion(ID1, TXA, PK1, True, "", "30", ALICE)
    await store.put_opinion(ID1, TXA, PK2, True, "", "30", ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_opinion(ID1, TXB, PK1, True, "", "30", ALICE)
    assert e.value.quota == "opinions_per_vault"
    await store.put_opinion(ID1, TXA, PK2, False, "changed my mind", "31", ALICE)
    await store.put_opinion(ID2, TXA, PK1, True, "", "30", ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_opinion(ID3, TXA, PK1, True, "", "30", ALICE)
    assert e.value.quota == "opinions_per_watchtower"
    await store.put_opinion(ID3, TXA, PK1, True, "", "30", BOB)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_opinion(ID3, TXB, PK1, True, "", "30", BOB)
    assert e.value.quota == "total_opinions"


async def test_refused_write_stores_nothing(open_store):
    store = await open_store(Quotas(signatures_per_id=1))
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    with pytest.raises(QuotaExceeded):
        await store.put_signature(ID1, PK2, "30bb", ALICE)
    assert await store.get_signatures(ID1) == {PK1: "30aa"}
    assert store.row_counts()["signatures"] == 1
    # And the store is still usable: the failed transaction was rolled back.
    await store.put_signature(ID2, PK2, "30bb", ALICE)


async def test_data_survives_reopen_and_counts_reload(tmp_path, clock):
    path = tmp_path / "sync.sqlite3"
    store = await SqliteSyncStore.open(path, clock=clock)
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_spend_request(ID1, TXA, "tx", 5, BOB)
    await store.put_opinion(ID1, TXA, PK2, False, "no", "30bb", BOB)
    await store.close()
    store = await SqliteSyncStore.open(path, clock=clock)
    try:
        assert await store.get_signatures(ID1) == {PK1: "30aa"}
        assert [r.transaction for r in await store.get_spend_requests(10)] == ["tx"]
        assert [o.reason for o in await store.get_opinions(ID1, 10)] == ["no"]
        assert store.row_counts() == {"signatures": 1, "spend_requests": 1, "opinions": 1}
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_concurrent_writes_are_all_stored(store):
    pubkeys = [f"02{i:064x}" for i in range(60)]
    await asyncio.gather(*(store.put_signature(ID1 if i % 2 else ID2, pk, f"30{i:02x}", ALICE)
                           for i, pk in enumerate(pubkeys)))
    got = {**await store.get_signatures(ID1), **await store.get_signatures(ID2)}
    assert got == {pk: f"30{i:02x}" for i, pk in enumerate(pubkeys)}
    assert store.row_counts()["signatures"] == 60


async def test_cancelled_writer_still_commits_and_frees_the_lock(store):
    task = asyncio.create_task(store.put_signature(ID1, PK1, "30aa", ALICE))
    await asyncio.sleep(0)  # let it start its transaction before cancelling it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.put_signature(ID1, PK2, "30bb", BOB)  # would fail if a transaction leaked
    assert await store.get_signatures(ID1) == {PK1: "30aa", PK2: "30bb"}



async def test_group_commit_refuses_only_the_writes_over_quota(open_store):
    store = await open_store(Quotas(signatures_per_id=3))
    pubkeys = [f"02{i:064x}" for i in range(8)]
    results = await asyncio.gather(
        *(store.put_signature(ID1, pk, "30aa", ALICE) for pk in pubkeys),
        store.put_signature(ID2, PK1, "30bb", BOB),
        return_exceptions=True)
    stored = await store.get_signatures(ID1)
    accepted = [pk for pk, r in zip(pubkeys, results) if r is None]
    assert sorted(accepted) == sorted(stored) and len(stored) == 3
    assert all(isinstance(r, QuotaExceeded) for r in results[:8] if r is not None)
    assert results[8] is None and await store.get_signatures(ID2) == {PK1: "30bb"}
    assert store.row_counts()["signatures"] == 4


async def test_failed_commit_fails_every_write_of_the_group(store, monkeypatch):
    failures = [sqlite3.OperationalError("database or disk is full")]

    def commit(db):
        if failures:
            raise failures.pop()
        db.execute("COMMIT")

    monkeypatch.setattr(store._writer, "_commit", commit)
    results = await asyncio.gather(
        *(store.put_signature(ID1, f"02{i:064x}", "30aa", ALICE) for i in range(5)),
        return_exceptions=True)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
    assert await store.get_signatures(ID1) == {}
    assert store.row_counts()["signatures"] == 0
    await store.put_signature(ID1, PK1, "30aa", ALICE)  # the writer is still healthy
    assert await store.get_signatures(ID1) == {PK1: "30aa"}


async def test_close_commits_writes_already_queued(tmp_path, clock):
    path = tmp_path / "sync.sqlite3"
    store = await SqliteSyncStore.open(path, clock=clock)
    writes = [asyncio.create_task(store.put_signature(f"{i:064x}", PK1, "30aa", ALICE))
              for i in range(20)]
    await asyncio.sleep(0)  # let them queue
    await store.close()
    await asyncio.gather(*writes)  # each was acknowledged, so each must be on disk
    store = await SqliteSyncStore.open(path, clock=clock)
    try:
        assert store.row_counts()["signatures"] == 20
    finally:
        await store.close()
