"""Hostile peers against a real sync server: each finding of issue 12, measured.

    .venv/bin/python bench/hostile.py [--tree PATH] [--only NAME ...] [--soak SECONDS]

The daemon runs from `--tree` (default: this checkout), so the same attacks can be
measured before and after a change:

    git archive <commit> | tar -x -C /tmp/before
    .venv/bin/python bench/hostile.py --tree /tmp/before

Loopback only; every attack is bounded and stops by itself. Figures are printed, never
asserted (tests/test_hostile.py asserts the bounds). Measurements:

  slots       1,100 silent sockets, then can a stakeholder connect?  one watchtower key
              opening 1,100 connections: how many does it hold, can a stakeholder still
              connect?  100 replays of a captured act one: how many get act two, how
              many are still open 12 s later?
  rate        300 `sig` one after the other on one connection: acks, refusals, seconds;
              acked writes/s of one key on 1 and on 20 connections.
  nonreading  200 connections (8 keys) pipelining requests for 57 KB answers and never
              reading (unpaced): daemon RSS and CPU over --nonreading seconds, a
              stakeholder's connect+call latency meanwhile, SIGTERM time afterwards.
  halfclose   20 clients send one `sig` then shut down their sending side: acks received.
  startup     a read-only database; max_connections=400 under nofile=256.
  logs        log bytes written for 1,000 junk handshakes and 300 refused requests.
  soak        all attacks at once for --soak seconds while a well-behaved stakeholder,
              manager and watchtower work; their p50/p99, then kill -9, restart, lost
              acked writes.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from revault import transport  # noqa: E402
from revault.rpc import RpcClient, RpcError, encode_request  # noqa: E402
from tests.support import hostile as hz  # noqa: E402
from tests.support.daemons import REPO_ROOT  # noqa: E402

NAMES = ["slots", "rate", "nonreading", "halfclose", "startup", "logs", "soak"]


def supports_new_keys(tree: Path) -> bool:
    return "write_timeout" in (tree / "revault" / "daemon.py").read_text()


async def started(tree: Path, workdir: Path, attackers: int = 2, **extra):
    deployment = hz.Deployment.create(workdir, attackers=attackers)
    daemon = deployment.daemon(root=tree, **extra)
    await daemon.start()
    return deployment, daemon


async def good_call(deployment, port: int, role: str = "stakeholder") -> tuple[bool, float, str]:
    """Connect as the good peer of `role` and make one call: (ok, seconds, error)."""
    started_at = time.monotonic()
    try:
        async with await RpcClient.connect(hz.HOST, port, deployment.good[role].private,
                                           deployment.server.public, timeout=10) as rpc:
            await rpc.call("get_sigs", {"id": hz.h("x")}, timeout=10)
        return True, time.monotonic() - started_at, ""
    except (OSError, transport.TransportError, RpcError, TimeoutError) as e:
        return False, time.monotonic() - started_at, type(e).__name__


# --- 1. slots ---------------------------------------------------------------------------

async def bench_slots(tree: Path, workdir: Path) -> dict:
    out = {}
    deployment, daemon = await started(tree, workdir / "silent")
    try:
        socks = []
        for i in range(1100):
            try:
                socks.append(await hz.open_raw(daemon.port,
                                               hz.ATTACK_ADDRESSES[i % len(hz.ATTACK_ADDRESSES)]))
            except OSError:
                break
        ok, seconds, error = await good_call(deployment, daemon.port)
        out["silent_1100: stakeholder connects"] = f"{ok} in {seconds:.3f}s {error}"
        for _, writer in socks:
            writer.close()
    finally:
        await daemon.stop()

    deployment, daemon = await started(tree, workdir / "keyflood")
    try:
        key = deployment.attackers["watchtower"][0]
        clients: list[RpcClient] = []
        t0 = time.monotonic()

        async def one():
            try:
                rpc = await RpcClient.connect(hz.HOST, daemon.port, key.private,
                                              deployment.server.public, timeout=5)
                await rpc.call("get_spend_requests", {}, timeout=5)
                clients.append(rpc)
            except (OSError, transport.TransportError, RpcError, TimeoutError):
                pass

        for start in range(0, 1100, 100):
            await asyncio.gather(*(one() for _ in range(100)))
        out["key_flood: connections held by one key"] = (
            f"{len(clients)} (opened in {time.monotonic() - t0:.1f}s)")
        ok, seconds, error = await good_call(deployment, daemon.port)
        out["key_flood: stakeholder connects"] = f"{ok} in {seconds:.3f}s {error}"
        for rpc in clients:
            await rpc.close()
    finally:
        await daemon.stop()

    deployment, daemon = await started(tree, workdir / "replay")
    try:
        victim = deployment.good["stakeholder"]
        act_one = transport.InitiatorHandshake(victim.private,
                                               deployment.server.public).act_one()
        replays = [await hz.handshake_raw(daemon.port, victim.private,
                                          deployment.server.public, act_one=act_one,
                                          source=hz.ATTACK_ADDRESSES[0]) for _ in range(100)]
        held = sum([not await hz.closed_by_peer(reader, 0.01) for reader, _, _ in replays])
        ok, seconds, error = await good_call(deployment, daemon.port)
        out["replay_100: held by the server right after"] = held
        out["replay_100: victim connects meanwhile"] = f"{ok} in {seconds:.3f}s {error}"
        await asyncio.sleep(12)  # past the 10 s handshake deadline
        still = 0
        for reader, writer, _ in replays:
            if not await hz.closed_by_peer(reader, 0.01):
                still += 1
            writer.close()
        out["replay_100: still open after 12 s"] = still
    finally:
        await daemon.stop()
    return out


# --- 2. rate ----------------------------------------------------------------------------

async def bench_rate(tree: Path, workdir: Path) -> dict:
    out = {}
    deployment, daemon = await started(tree, workdir / "rate")
    try:
        me = deployment.good["stakeholder"]
        acks = refusals = 0
        t0 = time.monotonic()
        async with await RpcClient.connect(hz.HOST, daemon.port, me.private,
                                           deployment.server.public) as rpc:
            for i in range(300):
                try:
                    await rpc.call("sig", hz.sig_params(f"rate-{i}"), timeout=30)
                    acks += 1
                except RpcError:
                    refusals += 1
        out["300 sigs in a row: acks/refusals"] = (
            f"{acks}/{refusals} in {time.monotonic() - t0:.1f}s")
        for connections in (1, 20):
            key = deployment.attackers["stakeholder"][connections // 20]
            counts = {"ack": 0}
            end = time.monotonic() + 3

            async def writer(c: int) -> None:
                async with await RpcClient.connect(hz.HOST, daemon.port, key.private,
                                                   deployment.server.public) as rpc:
                    i = 0
                    while time.monotonic() < end:
                        i += 1
                        try:
                            await rpc.call("sig", hz.sig_params(f"w{connections}-{c}-{i}"),
                                           timeout=30)
                            counts["ack"] += 1
                        except RpcError:
                            pass

            await asyncio.gather(*(writer(c) for c in range(connections)))
            out[f"one key, {connections} connection(s): acked writes/s"] = round(
                counts["ack"] / 3, 1)
    finally:
        await daemon.stop()
    return out


# --- 3. peers that do not read ----------------------------------------------------------

NONREADING_SECONDS = 30.0   # the figure; --nonreading sets it


async def bench_nonreading(tree: Path, workdir: Path, seconds: float = NONREADING_SECONDS,
                           rate: float = 10_000) -> dict:
    # Answers of 57 KB (three big pending spend requests) and, by default, no pacing to
    # speak of, so that what a non-reading peer is not taking piles up at once. With
    # rate 0 the daemon's own default pace applies.
    extra = {"write_timeout": 5} if supports_new_keys(tree) else {}
    if rate:
        extra["requests_per_second"] = rate
    deployment, daemon = await started(tree, workdir / "nonreading", attackers=8, **extra)
    out = {}
    try:
        async with await RpcClient.connect(hz.HOST, daemon.port,
                                           deployment.good["manager"].private,
                                           deployment.server.public) as rpc:
            for i in range(3):
                await rpc.call("request_spend", {"transaction": hz.spend_tx(f"big-{i}", 330)[0],
                                                 "timestamp": i, "vault_id": hz.h(f"big-{i}")})
        pid = daemon.proc.pid
        rss0, cpu0 = hz.rss_kib(pid), hz.cpu_seconds(pid)
        attack = hz.AttackProcess(deployment, daemon.port, seconds,
                                  non_readers_per_key={
            "role": "watchtower", "count": 25, "method": "get_spend_requests", "params": {}})
        await attack.start()
        peak = rss0
        latencies = []
        errors = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ok, latency, error = await good_call(deployment, daemon.port)
            latencies.append(latency)
            if not ok:
                errors.append(error)
            peak = max(peak, hz.rss_kib(pid))
            await asyncio.sleep(0.2)  # sample five times a second
        cpu = hz.cpu_seconds(pid) - cpu0
        counts = await attack.wait()
        with open(f"/proc/{pid}/status") as f:
            peak = max(peak, next(int(line.split()[1]) for line in f
                                  if line.startswith("VmHWM:")))
        out["RSS before / peak (MiB)"] = f"{rss0 / 1024:.0f} / {peak / 1024:.0f}"
        out["RSS per non-reading connection (KiB)"] = round((peak - rss0) / 200)
        out["non-reading connections closed by the server"] = counts.get(
            "non_reader_closed_by_server", 0)
        out[f"daemon CPU over {seconds:g} s (s)"] = round(cpu, 1)
        out["stakeholder connect+call: calls, p50, max (s), errors"] = (
            f"{len(latencies)}, {hz.percentile(latencies, .5):.3f}, {max(latencies):.3f}, "
            f"{errors}")
        out["attack counts"] = counts
        t0 = time.monotonic()
        try:
            await daemon.stop()
            out["SIGTERM after the attack: stopped in (s)"] = round(time.monotonic() - t0, 1)
        except TimeoutError:
            out["SIGTERM after the attack: stopped in (s)"] = "did not stop in 15 s (killed)"
    finally:
        await daemon.stop()
    return out


# --- 7. half-closed connections ----------------------------------------------------------

async def bench_halfclose(tree: Path, workdir: Path) -> dict:
    deployment, daemon = await started(tree, workdir / "halfclose")
    try:
        me = deployment.good["stakeholder"]
        acks = 0
        for i in range(20):
            reader, writer, codec = await hz.handshake_raw(daemon.port, me.private,
                                                           deployment.server.public)
            writer.write(codec.encrypt(encode_request("sig", hz.sig_params(f"half-{i}"), i)))
            writer.write_eof()
            data = b""
            try:
                data = await asyncio.wait_for(reader.read(), 5)
            except (TimeoutError, ConnectionError):
                pass
            frames = codec.feed(data) if data else []
            acks += sum(1 for f in frames if b'"ack":true' in f)
            writer.close()
        stored = 0
        async with await RpcClient.connect(hz.HOST, daemon.port, me.private,
                                           deployment.server.public) as rpc:
            for i in range(20):
                got = await rpc.call("get_sigs", {"id": hz.h(f"half-{i}")})
                stored += bool(got["signatures"])
        return {"20 half-closed requests: acks / stored": f"{acks} / {stored}"}
    finally:
        await daemon.stop()


# --- 8. start-up truths ------------------------------------------------------------------

async def bench_startup(tree: Path, workdir: Path) -> dict:
    out = {}
    deployment, daemon = await started(tree, workdir / "readonly")
    await daemon.stop()
    database = next((workdir / "readonly" / "data").glob("*.sqlite3"))
    with open(database, "r+b") as f:   # write version 3: SQLite opens it read-only
        f.seek(18)
        f.write(b"\x03")
    try:
        await daemon.start(timeout=20)
        ok = True
        try:
            async with await RpcClient.connect(hz.HOST, daemon.port,
                                               deployment.good["stakeholder"].private,
                                               deployment.server.public) as rpc:
                await rpc.call("sig", hz.sig_params("ro"))
        except RpcError as e:
            ok = f"write answered {e.code}"
        out["read-only database"] = f"READY=1 sent; {ok}"
        await daemon.stop()
    except RuntimeError as e:
        out["read-only database"] = "refused to start: " + str(e).splitlines()[-1][-160:]

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    deployment = hz.Deployment.create(workdir / "nofile")
    daemon = deployment.daemon(root=tree, max_connections=400)
    daemon.preexec_fn = low_nofile
    try:
        await daemon.start(timeout=20)
        socks = []
        for i in range(400):
            try:
                socks.append(socket.create_connection((hz.HOST, daemon.port), timeout=2))
            except OSError:
                break
        ok, seconds, error = await good_call(deployment, daemon.port)
        await asyncio.sleep(3)  # let the daemon log what it logs
        tracebacks = daemon.stderr().count("Traceback")
        for s in socks:
            s.close()
        out["max_connections=400, nofile=256"] = (
            f"started; stakeholder call {ok} {error} in {seconds:.1f}s; "
            f"{tracebacks} tracebacks in 3 s")
        await daemon.stop()
    except RuntimeError as e:
        out["max_connections=400, nofile=256"] = (
            "refused to start: " + str(e).splitlines()[-1][-160:])
    return out


# --- 9. logs --------------------------------------------------------------------------------

async def bench_logs(tree: Path, workdir: Path) -> dict:
    deployment, daemon = await started(tree, workdir / "logs")
    try:
        before = len(daemon.stderr().encode())
        for i in range(1000):
            reader, writer = await hz.open_raw(daemon.port, hz.ATTACK_ADDRESSES[i % 8])
            writer.write(bytes(67))
            await hz.closed_by_peer(reader, 5)
            writer.close()
        junk = len(daemon.stderr().encode()) - before
        before += junk
        async with await RpcClient.connect(hz.HOST, daemon.port,
                                           deployment.good["manager"].private,
                                           deployment.server.public) as rpc:
            for i in range(300):
                try:
                    await rpc.call("sig", hz.sig_params(f"forbidden-{i}"), timeout=30)
                except RpcError:
                    pass
        refused = len(daemon.stderr().encode()) - before
        return {"log bytes for 1,000 junk handshakes": junk,
                "log bytes for 300 refused requests": refused}
    finally:
        await daemon.stop()


# --- 11. soak -------------------------------------------------------------------------------

SOAK_ATTACKS = {"silent": 300, "junk": 4, "key_flood": 64, "non_readers": 64,
                "pipeline": True}


async def soak(tree: Path, workdir: Path, duration: float, **extra) -> dict:
    deployment, daemon = await started(tree, workdir, **extra)
    try:
        attack = hz.AttackProcess(deployment, daemon.port, duration, **SOAK_ATTACKS)
        pid = daemon.proc.pid
        cpu0 = hz.cpu_seconds(pid)
        await attack.start()
        acked = hz.Acked()
        runs = await asyncio.gather(*(hz.well_behaved(role, deployment, daemon.port,
                                                      duration, acked)
                                      for role in hz.ROLES))
        rss = hz.rss_kib(pid)
        cpu = hz.cpu_seconds(pid) - cpu0
        counts = await attack.wait()
        await daemon.kill()
        await daemon.start()
        lost = await hz.lost_writes(deployment, daemon.port, acked)
        out = {f"{r.role}: calls, errors, p50, p99 (s)":
               f"{len(r.latencies)}, {len(r.errors)}, {hz.percentile(r.latencies, .5):.3f}, "
               f"{hz.percentile(r.latencies, .99):.3f}" for r in runs}
        out["acked writes / lost after kill -9"] = (
            f"{len(acked.sigs) + len(acked.spends) + len(acked.opinions)} / {len(lost)}")
        out["daemon RSS (MiB), CPU (s)"] = f"{rss / 1024:.0f}, {cpu:.1f}"
        out["attack counts"] = counts
        out["errors (first 3)"] = [e for r in runs for e in r.errors][:3]
        return out
    finally:
        await daemon.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO_ROOT)
    parser.add_argument("--only", nargs="*", choices=NAMES, default=NAMES)
    parser.add_argument("--soak", type=float, default=30.0, help="soak seconds")
    parser.add_argument("--nonreading", type=float, default=NONREADING_SECONDS,
                        help="seconds of the non-reading attack")
    parser.add_argument("--nonreading-rate", type=float, default=10_000,
                        help="requests_per_second during it (0: the daemon's default)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tree = args.tree.resolve()
    print(f"daemon from {tree}")
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        for name in args.only:
            workdir = Path(tmp) / name
            workdir.mkdir()
            if name == "soak":
                result = await soak(tree, workdir, args.soak)
            elif name == "nonreading":
                result = await bench_nonreading(tree, workdir, args.nonreading,
                                                args.nonreading_rate)
            else:
                result = await globals()[f"bench_{name}"](tree, workdir)
            print(f"[{name}]")
            for key, value in result.items():
                print(f"  {key}: {value}")
            sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
