"""Fixed secp256k1 keys for tests: the same seed gives the same key in every run."""

from __future__ import annotations

import hashlib

from revault.keys import bitcoin_public_key

Seed = int | str | bytes


def secret(seed: Seed) -> bytes:
    """A 32-byte secret key: an integer written big-endian (1 is `00..01`), the SHA-256 of
    a label, or 32 bytes that already are a secret (so `pub` takes either)."""
    if isinstance(seed, bytes):
        if len(seed) != 32:
            raise ValueError("a secret key is 32 bytes")
        return seed
    if isinstance(seed, int):
        return seed.to_bytes(32, "big")
    return hashlib.sha256(seed.encode()).digest()


def pub(seed: Seed) -> bytes:
    """The compressed public key (33 bytes) of `secret(seed)`."""
    return bitcoin_public_key(secret(seed))
