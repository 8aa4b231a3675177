"""The sync server's stores, driven directly: replace semantics, expiry, quotas, shares,
bindings and cursors. Every test that is about the rules runs against both backends
(SQLite, and a real PostgreSQL server started for the session); the tests about one
backend's own machinery say so in their name."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import pytest

from revault.paging import Cursor, fill_page
from revault.sync_store import (
    MIGRATIONS, QuotaExceeded, Quotas, Retention, Sharers, SqliteSyncStore, Taken,
)
from revault.sync_store_postgresql import POOL_SIZE, WRITE_LOCK, PostgresSyncStore

ALICE = b"\xaa" * 32
BOB = b"\xbb" * 32
CAROL = b"\xcc" * 32
ID1, ID2, ID3 = "01" * 32, "02" * 32, "03" * 32
PK1, PK2, PK3 = "02" + "11" * 32, "03" + "22" * 32, "02" + "33" * 32
TXA, TXB, TXC = "a1" * 32, "b2" * 32, "c3" * 32
BACKENDS = ["sqlite", "postgresql"]


class Clock:
    def __init__(self, now: int = 1_700_000_000):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def location(backend, tmp_path, request):
    """Where this test's store lives: a file, or a database of its own."""
    if backend == "sqlite":
        return tmp_path / "sync.sqlite3"
    return request.getfixturevalue("postgres").new_database()


async def open_at(location, clock, quotas=Quotas(), retention=Retention(), sharers=Sharers()):
    if isinstance(location, str):
        return await PostgresSyncStore.open(location, retention, quotas, clock, sharers=sharers)
    return await SqliteSyncStore.open(location, retention, quotas, clock, sharers=sharers)


@pytest.fixture
async def open_store(location, clock):
    stores = []

    async def make(quotas: Quotas = Quotas(), retention: Retention = Retention(),
                   sharers: Sharers = Sharers()):
        store = await open_at(location, clock, quotas, retention, sharers)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def store(open_store):
    return await open_store()


async def raw_rows(location, sql: str) -> set[tuple]:
    """Rows straight from the database, behind the store's back."""
    if isinstance(location, str):
        conn = await asyncpg.connect(location)
        try:
            return {tuple(r) for r in await conn.fetch(sql)}
        finally:
            await conn.close()
    with sqlite3.connect(location) as db:
        return set(db.execute(sql))


async def pending_requests(store, cursor=None):
    """Every pending request in storage order, paging through with cursors."""
    cursor = cursor or Cursor(store.epoch)
    listed = []
    while True:
        streams = await store.spend_request_streams(cursor, 50)
        page = fill_page(cursor, streams, lambda r: 100, 2 + 101 * 7)
        if not page.items:
            return listed
        listed += page.items
        cursor = page.cursor


async def opinions_on(store, vault_id):
    cursor = Cursor(store.epoch)
    streams = await store.opinion_streams(vault_id, cursor)
    return fill_page(cursor, streams, lambda o: 1, 10**9).items


async def test_signature_replaced_per_id_and_pubkey(store):
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_signature(ID1, PK2, "30bb", BOB)
    await store.put_signature(ID2, PK1, "30cc", ALICE)
    await store.put_signature(ID1, PK1, "30dd", ALICE)
    assert await store.get_signatures(ID1) == {PK1: "30dd", PK2: "30bb"}
    assert await store.get_signatures(ID2) == {PK1: "30cc"}
    assert await store.get_signatures(ID3) == {}
    assert (await store.row_counts())["signatures"] == 3


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
           for r in await pending_requests(store)]
    # In storage order, the replaced one counting as stored anew (docs/protocol.md,
    # "Cursors and fair pages").
    assert got == [(ID2, TXA, "tx-a", 10), (ID1, TXB, "tx-b", 11), (ID1, TXA, "tx-a", 99)]
    assert (await store.row_counts())["spend_requests"] == 3


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
           for o in await opinions_on(store, ID1)}
    assert got == {
        (TXA, PK1): (True, "now ok", "30dd"),
        (TXA, PK2): (True, "", "30bb"),
        (TXB, PK1): (True, "fine", "30cc"),
    }
    assert [o.reason for o in await opinions_on(store, ID2)] == ["no"]


async def test_expiry_filters_on_read_and_purge_deletes(open_store, clock):
    retention = Retention(signatures=100, spend_requests=50, spend_opinions=20)
    store = await open_store(retention=retention)
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_spend_request(ID1, TXA, "tx-a", 1, ALICE)
    await store.put_opinion(ID1, TXA, PK1, True, "", "30aa", BOB)

    clock.now += 19
    assert len(await opinions_on(store, ID1)) == 1
    clock.now += 1
    assert await opinions_on(store, ID1) == []
    assert len(await pending_requests(store)) == 1
    clock.now += 30
    assert await pending_requests(store) == []
    assert await store.get_signatures(ID1) == {PK1: "30aa"}
    # Rewriting refreshes the age.
    await store.put_signature(ID1, PK2, "30bb", BOB)
    clock.now += 50
    assert await store.get_signatures(ID1) == {PK2: "30bb"}

    assert (await store.row_counts()) == {"signatures": 2, "spend_requests": 1, "opinions": 1}
    assert await store.purge_expired() == 3
    assert (await store.row_counts()) == {"signatures": 1, "spend_requests": 0, "opinions": 0}
    assert await store.purge_expired() == 0


async def test_purge_works_in_batches(open_store, clock, monkeypatch):
    import revault.sync_rules as sync_rules
    monkeypatch.setattr(sync_rules, "PURGE_BATCH", 3)
    store = await open_store(retention=Retention(signatures=10))
    for i in range(8):
        await store.put_signature(f"{i:064x}", PK1, "30aa", ALICE)
    clock.now += 10
    assert await store.purge_expired() == 8
    assert (await store.row_counts())["signatures"] == 0


async def test_signatures_per_id_quota(open_store):
    store = await open_store(Quotas(signatures_per_id=2))
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_signature(ID1, PK2, "30bb", ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_signature(ID1, PK3, "30cc", ALICE)
    assert e.value.quota == "signatures_per_id"
    await store.put_signature(ID1, PK2, "30dd", ALICE)  # a replacement is not a new row
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
    # After err_sig her rows no longer count.
    await store.erase_signatures(ID1)
    await store.put_signature(ID3, PK1, "30bb", ALICE)
    await store.put_signature(ID3, PK2, "30bb", ALICE)


async def test_a_signature_belongs_to_who_posted_it_until_err_sig(open_store, clock):
    store = await open_store(retention=Retention(signatures=10))
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    with pytest.raises(Taken) as e:
        await store.put_signature(ID1, PK1, "30bb", BOB)
    assert e.value.field == "pubkey"
    await store.put_signature(ID2, PK1, "30bb", BOB)    # another id is another entry
    await store.put_signature(ID1, PK1, "30cc", ALICE)  # the owner replaces her own
    assert await store.get_signatures(ID1) == {PK1: "30cc"}
    await store.erase_signatures(ID1)                    # err_sig releases it
    await store.put_signature(ID1, PK1, "30dd", BOB)
    assert await store.get_signatures(ID1) == {PK1: "30dd"}
    clock.now += 10                                       # and so does expiry
    await store.put_signature(ID1, PK1, "30ee", ALICE)
    assert await store.get_signatures(ID1) == {PK1: "30ee"}


async def test_refused_writes_roll_back_alone_within_one_batch(store):
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    # Queued together, so committed as one batch: the refused ones (the middle and the
    # last) roll back alone, and the others commit around them.
    results = await asyncio.gather(
        store.put_signature(ID1, PK2, "30bb", BOB),
        store.put_signature(ID1, PK1, "30cc", BOB),
        store.put_signature(ID2, PK1, "30dd", ALICE),
        store.put_signature(ID1, PK1, "30ee", BOB),
        return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "Taken", "NoneType", "Taken"]
    assert await store.get_signatures(ID1) == {PK1: "30aa", PK2: "30bb"}
    assert await store.get_signatures(ID2) == {PK1: "30dd"}
    await store.put_signature(ID3, PK3, "30ff", CAROL)   # and the writer goes on
    assert await store.get_signatures(ID3) == {PK3: "30ff"}


async def test_an_opinion_key_belongs_to_the_first_watchtower_that_used_it(open_store, clock):
    store = await open_store(retention=Retention(spend_opinions=10))
    await store.put_opinion(ID1, TXA, PK1, False, "no", "30aa", ALICE)
    # Bob replays Alice's earlier refusal, or uses her key anywhere: refused.
    for vault, txid in ((ID1, TXA), (ID2, TXB)):
        with pytest.raises(Taken):
            await store.put_opinion(vault, txid, PK1, False, "no", "30aa", BOB)
    await store.put_opinion(ID1, TXA, PK2, True, "", "30bb", BOB)  # his own key is his
    await store.put_opinion(ID1, TXA, PK1, True, "ok now", "30cc", ALICE)
    got = {(o.pubkey, o.accepted, o.reason) for o in await opinions_on(store, ID1)}
    assert got == {(PK1, True, "ok now"), (PK2, True, "")}
    clock.now += 10  # once none of her opinions is kept, the key is free again
    await store.put_opinion(ID2, TXB, PK1, True, "", "30dd", BOB)
    assert await store.purge_expired() == 2


async def test_each_peer_fills_only_its_share_of_a_group(open_store):
    store = await open_store(Quotas(signatures_per_id=4, spend_requests_per_vault=4,
                                    opinions_per_vault=4),
                             sharers=Sharers(stakeholders=2, managers=2, watchtowers=2))
    pubkeys = [f"02{i:064x}" for i in range(4)]
    for pk in pubkeys[:2]:
        await store.put_signature(ID1, pk, "30aa", ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_signature(ID1, pubkeys[2], "30aa", ALICE)
    assert e.value.quota == "signatures_per_id" and e.value.limit == 2
    assert "share" in str(e.value)
    await store.put_signature(ID1, pubkeys[0], "30ab", ALICE)  # replacing her own is fine
    for pk in pubkeys[2:]:
        await store.put_signature(ID1, pk, "30bb", BOB)         # Bob's share is intact
    for txid in (TXA, TXB):
        await store.put_spend_request(ID1, txid, "t", 1, ALICE)
    with pytest.raises(QuotaExceeded):
        await store.put_spend_request(ID1, TXC, "t", 1, ALICE)
    await store.put_spend_request(ID1, TXC, "t", 1, BOB)
    for txid in (TXA, TXB):
        await store.put_opinion(ID1, txid, PK1, True, "", "30", ALICE)
    with pytest.raises(QuotaExceeded):
        await store.put_opinion(ID1, TXC, PK1, True, "", "30", ALICE)
    await store.put_opinion(ID1, TXC, PK2, True, "", "30", BOB)


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


async def _counts_match_rows(location) -> None:
    kept = {(t, bytes(s), n) for t, s, n in await raw_rows(
        location, "SELECT tbl, submitter, n FROM rows_by_submitter")}
    actual = set()
    for table in ("signatures", "spend_requests", "opinions"):
        actual |= {(table, bytes(s), n) for s, n in await raw_rows(
            location, f"SELECT submitter, COUNT(*) FROM {table} GROUP BY submitter")}
    assert kept == actual


async def test_per_peer_counts_follow_every_kind_of_change(open_store, clock, location):
    store = await open_store(retention=Retention(signatures=10, spend_requests=10,
                                                 spend_opinions=10))
    for i, (tx_id, submitter) in enumerate([(ID1, ALICE), (ID2, ALICE), (ID3, BOB)]):
        await store.put_signature(tx_id, PK1, f"30{i:02x}", submitter)
        await store.put_spend_request(tx_id, TXA, "t", i, submitter)
        await store.put_opinion(tx_id, TXA, PK1 if submitter == ALICE else PK2, True, "",
                                "30aa", submitter)
    await store.put_spend_request(ID1, TXA, "t", 9, BOB)          # takeover
    await store.put_signature(ID1, PK2, "30ee", ALICE)            # a new row
    await store.erase_signatures(ID2)
    await _counts_match_rows(location)
    clock.now += 10
    # Expired entries are free again: taken over, they change submitter in place.
    await store.put_signature(ID1, PK1, "30ff", BOB)
    await store.put_opinion(ID2, TXA, PK1, False, "no", "30bb", BOB)
    await store.put_signature(ID3, PK2, "30dd", ALICE)
    await _counts_match_rows(location)
    assert await store.purge_expired() > 0
    await _counts_match_rows(location)


async def test_sqlite_migration_from_version_1_counts_existing_rows(tmp_path, clock):
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
        await _counts_match_rows(path)
        with pytest.raises(QuotaExceeded):
            await store.put_signature(ID3, PK1, "30aa", ALICE)
        await store.put_signature(ID3, PK1, "30aa", BOB)
        assert await store.get_signatures(ID2) == {PK1: "30aa", PK2: "30aa"}
    finally:
        await store.close()


async def test_sqlite_opinions_from_before_bindings_keep_the_key_to_its_last_user(tmp_path,
                                                                                clock):
    """Before migration 3 two watchtowers could sign with one key; the key went to the
    latest. The other one sending its own opinion again is refused, not refreshed."""
    from revault.storage import open_database
    path = tmp_path / "sync.sqlite3"
    db = await open_database(path, MIGRATIONS[:2])
    now = int(clock())
    await db.executemany(
        "INSERT INTO opinions (vault_id, txid, pubkey, accepted, reason, sig, submitter, "
        "stored_at) VALUES (?, ?, ?, 1, X'', ?, ?, ?)",  # the reason as migration 3 writes it
        [(ID1, TXA, PK1, "30aa", ALICE, now - 10), (ID1, TXB, PK1, "30bb", BOB, now)])
    await db.close()
    store = await SqliteSyncStore.open(path, Retention(), Quotas(), clock)
    try:
        with pytest.raises(Taken):
            await store.put_opinion(ID1, TXA, PK1, True, "", "30aa", ALICE)
        await store.put_opinion(ID1, TXB, PK1, True, "", "30bb", BOB)
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
    assert (await store.row_counts())["signatures"] == 1


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
    assert len(await pending_requests(store)) == 4


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
    await store.put_opinion(ID3, TXA, PK3, True, "", "30", BOB)
    with pytest.raises(QuotaExceeded) as e:
        await store.put_opinion(ID3, TXB, PK3, True, "", "30", BOB)
    assert e.value.quota == "total_opinions"


async def test_refused_write_stores_nothing(open_store):
    store = await open_store(Quotas(signatures_per_id=1))
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    with pytest.raises(QuotaExceeded):
        await store.put_signature(ID1, PK2, "30bb", ALICE)
    assert await store.get_signatures(ID1) == {PK1: "30aa"}
    assert (await store.row_counts())["signatures"] == 1
    # And the store is still usable: the failed transaction was rolled back.
    await store.put_signature(ID2, PK2, "30bb", ALICE)


async def test_data_survives_reopen_and_counts_reload(location, clock):
    store = await open_at(location, clock)
    await store.put_signature(ID1, PK1, "30aa", ALICE)
    await store.put_spend_request(ID1, TXA, "tx", 5, BOB)
    await store.put_opinion(ID1, TXA, PK2, False, "no \x00 \u2028 \U0001f600", "30bb", BOB)
    epoch = store.epoch
    await store.close()
    store = await open_at(location, clock)
    try:
        assert store.epoch == epoch  # cursors stay valid across restarts
        assert await store.get_signatures(ID1) == {PK1: "30aa"}
        assert [r.transaction for r in await pending_requests(store)] == ["tx"]
        assert [o.reason for o in await opinions_on(store, ID1)] == [
            "no \x00 \u2028 \U0001f600"]
        assert (await store.row_counts()) == {"signatures": 1, "spend_requests": 1, "opinions": 1}
    finally:
        await store.close()
    if isinstance(location, str):
        from revault.sync_store_postgresql import MIGRATIONS as PG_MIGRATIONS
        assert await raw_rows(location, "SELECT version FROM schema_version") == {
            (len(PG_MIGRATIONS),)}
    else:
        with sqlite3.connect(location) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_concurrent_writes_are_all_stored(store):
    pubkeys = [f"02{i:064x}" for i in range(60)]
    await asyncio.gather(*(store.put_signature(ID1 if i % 2 else ID2, pk, f"30{i:02x}", ALICE)
                           for i, pk in enumerate(pubkeys)))
    got = {**await store.get_signatures(ID1), **await store.get_signatures(ID2)}
    assert got == {pk: f"30{i:02x}" for i, pk in enumerate(pubkeys)}
    assert (await store.row_counts())["signatures"] == 60


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
    assert (await store.row_counts())["signatures"] == 4


async def test_sqlite_failed_commit_fails_every_write_of_the_group(tmp_path, clock,
                                                                   monkeypatch):
    store = await SqliteSyncStore.open(tmp_path / "sync.sqlite3", clock=clock)
    try:
        await _failed_commit_fails_every_write_of_the_group(store, monkeypatch)
    finally:
        await store.close()


async def _failed_commit_fails_every_write_of_the_group(store, monkeypatch):
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
    assert (await store.row_counts())["signatures"] == 0
    await store.put_signature(ID1, PK1, "30aa", ALICE)  # the writer is still healthy
    assert await store.get_signatures(ID1) == {PK1: "30aa"}


async def test_close_commits_writes_already_queued(location, clock):
    store = await open_at(location, clock)
    writes = [asyncio.create_task(store.put_signature(f"{i:064x}", PK1, "30aa", ALICE))
              for i in range(20)]
    await asyncio.sleep(0)  # let them queue
    await store.close()
    await asyncio.gather(*writes)  # each was acknowledged, so each must be on disk
    store = await open_at(location, clock)
    try:
        assert (await store.row_counts())["signatures"] == 20
    finally:
        await store.close()


# --- PostgreSQL: several processes on one database ----------------------------------------

@pytest.fixture
def pg_dsn(postgres):
    return postgres.new_database()


async def test_postgresql_two_stores_one_truth(pg_dsn, clock):
    """Two stores (as two server processes would hold) on one database: a write acked
    by one is read by the other at once, and quotas, shares and bindings hold across
    both under concurrent writes."""
    quotas = Quotas(signatures_per_id=3, signatures_per_peer=50)
    a, b = await asyncio.gather(open_at(pg_dsn, clock, quotas), open_at(pg_dsn, clock, quotas))
    try:
        assert a.epoch == b.epoch
        await a.put_signature(ID1, PK1, "30aa", ALICE)
        assert await b.get_signatures(ID1) == {PK1: "30aa"}
        with pytest.raises(Taken):
            await b.put_signature(ID1, PK1, "30bb", BOB)
        pubkeys = [f"02{i:064x}" for i in range(12)]
        results = await asyncio.gather(
            *((a if i % 2 else b).put_signature(ID2, pk, "30aa", ALICE)
              for i, pk in enumerate(pubkeys)), return_exceptions=True)
        assert sum(r is None for r in results) == 3
        assert all(isinstance(r, QuotaExceeded) for r in results if r is not None)
        assert len(await a.get_signatures(ID2)) == 3
        # Sequence numbers interleave across both in commit order: every request
        # reachable, in storage order, whichever store wrote it.
        for i in range(10):
            await (a if i % 2 else b).put_spend_request(ID3, f"{i:064x}", f"t{i}", i, ALICE)
        assert [r.timestamp for r in await pending_requests(a)] == list(range(10))
        assert (await a.row_counts()) == (await b.row_counts())
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_postgresql_pool_hands_connections_back_clean_without_the_reset_query(
        pg_dsn, clock):
    # The pool skips asyncpg's reset query (a round trip per read); what it relies on
    # instead: a transaction left open is still rolled back, and the write lock, being
    # transaction-scoped, goes with it.
    store = await open_at(pg_dsn, clock)
    try:
        await store.put_signature(ID1, PK1, "30aa", ALICE)
        async with store._pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            held_by = await conn.fetchval("SELECT pg_backend_pid()")
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda loop, context: None)  # asyncpg's warning
        loop.set_exception_handler(None)
        other = await asyncpg.connect(pg_dsn)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", WRITE_LOCK)
        finally:
            await other.close()
        async with store._pool.acquire() as conn:
            if await conn.fetchval("SELECT pg_backend_pid()") == held_by:
                assert not conn.is_in_transaction()
        await store.put_signature(ID1, PK2, "30bb", ALICE)
        assert await store.get_signatures(ID1) == {PK1: "30aa", PK2: "30bb"}
    finally:
        await store.close()


async def test_postgresql_newer_schema_is_refused(pg_dsn, clock):
    from revault.storage import StorageError
    store = await open_at(pg_dsn, clock)
    await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE schema_version SET version = version + 1")
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="newer than this program"):
        await open_at(pg_dsn, clock)


async def test_postgresql_unreachable_server_is_a_clear_error(clock):
    from revault.storage import StorageError
    from tests.support.postgres import _free_port
    dsn = f"postgresql://revault:secret@127.0.0.1:{_free_port()}/nothing"
    with pytest.raises(StorageError) as e:
        await open_at(dsn, clock)
    assert "cannot connect" in str(e.value) and "secret" not in str(e.value)


async def test_postgresql_lost_connection_fails_that_group_only(pg_dsn, clock, postgres):
    store = await open_at(pg_dsn, clock)
    try:
        await store.put_signature(ID1, PK1, "30aa", ALICE)
        # The database drops every session of ours (a restart, a failover): the writes
        # of the transaction it cuts fail, unacknowledged; the next ones reconnect.
        postgres.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      f"WHERE datname = '{pg_dsn.rsplit('/', 1)[1]}' AND pid <> pg_backend_pid()")
        async def after_reconnecting(call):
            # Each pooled connection the database dropped fails once, then is replaced.
            # One still reading the server's farewell when it is taken (its loss not yet
            # seen by the pool) fails with asyncpg's InternalClientError.
            for _ in range(POOL_SIZE + 1):
                try:
                    return await call()
                except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError,
                        asyncpg.exceptions.InternalClientError):
                    continue
            return await call()

        await after_reconnecting(lambda: store.put_signature(ID1, PK2, "30bb", ALICE))
        assert await after_reconnecting(lambda: store.get_signatures(ID1)) == {
            PK1: "30aa", PK2: "30bb"}
    finally:
        await store.close()


async def test_the_same_write_sent_again_is_not_stored_anew(store, clock):
    await store.put_spend_request(ID1, TXA, "tx-a", 10, ALICE)
    await store.put_opinion(ID1, TXA, PK1, False, "no", "30aa", ALICE)
    cursor = Cursor(store.epoch)
    requests = fill_page(cursor, await store.spend_request_streams(cursor, 10),
                         lambda r: 1, 100)
    opinions = fill_page(cursor, await store.opinion_streams(ID1, cursor), lambda o: 1, 100)
    clock.now += 5
    await store.put_spend_request(ID1, TXA, "tx-a", 10, ALICE)
    await store.put_opinion(ID1, TXA, PK1, False, "no", "30aa", ALICE)
    assert await store.spend_request_streams(requests.cursor, 10) == []
    assert await store.opinion_streams(ID1, opinions.cursor) == []
    # ... but its age is refreshed, and anything different is new.
    await store.put_spend_request(ID1, TXA, "tx-a", 11, ALICE)
    await store.put_opinion(ID1, TXA, PK1, True, "", "30bb", ALICE)
    assert len(await store.spend_request_streams(requests.cursor, 10)) == 1
    assert len(await store.opinion_streams(ID1, opinions.cursor)) == 1
