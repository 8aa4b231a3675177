"""What the running test may start, set by tests/conftest.py from the test's markers.

A test that starts a daemon or a Bitcoin Core node without the fixture that marks it
(`daemon_dir`, `daemon_module_dir`; `bitcoind`, `bitcoind_module`, `regtest_node`)
would run under `-m "not daemon"` or `-m "not regtest"`: `DaemonProcess.start` and
`RegtestNode.start` call `check` so that such a test fails, saying which fixture to use.
Outside pytest (the benchmarks) nothing is refused.
"""

from __future__ import annotations

# marker -> why the current test may not start what that marker stands for
refusals: dict[str, str] = {}


def check(marker: str) -> None:
    reason = refusals.get(marker)
    if reason is not None:
        raise AssertionError(reason)
