from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import time
from pathlib import Path

import pytest

from revault import transport as t
from revault.transport import (
    ACT_ONE_LEN, ACT_TWO_LEN, MAX_PLAINTEXT, ConnectionClosed, FrameCodec,
    InitiatorHandshake, ResponderHandshake, ServerLimits, TransportError, connect,
    public_key, start_server,
)

# A copy of shared/vectors/noise-kk.json (cacophony), so the test needs nothing outside the repo.
VECTORS = Path(__file__).parent / "vectors" / "noise-kk.json"
HOST = "127.0.0.1"
BOUND = 5.0   # upper bound for anything that should happen "at once"

SERVER = bytes(range(1, 33))
ALICE = bytes(range(33, 65))
BOB = bytes(range(65, 97))
CAROL = bytes(range(97, 129))
MALLORY = bytes(range(129, 161))
SERVER_PUB = public_key(SERVER)
PEERS = [public_key(k) for k in (ALICE, BOB, CAROL)]
SECRETS_HEX = [k.hex() for k in (SERVER, ALICE, BOB, CAROL, MALLORY)]


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def codec_pair() -> tuple[FrameCodec, FrameCodec]:
    ini = InitiatorHandshake(ALICE, SERVER_PUB)
    resp = ResponderHandshake(SERVER, PEERS)
    assert resp.read_act_one(ini.act_one()) == public_key(ALICE)
    act_two, server_codec = resp.act_two()
    return ini.read_act_two(act_two), server_codec


async def wait_until(predicate, bound: float = BOUND) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


async def echo(conn):
    while True:
        await conn.send(await conn.recv())


@contextlib.asynccontextmanager
async def running(handler=echo, limits: ServerLimits | None = None, peers=PEERS):
    server = await start_server(HOST, 0, SERVER, peers, handler, limits or ServerLimits())
    try:
        yield server
    finally:
        await server.close()


async def raw_session(port: int, local: bytes = ALICE):
    """A handshake done by hand, leaving the test in control of every byte sent."""
    reader, writer = await asyncio.open_connection(HOST, port)
    ini = InitiatorHandshake(local, SERVER_PUB)
    writer.write(ini.act_one())
    act_two = await asyncio.wait_for(reader.readexactly(ACT_TWO_LEN), BOUND)
    return reader, writer, ini.read_act_two(act_two)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), BOUND)
    except ConnectionResetError:
        return b""


async def round_trip(conn, message: bytes) -> None:
    await conn.send(message)
    assert await conn.recv(timeout=BOUND) == message


async def read_frame(reader, codec: FrameCodec, size: int) -> bytes:
    data = await asyncio.wait_for(reader.readexactly(18 + size + 16), BOUND)
    [message] = codec.feed(data)
    return message


# ---------------------------------------------------------------- sans-IO: handshake

def _vectors():
    return json.loads(VECTORS.read_text())["vectors"]


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["protocol_name"])
def test_cacophony_vectors(vector):
    h = bytes.fromhex
    assert vector["protocol_name"] == t.PROTOCOL_NAME.decode()
    assert public_key(h(vector["init_static"])) == h(vector["resp_remote_static"])
    ini = InitiatorHandshake._for_testing(
        h(vector["init_static"]), h(vector["init_remote_static"]),
        prologue=h(vector["init_prologue"]), ephemeral_private=h(vector["init_ephemeral"]))
    # A decoy key ahead of the real one: the responder must skip it.
    resp = ResponderHandshake._for_testing(
        h(vector["resp_static"]), [public_key(MALLORY), h(vector["resp_remote_static"])],
        prologue=h(vector["resp_prologue"]), ephemeral_private=h(vector["resp_ephemeral"]))
    msgs = vector["messages"]

    m0 = ini._write_act_one(h(msgs[0]["payload"]))
    assert m0.hex() == msgs[0]["ciphertext"]
    peer, payload = resp._read_act_one(m0)
    assert peer == h(vector["resp_remote_static"])
    assert payload == h(msgs[0]["payload"])

    m1, resp_codec = resp._write_act_two(h(msgs[1]["payload"]))
    assert m1.hex() == msgs[1]["ciphertext"]
    payload, ini_codec = ini._read_act_two(m1)
    assert payload == h(msgs[1]["payload"])

    assert ini._handshake_hash.hex() == vector["handshake_hash"]
    assert resp._handshake_hash.hex() == vector["handshake_hash"]

    for i, msg in enumerate(msgs[2:], start=2):
        sender, receiver = (ini_codec, resp_codec) if i % 2 == 0 else (resp_codec, ini_codec)
        ciphertext = sender._encrypt_message(h(msg["payload"]))
        assert ciphertext.hex() == msg["ciphertext"]
        assert receiver._decrypt_message(ciphertext) == h(msg["payload"])


def test_hmac_is_the_standard_one():
    import hmac
    rng = random.Random(7)
    for size in (0, 1, 32, 33, 64, 65, 200):
        key, data = rng.randbytes(32), rng.randbytes(size)
        assert t._hmac_sha256(key, data) == hmac.digest(key, data, "sha256")


def _noise_library(initiator: bool, local: bytes, remote_public: bytes):
    """The `noiseprotocol` package's own KK state machine, as an independent peer."""
    from noise.connection import Keypair, NoiseConnection as LibraryConnection

    conn = LibraryConnection.from_name(t.PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, local)
    conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_public)
    conn.start_handshake()
    return conn


def _library_frame(library, plaintext: bytes) -> bytes:
    return library.encrypt(u16(len(plaintext) + 16)) + library.encrypt(plaintext)


def _library_unframe(library, frame: bytes) -> bytes:
    assert library.decrypt(frame[:18]) == u16(len(frame) - 18)
    return library.decrypt(frame[18:])


def test_interop_with_noiseprotocol_as_responder():
    library = _noise_library(False, SERVER, public_key(ALICE))
    ini = InitiatorHandshake(ALICE, SERVER_PUB)
    assert library.read_message(ini.act_one()) == b"practical_revault_0"
    codec = ini.read_act_two(library.write_message(b""))
    assert library.handshake_finished
    assert ini._handshake_hash == library.get_handshake_hash()
    for size in (0, 1, 100, MAX_PLAINTEXT):
        message = random.Random(size).randbytes(size)
        assert _library_unframe(library, codec.encrypt(message)) == message
        assert codec.feed(_library_frame(library, message[::-1])) == [message[::-1]]


def test_interop_with_noiseprotocol_as_initiator():
    library = _noise_library(True, BOB, SERVER_PUB)
    resp = ResponderHandshake(SERVER, PEERS)   # BOB is second: the first candidate fails
    assert resp.read_act_one(library.write_message(b"practical_revault_0")) == public_key(BOB)
    act_two, codec = resp.act_two()
    assert library.read_message(act_two) == b""
    assert library.handshake_finished
    assert resp._handshake_hash == library.get_handshake_hash()
    for size in (0, 1, 100, MAX_PLAINTEXT):
        message = random.Random(size).randbytes(size)
        assert codec.feed(_library_frame(library, message)) == [message]
        assert _library_unframe(library, codec.encrypt(message[::-1])) == message[::-1]



def test_handshake_sizes_and_peer_identified_among_several():
    for local in (ALICE, BOB, CAROL):
        ini = InitiatorHandshake(local, SERVER_PUB)
        resp = ResponderHandshake(SERVER, PEERS)
        act_one = ini.act_one()
        assert len(act_one) == ACT_ONE_LEN == 67
        assert resp.read_act_one(act_one) == public_key(local)
        act_two, server_codec = resp.act_two()
        assert len(act_two) == ACT_TWO_LEN == 48
        client_codec = ini.read_act_two(act_two)
        assert ini._handshake_hash == resp._handshake_hash
        assert server_codec.feed(client_codec.encrypt(b"hello")) == [b"hello"]
        assert client_codec.feed(server_codec.encrypt(b"world")) == [b"world"]


def test_ephemeral_keys_are_fresh():
    first = InitiatorHandshake(ALICE, SERVER_PUB).act_one()
    second = InitiatorHandshake(ALICE, SERVER_PUB).act_one()
    assert first[:32] != second[:32]


def test_unknown_static_key_refused():
    resp = ResponderHandshake(SERVER, PEERS)
    with pytest.raises(TransportError, match="no known peer"):
        resp.read_act_one(InitiatorHandshake(MALLORY, SERVER_PUB).act_one())
    with pytest.raises(TransportError):
        resp.act_two()


def test_act_one_for_another_responder_refused():
    other = public_key(MALLORY)
    with pytest.raises(TransportError):
        ResponderHandshake(SERVER, PEERS).read_act_one(InitiatorHandshake(ALICE, other).act_one())


def test_wrong_act_one_payload_refused():
    ini = InitiatorHandshake(ALICE, SERVER_PUB)
    act_one = ini._write_act_one(b"practical_revault_1")
    assert len(act_one) == ACT_ONE_LEN
    resp = ResponderHandshake(SERVER, PEERS)
    with pytest.raises(TransportError, match="payload"):
        resp.read_act_one(act_one)
    with pytest.raises(TransportError):
        resp.act_two()


@pytest.mark.parametrize("size", [0, 66, 68, 200])
def test_act_one_wrong_length_refused(size):
    act_one = InitiatorHandshake(ALICE, SERVER_PUB).act_one()
    data = (act_one * 4)[:size]
    with pytest.raises(TransportError):
        ResponderHandshake(SERVER, PEERS).read_act_one(data)


def test_tampered_act_one_refused():
    act_one = bytearray(InitiatorHandshake(ALICE, SERVER_PUB).act_one())
    act_one[40] ^= 1
    with pytest.raises(TransportError):
        ResponderHandshake(SERVER, PEERS).read_act_one(bytes(act_one))


def test_low_order_ephemeral_is_a_transport_error():
    act_one = bytes(32) + InitiatorHandshake(ALICE, SERVER_PUB).act_one()[32:]
    with pytest.raises(TransportError):
        ResponderHandshake(SERVER, PEERS).read_act_one(act_one)


def test_bad_act_two_refused():
    for mutate in (lambda b: b[:47], lambda b: b + b"\0", lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],
                   lambda b: b[:47] + bytes([b[47] ^ 1])):
        ini = InitiatorHandshake(ALICE, SERVER_PUB)
        resp = ResponderHandshake(SERVER, PEERS)
        resp.read_act_one(ini.act_one())
        act_two, _ = resp.act_two()
        with pytest.raises(TransportError):
            ini.read_act_two(mutate(act_two))


def test_key_arguments_checked_without_echoing_them():
    with pytest.raises(ValueError) as info:
        InitiatorHandshake(ALICE[:31], SERVER_PUB)
    assert ALICE[:31].hex() not in str(info.value)
    with pytest.raises(ValueError):
        ResponderHandshake(SERVER, [b"short"])


# ---------------------------------------------------------------- sans-IO: frames

@pytest.mark.parametrize("size", [0, 1, 100, MAX_PLAINTEXT])
def test_frame_round_trip(size):
    client, server = codec_pair()
    payload = bytes(random.Random(size).randbytes(size))
    frame = client.encrypt(payload)
    assert isinstance(frame, bytes)
    assert len(frame) == 18 + size + 16
    assert server.feed(frame) == [payload]
    assert client.feed(server.encrypt(payload)) == [payload]


def test_encrypt_refuses_oversize_without_spending_a_nonce():
    client, server = codec_pair()
    with pytest.raises(TransportError):
        client.encrypt(bytes(MAX_PLAINTEXT + 1))
    assert server.feed(client.encrypt(b"still in step")) == [b"still in step"]


def test_feed_arbitrary_chunking_and_bounded_buffer():
    client, server = codec_pair()
    rng = random.Random(7)
    payloads = [rng.randbytes(n) for n in (0, 1, 5, 1000, MAX_PLAINTEXT, 17, MAX_PLAINTEXT, 0)]
    stream = b"".join(client.encrypt(p) for p in payloads)
    got = []
    # byte by byte through the first two frames, then random chunks, then one big chunk
    split_a = 2 * 34 + 1 + 2
    for i in range(split_a):
        got += server.feed(stream[i:i + 1])
        assert server._buffered < t.MAX_FRAME_LEN
    pos = split_a
    while pos < len(stream) // 2:
        step = rng.randint(1, 70000)
        got += server.feed(stream[pos:pos + step])
        assert server._buffered <= t.MAX_BODY_LEN
        pos += step
    got += server.feed(stream[pos:])
    assert server._buffered == 0
    assert got == payloads


def test_truncated_frame_is_an_error():
    client, server = codec_pair()
    frame = client.encrypt(b"x" * 100)
    assert server.feed(frame[:-5]) == []
    # The next frame's bytes complete the short body: authentication must fail.
    with pytest.raises(TransportError):
        server.feed(client.encrypt(b"next"))


@pytest.mark.parametrize("length", [t.MAX_BODY_LEN + 1, 0xFFFF, t.MIN_BODY_LEN - 1, 0])
def test_bad_length_header_is_an_error(length):
    client, server = codec_pair()
    header = client._encrypt_message(u16(length))
    with pytest.raises(TransportError, match="length"):
        server.feed(header)
    with pytest.raises(TransportError):
        server.feed(client.encrypt(b"anything"))


def test_boundary_lengths_accepted():
    for length in (t.MIN_BODY_LEN, t.MAX_BODY_LEN):
        client, server = codec_pair()
        header = client._encrypt_message(u16(length))
        body = client._encrypt_message(bytes(length - 16))
        assert server.feed(header) == []
        assert server.feed(body) == [bytes(length - 16)]


@pytest.mark.parametrize("offset", [0, 17, 18, 30, -1])
def test_tampered_frame_is_an_error(offset):
    client, server = codec_pair()
    frame = bytearray(client.encrypt(b"y" * 40))
    frame[offset] ^= 0x80
    with pytest.raises(TransportError):
        server.feed(bytes(frame))


def test_replayed_frame_is_an_error():
    client, server = codec_pair()
    frame = client.encrypt(b"pay me once")
    assert server.feed(frame) == [b"pay me once"]
    with pytest.raises(TransportError):
        server.feed(frame)


def test_reordered_frames_are_an_error():
    client, server = codec_pair()
    first, second = client.encrypt(b"1"), client.encrypt(b"2")
    with pytest.raises(TransportError):
        server.feed(second + first)


def test_failure_is_final():
    client, server = codec_pair()
    with pytest.raises(TransportError):
        server.feed(b"\0" * 18)
    with pytest.raises(TransportError):
        server.feed(client.encrypt(b"good"))


def test_frames_from_other_direction_refused():
    client, server = codec_pair()
    with pytest.raises(TransportError):
        client.feed(client.encrypt(b"reflected"))


# ---------------------------------------------------------------- asyncio: happy paths

async def test_many_requests_on_one_connection():
    async with running() as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        assert conn.peer_public == SERVER_PUB
        for i in range(300):
            message = str(i).encode() * (i % 7)
            await conn.send(message)
            assert await conn.recv(timeout=BOUND) == message
        # pipelined
        messages = [bytes([i % 256]) * i for i in range(200)]
        for m in messages:
            await conn.send(m)
        assert [await conn.recv(timeout=BOUND) for _ in messages] == messages
        for size in (0, 1, 1024, MAX_PLAINTEXT):
            await conn.send(b"z" * size)
            assert await conn.recv(timeout=BOUND) == b"z" * size
        await conn.close()
        assert conn.closed


async def test_server_sees_which_peer_connected():
    async def whoami(conn):
        await conn.recv()
        await conn.send(conn.peer_public)

    async with running(whoami) as server:
        for local in (CAROL, ALICE, BOB):
            conn = await connect(HOST, server.port, local, SERVER_PUB)
            await conn.send(b"?")
            assert await conn.recv(timeout=BOUND) == public_key(local)
            await conn.close()


async def test_concurrent_senders_keep_frames_whole():
    async with running() as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        sent = [f"{i}:".encode() + bytes(i * 97 % 5000) for i in range(100)]
        await asyncio.gather(*(conn.send(m) for m in sent))
        got = [await conn.recv(timeout=BOUND) for _ in sent]
        assert sorted(got) == sorted(sent)
        await conn.close()


async def test_send_too_large_leaves_connection_usable():
    async with running() as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        with pytest.raises(TransportError):
            await conn.send(bytes(MAX_PLAINTEXT + 1))
        await conn.send(b"fine")
        assert await conn.recv(timeout=BOUND) == b"fine"
        await conn.close()


async def test_backpressure_pauses_and_resumes_without_loss():
    release = asyncio.Event()
    count = []

    async def slow_reader(conn):
        await release.wait()
        total = 0
        for _ in range(60):
            total += len(await conn.recv())
        count.append(total)
        await conn.send(str(total).encode())

    async with running(slow_reader) as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        chunk = bytes(60 * 1024)
        sender = asyncio.create_task(_send_all(conn, [chunk] * 60))
        # The server stops reading once it holds over a MiB it was not asked for.
        await wait_until(lambda: any(
            p._conn is not None and p._conn._reading_paused for p in server._protocols))
        queued = max(p._conn._queued for p in server._protocols if p._conn is not None)
        assert queued <= t._READ_HIGH + 300 * 1024
        # Reads are at most _READ_CHUNK long: one read past the mark is all it can hold.
        assert queued <= t._READ_HIGH + t._READ_CHUNK + 2 * t._MESSAGE_OVERHEAD
        release.set()
        await asyncio.wait_for(sender, BOUND)
        assert await conn.recv(timeout=BOUND) == str(60 * len(chunk)).encode()
        assert count == [60 * len(chunk)]
        await conn.close()


async def _send_all(conn, messages):
    for m in messages:
        await conn.send(m)


async def test_handler_return_closes_connection():
    async def one_shot(conn):
        await conn.send(b"bye")

    async with running(one_shot) as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        await conn.send(b"hello")  # the handler starts with the peer's first frame
        assert await conn.recv(timeout=BOUND) == b"bye"
        with pytest.raises(ConnectionClosed):
            await conn.recv(timeout=BOUND)
        assert conn.closed
        with pytest.raises(ConnectionClosed):
            await conn.send(b"anyone?")
        await wait_until(lambda: server.connection_count == 0)


async def test_explicit_recv_timeout_keeps_connection():
    async def patient(conn):
        assert await conn.recv() == b"hello"
        with pytest.raises(asyncio.TimeoutError):
            await conn.recv(timeout=0.05)
        await conn.send(b"still here")
        await echo(conn)

    async with running(patient) as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        await conn.send(b"hello")
        assert await conn.recv(timeout=BOUND) == b"still here"
        await conn.send(b"ping")
        assert await conn.recv(timeout=BOUND) == b"ping"
        with pytest.raises(asyncio.TimeoutError):
            await conn.recv(timeout=0.01)
        assert not conn.closed
        await conn.close()


# ---------------------------------------------------------------- asyncio: refusals

async def test_unknown_static_key_gets_no_reply_bytes():
    started = []

    async def handler(conn):
        started.append(conn.peer_public)

    async with running(handler) as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(InitiatorHandshake(MALLORY, SERVER_PUB).act_one())
        assert await read_to_eof(reader) == b""
        writer.close()
        with pytest.raises(ConnectionClosed):
            await connect(HOST, server.port, MALLORY, SERVER_PUB, timeout=BOUND)
        await wait_until(lambda: server.connection_count == 0)
    assert started == []


async def test_wrong_act_one_payload_closes_connection():
    async with running() as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(InitiatorHandshake(ALICE, SERVER_PUB)._write_act_one(b"practical_revault_9"))
        assert await read_to_eof(reader) == b""
        writer.close()


def _bad_frames(codec: FrameCodec):
    def truncated():
        return codec.encrypt(b"t" * 100)[:-5] + codec.encrypt(b"next")

    def too_long():
        return codec._encrypt_message(u16(t.MAX_BODY_LEN + 1))

    def too_short():
        return codec._encrypt_message(u16(t.MIN_BODY_LEN - 1))

    def tampered():
        frame = bytearray(codec.encrypt(b"u" * 50))
        frame[25] ^= 1
        return bytes(frame)

    return {"truncated": truncated, "too_long": too_long, "too_short": too_short,
            "tampered": tampered}


@pytest.mark.parametrize("kind", ["truncated", "too_long", "too_short", "tampered", "replayed"])
async def test_bad_frame_makes_server_close(kind):
    outcome = []

    async def handler(conn):
        try:
            await echo(conn)
        except ConnectionClosed as e:
            outcome.append(str(e))
            raise

    async with running(handler) as server:
        reader, writer, codec = await raw_session(server.port)
        good = codec.encrypt(b"hello")
        writer.write(good)
        assert await read_frame(reader, codec, 5) == b"hello"
        bad = good if kind == "replayed" else _bad_frames(codec)[kind]()
        writer.write(bad)
        assert await read_to_eof(reader) == b""
        writer.close()
        await wait_until(lambda: outcome and server.connection_count == 0)
        assert "bad frame" in outcome[0]


async def test_client_refuses_bad_act_two():
    async def liar(reader, writer):
        await reader.readexactly(ACT_ONE_LEN)
        writer.write(bytes(range(48)))
        await writer.drain()
        await reader.read()
        writer.close()

    fake = await asyncio.start_server(liar, HOST, 0)
    try:
        port = fake.sockets[0].getsockname()[1]
        with pytest.raises(TransportError):
            await connect(HOST, port, ALICE, SERVER_PUB, timeout=BOUND)
    finally:
        fake.close()
        await fake.wait_closed()


async def test_connect_with_low_order_server_key_fails_fast():
    with pytest.raises(TransportError):
        await connect(HOST, 9, ALICE, bytes(32), timeout=BOUND)


async def test_client_closes_on_bad_frame_from_server():
    async def forger(reader, writer):
        resp = ResponderHandshake(SERVER, PEERS)
        resp.read_act_one(await reader.readexactly(ACT_ONE_LEN))
        act_two, codec = resp.act_two()
        good = codec.encrypt(b"genuine")
        forged = bytearray(codec.encrypt(b"forged"))
        forged[-1] ^= 1
        writer.write(act_two + good + bytes(forged))
        await writer.drain()
        await reader.read()
        writer.close()

    fake = await asyncio.start_server(forger, HOST, 0)
    try:
        port = fake.sockets[0].getsockname()[1]
        conn = await connect(HOST, port, ALICE, SERVER_PUB, timeout=BOUND)
        # Messages authenticated before the failure are delivered; nothing after.
        assert await conn.recv(timeout=BOUND) == b"genuine"
        with pytest.raises(ConnectionClosed, match="bad frame"):
            await conn.recv(timeout=BOUND)
        assert conn.closed
        await conn.close()
    finally:
        fake.close()
        await fake.wait_closed()


# ---------------------------------------------------------------- asyncio: limits

async def test_handshake_timeout_closes_silent_and_partial_connections():
    limits = ServerLimits(handshake_timeout=0.2)
    async with running(limits=limits) as server:
        started = time.monotonic()
        silent = await asyncio.open_connection(HOST, server.port)
        partial = await asyncio.open_connection(HOST, server.port)
        partial[1].write(InitiatorHandshake(ALICE, SERVER_PUB).act_one()[:30])
        assert await read_to_eof(silent[0]) == b""
        assert await read_to_eof(partial[0]) == b""
        assert time.monotonic() - started >= 0.15
        for _, writer in (silent, partial):
            writer.close()
        await wait_until(lambda: server.connection_count == 0)
        # A completed handshake is not subject to it.
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        await conn.send(b"after")
        assert await conn.recv(timeout=BOUND) == b"after"
        await conn.close()


async def test_replayed_act_one_is_closed_at_the_handshake_deadline():
    limits = ServerLimits(handshake_timeout=0.3)
    async with running(limits=limits) as server:
        act_one = InitiatorHandshake(ALICE, SERVER_PUB).act_one()
        replay = await asyncio.open_connection(HOST, server.port)
        replay[1].write(act_one)
        # The server cannot tell a replay from the real thing at act one...
        assert len(await asyncio.wait_for(replay[0].readexactly(ACT_TWO_LEN), BOUND)) == 48
        # ...but no frame of it ever decrypts: closed at the handshake deadline, long
        # before the idle timeout.
        assert await read_to_eof(replay[0]) == b""
        replay[1].close()
        # A peer whose first frame decrypted is past its handshake for good.
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        await round_trip(conn, b"first")
        with pytest.raises(asyncio.TimeoutError):
            await conn.recv(timeout=0.5)     # outlive the deadline
        await round_trip(conn, b"still open")
        await conn.close()


async def test_one_key_cannot_hold_more_than_its_share():
    limits = ServerLimits(max_connections_per_peer=2)
    async with running(limits=limits) as server:
        conns = [await connect(HOST, server.port, ALICE, SERVER_PUB) for _ in range(2)]
        for conn in conns:
            await round_trip(conn, b"in")
        with pytest.raises(ConnectionClosed):
            await connect(HOST, server.port, ALICE, SERVER_PUB, timeout=BOUND)
        other = await connect(HOST, server.port, BOB, SERVER_PUB)
        await round_trip(other, b"bob")
        for conn in [*conns, other]:
            await conn.close()


async def test_peer_that_does_not_read_is_closed_after_write_timeout():
    outcome = []

    async def talker(conn):
        try:
            while True:
                await conn.send(bytes(60_000))
        except ConnectionClosed as e:
            outcome.append(str(e))
            raise

    async with running(talker, ServerLimits(write_timeout=0.3)) as server:
        reader, writer, codec = await raw_session(server.port)
        writer.write(codec.encrypt(b"go"))          # authenticated, then never reads
        await wait_until(lambda: outcome)
        assert outcome == ["peer does not read"]
        await wait_until(lambda: server.connection_count == 0)
        writer.close()


async def test_send_on_a_failed_socket_raises_at_once():
    # asyncio drops writes to a socket that failed (reset by the peer) without a word:
    # a sender with a backlog must learn at its next send.
    class FailedSocket:
        written: list = []

        def is_closing(self) -> bool:
            return True

        def write(self, data) -> None:
            self.written.append(data)

    loop = asyncio.get_running_loop()
    client_codec, _ = codec_pair()
    conn = t.NoiseConnection(FailedSocket(), client_codec, PEERS[0], None, loop,
                             loop.create_future())
    with pytest.raises(ConnectionClosed):
        await conn.send(b"into the void")
    assert FailedSocket.written == []


async def test_half_closed_peer_gets_every_answer_then_close():
    async with running() as server:
        reader, writer, codec = await raw_session(server.port)
        for i in range(3):
            writer.write(codec.encrypt(b"request %d" % i))
        writer.write_eof()
        data = await read_to_eof(reader)
        writer.close()
        assert codec.feed(data) == [b"request 0", b"request 1", b"request 2"]
        await wait_until(lambda: server.connection_count == 0)


async def test_idle_timeout_closes_connection():
    reasons = []

    async def handler(conn):
        try:
            await echo(conn)
        except ConnectionClosed as e:
            reasons.append(str(e))

    async with running(handler, ServerLimits(idle_timeout=0.2)) as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        await conn.send(b"one")
        assert await conn.recv(timeout=BOUND) == b"one"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await conn.recv(timeout=BOUND)
        assert time.monotonic() - started >= 0.15
        assert reasons == ["idle timeout"]
        await wait_until(lambda: server.connection_count == 0)
        await conn.close()


def push_echo(ended: list):
    """A handler in deliver_to mode: echoes each message from the transport's callback,
    records how the connection ended."""

    async def handler(conn):
        done = asyncio.get_running_loop().create_future()

        def ready():
            try:
                while (message := conn.recv_nowait()) is not None:
                    conn.send_nowait(message)
            except ConnectionClosed as e:
                if not done.done():
                    done.set_result(str(e))

        conn.deliver_to(ready)
        ended.append(await done)

    return handler


async def test_deliver_to_pushes_messages_in_order_then_the_end():
    ended = []
    async with running(push_echo(ended)) as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        for i in range(20):
            await conn.send(b"m%d" % i)
        assert [await conn.recv(timeout=BOUND) for _ in range(20)] == [b"m%d" % i
                                                                      for i in range(20)]
        await conn.close()
        await wait_until(lambda: len(ended) == 1)
        assert ended[0] in ("peer closed the connection", "connection lost")
        await wait_until(lambda: server.connection_count == 0)


@pytest.mark.parametrize("delivery", ["recv", "deliver_to"])
async def test_idle_timeout_counts_from_the_last_wait_not_the_first(delivery):
    # One idle timer per connection, re-armed when it fires: traffic spread over several
    # idle periods keeps the connection; silence after it still closes it in time.
    ended = []
    handler = echo if delivery == "recv" else push_echo(ended)
    async with running(handler, ServerLimits(idle_timeout=0.3)) as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        started = time.monotonic()
        while True:
            await conn.send(b"ping")
            assert await conn.recv(timeout=BOUND) == b"ping"
            quiet = time.monotonic()
            if quiet - started >= 1.0:
                break
            await asyncio.sleep(0.1)
        assert ended == []
        with pytest.raises(ConnectionClosed):
            await conn.recv(timeout=BOUND)
        assert 0.25 <= time.monotonic() - quiet < BOUND
        if delivery == "deliver_to":
            await wait_until(lambda: ended == ["idle timeout"])
        await conn.close()


async def test_deliver_to_takes_what_was_queued_before_and_excludes_recv():
    async def handler(conn):
        got = []
        conn.deliver_to(lambda: got.append(conn.recv_nowait()))
        assert got == [b"first"]   # the frame that started the handler
        with pytest.raises(RuntimeError):
            await conn.recv()
        with pytest.raises(RuntimeError):
            conn.deliver_to(lambda: None)
        assert conn.send_nowait(b"seen")

    async with running(handler) as server:
        conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
        await conn.send(b"first")
        assert await conn.recv(timeout=BOUND) == b"seen"
        await conn.close()


async def test_max_connections_counts_handshakes_and_refuses_at_once():
    limits = ServerLimits(max_connections=2, max_handshakes=2, max_handshakes_per_address=2)
    async with running(limits=limits) as server:
        mid_handshake = await asyncio.open_connection(HOST, server.port)
        first = await connect(HOST, server.port, ALICE, SERVER_PUB)
        assert server.connection_count == 2
        reader, writer = await asyncio.open_connection(HOST, server.port)
        # Closed before any handshake work: even a valid act one gets no answer.
        writer.write(InitiatorHandshake(BOB, SERVER_PUB).act_one())
        assert await read_to_eof(reader) == b""
        writer.close()
        with pytest.raises(ConnectionClosed):
            await connect(HOST, server.port, BOB, SERVER_PUB, timeout=BOUND)
        assert server.connection_count == 2
        # The established one still works.
        await first.send(b"ok")
        assert await first.recv(timeout=BOUND) == b"ok"
        mid_handshake[1].close()
        await wait_until(lambda: server.connection_count == 1)
        second = await connect(HOST, server.port, BOB, SERVER_PUB)
        await second.send(b"in")
        assert await second.recv(timeout=BOUND) == b"in"
        await first.close()
        await second.close()


async def test_liveness_probes_are_harmless(caplog):
    caplog.set_level(logging.DEBUG, logger="revault.transport")
    handled = []

    async def handler(conn):
        handled.append(conn.peer_public)
        await echo(conn)

    async with running(handler) as server:
        for _ in range(20):
            conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
            await conn.close()
        for _ in range(5):
            _, writer = await asyncio.open_connection(HOST, server.port)
            writer.close()
        await wait_until(lambda: server.connection_count == 0)
        conn = await connect(HOST, server.port, BOB, SERVER_PUB)
        await conn.send(b"alive")
        assert await conn.recv(timeout=BOUND) == b"alive"
        await conn.close()
    # A handler starts with the peer's first frame: the 20 sessions that only shook
    # hands (as a replayed act one could) never got one.
    assert handled == [public_key(BOB)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_handler_exception_is_isolated_and_logged_without_secrets(caplog):
    caplog.set_level(logging.DEBUG, logger="revault.transport")

    async def fragile(conn):
        while True:
            message = await conn.recv()
            if message == b"boom":
                raise RuntimeError("handler blew up")
            await conn.send(message)

    async with running(fragile) as server:
        a = await connect(HOST, server.port, ALICE, SERVER_PUB)
        b = await connect(HOST, server.port, BOB, SERVER_PUB)
        await a.send(b"boom")
        with pytest.raises(ConnectionClosed):
            await a.recv(timeout=BOUND)
        for i in range(10):
            await b.send(b"%d" % i)
            assert await b.recv(timeout=BOUND) == b"%d" % i
        await b.close()
        await a.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "revault.transport"
    text = "\n".join(caplog.text.splitlines())
    for secret in SECRETS_HEX:
        assert secret not in text


async def test_server_close_closes_everything():
    entered = asyncio.Event()
    cancelled = []

    async def waiting(conn):
        assert await conn.recv() == b"hello"
        entered.set()
        try:
            await conn.recv()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    server = await start_server(HOST, 0, SERVER, PEERS, waiting)
    conn = await connect(HOST, server.port, ALICE, SERVER_PUB)
    await conn.send(b"hello")
    await asyncio.wait_for(entered.wait(), BOUND)
    raw_reader, raw_writer = await asyncio.open_connection(HOST, server.port)
    await wait_until(lambda: server.connection_count == 2)
    await asyncio.wait_for(server.close(), BOUND)
    assert server.connection_count == 0
    assert cancelled == [True]
    with pytest.raises(ConnectionClosed):
        await conn.recv(timeout=BOUND)
    assert await read_to_eof(raw_reader) == b""
    raw_writer.close()
    with pytest.raises(OSError):
        await connect(HOST, server.port, ALICE, SERVER_PUB, timeout=BOUND)


async def test_connect_timeout_against_silent_listener():
    hold = asyncio.Event()

    async def silent(reader, writer):
        await hold.wait()
        writer.close()

    listener = await asyncio.start_server(silent, HOST, 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await connect(HOST, port, ALICE, SERVER_PUB, timeout=0.2)
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < BOUND
    finally:
        hold.set()
        listener.close()
        await listener.wait_closed()
