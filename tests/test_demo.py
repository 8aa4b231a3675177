"""The main job (scripts/run -> scripts/demo.py) runs the whole system and cleans up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_walks_vaults_through_their_life_and_cleans_up(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"),
                           "--dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for expected in (r"deposit \w{64}:\d: 5000000 sat, confirmed at height \d+",
                     r"its watchtower acked all three",
                     r"all 3 stakeholders shared their unvault signature",
                     r"manager0 sees: .*=active, .*=active",
                     r"watchtower \w+\.\.\. ACCEPTED spend",
                     r"spend \w{64} confirmed at height \d+",
                     r"the watchtowers cancel it: \w{64}",
                     r"vault \w{64}:\d: cancelled",
                     r"vault \w{64}:\d: spent",
                     r"stopped everything"):
        assert re.search(expected, out), f"{expected!r} not in:\n{out}"
    assert len(re.findall(r"ACCEPTED", out)) == 3
    # Nothing left running: every daemon wrote its last line and exited.
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True)
    assert leftover.stdout == b""
