"""The shared daemon scaffolding, run for real as a subprocess (tests/support/echo_daemon)."""

import json
import os
import re
import signal
import stat
import subprocess
import sys

import pytest

from revault.rpc import RpcClient, RpcError
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


@pytest.mark.parametrize("key", ["listen", "metrics_listen"])
def test_port_in_use_fails_without_hanging(echo_setup, key):
    import socket
    tmp, server, client, config = echo_setup
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config[key] = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run_echo(write_config(tmp / "echo.toml", config))
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert ("(metrics_listen)" in result.stderr) == (key == "metrics_listen")
    assert "Traceback" not in result.stderr


def test_a_command_runs_instead_of_the_daemon(echo_setup):
    tmp, server, client, config = echo_setup
    path = write_config(tmp / "echo.toml", config)
    result = subprocess.run([sys.executable, "-m", "tests.support.echo_daemon", "--config",
                             str(path), "clients"], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [client.public.hex()]
    assert "listening" not in result.stderr
    unknown = subprocess.run([sys.executable, "-m", "tests.support.echo_daemon", "--config",
                              str(path), "serve-twice"], capture_output=True, text=True,
                             timeout=60, cwd=REPO_ROOT)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_unreadable_config_file(daemon_dir):
    result = run_echo(daemon_dir / "absent.toml")
    assert result.returncode == 2
    assert "no such file" in result.stderr


# --- metrics_listen and log_format --------------------------------------------------

def test_bad_metrics_listen_and_log_format_are_config_errors(echo_setup):
    tmp, server, client, config = echo_setup
    config.update({"metrics_listen": "localhost", "log_format": "xml"})
    result = run_echo(write_config(tmp / "echo.toml", config))
    assert result.returncode == 2
    assert "metrics_listen: expected \"HOST:PORT\"" in result.stderr
    assert "log_format: must be one of text, json" in result.stderr


TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (DEBUG|INFO|WARNING|ERROR) "
                       r"([\w.]+): (.*)$")
HOSTILE_METHOD = 'line\nbreak "quoted" é \ud800'


async def logged_session(echo_setup, log_format: str) -> list[tuple[str, str, str, str]]:
    """(time, level, logger, message) of every record a short session logs."""
    tmp, server, client, config = echo_setup
    config["log_format"] = log_format
    daemon = DaemonProcess("echo", write_config(tmp / f"echo-{log_format}.toml", config), tmp,
                           module="tests.support.echo_daemon")
    daemon.stderr_path = tmp / f"echo-{log_format}.stderr"
    try:
        await daemon.start()
        async with await RpcClient.connect("127.0.0.1", daemon.port, client.private,
                                           server.public) as rpc:
            assert await rpc.call("echo", {"x": 1}) == {"echo": {"x": 1}}
            with pytest.raises(RpcError):
                await rpc.call(HOSTILE_METHOD, {})
        assert await daemon.stop() == 0
    finally:
        daemon.ensure_dead()
    records = []
    for line in daemon.stderr().splitlines():
        if log_format == "json":
            record = json.loads(line)
            assert set(record) == {"time", "level", "logger", "message"}, record
            records.append((record["time"], record["level"], record["logger"],
                            record["message"]))
        elif TEXT_LINE.match(line):
            records.append(TEXT_LINE.match(line).groups())
        else:  # a text record's message may span lines; it continues the previous one
            time_, level, logger, message = records[-1]
            records[-1] = (time_, level, logger, message + "\n" + line)
    return records


async def test_json_logs_have_the_fields_of_text_logs_one_object_per_line(echo_setup):
    text = await logged_session(echo_setup, "text")
    as_json = await logged_session(echo_setup, "json")
    assert len(as_json) == len(text) >= 4

    def comparable(record):  # ports and durations differ between the two runs
        time_, level, logger, message = record
        assert TEXT_LINE.match(f"{time_} {level} {logger}: x"), time_
        return level, logger, re.sub(r"\d+", "N", message)

    assert [comparable(r) for r in as_json] == [comparable(r) for r in text]
    refused = [r for r in as_json if "refused" in r[3] and "break" in r[3]]
    assert len(refused) == 1 and "\n" not in refused[0][3]


def test_json_formatter_carries_the_traceback_as_a_field():
    import logging
    from revault.daemon import JsonLogFormatter
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("revault.x", logging.ERROR, __file__, 1, "failed %s",
                                   ("here",), sys.exc_info())
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record)
    line = JsonLogFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "failed here" and parsed["level"] == "ERROR"
    assert parsed["logger"] == "revault.x"
    assert parsed["exception"].startswith("Traceback")
    assert "ValueError: boom" in parsed["exception"]
    assert text == f"{parsed['time']} ERROR revault.x: failed here\n{parsed['exception']}"
