"""Hostile peers and well-behaved ones, against a real sync server on the loopback network.

Used by tests/test_hostile.py (one test per finding of issue 12, and the soak) and by
bench/hostile.py (the same attacks, measured against two source trees).

The attacks run in a child process (`python -m tests.support.hostile attack SPEC.json`)
so that the latency measured for the well-behaved peers, in the caller's process, is
the daemon's and not that of an event loop busy attacking. Anonymous floods come from
127.0.0.2-127.0.0.9 (all loopback on Linux), as they would come from the attacker's
own addresses; the well-behaved peers use 127.0.0.1. Everything stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from revault import transport
from revault.messages import sign_opinion
from revault.rpc import RpcClient, RpcError, encode_request
from tests.support.daemons import REPO_ROOT, DaemonProcess, NoiseIdentity, write_config
from tests.support.sync_data import der, h, pubkey, spend_tx

HOST = "127.0.0.1"
ATTACK_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 10)]     # anonymous floods
# Attackers holding a configured key, each from an address of its own.
KEY_FLOOD_ADDRESS, NON_READER_ADDRESS, PIPELINE_ADDRESS = "127.0.0.10", "127.0.0.11", "127.0.0.12"
OPINION_KEY = b"\x22" * 32
CALL_TIMEOUT = 10.0


# --- test data ------------------------------------------------------------------------

def sig_params(tag: str, n: int = 1) -> dict:
    return {"id": h(tag), "pubkey": pubkey(n), "signature": der(n, tag)}


# --- the deployment -------------------------------------------------------------------

ROLES = ("stakeholder", "manager", "watchtower")


@dataclass
class Deployment:
    """The server's key, one well-behaved peer per role and `attackers` keys per role."""

    workdir: Path
    server: NoiseIdentity
    good: dict[str, NoiseIdentity]
    attackers: dict[str, list[NoiseIdentity]]

    @classmethod
    def create(cls, workdir: Path, attackers: int = 2) -> Deployment:
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(
            workdir=workdir,
            server=NoiseIdentity.create(workdir / "server.key"),
            good={role: NoiseIdentity.create(workdir / f"good-{role}.key") for role in ROLES},
            attackers={role: [NoiseIdentity.create(workdir / f"bad-{role}-{i}.key")
                              for i in range(attackers)] for role in ROLES})

    def config(self, **extra) -> dict:
        config = {
            "listen": f"{HOST}:0",
            "data_dir": "data",
            "noise_key_file": "server.key",
            "log_level": "info",
            "peers": {f"{role}s": [p.public.hex() for p in
                                   [self.good[role], *self.attackers[role]]]
                      for role in ROLES},
        }
        config.update(extra)
        return config

    def daemon(self, root: Path = REPO_ROOT, **extra) -> DaemonProcess:
        path = write_config(self.workdir / "sync.toml", self.config(**extra))
        return DaemonProcess("sync-server", path, self.workdir, root=root)

    def attacker_keys(self) -> dict[str, list[str]]:
        return {role: [p.private.hex() for p in ids] for role, ids in self.attackers.items()}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- raw sockets ----------------------------------------------------------------------

async def open_raw(port: int, source: str = HOST) -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, local_addr=(source, 0))


async def closed_by_peer(reader: asyncio.StreamReader, bound: float) -> bool:
    """Whether the server closed this socket within `bound` seconds (EOF or reset)."""
    try:
        async with asyncio.timeout(bound):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:  # before OSError, of which it is a subclass
        return False
    except (ConnectionError, OSError):
        return True


async def handshake_raw(port: int, private: bytes, server_public: bytes,
                        act_one: bytes | None = None, source: str = HOST):
    """A handshake by hand: (reader, writer, codec or None when no act two came)."""
    reader, writer = await open_raw(port, source)
    ini = transport.InitiatorHandshake(private, server_public)
    ours = ini.act_one()
    writer.write(act_one if act_one is not None else ours)
    try:
        act_two = await asyncio.wait_for(reader.readexactly(transport.ACT_TWO_LEN), 5)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        return reader, writer, None
    if act_one is not None:
        return reader, writer, None  # a replay: the ephemeral secret is not ours
    return reader, writer, ini.read_act_two(act_two)


# --- attacks (run in the attacker process) --------------------------------------------

@dataclass
class AttackStats:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


async def _until(awaitable, stop: asyncio.Event) -> asyncio.Future:
    """Wait for `awaitable` or for `stop`, whichever comes first; returns the former's
    future (for the caller to cancel when it is its own)."""
    target = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([target, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    return target


async def hold_silent_sockets(port: int, count: int, stop: asyncio.Event,
                              stats: AttackStats) -> None:
    """Keep `count` TCP sockets open that never send a byte, reopening closed ones."""
    async def one(source: str) -> None:
        while not stop.is_set():
            try:
                reader, writer = await open_raw(port, source)
            except OSError:
                stats.add("silent_connect_failed")
                await asyncio.sleep(0.05)
                continue
            stats.add("silent_opened")
            (await _until(reader.read(1), stop)).cancel()
            writer.close()
    await asyncio.gather(*(one(ATTACK_ADDRESSES[i % len(ATTACK_ADDRESSES)])
                           for i in range(count)))


async def junk_handshakes(port: int, stop: asyncio.Event, stats: AttackStats,
                          workers: int = 4) -> None:
    """Connect, send 67 random bytes as act one, wait for the close; again and again."""
    async def one(source: str) -> None:
        while not stop.is_set():
            try:
                reader, writer = await open_raw(port, source)
                writer.write(os.urandom(transport.ACT_ONE_LEN))
                await closed_by_peer(reader, 5)
                writer.close()
                stats.add("junk_sent")
            except OSError:
                stats.add("junk_connect_failed")
                await asyncio.sleep(0.01)
    await asyncio.gather(*(one(ATTACK_ADDRESSES[i]) for i in range(workers)))


async def hold_key_connections(port: int, private: bytes, server_public: bytes, count: int,
                               stop: asyncio.Event, stats: AttackStats, tag: str) -> None:
    """Open `count` authenticated connections with one watchtower key and hold them (one
    request each, so that they count as authenticated), reopening those the server closes."""
    async def one(source: str, delay: float) -> None:
        await asyncio.sleep(delay)  # one after another, as a slow slot hog would
        while not stop.is_set():
            try:
                rpc = RpcClient(await transport.connect(HOST, port, private, server_public,
                                                        timeout=5, source=source))
            except (OSError, transport.TransportError, TimeoutError):
                stats.add(f"{tag}_refused")
                await asyncio.sleep(0.2 + random.random())
                continue
            try:
                await rpc.call("get_spend_requests", {}, timeout=CALL_TIMEOUT)
                stats.add(f"{tag}_held")
                (await _until(rpc._conn.recv(), stop)).cancel()
            except (RpcError, transport.TransportError, TimeoutError, OSError):
                stats.add(f"{tag}_dropped")
            finally:
                await rpc.close()
    await asyncio.gather(*(one(KEY_FLOOD_ADDRESS, i * 0.01) for i in range(count)))


async def _connect_counted(port: int, private: bytes, server_public: bytes, source: str,
                           stats: AttackStats, tag: str) -> transport.NoiseConnection | None:
    """A connection, or None (counted as refused, after a pause before the next try)."""
    try:
        conn = await transport.connect(HOST, port, private, server_public, timeout=5,
                                       source=source)
    except (OSError, transport.TransportError, TimeoutError):
        stats.add(f"{tag}_refused")
        await asyncio.sleep(0.2)
        return None
    stats.add(f"{tag}_opened")
    return conn


async def non_readers(port: int, private: bytes, server_public: bytes, count: int,
                      stop: asyncio.Event, stats: AttackStats, *,
                      method: str = "get_sigs", params: dict | None = None,
                      reconnect: bool = True, sources: list[str] | None = None) -> None:
    """`count` connections that pipeline requests and never read an answer (opening a
    new one when the server closes one, if `reconnect`)."""
    request = encode_request(method, {"id": h("never read")} if params is None else params, 1)

    async def one(source: str, delay: float) -> None:
        await asyncio.sleep(delay)  # one after another
        first = True
        while not stop.is_set() and (first or reconnect):
            first = False
            conn = await _connect_counted(port, private, server_public, source, stats,
                                          "non_reader")
            if conn is None:
                continue
            try:
                while not stop.is_set():
                    # Blocks once the server stops reading us: TCP pushing back.
                    await asyncio.wait_for(conn.send(request), 1)
                    stats.add("non_reader_sent")
            except TimeoutError:
                stats.add("non_reader_blocked")
                await _until(asyncio.shield(conn._lost), stop)
                if conn._lost.done():
                    stats.add("non_reader_closed_by_server")
            except transport.TransportError:
                stats.add("non_reader_closed_by_server")
            finally:
                conn._transport.abort()
    sources = sources or [NON_READER_ADDRESS]
    await asyncio.gather(*(one(sources[i % len(sources)], i * 0.01) for i in range(count)))


async def pipeline(port: int, private: bytes, server_public: bytes, stop: asyncio.Event,
                   stats: AttackStats, depth: int = 64) -> None:
    """One connection sending `sig` requests as fast as the server takes them, reading
    every answer: a fast sender, well-formed."""
    while not stop.is_set():
        conn = await _connect_counted(port, private, server_public, PIPELINE_ADDRESS, stats,
                                      "pipeline")
        if conn is None:
            continue
        window = asyncio.Semaphore(depth)

        async def reader() -> None:
            while True:
                answer = json.loads(await conn.recv())
                window.release()
                stats.add("pipeline_acked" if "result" in answer else "pipeline_refusals")

        task = asyncio.ensure_future(reader())
        try:
            i = 0
            while not stop.is_set() and not task.done():
                await window.acquire()
                i += 1
                params = sig_params(f"pipeline-{os.getpid()}-{time.monotonic_ns()}-{i}",
                                    n=1000 + i % 50)
                await conn.send(encode_request("sig", params, i))
                stats.add("pipeline_sent")
        except transport.TransportError:
            pass
        finally:
            task.cancel()
            await conn.close()


async def run_attacks(spec: dict) -> dict:
    """Every attack of `spec` at once, for spec["duration"] seconds; returns the counts."""
    port = spec["port"]
    server_public = bytes.fromhex(spec["server_public"])
    keys = {role: [bytes.fromhex(k) for k in ks] for role, ks in spec["keys"].items()}
    stop = asyncio.Event()
    stats = AttackStats()
    jobs = []
    if spec.get("silent", 0):
        jobs.append(hold_silent_sockets(port, spec["silent"], stop, stats))
    if spec.get("junk", 0):
        jobs.append(junk_handshakes(port, stop, stats, workers=spec["junk"]))
    if spec.get("key_flood", 0):
        jobs.append(hold_key_connections(port, keys["watchtower"][0], server_public,
                                         spec["key_flood"], stop, stats, "key_flood"))
    if spec.get("non_readers", 0):
        jobs.append(non_readers(port, keys["stakeholder"][0], server_public,
                                spec["non_readers"], stop, stats))
    spread = spec.get("non_readers_per_key")
    if spread:
        # Every key of a role, each with its connections spread over the flood addresses.
        jobs.extend(non_readers(port, key, server_public, spread["count"], stop, stats,
                                method=spread["method"], params=spread["params"],
                                sources=ATTACK_ADDRESSES)
                    for key in keys[spread["role"]])
    if spec.get("pipeline", False):
        jobs.append(pipeline(port, keys["stakeholder"][1], server_public, stop, stats))
    tasks = [asyncio.ensure_future(j) for j in jobs]
    await asyncio.sleep(spec["duration"])  # the attack's own length, not a wait for a result
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    return stats.counts


class AttackProcess:
    """The attacks in a child process; `wait()` returns their counts."""

    def __init__(self, deployment: Deployment, port: int, duration: float, **attacks):
        spec = {"port": port, "server_public": deployment.server.public.hex(),
                "keys": deployment.attacker_keys(), "duration": duration, **attacks}
        self._spec_path = deployment.workdir / f"attack-{random.getrandbits(32):08x}.json"
        self._spec_path.write_text(json.dumps(spec))
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.hostile", "attack", str(self._spec_path),
            stdout=asyncio.subprocess.PIPE, env=env, cwd=REPO_ROOT)

    async def wait(self, bound: float = 60.0) -> dict:
        out, _ = await asyncio.wait_for(self.proc.communicate(), bound)
        return json.loads(out.decode() or "{}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


# --- well-behaved peers ---------------------------------------------------------------

@dataclass
class Acked:
    """Writes the server acknowledged: each must survive a crash."""
    sigs: list[tuple[str, str, str]] = field(default_factory=list)      # id, pubkey, sig
    spends: list[tuple[str, str]] = field(default_factory=list)         # vault_id, tx
    opinions: list[tuple[str, str]] = field(default_factory=list)       # vault_id, txid


@dataclass
class PeerRun:
    role: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


MAX_SPENDS = 60  # pending requests all fit in one get_spend_requests answer


async def well_behaved(role: str, deployment: Deployment, port: int, duration: float,
                       acked: Acked, *, calls_per_connection: int = 10,
                       interval: float = 0.05) -> PeerRun:
    """One peer of `role` doing its normal work for `duration` s: a fresh connection
    every `calls_per_connection` calls, a call every `interval` s. Each latency sample
    includes the connect when one was needed."""
    me = deployment.good[role]
    run = PeerRun(role)
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    rpc: RpcClient | None = None
    i = 0
    while loop.time() < end:
        i += 1
        started = loop.time()
        try:
            if rpc is None or rpc.closed or i % calls_per_connection == 0:
                if rpc is not None:
                    await rpc.close()
                rpc = await RpcClient.connect(HOST, port, me.private, deployment.server.public,
                                              timeout=CALL_TIMEOUT)
            await _one_call(role, rpc, i, acked)
            run.latencies.append(loop.time() - started)
        except (RpcError, transport.TransportError, OSError, TimeoutError) as e:
            run.errors.append(f"{type(e).__name__}: {e}")
            run.latencies.append(loop.time() - started)
            if rpc is not None:
                await rpc.close()
            rpc = None
        await asyncio.sleep(interval)  # the peer's own pace between two calls
    if rpc is not None:
        await rpc.close()
    return run


async def _one_call(role: str, rpc: RpcClient, i: int, acked: Acked) -> None:
    if role == "stakeholder":
        if i % 2:
            p = sig_params(f"good-sig-{i}", n=7)
            await rpc.call("sig", p, timeout=CALL_TIMEOUT)
            acked.sigs.append((p["id"], p["pubkey"], p["signature"]))
        else:
            await rpc.call("get_sigs", {"id": h(f"good-sig-{i - 1}")}, timeout=CALL_TIMEOUT)
    elif role == "manager":
        if i % 2 and len(acked.spends) < MAX_SPENDS:
            vault, tx = h(f"good-vault-{i}"), spend_tx(f"good-spend-{i}")[0]
            await rpc.call("request_spend", {"transaction": tx, "timestamp": i,
                                             "vault_id": vault}, timeout=CALL_TIMEOUT)
            acked.spends.append((vault, tx))
        else:
            await rpc.call("get_spend_opinions", {"vault_id": h(f"good-op-{i - 1}")},
                           timeout=CALL_TIMEOUT)
    else:
        if i % 2:
            vault, txid = h(f"good-op-{i}"), h(f"good-op-tx-{i}")
            params = sign_opinion(OPINION_KEY, vault, False, "not allowed", txid)
            await rpc.call("spend_opinion", params.to_json(), timeout=CALL_TIMEOUT)
            acked.opinions.append((vault, txid))
        else:
            await rpc.call("get_spend_requests", {}, timeout=CALL_TIMEOUT)


async def lost_writes(deployment: Deployment, port: int, acked: Acked) -> list[str]:
    """Every acknowledged write that the server no longer has."""
    lost = []
    server = deployment.server.public
    async with await RpcClient.connect(HOST, port, deployment.good["stakeholder"].private,
                                       server) as rpc:
        for id_, pub, sig in acked.sigs:
            got = await rpc.call("get_sigs", {"id": id_}, timeout=CALL_TIMEOUT)
            if got["signatures"].get(pub) != sig:
                lost.append(f"sig {id_}")
    async with await RpcClient.connect(HOST, port, deployment.good["watchtower"].private,
                                       server) as rpc:
        pending = await rpc.call("get_spend_requests", {}, timeout=CALL_TIMEOUT)
        have = {(r["vault_id"], r["transaction"]) for r in pending["requests"]}
        lost.extend(f"spend {vault}" for vault, tx in acked.spends if (vault, tx) not in have)
    async with await RpcClient.connect(HOST, port, deployment.good["manager"].private,
                                       server) as rpc:
        for vault, txid in acked.opinions:
            got = await rpc.call("get_spend_opinions", {"vault_id": vault}, timeout=CALL_TIMEOUT)
            if txid not in {o["txid"] for o in got["opinions"]}:
                lost.append(f"opinion {vault}")
    return lost


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "attack":
        print("usage: python -m tests.support.hostile attack SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    counts = asyncio.run(run_attacks(spec))
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
