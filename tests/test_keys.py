import os
import stat
import subprocess
import sys

import coincurve
import pytest

from revault.keys import (
    KeyFileError, bitcoin_public_key, create_key_file, noise_public_key, read_key_file,
)


def keygen(*args):
    return subprocess.run([sys.executable, "-m", "revault.keygen", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind, public_len", [("noise", 32), ("bitcoin", 33)])
def test_keygen_creates_0600_file_and_prints_public_key(tmp_path, kind, public_len):
    path = tmp_path / f"{kind}.key"
    result = keygen(kind, str(path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = read_key_file(path)
    public = bytes.fromhex(result.stdout.strip())
    assert len(public) == public_len
    derive = noise_public_key if kind == "noise" else bitcoin_public_key
    assert public == derive(secret)
    assert secret.hex() not in result.stdout + result.stderr


def test_keygen_never_overwrites(tmp_path):
    path = tmp_path / "k"
    assert keygen("noise", str(path)).returncode == 0
    before = path.read_bytes()
    result = keygen("bitcoin", str(path))
    assert result.returncode == 1
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert path.read_bytes() == before


def test_keygen_refuses_unknown_kind(tmp_path):
    assert keygen("rsa", str(tmp_path / "k")).returncode == 2


def test_bitcoin_key_matches_secp256k1(tmp_path):
    secret = bytes(31) + b"\x01"
    assert bitcoin_public_key(secret) == coincurve.PrivateKey(secret).public_key.format()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_read_refuses_group_or_other_access(tmp_path, mode):
    path = tmp_path / "k"
    create_key_file(path, os.urandom(32))
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="group or others"):
        read_key_file(path)


def test_read_accepts_0400_and_checks_length(tmp_path):
    path = tmp_path / "k"
    create_key_file(path, b"\x07" * 32)
    os.chmod(path, 0o400)
    assert read_key_file(path) == b"\x07" * 32
    short = tmp_path / "short"
    short.write_bytes(b"\x01" * 31)
    os.chmod(short, 0o600)
    with pytest.raises(KeyFileError, match="exactly 32 bytes"):
        read_key_file(short)
    with pytest.raises(KeyFileError, match="no such key file"):
        read_key_file(tmp_path / "absent")


def test_errors_never_show_key_bytes(tmp_path):
    path = tmp_path / "k"
    secret = b"\xaa" * 32
    create_key_file(path, secret)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as e:
        read_key_file(path)
    assert secret.hex() not in str(e.value)
