"""The wallet's config: every key checked, every problem reported at once, naming it."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import coincurve
import pytest

from revault.config import ConfigError, ConfigTable
from revault.keys import create_key_file
from revault.deployment import p2wpkh, script_pubkey_to_address
from revault.wallet import Wallet
from revault.wallet_config import default_bitcoind_wallet, load_wallet_config, read_wallet_config

REPO = Path(__file__).resolve().parents[1]


def secret(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def pub(label: str) -> str:
    return coincurve.PrivateKey(secret(label)).public_key.format(compressed=True).hex()


NOISE = "11" * 32
DEPLOYMENT = {
    "network": "regtest",
    "stakeholders": [pub("stk0"), pub("stk1")],
    "managers": [pub("mgr0")],
    "cosigners": [pub("cos0")],
    "cpfp_keys": [pub("cpfp0")],
    "unvault_csv": 6,
    "emergency_address": script_pubkey_to_address(
        p2wpkh(bytes.fromhex(pub("emergency"))), "regtest"),
}


def config(**changes) -> dict:
    base = {
        "data_dir": "data",
        "noise_key_file": "noise.key",
        "stakeholder_key_file": "stk.key",
        "sync_server": {"host": "127.0.0.1", "port": 8380, "noise_key": NOISE},
        "watchtowers": [{"host": "127.0.0.1", "port": 8381, "noise_key": "22" * 32}],
        "bitcoind": {"rpc_url": "http://127.0.0.1:18443", "cookie_file": "cookie"},
        "deployment": dict(DEPLOYMENT),
    }
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def read(data: dict):
    return read_wallet_config(ConfigTable(data), Path("/etc/revault"))


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read(data)
    return info.value.problems


def test_a_stakeholder_config():
    c = read(config())
    assert c.data_dir == Path("/etc/revault/data")
    assert c.sync_server.port == 8380 and c.sync_server.noise_key == bytes.fromhex(NOISE)
    assert [t.port for t in c.watchtowers] == [8381] and c.cosigners == ()
    assert c.bitcoind.cookie_file == Path("/etc/revault/cookie") and c.bitcoind.wallet is None
    assert c.manager_key_file is None and c.deployment.unvault_csv == 6


def test_every_problem_at_once_each_naming_its_key():
    bad = config(
        data_dir=3,
        sync_server={"host": "", "port": 70000, "noise_key": "zz"},
        watchtowers=[{"host": "h", "port": 1, "noise_key": NOISE, "extra": 1}],
        bitcoind={"rpc_url": "https://u:p@host:1/x", "cookie_file": "c", "rpc_user": "u"},
        typo_key=True,
    )
    found = "\n".join(problems(bad))
    for expected in ("data_dir: expected a string", "sync_server.host: must not be empty",
                     "sync_server.port: must be at most 65535",
                     "sync_server.noise_key: expected 64 hex", "watchtowers[0].extra: unknown key",
                     "bitcoind.rpc_url: expected \"http://HOST:PORT\"",
                     "bitcoind.cookie_file: give cookie_file or rpc_user/rpc_password, not both",
                     "typo_key: unknown key"):
        assert expected in found, found


def test_roles_need_their_peers():
    assert any("a stakeholder needs at least one [[watchtowers]]" in p
               for p in problems(config(watchtowers=None)))
    manager = config(stakeholder_key_file=None, watchtowers=None, manager_key_file="m.key")
    found = "\n".join(problems(manager))
    assert "cpfp_key_file: missing" in found
    assert "the deployment has 1 cosigner(s), this config lists 0 [[cosigners]]" in found
    assert any("stakeholder_key_file and/or manager_key_file" in p
               for p in problems(config(stakeholder_key_file=None)))


def test_a_bad_deployment_is_reported_by_key():
    bad = dict(DEPLOYMENT, unvault_csv=0)
    assert any(p.startswith("deployment.unvault_csv") for p in problems(config(deployment=bad)))


def test_bitcoind_user_and_password_go_together():
    found = problems(config(bitcoind={"rpc_url": "http://127.0.0.1:1", "rpc_user": "u"}))
    assert any("give cookie_file, or both rpc_user and rpc_password" in p for p in found)
    c = read(config(bitcoind={"rpc_url": "http://127.0.0.1:1", "rpc_user": "u",
                              "rpc_password": "secret", "wallet": "w"}))
    assert "secret" not in repr(c.bitcoind) and c.bitcoind.wallet == "w"


def test_two_data_dirs_never_share_a_watch_only_wallet(tmp_path):
    assert default_bitcoind_wallet(tmp_path / "a") != default_bitcoind_wallet(tmp_path / "b")
    assert default_bitcoind_wallet(tmp_path / "a") == default_bitcoind_wallet(tmp_path / "a")


async def test_a_key_that_is_not_the_deployments_is_refused_at_open(tmp_path):
    create_key_file(tmp_path / "noise.key", secret("noise"))
    create_key_file(tmp_path / "stk.key", secret("not a stakeholder"))
    (tmp_path / "wallet.toml").write_text(_toml(config()))
    w = Wallet.open(tmp_path / "wallet.toml")
    with pytest.raises(ConfigError, match="is not one of the deployment's stakeholders"):
        await w.start()
    await w.close()


def test_the_sample_config_is_valid():
    sample = REPO / "contrib" / "wallet.sample.toml"
    c = load_wallet_config(sample)
    assert c.stakeholder_key_file is not None and c.manager_key_file is not None
    assert len(c.watchtowers) >= 1 and len(c.cosigners) == len(c.deployment.cosigners)
    with open(sample, "rb") as f:
        assert "deployment" in tomllib.load(f)


def _toml(data: dict) -> str:
    from tests.support.deployment_system import write_wallet_config_text
    return write_wallet_config_text(data)
