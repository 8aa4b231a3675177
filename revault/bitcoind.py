"""Async JSON-RPC client for Bitcoin Core.

HTTP/1.1 over asyncio streams, one connection per call: a call never inherits a
half-read response from an earlier one that timed out, and the client holds no state
tied to an event loop, so one instance can be shared by code running in several loops
(tests, daemons that restart their loop). On 127.0.0.1 a connection costs well under a
millisecond, which is nothing next to what bitcoind does for a call.

Amounts come back as `decimal.Decimal` (a float cannot hold every satoshi amount) and a
`Decimal` parameter is sent as a string, which bitcoind parses exactly.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import decimal
import itertools
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from revault.config import ConfigTable, ProblemCollector

__all__ = [
    "BitcoindError",
    "BitcoindUnreachable",
    "BitcoindClient",
    "RPC_IN_WARMUP",
    "RPC_WALLET_NOT_FOUND",
    "RPC_VERIFY_REJECTED",
    "RPC_VERIFY_ALREADY_IN_CHAIN",
    "BitcoindConfig",
    "read_bitcoind_config",
    "PackageRejected",
    "PackageResult",
    "submit_package",
]

# Error codes of Bitcoin Core (src/rpc/protocol.h) that callers branch on.
RPC_IN_WARMUP = -28
RPC_WALLET_NOT_FOUND = -18
RPC_VERIFY_REJECTED = -26
RPC_VERIFY_ALREADY_IN_CHAIN = -27

# A reply larger than this is not something any call we make should produce; bounding
# it keeps a confused or hostile endpoint from exhausting memory.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
MAX_HEADER_LINES = 100


@dataclass(frozen=True, slots=True)
class BitcoindConfig:
    """A `[bitcoind]` table: where the node answers RPC, how to log in, which wallet."""

    host: str
    port: int
    cookie_file: Path | None
    user: str | None
    password: str | None = dataclass_field(repr=False, default=None)  # never printed
    wallet: str | None = None

    def client(self, *, wallet: str | None = None, timeout: float = 30.0) -> BitcoindClient:
        return BitcoindClient(self.port, host=self.host, user=self.user, password=self.password,
                              cookie_file=self.cookie_file, wallet=wallet, timeout=timeout)


def read_bitcoind_config(table: ConfigTable, base: Path) -> BitcoindConfig:
    """Read `[bitcoind]`: `rpc_url` ("http://HOST:PORT"), `cookie_file` or
    `rpc_user`/`rpc_password`, optional `wallet`. ConfigError lists every bad key.
    Keys a caller reads itself (e.g. a watchtower's `zmq_*`) it reads from `table`."""
    p = ProblemCollector()
    url = p.read(table.string, "rpc_url")
    host, port = "", 0
    if url is not None:
        parts = urlsplit(url)
        try:
            port = parts.port or 0
        except ValueError:
            port = 0
        if parts.scheme != "http" or not parts.hostname or not port or parts.path not in ("", "/") \
                or parts.username or parts.query:
            p.add(f"{table.key_name('rpc_url')}: expected \"http://HOST:PORT\" "
                  f"(credentials go in cookie_file or rpc_user/rpc_password), got {url!r}")
        host = parts.hostname or ""
    cookie_file = p.read(table.path, "cookie_file", base, None)
    user = p.read(table.string, "rpc_user", None)
    password = p.read(table.string, "rpc_password", None)
    wallet = p.read(table.string, "wallet", None)
    if cookie_file is not None and (user is not None or password is not None):
        p.add(f"{table.key_name('cookie_file')}: give cookie_file or rpc_user/rpc_password, "
              "not both")
    elif cookie_file is None and (user is None or password is None):
        p.add(f"{table.key_name('rpc_user')}: give cookie_file, or both rpc_user and "
              "rpc_password")
    if user is not None and ":" in user:
        p.add(f"{table.key_name('rpc_user')}: may not contain ':' (HTTP basic auth)")
    if wallet == "":
        p.add(f"{table.key_name('wallet')}: must not be empty")
    p.finish()
    return BitcoindConfig(host, port, cookie_file, user, password, wallet)


class BitcoindError(Exception):
    """bitcoind answered the call with a JSON-RPC error."""

    def __init__(self, code: int, message: str):
        super().__init__(f"bitcoind error {code}: {message}")
        self.code = code
        self.message = message


class PackageRejected(Exception):
    """`submitpackage` left part of the package out of the mempool; `errors` maps the
    txid of each refused transaction to Bitcoin Core's reason."""

    def __init__(self, message: str, errors: dict[str, str]):
        super().__init__(message + "".join(f"; {txid}: {why}" for txid, why in errors.items()))
        self.message = message
        self.errors = errors


@dataclass(frozen=True, slots=True)
class PackageResult:
    """A package now in the mempool: its txids in order, the transactions it replaced
    (RBF), and Core's result as it came."""

    txids: tuple[str, ...]
    replaced: tuple[str, ...]
    raw: dict


class BitcoindUnreachable(ConnectionError):
    """The call got no usable answer: connection refused or dropped, timeout, refused
    credentials, or a reply that is not JSON-RPC."""


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).hex()
    raise TypeError(f"cannot send {type(obj).__name__} to bitcoind")


class _Same:
    """Marks "the client's own wallet" in call(): None already means "no wallet"."""


_SAME = _Same()


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes


class BitcoindClient:
    """Client for one bitcoind RPC endpoint, optionally bound to one wallet.

    Credentials: `user` and `password`, or `cookie_file` (re-read at every call because
    bitcoind writes a new cookie each time it starts).
    """

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        user: str | None = None,
        password: str | None = None,
        cookie_file: str | Path | None = None,
        wallet: str | None = None,
        timeout: float = 30.0,
    ):
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        if user is None and cookie_file is None:
            raise ValueError("give user and password, or cookie_file")
        if user is not None and cookie_file is not None:
            raise ValueError("give user and password, or cookie_file, not both")
        if user is not None and ":" in user:
            raise ValueError("user may not contain ':' (HTTP basic auth)")
        self.host = host
        self.port = port
        self.wallet = wallet
        self.timeout = timeout
        self._user = user
        self._password = password
        self._cookie_file = Path(cookie_file) if cookie_file is not None else None
        self._ids = itertools.count(1)

    def __repr__(self) -> str:  # never show credentials
        return f"BitcoindClient({self.host}:{self.port}, wallet={self.wallet!r})"

    def for_wallet(self, wallet: str | None) -> BitcoindClient:
        """A client for the same node, calling into `wallet` (None: the node itself)."""
        clone = copy.copy(self)
        clone.wallet = wallet
        clone._ids = itertools.count(1)
        return clone

    def _authorization(self) -> str:
        if self._cookie_file is not None:
            try:
                secret = self._cookie_file.read_text().strip()
            except OSError as exc:
                raise BitcoindUnreachable(
                    f"cannot read cookie file {self._cookie_file}: {exc.strerror}"
                ) from None
        else:
            secret = f"{self._user}:{self._password}"
        return "Basic " + base64.b64encode(secret.encode()).decode()

    def _path(self, wallet: str | None) -> str:
        if wallet is None:
            return "/"
        return "/wallet/" + quote(wallet, safe="")

    async def call(
        self,
        method: str,
        *params: Any,
        timeout: float | None = None,
        wallet: str | None | _Same = _SAME,
    ) -> Any:
        """Call `method` with positional `params`; return its result.

        `wallet` overrides the client's wallet for this call (None: the node itself).
        Raises BitcoindError when bitcoind reports an error, BitcoindUnreachable when
        there is no usable answer within `timeout` seconds (default: the client's).
        """
        target_wallet = self.wallet if isinstance(wallet, _Same) else wallet
        request_id = next(self._ids)
        body = json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": list(params)},
            default=_encode_default,
            separators=(",", ":"),
        ).encode()
        limit = self.timeout if timeout is None else timeout
        try:
            reply = await asyncio.wait_for(self._exchange(self._path(target_wallet), body), limit)
        except asyncio.TimeoutError:
            raise BitcoindUnreachable(
                f"{method}: no answer from bitcoind at {self.host}:{self.port} within {limit}s"
            ) from None
        except OSError as exc:
            raise BitcoindUnreachable(
                f"{method}: cannot talk to bitcoind at {self.host}:{self.port}: {exc}"
            ) from None
        return self._result(method, request_id, reply)

    async def __call__(self, method: str, *params: Any) -> Any:
        return await self.call(method, *params)

    def _result(self, method: str, request_id: int, reply: _Reply) -> Any:
        if reply.status == 401:
            raise BitcoindUnreachable(f"{method}: bitcoind refused the RPC credentials")
        if reply.status == 403:
            raise BitcoindUnreachable(f"{method}: bitcoind forbids this client (rpcallowip)")
        try:
            obj = json.loads(reply.body, parse_float=decimal.Decimal)
        except ValueError:
            raise BitcoindUnreachable(
                f"{method}: HTTP {reply.status} from bitcoind without a JSON body"
            ) from None
        if not isinstance(obj, dict):
            raise BitcoindUnreachable(f"{method}: reply is not a JSON-RPC object")
        error = obj.get("error")
        if error is not None:
            if isinstance(error, dict):
                code = error.get("code")
                message = error.get("message")
                raise BitcoindError(
                    code if isinstance(code, int) else 0,
                    message if isinstance(message, str) else json.dumps(error),
                )
            raise BitcoindError(0, str(error))
        if obj.get("id") != request_id:
            raise BitcoindUnreachable(f"{method}: reply id does not match the request")
        if reply.status != 200:
            raise BitcoindUnreachable(f"{method}: HTTP {reply.status} from bitcoind")
        if "result" not in obj:
            raise BitcoindUnreachable(f"{method}: reply has neither result nor error")
        return obj["result"]

    async def _exchange(self, path: str, body: bytes) -> _Reply:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            head = (
                f"POST {path} HTTP/1.1\r\n"
                f"Host: {self.host}:{self.port}\r\n"
                f"Authorization: {self._authorization()}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head + body)
            await writer.drain()
            return await _read_reply(reader)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise BitcoindUnreachable("connection closed in the middle of the HTTP headers") from None
    except asyncio.LimitOverrunError:
        raise BitcoindUnreachable("HTTP header line too long") from None
    return line.rstrip(b"\r\n")


async def _read_reply(reader: asyncio.StreamReader) -> _Reply:
    status_line = await _read_line(reader)
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise BitcoindUnreachable(f"not an HTTP reply: {status_line[:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await _read_line(reader)
        if not line:
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise BitcoindUnreachable(f"malformed HTTP header: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    else:
        raise BitcoindUnreachable("too many HTTP headers")

    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length < 0 or length > MAX_RESPONSE_BYTES:
                raise BitcoindUnreachable(f"unacceptable Content-Length {length}")
            body = await reader.readexactly(length)
        else:
            body = await reader.read(MAX_RESPONSE_BYTES + 1)
            if len(body) > MAX_RESPONSE_BYTES:
                raise BitcoindUnreachable("reply too large")
    except asyncio.IncompleteReadError:
        raise BitcoindUnreachable("connection closed in the middle of the reply body") from None
    except ValueError:
        raise BitcoindUnreachable("malformed Content-Length or chunk size") from None
    return _Reply(status, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size_line = await _read_line(reader)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await _read_line(reader):  # trailers
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_RESPONSE_BYTES:
            raise BitcoindUnreachable("reply too large")
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def submit_package(client: BitcoindClient, transactions_hex: list[str]) -> PackageResult:
    """Submit parents and their child (child last) through `submitpackage`, so that the
    child's fee counts for parents the mempool would refuse alone (package relay: a CPFP
    in a fee spike). PackageRejected unless every one is in the mempool afterwards."""
    result = await client.call("submitpackage", transactions_hex)
    by_wtxid = result.get("tx-results", {})
    txids, errors = [], {}
    for entry in by_wtxid.values():
        txids.append(entry["txid"])
        if "error" in entry:
            errors[entry["txid"]] = entry["error"]
    if result.get("package_msg") != "success" or errors or len(txids) != len(transactions_hex):
        raise PackageRejected(f"package refused: {result.get('package_msg')}", errors)
    return PackageResult(tuple(txids), tuple(result.get("replaced-transactions", ())), result)
