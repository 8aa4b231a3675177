"""Noise_KK_25519_ChaChaPoly_SHA256 channel: a sans-IO core and a thin asyncio adapter.

Wire format (see docs/protocol.md, "Transport"):

* act one, initiator -> responder, 67 bytes: ``e`` (32) + AEAD(``practical_revault_0``) (19 + 16);
* act two, responder -> initiator, 48 bytes: ``e`` (32) + AEAD(empty) (16);
* then frames: ``encrypt(u16_be(L))`` (18 bytes) followed by ``encrypt(plaintext)`` (L bytes),
  ``L = len(plaintext) + 16``.

The handshake is Noise's SymmetricState written out on ``cryptography``'s primitives
(X25519, ChaCha20-Poly1305, HMAC-SHA256 for HKDF); the cacophony vectors and an interop
test against the ``noiseprotocol`` package pin it to the spec, byte for byte. The token
processing of the two KK messages is written out too, so that a responder knowing many
peers pays for the ``es`` DH once per act one (not once per candidate key) and for each
``ss`` DH once per server (not once per handshake): trying N keys then costs N hashes and
AEAD checks instead of 3N X25519 operations, which matters because anyone can send act one.
Transport messages use one ChaCha20-Poly1305 object per direction, and a frame is sealed
into one buffer without intermediate copies.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import struct
import weakref
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from revault.admission import Admission, ConnectionSlots
from revault.log_limit import LimitedLog
from revault.metrics import COMMON as METRICS

__all__ = [
    "MAX_PLAINTEXT", "ACT_ONE_LEN", "ACT_TWO_LEN", "HANDSHAKE_TIMEOUT",
    "TransportError", "ConnectionClosed", "public_key", "key_prefix",
    "InitiatorHandshake", "ResponderHandshake", "FrameCodec",
    "NoiseConnection", "ServerLimits", "NoiseServer", "start_server", "connect",
]

logger = logging.getLogger("revault.transport")

PROTOCOL_NAME = b"Noise_KK_25519_ChaChaPoly_SHA256"
ACT_ONE_PAYLOAD = b"practical_revault_0"
MAX_PLAINTEXT = 65501
ACT_ONE_LEN, ACT_TWO_LEN = 67, 48
HANDSHAKE_TIMEOUT = 10.0

KEY_LEN = 32
TAG_LEN = 16
HEADER_LEN = 2 + TAG_LEN                      # encrypt(u16_be(L))
MIN_BODY_LEN = TAG_LEN                        # empty plaintext
MAX_BODY_LEN = MAX_PLAINTEXT + TAG_LEN        # 65517
MAX_FRAME_LEN = HEADER_LEN + MAX_BODY_LEN     # 65535

# Noise reserves nonce 2**64-1; a frame spends two nonces.
_NONCE_LIMIT = 2**64 - 1
_nonce = struct.Struct("<4xQ").pack           # ChaChaPoly nonce: 32 zero bits + 64-bit LE counter
_u16 = struct.Struct(">H").pack

# The protocol name is exactly HASHLEN bytes, so it is the initial h (and ck) unhashed.
_H0 = _CK0 = PROTOCOL_NAME
assert len(PROTOCOL_NAME) == 32


class TransportError(Exception):
    """Bad handshake, broken or tampered frame, size violation."""


class ConnectionClosed(TransportError):
    """The peer went away, we closed, the connection timed out idle, or a frame was bad."""


def _check_key(name: str, key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        raise ValueError(f"{name} must be {KEY_LEN} bytes")
    return bytes(key)


@dataclass(frozen=True, slots=True)
class _KeyPair:
    """An X25519 key: the public half always, the private half when it is ours."""

    public: X25519PublicKey
    public_bytes: bytes
    private: X25519PrivateKey | None = None


def _from_private(private: X25519PrivateKey) -> _KeyPair:
    public = private.public_key()
    return _KeyPair(public, public.public_bytes_raw(), private)


def _generate_keypair() -> _KeyPair:
    """A fresh ephemeral key (the handshake's one key generation)."""
    return _from_private(X25519PrivateKey.generate())


def _private_keypair(private: bytes, name: str = "private key") -> _KeyPair:
    return _from_private(X25519PrivateKey.from_private_bytes(_check_key(name, private)))


def _public_keypair(public: bytes, name: str = "public key") -> _KeyPair:
    public = _check_key(name, public)
    return _KeyPair(X25519PublicKey.from_public_bytes(public), public)


def public_key(private_key: bytes) -> bytes:
    """X25519 public key of a 32-byte private key (the one derivation: keys.py and every
    daemon use this)."""
    return _private_keypair(private_key).public_bytes


def key_prefix(public: bytes) -> str:
    """How a peer's Noise public key is named in every log line: its first 4 bytes in
    hex, enough to tell a deployment's peers apart and short to read."""
    return public[:4].hex()


def _dh(private: _KeyPair, public: _KeyPair) -> bytes:
    try:
        return private.private.exchange(public.public)
    except ValueError:
        # cryptography refuses an all-zero shared secret (low-order point from the peer).
        raise TransportError("invalid ephemeral key") from None


def _remote_ephemeral(data: bytes) -> _KeyPair:
    return _public_keypair(bytes(data[:KEY_LEN]))


_HMAC_INNER = bytes(x ^ 0x36 for x in range(256))
_HMAC_OUTER = bytes(x ^ 0x5C for x in range(256))
_KEY_PAD = bytes(64 - KEY_LEN)


def _hmac_sha256(key: bytes, data: bytes, _sha256=hashlib.sha256) -> bytes:
    """HMAC-SHA256 (RFC 2104) of a 32-byte key, as the hmac module computes it; written
    out because hmac.digest looks the digest up by name in OpenSSL on every call: about
    5 us an HMAC against 2 us here, times 15 per handshake (the tests check it against
    hmac.digest)."""
    block = key + _KEY_PAD
    inner = _sha256(block.translate(_HMAC_INNER) + data).digest()
    return _sha256(block.translate(_HMAC_OUTER) + inner).digest()


def _hkdf2(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    """Noise's HKDF with two outputs, HMAC-SHA256."""
    temp = _hmac_sha256(chaining_key, input_key_material)
    first = _hmac_sha256(temp, b"\x01")
    return first, _hmac_sha256(temp, first + b"\x02")


def _hkdf_chaining_key(chaining_key: bytes, input_key_material: bytes) -> bytes:
    """The first output of _hkdf2 alone: MixKey's new chaining key, for a MixKey whose
    cipher key is replaced by the next MixKey before any use (one HMAC fewer)."""
    return _hmac_sha256(_hmac_sha256(chaining_key, input_key_material), b"\x01")


class _SymmetricState:
    """Noise's SymmetricState (with its CipherState) for SHA256 and ChaChaPoly.

    Every key the KK handshake mixes in is used for exactly one message, so the cipher
    object is made when the key is; the nonce still counts as the spec says.
    """

    __slots__ = ("h", "ck", "_cipher", "_n")

    def __init__(self, h: bytes, ck: bytes):
        self.h = h
        self.ck = ck
        self._cipher: ChaCha20Poly1305 | None = None
        self._n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, key = _hkdf2(self.ck, input_key_material)
        self._cipher = ChaCha20Poly1305(key)
        self._n = 0

    def mix_key_then_rekey(self, input_key_material: bytes) -> None:
        """MixKey when another MixKey follows before any encryption: only ck changes
        (the cipher key this one would set is never used)."""
        self.ck = _hkdf_chaining_key(self.ck, input_key_material)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self._cipher is None:
            ciphertext = plaintext
        else:
            ciphertext = self._cipher.encrypt(_nonce(self._n), plaintext, self.h)
            self._n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Raises InvalidTag when the message does not authenticate."""
        if self._cipher is None:
            plaintext = ciphertext
        else:
            plaintext = self._cipher.decrypt(_nonce(self._n), ciphertext, self.h)
            self._n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf2(self.ck, b"")


def _premessage_hash(prologue: bytes, initiator_static: bytes, responder_static: bytes) -> bytes:
    # KK pre-messages: "-> s" then "<- s", hashed after the prologue.
    state = _SymmetricState(_H0, _CK0)
    state.mix_hash(prologue)
    state.mix_hash(initiator_static)
    state.mix_hash(responder_static)
    return state.h


def _decrypt_and_hash(state: _SymmetricState, ciphertext: bytes) -> bytes:
    try:
        return state.decrypt_and_hash(ciphertext)
    except InvalidTag:
        raise TransportError("handshake message failed authentication") from None


# --------------------------------------------------------------------------------------
# sans-IO core
# --------------------------------------------------------------------------------------

class FrameCodec:
    """Both directions of an established channel. Pure: bytes in, bytes out."""

    __slots__ = ("_enc", "_dec", "_send_n", "_recv_n", "_buf", "_need", "_in_body",
                 "_failed")

    def __init__(self, send_key: bytes, recv_key: bytes):
        self._enc = ChaCha20Poly1305(send_key)
        self._dec = ChaCha20Poly1305(recv_key)
        self._send_n = 0
        self._recv_n = 0
        self._buf = bytearray()
        self._need = HEADER_LEN
        self._in_body = False
        self._failed = False

    # One Noise transport message each; frames are made of two. Also the hook the
    # cacophony vectors are checked through, as they carry unframed transport messages.
    def _encrypt_message(self, plaintext: bytes) -> bytes:
        n = self._send_n
        if n >= _NONCE_LIMIT:
            raise TransportError("send nonce exhausted")
        out = self._enc.encrypt(_nonce(n), plaintext, None)
        self._send_n = n + 1
        return out

    def _decrypt_message(self, ciphertext: bytes) -> bytes:
        n = self._recv_n
        if n >= _NONCE_LIMIT:
            raise TransportError("receive nonce exhausted")
        try:
            out = self._dec.decrypt(_nonce(n), ciphertext, None)
        except InvalidTag:
            raise TransportError("message failed authentication") from None
        self._recv_n = n + 1
        return out

    def _seal(self, plaintext: bytes) -> bytearray:
        """One frame as a fresh bytearray, sealed in place (no concatenation copy)."""
        size = len(plaintext)
        if size > MAX_PLAINTEXT:
            raise TransportError(f"plaintext of {size} bytes exceeds {MAX_PLAINTEXT}")
        n = self._send_n
        if n >= _NONCE_LIMIT - 1:
            raise TransportError("send nonce exhausted")
        body_len = size + TAG_LEN
        out = bytearray(HEADER_LEN + body_len)
        view = memoryview(out)
        enc = self._enc
        enc.encrypt_into(_nonce(n), _u16(body_len), None, view[:HEADER_LEN])
        enc.encrypt_into(_nonce(n + 1), plaintext, None, view[HEADER_LEN:])
        self._send_n = n + 2
        return out

    def encrypt(self, plaintext: bytes) -> bytes:
        """A complete frame: 18 + len(plaintext) + 16 bytes."""
        return bytes(self._seal(plaintext))

    def feed(self, data: bytes) -> list[bytes]:
        """Decrypt every frame completed by ``data``; keep at most one partial unit.

        Any failure is final: the receive nonce cannot be resynchronised, so every later
        call raises too.
        """
        out: list[bytes] = []
        self._feed_into(data, out)
        return out

    def _feed_into(self, data: bytes, out: list[bytes]) -> None:
        """feed(), appending to ``out`` as frames complete, so that a caller still has the
        messages authenticated before a failure in the same chunk."""
        if self._failed:
            raise TransportError("frame stream already failed")
        buf = self._buf
        view = memoryview(data)
        pos, end = 0, len(view)
        dec = self._dec
        try:
            while pos < end:
                need = self._need
                if buf:
                    take = need - len(buf)
                    if end - pos < take:
                        buf += view[pos:end]
                        break
                    buf += view[pos:pos + take]
                    pos += take
                    unit = buf
                else:
                    if end - pos < need:
                        buf += view[pos:end]
                        break
                    unit = view[pos:pos + need]
                    pos += need
                n = self._recv_n
                if n >= _NONCE_LIMIT:
                    raise TransportError("receive nonce exhausted")
                plain = dec.decrypt(_nonce(n), unit, None)
                self._recv_n = n + 1
                if buf:
                    buf.clear()
                if self._in_body:
                    out.append(plain)
                    self._need = HEADER_LEN
                    self._in_body = False
                else:
                    body_len = (plain[0] << 8) | plain[1]
                    if body_len < MIN_BODY_LEN or body_len > MAX_BODY_LEN:
                        raise TransportError(f"frame length {body_len} out of range")
                    self._need = body_len
                    self._in_body = True
        except InvalidTag:
            self._fail()
            raise TransportError("frame failed authentication") from None
        except TransportError:
            self._fail()
            raise

    def _fail(self) -> None:
        self._failed = True
        self._buf = bytearray()

    @property
    def _buffered(self) -> int:
        return len(self._buf)


class InitiatorHandshake:
    """Client side of KK: writes act one, reads act two."""

    def __init__(self, local_private: bytes, remote_public: bytes):
        self._setup(local_private, remote_public, b"", None)

    @classmethod
    def _for_testing(cls, local_private: bytes, remote_public: bytes, *, prologue: bytes,
                     ephemeral_private: bytes | None) -> InitiatorHandshake:
        """Test vectors fix the prologue and the ephemeral key; nothing else may."""
        self = cls.__new__(cls)
        self._setup(local_private, remote_public, prologue, ephemeral_private)
        return self

    def _setup(self, local_private: bytes, remote_public: bytes, prologue: bytes,
               ephemeral_private: bytes | None) -> None:
        self._s = _private_keypair(local_private, "local_private")
        self._rs = _public_keypair(remote_public, "remote_public")
        self._e = None if ephemeral_private is None else _private_keypair(ephemeral_private)
        self._state = _SymmetricState(
            _premessage_hash(prologue, self._s.public_bytes, self._rs.public_bytes), _CK0)
        self._step = 0
        self._handshake_hash: bytes | None = None

    def _write_act_one(self, payload: bytes) -> bytes:
        if self._step != 0:
            raise TransportError("act one already written")
        self._step = 1
        st = self._state
        e = self._e if self._e is not None else _generate_keypair()
        self._e = e
        st.mix_hash(e.public_bytes)
        st.mix_key_then_rekey(_dh(e, self._rs))   # es
        st.mix_key(_dh(self._s, self._rs))        # ss
        return e.public_bytes + st.encrypt_and_hash(payload)

    def act_one(self) -> bytes:
        return self._write_act_one(ACT_ONE_PAYLOAD)

    def _read_act_two(self, data: bytes) -> tuple[bytes, FrameCodec]:
        if self._step != 1:
            raise TransportError("act two read out of order")
        self._step = 2
        if len(data) < KEY_LEN + TAG_LEN:
            raise TransportError("act two too short")
        st = self._state
        re = _remote_ephemeral(data)
        st.mix_hash(re.public_bytes)
        st.mix_key_then_rekey(_dh(self._e, re))   # ee
        st.mix_key(_dh(self._s, re))              # se
        payload = _decrypt_and_hash(st, bytes(data[KEY_LEN:]))
        self._handshake_hash = st.h
        k1, k2 = st.split()
        self._state = self._e = None
        return payload, FrameCodec(k1, k2)

    def read_act_two(self, data: bytes) -> FrameCodec:
        if len(data) != ACT_TWO_LEN:
            self._step = 2
            raise TransportError(f"act two must be {ACT_TWO_LEN} bytes, got {len(data)}")
        payload, codec = self._read_act_two(data)
        if payload:
            raise TransportError("act two carries an unexpected payload")
        return codec


class _ResponderKeys:
    """What a responder can compute once for all its handshakes: the static key, each
    candidate's pre-message hash and, lazily, each ``ss`` shared secret."""

    __slots__ = ("static", "peers", "_h", "_ss")

    def __init__(self, local_private: bytes, known_peers: Iterable[bytes], prologue: bytes = b""):
        self.static = _private_keypair(local_private, "local_private")
        seen: set[bytes] = set()
        self.peers: list[_KeyPair] = []
        for i, peer in enumerate(known_peers):
            pair = _public_keypair(peer, f"known_peers[{i}]")
            if pair.public_bytes not in seen:
                seen.add(pair.public_bytes)
                self.peers.append(pair)
        self._h = [_premessage_hash(prologue, p.public_bytes, self.static.public_bytes)
                   for p in self.peers]
        self._ss: list[bytes | None] = [None] * len(self.peers)

    def ss(self, index: int) -> bytes:
        value = self._ss[index]
        if value is None:
            value = self._ss[index] = _dh(self.static, self.peers[index])
        return value

    def h(self, index: int) -> bytes:
        return self._h[index]


class ResponderHandshake:
    """Server side of KK: reads act one (identifying the peer), writes act two."""

    def __init__(self, local_private: bytes, known_peers: Iterable[bytes]):
        self._setup(_ResponderKeys(local_private, known_peers), None)

    @classmethod
    def _with_keys(cls, keys: _ResponderKeys,
                   ephemeral_private: bytes | None = None) -> ResponderHandshake:
        self = cls.__new__(cls)
        self._setup(keys, ephemeral_private)
        return self

    @classmethod
    def _for_testing(cls, local_private: bytes, known_peers: Iterable[bytes], *,
                     prologue: bytes, ephemeral_private: bytes | None) -> ResponderHandshake:
        return cls._with_keys(_ResponderKeys(local_private, known_peers, prologue),
                              ephemeral_private)

    def _setup(self, keys: _ResponderKeys, ephemeral_private: bytes | None) -> None:
        self._keys = keys
        self._e = None if ephemeral_private is None else _private_keypair(ephemeral_private)
        self._state: _SymmetricState | None = None
        self._re: _KeyPair | None = None
        self._rs: _KeyPair | None = None
        self._step = 0
        self._handshake_hash: bytes | None = None

    def _read_act_one(self, data: bytes) -> tuple[bytes, bytes]:
        if self._step != 0:
            raise TransportError("act one already read")
        self._step = 1
        if len(data) < KEY_LEN + TAG_LEN:
            raise TransportError("act one too short")
        keys = self._keys
        re = _remote_ephemeral(data)
        ciphertext = bytes(data[KEY_LEN:])
        # MixKey(es) acts on ck alone, which no candidate has touched yet, so it is done
        # once; the cipher key it would set is replaced by MixKey(ss) before any use.
        ck_es = _hkdf_chaining_key(_CK0, _dh(keys.static, re))
        for index, peer in enumerate(keys.peers):
            # A fresh Noise state per candidate: the candidate's static key is part of h.
            st = _SymmetricState(keys.h(index), ck_es)
            st.mix_hash(re.public_bytes)
            st.mix_key(keys.ss(index))
            try:
                payload = st.decrypt_and_hash(ciphertext)
            except InvalidTag:
                continue
            self._state, self._re, self._rs = st, re, peer
            return peer.public_bytes, payload
        raise TransportError("act one matches no known peer")

    def read_act_one(self, data: bytes) -> bytes:
        if len(data) != ACT_ONE_LEN:
            self._step = 1
            raise TransportError(f"act one must be {ACT_ONE_LEN} bytes, got {len(data)}")
        peer, payload = self._read_act_one(data)
        if payload != ACT_ONE_PAYLOAD:
            self._state = None
            raise TransportError("act one carries an unexpected payload")
        return peer

    def _write_act_two(self, payload: bytes) -> tuple[bytes, FrameCodec]:
        if self._step != 1 or self._state is None:
            raise TransportError("act two written out of order")
        self._step = 2
        st = self._state
        e = self._e if self._e is not None else _generate_keypair()
        st.mix_hash(e.public_bytes)
        st.mix_key_then_rekey(_dh(e, self._re))   # ee
        st.mix_key(_dh(e, self._rs))              # se
        message = e.public_bytes + st.encrypt_and_hash(payload)
        self._handshake_hash = st.h
        k1, k2 = st.split()
        self._state = self._e = None
        return message, FrameCodec(k2, k1)

    def act_two(self) -> tuple[bytes, FrameCodec]:
        return self._write_act_two(b"")


# --------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------
# asyncio adapter
# --------------------------------------------------------------------------------------

# Decrypted but not yet received bytes that make us stop reading the socket; the extra
# per-message charge bounds a flood of tiny frames as well. One full frame passes it on
# its own: a peer pipelining faster than it is served waits in its own TCP window, not
# in our memory.
_READ_HIGH = 16 * 1024
_READ_LOW = 4 * 1024
_MESSAGE_OVERHEAD = 64
# What we have written that the peer has not taken yet, past which a sender waits (and
# the write deadline starts): enough for a pipelined peer, one frame past it at most.
_WRITE_HIGH = 16 * 1024
# Bytes read from a socket at once. Reads land in one buffer per event loop (see
# _read_buffer), so a connection's memory is bounded by what it keeps, not by how much
# the kernel had for it.
_READ_CHUNK = 64 * 1024
_CLOSE_GRACE = 5.0

_read_buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _read_buffer(loop: asyncio.AbstractEventLoop) -> memoryview:
    """The loop's one receive buffer. Safe to share: the selector loop calls get_buffer,
    recv_into and buffer_updated back to back, and buffer_updated copies what it keeps."""
    buffer = _read_buffers.get(loop)
    if buffer is None:
        buffer = _read_buffers[loop] = memoryview(bytearray(_READ_CHUNK))
    return buffer


# Lines a peer can provoke go through a LimitedLog; a client's own connections share one.
_client_notices = LimitedLog(logger)


class NoiseConnection:
    """An established channel. One task may recv while any number send.

    After the peer shuts down its sending side, what it sent before is still received
    and answers can still be sent; recv raises ConnectionClosed once all is received.
    """

    def __init__(self, transport: asyncio.Transport, codec: FrameCodec, peer_public: bytes,
                 idle_timeout: float | None, loop: asyncio.AbstractEventLoop,
                 lost: asyncio.Future, *, write_timeout: float | None = None,
                 notices: LimitedLog = _client_notices):
        self.peer_public = peer_public
        self._transport = transport
        self._codec = codec
        self._idle_timeout = idle_timeout
        self._write_timeout = write_timeout
        self._loop = loop
        self._lost = lost
        self._notices = notices
        self._messages: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._reading_paused = False
        self._input_ended = False
        self._waiter: asyncio.Future | None = None
        self._error: ConnectionClosed | None = None
        self._closing = False
        self._write_paused = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._drain_waiters: list[asyncio.Future] = []
        # The idle clock: when recv last began to wait for the peer, and one timer per
        # connection, re-armed when it fires rather than set and cancelled per message.
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._ready: Callable[[], None] | None = None   # deliver_to's consumer

    @property
    def closed(self) -> bool:
        return self._closing or self._error is not None

    @property
    def frames_received(self) -> int:
        return self._codec._recv_n // 2

    # -- events from the protocol --
    def _data(self, data) -> None:
        if self._closing or self._error is not None:
            return
        messages: list[bytes] = []
        try:
            self._codec._feed_into(data, messages)
        except TransportError as e:
            self._notices.log(logging.INFO, ("bad frame", self.peer_public),
                              "closing connection with peer %s: %s",
                              key_prefix(self.peer_public), e)
            self._set_error(ConnectionClosed(f"bad frame: {e}"))
            self._transport.abort()
        if messages:
            queue = self._messages
            for m in messages:
                queue.append(m)
                self._queued += len(m) + _MESSAGE_OVERHEAD
            # A big message for a receiver that waits for it is taken at once (or on
            # the next turn): pausing (two epoll_ctl calls) would bound nothing more.
            if (self._queued > _READ_HIGH and not self._reading_paused
                    and self._error is None
                    and (self._idle_since is None or len(queue) > 1)):
                self._reading_paused = True
                self._transport.pause_reading()
            self._wake()

    def _wake(self) -> None:
        if self._ready is not None:
            self._ready()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _set_error(self, error: ConnectionClosed) -> None:
        if self._error is None:
            self._error = error
        self._cancel_write_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._wake()
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    def _eof(self) -> None:
        self._input_ended = True
        self._wake()

    def _connection_lost(self, exc: BaseException | None) -> None:
        self._set_error(ConnectionClosed("connection lost" if exc is None else f"connection lost: {exc}"))

    def _pause_writing(self) -> None:
        self._write_paused = True
        if self._write_timeout is not None and self._write_timer is None:
            self._write_timer = self._loop.call_later(self._write_timeout,
                                                      self._write_expired)

    def _resume_writing(self) -> None:
        self._write_paused = False
        self._cancel_write_timer()
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    def _waiting_for_peer(self) -> None:
        """The consumer waits for the next message: start the idle clock."""
        self._idle_since = now = self._loop.time()
        if self._idle_timer is None and self._idle_timeout is not None:
            self._idle_timer = self._loop.call_at(now + self._idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        since = self._idle_since
        if since is None or self.closed:
            return  # not waiting for the peer: the next wait arms the timer again
        due = since + self._idle_timeout
        if self._loop.time() < due:
            self._idle_timer = self._loop.call_at(due, self._idle_check)
        elif self._ready is not None:
            self._close_idle()
            self._wake()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    def _close_idle(self) -> None:
        self._notices.log(logging.INFO, ("idle", self.peer_public),
                          "closing idle connection from peer %s", key_prefix(self.peer_public))
        self._set_error(ConnectionClosed("idle timeout"))
        self._closing = True
        self._transport.close()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_expired(self) -> None:
        # The peer has not read what we wrote for write_timeout seconds: whatever it
        # keeps sending, it may not keep our buffers (and a connection slot) hostage.
        self._write_timer = None
        if self._error is not None:
            return
        self._notices.log(logging.INFO, ("not reading", self.peer_public),
                          "closing connection with peer %s: it has not read for %g s",
                          key_prefix(self.peer_public), self._write_timeout)
        self._set_error(ConnectionClosed("peer does not read"))
        self._messages.clear()
        self._queued = 0
        self._transport.abort()

    # -- public API --
    def send_nowait(self, plaintext: bytes) -> bool:
        """Seal and write one message now. False when the peer is not reading what we
        write (our buffer for it is over its high mark): send no more until send()
        would have returned, or the write deadline closes the connection."""
        if self._error is not None:
            raise ConnectionClosed(*self._error.args)
        if self._transport.is_closing():
            # The socket failed (reset by the peer) and asyncio would drop what we write,
            # silently: a sender must learn now, not after its whole backlog.
            raise ConnectionClosed("connection lost")
        # Sealing and writing in one call keeps frames whole and in nonce order when
        # several tasks send at once.
        self._transport.write(self._codec._seal(plaintext))
        return not self._write_paused

    async def send(self, plaintext: bytes) -> None:
        """send_nowait, then wait while the peer does not read what we wrote."""
        if not self.send_nowait(plaintext):
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self._error is not None:
                raise ConnectionClosed(*self._error.args)

    def _take(self) -> bytes:
        """The first queued message; reading resumes once the queue is low again."""
        message = self._messages.popleft()
        self._queued -= len(message) + _MESSAGE_OVERHEAD
        if self._reading_paused and self._queued <= _READ_LOW and not self._closing:
            self._reading_paused = False
            self._transport.resume_reading()
        return message

    def deliver_to(self, ready: Callable[[], None]) -> None:
        """Push instead of pull: call ``ready()`` whenever a message is queued or the
        connection ends, synchronously from the protocol's callback; the consumer then
        takes messages with recv_nowait. recv is not used after this.

        A server answering from that callback saves the event-loop turn a task needs to
        wake for each message. The idle timeout runs while recv_nowait last found
        nothing queued and no message came since."""
        if self._ready is not None or self._waiter is not None:
            raise RuntimeError("this connection already has a receiver")
        self._ready = ready
        if self.receivable:
            ready()
        elif self._idle_since is None:
            self._waiting_for_peer()

    @property
    def receivable(self) -> bool:
        """Whether recv_nowait would return a message or raise, rather than None."""
        return bool(self._messages) or self._error is not None or self._input_ended

    def recv_nowait(self) -> bytes | None:
        """The next message, or None when none is queued; ConnectionClosed once every
        message the peer sent was taken and no more can come."""
        if self._messages:
            self._idle_since = None
            return self._take()
        if self._error is not None:
            raise ConnectionClosed(*self._error.args)
        if self._input_ended:
            raise ConnectionClosed("peer closed the connection")
        if self._idle_since is None:
            self._waiting_for_peer()
        return None

    async def recv(self, timeout: float | None = None) -> bytes:
        if self._ready is not None:
            raise RuntimeError("this connection delivers its messages (deliver_to)")
        while True:
            if self._messages:
                return self._take()
            if self._error is not None:
                raise ConnectionClosed(*self._error.args)
            if self._input_ended:
                raise ConnectionClosed("peer closed the connection")
            if self._waiter is not None:
                raise RuntimeError("another task is already receiving on this connection")
            idle = timeout is None
            waiter = self._waiter = self._loop.create_future()
            timer = None
            if not idle:
                timer = self._loop.call_later(timeout, _expire, waiter)
            else:
                self._waiting_for_peer()
            try:
                expired = await waiter
            finally:
                self._waiter = None
                self._idle_since = None
                if timer is not None:
                    timer.cancel()
            if (expired and not self._messages and self._error is None
                    and not self._input_ended and not self._closing):
                if idle:
                    self._close_idle()
                    raise ConnectionClosed("idle timeout")
                raise asyncio.TimeoutError()

    async def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._messages.clear()
            self._set_error(ConnectionClosed("connection closed"))
            self._transport.close()
        if not self._lost.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), _CLOSE_GRACE)
            except asyncio.TimeoutError:
                # The peer does not read what is still buffered for it: stop waiting.
                self._transport.abort()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(True)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds that keep one peer, or someone with no key, from denying service to others
    (see revault.admission for how the connection slots are shared)."""

    handshake_timeout: float = HANDSHAKE_TIMEOUT   # until the first frame decrypts
    idle_timeout: float = 300.0
    max_connections: int = 1024
    max_handshakes: int = 64                       # connections not yet authenticated
    max_handshakes_per_address: int = 64           # the same: a host's burst is not cut
    max_connections_per_peer: int = 32
    write_timeout: float = 30.0                    # a peer that does not read is closed

    def slots(self, peers: Iterable[bytes]) -> ConnectionSlots:
        return ConnectionSlots(max_connections=self.max_connections,
                               max_handshakes=self.max_handshakes,
                               max_handshakes_per_address=self.max_handshakes_per_address,
                               max_connections_per_peer=self.max_connections_per_peer,
                               peers=peers)


class _HandshakingProtocol(asyncio.BufferedProtocol):
    """Both ends: once the handshake made `_conn`, write flow control is the connection's."""

    __slots__ = ()
    _conn: NoiseConnection | None
    _loop: asyncio.AbstractEventLoop

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer(self._loop)

    def buffer_updated(self, nbytes: int) -> None:
        self._received(_read_buffer(self._loop)[:nbytes])

    def pause_writing(self) -> None:
        if self._conn is not None:
            self._conn._pause_writing()

    def resume_writing(self) -> None:
        if self._conn is not None:
            self._conn._resume_writing()


class _ServerProtocol(_HandshakingProtocol):
    __slots__ = ("_server", "_loop", "_transport", "_buf", "_conn", "_timer",
                 "_authenticated", "lost")

    def __init__(self, server: NoiseServer):
        self._server = server
        self._loop = server._loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._conn: NoiseConnection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._authenticated = False
        self.lost: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        server = self._server
        if server._closing:
            transport.abort()
            return
        admission = server._slots.accept(self, _address(transport))
        if not admission.admitted:
            METRICS.connections_rejected.labels(admission.limit).inc()
            server._notice(logging.WARNING, "connection refused: %s", admission.reason)
            transport.abort()
            return
        server._evict(admission)
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        self.lost = server._loop.create_future()
        server._protocols.add(self)
        self._timer = server._loop.call_later(server._limits.handshake_timeout,
                                              self._handshake_expired)

    def _evict(self) -> None:
        """Closed to make room for another connection (see revault.admission)."""
        self._handshake_decided("evicted")
        if self._conn is not None:
            self._conn._set_error(ConnectionClosed("evicted"))
        self._transport.abort()

    def _handshake_expired(self) -> None:
        self._timer = None
        if not self._authenticated:
            _handshake_counter("timeout").inc()
            logger.debug("handshake timed out with %s", self._peer())
            self._transport.abort()

    def _peer(self) -> str:
        try:
            return str(self._transport.get_extra_info("peername"))
        except Exception:
            return "?"

    def _received(self, data: memoryview) -> None:
        conn = self._conn
        if conn is not None:
            self._frames(conn, data)
            return
        if self.lost is None or self._transport.is_closing():
            return
        buf = self._buf
        buf += data
        if len(buf) < ACT_ONE_LEN:
            return
        server = self._server
        handshake = ResponderHandshake._with_keys(server._keys)
        try:
            peer = handshake.read_act_one(bytes(buf[:ACT_ONE_LEN]))
            act_two, codec = handshake.act_two()
        except TransportError as e:
            self._handshake_decided("failed")
            server._notice(logging.INFO, "refused handshake from %s: %s", self._peer(), e)
            self._transport.abort()
            return
        admission = server._slots.identify(self, peer)
        if not admission.admitted:
            self._handshake_decided("refused")
            METRICS.connections_rejected.labels(admission.limit).inc()
            server._notice(logging.INFO, "refused handshake from peer %s: %s",
                           key_prefix(peer), admission.reason)
            self._transport.abort()
            return
        server._evict(admission)
        rest = bytes(buf[ACT_ONE_LEN:])
        self._buf = bytearray()
        self._transport.write(act_two)
        conn = self._conn = NoiseConnection(
            self._transport, codec, peer, server._limits.idle_timeout, server._loop,
            self.lost, write_timeout=server._limits.write_timeout, notices=server._notices)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("handshake done with peer %s from %s", key_prefix(peer), self._peer())
        if rest:
            self._frames(conn, rest)

    def _frames(self, conn: NoiseConnection, data) -> None:
        conn._data(data)
        if not self._authenticated and conn.frames_received and conn._error is None:
            # Only the holder of the peer's key can make a frame decrypt: a replayed act
            # one never gets here, and stays bound by the handshake deadline. Nor does it
            # get a handler: that starts with the first frame, for authenticated peers.
            self._authenticated = True
            self._handshake_decided("ok")
            self._server._slots.authenticate(self)
            self._server._start_handler(conn)

    def eof_received(self) -> bool:
        if not self._authenticated:
            return False  # a liveness probe, or a handshake given up: nothing to answer
        # Half-closed: what was received is still answered, then the handler closes.
        self._conn._eof()
        return True

    def _handshake_decided(self, outcome: str) -> None:
        """Count how the handshake ended (a first frame decrypted: "ok"); it ends once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            _handshake_counter(outcome).inc()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            return
        # Still running: the peer left before its first frame (a liveness probe, say).
        self._handshake_decided("abandoned")
        self._server._protocols.discard(self)
        self._server._slots.release(self)
        if self._conn is not None:
            self._conn._connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)


_handshake_counters: dict = {}


def _handshake_counter(outcome: str):
    """METRICS.handshakes' child for `outcome`, looked up once (a lookup takes a lock)."""
    counter = _handshake_counters.get(outcome)
    if counter is None:
        counter = _handshake_counters[outcome] = METRICS.handshakes.labels(outcome)
    return counter


def _address(transport: asyncio.BaseTransport) -> str:
    peername = transport.get_extra_info("peername")
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return str(peername)


class NoiseServer:
    """A listening Noise KK server; see start_server."""

    def __init__(self, keys: _ResponderKeys,
                 handler: Callable[[NoiseConnection], Awaitable[None]],
                 limits: ServerLimits, loop: asyncio.AbstractEventLoop):
        self._keys = keys
        self._handler = handler
        self._limits = limits
        self._loop = loop
        self._slots = limits.slots(p.public_bytes for p in keys.peers)
        self._notices = LimitedLog(logger)
        self._protocols: set[_ServerProtocol] = set()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self._closing = False
        self.port = 0

    @property
    def connection_count(self) -> int:
        """Open connections, those still in their handshake included."""
        return len(self._protocols)

    def _notice(self, level: int, message: str, *args: object) -> None:
        # One topic per kind of line: a flood of refusals is summarized, not logged each.
        self._notices.log(level, message, message, *args)

    def _evict(self, admission: Admission) -> None:
        for proto in admission.evicted:
            METRICS.connections_evicted.labels(admission.limit).inc()
            self._notice(logging.INFO, "closing a connection still in its handshake: %s",
                         admission.reason)
            proto._evict()

    def _start_handler(self, conn: NoiseConnection) -> None:
        task = self._loop.create_task(self._run_handler(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, conn: NoiseConnection) -> None:
        try:
            await self._handler(conn)
        except ConnectionClosed as e:
            logger.debug("peer %s: %s", key_prefix(conn.peer_public), e)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._notices.log(logging.WARNING, ("handler failed", conn.peer_public),
                              "handler failed for peer %s", key_prefix(conn.peer_public),
                              exc_info=True)
        finally:
            await conn.close()

    async def close(self) -> None:
        """Stop listening, cancel handlers, close every connection."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        protocols = list(self._protocols)
        for proto in protocols:
            proto._transport.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        lost = [p.lost for p in protocols if p.lost is not None]
        if lost:
            await asyncio.gather(*lost, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._notices.flush(every_window=True)


async def start_server(host: str, port: int, local_private: bytes,
                       known_peers: Iterable[bytes],
                       handler: Callable[[NoiseConnection], Awaitable[None]],
                       limits: ServerLimits | None = None) -> NoiseServer:
    """Listen on host:port; run ``handler(conn)`` for every peer that completes KK, as a
    task started by the peer's first frame (only the holder of a configured key can make
    one decrypt, so a replayed act one never gets a handler).

    The connection is closed when the handler returns or raises, and also when the
    peer's first frame has not decrypted within ``limits.handshake_timeout``.
    """
    limits = limits if limits is not None else ServerLimits()
    loop = asyncio.get_running_loop()
    keys = _ResponderKeys(local_private, known_peers)
    for index in range(len(keys.peers)):
        keys.ss(index)
    server = NoiseServer(keys, handler, limits, loop)
    server._server = await loop.create_server(lambda: _ServerProtocol(server), host, port)
    server.port = server._server.sockets[0].getsockname()[1]
    return server


class _ClientProtocol(_HandshakingProtocol):
    def __init__(self, handshake: InitiatorHandshake, act_one: bytes, remote_public: bytes,
                 done: asyncio.Future, loop: asyncio.AbstractEventLoop):
        self._handshake = handshake
        self._act_one = act_one
        self._remote = remote_public
        self._done = done
        self._loop = loop
        self._buf = bytearray()
        self._conn: NoiseConnection | None = None
        self._transport: asyncio.Transport | None = None
        self.lost = loop.create_future()

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.write(self._act_one)

    def _fail(self, error: TransportError) -> None:
        if not self._done.done():
            self._done.set_exception(error)

    def _received(self, data: memoryview) -> None:
        conn = self._conn
        if conn is not None:
            conn._data(data)
            return
        if self._done.done():
            return
        buf = self._buf
        buf += data
        if len(buf) < ACT_TWO_LEN:
            return
        try:
            codec = self._handshake.read_act_two(bytes(buf[:ACT_TWO_LEN]))
        except TransportError as e:
            self._transport.abort()
            self._fail(e)
            return
        rest = bytes(buf[ACT_TWO_LEN:])
        self._buf = bytearray()
        conn = self._conn = NoiseConnection(self._transport, codec, self._remote, None,
                                            self._loop, self.lost)
        self._done.set_result(conn)
        if rest:
            conn._data(rest)

    def eof_received(self) -> bool:
        if self._conn is not None:
            # A server that stops sending is done with us: what it sent is still received.
            self._conn._set_error(ConnectionClosed("peer closed the connection"))
        else:
            self._fail(ConnectionClosed("server closed the connection during the handshake"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._conn._connection_lost(exc)
        else:
            self._fail(ConnectionClosed("connection lost during the handshake"))
        if not self.lost.done():
            self.lost.set_result(None)


async def connect(host: str, port: int, local_private: bytes, remote_public: bytes,
                  timeout: float = 10.0, *, source: str | None = None) -> NoiseConnection:
    """Open a channel to a responder; ``timeout`` bounds TCP connect and handshake together
    (asyncio.TimeoutError when it expires). ``source`` binds the local address."""
    loop = asyncio.get_running_loop()
    handshake = InitiatorHandshake(local_private, remote_public)
    # Before connecting: a key the DH refuses must fail here, not inside a protocol callback.
    act_one = handshake.act_one()
    remote = bytes(remote_public)
    done: asyncio.Future = loop.create_future()
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: _ClientProtocol(handshake, act_one, remote, done, loop), host, port,
                local_addr=None if source is None else (source, 0))
            return await done
    except BaseException:
        if transport is not None:
            transport.abort()
        if not done.done():
            done.cancel()
        raise
