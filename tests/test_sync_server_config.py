"""revault-sync-server config: the shipped sample loads, bad configs stop it naming keys."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from revault.config import ConfigError, ConfigTable
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


POSTGRES_SAMPLE = REPO_ROOT / "contrib" / "sync-server.postgresql.sample.toml"


def test_postgresql_sample_config_loads():
    config = load_app_config("sync-server", POSTGRES_SAMPLE, read_config)
    assert config.storage.backend == "postgresql"
    assert config.storage.dsn == "postgresql://revault_sync@db.internal:5432/revault_sync"
    assert config.storage.password_file == Path("/etc/revault/sync-server.pgpass")
    assert config.storage.pool_size == 8
    assert load_app_config("sync-server", SAMPLE, read_config).storage.backend == "sqlite"


def _storage_problems(tmp_path, storage: dict) -> list[str]:
    key = tmp_path / "server.key"
    server = NoiseIdentity.create(key) if not key.exists() else None
    public = (server.public if server else b"\x01" * 32).hex()
    config = {"listen": "127.0.0.1:0", "data_dir": "data", "noise_key_file": "server.key",
              "peers": {"stakeholders": [public], "managers": [], "watchtowers": []},
              "storage": storage}
    path = write_config(tmp_path / "storage.toml", config)
    try:
        load_app_config("sync-server", path, read_config)
    except ConfigError as e:
        return e.problems
    return []


def test_storage_parts_make_a_dsn(tmp_path):
    server = NoiseIdentity.create(tmp_path / "server.key")
    path = write_config(tmp_path / "parts.toml", {
        "listen": "127.0.0.1:0", "data_dir": "data", "noise_key_file": "server.key",
        "peers": {"stakeholders": [server.public.hex()], "managers": [], "watchtowers": []},
        "storage": {"backend": "postgresql", "host": "db", "user": "u", "database": "d",
                    "pool_size": 3}})
    storage = load_app_config("sync-server", path, read_config).storage
    assert (storage.dsn, storage.pool_size) == ("postgresql://u@db:5432/d", 3)


def test_bad_storage_config_names_the_key(tmp_path):
    cases = [
        ({"backend": "mysql"}, 'storage.backend: must be one of sqlite, postgresql'),
        ({"dsn": "postgresql://x@y/z"}, 'storage.dsn: only with backend = "postgresql"'),
        ({"backend": "postgresql"}, "storage.dsn: missing (or give host, user, database)"),
        ({"backend": "postgresql", "dsn": "postgresql://x@y/z", "host": "y"},
         "storage.dsn: give either dsn or host, not both"),
        ({"backend": "postgresql", "dsn": "mysql://x@y/z"},
         "storage.dsn: expected a postgresql:// URL"),
        ({"backend": "postgresql", "dsn": "postgresql://x@y/z", "pool_size": 0},
         "storage.pool_size: must be at least 1"),
        ({"backend": "postgresql", "dsn": "postgresql://x@y/z", "bogus": 1},
         "storage.bogus: unknown key"),
    ]
    for storage, expected in cases:
        problems = _storage_problems(tmp_path, storage)
        assert any(p.startswith(expected) for p in problems), (storage, problems)


def test_password_file_readable_by_others_stops_the_daemon(tmp_path):
    server = NoiseIdentity.create(tmp_path / "server.key")
    password = tmp_path / "pgpass"
    password.write_text("s3cret\n")
    password.chmod(0o644)
    path = write_config(tmp_path / "pw.toml", {
        "listen": "127.0.0.1:0", "data_dir": "data", "noise_key_file": "server.key",
        "peers": {"stakeholders": [server.public.hex()], "managers": [], "watchtowers": []},
        "storage": {"backend": "postgresql", "dsn": "postgresql://u@127.0.0.1:1/d",
                    "password_file": "pgpass"}})
    result = subprocess.run([sys.executable, "-m", "revault.sync_server", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert "pgpass: readable or writable by group or others" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


def test_unreachable_database_stops_the_daemon_with_the_cause(tmp_path):
    from tests.support.postgres import _free_port
    server = NoiseIdentity.create(tmp_path / "server.key")
    path = write_config(tmp_path / "down.toml", {
        "listen": "127.0.0.1:0", "data_dir": "data", "noise_key_file": "server.key",
        "peers": {"stakeholders": [server.public.hex()], "managers": [], "watchtowers": []},
        "storage": {"backend": "postgresql",
                    "dsn": f"postgresql://u:hunter2@127.0.0.1:{_free_port()}/d"}})
    result = subprocess.run([sys.executable, "-m", "revault.sync_server", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 1, result.stderr
    assert "cannot start sync-server" in result.stderr and "cannot connect" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
