"""Benchmark revault-sync-server against the transport's ceiling, on loopback only.

    .venv/bin/python bench/sync_server.py            # full run, well under two minutes
    .venv/bin/python bench/sync_server.py --quick    # smoke run, a few seconds

The servers are real daemon subprocesses started the same way (run_daemon, Noise KK on
127.0.0.1, READY=1 over NOTIFY_SOCKET): the sync server with its SQLite store, and
tests/support/echo_daemon.py, whose one method returns its params, as the ceiling. The
same client process drives each with the same number of connections, each sending one
request at a time; so the ceiling is what the transport, the JSON-RPC layer and this
client can do, and the ratio shows what the sync server's handlers and storage cost.

Measured: requests per second and p50/p99 latency of a mixed workload (sig with an id,
so every one waits for a durable commit; get_sigs; request_spend; get_spend_requests,
each watchtower polling with the cursor of its previous poll; spend_opinion;
get_spend_opinions), the CPU per request of the server(s) and of this client process
(which can be what bounds the echo ceiling), and each daemon's resident memory (VmRSS)
holding 1000 idle connections. Then the same workload on a second SQLite server whose
watchtowers poll without cursors (every poll lists every pending request), and on
PostgreSQL (a throwaway server from tests/support/postgres.py) with one and with two
sync-server processes sharing the database, the clients spread over both.

The phases of a group take turns in windows of about a second (echo, then each
server), each holding its own connections throughout, so that a ratio compares
figures from the same stretch of time: measured one after the other, the echo ceiling
and the sync server could land in stretches at different machine speeds, and the
ratio moved from 0.26x to 0.47x between runs of the same code. Every phase has a
deadline; the run stops by itself.

Every daemon serves its Prometheus metrics (`metrics_listen`), so the instrumentation
is measured as deployed; `--scrape FILE` saves the sync server's metrics as scraped
halfway through the mixed load (SQLite; on PostgreSQL with one process, FILE.postgresql).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import sys
import tempfile
import time
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
from tests.support.system import FdLimitError, raise_fd_limit  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402
from tests.support.scrape import scrape  # noqa: E402

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
    so the run measures steady state rather than quota refusals. A client's
    request_spend re-sends its pending request (as a resuming wallet does), and every
    NEW_ATTEMPT_EVERY-th one is a new attempt (a new timestamp): what a watchtower's
    cursor brings back."""

    NEW_ATTEMPT_EVERY = 8

    METHODS = ("sig", "get_sigs", "request_spend", "get_spend_requests", "spend_opinion",
               "get_spend_opinions")

    def __init__(self, client: int, cursors: bool = True):
        self.cursors = cursors
        self.cursor: str | None = None  # of this watchtower's last poll
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
            "request_spend": lambda: {
                "transaction": self.tx, "vault_id": self.vault,
                "timestamp": n // (len(self.METHODS) * self.NEW_ATTEMPT_EVERY)},
            "get_spend_requests": lambda: (
                {"since": self.cursor} if self.cursors and self.cursor else {}),
            "spend_opinion": lambda: self.opinion,
            "get_spend_opinions": lambda: {"vault_id": self.vault},
        }[method]()
        return method, params

    def answered(self, method: str, result: dict) -> None:
        if method == "get_spend_requests":
            self.cursor = result.get("cursor")


def echo_request(workload: Workload, n: int) -> tuple[str, dict]:
    # Echo the same params the sync server gets, so frames are the same sizes going in.
    _, params = workload.request(n)
    return "echo", params


async def connect_many(port: int | list[int], identities: list[NoiseIdentity],
                       server: NoiseIdentity, count: int,
                       first_call: tuple[str, dict] | None = None) -> list[RpcClient]:
    """`count` connections, spread over the ports of several processes if given.

    With `first_call`, each connection makes that call before the next one opens: a
    server counts a connection as in its handshake until its first frame decrypts, and
    keeps few of those per address, so silent connections opened by the hundred would
    be refused."""
    ports = port if isinstance(port, list) else [port]
    slots = asyncio.Semaphore(64)  # stay within the listen backlog

    async def one(i: int) -> RpcClient:
        async with slots:
            rpc = await RpcClient.connect(HOST, ports[i % len(ports)],
                                          identities[i % len(identities)].private,
                                          server.public, timeout=30)
            if first_call is not None:
                await rpc.call(*first_call, timeout=60)
            return rpc

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def close_all(clients: list[RpcClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used (their /proc stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


# Each phase is measured in windows that take turns with the other phases of its group
# (the echo ceiling among them): on this machine one stretch of seconds can run at
# two thirds the speed of the next, and a ceiling measured before a phase moved its
# ratio by that much. A window's first SETTLE seconds are not counted (its clients
# start together after the other phases' turn); every request started in the rest is.
WINDOW_SETTLE = 0.2
WINDOW_MEASURED = 0.8


class Phase:
    """One server (or several processes sharing a database) under the workload, from
    its own `clients` connections, each sending one request at a time."""

    def __init__(self, name: str, ports: list[int], pids: list[int], make_request,
                 cursors: bool = True):
        self.name = name
        self.ports = ports
        self.pids = pids
        self.make_request = make_request
        self.cursors = cursors
        self.conns: list[RpcClient] = []
        self.workloads: list[Workload] = []
        self.next_n: list[int] = []
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.measured = 0.0            # seconds
        self.server_cpu = 0.0          # seconds, over the measured time
        self.client_cpu = 0.0
        self.midway = None

    async def open(self, identities, server, clients: int) -> None:
        self.conns = await connect_many(self.ports, identities, server, clients)
        self.workloads = [Workload(i, self.cursors) for i in range(clients)]
        self.next_n = list(range(clients))  # clients start at different points of the mix

    async def close(self) -> None:
        await close_all(self.conns)
        self.conns = []

    async def _drive(self, i: int, until: float, record_from: float | None) -> None:
        rpc, workload, loop = self.conns[i], self.workloads[i], asyncio.get_running_loop()
        n = self.next_n[i]
        while True:
            method, params = self.make_request(workload, n)
            t0 = loop.time()
            if t0 >= until:
                break
            try:
                workload.answered(method, await rpc.call(method, params, timeout=30))
                if record_from is not None and t0 >= record_from:
                    self.latencies[method].append(loop.time() - t0)
            except Exception as e:  # counted and reported: the bench must finish
                self.errors[f"{method}: {type(e).__name__} {e}"[:120]] += 1
            n += 1
        self.next_n[i] = n

    async def warm_up(self, seconds: float) -> None:
        """Unmeasured: until every client has gone through the six calls once (a
        watchtower's first poll, which lists everything, belongs to its start-up, not
        to the steady state), and at least `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PHASE_DEADLINE
        until = loop.time() + seconds
        while True:
            await asyncio.gather(*(self._drive(i, until, None) for i in range(len(self.conns))))
            if min(n - i for i, n in enumerate(self.next_n)) >= len(Workload.METHODS):
                return
            if loop.time() > deadline:
                raise RuntimeError(f"{self.name}: clients not warm after {PHASE_DEADLINE} s")
            until = loop.time() + 0.1

    async def window(self, measured: float, midway=None) -> None:
        """One turn: WINDOW_SETTLE seconds of load, then `measured` seconds counted. The
        servers' CPU and this client's are read at both ends of the counted part: on a
        busy machine wall rates move with the other load, CPU per request much less,
        and the echo ceiling can be bound by this client rather than its server."""
        loop = asyncio.get_running_loop()
        record_from = loop.time() + WINDOW_SETTLE
        until = record_from + measured
        samples = []

        def sample() -> None:
            samples.append((cpu_seconds(self.pids), time.process_time()))

        loop.call_at(record_from, sample)
        loop.call_at(until, sample)
        drivers = asyncio.gather(*(self._drive(i, until, record_from)
                                   for i in range(len(self.conns))))
        if midway is not None:
            await asyncio.sleep(WINDOW_SETTLE + measured / 2)
            self.midway = await midway()  # bounded: the load runs on meanwhile
        await drivers
        if len(samples) == 2:
            self.measured += measured
            self.server_cpu += samples[1][0] - samples[0][0]
            self.client_cpu += samples[1][1] - samples[0][1]

    def result(self) -> dict:
        every = sorted(x for xs in self.latencies.values() for x in xs)
        seconds = max(self.measured, 1e-9)

        def us_per_request(cpu: float) -> float:
            return cpu / max(1, len(every)) * 1e6

        return {
            "cpu_us": us_per_request(self.server_cpu),
            "client_cpu_us": us_per_request(self.client_cpu),
            "rps": len(every) / seconds,
            "p50": percentile(every, 50),
            "p99": percentile(every, 99),
            "count": len(every),
            "by_method": {m: (len(v) / seconds, percentile(sorted(v), 50),
                              percentile(sorted(v), 99))
                          for m, v in sorted(self.latencies.items())},
            "errors": dict(self.errors),
            "midway": self.midway,
        }


async def take_turns(phases: list[Phase], identities, server, clients: int, seconds: float,
                     midway: tuple[Phase, object] | None = None) -> list[dict]:
    """Each phase measured for `seconds` in all, in windows taking turns with the others;
    `midway = (phase, coroutine function)`: awaited in that phase's middle window."""
    for phase in phases:
        await phase.open(identities, server, clients)
    try:
        for phase in phases:
            await phase.warm_up(min(1.0, seconds / 4))
        rounds = max(2, round(seconds / WINDOW_MEASURED))
        for r in range(rounds):
            for phase in phases:
                scrape_now = midway is not None and midway[0] is phase and r == rounds // 2
                await phase.window(seconds / rounds, midway[1] if scrape_now else None)
        return [phase.result() for phase in phases]
    finally:
        for phase in phases:
            await phase.close()


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
    # One round trip on each: every connection has gone through the handler once, as a
    # real idle peer between two polls has.
    method = "get_sigs" if daemon.name == "sync-server" else "echo"
    conns = await connect_many(daemon.port, identities, server, count,
                               first_call=(method, {"id": h("idle")}))
    try:
        return before, rss_kib(daemon.proc.pid)
    finally:
        await close_all(conns)


COMMON = {"listen": f"{HOST}:0", "noise_key_file": "server.key", "log_level": "warning",
          "metrics_listen": f"{HOST}:0",
          # 8 keys hold up to 1,200 connections: lift the per-key share of slots, and
          # the slots themselves (peers share max_connections - max_handshakes).
          "max_connections_per_peer": 1024, "max_connections": 2048}


def sync_daemon(tmp: Path, name: str, keys: list[str], storage: dict) -> DaemonProcess:
    workdir = tmp / name  # its own notify socket, logs and data_dir
    workdir.mkdir()
    return DaemonProcess("sync-server", write_config(workdir / "sync.toml", {
        **COMMON, "noise_key_file": str(tmp / "server.key"), "data_dir": "data",
        # The per-key request rate is a policy, not a cost: off the measurement.
        "requests_per_second": 1_000_000,
        "peers": {"stakeholders": keys, "managers": keys, "watchtowers": keys},
        **storage,
    }), workdir)


async def start_daemons(tmp: Path) -> tuple[DaemonProcess, DaemonProcess, NoiseIdentity,
                                            list[NoiseIdentity]]:
    server = NoiseIdentity.create(tmp / "server.key")
    identities = [NoiseIdentity.create(tmp / f"client{i}.key") for i in range(IDENTITIES)]
    keys = [i.public.hex() for i in identities]
    sync = sync_daemon(tmp, "sqlite", keys, {})
    echo = DaemonProcess("echo", write_config(tmp / "echo.toml", {
        **COMMON, "data_dir": "echo-data", "clients": keys,
    }), tmp, module="tests.support.echo_daemon")
    await sync.start()
    await echo.start()
    return sync, echo, server, identities


async def postgres_phases(tmp: Path, ids, server, echo: DaemonProcess,
                          args) -> tuple[dict, dict[str, dict]]:
    """The mixed workload on PostgreSQL, one process, and two sharing a database (the
    clients spread over both), taking turns with an echo ceiling of their own."""
    keys = [i.public.hex() for i in ids]
    postgres = PostgresServer.start()
    daemons: list[DaemonProcess] = []
    try:
        phases = [Phase("echo", [echo.port], [echo.proc.pid], echo_request)]
        for processes in (1, 2):
            storage = {"storage": {"backend": "postgresql", "dsn": postgres.new_database()}}
            group = [sync_daemon(tmp, f"pg{processes}-{i}", keys, storage)
                     for i in range(processes)]
            daemons += group
            for daemon in group:
                await daemon.start()
            phases.append(Phase(f"postgresql, {processes} process{'es' if processes > 1 else ''}",
                                [d.port for d in group], [d.proc.pid for d in group],
                                Workload.request))
        midway = None
        if args.scrape:
            midway = (phases[1], lambda port=daemons[0].metrics_port: scrape(port))
        ceiling, *results = await take_turns(phases, ids, server, args.clients, args.seconds,
                                             midway)
        if midway is not None:
            save_scrape(f"{args.scrape}.postgresql", results[0]["midway"])
        for daemon in daemons:
            status = await daemon.stop()
            if status != 0:
                raise RuntimeError(f"sync server on PostgreSQL exited with {status}:\n"
                                   f"{daemon.stderr()}")
        return ceiling, {phase.name: result for phase, result in zip(phases[1:], results)}
    finally:
        for daemon in daemons:
            daemon.ensure_dead()
        postgres.stop()


def save_scrape(path: str, scraped) -> None:
    Path(path).write_text(scraped.text)
    print(f"sync server metrics scraped under load: {path}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def main_async(args) -> int:
    try:
        raise_fd_limit(2048 + IDLE_CONNECTIONS + args.clients + 512)  # daemons check theirs
    except FdLimitError as e:
        sys.exit(str(e))
    with tempfile.TemporaryDirectory(prefix="revault-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sync = echo = uncursored = None
        try:
            async with asyncio.timeout(PHASE_DEADLINE * 4):
                sync, echo, server, ids = await start_daemons(tmp)
                print(f"loopback, {args.clients} concurrent clients, one request in flight "
                      f"per connection, {args.seconds:g} s measured per server after warm-up, in "
                      f"windows taking turns; the servers are daemon subprocesses; the "
                      f"client is one asyncio process")
                # Its own server: phases sharing one would each find, at every turn, the
                # other's changes waiting for its watchtowers' cursors.
                uncursored = sync_daemon(tmp, "sqlite-uncursored",
                                         [i.public.hex() for i in ids], {})
                await uncursored.start()
                phases = [
                    Phase("echo", [echo.port], [echo.proc.pid], echo_request),
                    Phase("sqlite, watchtowers with cursors", [sync.port], [sync.proc.pid],
                          Workload.request),
                    Phase("sqlite, watchtowers polling without cursors", [uncursored.port],
                          [uncursored.proc.pid], Workload.request, cursors=False)]
                midway = (phases[1], lambda: scrape(sync.metrics_port)) if args.scrape else None
                ceiling, *results = await take_turns(phases, ids, server, args.clients,
                                                     args.seconds, midway)
                if args.scrape:
                    save_scrape(args.scrape, results[0]["midway"])
                groups = [(ceiling, {p.name: r for p, r in zip(phases[1:], results)})]
                echo_rss = await idle_rss(echo, ids, server, args.idle)
                sync_rss = await idle_rss(sync, ids, server, args.idle)
                if not args.no_postgresql:
                    groups.append(await postgres_phases(tmp, ids, server, echo, args))
            report(args, groups, echo_rss, sync_rss)
            failed = any(r["errors"] for c, rs in groups for r in (c, *rs.values()))
            for name, daemon in (("sync server", sync), ("echo", echo),
                                 ("sync server without cursors", uncursored)):
                status = await daemon.stop()
                if status != 0:
                    print(f"{name} exited with {status}:\n{daemon.stderr()}")
                    failed = True
            return 1 if failed else 0
        finally:
            for daemon in (sync, echo, uncursored):
                if daemon is not None:
                    daemon.ensure_dead()


def report(args, groups: list[tuple[dict, dict[str, dict]]], echo_rss, sync_rss) -> None:
    """Each group: its echo ceiling, then the phases that took turns with it."""
    for ceiling, results in groups:
        print()
        print(f"echo ceiling:        {ceiling['rps']:8.0f} req/s   p50 {ms(ceiling['p50'])}   "
              f"p99 {ms(ceiling['p99'])}   ({ceiling['count']} requests)   "
              f"server CPU {ceiling['cpu_us']:.0f} us/request, "
              f"client {ceiling['client_cpu_us']:.0f}")
        for name, result in results.items():
            print(f"sync server, mixed ({name}):")
            print(f"                     {result['rps']:8.0f} req/s   p50 {ms(result['p50'])}   "
                  f"p99 {ms(result['p99'])}   ({result['count']} requests)   "
                  f"server CPU {result['cpu_us']:.0f} us/request, "
                  f"client {result['client_cpu_us']:.0f}")
            print(f"  ratio to ceiling:  throughput {result['rps'] / ceiling['rps']:.2f}x   "
                  f"p50 {result['p50'] / ceiling['p50']:.2f}x   "
                  f"p99 {result['p99'] / ceiling['p99']:.2f}x   CPU per request "
                  f"(ceiling's / ours) {ceiling['cpu_us'] / result['cpu_us']:.2f}x")
            print("  per method:          req/s        p50          p99")
            for method, (rps, p50, p99) in result["by_method"].items():
                print(f"    {method:20s} {rps:7.0f}   {ms(p50):>10s}   {ms(p99):>10s}")
    mib = 1024
    print(f"RSS with {args.idle} idle connections:")
    for name, (rest, held) in (("echo ceiling", echo_rss), ("sync server", sync_rss)):
        print(f"  {name + ':':18s} {held / mib:7.1f} MiB (at rest {rest / mib:.1f} MiB, "
              f"{(held - rest) / args.idle:.1f} KiB per connection)")
    print(f"  ratio to ceiling:  {sync_rss[1] / echo_rss[1]:.2f}x")
    for ceiling, results in groups:
        for name, result in (("echo", ceiling), *results.items()):
            for error, count in result["errors"].items():
                print(f"ERROR {name}: {count} x {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small and short")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--idle", type=int, default=None)
    parser.add_argument("--no-postgresql", action="store_true",
                        help="skip the PostgreSQL phases")
    parser.add_argument("--scrape", metavar="FILE",
                        help="save the sync server's metrics scraped halfway through the load")
    args = parser.parse_args()
    args.clients = args.clients or (20 if args.quick else 200)
    args.seconds = args.seconds or (1.5 if args.quick else 10.0)
    args.idle = args.idle or (100 if args.quick else IDLE_CONNECTIONS)
    if not (1 <= args.idle <= IDLE_CONNECTIONS) or args.clients < 1 or args.seconds <= 0:
        parser.error("need clients >= 1, seconds > 0, 1 <= idle <= 1000 (max_connections)")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
