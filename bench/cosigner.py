"""Benchmark `revault-cosigner`: durable signatures per second, against its signing ceiling.

Starts the real daemon as a subprocess on loopback, with its data_dir on disk (not a
tmpfs: every answer waits for an fsync'd commit, which is the point), and measures:

  1. one manager, one connection, requests back to back;
  2. 50 managers, 50 connections, requests concurrently;

each request a new outpoint, so each one is a fresh signature committed durably before
the answer. Then the ceiling of the same run's machine: BIP 143 sighash + coincurve
signing in-process (no PSBT parsing, no storage, no network), and also the full
in-process `prepare` (PSBT parsing and checks) + sign. Prints each rate and the ratio
of the daemon's to the ceiling's.

Bounded: a fixed number of requests per phase, each phase also stops at a time limit.
Usage: .venv/bin/python bench/cosigner.py [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from revault.cosigner_signing import CosignerKey, bip143_digest, parse_psbt  # noqa: E402
from revault.rpc import RpcClient  # noqa: E402
from tests.support.cosigner_psbt import assert_valid_signature, make_spend  # noqa: E402
from tests.support.cosigner_daemon import setup_cosigner  # noqa: E402
from tests.support.daemons import DaemonProcess, NoiseIdentity  # noqa: E402

PHASE_TIME_LIMIT = 60.0  # seconds; a phase stops early rather than run away


async def run_daemon_phase(daemon: DaemonProcess, cosigner_noise: NoiseIdentity,
                           managers: list[NoiseIdentity], psbts: list[str]) -> tuple[float, list]:
    """(signatures per second, [(psbt, signature)]) with one connection per manager."""
    clients = await asyncio.gather(*(
        RpcClient.connect("127.0.0.1", daemon.port, m.private, cosigner_noise.public)
        for m in managers))
    shares = [psbts[i::len(clients)] for i in range(len(clients))]
    results: list[tuple[str, str]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PHASE_TIME_LIMIT

    async def worker(client: RpcClient, share: list[str]) -> None:
        for psbt in share:
            if loop.time() > deadline:
                return
            result = await client.call("sign", {"tx": psbt, "index": 0})
            results.append((psbt, result["signature"]))

    start = time.perf_counter()
    await asyncio.gather(*(worker(c, s) for c, s in zip(clients, shares)))
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(c.close() for c in clients))
    return len(results) / elapsed, results


def ceiling(key: CosignerKey, spends: list, count: int) -> tuple[float, float]:
    """(sighash+sign per second, prepare+sign per second), in-process, one core."""
    parsed = []
    for spend in spends[:count]:
        psbt = parse_psbt(spend.psbt())
        scope = psbt.inputs[0]
        parsed.append((psbt.unsigned_tx, scope.witness_script.data, scope.witness_utxo.value))
    start = time.perf_counter()
    for tx, script, amount in parsed:
        key.sign(bip143_digest(tx, 0, script, amount))
    sighash_rate = len(parsed) / (time.perf_counter() - start)
    psbts = [s.psbt() for s in spends[:count]]
    start = time.perf_counter()
    for psbt in psbts:
        key.sign(key.prepare(psbt, 0).digest)
    prepare_rate = len(psbts) / (time.perf_counter() - start)
    return sighash_rate, prepare_rate


async def main_async(args) -> int:
    n_single = 100 if args.quick else 1000
    n_multi = 500 if args.quick else 5000
    base = Path(args.dir) if args.dir else REPO_ROOT / "build"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-cosigner-", dir=base))
    daemon = None
    try:
        cosigner = setup_cosigner(
            work, n_managers=50, requests_per_second=1_000_000,
            log_level="info")  # the production default: one line per outpoint signed
        cosigner_noise, managers = cosigner.noise, cosigner.managers
        key = CosignerKey(cosigner.bitcoin_secret)
        print(f"building {n_single + n_multi} spend PSBTs (one new outpoint each)...",
              flush=True)
        spends = [make_spend(key.public_key) for _ in range(n_single + n_multi)]
        psbts = [s.psbt() for s in spends]

        daemon = cosigner.daemon
        await daemon.start()
        print(f"cosigner pid {daemon.proc.pid} on 127.0.0.1:{daemon.port}, data_dir {work}/data")

        single_rate, single = await run_daemon_phase(daemon, cosigner_noise, managers[:1],
                                                     psbts[:n_single])
        multi_rate, multi = await run_daemon_phase(daemon, cosigner_noise, managers,
                                                   psbts[n_single:])
        assert await daemon.stop() == 0

        # Every answer was a durable, valid signature for its own outpoint.
        by_psbt = {p: s for p, s in zip(psbts, spends)}
        for psbt, sig in single[:20] + multi[:20]:
            assert_valid_signature(bytes.fromhex(sig), by_psbt[psbt].digest(0), key.public_key)
        rows = len(cosigner.rows())
        assert rows == len(single) + len(multi), (rows, len(single), len(multi))

        sighash_rate, prepare_rate = ceiling(key, spends, min(len(spends), 2000))
        print()
        print(f"daemon, 1 manager:    {single_rate:8.0f} durable signatures/s "
              f"({len(single)} requests)")
        print(f"daemon, 50 managers:  {multi_rate:8.0f} durable signatures/s "
              f"({len(multi)} requests)")
        print(f"ceiling, sighash+sign in-process:        {sighash_rate:8.0f} signatures/s")
        print(f"in-process PSBT parse+checks+sighash+sign: {prepare_rate:8.0f} signatures/s")
        print(f"ratio daemon/ceiling: 1 manager {single_rate / sighash_rate:.3f}, "
              f"50 managers {multi_rate / sighash_rate:.3f}")
        return 0
    finally:
        if daemon is not None:
            daemon.ensure_dead()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--dir", help="where to put the data_dir (default: build/ in the repo; "
                                      "use a real disk, not a tmpfs)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
