"""Benchmark `revault-watchtower`: reaction time, block processing, memory.

1. Reaction: from an unvault entering bitcoind's mempool to the watchtower's cancel
   entering it, over 20 vaults, with the watchtower on ZMQ and on polling (the default
   poll_interval, 1 s). Both are timed by this script's own ZMQ subscription to the
   node (`rawtx`), so the clock is the node's publication of each transaction. The
   baseline, measured in the same run on 20 other vaults: this script itself reacting
   to the unvault's ZMQ message by broadcasting a pre-signed cancel (no checks, no
   bump, no storage): what an ideal watchtower on this machine and node could do.
2. Blocks: the CPU time to process a block of 2,000 transactions (parse + match every
   input) with 1k, 10k and 100k vaults guarded, against parsing alone; the ratio
   100k/1k shows that matching does not grow with the number of vaults.
3. Memory: the RSS of a process that loaded 100k vaults from a watchtower database
   (three revocations each), against the same process before loading them.

Real bitcoind, sync server and watchtower processes for 1, all on 127.0.0.1; 2 and 3
in-process. Bounded: every wait has a deadline.
Usage: .venv/bin/python bench/watchtower.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bitcoin.core import (  # noqa: E402
    COutPoint, CBlock, CMutableTransaction, CTxIn, CTxOut, b2lx, lx,
)
from bitcoin.core.script import CScript  # noqa: E402

from revault.watchtower_chain import see_block  # noqa: E402
from revault.watchtower_guard import Guard, GuardedVault  # noqa: E402

REACTION_TIMEOUT = 30.0


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- 2. blocks ---------------------------------------------------------------------------

def synthetic_vault(n: int) -> GuardedVault:
    h = hashlib.sha256(n.to_bytes(8, "big")).hexdigest()
    out = ((990_000, b"\x00\x20" + bytes.fromhex(h)),)
    return GuardedVault(deposit=(h, 0), value=1_000_000, index=0, vault_id=h,
                        unvault_txid=hashlib.sha256(bytes.fromhex(h)).hexdigest(),
                        revocations={"cancel": out})


def synthetic_block(n_txs: int, vaults: list[GuardedVault]) -> bytes:
    """A block of `n_txs` 2-in 2-out P2WPKH-like transactions, 10 of them unvaults of
    guarded vaults (so the block also costs the guard some real work)."""
    txs = [CMutableTransaction([CTxIn(COutPoint(b"\0" * 32, 0xFFFFFFFF), CScript(b"\x01\x01"))],
                               [CTxOut(50 * 10**8, CScript(b"\x51"))])]
    for i in range(n_txs - 1):
        seed = hashlib.sha256(b"tx %d" % i).digest()
        vin = [CTxIn(COutPoint(hashlib.sha256(seed + b"a").digest(), 1)),
               CTxIn(COutPoint(hashlib.sha256(seed + b"b").digest(), 0))]
        if i % (n_txs // 10) == 0 and vaults:
            vault = vaults[(i * 7919) % len(vaults)]
            vin[0] = CTxIn(COutPoint(lx(vault.deposit[0]), vault.deposit[1]))
        vout = [CTxOut(100_000 + i, CScript(b"\x00\x14" + seed[:20])),
                CTxOut(200_000, CScript(b"\x00\x14" + seed[12:]))]
        txs.append(CMutableTransaction(vin, vout))
    block = CBlock(nVersion=4, vtx=txs)
    return block.serialize()


def bench_blocks(quick: bool) -> None:
    print("\n== block of 2,000 transactions: parse + match ==")
    sizes = (1_000, 10_000, 100_000)
    rounds = 5 if quick else 15
    setups = {}
    for size in sizes:
        guard = Guard()
        vaults = [guard.add(synthetic_vault(n)) for n in range(size)]
        setups[size] = (guard, synthetic_block(2_000, vaults))
    times: dict[int | str, list[float]] = {size: [] for size in sizes}
    times["parse"] = []
    # CPU time of this process (the machine is shared: wall time would measure the
    # neighbours), interleaved rounds, best of each.
    for r in range(rounds):
        start = time.process_time()
        CBlock.deserialize(setups[sizes[0]][1])
        times["parse"].append(time.process_time() - start)
        for size, (guard, raw) in setups.items():
            for v in guard.busy.copy():  # each round starts from a quiet guard
                v.deposit_spender = v.unvault_spender = None
            guard.busy.clear()
            start = time.process_time()
            count, touched = see_block(guard, raw, 100 + r)
            times[size].append(time.process_time() - start)
            assert count == 2_000 and len(touched) == 10, (count, len(touched))
    best = {k: min(v) for k, v in times.items()}
    print(f"baseline: parse only (python-bitcoinlib)   {best['parse'] * 1000:8.1f} ms  "
          f"(best of {rounds})")
    for size in sizes:
        print(f"{size:>7,} vaults guarded: parse + match  {best[size] * 1000:8.1f} ms  "
              f"({best[size] / best['parse']:.2f}x parse)")
    print(f"ratio 100k/1k: {best[100_000] / best[1_000]:.2f}")


# --- 3. memory ----------------------------------------------------------------------------

def fill_database(path: Path, count: int) -> None:
    """`count` vaults with three revocations each, written as the daemon's schema
    holds them (bulk: the bench measures loading, not 300k fsyncs)."""
    from revault.watchtower_store import MIGRATIONS
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + f"; PRAGMA user_version={len(MIGRATIONS)};")
    tx = os.urandom(700)  # the size of a signed 2-of-2 revocation
    vaults, revocations = [], []
    for n in range(count):
        h = hashlib.sha256(n.to_bytes(8, "big")).hexdigest()
        vaults.append((h, 0, 1_000_000, 0, hashlib.sha256(h.encode()).hexdigest(), 0))
        for kind in ("cancel", "emergency", "unvault_emergency"):
            revocations.append((h, 0, kind, h, tx, 990_000, b"\x00\x20" + bytes(32), 980_000,
                                b"\x00\x20" + bytes(32)))
    db.executemany("INSERT INTO vaults (deposit_txid, deposit_vout, value, derivation_index, "
                   "unvault_txid, state, added_at) VALUES (?, ?, ?, ?, ?, 'guarded', ?)", vaults)
    db.executemany("INSERT INTO revocations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", revocations)
    db.commit()
    db.close()


def rss_child(path: str) -> None:
    """Run in a fresh process: RSS before and after loading the vaults like the daemon."""
    from revault.watchtower import guarded_vault
    from revault.watchtower_store import WatchtowerStore

    async def load() -> tuple[float, float, int, float]:
        before = rss_mib()
        start = time.perf_counter()
        store = await WatchtowerStore.open(Path(path))
        guard = Guard()
        for stored in store.iter_vaults():  # as Watchtower.load does
            guard.add(guarded_vault(stored))
        elapsed = time.perf_counter() - start
        await store.close()
        return before, rss_mib(), len(guard), elapsed

    before, after, count, elapsed = asyncio.run(load())
    print(f"{before:.1f} {after:.1f} {count} {elapsed:.2f}")


def bench_memory(workdir: Path, quick: bool) -> None:
    count = 100_000
    print(f"\n== memory with {count:,} vaults ==")
    path = workdir / "rss.sqlite3"
    fill_database(path, count)
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(path)],
                         capture_output=True, text=True, timeout=600, check=True).stdout.split()
    before, after, loaded, elapsed = float(out[0]), float(out[1]), int(out[2]), float(out[3])
    print(f"baseline: process with the watchtower's modules  {before:7.1f} MiB")
    print(f"after loading {loaded:,} vaults in {elapsed:.1f} s       {after:7.1f} MiB "
          f"(+{after - before:.1f} MiB, {(after - before) * 1024 * 1024 / loaded:.0f} B/vault)")


# --- 1. reaction -----------------------------------------------------------------------------

async def bench_reaction(workdir: Path, quick: bool) -> None:
    import zmq
    import zmq.asyncio

    from tests.support.regtest import start_node
    from tests.support.watchtower import Deployed, Network, zmq_conf

    n = 5 if quick else 20
    print(f"\n== reaction: unvault in the mempool -> cancel in the mempool ({n} vaults) ==")
    conf, keys = zmq_conf()
    node = start_node(workdir / "node", conf)
    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"rawtx")
    sub.connect(keys["zmq_rawtx"])
    arrivals: dict[str, float] = {}
    spends_of: dict[tuple[str, int], str] = {}

    async def listen() -> None:
        from bitcoin.core import CTransaction
        while True:
            topic, body, _ = await sub.recv_multipart()
            now = time.perf_counter()
            tx = CTransaction.deserialize(body)
            txid = b2lx(tx.GetTxid())
            arrivals.setdefault(txid, now)
            for txin in tx.vin:
                spends_of.setdefault((b2lx(txin.prevout.hash), txin.prevout.n), txid)

    listener = asyncio.get_running_loop().create_task(listen())

    async def arrival(txid: str) -> float:
        deadline = time.monotonic() + REACTION_TIMEOUT
        while txid not in arrivals:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{txid} never published")
            await asyncio.sleep(0.0005)
        return arrivals[txid]

    async def spender(outpoint: tuple[str, int]) -> str:
        deadline = time.monotonic() + REACTION_TIMEOUT
        while outpoint not in spends_of:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing spent {outpoint}")
            await asyncio.sleep(0.0005)
        return spends_of[outpoint]

    def report(name: str, latencies: list[float], base: float | None) -> float:
        median, worst = statistics.median(latencies), max(latencies)
        ratio = f"  ({median / base:.1f}x baseline median)" if base else ""
        print(f"{name:<44} median {median * 1000:8.1f} ms  worst {worst * 1000:8.1f} ms{ratio}")
        return median

    try:
        results = {}
        for mode in ("baseline", "zmq", "poll"):
            tmp = workdir / mode
            tmp.mkdir()
            net = Network(tmp, node, Deployed.create(f"bench {mode}"),
                          zmq=keys if mode == "zmq" else None)
            if mode == "baseline":
                node.cli("createwallet", net.reserve_wallet)
                await net.fund_reserve([10**6])
            else:
                await net.start()
            try:
                vaults = [await net.deposit(confirm=False) for _ in range(n)]
                node.mine(1)
                if mode != "baseline":
                    for vault in vaults:
                        await net.secure(vault)
                    # Let the watchtower's chain loop reach the tip before timing.
                    await asyncio.sleep(2)
                latencies = []
                for vault in vaults:
                    if mode == "baseline":
                        cancel = vault.txs.cancel
                        sigs = net.deployed.signatures(cancel)
                        for key, sig in sigs.items():
                            cancel.add_signature(0, bytes.fromhex(key), bytes.fromhex(sig))
                        signed = cancel.finalize().to_hex()
                    unvault_txid = await net.unvault(vault)
                    t0 = await arrival(unvault_txid)
                    if mode == "baseline":
                        await node.rpc("sendrawtransaction", signed)
                    cancel_txid = await spender((unvault_txid, 0))
                    latencies.append(await arrival(cancel_txid) - t0)
                results[mode] = latencies
            finally:
                net.stop()
        base = report("baseline: this script rebroadcasts (ZMQ)", results["baseline"], None)
        report("watchtower on ZMQ", results["zmq"], base)
        report("watchtower polling (poll_interval 0.2 s)", results["poll"], base)
    finally:
        listener.cancel()
        sub.close(linger=0)
        context.term()
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rss-child")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="revault-bench-watchtower-"))
    try:
        asyncio.run(bench_reaction(workdir, args.quick))
        bench_blocks(args.quick)
        bench_memory(workdir, args.quick)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
