"""The SQLite sync store's in-memory rows (revault/sync_mirror.py) against the SQL plans
of revault/sync_rules.py: the same writes, then the same reads must give the same
streams and signatures, whatever the cursor, the fetch size, the clock, the purge, an
erasure or the budget."""

from __future__ import annotations

import asyncio
import random
import sqlite3

import pytest

from revault.paging import Cursor, fill_page, merge_streams
from revault.sync_rules import QuotaExceeded, Quotas, Retention, Taken
from revault.sync_store import SqliteSyncStore, run_plan

MANAGERS = [bytes([m]) * 32 for m in (0xA1, 0xA2, 0xA3)]
# Two managers whose keys share a stream name: paged as one stream (paging.py).
MANAGERS.append(b"\xa1" * 8 + b"\x00" * 24)
WATCHTOWERS = [bytes([w]) * 32 for w in (0xB1, 0xB2)]
VAULTS = [f"{v:02x}" * 32 for v in range(1, 5)]
STAKEHOLDERS = [bytes([s]) * 32 for s in (0xC1, 0xC2)]
TX_IDS = [f"{t:02x}" * 32 for t in range(0x20, 0x24)]
PUBKEYS = ["02" + f"{k:02x}" * 32 for k in (0x33, 0x31, 0x34, 0x30)]
TXIDS = [f"{t:02x}" * 32 for t in range(0x10, 0x16)]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000

    def __call__(self) -> float:
        return self.now


def merged(streams: list) -> list:
    """As the server pages them: one stream per name (two keys may share one), by name."""
    return sorted(merge_streams(streams), key=lambda s: s.name)


def sql_streams(store: SqliteSyncStore, cursor: Cursor, fetch: int) -> list:
    return merged(run_plan(store._reader, store._rules().spend_request_streams(cursor, fetch)))


def sql_opinions(store: SqliteSyncStore, vault_id: str, cursor: Cursor) -> list:
    return merged(run_plan(store._reader, store._rules().opinion_streams(vault_id, cursor)))


async def assert_same_reads(store: SqliteSyncStore, cursors: list[Cursor]) -> None:
    assert store._mirror.active and store._signatures.active
    for tx_id in TX_IDS:
        # In the same order too: it is the order of the get_sigs result's members.
        assert list((await store.get_signatures(tx_id)).items()) == list(run_plan(
            store._reader, store._rules().get_signatures(tx_id)).items())
    for cursor in cursors:
        for fetch in (1, 3, 50):
            mirrored = await store.spend_request_streams(cursor, fetch)
            assert merged(mirrored) == sql_streams(store, cursor, fetch)
        for vault_id in VAULTS:
            mirrored = await store.opinion_streams(vault_id, cursor)
            assert merged(mirrored) == sql_opinions(store, vault_id, cursor)


async def random_write(store: SqliteSyncStore, rng: random.Random) -> None:
    try:
        roll = rng.random()
        if roll < 0.3:
            stakeholder = rng.randrange(len(STAKEHOLDERS))
            await store.put_signature(rng.choice(TX_IDS), rng.choice(PUBKEYS),
                                      rng.choice(["3001", "3002", "3003"]),
                                      STAKEHOLDERS[stakeholder])
        elif roll < 0.35:
            await store.erase_signatures(rng.choice(TX_IDS))
        elif roll < 0.75:
            await store.put_spend_request(
                rng.choice(VAULTS), rng.choice(TXIDS), "tx" * rng.randrange(1, 4),
                rng.randrange(3), rng.choice(MANAGERS))
        else:
            tower = rng.randrange(len(WATCHTOWERS))
            await store.put_opinion(
                rng.choice(VAULTS), rng.choice(TXIDS), f"{tower:02x}" * 33,
                rng.random() < 0.5, rng.choice(["", "late", "fee\u0000"]), "30" * 35,
                WATCHTOWERS[tower])
    except (QuotaExceeded, Taken):
        pass


@pytest.mark.parametrize("seed", range(6))
async def test_mirror_reads_equal_the_sql_plans(tmp_path, seed):
    rng = random.Random(seed)
    clock = Clock()
    quotas = Quotas(spend_requests_per_vault=5, spend_requests_per_manager=9,
                    total_spend_requests=20, opinions_per_vault=6, total_opinions=18,
                    signatures_per_id=3, total_signatures=10)
    retention = Retention(signatures=60, spend_requests=50, spend_opinions=80)
    store = await SqliteSyncStore.open(tmp_path / "sync.sqlite3", retention, quotas, clock)
    try:
        cursors = [Cursor(store.epoch)]
        for step in range(250):
            await random_write(store, rng)
            roll = rng.random()
            if roll < 0.15:
                clock.now += rng.randrange(1, 40)
            elif roll < 0.2:
                await store.purge_expired()
            if step % 10 == 0:
                # Cursors as pollers hold them: from pages of several sizes.
                cursor = rng.choice(cursors)
                streams = merge_streams(
                    await store.spend_request_streams(cursor, rng.choice((1, 3, 50))))
                cursors.append(fill_page(cursor, streams, lambda r: len(r.transaction),
                                         rng.choice((5, 20, 1000))).cursor)
                cursors = cursors[-6:]
                await assert_same_reads(store, cursors + [Cursor(store.epoch)])
        await assert_same_reads(store, cursors)
    finally:
        await store.close()


async def test_mirror_is_loaded_on_open_as_the_file_holds_it(tmp_path):
    rng = random.Random(7)
    clock = Clock()
    path = tmp_path / "sync.sqlite3"
    store = await SqliteSyncStore.open(path, clock=clock)
    for _ in range(60):
        await random_write(store, rng)
    before = [await store.spend_request_streams(Cursor(store.epoch), 50)]
    await store.close()

    store = await SqliteSyncStore.open(path, clock=clock)
    try:
        assert [await store.spend_request_streams(Cursor(store.epoch), 50)] == before
        await assert_same_reads(store, [Cursor(store.epoch)])
    finally:
        await store.close()


async def test_mirror_past_its_budget_reads_sqlite_until_a_purge_makes_room(tmp_path):
    clock = Clock()
    store = await SqliteSyncStore.open(tmp_path / "sync.sqlite3", Retention(spend_requests=10),
                                       clock=clock, mirror_budget=4 * 1024)
    try:
        await store.put_spend_request(VAULTS[0], TXIDS[0], "aa" * 100, 1, MANAGERS[0])
        assert store._mirror.active
        clock.now += 5
        await store.put_spend_request(VAULTS[1], TXIDS[1], "bb" * 2000, 1, MANAGERS[0])
        assert not store._mirror.active
        # Still every row, now from SQLite.
        streams = await store.spend_request_streams(Cursor(store.epoch), 50)
        assert [r.vault_id for _, r in streams[0].items] == [VAULTS[0], VAULTS[1]]

        clock.now += 6      # the small request expires; the large one stays
        await store.purge_expired()
        assert not store._mirror.active
        clock.now += 5      # the large one expires too
        await store.purge_expired()
        assert store._mirror.active
        await store.put_spend_request(VAULTS[2], TXIDS[2], "cc", 1, MANAGERS[1])
        await assert_same_reads(store, [Cursor(store.epoch)])
        streams = await store.spend_request_streams(Cursor(store.epoch), 50)
        assert [r.vault_id for s in streams for _, r in s.items] == [VAULTS[2]]
    finally:
        await store.close()


async def test_mirror_ignores_a_batch_whose_commit_failed(tmp_path, monkeypatch):
    store = await SqliteSyncStore.open(tmp_path / "sync.sqlite3", clock=Clock())
    try:
        await store.put_spend_request(VAULTS[0], TXIDS[0], "aa", 1, MANAGERS[0])

        def failing_commit(conn):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store._writer, "_commit", failing_commit)
        with pytest.raises(sqlite3.OperationalError):
            await store.put_spend_request(VAULTS[1], TXIDS[1], "bb", 1, MANAGERS[0])
        monkeypatch.undo()
        streams = await store.spend_request_streams(Cursor(store.epoch), 50)
        assert [r.vault_id for s in streams for _, r in s.items] == [VAULTS[0]]
        await assert_same_reads(store, [Cursor(store.epoch)])
    finally:
        await store.close()


async def test_writes_committed_while_the_mirror_loads_are_not_missed(tmp_path):
    """A load reads a few rows per turn of the loop; the writes of those turns (new rows,
    replaced rows, refreshed rows, in chunks read already or not yet) all end up in it."""
    rng = random.Random(11)
    clock = Clock()
    store = await SqliteSyncStore.open(tmp_path / "sync.sqlite3", clock=clock)
    try:
        for _ in range(80):
            await random_write(store, rng)
        loading = asyncio.get_running_loop().create_task(store._mirror.load(store._reader,
                                                                            chunk=2))
        await asyncio.sleep(0)
        assert not store._mirror.active           # reads go to SQLite meanwhile
        writes = 0
        while not loading.done():
            clock.now += rng.randrange(2)
            await random_write(store, rng)
            writes += 1
        assert loading.result() is True
        assert writes > 5
        await assert_same_reads(store, [Cursor(store.epoch)])
        # And it goes on following writes once loaded.
        for _ in range(20):
            await random_write(store, rng)
        await assert_same_reads(store, [Cursor(store.epoch)])
    finally:
        await store.close()
