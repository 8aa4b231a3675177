"""Params and results of every method, the method tables, roles, opinion signing.

Each class's `parse` is the only place its wire form is validated, so that every
daemon and the wallet refuse the same inputs for the same reasons; a bad member is
an `errors.InvalidParams` naming it. The method tables (`METHODS`) say, per daemon,
which params and result class each method has and which roles may call it: daemons
register their handlers from them and `revault.clients` calls through them. Nothing
here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping, Self

import coincurve
from bitcoin.core import CTransaction

from revault.errors import InvalidParams
from revault.paging import MAX_CURSOR_CHARS
from revault.primitives import (MAX_DER_SIGNATURE, PSBT_MAGIC, der_signature_problem, is_lower_hex,
                                pubkey_problem)
from revault.transport import MAX_PLAINTEXT

MAX_REASON_CHARS = 1024
# A reason as the relay encodes it (compact JSON, UTF-8): any 1024 characters of any
# script fit, but padding with escapes ("\u0001" is 6 bytes) does not, so a few
# watchtowers cannot fill a get_spend_opinions page with a handful of opinions.
MAX_REASON_JSON_BYTES = 4 * MAX_REASON_CHARS + 2
MAX_TIMESTAMP = 2**63        # exclusive; what a signed 64-bit integer holds elsewhere
MAX_INDEX = 2**32            # exclusive; input indexes are u32 in Bitcoin
# Standard transactions weigh at most 400 000 WU, so no standard serialization is
# longer; bounding before decoding keeps a hostile string from costing more than that.
MAX_TX_BYTES = 400_000
MAX_PSBT_BYTES = 1_000_000
MAX_SIGNATURES = 100         # far above any real deployment's stakeholder count
# What a sync server answers is bounded by its own quota and by the frame; a wallet
# must not refuse a whole answer because a peer padded it below those bounds.
MAX_RESULT_SIGNATURES = 1_000
MAX_REQUESTS = 10_000
MAX_OPINIONS = 1_000
# A bad map key is echoed in the field name; never echo more than a pubkey's length.
_MAX_KEY_ECHO = 66

# What a response's `result` may take: the rest of a frame carries the JSON-RPC envelope
# and the caller's echoed `id` (a longer string id gets "response too large").
RESULT_BUDGET = MAX_PLAINTEXT - 4096
# What the list of one get_spend_requests / get_spend_opinions page may take, next to
# the other members of its result and the longest cursor (revault/paging.py).
SPEND_REQUESTS_PAGE_BUDGET = (RESULT_BUDGET - len('{"requests":,"cursor":""}')
                              - MAX_CURSOR_CHARS)
SPEND_OPINIONS_PAGE_BUDGET = (RESULT_BUDGET - len('{"vault_id":"","opinions":,"cursor":""}')
                              - 64 - MAX_CURSOR_CHARS)

# The name this module gave errors.InvalidParams before errors.py existed; the same class.
ParamsError = InvalidParams

# --- roles ----------------------------------------------------------------------

# Who may call what (the method tables below, docs/protocol.md "Roles"). A daemon maps each
# peer's Noise key to some of these; the dispatcher checks them before parsing params.
STAKEHOLDER = "stakeholder"
MANAGER = "manager"
WATCHTOWER = "watchtower"
WALLET = "wallet"            # the one wallet paired with a watchtower


# --- validators ---------------------------------------------------------------

def _require(obj: dict, name: str) -> Any:
    try:
        return obj[name]
    except KeyError:
        raise InvalidParams(name, "missing") from None


def _require_object(obj: Any, name: str = "params") -> dict:
    if not isinstance(obj, dict):
        raise InvalidParams(name, "not an object")
    return obj


def check_hex(field: str, value: Any, nbytes: int | None) -> bytes:
    """Lowercase hex of exactly `nbytes` bytes (any even length if None); returns the bytes."""
    if not isinstance(value, str):
        raise InvalidParams(field, "not a string")
    if nbytes is not None and len(value) != 2 * nbytes:
        raise InvalidParams(field, f"expected {2 * nbytes} hex characters")
    if len(value) % 2:
        raise InvalidParams(field, "odd number of hex characters")
    if not is_lower_hex(value):
        raise InvalidParams(field, "not lowercase hex")
    return bytes.fromhex(value)


# Public keys seen by a daemon are mostly a few (its peers' signing and opinion keys),
# each carried by request after request; putting one on the curve costs about as much
# as parsing the rest of its params. Bounded: keys nobody sends again fall out.
_PUBLIC_KEY_CACHE = 1024


@functools.lru_cache(maxsize=_PUBLIC_KEY_CACHE)
def _public_key(raw: bytes) -> coincurve.PublicKey | str:
    """The point `raw` encodes, or why it is none (primitives.pubkey_problem)."""
    problem = pubkey_problem(raw)
    return problem if problem is not None else coincurve.PublicKey(raw)


def _checked_public_key(field: str, value: Any) -> tuple[bytes, coincurve.PublicKey]:
    raw = check_hex(field, value, 33)
    key = _public_key(raw)
    if isinstance(key, str):
        raise InvalidParams(field, key)
    return raw, key


def check_pubkey(field: str, value: Any) -> bytes:
    """33-byte compressed secp256k1 point, lowercase hex; returns the bytes."""
    return _checked_public_key(field, value)[0]


def check_der_low_s(field: str, value: Any) -> bytes:
    """Strict DER (BIP 66 framing), low S, no sighash byte; returns the bytes."""
    if isinstance(value, str) and len(value) > 2 * MAX_DER_SIGNATURE:
        raise InvalidParams(field, "too long")
    sig = check_hex(field, value, None)
    problem = der_signature_problem(sig)
    if problem is not None:
        raise InvalidParams(field, problem)
    return sig


def _check_str(field: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidParams(field, "not a string")
    if len(value) > max_chars:
        raise InvalidParams(field, f"longer than {max_chars} characters")
    try:
        # JSON "\ud800" escapes decode to lone surrogates, which no UTF-8 encoder
        # (ours included, when signing or storing) can write back.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParams(field, "not valid Unicode") from None
    return value


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidParams(field, "not a boolean")
    return value


def _check_int(field: str, value: Any, upper: int) -> int:
    # bool is an int subclass in Python; on the wire true is not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParams(field, "not an integer")
    if not 0 <= value < upper:
        raise InvalidParams(field, f"out of range [0, {upper})")
    return value


def _check_base64(field: str, value: Any, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise InvalidParams(field, "not a string")
    if len(value) > 4 * ((max_bytes + 2) // 3):
        raise InvalidParams(field, "too long")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParams(field, "not base64") from None
    # One canonical text per byte string: padding required, no stray trailing bits.
    if base64.b64encode(raw).decode("ascii") != value:
        raise InvalidParams(field, "not canonical base64")
    return raw


def _check_transaction(field: str, value: Any, max_chars: int | None = None) -> str:
    if max_chars is not None and isinstance(value, str) and len(value) > max_chars:
        raise InvalidParams(field, f"longer than {max_chars} characters")
    raw = _check_base64(field, value, MAX_TX_BYTES)
    try:
        tx = CTransaction.deserialize(raw)
    except Exception:
        # Untrusted bytes into a third-party parser: whatever it raises (truncation,
        # trailing data, struct errors) means the same thing to the caller.
        raise InvalidParams(field, "not a transaction") from None
    if not tx.vin or not tx.vout:
        raise InvalidParams(field, "transaction has no inputs or no outputs")
    # Non-minimal sizes or an all-empty witness section deserialize but are not what
    # Bitcoin Core accepts, and would give a relayed transaction two encodings.
    if tx.serialize() != raw:
        raise InvalidParams(field, "not a canonical transaction serialization")
    return value


def _check_psbt(field: str, value: Any) -> str:
    raw = _check_base64(field, value, MAX_PSBT_BYTES)
    if not raw.startswith(PSBT_MAGIC):
        raise InvalidParams(field, "not a PSBT")
    return value


def _check_sig_map(field: str, value: Any, *, min_items: int, max_items: int) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidParams(field, "not an object")
    if len(value) < min_items:
        raise InvalidParams(field, "empty")
    if len(value) > max_items:
        raise InvalidParams(field, f"more than {max_items} entries")
    out: dict[str, str] = {}
    for key, sig in value.items():
        name = f"{field}.{str(key)[:_MAX_KEY_ECHO]}"
        check_pubkey(name, key)
        check_der_low_s(name, sig)
        out[key] = sig
    return out


def _check_list(field: str, value: Any, max_items: int) -> list:
    if not isinstance(value, list):
        raise InvalidParams(field, "not an array")
    if len(value) > max_items:
        raise InvalidParams(field, f"more than {max_items} entries")
    return value


def _nested(prefix: str, parse, obj: Any):
    """Parse a nested object, prefixing the field of any error with its position."""
    try:
        return parse(obj)
    except InvalidParams as e:
        name = prefix if e.field == "params" else f"{prefix}.{e.field}"
        raise InvalidParams(name, e.reason) from None


def _id(field: str, value: Any) -> str:
    check_hex(field, value, 32)
    return value


# --- sync server ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SigParams:
    pubkey: str
    signature: str
    id: str

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        pubkey = _require(obj, "pubkey")
        check_pubkey("pubkey", pubkey)
        signature = _require(obj, "signature")
        check_der_low_s("signature", signature)
        return cls(pubkey=pubkey, signature=signature, id=_id("id", _require(obj, "id")))

    def to_json(self) -> dict:
        return {"pubkey": self.pubkey, "signature": self.signature, "id": self.id}


@dataclass(frozen=True, slots=True)
class GetSigsParams:
    id: str

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        return cls(id=_id("id", _require(obj, "id")))

    def to_json(self) -> dict:
        return {"id": self.id}


@dataclass(frozen=True, slots=True)
class GetSigsResult:
    signatures: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        sigs = _check_sig_map("signatures", _require(obj, "signatures"),
                              min_items=0, max_items=MAX_RESULT_SIGNATURES)
        return cls(signatures=sigs)

    def to_json(self) -> dict:
        return {"signatures": dict(self.signatures)}


@dataclass(frozen=True, slots=True)
class ErrSigParams(GetSigsParams):
    """The same one member as get_sigs: the tx uid whose signatures are erased."""


@dataclass(frozen=True, slots=True)
class RequestSpendParams:
    transaction: str
    timestamp: int
    vault_id: str

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        return cls(
            transaction=_check_transaction("transaction", _require(obj, "transaction"),
                                           MAX_SPEND_REQUEST_TX_CHARS),
            timestamp=_check_int("timestamp", _require(obj, "timestamp"), MAX_TIMESTAMP),
            vault_id=_id("vault_id", _require(obj, "vault_id")),
        )

    def to_json(self) -> dict:
        return {"transaction": self.transaction, "timestamp": self.timestamp,
                "vault_id": self.vault_id}


def _optional_cursor(obj: dict, name: str) -> str | None:
    """An opaque cursor (get_spend_requests, get_spend_opinions), or None when absent."""
    if name not in obj:
        return None
    return _check_str(name, obj[name], MAX_CURSOR_CHARS)


@dataclass(frozen=True, slots=True)
class GetSpendRequestsParams:
    since: str | None = None   # a previous result's `cursor`; None: from the oldest

    @classmethod
    def parse(cls, obj: Any) -> Self:
        return cls(since=_optional_cursor(_require_object(obj), "since"))

    def to_json(self) -> dict:
        # A seed client's `{}` stays `{}`.
        return {} if self.since is None else {"since": self.since}


_SPEND_REQUEST_JSON_OVERHEAD = len('{"transaction":"","timestamp":,"vault_id":""}')
# A spend request must fit alone in one get_spend_requests page, or no poller could
# ever be given it (and it would sit in every page's way).
MAX_SPEND_REQUEST_TX_CHARS = (SPEND_REQUESTS_PAGE_BUDGET - len("[]") - _SPEND_REQUEST_JSON_OVERHEAD
                              - 64 - len(str(MAX_TIMESTAMP - 1)))


@dataclass(frozen=True, slots=True)
class SpendRequest:
    transaction: str
    timestamp: int
    vault_id: str

    @classmethod
    def parse(cls, obj: Any) -> Self:
        p = RequestSpendParams.parse(obj)
        return cls(transaction=p.transaction, timestamp=p.timestamp, vault_id=p.vault_id)

    def to_json(self) -> dict:
        return {"transaction": self.transaction, "timestamp": self.timestamp,
                "vault_id": self.vault_id}

    def json_size(self) -> int:
        """Bytes of `to_json()` in the compact encoding, computed without encoding.

        Exact because every member is ASCII that JSON never escapes (base64, hex,
        digits): a relay sizing hundreds of requests per poll need not encode them twice.
        """
        return spend_request_json_size(self.transaction, self.timestamp, self.vault_id)


def spend_request_json_size(transaction: str, timestamp: int, vault_id: str) -> int:
    """`SpendRequest(...).json_size()` without building the object (a relay sizes every
    candidate of a page and builds only those it lists)."""
    return _SPEND_REQUEST_JSON_OVERHEAD + len(transaction) + len(str(timestamp)) + len(vault_id)


@dataclass(frozen=True, slots=True)
class GetSpendRequestsResult:
    requests: list[SpendRequest] = field(default_factory=list)
    # Marks the last request listed; None when the server sent none (a seed server).
    cursor: str | None = None

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        items = _check_list("requests", _require(obj, "requests"), MAX_REQUESTS)
        return cls(requests=[_nested(f"requests[{i}]", SpendRequest.parse, item)
                             for i, item in enumerate(items)],
                   cursor=_optional_cursor(obj, "cursor"))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"requests": [r.to_json() for r in self.requests]}
        if self.cursor is not None:
            out["cursor"] = self.cursor
        return out


def reason_json_bytes(reason: str) -> int:
    """Bytes of `reason` in the relay's encoding (compact JSON string, UTF-8)."""
    return len(json.dumps(reason, ensure_ascii=False).encode("utf-8"))


def _check_opinion_reason(accept: bool, reason: Any) -> str:
    reason = _check_str("reason", reason, MAX_REASON_CHARS)
    if not accept and not reason:
        raise InvalidParams("reason", "must be non-empty when the spend is refused")
    if reason_json_bytes(reason) > MAX_REASON_JSON_BYTES:
        raise InvalidParams("reason", f"longer than {MAX_REASON_JSON_BYTES} bytes once "
                                      "encoded as JSON")
    return reason


def _opinion_members(obj: dict, accept_field: str) -> tuple[bool, str, str, str, str]:
    """The signed members an opinion carries in both its forms: as the watchtower sends
    it (`accept`) and as the sync server relays it (`accepted`)."""
    accept = _check_bool(accept_field, _require(obj, accept_field))
    reason = _check_opinion_reason(accept, _require(obj, "reason"))
    sig = _require(obj, "sig")
    check_der_low_s("sig", sig)
    pubkey = _require(obj, "pubkey")
    check_pubkey("pubkey", pubkey)
    return accept, reason, sig, pubkey, _id("txid", _require(obj, "txid"))


@dataclass(frozen=True, slots=True)
class SpendOpinionParams:
    vault_id: str
    accept: bool
    reason: str
    sig: str
    pubkey: str
    txid: str

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        vault_id = _id("vault_id", _require(obj, "vault_id"))
        accept, reason, sig, pubkey, txid = _opinion_members(obj, "accept")
        return cls(vault_id=vault_id, accept=accept, reason=reason, sig=sig,
                   pubkey=pubkey, txid=txid)

    def to_json(self) -> dict:
        return {"vault_id": self.vault_id, "accept": self.accept, "reason": self.reason,
                "sig": self.sig, "pubkey": self.pubkey, "txid": self.txid}


@dataclass(frozen=True, slots=True)
class RelayedOpinion:
    accepted: bool
    reason: str
    sig: str
    pubkey: str
    txid: str

    @classmethod
    def parse(cls, obj: Any) -> Self:
        accepted, reason, sig, pubkey, txid = _opinion_members(_require_object(obj), "accepted")
        return cls(accepted=accepted, reason=reason, sig=sig, pubkey=pubkey, txid=txid)

    @classmethod
    def from_params(cls, params: SpendOpinionParams) -> Self:
        """What the sync server relays for a stored opinion (vault_id goes one level up)."""
        return cls(accepted=params.accept, reason=params.reason, sig=params.sig,
                   pubkey=params.pubkey, txid=params.txid)

    def to_params(self, vault_id: str) -> SpendOpinionParams:
        """The signed object as the watchtower made it, ready for verify_opinion."""
        return SpendOpinionParams(vault_id=_id("vault_id", vault_id), accept=self.accepted,
                                  reason=self.reason, sig=self.sig, pubkey=self.pubkey,
                                  txid=self.txid)

    def to_json(self) -> dict:
        return {"accepted": self.accepted, "reason": self.reason, "sig": self.sig,
                "pubkey": self.pubkey, "txid": self.txid}

    def json_size(self) -> int:
        """Bytes of `to_json()` in the compact encoding; only `reason` may be escaped."""
        return (_RELAYED_OPINION_JSON_OVERHEAD + (4 if self.accepted else 5)
                + reason_json_bytes(self.reason) + len(self.sig) + len(self.pubkey)
                + len(self.txid))


_RELAYED_OPINION_JSON_OVERHEAD = len('{"accepted":,"reason":,"sig":"","pubkey":"","txid":""}')


@dataclass(frozen=True, slots=True)
class GetSpendOpinionsParams:
    vault_id: str
    since: str | None = None   # a previous result's `cursor` for this vault

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        return cls(vault_id=_id("vault_id", _require(obj, "vault_id")),
                   since=_optional_cursor(obj, "since"))

    def to_json(self) -> dict:
        params = {"vault_id": self.vault_id}
        if self.since is not None:
            params["since"] = self.since
        return params


@dataclass(frozen=True, slots=True)
class GetSpendOpinionsResult:
    vault_id: str
    opinions: list[RelayedOpinion] = field(default_factory=list)
    # Marks the last opinion listed; None when the server sent none (a seed server).
    cursor: str | None = None

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        vault_id = _id("vault_id", _require(obj, "vault_id"))
        items = _check_list("opinions", _require(obj, "opinions"), MAX_OPINIONS)
        return cls(vault_id=vault_id,
                   opinions=[_nested(f"opinions[{i}]", RelayedOpinion.parse, item)
                             for i, item in enumerate(items)],
                   cursor=_optional_cursor(obj, "cursor"))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"vault_id": self.vault_id,
                               "opinions": [o.to_json() for o in self.opinions]}
        if self.cursor is not None:
            out["cursor"] = self.cursor
        return out


@dataclass(frozen=True, slots=True)
class AckResult:
    ack: bool = True

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        return cls(ack=_check_bool("ack", _require(obj, "ack")))

    def to_json(self) -> dict:
        return {"ack": self.ack}


# --- watchtower -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WatchtowerSigParams:
    signatures: dict[str, str]
    txid: str
    vault_txid: str

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        sigs = _check_sig_map("signatures", _require(obj, "signatures"),
                              min_items=1, max_items=MAX_SIGNATURES)
        return cls(signatures=sigs, txid=_id("txid", _require(obj, "txid")),
                   vault_txid=_id("vault_txid", _require(obj, "vault_txid")))

    def to_json(self) -> dict:
        return {"signatures": dict(self.signatures), "txid": self.txid,
                "vault_txid": self.vault_txid}


@dataclass(frozen=True, slots=True)
class WatchtowerSigResult:
    ack: bool
    txid: str
    reason: str = ""  # why the watchtower refused (docs/protocol.md: only with "ack": false)

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        ack = _check_bool("ack", _require(obj, "ack"))
        reason = "" if ack else _check_str("reason", obj.get("reason", ""), MAX_REASON_CHARS)
        return cls(ack=ack, txid=_id("txid", _require(obj, "txid")), reason=reason)

    def to_json(self) -> dict:
        if self.ack:
            return {"ack": True, "txid": self.txid}
        return {"ack": False, "txid": self.txid, "reason": self.reason}


# --- cosigner -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SignParams:
    tx: str
    index: int

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        return cls(tx=_check_psbt("tx", _require(obj, "tx")),
                   index=_check_int("index", _require(obj, "index"), MAX_INDEX))

    def to_json(self) -> dict:
        return {"tx": self.tx, "index": self.index}


@dataclass(frozen=True, slots=True)
class SignResult:
    signature: str

    @classmethod
    def parse(cls, obj: Any) -> Self:
        obj = _require_object(obj)
        signature = _require(obj, "signature")
        check_der_low_s("signature", signature)
        return cls(signature=signature)

    def to_json(self) -> dict:
        return {"signature": self.signature}


# --- method tables ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Method:
    """One method of one daemon: the class that parses its params, the class of its
    result (which a client validates the answer with), and the roles that may call it."""

    name: str
    params: type
    result: type
    roles: frozenset[str]


def _table(*methods: Method) -> Mapping[str, Method]:
    return MappingProxyType({method.name: method for method in methods})


SYNC_SERVER_METHODS = _table(
    Method("sig", SigParams, AckResult, frozenset({STAKEHOLDER})),
    Method("get_sigs", GetSigsParams, GetSigsResult, frozenset({STAKEHOLDER, MANAGER})),
    Method("err_sig", ErrSigParams, AckResult, frozenset({STAKEHOLDER})),
    Method("request_spend", RequestSpendParams, AckResult, frozenset({MANAGER})),
    Method("get_spend_requests", GetSpendRequestsParams, GetSpendRequestsResult,
           frozenset({WATCHTOWER})),
    Method("spend_opinion", SpendOpinionParams, AckResult, frozenset({WATCHTOWER})),
    Method("get_spend_opinions", GetSpendOpinionsParams, GetSpendOpinionsResult,
           frozenset({MANAGER})),
)
WATCHTOWER_METHODS = _table(
    Method("sig", WatchtowerSigParams, WatchtowerSigResult, frozenset({WALLET})),
)
COSIGNER_METHODS = _table(
    Method("sign", SignParams, SignResult, frozenset({MANAGER})),
)
# Every daemon's API, by the daemon's name (`revault-<name>`): the one table daemons
# register their handlers from and clients.py calls through.
METHODS: Mapping[str, Mapping[str, Method]] = MappingProxyType({
    "sync-server": SYNC_SERVER_METHODS,
    "watchtower": WATCHTOWER_METHODS,
    "cosigner": COSIGNER_METHODS,
})


# --- watchtower opinions ----------------------------------------------------------

def opinion_signing_bytes(params: SpendOpinionParams) -> bytes:
    """The bytes a watchtower signs: its opinion with "sig":"" in canonical JSON
    (docs/protocol.md, "Opinion signing")."""
    signed = {"vault_id": params.vault_id, "accept": params.accept, "reason": params.reason,
              "sig": "", "pubkey": params.pubkey, "txid": params.txid}
    return json.dumps(signed, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def sign_opinion(private_key: bytes, vault_id: str, accept: bool, reason: str,
                 txid: str) -> SpendOpinionParams:
    """A signed, validated spend_opinion. Raises InvalidParams for a bad member."""
    if not isinstance(private_key, bytes) or len(private_key) != 32:
        raise ValueError("opinion key must be 32 bytes")
    key = coincurve.PrivateKey(private_key)
    # Refuse a bad member before signing anything, naming it as parse would.
    params = SpendOpinionParams(
        vault_id=_id("vault_id", vault_id),
        accept=_check_bool("accept", accept),
        reason=_check_opinion_reason(accept, reason),
        sig="",
        pubkey=key.public_key.format(compressed=True).hex(),
        txid=_id("txid", txid),
    )
    digest = hashlib.sha256(opinion_signing_bytes(params)).digest()
    # coincurve signs with RFC 6979 nonces and normalizes to low S.
    return replace(params, sig=key.sign(digest, hasher=None).hex())


def verify_opinion(params: SpendOpinionParams) -> bool:
    """Whether params.sig is params.pubkey's signature over opinion_signing_bytes(params)."""
    try:
        _, pubkey = _checked_public_key("pubkey", params.pubkey)
        sig = check_der_low_s("sig", params.sig)
        digest = hashlib.sha256(opinion_signing_bytes(params)).digest()
        return pubkey.verify(sig, digest, hasher=None)
    except (InvalidParams, ValueError, TypeError):
        return False
