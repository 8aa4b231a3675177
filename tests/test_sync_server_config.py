"""revault-sync-server config: the shipped sample loads, bad configs stop it naming keys."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from revault.config import ConfigTable
from revault.daemon import load_app_config
from revault.sync_store import Quotas, Retention
from revault.sync_server import read_config
from tests.support.daemons import REPO_ROOT, NoiseIdentity, write_config

SAMPLE = REPO_ROOT / "contrib" / "sync-server.sample.toml"
UNIT = REPO_ROOT / "contrib" / "systemd" / "revault-sync-server.service"


def test_sample_config_loads():
    config = load_app_config("sync-server", SAMPLE, read_config)
    assert (config.common.listen_host, config.common.listen_port) == ("127.0.0.1", 8380)
    assert config.quotas == Quotas() and config.retention == Retention()


def test_every_commented_key_in_the_sample_is_known_and_shows_its_default():
    # Uncomment "# key = value" lines: each must be a key the daemon reads, and the value
    # shown must be the default, or the sample lies to operators.
    text = re.sub(r"(?m)^# ([a-z_]+ = \S+)$", r"\1", SAMPLE.read_text())
    assert text.count("\n") == SAMPLE.read_text().count("\n")
    table = ConfigTable(tomllib.loads(text))
    config = read_config(table, SAMPLE.parent)
    assert table.unknown_keys() == []
    documented = set(re.findall(r"(?m)^# ([a-z_]+) = ", SAMPLE.read_text()))
    assert documented >= set(Quotas.__dataclass_fields__) | set(Retention.__dataclass_fields__)
    assert documented >= {"idle_timeout", "max_connections", "log_level",
                          "requests_per_second", "purge_interval"}
    assert config.quotas == Quotas() and config.retention == Retention()
    assert (config.common.requests_per_second, config.purge_interval) == (50, 600)
    assert (config.common.idle_timeout, config.common.max_connections) == (300, 1024)


def test_bad_config_exits_2_naming_every_bad_key(daemon_dir):
    server = NoiseIdentity.create(daemon_dir / "server.key")
    config = {
        "listen": "127.0.0.1:0", "data_dir": "data", "noise_key_file": "server.key",
        "requests_per_second": 0,
        "peers": {"stakeholders": [server.public.hex()], "managers": ["not a key"],
                  "watchtowers": []},
        "expiry": {"signatures": "forever"},
        "quotas": {"signatures_per_id": 100_000, "bogus": 1},
    }
    path = write_config(daemon_dir / "bad.toml", config)
    result = subprocess.run([sys.executable, "-m", "revault.sync_server", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for expected in ("peers.managers[0]:", "requests_per_second: must be at least",
                     "expiry.signatures: expected an integer",
                     "quotas.signatures_per_id: must be at most 250",
                     "quotas.bogus: unknown key"):
        assert expected in result.stderr, result.stderr
    # Keys after a bad one are still read, not reported as unknown.
    assert result.stderr.count("unknown key") == 1, result.stderr
    assert not (daemon_dir / "data").exists()


def test_systemd_unit():
    unit = UNIT.read_text()
    for line in ("Type=notify", "User=revault", "StateDirectory=revault-sync-server",
                 "ExecStart=/usr/bin/revault-sync-server --config /etc/revault/sync-server.toml",
                 "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                 "MemoryDenyWriteExecute=yes", "LockPersonality=yes",
                 "SystemCallFilter=@system-service", "CapabilityBoundingSet=", "UMask=0077"):
        assert line in unit.splitlines(), line
