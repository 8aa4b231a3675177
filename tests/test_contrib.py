"""contrib/ checked by the tools that consume it, and the units' sandbox exercised for real.

promtool (Debian `prometheus`) checks and unit-tests the alerting rules and checks every
dashboard query; systemd-analyze (Debian `systemd`) verifies the units and rates their
exposure. systemd cannot run units here (it is not PID 1), so the daemons are run under
tests/support/confine.py, which applies each unit's seccomp filters, no-new-privileges,
empty capability bounding set and umask as systemd 252 builds them (see its docstring).
scripts/test installs the two tools when they are missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from revault import metrics
from tests.support.cosigner_psbt import make_spend
from tests.support.daemons import REPO_ROOT
from tests.support.scrape import scrape
from tests.test_cosigner import setup_cosigner, sign
from tests.test_sync_server import HOST, Sync, der, h, make_peers, pubkey, sync_config

CONTRIB = REPO_ROOT / "contrib"
RULES = CONTRIB / "prometheus" / "revault.rules.yml"
DASHBOARD = CONTRIB / "grafana" / "revault.dashboard.json"
UNITS = sorted((CONTRIB / "systemd").glob("*.service"))
METRIC_NAME = re.compile(r"\b(?:revault|process)_[a-z0-9_]+\b")
# Grafana's own variables, replaced by what Grafana would put there.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m",
                     "$job": "revault-.*", "$instance": ".*"}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/test installs it (Debian package {package})"
    return path


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


def defined_series() -> set[str]:
    return metrics.sample_names(metrics.every_metric())


# --- Prometheus and Grafana -----------------------------------------------------------

def test_rules_pass_promtool_check_and_their_unit_tests():
    promtool = tool("promtool", "prometheus")
    checked = run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 14 rules found" in checked.stdout
    tested = run(promtool, "test", "rules", "revault.rules.test.yml", cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = run(promtool, "check", "config", "prometheus.example.yml", cwd=RULES.parent)
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_is_unit_tested_and_names_only_defined_metrics():
    rules_text = RULES.read_text()
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", rules_text, re.MULTILINE))
    tested = set(re.findall(r"alertname: (\w+)",
                            (RULES.parent / "revault.rules.test.yml").read_text()))
    assert alerts and alerts == tested
    expressions = re.findall(r"^\s+expr: (.+)$", rules_text, re.MULTILINE)
    named = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    assert named - defined_series() == set()


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def test_dashboard_is_grafana_json_querying_only_defined_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    queried = {name for expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    assert queried - defined_series() == set()
    # Every daemon's metrics are on it, not only the common ones.
    for prefix in ("revault_sync_", "revault_cosigner_", "revault_watchtower_"):
        assert any(name.startswith(prefix) for name in queried), prefix


def test_every_dashboard_query_is_valid_promql(tmp_path):
    promtool = tool("promtool", "prometheus")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, expr in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        lines += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text("\n".join(lines) + "\n")
    checked = run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_docs_list_exactly_the_metrics_the_code_defines():
    documented = set(re.findall(r"`(revault_[a-z0-9_]+)`", (REPO_ROOT / "docs" / "metrics.md")
                                .read_text()))
    registry = metrics.every_metric()
    defined = {family.name + ("_total" if family.type == "counter" else "")
               for family in registry.collect() if family.name.startswith("revault_")}
    assert documented == defined


# --- systemd units --------------------------------------------------------------------

def installed_unit(unit: Path, directory: Path) -> Path:
    """The unit with ExecStart= pointing at this venv's console script (which must
    exist and be executable for verify to pass), saved under its own name."""
    text = unit.read_text()
    command = re.search(r"^ExecStart=/usr/bin/(\S+)", text, re.MULTILINE).group(1)
    script = Path(sys.executable).parent / command
    copy = directory / unit.name
    copy.write_text(text.replace(f"/usr/bin/{command}", str(script)))
    return copy


def test_there_is_a_unit_per_daemon_console_script():
    scripts = re.findall(r'^(revault-[a-z-]+) = "revault\.\w+:main"$',
                         (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    daemons = {s for s in scripts if s != "revault-keygen"}
    assert {unit.stem for unit in UNITS} == daemons


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_passes_systemd_analyze_verify_and_security(unit, tmp_path):
    analyze = tool("systemd-analyze", "systemd")
    copy = installed_unit(unit, tmp_path)
    verified = run(analyze, "verify", str(copy))
    # verify exits 0 on unknown keys and bad values, only warning: any output is a failure.
    assert verified.returncode == 0 and verified.stdout + verified.stderr == "", (
        verified.stdout + verified.stderr)
    security = run(analyze, "security", "--offline=true", "--threshold=20", str(copy))
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", security.stdout)
    assert exposure and float(exposure.group(1)) <= 2.0, security.stdout[-300:]


def test_verify_catches_a_mistyped_unit(tmp_path):
    analyze = tool("systemd-analyze", "systemd")
    copy = installed_unit(UNITS[0], tmp_path)
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHome=yess"))
    verified = run(analyze, "verify", str(copy))
    assert "yess" in verified.stderr


# --- the units' sandbox, applied --------------------------------------------------------

PROBE = r"""
import ctypes, errno, mmap, os, socket, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
def outcome(call):
    try:
        result = call()
    except OSError as e:
        return errno.errorcode[e.errno]
    return errno.errorcode[ctypes.get_errno()] if result == -1 else "allowed"
results = {
    "mmap_write_exec": outcome(lambda: mmap.mmap(-1, 4096, prot=7)),
    "setuid": outcome(lambda: os.setuid(0)),
    "chroot": outcome(lambda: os.chroot("/")),
    "packet_socket": outcome(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
    "user_namespace": outcome(lambda: libc.unshare(0x10000000)),
    "personality": outcome(lambda: libc.personality(0x0008)),
    "realtime": outcome(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))),
    "setuid_bit": outcome(lambda: os.chmod(sys.argv[1], 0o4755)),
    "plain_chmod": outcome(lambda: os.chmod(sys.argv[1], 0o600)),
    "inet_socket": outcome(lambda: socket.socket().close()),
    "thread": outcome(lambda: threading.Thread(target=int).start()),
    "umask": oct(os.umask(0)),
}
print(results)
"""


def confined(unit: Path) -> list[str]:
    return [sys.executable, "-m", "tests.support.confine", str(unit), "--"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_the_units_filters_refuse_what_the_unit_forbids(unit, tmp_path):
    tool("systemd-analyze", "systemd")
    (tmp_path / "file").write_text("")
    result = subprocess.run([*confined(unit), sys.executable, "-c", PROBE, str(tmp_path / "file")],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == {  # noqa: S307 - our own probe's dict literal
        "mmap_write_exec": "EPERM", "setuid": "EPERM", "chroot": "EPERM",
        "packet_socket": "EAFNOSUPPORT", "user_namespace": "EPERM", "personality": "EPERM",
        "realtime": "EPERM", "setuid_bit": "EPERM", "plain_chmod": "allowed",
        "inet_socket": "allowed", "thread": "allowed",
        "umask": "0o77"}


def assert_confined(pid: int) -> None:
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    assert status["Seccomp"].strip() == "2"          # filter mode
    assert int(status["Seccomp_filters"]) >= 2
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0


async def test_sync_server_serves_under_its_units_sandbox(daemon_dir):
    tool("systemd-analyze", "systemd")
    peers = make_peers(daemon_dir)
    sync = Sync(daemon_dir, peers, sync_config(peers, metrics_listen=f"{HOST}:0",
                                             log_format="json"))
    sync.daemon.wrapper = confined(CONTRIB / "systemd" / "revault-sync-server.service")
    try:
        await sync.daemon.start()
        assert_confined(sync.daemon.proc.pid)
        async with await sync.client(peers.stakeholder) as rpc:
            await rpc.call("sig", {"id": h("a"), "pubkey": pubkey(1), "signature": der(1)})
            assert await rpc.call("get_sigs", {"id": h("a")}) == {
                "signatures": {pubkey(1): der(1)}}
        s = await scrape(sync.daemon.metrics_port)
        assert s.value("revault_requests_total", method="sig", outcome="ok") == 1
        assert await sync.daemon.stop() == 0
        lines = sync.daemon.stderr().splitlines()
        assert lines[0].startswith("confine: ") and "MemoryDenyWriteExecute" in lines[0]
        # The test harness's NOTIFY_SOCKET is gone after READY: STOPPING=1 warns.
        assert all(json.loads(line)["level"] in ("DEBUG", "INFO", "WARNING")
                   for line in lines[1:])
    finally:
        sync.daemon.ensure_dead()


async def test_cosigner_signs_under_its_units_sandbox(daemon_dir):
    tool("systemd-analyze", "systemd")
    cosigner = setup_cosigner(daemon_dir, metrics_listen="127.0.0.1:0")
    cosigner.daemon.wrapper = confined(CONTRIB / "systemd" / "revault-cosigner.service")
    try:
        await cosigner.daemon.start()
        assert_confined(cosigner.daemon.proc.pid)
        async with await cosigner.client(0) as rpc:
            await sign(rpc, make_spend(cosigner.bitcoin_pub).psbt())
        s = await scrape(cosigner.daemon.metrics_port)
        assert s.value("revault_cosigner_signatures_total") == 1
        assert await cosigner.daemon.stop() == 0
        assert "Traceback" not in cosigner.daemon.stderr()
    finally:
        cosigner.daemon.ensure_dead()
