from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import sqlite3
from collections import deque

import coincurve
import pytest

from revault import messages as m
from revault import rpc, transport
from revault.resumable_future import ResumableFuture
from revault.rpc import (FORBIDDEN, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST,
                         METHOD_NOT_FOUND, PARSE_ERROR, REFUSED, Caller, Dispatcher, RpcClient,
                         RpcError, serve_connection)
from revault.transport import ConnectionClosed

PUB = coincurve.PrivateKey(b"\x01" * 32).public_key.format().hex()
SIG = coincurve.PrivateKey(b"\x01" * 32).sign(b"\x07" * 32, hasher=None).hex()
ID = "ab" * 32
SECRET_DETAIL = "do-not-leak-" + SIG

STAKEHOLDER = Caller(bytes.fromhex("aabbccdd") + bytes(28), frozenset({"stakeholder"}))
MANAGER = Caller(bytes.fromhex("11223344") + bytes(28), frozenset({"manager"}))
BOTH = Caller(bytes(32), frozenset({"stakeholder", "manager"}))
NOBODY = Caller(bytes.fromhex("99") * 32, frozenset())


class Service:
    """A dispatcher with one method per behaviour under test, recording what ran."""

    def __init__(self, **kwargs):
        self.calls: list[tuple[str, object]] = []
        d = self.dispatcher = Dispatcher(**kwargs)

        @d.method("sig", m.SigParams, roles=["stakeholder"])
        async def sig(caller, params):
            self.calls.append(("sig", params))
            return m.AckResult()

        @d.method("get_sigs", m.GetSigsParams, roles=["stakeholder", "manager"])
        async def get_sigs(caller, params):
            self.calls.append(("get_sigs", params))
            return m.GetSigsResult({PUB: SIG})

        @d.method("get_spend_requests", m.GetSpendRequestsParams, roles=["manager", "watchtower"])
        async def get_spend_requests(caller, params):
            self.calls.append(("get_spend_requests", params))
            return {"requests": []}

        @d.method("boom", m.GetSpendRequestsParams, roles=["manager"])
        async def boom(caller, params):
            self.calls.append(("boom", params))
            raise RuntimeError(SECRET_DETAIL)

        @d.method("not_a_dict", m.GetSpendRequestsParams, roles=["manager"])
        async def not_a_dict(caller, params):
            return ["a", "list"]

        @d.method("quota", m.GetSpendRequestsParams, roles=["manager"])
        async def quota(caller, params):
            raise RpcError(REFUSED, "quota exceeded")

        @d.method("deep_check", m.GetSpendRequestsParams, roles=["manager"])
        async def deep_check(caller, params):
            raise m.ParamsError("tx", "input index out of range")

        @d.method("readonly", m.GetSpendRequestsParams, roles=["manager"])
        async def readonly(caller, params):
            raise sqlite3.OperationalError("attempt to write a readonly database")

        @d.method("big", m.GetSpendRequestsParams, roles=["manager"])
        async def big(caller, params):
            return {"blob": "x" * 500}


def frame(obj) -> bytes:
    return json.dumps(obj).encode()


def req(method, params=None, id=1, **extra) -> dict:
    obj = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        obj["params"] = params
    obj.update(extra)
    return obj


async def handle(service: Service, caller: Caller, obj_or_raw) -> dict | None:
    raw = obj_or_raw if isinstance(obj_or_raw, bytes) else frame(obj_or_raw)
    response = await service.dispatcher.handle(caller, raw)
    if response is None:
        return None
    assert isinstance(response, bytes)
    return json.loads(response.decode("utf-8"))


def error_of(response: dict) -> tuple[int, str, object]:
    assert set(response) == {"jsonrpc", "error", "id"}
    assert response["jsonrpc"] == "2.0"
    return response["error"]["code"], response["error"]["message"], response["id"]


@pytest.fixture
def service() -> Service:
    return Service()


# --- envelope ---------------------------------------------------------------------------

async def test_result_is_compact_utf8_json(service):
    raw = await service.dispatcher.handle(STAKEHOLDER, frame(req("get_sigs", {"id": ID}, id=7)))
    assert raw == ('{"jsonrpc":"2.0","result":{"signatures":{"%s":"%s"}},"id":7}'
                   % (PUB, SIG)).encode()
    assert service.calls == [("get_sigs", m.GetSigsParams(ID))]


@pytest.mark.parametrize("raw,why", [
    (b"{not json", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"jsonrpc":"2.0","method":"get_sigs","id":\xc3}', "not UTF-8"),
    (b'{"jsonrpc":"2.0","method":"get_spend_requests","id":NaN}', "NaN is not JSON"),
    (b'{"jsonrpc":"2.0","method":"get_spend_requests","id":1,"id":2}', "duplicate member name"),
    (b'{"method":"sig","params":{"id":"%s","id":"%s"},"id":1}' % (ID.encode(), ID.encode()),
     "duplicate member name"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"jsonrpc":"2.0"} trailing', "not JSON"),
])
async def test_parse_error(service, raw, why):
    code, message, rid = error_of(await handle(service, BOTH, raw))
    assert (code, rid) == (PARSE_ERROR, None)
    assert message == f"parse error: {why}"
    assert service.calls == []


@pytest.mark.parametrize("obj", [
    [req("get_sigs", {"id": ID})],                        # a batch
    [],
    "get_sigs", 5, None, True,
    {"jsonrpc": "1.0", "method": "get_sigs", "params": {"id": ID}, "id": 1},
    {"jsonrpc": 2.0, "method": "get_sigs", "params": {"id": ID}, "id": 1},
    {"jsonrpc": None, "method": "get_sigs", "params": {"id": ID}, "id": 1},
    {"jsonrpc": "2.0", "params": {"id": ID}, "id": 1},     # no method
    {"jsonrpc": "2.0", "method": 3, "id": 1},
    {"jsonrpc": "2.0", "method": None, "id": 1},
    req("get_sigs", {"id": ID}, id=True),
    req("get_sigs", {"id": ID}, id=False),
    req("get_sigs", {"id": ID}, id=1.5),
    req("get_sigs", {"id": ID}, id=1.0),
    req("get_sigs", {"id": ID}, id=None),
    req("get_sigs", {"id": ID}, id=[1]),
    req("get_sigs", {"id": ID}, id={"n": 1}),
    req("get_sigs", "params", id=1),
    req("get_sigs", 5, id=1),
    {"jsonrpc": "2.0", "method": "get_sigs", "params": None, "id": 1},
    {"jsonrpc": "2.0", "method": "get_sigs", "params": False},   # even without an id
])
async def test_invalid_request_answered_with_null_id(service, obj):
    code, message, rid = error_of(await handle(service, BOTH, obj))
    assert (code, rid) == (INVALID_REQUEST, None)
    assert message.startswith("invalid request: ")
    assert service.calls == []


async def test_batch_message_says_unsupported(service):
    _, message, _ = error_of(await handle(service, BOTH, [req("get_sigs", {"id": ID})]))
    assert "batch" in message


async def test_unknown_method_named_and_truncated(service):
    code, message, rid = error_of(await handle(service, BOTH, req("nope", {}, id=3)))
    assert (code, message, rid) == (METHOD_NOT_FOUND, "unknown method: nope", 3)
    long_name = "m" * 10_000
    code, message, _ = error_of(await handle(service, BOTH, req(long_name, {})))
    assert code == METHOD_NOT_FOUND
    assert message.startswith("unknown method: mmmm")
    assert len(message) < 100


@pytest.mark.parametrize("params,expected", [
    ({"id": "xyz"}, "id: expected 64 hex characters"),
    ({"id": ID.upper()}, "id: not lowercase hex"),
    ({"id": 5}, "id: not a string"),
    ({}, "id: missing"),
    (None, "id: missing"),                      # missing params means {}
    ([ID], "params: not an object"),            # by-position params are not supported
])
async def test_bad_params_name_the_field(service, params, expected):
    code, message, rid = error_of(await handle(service, MANAGER, req("get_sigs", params, id=9)))
    assert (code, message, rid) == (INVALID_PARAMS, expected, 9)
    assert service.calls == []


async def test_nested_params_error_names_the_pubkey(service):
    params = {"pubkey": PUB, "signature": SIG + "01", "id": ID}
    code, message, _ = error_of(await handle(service, STAKEHOLDER, req("sig", params)))
    assert (code, message) == (INVALID_PARAMS, "signature: not DER")


async def test_handler_params_error_is_invalid_params(service):
    code, message, _ = error_of(await handle(service, MANAGER, req("deep_check", {})))
    assert (code, message) == (INVALID_PARAMS, "tx: input index out of range")


async def test_forbidden_role(service):
    params = {"pubkey": PUB, "signature": SIG, "id": ID}
    code, message, rid = error_of(await handle(service, MANAGER, req("sig", params, id="x")))
    assert (code, rid) == (FORBIDDEN, "x")
    assert message == "sig may only be called by: stakeholder"
    code, message, _ = error_of(await handle(service, NOBODY, req("get_sigs", {"id": ID})))
    assert code == FORBIDDEN
    assert message == "get_sigs may only be called by: manager, stakeholder"
    assert service.calls == []


@pytest.mark.parametrize("params", [{"id": "bad"}, {}, [1, 2], None])
async def test_role_checked_before_params(service, params):
    code, _, _ = error_of(await handle(service, NOBODY, req("get_sigs", params)))
    assert code == FORBIDDEN
    code, _, _ = error_of(await handle(service, MANAGER, req("sig", params)))
    assert code == FORBIDDEN


async def test_any_listed_role_may_call(service):
    for caller in (STAKEHOLDER, MANAGER, BOTH):
        response = await handle(service, caller, req("get_sigs", {"id": ID}))
        assert response["result"] == {"signatures": {PUB: SIG}}
    response = await handle(service, BOTH, req("sig", {"pubkey": PUB, "signature": SIG, "id": ID}))
    assert response == {"jsonrpc": "2.0", "result": {"ack": True}, "id": 1}


async def test_internal_error_does_not_leak(service, caplog):
    caplog.set_level(logging.DEBUG, logger="revault.rpc")
    raw = await service.dispatcher.handle(MANAGER, frame(req("boom", {"note": SIG}, id=4)))
    assert json.loads(raw) == {"jsonrpc": "2.0", "id": 4,
                               "error": {"code": INTERNAL_ERROR, "message": "internal error"}}
    assert b"do-not-leak" not in raw and SIG.encode() not in raw
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    logged = errors[0].getMessage()
    assert "RuntimeError" in logged and "in boom" in logged     # type and traceback frames
    assert "do-not-leak" not in caplog.text and SIG not in caplog.text
    assert service.calls == [("boom", m.GetSpendRequestsParams())]


async def test_storage_error_logged_with_its_cause(service, caplog):
    caplog.set_level(logging.ERROR, logger="revault.rpc")
    code, message, _ = error_of(await handle(service, MANAGER, req("readonly", {})))
    assert (code, message) == (INTERNAL_ERROR, "internal error")
    [record] = caplog.records
    assert record.getMessage().startswith(
        "internal error in 'readonly' for roles=manager key=11223344: OperationalError: "
        "attempt to write a readonly database")


async def test_handler_returning_non_object_is_internal_error(service):
    code, message, _ = error_of(await handle(service, MANAGER, req("not_a_dict", {})))
    assert (code, message) == (INTERNAL_ERROR, "internal error")


async def test_rpc_error_from_handler_passes_through(service):
    code, message, rid = error_of(await handle(service, MANAGER, req("quota", {}, id="q")))
    assert (code, message, rid) == (REFUSED, "quota exceeded", "q")


async def test_response_too_large_is_refused():
    service = Service(max_response=200)
    code, message, rid = error_of(await handle(service, MANAGER, req("big", {}, id=2)))
    assert (code, message, rid) == (REFUSED, "response too large", 2)
    small = await handle(service, MANAGER, req("get_spend_requests", {}))
    assert small["result"] == {"requests": []}


async def test_default_response_cap_is_the_transport_frame():
    assert Dispatcher().max_response == transport.MAX_PLAINTEXT


@pytest.mark.parametrize("obj,caller,ran", [
    ({"jsonrpc": "2.0", "method": "get_sigs", "params": {"id": ID}}, MANAGER, True),
    ({"jsonrpc": "2.0", "method": "get_spend_requests"}, MANAGER, True),
    ({"jsonrpc": "2.0", "method": "nope", "params": {}}, MANAGER, False),
    ({"jsonrpc": "2.0", "method": "get_sigs", "params": {"id": "bad"}}, MANAGER, False),
    ({"jsonrpc": "2.0", "method": "sig", "params": {}}, MANAGER, False),
    ({"jsonrpc": "2.0", "method": "boom", "params": {}}, MANAGER, True),
    ({"jsonrpc": "2.0", "method": "quota", "params": {}}, MANAGER, False),
])
async def test_notifications_get_no_response(service, obj, caller, ran):
    assert await service.dispatcher.handle(caller, frame(obj)) is None
    assert bool(service.calls) == ran


async def test_missing_jsonrpc_is_accepted(service):
    response = await handle(service, MANAGER, {"method": "get_sigs", "params": {"id": ID}, "id": 5})
    assert response == {"jsonrpc": "2.0", "result": {"signatures": {PUB: SIG}}, "id": 5}


async def test_missing_params_mean_empty_object(service):
    response = await handle(service, MANAGER, {"jsonrpc": "2.0", "method": "get_spend_requests",
                                               "id": 1})
    assert response["result"] == {"requests": []}
    assert service.calls == [("get_spend_requests", m.GetSpendRequestsParams())]


async def test_unknown_members_ignored(service):
    response = await handle(service, MANAGER,
                            req("get_sigs", {"id": ID, "future": [1, {"x": None}]}, extra=1))
    assert response["result"] == {"signatures": {PUB: SIG}}


@pytest.mark.parametrize("rid", ["abc", "", "é\u20ac", 0, -5, 2**70, "x" * 1000])
async def test_ids_echoed(service, rid):
    response = await handle(service, MANAGER, req("get_spend_requests", {}, id=rid))
    assert response["id"] == rid and type(response["id"]) is type(rid)


async def test_lone_surrogate_id_echoed_as_valid_utf8(service):
    raw = b'{"jsonrpc":"2.0","method":"get_spend_requests","id":"\\ud800"}'
    response = await service.dispatcher.handle(MANAGER, raw)
    assert json.loads(response.decode("utf-8"))["id"] == "\ud800"


async def test_request_log_lines(service, caplog):
    caplog.set_level(logging.DEBUG, logger="revault.rpc")
    await handle(service, STAKEHOLDER, req("get_sigs", {"id": ID}))
    await handle(service, MANAGER, req("sig", {"id": ID, "pubkey": PUB, "signature": SIG}))
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert debug == ["request 'get_sigs' from roles=stakeholder key=aabbccdd",
                     "request 'sig' from roles=manager key=11223344"]
    assert info == [f"refused 'sig' ({FORBIDDEN} 'sig may only be called by: stakeholder') "
                    "for roles=manager key=11223344"]
    assert SIG not in caplog.text and ID not in caplog.text


def test_registration_mistakes_refused():
    d = Dispatcher()

    async def handler(caller, params):
        return {}

    d.method("a", m.GetSigsParams, roles=["manager"])(handler)
    with pytest.raises(ValueError):
        d.method("a", m.GetSigsParams, roles=["manager"])
    with pytest.raises(ValueError):
        d.method("b", m.GetSigsParams, roles=[])
    with pytest.raises(TypeError):
        d.method("c", m.GetSigsParams, roles="manager")


async def test_handle_never_raises_on_fuzzed_input(service):
    rng = random.Random(20240601)
    valid = [frame(req("get_sigs", {"id": ID})), frame(req("sig", {"pubkey": PUB,
                                                                    "signature": SIG, "id": ID})),
             frame(req("get_spend_requests")), frame(req("boom", {}, id="s"))]
    alphabet = b'{}[]":,0123456789.-+eE truefalsnu\\\x00\xff\xc3\xa9'
    for i in range(3000):
        if i % 3 == 0:
            raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        else:
            buf = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(3)
                pos = rng.randrange(len(buf) + 1)
                if op == 0 and buf:
                    del buf[min(pos, len(buf) - 1)]
                elif op == 1:
                    buf.insert(pos, rng.choice(alphabet))
                elif buf:
                    buf[min(pos, len(buf) - 1)] = rng.choice(alphabet)
            raw = bytes(buf)
        caller = rng.choice([STAKEHOLDER, MANAGER, BOTH, NOBODY])
        response = await service.dispatcher.handle(caller, raw)
        if response is None:
            continue
        obj = json.loads(response.decode("utf-8"))
        assert obj["jsonrpc"] == "2.0" and "id" in obj
        assert ("result" in obj) != ("error" in obj)
        if "error" in obj:
            assert obj["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND,
                                            INVALID_PARAMS, FORBIDDEN, INTERNAL_ERROR)
            assert "do-not-leak" not in obj["error"]["message"]


# --- pure request/response helpers ------------------------------------------------------

def test_encode_request_and_notification():
    assert rpc.encode_request("get_sigs", {"id": ID}, 3) == \
        ('{"jsonrpc":"2.0","method":"get_sigs","params":{"id":"%s"},"id":3}' % ID).encode()
    assert rpc.encode_request("sig", {}) == b'{"jsonrpc":"2.0","method":"sig","params":{}}'


@pytest.mark.parametrize("raw", [
    b"nope", b"[]", b'{"jsonrpc":"2.0","id":1}', b'{"jsonrpc":"2.0","result":{},"error":{},"id":1}',
    b'{"jsonrpc":"2.0","result":{}}', b'{"jsonrpc":"2.0","result":{},"id":true}',
    b'{"jsonrpc":"1.0","result":{},"id":1}', b'{"jsonrpc":"2.0","error":"bad","id":1}',
    b'{"jsonrpc":"2.0","error":{"code":"x","message":"m"},"id":1}',
    b'{"jsonrpc":"2.0","error":{"code":true,"message":"m"},"id":1}',
    b'{"jsonrpc":"2.0","error":{"code":1},"id":1}',
])
def test_decode_response_refuses_malformed(raw):
    with pytest.raises(rpc.ProtocolError):
        rpc.decode_response(raw)


def test_token_bucket_burst_then_paced():
    bucket = rpc.TokenBucket(2.0, now=100.0)
    # The burst passes at once; beyond it each token is lent against the refill.
    assert [bucket.reserve(100.0) for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    assert bucket.reserve(101.25) == 0.25      # the debt of 2 is half repaid
    assert bucket.reserve(1000.0) == 0.0       # capped at the burst
    assert bucket.reserve(1000.0) == 0.0
    assert bucket.reserve(1000.0) == 0.5
    slow = rpc.TokenBucket(0.5, now=0.0)
    assert slow.capacity == 1.0
    assert [slow.reserve(0.0), slow.reserve(0.0)] == [0.0, 2.0]
    with pytest.raises(ValueError):
        rpc.TokenBucket(0, now=0.0)


class FakeClock:
    """Time that passes only when the pacer sleeps: pacing checked without waiting."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


# --- serve_connection over an in-memory connection ----------------------------------------

class FakeConnection:
    """The NoiseConnection interface over a fixed list of incoming frames."""

    def __init__(self, incoming: list[bytes], end: Exception | None = None):
        self.incoming = deque(incoming)
        self.end = end or ConnectionClosed("eof")
        self.sent: list[bytes] = []
        self.closed = False
        self.peer_public = MANAGER.public_key

    def deliver_to(self, ready) -> None:
        pass  # every frame is queued already: serve_connection's task takes them

    @property
    def receivable(self) -> bool:
        return True

    def recv_nowait(self) -> bytes:
        if self.closed or not self.incoming:
            raise self.end
        return self.incoming.popleft()

    async def send(self, plaintext: bytes) -> None:
        if self.closed:
            raise ConnectionClosed("closed")
        self.sent.append(bytes(plaintext))

    async def close(self) -> None:
        self.closed = True


async def test_serve_connection_answers_in_order_then_closes(service):
    conn = FakeConnection([
        frame(req("get_spend_requests", id=1)),
        frame({"jsonrpc": "2.0", "method": "get_sigs", "params": {"id": ID}}),   # notification
        b"garbage",
        frame(req("sig", {}, id=2)),
        frame(req("get_sigs", {"id": ID}, id="last")),
    ])
    await serve_connection(conn, service.dispatcher, MANAGER)
    answers = [json.loads(s) for s in conn.sent]
    assert [a["id"] for a in answers] == [1, None, 2, "last"]
    assert answers[1]["error"]["code"] == PARSE_ERROR
    assert answers[2]["error"]["code"] == FORBIDDEN
    assert answers[3]["result"] == {"signatures": {PUB: SIG}}
    assert [c[0] for c in service.calls] == ["get_spend_requests", "get_sigs", "get_sigs"]
    assert conn.closed


async def test_serve_connection_ends_on_broken_frame(service):
    conn = FakeConnection([frame(req("get_spend_requests"))],
                          end=transport.TransportError("bad frame"))
    await serve_connection(conn, service.dispatcher, MANAGER)
    assert len(conn.sent) == 1 and conn.closed


async def test_serve_connection_paces_per_key_and_never_refuses(service):
    # 4 per second, burst 4: two connections of one key share the budget, so 12 requests
    # cost 8 refills (2 s); every one is answered with its result.
    clock = FakeClock()
    pacer = rpc.RequestPacer(4.0, clock=clock, sleep=clock.sleep)
    conns = [FakeConnection([frame(req("get_spend_requests", id=i)) for i in range(6)])
             for _ in range(2)]
    await asyncio.gather(*(serve_connection(c, service.dispatcher, MANAGER, pacer)
                           for c in conns))
    for conn in conns:
        answers = [json.loads(s) for s in conn.sent]
        assert answers == [{"jsonrpc": "2.0", "result": {"requests": []}, "id": i}
                           for i in range(6)]
    assert len(service.calls) == 12
    assert clock.now == pytest.approx(2.0)
    # Another key has its own budget: its burst passes without waiting.
    other = FakeConnection([frame(req("get_sigs", {"id": ID}, id=i)) for i in range(4)])
    before = len(clock.sleeps)
    await serve_connection(other, service.dispatcher, STAKEHOLDER, pacer)
    assert len(clock.sleeps) == before and len(other.sent) == 4


async def test_serve_connection_lets_others_run_between_requests(service):
    # Neither this connection nor the handler ever waits: without a yield per request a
    # pipelined backlog would hold the event loop until it is all answered.
    conn = FakeConnection([frame(req("get_spend_requests", id=i)) for i in range(50)])
    seen: list[int] = []

    async def someone_else() -> None:
        while True:
            seen.append(len(conn.sent))
            await asyncio.sleep(0)

    other = asyncio.create_task(someone_else())
    await asyncio.sleep(0)
    await serve_connection(conn, service.dispatcher, MANAGER)
    other.cancel()
    assert len(conn.sent) == 50
    assert len(set(seen)) >= 40


@dataclasses.dataclass(frozen=True)
class AnyParams:
    value: object

    @classmethod
    def parse(cls, obj) -> "AnyParams":
        return cls(obj)


def gated_dispatcher(gate: asyncio.Event, events: list) -> rpc.Dispatcher:
    """"slow" waits for `gate` (under an asyncio.timeout set before it first waits);
    "fast" never waits; "whose" says which task runs it. Each logs what it does."""
    dispatcher = rpc.Dispatcher()

    @dispatcher.method("slow", AnyParams, ["manager"])
    async def slow(caller, params):
        events.append(("start", "slow", asyncio.current_task()))
        try:
            async with asyncio.timeout(params.value.get("timeout", 30)):
                await gate.wait()
        except TimeoutError:
            events.append(("timeout", "slow", asyncio.current_task()))
            return {"slow": "timed out"}
        events.append(("end", "slow", asyncio.current_task()))
        return {"slow": True}

    @dispatcher.method("fast", AnyParams, ["manager"])
    async def fast(caller, params):
        events.append(("start", "fast", asyncio.current_task()))
        return {"fast": True}

    return dispatcher


async def start_serving(dispatcher) -> tuple[PipeEnd, PipeEnd, asyncio.Task]:
    client_end, server_end = pipe()
    task = asyncio.create_task(serve_connection(server_end, dispatcher, MANAGER))
    await client_end.send(frame(req("fast", {}, id=0)))  # the first request starts it
    assert json.loads(await client_end.recv())["id"] == 0
    for _ in range(3):
        await asyncio.sleep(0)  # the connection's task waits for the next request now
    return client_end, server_end, task


async def from_callback(end: PipeEnd, raw: bytes) -> None:
    """Deliver `raw` to `end` from an event-loop callback (no task running), as the
    transport's protocol does, and let that callback run."""
    asyncio.get_running_loop().call_soon(end.put, raw)
    await asyncio.sleep(0)


async def test_serve_connection_starts_requests_in_the_callback_as_its_own_task():
    gate, events = asyncio.Event(), []
    client_end, server_end, task = await start_serving(gated_dispatcher(gate, events))
    events.clear()
    # Delivered straight from a callback (no task running): the request runs at once,
    # and asyncio sees it as the connection's task, so asyncio.timeout works in it.
    await from_callback(server_end, frame(req("fast", {}, id=1)))
    assert events == [("start", "fast", task)] and len(server_end.sent) == 2
    assert asyncio.current_task() is not task   # and the callback left it properly
    assert json.loads(await client_end.recv())["id"] == 1
    await from_callback(server_end, frame(req("slow", {"timeout": 0.05}, id=2)))
    assert events[-1] == ("start", "slow", task)
    # It suspended in the callback; the connection's task went on with it, and its
    # timeout (set in the callback) fired in that task.
    assert json.loads(await client_end.recv()) == {"jsonrpc": "2.0", "id": 2,
                                                   "result": {"slow": "timed out"}}
    assert events[-1] == ("timeout", "slow", task)
    await client_end.close()
    await asyncio.wait_for(task, 5)


async def test_serve_connection_a_waiting_request_holds_the_next_one_back():
    gate, events = asyncio.Event(), []
    client_end, server_end, task = await start_serving(gated_dispatcher(gate, events))
    events.clear()
    await client_end.send(frame(req("slow", {}, id=1)))
    await client_end.send(frame(req("fast", {}, id=2)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert [e[:2] for e in events] == [("start", "slow")] and len(server_end.sent) == 1
    gate.set()
    answers = [json.loads(await client_end.recv()) for _ in range(2)]
    assert [a["id"] for a in answers] == [1, 2]
    assert [e[:2] for e in events] == [("start", "slow"), ("end", "slow"), ("start", "fast")]
    await client_end.close()
    await asyncio.wait_for(task, 5)


async def test_serve_connection_cancelled_cancels_the_request_it_waits_on():
    gate, events = asyncio.Event(), []
    client_end, server_end, task = await start_serving(gated_dispatcher(gate, events))
    events.clear()
    await from_callback(server_end, frame(req("slow", {}, id=1)))  # suspends there
    assert [e[:2] for e in events] == [("start", "slow")]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert [e[:2] for e in events] == [("start", "slow")] and server_end.closed


def parking_dispatcher(futures: list, events: list) -> rpc.Dispatcher:
    """"write" waits for a ResumableFuture it appends to `futures` (as a store's write
    waits for its group's COMMIT), under its own timeout; it logs which task resumed it."""
    dispatcher = rpc.Dispatcher()

    @dispatcher.method("write", AnyParams, ["manager"])
    async def write(caller, params):
        future = ResumableFuture()
        futures.append(future)
        try:
            async with asyncio.timeout(params.value.get("timeout", 30)):
                result = await future
        except TimeoutError:
            events.append(("timeout", asyncio.current_task()))
            return {"write": "timed out"}
        except asyncio.CancelledError:
            events.append(("cancelled", asyncio.current_task()))
            raise
        events.append(("resumed", asyncio.current_task()))
        return {"write": result}

    @dispatcher.method("fast", AnyParams, ["manager"])
    async def fast(caller, params):
        return {"fast": True}

    return dispatcher


async def test_serve_connection_resumes_a_parked_request_inside_the_futures_setter():
    futures, events = [], []
    client_end, server_end, task = await start_serving(parking_dispatcher(futures, events))
    await from_callback(server_end, frame(req("write", {}, id=1)))
    assert len(futures) == 1 and len(server_end.sent) == 1
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(server_end.sent) == 1          # parked: nothing drives it but the future
    # Resolved from a plain callback, as the writer's COMMIT callback does: the answer
    # is sent before set_result returns, by the connection's task.
    sent_inside = []
    asyncio.get_running_loop().call_soon(
        lambda: (futures[0].set_result("ok"), sent_inside.append(len(server_end.sent))))
    await asyncio.sleep(0)
    assert sent_inside == [2] and events == [("resumed", task)]
    assert json.loads(await client_end.recv())["result"] == {"write": "ok"}
    # The connection takes its next request from the callback again.
    await from_callback(server_end, frame(req("fast", {}, id=2)))
    assert len(server_end.sent) == 3
    assert json.loads(await client_end.recv())["id"] == 2
    # Resolved from inside a task, it is resumed on a later turn all the same.
    await from_callback(server_end, frame(req("write", {}, id=3)))
    futures[1].set_result("later")
    assert len(server_end.sent) == 3
    assert json.loads(await client_end.recv())["result"] == {"write": "later"}
    assert events[-1] == ("resumed", task)
    await client_end.close()
    await asyncio.wait_for(task, 5)


async def test_serve_connection_a_parked_requests_timeout_and_cancellation_reach_it():
    futures, events = [], []
    client_end, server_end, task = await start_serving(parking_dispatcher(futures, events))
    await from_callback(server_end, frame(req("write", {"timeout": 0.05}, id=1)))
    assert json.loads(await client_end.recv())["result"] == {"write": "timed out"}
    assert events == [("timeout", task)]
    futures[0].set_result("too late")       # the writer settles it later: no effect
    await from_callback(server_end, frame(req("write", {}, id=2)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events[-1] == ("cancelled", task) and server_end.closed
    futures[1].set_result("after the end")  # nothing is left to resume
    await asyncio.sleep(0)
    assert len(server_end.sent) == 2


# --- RpcClient ------------------------------------------------------------------------

class PipeEnd:
    """One end of an in-memory duplex connection with the NoiseConnection interface:
    recv (a client's pull), or deliver_to and recv_nowait (serve_connection's push, with
    ready() called synchronously as the transport's protocol callback does)."""

    def __init__(self, peer_public: bytes):
        self.inbox: deque[bytes] = deque()
        self.ended = False
        self.other: PipeEnd | None = None
        self.peer_public = peer_public
        self.closed = False
        self.sent: list[bytes] = []
        self.ready = None
        self.waiter: asyncio.Future | None = None

    def put(self, item: bytes | None) -> None:
        """What the other end sent (None: it closed)."""
        if item is None:
            self.ended = True
        else:
            self.inbox.append(item)
        if self.ready is not None:
            self.ready()
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def send(self, plaintext: bytes) -> None:
        if self.closed:
            raise ConnectionClosed("closed")
        self.sent.append(bytes(plaintext))
        # Delivered from a callback, as a socket's data would be.
        asyncio.get_running_loop().call_soon(self.other.put, bytes(plaintext))

    def deliver_to(self, ready) -> None:
        self.ready = ready
        if self.receivable:
            ready()

    @property
    def receivable(self) -> bool:
        return bool(self.inbox) or self.ended or self.closed

    def recv_nowait(self) -> bytes | None:
        if self.inbox and not self.closed:
            return self.inbox.popleft()
        if self.ended or self.closed:
            self.closed = True
            raise ConnectionClosed("eof")
        return None

    async def recv(self, timeout: float | None = None) -> bytes:
        while True:
            if self.closed:
                raise ConnectionClosed("closed")
            if self.inbox:
                return self.inbox.popleft()
            if self.ended:
                self.closed = True
                raise ConnectionClosed("eof")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            loop = asyncio.get_running_loop()
            loop.call_soon(self.other.put, None)
            loop.call_soon(self.put, None)


def pipe() -> tuple[PipeEnd, PipeEnd]:
    client, server = PipeEnd(b"\x02" * 32), PipeEnd(MANAGER.public_key)
    client.other, server.other = server, client
    return client, server


@pytest.fixture
async def served(service):
    client_end, server_end = pipe()
    task = asyncio.create_task(serve_connection(server_end, service.dispatcher, MANAGER))
    client = RpcClient(client_end)
    yield client, client_end
    await client.close()
    await task


async def test_client_call_and_incrementing_ids(served):
    client, end = served
    assert await client.call("get_sigs", {"id": ID}) == {"signatures": {PUB: SIG}}
    assert await client.call("get_spend_requests", m.GetSpendRequestsParams()) == {"requests": []}
    assert [json.loads(s)["id"] for s in end.sent] == [1, 2]


async def test_client_raises_rpc_error(served):
    client, _ = served
    with pytest.raises(RpcError) as info:
        await client.call("get_sigs", {"id": "nope"})
    assert (info.value.code, info.value.message) == (INVALID_PARAMS,
                                                     "id: expected 64 hex characters")
    with pytest.raises(RpcError) as info:
        await client.call("sig", {"pubkey": PUB, "signature": SIG, "id": ID})
    assert info.value.code == FORBIDDEN
    # An error answer leaves the connection usable.
    assert await client.call("get_spend_requests", {}) == {"requests": []}


async def test_client_notify_sends_no_id(served, service):
    client, end = served
    await client.notify("get_sigs", {"id": ID})
    assert "id" not in json.loads(end.sent[0])
    # Requests are served in order, so once this answers the notification has run.
    await client.call("get_spend_requests", {})
    assert [c[0] for c in service.calls] == ["get_sigs", "get_spend_requests"]


async def test_client_timeout_closes_connection():
    client_end, server_end = pipe()      # nobody serves the other end
    client = RpcClient(client_end)
    with pytest.raises(TimeoutError):
        await client.call("get_spend_requests", {}, timeout=0.05)
    assert client.closed
    with pytest.raises(ConnectionClosed):
        await client.call("get_spend_requests", {})


async def test_client_refuses_mismatched_id():
    client_end, server_end = pipe()
    client = RpcClient(client_end)
    server_end.other.put(b'{"jsonrpc":"2.0","result":{},"id":99}')
    with pytest.raises(rpc.ProtocolError):
        await client.call("get_spend_requests", {})
    assert client.closed


@pytest.mark.parametrize("reply", [
    b'{"jsonrpc":"2.0","error":{"code":-32602,"message":"id: missing"},"id":7}',
    b'{"jsonrpc":"2.0","error":{"code":-32602,"message":"id: missing"},"id":"1"}',
    b'{"jsonrpc":"2.0","result":{},"id":"1"}',
    b'{"jsonrpc":"2.0","result":[],"id":1}',
])
async def test_client_refuses_answers_to_another_request(reply):
    client_end, server_end = pipe()
    client = RpcClient(client_end)
    server_end.other.put(reply)
    with pytest.raises(rpc.ProtocolError):
        await client.call("get_spend_requests", {})
    assert client.closed


async def test_client_accepts_null_id_error_as_the_answer():
    client_end, server_end = pipe()
    client = RpcClient(client_end)
    server_end.other.put(
        b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"parse error: not JSON"},"id":null}')
    with pytest.raises(RpcError) as info:
        await client.call("get_spend_requests", {})
    assert info.value.code == PARSE_ERROR
    assert not client.closed


# --- real Noise loopback ----------------------------------------------------------------

async def test_loopback_over_noise(service):
    server_key, client_key, stranger_key = b"\x03" * 32, b"\x04" * 32, b"\x05" * 32
    client_pub = transport.public_key(client_key)

    async def handler(conn):
        roles = frozenset({"manager"}) if conn.peer_public == client_pub else frozenset()
        await serve_connection(conn, service.dispatcher, Caller(conn.peer_public, roles))

    server = await transport.start_server("127.0.0.1", 0, server_key,
                                          [client_pub, transport.public_key(stranger_key)],
                                          handler)
    try:
        async with await RpcClient.connect("127.0.0.1", server.port, client_key,
                                           transport.public_key(server_key)) as client:
            assert await client.call("get_sigs", {"id": ID}, timeout=5) == \
                {"signatures": {PUB: SIG}}
            with pytest.raises(RpcError) as info:
                await client.call("sig", {"pubkey": PUB, "signature": SIG, "id": ID}, timeout=5)
            assert info.value.code == FORBIDDEN
        async with await RpcClient.connect("127.0.0.1", server.port, stranger_key,
                                           transport.public_key(server_key)) as stranger:
            with pytest.raises(RpcError) as info:
                await stranger.call("get_sigs", {"id": ID}, timeout=5)
            assert info.value.code == FORBIDDEN
    finally:
        await server.close()


@pytest.mark.parametrize("obj", [
    {"jsonrpc": "2.0", "result": {"ack": True}, "id": 1},
    {"a": "\x00\x1f\x7f\u2028\u2029/\"\\é€😀", "b": [1, -2, 0, 2**63 - 1, -(2**63)], "c": None},
    {"big": 2**64, "neg": -(2**70)},                  # beyond orjson's 64 bits
    {"id": "\ud800", "x": ["\udfff"]},                 # lone surrogates
    {"f": 1.5, "g": [0.1, -2e-300, 1e300]},
    {"nested": {"deep": [[{"k": "v"}]]}, "empty": {}, "list": []},
    ["top", "level", "list"], "string", 5, True, None, {1: "an int key, as json writes it"},
])
def test_dumps_writes_what_json_writes(obj):
    from revault.rpc import _dumps, _dumps_with_json
    assert _dumps(obj) == _dumps_with_json(obj)


@pytest.mark.parametrize("obj", [
    {"x": float("nan")}, {"x": [float("inf")]}, {"id": None, "x": -float("inf")},
    {"x": object()}, {"x": {1, 2}},
])
def test_dumps_refuses_what_json_refuses(obj):
    from revault.rpc import _dumps
    with pytest.raises((TypeError, ValueError)):
        _dumps(obj)
