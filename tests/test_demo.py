"""The main job (scripts/run -> scripts/demo.py) runs the whole system and cleans up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The demo starts its own Bitcoin Core and daemons (in its own process): select it with
# the tests that need them.
pytestmark = [pytest.mark.regtest, pytest.mark.daemon]


def test_demo_walks_vaults_through_their_life_and_cleans_up(daemon_dir):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"),
                           "--dir", str(daemon_dir / "demo")],
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for expected in (r"deposit \w{64}:\d: 5000000 sat, confirmed at height \d+",
                     r"its watchtower acked all three",
                     r"all 3 stakeholders shared their unvault signature",
                     r"manager0 sees: .*=active, .*=active",
                     r"watchtower \w+\.\.\. ACCEPTED spend",
                     r"spend \w{64} confirmed at height \d+: CPFP \d+ sat, payee 1500000 sat, change \d+ sat",
                     r"the watchtowers cancel it: \w{64}",
                     r"vault \w{64}:\d: cancelled",
                     r"vault \w{64}:\d: spent",
                     r"stopped everything"):
        assert re.search(expected, out), f"{expected!r} not in:\n{out}"
    assert len(re.findall(r"ACCEPTED", out)) == 3
    # Nothing left running: every daemon wrote its last line and exited.
    leftover = subprocess.run(["pgrep", "-f", str(daemon_dir / "demo")], capture_output=True)
    assert leftover.stdout == b""


def test_demo_keep_running_stays_up_until_sigterm(daemon_dir):
    import signal
    import time
    root = daemon_dir / "demo"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo.py"),
                             "--keep-running", "--dir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # bounded: the demo ends its walk, or fails, or we kill it
            lines.append(line)
            if "Everything lives in" in line or time.monotonic() > deadline:
                break
        text = "".join(lines)
        assert "Everything lives in" in text, text
        assert re.search(r"stakeholder0: \S+/stakeholder0/wallet\.toml", text)
        assert "examples/secure_deposits.py" in text
        # Still up: the sync server answers a Noise handshake-free TCP connect.
        port = int(re.search(r"sync server on 127\.0\.0\.1:(\d+)", text).group(1))
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest
        assert "stopped everything" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    leftover = subprocess.run(["pgrep", "-f", str(root)], capture_output=True)
    assert leftover.stdout == b""
