"""The `[deployment]` table read like any other config table (revault.deployment).

Bad keys are collected with the rest of a daemon's config problems (one line each,
naming the key) and stop it at start with exit status 2; `Deployment.from_dict` says
the same things for a plain dict. The spec's bounds themselves are tested in
tests/test_transactions.py (`BAD_TABLES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from revault.config import ConfigError, ConfigTable, ProblemCollector
from revault.daemon import CommonConfig, load_app_config, run_daemon
from revault.deployment import (Deployment, DeploymentError, VaultKeys, read_deployment,
                                script_relative_lock)
from tests.support import keys

EMERGENCY = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"


def pub(i: int) -> str:
    return keys.pub(i).hex()


def toml_list(values) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


GOOD = f"""
[deployment]
network = "regtest"
stakeholders = {toml_list(pub(i) for i in (1, 2, 3))}
managers = {toml_list(pub(i) for i in (11, 12))}
cosigners = {toml_list([pub(21)])}
cpfp_keys = {toml_list(pub(i) for i in (31, 32))}
managers_threshold = 1
min_deposit_value = 1000000
unvault_csv = 6
emergency_address = "{EMERGENCY}"
watchtowers = {toml_list([pub(40)])}
"""


@dataclass(frozen=True)
class AppWithDeployment:
    """What a watchtower's or a wallet's config reader returns, reduced to the seam."""

    common: CommonConfig
    deployment: Deployment


def read_app(table: ConfigTable, base: Path) -> AppWithDeployment:
    p = ProblemCollector()
    common = p.read(CommonConfig.read, table, base)
    deployment_table = p.read(table.table, "deployment")
    deployment = read_deployment(deployment_table, p) if deployment_table is not None else None
    p.finish()
    return AppWithDeployment(common, deployment)


def write_config(tmp_path: Path, deployment_toml: str) -> Path:
    path = tmp_path / "app.toml"
    path.write_text(
        f'listen = "127.0.0.1:0"\ndata_dir = "data"\nnoise_key_file = "noise.key"\n{deployment_toml}'
    )
    return path


def test_a_good_table_reads_as_from_dict(tmp_path: Path) -> None:
    config = load_app_config("test", write_config(tmp_path, GOOD), read_app)
    d = config.deployment
    assert d == Deployment.from_dict({
        "network": "regtest",
        "stakeholders": [pub(i) for i in (1, 2, 3)],
        "managers": [pub(i) for i in (11, 12)],
        "cosigners": [pub(21)],
        "cpfp_keys": [pub(31), pub(32)],
        "managers_threshold": 1,
        "min_deposit_value": 1_000_000,
        "unvault_csv": 6,
        "emergency_address": EMERGENCY,
        "watchtowers": [pub(40)],
    })
    assert d.managers_threshold == 1 and d.watchtowers == (bytes.fromhex(pub(40)),)
    assert d.min_deposit_value == 1_000_000 and d.emergency_address == EMERGENCY


def test_every_bad_key_is_listed_with_the_others(tmp_path: Path) -> None:
    bad = (GOOD.replace("unvault_csv = 6", "unvault_csv = 0")
               .replace(f'"{pub(12)}"', f'"{pub(1)}"')
               .replace('managers_threshold = 1', 'managers_threshold = 1\nspend_limit = 3')
               .replace(EMERGENCY, "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"))
    with pytest.raises(ConfigError) as err:
        load_app_config("test", write_config(tmp_path, bad), read_app)
    problems = err.value.problems
    assert "deployment.unvault_csv: must be between 1 and 65535 blocks (BIP 68 relative lock), got 0" in problems
    assert "deployment.managers[1]: duplicate key (same as deployment.stakeholders[0])" in problems
    assert any(p.startswith("deployment.emergency_address: not a valid regtest address") for p in problems)
    assert "deployment.spend_limit: unknown key" in problems
    assert len(problems) == 4


def test_missing_table_and_missing_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_app_config("test", write_config(tmp_path, ""), read_app)
    assert err.value.problems == ["deployment: missing"]
    with pytest.raises(ConfigError) as err:
        load_app_config("test", write_config(tmp_path, '[deployment]\nnetwork = "regtest"\n'), read_app)
    assert err.value.problems == [
        "deployment.stakeholders: missing", "deployment.managers: missing",
        "deployment.cosigners: missing (use [] for none)", "deployment.cpfp_keys: missing",
        "deployment.unvault_csv: missing",
    ]


def test_optional_keys_take_their_defaults(tmp_path: Path) -> None:
    # A manager-only participant's wallet: no emergency_address; default minimum deposit.
    lines = [line for line in GOOD.splitlines()
             if not line.startswith(("emergency_address", "min_deposit_value"))]
    d = load_app_config("test", write_config(tmp_path, "\n".join(lines)), read_app).deployment
    assert d.emergency_address is None and d.emergency_script_pubkey is None
    assert d.min_deposit_value == 500_000


def test_a_bad_network_still_checks_the_keys() -> None:
    p = ProblemCollector()
    table = ConfigTable({"network": "mainnet", "stakeholders": ["02" + "ff" * 32],
                         "managers": [pub(2)], "cosigners": [], "cpfp_keys": [pub(3)],
                         "unvault_csv": 6,
                         "emergency_address": EMERGENCY}, "deployment")
    assert read_deployment(table, p) is None
    assert p.problems[0].startswith("deployment.network: must be one of bitcoin, testnet")
    assert p.problems[1] == "deployment.stakeholders[0]: not a valid public key (not on the curve)"
    assert len(p.problems) == 2  # the address is not judged against an unknown network


def test_from_dict_names_the_first_problem_and_keeps_them_all() -> None:
    with pytest.raises(DeploymentError) as err:
        Deployment.from_dict({"network": "regtest", "stakeholders": [pub(1)], "managers": [pub(1)],
                              "cosigners": [], "cpfp_keys": [pub(2)], "unvault_csv": True,
                              "emergency_address": EMERGENCY})
    assert err.value.key == "deployment.managers[0]"
    assert err.value.problems == [
        "deployment.managers[0]: duplicate key (same as deployment.stakeholders[0])",
        "deployment.unvault_csv: must be an integer (blocks)",
    ]
    assert isinstance(err.value, ValueError) and isinstance(err.value, ConfigError)
    with pytest.raises(DeploymentError, match="^deployment: must be a table$"):
        Deployment.from_dict(["not", "a", "table"])


def test_a_daemon_exits_2_naming_the_bad_deployment_key(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path, GOOD.replace("managers_threshold = 1", "managers_threshold = 3"))
    status = run_daemon("test", ["--config", str(path)], read_app, make_service=None)
    assert status == 2
    err = capsys.readouterr().err
    assert ("revault-test: config: deployment.managers_threshold: must be between 1 and the "
            "number of managers (2), got 3") in err


@pytest.mark.parametrize("n_stk,n_mgr,k,n_cos,csv", [(3, 2, 2, 1, 6), (20, 20, 13, 20, 65535), (1, 1, 1, 0, 17)])
def test_unvault_script_parses_back_to_its_keys(n_stk, n_mgr, k, n_cos, csv) -> None:
    keys = VaultKeys(tuple(bytes.fromhex(pub(100 + i)) for i in range(n_stk)),
                     tuple(bytes.fromhex(pub(200 + i)) for i in range(n_mgr)), k,
                     tuple(bytes.fromhex(pub(300 + i)) for i in range(n_cos)), csv)
    script = keys.unvault_script()
    assert VaultKeys.from_unvault_script(script) == keys
    assert script_relative_lock(script) == csv
    for other in (keys.deposit_script(), script[:-1], script + b"\x51", b"", b"\x4d\xff"):
        assert VaultKeys.from_unvault_script(other) is None
    assert script_relative_lock(keys.deposit_script()) is None
