"""JSON-RPC 2.0 envelope, dispatch by method with role checks, error codes.

The envelope is pure (bytes in, parsed request or error out; response objects in,
bytes out) so it can be tested and fuzzed without sockets; `serve_connection` and
`RpcClient` are thin asyncio loops around it and a transport.NoiseConnection.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
import traceback
import types
from dataclasses import dataclass
from typing import (Any, Awaitable, Callable, Coroutine, Generator, Iterable, Mapping,
                    Protocol)

import orjson

from revault import transport
from revault.errors import (
    FORBIDDEN, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND,
    PARSE_ERROR, REFUSED, Forbidden, InternalError, InvalidRequest, ParseError, Refused,
    UnknownMethod, WireError, error_from_wire,
)
from revault.log_limit import LimitedLog
from revault.metrics import COMMON as METRICS
from revault.resumable_future import ResumableFuture
from revault.storage import storage_error_cause

log = logging.getLogger("revault.rpc")

__all__ = [
    "PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS", "FORBIDDEN",
    "REFUSED", "INTERNAL_ERROR", "RpcError", "ProtocolError", "Caller", "Request",
    "Response", "decode_request", "encode_result", "encode_error", "encode_request",
    "decode_response", "Handler", "MethodSpec", "Dispatcher", "TokenBucket", "RequestPacer",
    "serve_connection", "RpcClient",
]

# Untrusted method names end up in error messages and log lines: echo only a prefix.
MAX_METHOD_ECHO = 64
MAX_LOGGED_MESSAGE = 200

# The name this module gave errors.WireError before errors.py existed; the same class.
RpcError = WireError

# How each code is named in metrics (revault_requests_total's outcome label).
ERROR_NAMES = {
    PARSE_ERROR: "parse_error", INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found", INVALID_PARAMS: "invalid_params",
    FORBIDDEN: "forbidden", REFUSED: "refused", INTERNAL_ERROR: "internal_error",
}


class ProtocolError(Exception):
    """The server sent something that is not a JSON-RPC response to our call."""


@dataclass(frozen=True)
class Caller:
    public_key: bytes                 # the peer's Noise static key
    roles: frozenset[str]             # e.g. {"stakeholder", "manager"}

    def describe(self) -> str:
        """Roles and key prefix: enough to tell peers apart in a log, nothing more."""
        roles = ",".join(sorted(self.roles)) or "-"
        return f"roles={roles} key={transport.key_prefix(self.public_key)}"


# --- pure envelope ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Request:
    method: str
    params: Any                       # the raw params member; {} when absent
    id: int | str | None              # None only for a notification
    notification: bool


@dataclass(frozen=True, slots=True)
class Response:
    id: int | str | None
    result: Any = None
    error: WireError | None = None


class _JsonRefused(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _JsonRefused(f"{name} is not JSON")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict:
    # Two parsers that keep different duplicates would read one signed opinion two ways.
    # Built by dict() in C: fewer members than pairs means a name came twice.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _JsonRefused("duplicate member name")
    return obj


# One decoder for every frame: json.loads with these arguments would build (and set up
# the scanner of) a new one per call, a third of the cost of decoding a request.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_unique_members)


def _loads(raw: bytes) -> Any:
    """Strict JSON from UTF-8 bytes; ValueError with a message safe to send back."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    try:
        return _DECODER.decode(text)
    except _JsonRefused as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:
        # json's own messages are fine but say nothing the client can act on.
        raise ValueError("not JSON") from None


# orjson writes what json.dumps(separators=(",", ":"), ensure_ascii=False) writes, byte for
# byte, 25 to 60 times faster (a 45 KB get_spend_requests page: 33 us instead of 850 us).
# Types it would encode where json refuses go to the json path below, which refuses them
# the same way; so do what it refuses (lone surrogates, integers beyond 64 bits).
_ORJSON_STRICT = (orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
                  | orjson.OPT_PASSTHROUGH_SUBCLASS)


def _has_non_finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, dict):
        return any(_has_non_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_non_finite(v) for v in obj)
    return False


def _dumps(obj: Any) -> bytes:
    try:
        data = orjson.dumps(obj, option=_ORJSON_STRICT)
    except TypeError:
        return _dumps_with_json(obj)
    # orjson writes NaN and infinities as null; json (allow_nan=False) refuses them.
    if b"null" in data and _has_non_finite(obj):
        raise ValueError("Out of range float values are not JSON compliant")
    return data


def _dumps_with_json(obj: Any) -> bytes:
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (sent to us as a "\ud800" escape, e.g. in a string id) has
        # no UTF-8 form; ASCII escapes carry it back unchanged.
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _echo(name: str) -> str:
    return name if len(name) <= MAX_METHOD_ECHO else name[:MAX_METHOD_ECHO] + "..."


def decode_request(raw: bytes) -> Request | ParseError | InvalidRequest:
    """Parse one frame into a request, or the -32700/-32600 error that answers it (with
    "id":null: the frame's id, if any, could not be trusted)."""
    try:
        obj = _loads(raw)
    except ValueError as e:
        return ParseError(f"parse error: {e}")
    if isinstance(obj, list):
        return InvalidRequest("invalid request: batches are not supported")
    if not isinstance(obj, dict):
        return InvalidRequest("invalid request: not an object")
    if "jsonrpc" in obj and obj["jsonrpc"] != "2.0":
        return InvalidRequest('invalid request: jsonrpc must be "2.0"')
    method = obj.get("method")
    if not isinstance(method, str):
        return InvalidRequest("invalid request: method must be a string")
    notification = "id" not in obj
    request_id = obj.get("id")
    if not notification and not _valid_id(request_id):
        return InvalidRequest("invalid request: id must be an integer or a string")
    params = obj.get("params", {})
    # An array is valid JSON-RPC (by-position params) that our methods do not take:
    # that is the params parser's -32602. Anything else is not JSON-RPC at all.
    if not isinstance(params, (dict, list)):
        return InvalidRequest("invalid request: params must be an object")
    return Request(method=method, params=params, id=request_id, notification=notification)


def encode_result(request_id: int | str | None, result: dict) -> bytes:
    return _dumps({"jsonrpc": "2.0", "result": result, "id": request_id})


def encode_error(request_id: int | str | None, code: int, message: str) -> bytes:
    return _dumps({"jsonrpc": "2.0", "error": {"code": code, "message": message},
                   "id": request_id})


def encode_request(method: str, params: dict, request_id: int | str | None = None) -> bytes:
    """A request, or a notification when request_id is None."""
    obj: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
    if request_id is not None:
        obj["id"] = request_id
    return _dumps(obj)


def decode_response(raw: bytes) -> Response:
    """Parse a response frame; ProtocolError if it is not a well-formed response."""
    try:
        obj = _loads(raw)
    except ValueError as e:
        raise ProtocolError(f"response: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("response: not an object")
    if "jsonrpc" in obj and obj["jsonrpc"] != "2.0":
        raise ProtocolError('response: jsonrpc is not "2.0"')
    if "id" not in obj or not (obj["id"] is None or _valid_id(obj["id"])):
        raise ProtocolError("response: missing or invalid id")
    if ("result" in obj) == ("error" in obj):
        raise ProtocolError("response: needs exactly one of result and error")
    if "result" in obj:
        return Response(id=obj["id"], result=obj["result"])
    error = obj["error"]
    if (not isinstance(error, dict) or not isinstance(error.get("message"), str)
            or not isinstance(error.get("code"), int) or isinstance(error.get("code"), bool)):
        raise ProtocolError("response: malformed error")
    return Response(id=obj["id"], error=error_from_wire(error["code"], error["message"]))


# --- dispatch -------------------------------------------------------------------------

Handler = Callable[[Caller, Any], Awaitable[Any]]


class MethodSpec(Protocol):
    """One row of a method table (messages.py's `Method`): what the dispatcher needs."""

    @property
    def params(self) -> type: ...

    @property
    def result(self) -> type: ...

    @property
    def roles(self) -> frozenset[str]: ...


@dataclass(frozen=True, slots=True)
class _Method:
    params: type
    roles: frozenset[str]
    handler: Handler
    result: type | None  # when set, a handler returning anything else is a bug


def _log_internal(method: str, caller: Caller, exc: BaseException) -> None:
    # The frames say where it failed; the exception's message is left out because it
    # may quote params values (signatures) or worse. SQLite's own messages never do, and
    # they are the cause an operator needs (read-only file, disk full, I/O error).
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    log.error("internal error in %r for %s: %s\n%s", _echo(method), caller.describe(),
              storage_error_cause(exc) or type(exc).__qualname__, frames)


def _log_refusal(notices: LimitedLog, method: str, error: WireError,
                 caller: Caller) -> None:
    # Error messages are what the peer is told anyway (never params values), but may
    # echo a hostile map key or method name: repr keeps a log record on one line. A peer
    # can be refused as often as its pace allows: past a few lines a minute, counted.
    notices.log(logging.INFO, caller.public_key, "refused %r (%d %r) for %s", _echo(method),
                error.code, error.message[:MAX_LOGGED_MESSAGE], caller.describe())


class Dispatcher:
    """Routes requests to handlers, checks roles, and answers every errors.WireError a
    params class, handler or store raises with its own code: the one place where
    errors become answers."""

    def __init__(self, *, max_response: int | None = None):
        self._methods: dict[str, _Method] = {}
        # A response the transport cannot carry would otherwise kill the connection.
        self.max_response = transport.MAX_PLAINTEXT if max_response is None else max_response
        self._refusals = LimitedLog(log)

    def method(self, name: str, params: type, roles: Iterable[str], *,
               result: type | None = None):
        """Decorator: register `async def handler(caller, params_obj)` returning a dict or
        an object with to_json() (an instance of `result` when given). `params` is a
        messages.py class whose `parse(obj)` raises errors.InvalidParams."""
        if isinstance(roles, str):
            raise TypeError("roles must be an iterable of role names, not one string")
        allowed = frozenset(roles)
        if not allowed:
            raise ValueError(f"method {name!r} needs at least one role")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")

        def register(handler: Handler) -> Handler:
            self._methods[name] = _Method(params=params, roles=allowed, handler=handler,
                                          result=result)
            return handler

        return register

    def serve_table(self, table: Mapping[str, MethodSpec],
                    handlers: Mapping[str, Handler]) -> None:
        """Register one handler per method of `table` (a daemon's rows of messages.py's
        method table), with the table's params class, result class and roles.

        A method of the table without a handler, or a handler for a method the table
        does not list, is a ValueError: the daemon does not start half-serving its API.
        """
        unserved = sorted(table.keys() - handlers.keys())
        unlisted = sorted(handlers.keys() - table.keys())
        if unserved or unlisted:
            problems = ([f"no handler for {', '.join(unserved)}"] if unserved else []) + \
                       ([f"not in the method table: {', '.join(unlisted)}"] if unlisted else [])
            raise ValueError("; ".join(problems))
        for name, spec in table.items():
            self.method(name, spec.params, spec.roles, result=spec.result)(handlers[name])

    async def handle(self, caller: Caller, raw: bytes) -> bytes | None:
        """Never raises. Returns the encoded response, or None for a notification.
        Role is checked before params are parsed or the handler runs (-32001)."""
        started = time.perf_counter()
        try:
            request = decode_request(raw)
            if isinstance(request, WireError):
                return self._envelope_error(caller, request, started)
            if log.isEnabledFor(logging.DEBUG):  # describe() costs, even when not logged
                log.debug("request %r from %s", _echo(request.method), caller.describe())
            outcome = await self._run(caller, request)
            if isinstance(outcome, WireError):
                code = outcome.code
                response = encode_error(request.id, code, outcome.message)
            elif request.notification:
                response, code = None, 0
            else:
                response, code = self._encode(caller, request, outcome)
            self._count(request.method, code, started)
            return None if request.notification else response
        except Exception as e:
            # Only a bug in this module gets here: still answer, never crash the loop.
            _log_internal("?", caller, e)
            return encode_error(None, INTERNAL_ERROR, "internal error")

    def _count(self, method: str, code: int, started: float) -> None:
        """Metrics of one answered request; method names nobody registered count as one."""
        METRICS.request_done(method if method in self._methods else "unknown",
                             ERROR_NAMES.get(code, "error") if code else "ok",
                             time.perf_counter() - started)

    def _envelope_error(self, caller: Caller, error: WireError, started: float) -> bytes:
        _log_refusal(self._refusals, "", error, caller)
        METRICS.request_done("invalid", ERROR_NAMES.get(error.code, "error"),
                             time.perf_counter() - started)
        return encode_error(None, error.code, error.message)

    async def _run(self, caller: Caller, request: Request) -> dict | WireError:
        """The result as a JSON object, or the error that answers the request."""
        outcome = await self._call(caller, request)
        if isinstance(outcome, WireError) and outcome.code != INTERNAL_ERROR:
            _log_refusal(self._refusals, request.method, outcome, caller)
        return outcome

    async def _call(self, caller: Caller, request: Request) -> dict | WireError:
        entry = self._methods.get(request.method)
        if entry is None:
            return UnknownMethod(f"unknown method: {_echo(request.method)}")
        if not caller.roles & entry.roles:
            return Forbidden(f"{request.method} may only be called by: "
                             f"{', '.join(sorted(entry.roles))}")
        try:
            params = entry.params.parse(request.params)
            result = await entry.handler(caller, params)
            if entry.result is not None and not isinstance(result, entry.result):
                raise TypeError(f"handler returned {type(result).__qualname__}, "
                                f"not {entry.result.__qualname__}")
            if hasattr(result, "to_json"):
                result = result.to_json()
            if not isinstance(result, dict):
                raise TypeError(f"handler returned {type(result).__qualname__}, not a dict")
            return result
        except WireError as e:
            # Raised by parse, by a handler that validates deeper (e.g. a PSBT), or by a
            # store refusing a write: each already knows its code and message.
            return e
        except Exception as e:
            _log_internal(request.method, caller, e)
            return InternalError("internal error")

    def _encode(self, caller: Caller, request: Request, outcome: dict) -> tuple[bytes, int]:
        """The response to a result, and its error code (0: the result went out)."""
        try:
            response = encode_result(request.id, outcome)
        except (TypeError, ValueError) as e:
            _log_internal(request.method, caller, e)
            return encode_error(request.id, INTERNAL_ERROR, "internal error"), INTERNAL_ERROR
        if len(response) > self.max_response:
            _log_refusal(self._refusals, request.method,
                         Refused(f"response of {len(response)} bytes"), caller)
            return encode_error(request.id, REFUSED, "response too large"), REFUSED
        return response, 0


# --- asyncio adapters ----------------------------------------------------------------

class TokenBucket:
    """`rate` tokens per second, holding at most max(1, rate): short bursts pass at once.

    `reserve` never refuses: it takes a token, going into debt when there is none, and
    says how long to wait before acting on it. Concurrent callers thus queue in order.
    """

    def __init__(self, rate: float, now: float):
        if not rate > 0:
            raise ValueError("requests_per_second must be positive")
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = now

    def reserve(self, now: float) -> float:
        """Seconds to wait (0 for none) before the request this token is for may run."""
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate) - 1.0
        self.stamp = max(now, self.stamp)
        return 0.0 if self.tokens >= 0.0 else -self.tokens / self.rate


class RequestPacer:
    """The request rate of each peer key, across all its connections (docs/protocol.md, "Transport").

    A request over the rate is not refused: its connection waits for its turn, reading
    nothing meanwhile, so the peer's later requests stay in its own TCP window and TCP
    pushes back. Buckets exist only for keys that completed a handshake: configured peers.
    """

    def __init__(self, requests_per_second: float | None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self._rate = requests_per_second
        self._clock = clock
        self._sleep = sleep
        self._buckets: dict[bytes, TokenBucket] = {}

    async def wait_turn(self, peer: bytes) -> None:
        if self._rate is None:
            return
        now = self._clock()
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self._rate, now)
        delay = bucket.reserve(now)
        if delay > 0:
            METRICS.rate_limit_paced(delay)
            await self._sleep(delay)


@types.coroutine
def _resume(coro: Coroutine, throw: BaseException | None = None,
            yielded: Any = None) -> Generator[Any, Any, Any]:
    """Go on driving `coro`, started elsewhere and suspended where it yielded `yielded`
    (or, with `throw`, deliver that exception to it first): what `await coro` does, for
    a coroutine that was not started by it. Values, exceptions and closing pass through."""
    while True:
        try:
            if throw is not None:
                exc, throw = throw, None
                yielded = coro.throw(exc)
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                throw = exc
                continue
            yielded = coro.send(sent)
        except StopIteration as stop:
            return stop.value


class _ConnectionServer:
    """serve_connection's engine: one connection's requests, in order, one at a time.

    A request starts as soon as it is received, in the transport's callback, and runs
    there until it first suspends: a read served from memory or from SQLite answers at
    once, without the event-loop turn a task needs to wake (what Python 3.12 calls an
    eager start). It runs as the connection's own task (asyncio.current_task() is that
    task). If it suspends on a `ResumableFuture` (a write waiting for its group's
    COMMIT), it is resumed right where that future is resolved, again as the task and
    without a turn; if it suspends on anything else, the task drives it on from there.
    Either way timeouts and cancellation behave exactly as if the task had run it from
    the start. Requests queued behind one take one event-loop turn each: a peer that
    pipelines does not hold the loop. The task also answers what arrives while it is busy.
    """

    def __init__(self, conn: transport.NoiseConnection, dispatcher: Dispatcher,
                 caller: Caller, pacer: RequestPacer | None):
        self._conn = conn
        self._dispatcher = dispatcher
        self._caller = caller
        self._pacer = pacer
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._busy = True            # a request is under way, or the task is about to look
        # A request begun outside the task, for the task to finish: (coroutine, what it
        # yielded when it suspended, or the exception it raised).
        self._suspended: tuple[Coroutine, Any, BaseException | None] | None = None
        # A request begun outside the task and waiting for a ResumableFuture, which
        # resumes it: (coroutine, that future). The task sleeps meanwhile.
        self._parked: tuple[Coroutine, ResumableFuture] | None = None
        self._waiter: asyncio.Future | None = None

    def ready(self) -> None:
        """The transport's callback: a message is queued, or the connection ended."""
        if self._busy:
            return
        # The loop given: current_task() alone asks get_running_loop(), which on 3.11
        # costs a getpid() system call, and this runs for every request.
        if self._waiter is None or asyncio.current_task(self._loop) is not None:
            # Called from inside a task (a close, say): the connection's task sees to it.
            self._wake()
            return
        try:
            raw = self._conn.recv_nowait()
        except transport.TransportError:
            self._wake()
            return
        if raw is None:
            return
        self._busy = True
        self._step(self._answer(raw))

    def _step(self, coro: Coroutine) -> None:
        """Send `coro` on, as the connection's task, until it ends or suspends.
        Only while the task sleeps on its waiter, and no task is current."""
        asyncio.tasks._enter_task(self._loop, self._task)
        try:
            yielded = coro.send(None)
        except StopIteration:
            yielded = _ENDED
        except BaseException as e:
            self._suspended = (coro, None, e)
            yielded = _RAISED
        finally:
            asyncio.tasks._leave_task(self._loop, self._task)
        if yielded is _ENDED:
            if self._conn.receivable:
                self._wake()               # the next request, on the next turn
            else:
                self._conn.recv_nowait()   # None: the idle clock starts from now
                self._busy = False
            return
        if yielded is not _RAISED:
            if (type(yielded) is ResumableFuture and
                    yielded.resume_with(functools.partial(self._resumed, coro, yielded))):
                self._parked = (coro, yielded)
                return
            self._suspended = (coro, yielded, None)
        self._wake()

    def _resumed(self, coro: Coroutine, future: ResumableFuture) -> None:
        """The future a parked request waits for is done (called inside its setter)."""
        if self._parked is None or self._parked[1] is not future:
            return                         # the task took the request over (cancelled)
        if asyncio.current_task(self._loop) is not None:
            # Resolved from inside a task, which cannot run another: on the next turn.
            self._loop.call_soon(self._resumed, coro, future)
            return
        self._parked = None
        self._step(coro)

    def _wake(self) -> None:
        self._busy = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _answer(self, raw: bytes) -> None:
        if self._pacer is not None:
            await self._pacer.wait_turn(self._caller.public_key)
        response = await self._dispatcher.handle(self._caller, raw)
        if response is not None:
            await self._conn.send(response)

    async def _drive(self, cancelled: BaseException | None = None) -> None:
        coro, yielded, raised = self._suspended
        self._suspended = None
        if raised is not None:
            # It ended at once; a cancellation meant for it is this task's to take.
            raise raised if cancelled is None else cancelled
        await _resume(coro, throw=cancelled, yielded=yielded)

    async def run(self) -> None:
        """The connection's task: until the connection ends (ConnectionClosed)."""
        conn = self._conn
        while True:
            if self._suspended is not None:
                await self._drive()
            raw = conn.recv_nowait()
            if raw is not None:
                await self._answer(raw)
                if conn.receivable:
                    await asyncio.sleep(0)
                continue
            self._waiter = self._loop.create_future()
            self._busy = False
            try:
                await self._waiter
            except asyncio.CancelledError as e:
                self._busy = True
                if self._parked is not None:
                    # The request waits for its future no more: it gets the
                    # cancellation where it waits, from this task.
                    coro, future = self._parked
                    self._parked = None
                    future.resume_with(None)
                    self._suspended = (coro, future, None)
                if self._suspended is None:
                    raise
                # Meant for the request that began outside the task (a timeout of its
                # own, or the server closing): it gets it where it waits.
                await self._drive(cancelled=e)
            finally:
                self._waiter = None
                self._busy = True


_ENDED = object()   # _step's outcomes other than a yielded value
_RAISED = object()


async def serve_connection(conn: transport.NoiseConnection, dispatcher: Dispatcher,
                           caller: Caller, pacer: RequestPacer | None = None) -> None:
    """Answer requests on one connection, in order, each once the peer's pace allows,
    until it closes. After the peer shuts down its side, every request it sent before
    is still answered. Run it as a task of its own (the server's handler is)."""
    server = _ConnectionServer(conn, dispatcher, caller, pacer)
    conn.deliver_to(server.ready)
    try:
        await server.run()
    except transport.TransportError as e:
        # ConnectionClosed is the normal end; a broken frame ends this connection only.
        log.debug("connection of %s ended: %s", caller.describe(), type(e).__name__)
    finally:
        await conn.close()


class RpcClient:
    """One connection to a daemon; calls are serialized (one in flight at a time)."""

    def __init__(self, conn: transport.NoiseConnection):
        self._conn = conn
        self._next_id = 0
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, local_private: bytes, remote_public: bytes,
                      timeout: float = 10.0) -> RpcClient:
        return cls(await transport.connect(host, port, local_private, remote_public,
                                           timeout=timeout))

    @property
    def closed(self) -> bool:
        return self._conn.closed

    async def call(self, method: str, params: dict, timeout: float = 30.0) -> dict:
        """The result object; on an error answer, the errors.py class of its code (e.g.
        Refused for -32002, a plain WireError for an unknown code); TimeoutError past
        `timeout`.
        After a timeout or a malformed response the connection is closed."""
        async with self._lock:
            self._next_id += 1
            request_id = self._next_id
            raw = encode_request(method, _params_json(params), request_id)
            try:
                return await asyncio.wait_for(self._exchange(raw, request_id), timeout)
            except WireError:
                raise
            except BaseException:
                # The answer may still be on its way: it would be read as the answer
                # to the next call. Only a fresh connection is unambiguous.
                await self._conn.close()
                raise

    async def _exchange(self, raw: bytes, request_id: int) -> dict:
        await self._conn.send(raw)
        response = decode_response(await self._conn.recv())
        if response.error is not None:
            # The server answers "id":null when it could not read our id at all.
            if response.id is not None and response.id != request_id:
                raise ProtocolError("response id does not match the request")
            raise response.error
        if type(response.id) is not int or response.id != request_id:
            raise ProtocolError("response id does not match the request")
        if not isinstance(response.result, dict):
            raise ProtocolError("result is not an object")
        return response.result

    async def notify(self, method: str, params: dict) -> None:
        async with self._lock:
            await self._conn.send(encode_request(method, _params_json(params)))

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _params_json(params: Any) -> dict:
    # Accept the messages.py objects as well as plain dicts.
    return params.to_json() if hasattr(params, "to_json") else params
