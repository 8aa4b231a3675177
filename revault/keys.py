"""Key files: 32 raw secret bytes, readable by the owner only.

Noise static keys are X25519 secrets; bitcoin keys are secp256k1 secrets. Neither the
bytes nor anything derived from them but the public key ever reaches a message.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import coincurve

# The Noise static key's public half is the transport's to derive: one X25519 code path.
from revault.transport import public_key as noise_public_key

__all__ = [
    "KEY_LEN", "KeyFileError", "read_key_file", "create_key_file", "generate_noise_key",
    "generate_bitcoin_key", "bitcoin_public_key", "noise_public_key",
]

KEY_LEN = 32


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file, never its content."""


def read_key_file(path: Path) -> bytes:
    data = read_secret_file(path, KEY_LEN + 1, "key file")
    if len(data) != KEY_LEN:
        raise KeyFileError(f"{path}: a key file holds exactly {KEY_LEN} bytes")
    return data


def read_secret_file(path: Path, max_bytes: int, kind: str = "secret file") -> bytes:
    """At most `max_bytes` of a regular file that only its owner may read or write."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {kind}") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot open {kind} ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path}: readable or writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 600 on it")
        return os.read(fd, max_bytes)
    finally:
        os.close(fd)


def create_key_file(path: Path, secret: bytes) -> None:
    """Write `secret` to a new file with mode 0600; never replaces an existing file."""
    if len(secret) != KEY_LEN:
        raise ValueError("a key is 32 bytes")
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot create key file ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o600)  # the umask may have narrowed it; never widened
        view = memoryview(secret)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def generate_noise_key() -> bytes:
    return os.urandom(KEY_LEN)


def generate_bitcoin_key() -> bytes:
    # Rejection sampling: a secret must lie in [1, n-1]; coincurve refuses others.
    while True:
        secret = os.urandom(KEY_LEN)
        try:
            coincurve.PrivateKey(secret)
            return secret
        except ValueError:
            continue


def bitcoin_public_key(private_key: bytes) -> bytes:
    try:
        return coincurve.PrivateKey(private_key).public_key.format(compressed=True)
    except ValueError:
        raise KeyFileError("not a valid secp256k1 secret key") from None
