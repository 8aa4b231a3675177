"""Benchmark one sync-store read on PostgreSQL at rest, against one bare round trip.

    .venv/bin/python bench/postgresql_reads.py            # 2,000 reads of each kind
    .venv/bin/python bench/postgresql_reads.py --quick    # 200

A throwaway PostgreSQL server (tests/support/postgres.py, Debian's package) on
loopback. Measured one after the other, in turns of 100 so that both see the same
machine: `PostgresSyncStore.get_signatures` (a pooled connection taken, one query, the
connection handed back), and `SELECT 1` on a connection of its own (the least any read
can cost). Prints each p50/p90 and the ratio of the store's to the round trip's: a read
that costs one round trip is near 1x, each extra round trip adds about 1x.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import asyncpg  # noqa: E402

from revault.sync_store_postgresql import PostgresSyncStore  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

TURN = 100
TX_ID = "aa" * 32


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


async def timed(call, times: list[float]) -> None:
    for _ in range(TURN):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)


async def measure(dsn: str, reads: int) -> tuple[list[float], list[float]]:
    store = await PostgresSyncStore.open(dsn)
    bare = await asyncpg.connect(dsn)
    try:
        await store.put_signature(TX_ID, "02" + "11" * 32, "30aa", b"\x01" * 32)
        store_times: list[float] = []
        bare_times: list[float] = []
        await timed(lambda: store.get_signatures(TX_ID), [])   # warm-up: pool, statements
        await timed(lambda: bare.fetchval("SELECT 1"), [])
        for _ in range(max(1, reads // TURN)):
            await timed(lambda: store.get_signatures(TX_ID), store_times)
            await timed(lambda: bare.fetchval("SELECT 1"), bare_times)
        return sorted(store_times), sorted(bare_times)
    finally:
        await bare.close()
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 reads of each kind")
    args = parser.parse_args()
    reads = 200 if args.quick else 2000
    server = PostgresServer.start()
    try:
        store_times, bare_times = asyncio.run(
            asyncio.wait_for(measure(server.new_database(), reads), 120))
    finally:
        server.stop()
    us = 1e6
    print(f"PostgreSQL on loopback, {len(store_times)} reads of each kind, in turns of {TURN}")
    print(f"  bare round trip (SELECT 1):  p50 {percentile(bare_times, .5) * us:6.0f} us   "
          f"p90 {percentile(bare_times, .9) * us:6.0f} us")
    print(f"  store read (get_signatures): p50 {percentile(store_times, .5) * us:6.0f} us   "
          f"p90 {percentile(store_times, .9) * us:6.0f} us")
    print(f"  ratio (store / round trip):  p50 "
          f"{percentile(store_times, .5) / percentile(bare_times, .5):.2f}x   p90 "
          f"{percentile(store_times, .9) / percentile(bare_times, .9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
