"""Well-formed values for sync-server calls: ids, bitcoin keys and signatures, spends."""

from __future__ import annotations

import base64
import hashlib

import coincurve
from bitcoin.core import (
    CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript, b2lx,
)


def h(text: str) -> str:
    """A 64-hex id, distinct per text: tx uids and vault ids in these tests."""
    return hashlib.sha256(text.encode()).hexdigest()


def btc_key(n: int) -> coincurve.PrivateKey:
    return coincurve.PrivateKey(n.to_bytes(32, "big"))


def pubkey(n: int) -> str:
    return btc_key(n).public_key.format(compressed=True).hex()


def der(n: int, message: str = "m") -> str:
    """A DER low-S signature (coincurve normalizes S) without a sighash byte."""
    return btc_key(n).sign(hashlib.sha256(message.encode()).digest(), hasher=None).hex()


def spend_tx(seed: str, outputs: int = 1) -> tuple[str, str]:
    """(base64 transaction, txid) of a distinct, well-formed spend transaction (43 bytes
    per output)."""
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(hashlib.sha256(seed.encode()).digest(), 0),
                      nSequence=0xFFFFFFFD)],
        [CMutableTxOut(10_000 + i, CScript([0, hashlib.sha256(f"{seed}{i}".encode()).digest()]))
         for i in range(outputs)],
        nVersion=2)
    return base64.b64encode(tx.serialize()).decode(), b2lx(tx.GetTxid())
