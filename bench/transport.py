"""Throughput of revault.transport against ceilings measured in the same run.

    .venv/bin/python bench/transport.py [--quick]

Loopback only (127.0.0.1). The servers run in this process; the load comes from a child
process (this script with --client, parameters on stdin, result on stdout), so that the
server measured has one core to itself and client CPU is not charged to it.

Figures:
  * server-side handshakes per second: clients send a precomputed act one, read the 48
    bytes of act two and close, so the server does all of its handshake work and the
    client none; also the rate of full connect()+close by real clients;
  * request round trips per second (echo handler), over 1 and 100 connections, for
    100 B, 1 KiB and 60 KiB payloads.
Ceilings:
  (a) X25519 primitives divided by the X25519 work of one server-side handshake;
  (b) the same handshake done in-process by the sans-IO classes, no sockets;
  (c) in-process FrameCodec round trip (client encrypt, server feed, server encrypt,
      client feed) for each payload;
  (d) a plain asyncio TCP echo with the same u16 length-prefixed framing, no crypto,
      same connection counts and payloads, same client process layout;
  (d+c) that echo plus the server's half of (c)'s crypto per round trip: the best a
      server with this framing could do over this event loop (wall rate scaled by CPU).
  (f) the event loop's own cost per connection: a plain asyncio server that reads act
      one's 67 bytes, writes 48 and closes, no crypto, driven by the same client as the
      act one/act two figure; (a)+(f) is then the best a server doing X25519 in this
      event loop could reach, however little else it did, and (b)+(f) the best a
      server doing this handshake (its hashing and AEAD too) in this event loop could
      reach with no bookkeeping at all (no slots, no deadline, no metrics).
  (g) the sans-IO responder on bare non-blocking sockets (RawSocketHandshakeServer), no
      asyncio transport and no bookkeeping, same client: what a handshake stage that
      left asyncio's transports could reach at best.
Peer baseline (what a user would pick instead of Noise):
  (e) JSON-RPC's usual secure channel: mutually authenticated TLS 1.3 (Python's ssl,
      P-256 certificates from a CA generated in this run, both ends verified), an
      asyncio echo with the same u16 framing; full handshakes (connect, handshake,
      close) and round trips, same client layout. Ours should be at least its equal.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import socket
import ssl
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from revault import transport as t  # noqa: E402

HOST = "127.0.0.1"
SIZES = [("100 B", 100), ("1 KiB", 1024), ("60 KiB", 60 * 1024)]
CONNECTIONS = [1, 100]
HANDSHAKE_CLIENTS = 32

# X25519 work of one server-side KK handshake in revault.transport:
#   act one: es = DH(s, re)                          1 DH
#            ss = DH(s, rs)                          0 per handshake: computed once per
#                                                    known peer when the server starts
#   act two: generate e (random scalar + base-point multiplication)   1 key generation
#            ee = DH(e, re)                          1 DH
#            se = DH(e, rs)                          1 DH
# so 3 DH + 1 key generation (textbook KK without the ss cache: 4 DH + 1 key generation).
SERVER_DH_PER_HANDSHAKE = 3
SERVER_KEYGEN_PER_HANDSHAKE = 1


# ------------------------------------------------------------------------------ timing

def per_second(fn, duration: float) -> float:
    """Calls of fn per CPU-second of this process, over about `duration` seconds: CPU time,
    not wall time, so that other load on the machine does not lower the ceilings."""
    fn()
    count, started = 0, time.process_time()
    deadline = started + duration
    batch = 1
    while True:
        for _ in range(batch):
            fn()
        count += batch
        now = time.process_time()
        if now >= deadline:
            return count / (now - started)
        batch = min(batch * 2, 256)


# ------------------------------------------------------------------------------ ceilings

def ceiling_x25519(duration: float) -> dict:
    # The same calls the handshake makes: cryptography's exchange, and a key generation
    # with its public key serialized.
    a, b = t._generate_keypair(), t._generate_keypair()
    dh = per_second(lambda: a.private.exchange(b.public), duration)
    gen = per_second(t._generate_keypair, duration)
    per_handshake = SERVER_DH_PER_HANDSHAKE / dh + SERVER_KEYGEN_PER_HANDSHAKE / gen
    return {"dh": dh, "keygen": gen, "handshakes": 1.0 / per_handshake}


def responder_keys(server_private: bytes, peers: list[bytes]) -> t._ResponderKeys:
    """The responder's per-server precomputation, ss included, as start_server makes it."""
    keys = t._ResponderKeys(server_private, peers)
    for i in range(len(keys.peers)):
        keys.ss(i)
    return keys


def ceiling_sans_io_handshake(duration: float, server_private: bytes, client_private: bytes,
                              peers: list[bytes]) -> float:
    keys = responder_keys(server_private, peers)
    server_public = t.public_key(server_private)
    acts = [t.InitiatorHandshake(client_private, server_public).act_one() for _ in range(64)]
    state = {"i": 0}

    def one():
        handshake = t.ResponderHandshake._with_keys(keys)
        handshake.read_act_one(acts[state["i"] % len(acts)])
        handshake.act_two()
        state["i"] += 1

    return per_second(one, duration)


def ceiling_codec(duration: float, size: int) -> float:
    ini = t.InitiatorHandshake(b"\x01" * 32, t.public_key(b"\x02" * 32))
    resp = t.ResponderHandshake(b"\x02" * 32, [t.public_key(b"\x01" * 32)])
    resp.read_act_one(ini.act_one())
    act_two, server = resp.act_two()
    client = ini.read_act_two(act_two)
    payload = os.urandom(size)

    def round_trip():
        [request] = server.feed(client._seal(payload))
        [reply] = client.feed(server._seal(request))
        assert len(reply) == size

    return per_second(round_trip, duration)


# ------------------------------------------------------------------------------ servers

async def noise_echo(conn: t.NoiseConnection) -> None:
    """Echo each message from the transport's callback (deliver_to), the way the
    daemons' serve_connection answers a request that does not wait."""
    ended = asyncio.get_running_loop().create_future()

    def ready() -> None:
        try:
            while (message := conn.recv_nowait()) is not None:
                conn.send_nowait(message)
        except t.ConnectionClosed:
            if not ended.done():
                ended.set_result(None)

    conn.deliver_to(ready)
    await ended


def take_plain_frames(buf: bytearray) -> list[bytes]:
    """Remove every complete u16_be(len) + payload frame from `buf`; return them whole."""
    frames, pos, end = [], 0, len(buf)
    while end - pos >= 2:
        size = (buf[pos] << 8) | buf[pos + 1]
        if end - pos - 2 < size:
            break
        frames.append(bytes(buf[pos:pos + 2 + size]))
        pos += 2 + size
    if pos:
        del buf[:pos]
    return frames


class HandshakeShapedServer(asyncio.Protocol):
    """Ceiling (f): act one's bytes in, act two's out, then the client closes; no crypto."""

    def connection_made(self, transport):
        self.transport = transport
        self.received = 0

    def data_received(self, data):
        self.received += len(data)
        if self.received >= t.ACT_ONE_LEN:
            self.received = -1 << 30  # answered once
            self.transport.write(bytes(t.ACT_TWO_LEN))


class RawSocketHandshakeServer:
    """Ceiling (g): the server side of the handshake on bare non-blocking sockets, with
    no asyncio transport or protocol: accept, read act one, the sans-IO responder, send
    act two, close on the peer's EOF. TCP_DEFER_ACCEPT has the kernel hand over a
    connection only once act one has arrived, so it is mostly read at once. No slots,
    no deadline, no metrics: what a handshake stage that left asyncio's transports
    could reach at best, for comparison with (b)+(f)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keys: t._ResponderKeys):
        self.loop, self.keys = loop, keys
        self.pending: dict[socket.socket, bytearray] = {}
        self.open: set[socket.socket] = set()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        listener.bind((HOST, 0))
        listener.listen(1024)
        listener.setblocking(False)
        self.listener = listener
        self.port = listener.getsockname()[1]
        loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            self.open.add(sock)
            self.pending[sock] = bytearray()
            self._read_act_one(sock, registered=False)

    def _read_act_one(self, sock: socket.socket, registered: bool = True) -> None:
        buf = self.pending[sock]
        try:
            data = sock.recv(t.ACT_ONE_LEN - len(buf))
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data is None or (data and len(buf) + len(data) < t.ACT_ONE_LEN):
            # Act one is not all here yet: wait for the rest.
            if data:
                buf += data
            if not registered:
                self.loop.add_reader(sock.fileno(), self._read_act_one, sock)
            return
        if registered:
            self.loop.remove_reader(sock.fileno())
        if not data:
            self._close(sock)
            return
        buf += data
        del self.pending[sock]
        handshake = t.ResponderHandshake._with_keys(self.keys)
        try:
            handshake.read_act_one(bytes(buf))
            act_two, _ = handshake.act_two()
            sock.send(act_two)
        except (t.TransportError, OSError):
            self._close(sock)
            return
        self.loop.add_reader(sock.fileno(), self._until_eof, sock)

    def _until_eof(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(sock.fileno())
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        self.pending.pop(sock, None)
        self.open.discard(sock)
        sock.close()

    def close(self) -> None:
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for sock in list(self.open):
            self.loop.remove_reader(sock.fileno())
            self._close(sock)


class PlainEchoServer(asyncio.Protocol):
    """u16_be(len) + payload frames, echoed back in one write; no crypto at all."""

    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data):
        self.buf += data
        for frame in take_plain_frames(self.buf):
            self.transport.write(frame)


def make_mtls_files(directory: Path) -> dict[str, str]:
    """A CA, a server and a client certificate (P-256 ECDSA), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool, usage=None):
        builder = (x509.CertificateBuilder().subject_name(name(subject))
                   .issuer_name(name(issuer)).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = (builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                       .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]),
                                      critical=False))
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, data: bytes) -> str:
        path.write_bytes(data)
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("revault-bench-ca", ca_key, "revault-bench-ca", ca_key, ca=True)
    files = {"ca": write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))}
    for role, usage in (("server", x509.oid.ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(f"revault-bench-{role}", key, "revault-bench-ca", ca_key,
                           ca=False, usage=usage)
        files[f"{role}_cert"] = write(directory / f"{role}.pem",
                                      cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"] = write(directory / f"{role}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return files


def mtls_context(files: dict[str, str], side: str) -> ssl.SSLContext:
    """TLS 1.3 only, each side presenting its certificate and verifying the other's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server"
                             else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(files[f"{side}_cert"], files[f"{side}_key"])
    context.load_verify_locations(files["ca"])
    context.verify_mode = ssl.CERT_REQUIRED
    return context


# ------------------------------------------------------------------------------ client side

class PlainConnection(asyncio.Protocol):
    """Client counterpart of PlainEchoServer with NoiseConnection's shape (queue + waiter),
    so that the two clients differ by the crypto and little else."""

    def __init__(self):
        self.buf = bytearray()
        self.messages: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        frames = take_plain_frames(self.buf)
        if frames:
            self.messages.extend(frame[2:] for frame in frames)
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    def connection_lost(self, exc):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    async def send(self, payload: bytes) -> None:
        self.transport.write(struct.pack(">H", len(payload)) + payload)

    async def recv(self) -> bytes:
        while not self.messages:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        return self.messages.popleft()

    async def close(self) -> None:
        self.transport.close()


async def client_round_trips(p: dict) -> dict:
    loop = asyncio.get_running_loop()
    payload = os.urandom(p["size"])
    conns = []
    for i in range(p["connections"]):
        if p["kind"] == "noise":
            conns.append(await t.connect(HOST, p["port"], bytes.fromhex(p["client_key"]),
                                         bytes.fromhex(p["server_public"])))
        elif p["kind"] == "mtls":
            _, proto = await loop.create_connection(
                PlainConnection, HOST, p["port"], ssl=mtls_context(p["tls"], "client"),
                server_hostname="revault-bench-server")
            conns.append(proto)
        else:
            _, proto = await loop.create_connection(PlainConnection, HOST, p["port"])
            conns.append(proto)
    state = {"measuring": False, "stop": False, "count": 0}

    async def worker(conn):
        while not state["stop"]:
            await conn.send(payload)
            reply = await conn.recv()
            if len(reply) != len(payload):
                raise RuntimeError("short echo")
            if state["measuring"]:
                state["count"] += 1

    tasks = [asyncio.create_task(worker(c)) for c in conns]
    count, elapsed = await measure_window(p, state)
    await asyncio.gather(*tasks)
    for c in conns:
        await c.close()
    return {"count": count, "elapsed": elapsed}


async def measure_window(p: dict, state: dict) -> tuple[int, float]:
    """Warm up, then count for p["duration"]; tells the server the window's edges on stdout
    so that it can sample its own CPU time over exactly that window."""
    await asyncio.sleep(p["warmup"])
    print("start", flush=True)
    state["measuring"] = True
    started = time.perf_counter()
    await asyncio.sleep(p["duration"])
    count, elapsed = state["count"], time.perf_counter() - started
    state["measuring"] = False
    print("end", flush=True)
    state["stop"] = True
    return count, elapsed


async def client_handshakes(p: dict) -> dict:
    server_public = bytes.fromhex(p["server_public"])
    client_key = bytes.fromhex(p["client_key"])
    full = p["kind"] == "full"
    acts = [t.InitiatorHandshake(client_key, server_public).act_one() for _ in range(256)]
    state = {"measuring": False, "stop": False, "count": 0, "i": 0}

    async def raw_probe():
        reader, writer = await asyncio.open_connection(HOST, p["port"])
        state["i"] += 1
        writer.write(acts[state["i"] % len(acts)])
        await reader.readexactly(t.ACT_TWO_LEN)
        writer.close()

    async def full_probe():
        conn = await t.connect(HOST, p["port"], client_key, server_public)
        await conn.close()

    tls = mtls_context(p["tls"], "client") if p["kind"] == "mtls_full" else None

    async def mtls_probe():
        # A full TLS 1.3 handshake each time (no session resumption), both certificates
        # verified; the first application byte shows the server finished its side.
        reader, writer = await asyncio.open_connection(
            HOST, p["port"], ssl=tls, server_hostname="revault-bench-server")
        writer.write(b"\x00\x01x")
        await reader.readexactly(3)
        writer.close()

    probe = mtls_probe if tls is not None else full_probe if full else raw_probe

    async def worker():
        while not state["stop"]:
            await probe()
            if state["measuring"]:
                state["count"] += 1

    tasks = [asyncio.create_task(worker()) for _ in range(p["clients"])]
    count, elapsed = await measure_window(p, state)
    await asyncio.gather(*tasks)
    return {"count": count, "elapsed": elapsed}


def client_main() -> None:
    params = json.loads(sys.stdin.read())
    if params["kind"] in ("raw", "full", "mtls_full"):
        result = asyncio.run(client_handshakes(params))
    else:
        result = asyncio.run(client_round_trips(params))
    print(json.dumps(result))


class Figure:
    """A loopback figure: operations per wall second, and server CPU time per operation,
    over one or more measurement windows."""

    def __init__(self, count: int, elapsed: float, server_cpu: float):
        self.count, self.elapsed, self.server_cpu = count, elapsed, server_cpu
        self.rate = count / elapsed
        self.cpu_us = server_cpu / count * 1e6 if count else float("inf")

    def __add__(self, other: Figure) -> Figure:
        return Figure(self.count + other.count, self.elapsed + other.elapsed,
                      self.server_cpu + other.server_cpu)


async def run_client(params: dict) -> Figure:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    proc.stdin.write(json.dumps(params).encode())
    proc.stdin.close()
    bound = params["warmup"] + params["duration"] + 120

    async def window() -> tuple[float, dict]:
        assert (await proc.stdout.readline()).strip() == b"start"
        cpu = time.process_time()
        assert (await proc.stdout.readline()).strip() == b"end"
        cpu = time.process_time() - cpu
        return cpu, json.loads(await proc.stdout.read())

    try:
        server_cpu, result = await asyncio.wait_for(window(), bound)
        await asyncio.wait_for(proc.wait(), bound)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"client process failed ({params['kind']})")
    return Figure(result["count"], result["elapsed"], server_cpu)


# ------------------------------------------------------------------------------ report

def fmt_rate(x: float) -> str:
    return f"{x:>12,.0f}"


def print_echo_ceilings(name: str, figures: dict[tuple[int, int], Figure]) -> None:
    """One line per connection count and payload size of an echo ceiling."""
    for conns in CONNECTIONS:
        for label, size in SIZES:
            fig = figures[conns, size]
            print(f"  {f'{name} {conns} conn, {label}':<38}{fmt_rate(fig.rate)} rt/s"
                  f"  server {fig.cpu_us:6.1f} us CPU per rt")


def row(name: str, fig: Figure, unit: str, ceilings: list[tuple[str, float, float]]) -> str:
    """Wall rate and its ratio to each ceiling's rate; then server CPU per operation and the
    ratio of the ceiling's CPU per operation to it (1.00 = the server is as cheap as the
    ceiling). Each ceiling is (label, rate, CPU microseconds per operation)."""
    walls = "  ".join(f"{label} {fig.rate / rate:5.2f}" for label, rate, _ in ceilings)
    cpus = "  ".join(f"{label} {us / fig.cpu_us:5.2f}" for label, _, us in ceilings)
    return (f"  {name:<34}{fmt_rate(fig.rate)} {unit:<5} {walls}  |"
            f" {fig.cpu_us:8.1f} us  {cpus}")


async def main(quick: bool) -> None:
    # Each figure is measured in `rounds` windows, the figures compared with one another
    # taking turns window by window: a change in the machine's other load (2 cores, the
    # client on one of them) then moves all of them alike, not one figure alone.
    # On this kind of machine one window can run at half the rate of the next: many
    # short windows average that out.
    rounds = 1 if quick else 6
    duration = 0.4 if quick else 0.5
    warmup = 0.2
    prim_duration = 0.3 if quick else 2.0
    server_key, client_key = os.urandom(32), os.urandom(32)
    server_public = t.public_key(server_key)
    # A realistic deployment knows a handful of peers; the bench client is the first one.
    peers = [t.public_key(client_key)] + [t.public_key(os.urandom(32)) for _ in range(7)]

    print(f"revault.transport bench ({'quick' if quick else 'full'}): {os.cpu_count()} CPUs, "
          f"loopback, load from a separate client process, {rounds} x {duration:g} s per "
          f"figure taking turns, "
          f"server knows {len(peers)} peers")
    x = ceiling_x25519(prim_duration)
    sans_io = ceiling_sans_io_handshake(prim_duration, server_key, client_key, peers)
    codec = {size: ceiling_codec(prim_duration, size) for _, size in SIZES}

    # One client key opens every connection: lift the per-key share for the ceiling.
    limits = t.ServerLimits(max_connections=4096, max_connections_per_peer=4096)
    noise = await t.start_server(HOST, 0, server_key, peers, noise_echo, limits)
    loop = asyncio.get_running_loop()
    plain = await loop.create_server(PlainEchoServer, HOST, 0)
    plain_port = plain.sockets[0].getsockname()[1]
    shaped = await loop.create_server(HandshakeShapedServer, HOST, 0, backlog=1024)
    shaped_port = shaped.sockets[0].getsockname()[1]
    bare = RawSocketHandshakeServer(loop, responder_keys(server_key, peers))
    tls_dir = tempfile.TemporaryDirectory(prefix="revault-bench-tls-")
    tls_files = make_mtls_files(Path(tls_dir.name))
    mtls = await loop.create_server(PlainEchoServer, HOST, 0,
                                    ssl=mtls_context(tls_files, "server"), backlog=1024)
    mtls_port = mtls.sockets[0].getsockname()[1]
    common = {"server_public": server_public.hex(), "client_key": client_key.hex(),
              "duration": duration, "warmup": warmup, "tls": tls_files}
    async def taking_turns(jobs: list[dict]) -> list[Figure]:
        figures: list[Figure | None] = [None] * len(jobs)
        for _ in range(rounds):
            for i, job in enumerate(jobs):
                figure = await run_client({**common, **job})
                figures[i] = figure if figures[i] is None else figures[i] + figure
        return figures

    try:
        raw_hs, shaped_hs, bare_hs, full_hs, mtls_hs = await taking_turns([
            {"kind": "raw", "port": noise.port, "clients": HANDSHAKE_CLIENTS},
            {"kind": "raw", "port": shaped_port, "clients": HANDSHAKE_CLIENTS},
            {"kind": "raw", "port": bare.port, "clients": HANDSHAKE_CLIENTS},
            {"kind": "full", "port": noise.port, "clients": HANDSHAKE_CLIENTS},
            {"kind": "mtls_full", "port": mtls_port, "clients": HANDSHAKE_CLIENTS}])
        noise_rtt, plain_rtt, mtls_rtt = {}, {}, {}
        for conns in CONNECTIONS:
            for _, size in SIZES:
                shape = {"connections": conns, "size": size}
                (noise_rtt[conns, size], plain_rtt[conns, size],
                 mtls_rtt[conns, size]) = await taking_turns([
                    {"kind": "noise", "port": noise.port, **shape},
                    {"kind": "plain", "port": plain_port, **shape},
                    {"kind": "mtls", "port": mtls_port, **shape}])
    finally:
        await noise.close()
        bare.close()
        plain.close()
        shaped.close()
        mtls.close()
        await plain.wait_closed()
        await shaped.wait_closed()
        await mtls.wait_closed()
        tls_dir.cleanup()

    print()
    print("ceilings (in-process ones per CPU-second of one core)")
    print(f"  {'X25519 DH (exchange)':<38}{fmt_rate(x['dh'])} /s")
    print(f"  {'X25519 key generation':<38}{fmt_rate(x['keygen'])} /s")
    print(f"  {'(a) X25519 bound on handshakes':<38}{fmt_rate(x['handshakes'])} /s    "
          f"({SERVER_DH_PER_HANDSHAKE} DH + {SERVER_KEYGEN_PER_HANDSHAKE} keygen each)")
    print(f"  {'(b) sans-IO responder handshake':<38}{fmt_rate(sans_io)} /s")
    floor_us = shaped_hs.cpu_us
    with_floor = 1e6 / (1e6 / x["handshakes"] + floor_us)
    print(f"  {'(f) asyncio accept+67 B+48 B+close':<38}{fmt_rate(shaped_hs.rate)} /s  "
          f"  server {floor_us:6.1f} us CPU each, no crypto")
    print(f"  {'    (a)+(f): X25519 in this loop':<38}{fmt_rate(with_floor)} /s    "
          f"= {with_floor / x['handshakes']:.2f} x (a)")
    sans_io_with_floor = 1e6 / (1e6 / sans_io + floor_us)
    print(f"  {'    (b)+(f): this handshake in this loop':<38}{fmt_rate(sans_io_with_floor)} /s"
          f"    = {sans_io_with_floor / x['handshakes']:.2f} x (a)")
    print(f"  {'(g) bare sockets: (b), no transport':<38}{fmt_rate(bare_hs.rate)} /s  "
          f"  server {bare_hs.cpu_us:6.1f} us CPU each = {1e6 / bare_hs.cpu_us / x['handshakes']:.2f}"
          f" x (a) per CPU-second")
    for label, size in SIZES:
        print(f"  {'(c) FrameCodec round trip ' + label:<38}{fmt_rate(codec[size])} rt/s"
              f"    (both ends' crypto)")
    print_echo_ceilings("(d) plain TCP echo", plain_rtt)
    print("peer baseline: mutually authenticated TLS 1.3, P-256 (Python ssl)")
    print(f"  {f'(e) mTLS connect+handshake+close':<38}{fmt_rate(mtls_hs.rate)} /s  "
          f"  server {mtls_hs.cpu_us:6.1f} us CPU each")
    print_echo_ceilings("(e) mTLS echo", mtls_rtt)

    print()
    print(f"  {'':<34}{'wall rate':>12} {'':<5} {'wall rate / ceiling':<24}|"
          f" {'server CPU/op':>11}  ceiling CPU/op / server CPU/op")
    print("server-side handshakes (ceilings a, b; a+f, b+f; g)")
    hs_ceilings = [("/a", x["handshakes"], 1e6 / x["handshakes"]),
                   ("/b", sans_io, 1e6 / sans_io),
                   ("/af", with_floor, 1e6 / with_floor),
                   ("/bf", sans_io_with_floor, 1e6 / sans_io_with_floor),
                   ("/g", bare_hs.rate, bare_hs.cpu_us)]
    print(row(f"act one/act two, {HANDSHAKE_CLIENTS} clients", raw_hs, "/s", hs_ceilings))
    print(row(f"connect()+close, {HANDSHAKE_CLIENTS} clients", full_hs, "/s",
              hs_ceilings + [("/e", mtls_hs.rate, mtls_hs.cpu_us)]))
    print("request round trips, echo handler (ceilings c, d, d+c; peer baseline e)")
    for conns in CONNECTIONS:
        for label, size in SIZES:
            plain_fig, mtls_fig = plain_rtt[conns, size], mtls_rtt[conns, size]
            # d+c: the plain echo had it also done the server's half of (c)'s crypto (one
            # feed, one seal): the best this framing allows over this event loop.
            crypto_us = 1e6 / codec[size] / 2
            framed_us = plain_fig.cpu_us + crypto_us
            print(row(f"{conns} conn, {label}", noise_rtt[conns, size], "rt/s",
                      [("/c", codec[size], 1e6 / codec[size]),
                       ("/d", plain_fig.rate, plain_fig.cpu_us),
                       ("/dc", plain_fig.rate * plain_fig.cpu_us / framed_us, framed_us),
                       ("/e", mtls_fig.rate, mtls_fig.cpu_us)]))
    print()
    print("Clients run in a separate process; on a machine with other load the wall rates")
    print("move a lot, the server CPU per operation much less. A server round trip does half")
    print("of ceiling (c)'s crypto (one feed, one seal), so its CPU ratio to (c) can reach 2.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main()
    else:
        asyncio.run(main(args.quick))
