"""The shared daemon scaffolding, run for real as a subprocess (tests/support/echo_daemon)."""

import os
import signal
import stat
import subprocess
import sys

import pytest

from revault.rpc import RpcClient
from tests.support.daemons import REPO_ROOT, DaemonProcess, NoiseIdentity, write_config


@pytest.fixture
def echo_setup(daemon_dir):
    server = NoiseIdentity.create(daemon_dir / "server.key")
    client = NoiseIdentity.create(daemon_dir / "client.key")
    config = {
        "listen": "127.0.0.1:0",
        "data_dir": "data",
        "noise_key_file": "server.key",
        "log_level": "debug",
        "clients": [client.public.hex()],
    }
    return daemon_dir, server, client, config


def run_echo(config_path):
    return subprocess.run(
        [sys.executable, "-m", "tests.support.echo_daemon", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


async def test_ready_serves_and_stops_cleanly_on_sigterm(echo_setup):
    tmp, server, client, config = echo_setup
    daemon = DaemonProcess("echo", write_config(tmp / "echo.toml", config), tmp,
                           module="tests.support.echo_daemon")
    try:
        await daemon.start()
        data_dir = tmp / "data"
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        rpc = await RpcClient.connect("127.0.0.1", daemon.port, client.private, server.public)
        assert await rpc.call("echo", {"x": [1, "é"]}) == {"echo": {"x": [1, "é"]}}
        await rpc.close()
        assert await daemon.stop(signal.SIGTERM) == 0
        assert "stopped" in daemon.stderr()
        assert server.private.hex() not in daemon.stderr()
        assert client.private.hex() not in daemon.stderr()
    finally:
        daemon.ensure_dead()


async def test_sigint_also_stops_cleanly(echo_setup):
    tmp, server, client, config = echo_setup
    daemon = DaemonProcess("echo", write_config(tmp / "echo.toml", config), tmp,
                           module="tests.support.echo_daemon")
    try:
        await daemon.start()
        assert await daemon.stop(signal.SIGINT) == 0
    finally:
        daemon.ensure_dead()


def test_every_bad_and_unknown_key_is_reported_and_nothing_starts(echo_setup):
    tmp, server, client, config = echo_setup
    config.update({"max_connections": 0, "idle_timout": 5, "log_level": "loud"})
    result = run_echo(write_config(tmp / "echo.toml", config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any("log_level: must be one of" in line for line in lines), lines
    assert any("idle_timout: unknown key" in line for line in lines), lines
    assert "Traceback" not in result.stderr
    assert not (tmp / "data").exists()


def test_slot_budgets_are_checked_against_each_other_and_the_peers(echo_setup):
    tmp, server, client, config = echo_setup
    config.update({"max_connections": 8, "max_handshakes": 9,
                   "max_handshakes_per_address": 0})
    result = run_echo(write_config(tmp / "echo.toml", config))
    assert result.returncode == 2
    assert "max_handshakes: must be at most max_connections (8), got 9" in result.stderr
    assert "max_handshakes_per_address: must be at least 1" in result.stderr
    # Every handshake slot and no room for the one configured peer: refused too.
    config.update({"max_connections": 8, "max_handshakes": 8,
                   "max_handshakes_per_address": 8})
    result = run_echo(write_config(tmp / "echo.toml", config))
    assert result.returncode == 2
    assert ("max_connections - max_handshakes (0) must be at least the number of "
            "configured peers (1)") in result.stderr


def test_missing_required_key(echo_setup):
    tmp, server, client, config = echo_setup
    del config["noise_key_file"]
    result = run_echo(write_config(tmp / "echo.toml", config))
    assert result.returncode == 2
    assert "noise_key_file: missing" in result.stderr


def test_world_readable_noise_key_is_refused(echo_setup):
    tmp, server, client, config = echo_setup
    os.chmod(server.path, 0o644)
    result = run_echo(write_config(tmp / "echo.toml", config))
    assert result.returncode == 2
    assert "group or others" in result.stderr
    assert server.private.hex() not in result.stderr


def test_port_in_use_fails_without_hanging(echo_setup):
    import socket
    tmp, server, client, config = echo_setup
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run_echo(write_config(tmp / "echo.toml", config))
    assert result.returncode == 1
    assert "cannot listen" in result.stderr


def test_unreadable_config_file(daemon_dir):
    result = run_echo(daemon_dir / "absent.toml")
    assert result.returncode == 2
    assert "no such file" in result.stderr
