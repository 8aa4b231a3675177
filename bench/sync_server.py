"""Benchmark revault-sync-server against the transport's ceiling, on loopback only.

    .venv/bin/python bench/sync_server.py            # full run, well under two minutes
    .venv/bin/python bench/sync_server.py --quick    # smoke run, a few seconds

Both servers are real daemon subprocesses started the same way (run_daemon, Noise KK on
127.0.0.1, READY=1 over NOTIFY_SOCKET): the sync server with its SQLite store, and
tests/support/echo_daemon.py, whose one method returns its params, as the ceiling. The
same client process drives both with the same number of connections, each sending one
request at a time; so the ceiling is what the transport, the JSON-RPC layer and this
client can do, and the ratio shows what the sync server's handlers and storage cost.

Measured: requests per second and p50/p99 latency of a mixed workload (sig with an id,
so every one waits for a durable commit; get_sigs; request_spend; get_spend_requests;
spend_opinion; get_spend_opinions), and each daemon's resident memory (VmRSS) holding
1000 idle connections. Every phase has a deadline; the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import resource
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import coincurve  # noqa: E402
from bitcoin.core import (  # noqa: E402
    CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript, b2lx,
)

from revault.messages import sign_opinion  # noqa: E402
from revault.rpc import RpcClient  # noqa: E402
from tests.support.daemons import DaemonProcess, NoiseIdentity, write_config  # noqa: E402

HOST = "127.0.0.1"
IDLE_CONNECTIONS = 1000
IDENTITIES = 8  # client keys, every one in all three peer lists
PHASE_DEADLINE = 120.0


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def spend_tx(seed: str) -> tuple[str, str]:
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(hashlib.sha256(seed.encode()).digest(), 0))],
        [CMutableTxOut(50_000, CScript([0, hashlib.sha256(seed.encode()).digest()]))],
        nVersion=2)
    return base64.b64encode(tx.serialize()).decode(), b2lx(tx.GetTxid())


class Workload:
    """The six sync-server calls, cycled per client; rows are replaced, not piled up,
    so the run measures steady state rather than quota refusals."""

    METHODS = ("sig", "get_sigs", "request_spend", "get_spend_requests", "spend_opinion",
               "get_spend_opinions")

    def __init__(self, client: int):
        key = coincurve.PrivateKey(hashlib.sha256(f"bench-{client}".encode()).digest())
        self.pubkey = key.public_key.format().hex()
        self.vault = h(f"vault-{client}")
        self.tx, txid = spend_tx(f"spend-{client}")
        self.opinion = sign_opinion(hashlib.sha256(f"tower-{client}".encode()).digest(),
                                    self.vault, True, "", txid).to_json()
        self.sigs = [key.sign(hashlib.sha256(f"{client}-{k}".encode()).digest(),
                              hasher=None).hex() for k in range(8)]
        self.client = client

    def request(self, n: int) -> tuple[str, dict]:
        method = self.METHODS[n % len(self.METHODS)]
        tx_id = h(f"tx-{self.client}-{(n // len(self.METHODS)) % 8}")
        params = {
            "sig": lambda: {"pubkey": self.pubkey, "signature": self.sigs[n % 8], "id": tx_id},
            "get_sigs": lambda: {"id": tx_id},
            "request_spend": lambda: {"transaction": self.tx, "timestamp": n,
                                      "vault_id": self.vault},
            "get_spend_requests": lambda: {},
            "spend_opinion": lambda: self.opinion,
            "get_spend_opinions": lambda: {"vault_id": self.vault},
        }[method]()
        return method, params


def echo_request(workload: Workload, n: int) -> tuple[str, dict]:
    # Echo the same params the sync server gets, so frames are the same sizes going in.
    _, params = workload.request(n)
    return "echo", params


async def connect_many(port: int, identities: list[NoiseIdentity], server: NoiseIdentity,
                       count: int) -> list[RpcClient]:
    slots = asyncio.Semaphore(64)  # stay within the listen backlog

    async def one(i: int) -> RpcClient:
        async with slots:
            return await RpcClient.connect(HOST, port, identities[i % len(identities)].private,
                                           server.public, timeout=30)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def close_all(clients: list[RpcClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def load(port: int, identities, server, clients: int, seconds: float,
               make_request) -> dict:
    conns = await connect_many(port, identities, server, clients)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    warmup = min(1.0, seconds / 4)
    start = asyncio.Event()
    loop = asyncio.get_running_loop()
    measure_from = measure_until = 0.0

    async def run(i: int, rpc: RpcClient) -> None:
        workload = Workload(i)
        n = i  # clients start at different points of the mix
        await start.wait()
        while True:
            method, params = make_request(workload, n)
            t0 = loop.time()
            if t0 >= measure_until:
                return
            try:
                await rpc.call(method, params, timeout=30)
                ok = True
            except Exception as e:  # counted and reported: the bench must finish
                errors[f"{method}: {type(e).__name__} {e}"[:120]] += 1
                ok = False
            t1 = loop.time()
            if ok and t0 >= measure_from and t1 <= measure_until:
                latencies[method].append(t1 - t0)
            n += 1

    tasks = [asyncio.create_task(run(i, c)) for i, c in enumerate(conns)]
    measure_from = loop.time() + warmup
    measure_until = measure_from + seconds
    start.set()
    await asyncio.gather(*tasks)
    await close_all(conns)
    every = sorted(x for xs in latencies.values() for x in xs)
    return {
        "rps": len(every) / seconds,
        "p50": percentile(every, 50),
        "p99": percentile(every, 99),
        "count": len(every),
        "by_method": {m: (len(v) / seconds, percentile(sorted(v), 50), percentile(sorted(v), 99))
                      for m, v in sorted(latencies.items())},
        "errors": dict(errors),
    }


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def idle_rss(daemon: DaemonProcess, identities, server, count: int) -> tuple[int, int]:
    """(RSS before, RSS while holding `count` idle connections) of the daemon, in KiB."""
    before = rss_kib(daemon.proc.pid)
    conns = await connect_many(daemon.port, identities, server, count)
    try:
        # One round trip on each: every connection has gone through the handler once,
        # as a real idle peer between two polls has.
        await asyncio.gather(*(c.call("get_sigs" if daemon.name == "sync-server" else "echo",
                                      {"id": h("idle")}, timeout=60) for c in conns))
        return before, rss_kib(daemon.proc.pid)
    finally:
        await close_all(conns)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            sys.exit(f"file-descriptor hard limit {hard} is below {needed}")


async def start_daemons(tmp: Path) -> tuple[DaemonProcess, DaemonProcess, NoiseIdentity,
                                            list[NoiseIdentity]]:
    server = NoiseIdentity.create(tmp / "server.key")
    identities = [NoiseIdentity.create(tmp / f"client{i}.key") for i in range(IDENTITIES)]
    keys = [i.public.hex() for i in identities]
    common = {"listen": f"{HOST}:0", "noise_key_file": "server.key", "log_level": "warning",
              # 8 keys hold up to 1,200 connections: lift the per-key share of slots.
              "max_connections_per_peer": 1024}
    sync = DaemonProcess("sync-server", write_config(tmp / "sync.toml", {
        **common, "data_dir": "sync-data",
        # The per-key request rate is a policy, not a cost: off the measurement.
        "requests_per_second": 1_000_000,
        "peers": {"stakeholders": keys, "managers": keys, "watchtowers": keys},
    }), tmp)
    echo = DaemonProcess("echo", write_config(tmp / "echo.toml", {
        **common, "data_dir": "echo-data", "clients": keys,
    }), tmp, module="tests.support.echo_daemon")
    await sync.start()
    await echo.start()
    return sync, echo, server, identities


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def main_async(args) -> int:
    raise_fd_limit(IDLE_CONNECTIONS + args.clients + 512)
    with tempfile.TemporaryDirectory(prefix="revault-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sync = echo = None
        try:
            async with asyncio.timeout(PHASE_DEADLINE * 4):
                sync, echo, server, ids = await start_daemons(tmp)
                print(f"loopback, {args.clients} concurrent clients, one request in flight "
                      f"per connection, {args.seconds:g} s measured after warm-up; both "
                      f"servers are daemon subprocesses; the client is one asyncio process")
                ceiling = await load(echo.port, ids, server, args.clients, args.seconds,
                                     echo_request)
                mixed = await load(sync.port, ids, server, args.clients, args.seconds,
                                   lambda w, n: w.request(n))
                echo_rss = await idle_rss(echo, ids, server, args.idle)
                sync_rss = await idle_rss(sync, ids, server, args.idle)
            report(args, ceiling, mixed, echo_rss, sync_rss)
            failed = bool(mixed["errors"] or ceiling["errors"])
            for name, daemon in (("sync server", sync), ("echo", echo)):
                status = await daemon.stop()
                if status != 0:
                    print(f"{name} exited with {status}:\n{daemon.stderr()}")
                    failed = True
            return 1 if failed else 0
        finally:
            for daemon in (sync, echo):
                if daemon is not None:
                    daemon.ensure_dead()


def report(args, ceiling: dict, mixed: dict, echo_rss, sync_rss) -> None:
    print()
    print(f"echo ceiling:        {ceiling['rps']:8.0f} req/s   p50 {ms(ceiling['p50'])}   "
          f"p99 {ms(ceiling['p99'])}   ({ceiling['count']} requests)")
    print(f"sync server, mixed:  {mixed['rps']:8.0f} req/s   p50 {ms(mixed['p50'])}   "
          f"p99 {ms(mixed['p99'])}   ({mixed['count']} requests)")
    print(f"  ratio to ceiling:  throughput {mixed['rps'] / ceiling['rps']:.2f}x   "
          f"p50 {mixed['p50'] / ceiling['p50']:.2f}x   p99 {mixed['p99'] / ceiling['p99']:.2f}x")
    print("  per method:          req/s        p50          p99")
    for method, (rps, p50, p99) in mixed["by_method"].items():
        print(f"    {method:20s} {rps:7.0f}   {ms(p50):>10s}   {ms(p99):>10s}")
    mib = 1024
    print(f"RSS with {args.idle} idle connections:")
    print(f"  echo ceiling:      {echo_rss[1] / mib:7.1f} MiB (at rest {echo_rss[0] / mib:.1f} MiB,"
          f" {(echo_rss[1] - echo_rss[0]) / args.idle:.1f} KiB per connection)")
    print(f"  sync server:       {sync_rss[1] / mib:7.1f} MiB (at rest {sync_rss[0] / mib:.1f} MiB,"
          f" {(sync_rss[1] - sync_rss[0]) / args.idle:.1f} KiB per connection)")
    print(f"  ratio to ceiling:  {sync_rss[1] / echo_rss[1]:.2f}x")
    for name, result in (("echo", ceiling), ("sync server", mixed)):
        for error, count in result["errors"].items():
            print(f"ERROR {name}: {count} x {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small and short")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--idle", type=int, default=None)
    args = parser.parse_args()
    args.clients = args.clients or (20 if args.quick else 200)
    args.seconds = args.seconds or (1.5 if args.quick else 10.0)
    args.idle = args.idle or (100 if args.quick else IDLE_CONNECTIONS)
    if not (1 <= args.idle <= IDLE_CONNECTIONS) or args.clients < 1 or args.seconds <= 0:
        parser.error("need clients >= 1, seconds > 0, 1 <= idle <= 1000 (max_connections)")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
