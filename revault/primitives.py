"""Bitcoin encodings and constants that every part of revault shares.

Each concept here has exactly one definition: the wire schemas (`messages`), the
transaction chain (`transactions`), the cosigner and the watchtower all import it from
here. Nothing in this module does I/O or knows about a daemon.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import coincurve

__all__ = [
    "SECP256K1_ORDER", "SECP256K1_HALF_ORDER", "MAX_DER_SIGNATURE",
    "SIGHASH_ALL", "SIGHASH_ANYONECANPAY", "SIGHASH_ALL_ANYONECANPAY", "PSBT_MAGIC",
    "EncodingError", "der_signature_problem", "pubkey_problem", "is_lower_hex", "tx_uid", "OutPoint",
]

# secp256k1 group order: a signature with s > order/2 is malleable (BIP 62 / BIP 146).
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_ORDER = SECP256K1_ORDER // 2
MAX_DER_SIGNATURE = 72  # 6 bytes of framing + two 33-byte integers

SIGHASH_ALL = 0x01
SIGHASH_ANYONECANPAY = 0x80
SIGHASH_ALL_ANYONECANPAY = SIGHASH_ALL | SIGHASH_ANYONECANPAY

PSBT_MAGIC = b"psbt\xff"  # BIP 174

_LOWER_HEX = re.compile(r"[0-9a-f]*")


class EncodingError(ValueError):
    """A value that is not the pinned encoding of what it claims to be."""


def is_lower_hex(value: str, nbytes: int | None = None) -> bool:
    """True if `value` is lowercase hex (of exactly `nbytes` bytes when given)."""
    if len(value) % 2 or (nbytes is not None and len(value) != 2 * nbytes):
        return False
    return _LOWER_HEX.fullmatch(value) is not None


def _der_integer(sig: bytes, pos: int) -> tuple[int, int] | None:
    """(value, next position) of a strict-DER INTEGER at `pos`, or None."""
    if pos + 2 > len(sig) or sig[pos] != 0x02:
        return None
    length = sig[pos + 1]
    start, end = pos + 2, pos + 2 + length
    if length == 0 or end > len(sig):
        return None
    if sig[start] & 0x80:
        return None  # negative
    if length > 1 and sig[start] == 0 and not sig[start + 1] & 0x80:
        return None  # superfluous leading zero
    return int.from_bytes(sig[start:end], "big"), end


def der_signature_problem(sig: bytes) -> str | None:
    """Why `sig` is not a strict-DER (BIP 66), low-S (BIP 146) ECDSA signature without
    a sighash byte, or None when it is one.

    The reasons are the short phrases the wire answers with: "not DER", "not a valid
    signature", "not low-S".
    """
    if not 8 <= len(sig) <= MAX_DER_SIGNATURE or sig[0] != 0x30 or sig[1] != len(sig) - 2:
        return "not DER"
    r = _der_integer(sig, 2)
    if r is None:
        return "not DER"
    s = _der_integer(sig, r[1])
    if s is None or s[1] != len(sig):
        # A trailing sighash byte lands here too: it is not part of the DER encoding.
        return "not DER"
    if not 0 < r[0] < SECP256K1_ORDER or s[0] == 0:
        return "not a valid signature"
    if s[0] > SECP256K1_HALF_ORDER:
        return "not low-S"
    return None


def pubkey_problem(key: bytes) -> str | None:
    """Why `key` is not a 33-byte compressed secp256k1 public key (a point on the curve),
    or None when it is one: "not a compressed public key", "not a valid public key"."""
    if len(key) != 33 or key[0] not in (2, 3):
        return "not a compressed public key"
    try:
        coincurve.PublicKey(key)
    except ValueError:
        return "not a valid public key"
    return None


def tx_uid(txid: str) -> str:
    """The tx uid / vault uid of a txid (`id`, `vault_id` on the wire): the SHA-256 of
    the txid's 32 bytes as written in display order, lowercase hex."""
    if not isinstance(txid, str) or not is_lower_hex(txid, 32):
        raise EncodingError("txid must be 64 lowercase hex characters")
    return hashlib.sha256(bytes.fromhex(txid)).hexdigest()


@dataclass(frozen=True, slots=True, order=True)
class OutPoint:
    """A transaction output: `txid` in display order (64 lowercase hex), `vout`."""

    txid: str
    vout: int

    def __post_init__(self) -> None:
        if not isinstance(self.txid, str) or not is_lower_hex(self.txid, 32):
            raise EncodingError("txid must be 64 lowercase hex characters")
        if isinstance(self.vout, bool) or not isinstance(self.vout, int) \
                or not 0 <= self.vout <= 0xFFFFFFFF:
            raise EncodingError("vout out of range")

    @classmethod
    def parse(cls, text: str) -> OutPoint:
        """`"txid:vout"`, as the wallet's verbs and Bitcoin Core write it."""
        txid, sep, vout = text.partition(":") if isinstance(text, str) else ("", "", "")
        if not sep or not vout.isdigit() or (len(vout) > 1 and vout[0] == "0"):
            raise EncodingError(f"not an outpoint (txid:vout): {str(text)[:80]!r}")
        return cls(txid, int(vout))

    def serialize(self) -> bytes:
        """The 36 consensus bytes: txid in internal (reversed) order, vout u32 LE."""
        return bytes.fromhex(self.txid)[::-1] + self.vout.to_bytes(4, "little")

    def __str__(self) -> str:
        return f"{self.txid}:{self.vout}"
