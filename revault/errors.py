"""Errors that cross the wire, each knowing its JSON-RPC code.

Whoever finds the problem raises it: a params class refusing a member (`InvalidParams`),
a store refusing a write over a quota or after close (`Refused`), a daemon refusing a
request (`InvalidParams`, `Refused`). `rpc.Dispatcher` is the one place that turns any
of them into an error answer, with `code` and `message` as they are. On the other side,
`rpc.RpcClient` raises the class of the code it receives (`error_from_wire`), so a
caller can tell a refusal it may retry from params it must fix.

`message` is exactly what the peer reads: never put a secret or a params value in it.
Nothing here does I/O.
"""

from __future__ import annotations

__all__ = [
    "PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS", "FORBIDDEN",
    "REFUSED", "INTERNAL_ERROR",
    "WireError", "ParseError", "InvalidRequest", "UnknownMethod", "InvalidParams",
    "Forbidden", "Refused", "InternalError", "error_from_wire",
]

# The codes of docs/protocol.md's table ("Error codes").
PARSE_ERROR = -32700       # not JSON
INVALID_REQUEST = -32600   # not a request object
METHOD_NOT_FOUND = -32601  # unknown method
INVALID_PARAMS = -32602    # bad params: the message names the field and says why
FORBIDDEN = -32001         # this peer's role may not call this method
REFUSED = -32002           # refused by policy or limit (size, quota, rate, shutting down)
INTERNAL_ERROR = -32603    # a bug or a failure on the server; the detail stays in its log


class WireError(Exception):
    """An error answer: `code` and `message` as the peer reads them.

    The subclasses fix the code; this class itself carries any code, e.g. one a client
    receives that this version does not know.
    """

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Coded(WireError):
    """A WireError whose code is its class's."""

    code: int

    def __init__(self, message: str):
        super().__init__(type(self).code, message)


class ParseError(_Coded):
    code = PARSE_ERROR


class InvalidRequest(_Coded):
    code = INVALID_REQUEST


class UnknownMethod(_Coded):
    code = METHOD_NOT_FOUND


class InvalidParams(WireError, ValueError):
    """A member of params (or of a result) is missing or invalid: `"<field>: <reason>"`.

    `field` names the member (dotted and indexed for nested ones, e.g.
    `opinions[2].sig`); `reason` says why in a short phrase.
    """

    code = INVALID_PARAMS

    def __init__(self, field: str, reason: str):
        super().__init__(INVALID_PARAMS, f"{field}: {reason}")
        self.field = field
        self.reason = reason

    @classmethod
    def from_message(cls, message: str) -> InvalidParams:
        """The error as a client receives it: `field` and `reason` split back out of the
        message; one that names no field is about the params as a whole."""
        field, sep, reason = message.partition(": ")
        error = cls(field, reason) if sep else cls("params", message)
        error.message = message
        error.args = (message,)
        return error


class Forbidden(_Coded):
    code = FORBIDDEN


class Refused(_Coded):
    """Refused by a policy or a limit; the same request may succeed later (a quota freed,
    a daemon restarted) unless the message says the policy is final."""

    code = REFUSED


class InternalError(_Coded):
    code = INTERNAL_ERROR


_BY_CODE: dict[int, type[_Coded]] = {
    cls.code: cls for cls in (ParseError, InvalidRequest, UnknownMethod, Forbidden, Refused,
                              InternalError)
}


def error_from_wire(code: int, message: str) -> WireError:
    """The exception for an error answer received from a peer: its class for a known
    code, a plain WireError for another."""
    if code == INVALID_PARAMS:
        return InvalidParams.from_message(message)
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else WireError(code, message)
