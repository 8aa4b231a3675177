from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests.support` must import the same way however pytest was invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cosigner_daemon import setup_cosigner  # noqa: E402
from tests.support.daemons import DaemonProcess  # noqa: E402
from tests.support.regtest import RegtestError, RegtestNode, bitcoind_bin_dir, start_node  # noqa: E402

# A test carries a marker when one of these fixtures is in its fixture closure
# (`item.fixturenames`: what it asks for and, transitively, what those fixtures ask for),
# so a fixture built on the node or on a daemon directory marks every test using it.
# Registered in pyproject.toml; `-m "not regtest"` runs without Bitcoin Core.
MARKER_FIXTURES = {
    "regtest": {"bitcoind", "bitcoind_module"},
    "daemon": {"daemon_dir", "daemon_module_dir"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in MARKER_FIXTURES.items():
            if used & fixtures:
                item.add_marker(marker)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provide Bitcoin Core once, up front, and only when a selected test needs it.

    contrib/get-bitcoind.sh may build it (minutes): its progress goes to the terminal
    instead of being captured, and a failure stops the run before any test starts.
    """
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("regtest") for item in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            bin_dir = bitcoind_bin_dir(show_progress=True)
        except RegtestError as e:
            pytest.exit(f"Bitcoin Core is needed by the selected regtest tests: {e}",
                        returncode=pytest.ExitCode.TESTS_FAILED)
        version = subprocess.run([str(bin_dir / "bitcoind"), "-version"], capture_output=True,
                                 text=True, timeout=60).stdout.splitlines()
        print(f"\nbitcoind: {version[0] if version else '?'} ({bin_dir})", flush=True)


@pytest.fixture(autouse=True)
def _daemons_only_in_daemon_tests(request: pytest.FixtureRequest,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a daemon without `daemon_dir` would escape `-m "not daemon"`:
    make it fail, saying which fixture to use, instead of letting the marker lie."""
    if request.node.get_closest_marker("daemon") is None:
        async def refuse(self, *args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts the {self.name} daemon: run it "
                                 "in the daemon_dir (or daemon_module_dir) fixture")
        monkeypatch.setattr(DaemonProcess, "start", refuse)


@pytest.fixture
def daemon_dir(tmp_path: Path) -> Path:
    """The working directory of a test that runs revault daemons as subprocesses."""
    return tmp_path


@pytest.fixture(scope="module")
def daemon_module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of daemons shared by the tests of one module."""
    return tmp_path_factory.mktemp("daemons")


@pytest.fixture
async def cosigner(daemon_dir: Path):
    """A running `revault-cosigner` with two managers."""
    c = setup_cosigner(daemon_dir, n_managers=2)
    await c.daemon.start()
    try:
        yield c
    finally:
        c.daemon.ensure_dead()


@pytest.fixture(scope="session")
def bitcoind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegtestNode]:
    """One regtest node for the whole session, with a mature funded `miner` wallet.

    Tests that need a wallet of their own create it (`node.new_wallet(name)`); tests
    that need a chain nobody else touches use `bitcoind_module`.
    """
    node = start_node(tmp_path_factory.mktemp("bitcoind"))
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def bitcoind_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegtestNode]:
    """A fresh regtest node (own chain) for one test module."""
    node = start_node(tmp_path_factory.mktemp("bitcoind-module"))
    try:
        yield node
    finally:
        node.stop()
