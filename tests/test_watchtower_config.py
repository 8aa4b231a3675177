"""revault-watchtower config: the shipped sample loads and documents every key, bad
configs stop it naming each key, the systemd unit is hardened like the others."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from revault.daemon import load_app_config
from revault.watchtower import read_config
from tests.support.daemons import REPO_ROOT

SAMPLE = REPO_ROOT / "contrib" / "watchtower.sample.toml"
UNIT = REPO_ROOT / "contrib" / "systemd" / "revault-watchtower.service"
COSIGNER_UNIT = REPO_ROOT / "contrib" / "systemd" / "revault-cosigner.service"


def test_sample_config_is_valid_and_documents_every_key():
    config = load_app_config("watchtower", SAMPLE, read_config)
    assert config.common.data_dir == Path("/var/lib/revault-watchtower")
    assert config.bitcoind.wallet and config.max_feerate == 100
    assert not config.policy.has_rules  # the sample keeps the seed's default
    assert config.deployment.network == "bitcoin"
    text = SAMPLE.read_text()
    for key in ("listen", "data_dir", "noise_key_file", "opinion_key_file",
                "wallet_noise_key", "poll_interval", "requests_per_second", "idle_timeout",
                "max_connections", "max_handshakes", "max_handshakes_per_address",
                "max_connections_per_peer", "write_timeout", "log_level", "host", "port", "noise_key", "rpc_url",
                "cookie_file", "rpc_user", "rpc_password", "wallet", "zmq_rawtx",
                "zmq_rawblock", "zmq_sequence", "max_feerate", "accept_all", "max_value",
                "max_value_per_day", "allowed_addresses", "plugins", "stakeholders",
                "managers", "cosigners", "unvault_csv", "emergency_address", "cpfp_keys",
                "managers_threshold", "min_deposit_value", "watchtowers"):
        line = re.search(rf"^#? ?{key} = ", text, re.MULTILINE)
        assert line, f"sample config does not show {key}"
        before = text[:line.start()].rstrip("\n").rsplit("\n", 1)[-1]
        assert before.startswith("#") or before.startswith("[") or \
            re.match(r"^#? ?\w+ = ", before), f"{key} has no comment above it"


def test_bad_config_names_every_bad_key(daemon_dir):
    text = SAMPLE.read_text().replace('max_feerate = 100', 'max_feerate = 0')
    text = text.replace('rpc_url = "http://127.0.0.1:8332"', 'rpc_url = "https://x"')
    text = text.replace('unvault_csv = 144', 'unvault_csv = 144\nsurprise = 1')
    text = text.replace('[policy]', '[policy]\nmax_value = "a lot"\nplugins = ["nope"]')
    config = daemon_dir / "tower.toml"
    config.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "revault.watchtower", "--config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "fees.max_feerate: must be at least 1" in err
    assert 'bitcoind.rpc_url: expected "http://HOST:PORT"' in err
    assert "deployment.surprise: unknown key" in err
    assert "policy.max_value: expected an integer" in err
    assert "policy.plugins[0]: no entry point 'nope'" in err
    assert "Traceback" not in err


def test_unit_file_is_hardened_like_the_other_daemons():
    def hardening(path: Path) -> list[str]:
        lines = [line.strip() for line in path.read_text().splitlines()]
        start = lines.index("NoNewPrivileges=yes")
        return [line for line in lines[start:] if line and not line.startswith("[")]

    unit = UNIT.read_text()
    assert hardening(UNIT) == hardening(COSIGNER_UNIT)
    assert "Type=notify" in unit and "NotifyAccess=main" in unit
    assert "ExecStart=/usr/bin/revault-watchtower --config /etc/revault/watchtower.toml" in unit
    assert "RestartPreventExitStatus=2" in unit and "StateDirectory=revault-watchtower" in unit
