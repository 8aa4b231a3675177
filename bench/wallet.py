"""Benchmark the wallet on regtest: secure + activate N vaults, spend a batch of 10.

A whole deployment as the end-to-end tests run it (regtest bitcoind, sync server, per
stakeholder a `revault-watchtower`, per manager a `revault-cosigner`, 3 stakeholders,
2 managers), then, each phase timed by wall clock:

  1. secure and activate 1, 10 and 100 vaults (--quick: 1 and 10): the three
     stakeholders' wallets run concurrently, vault after vault, as three scripts would;
  2. a manager spends 10 active vaults in one transaction, from the request to the
     spend broadcast (blocks mined as soon as the unvaults are in, so the csv wait is
     the chain's, not the benchmark's).

Beside each time: the share the wallets spent sleeping between polls (waiting for the
other participants, summed over the three wallets and divided by three), the daemon
calls made, and the phase's time per vault as a multiple of a sync-server `get_sigs`
round trip measured in the same run (the floor one exchange costs on this machine).

Bounded: every flow has a timeout; everything is stopped and removed at the end.
Usage: .venv/bin/python bench/wallet.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from revault.clients import SyncServerClient  # noqa: E402
from revault.wallet import Wallet  # noqa: E402
from tests.support.deployment_system import HOST, start_system  # noqa: E402
from tests.support.regtest import btc, start_node  # noqa: E402

DEPOSIT = 2_000_000
TIMEOUT = 600.0
ROUND_TRIPS = 200


async def round_trip(system) -> float:
    """Mean seconds of one get_sigs exchange with the sync server (one connection)."""
    p = system.stakeholders[0]
    async with await SyncServerClient.connect(HOST, system.sync.port, p.noise.private,
                                              system.sync_noise.public) as client:
        await client.get_sigs("00" * 32)
        start = time.perf_counter()
        for _ in range(ROUND_TRIPS):
            await client.get_sigs("00" * 32)
        return (time.perf_counter() - start) / ROUND_TRIPS


async def deposit_vaults(node, wallet: Wallet, n: int) -> list[str]:
    address = await wallet.deposit_address()
    outpoints = []
    for _ in range(n):
        txid = await node.rpc("sendtoaddress", address, btc(DEPOSIT), wallet=node.MINER_WALLET)
        tx = await node.rpc("getrawtransaction", txid, True)
        [vout] = [o["n"] for o in tx["vout"] if o["scriptPubKey"].get("address") == address]
        outpoints.append(f"{txid}:{vout}")
    node.mine(1)
    return outpoints


def reset(wallets) -> None:
    for w in wallets:
        w.stats.poll_wait_seconds = 0.0
        w.stats.daemon_calls = 0


def report(label: str, elapsed: float, n: int, wallets, rtt: float) -> None:
    waiting = sum(w.stats.poll_wait_seconds for w in wallets) / len(wallets)
    calls = sum(w.stats.daemon_calls for w in wallets)
    print(f"{label:<34} {elapsed:8.2f} s  {elapsed / n * 1000:8.1f} ms/vault  "
          f"poll wait {100 * waiting / elapsed:5.1f}%  {calls:6d} calls  "
          f"{elapsed / n / rtt:7.0f} round trips/vault", flush=True)


async def bench(args) -> int:
    counts = [1, 10] if args.quick else [1, 10, 100]
    root = Path(tempfile.mkdtemp(prefix="bench-wallet-"))
    node = start_node(root / "bitcoind")
    system = None
    try:
        system = await start_system(root / "deployment", node,
                                    policies=[{"accept_all": True}] * 3)
        stakeholders = [p.wallet() for p in system.stakeholders]
        manager = system.managers[0].wallet()
        for w in [*stakeholders, manager]:
            await w.start()
        rtt = await round_trip(system)
        print(f"baseline: sync-server get_sigs round trip {rtt * 1e3:.3f} ms "
              f"(mean of {ROUND_TRIPS}, same run)", flush=True)
        spendable = []
        try:
            for n in counts:
                outpoints = await deposit_vaults(node, stakeholders[0], n)
                reset(stakeholders)
                start = time.perf_counter()
                for o in outpoints:
                    await asyncio.gather(*(w.secure(o, timeout=TIMEOUT) for w in stakeholders))
                secured = time.perf_counter() - start
                report(f"secure {n} vault(s)", secured, n, stakeholders, rtt)
                reset(stakeholders)
                start = time.perf_counter()
                for o in outpoints:
                    await asyncio.gather(*(w.activate(o, timeout=TIMEOUT) for w in stakeholders))
                activated = time.perf_counter() - start
                report(f"activate {n} vault(s)", activated, n, stakeholders, rtt)
                spendable += outpoints
            batch = spendable[-10:]
            to = await node.rpc("getnewaddress", wallet=node.MINER_WALLET)
            reset([manager])
            start = time.perf_counter()
            task = asyncio.ensure_future(manager.spend(batch, {to: 10 * DEPOSIT // 2},
                                                       timeout=TIMEOUT))
            while not task.done():
                await asyncio.wait([task], timeout=0.05)
                stored = await manager.store.spend_of(batch)
                if not task.done() and stored is not None and stored.stage == "unvaulted":
                    node.mine(1)  # the unvaults are out: the csv runs in blocks
            txid = task.result()
            report(f"spend a batch of {len(batch)} vaults", time.perf_counter() - start,
                   len(batch), [manager], rtt)
            print(f"  spend {txid}, {manager.stats.daemon_calls} daemon calls")
        finally:
            for w in [*stakeholders, manager]:
                await w.close()
        return 0
    finally:
        if system is not None:
            system.stop_all()
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 vaults only")
    parser.add_argument("--log", action="store_true", help="the wallets' log on stderr")
    args = parser.parse_args()
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
