from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# `tests.support` must import the same way however pytest was invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import markers  # noqa: E402
from tests.support.cosigner_daemon import setup_cosigner  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402
from tests.support.regtest import RegtestError, RegtestNode, bitcoind_bin_dir, start_node  # noqa: E402

# A test carries a marker when one of these fixtures is in its fixture closure
# (`item.fixturenames`: what it asks for and, transitively, what those fixtures ask for),
# so a fixture built on the node or on a daemon directory marks every test using it.
# Registered in pyproject.toml; `-m "not regtest"` runs without Bitcoin Core.
MARKER_FIXTURES = {
    "regtest": {"bitcoind", "bitcoind_module", "regtest_node"},
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


@pytest.hookimpl(tryfirst=True)  # before any fixture of the test is set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test without a marker may not start what the marker stands for (see
    tests/support/markers.py), even from a module- or session-scoped fixture it sets up."""
    markers.refusals.clear()
    for marker, fixtures in MARKER_FIXTURES.items():
        if item.get_closest_marker(marker) is None:
            markers.refusals[marker] = (
                f"{item.nodeid} starts what the {marker!r} marker stands for: take it from "
                f"the {' or '.join(sorted(fixtures))} fixture, so that -m selects it")


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
def regtest_node(tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[..., contextlib.AbstractContextManager[RegtestNode]]:
    """A node of the caller's own, on its own chain, stopped when the block ends:
    `with regtest_node("name", extra_conf=("maxmempool=5",)) as node: ...`."""
    @contextlib.contextmanager
    def node(name: str, extra_conf: Sequence[str] = ()) -> Iterator[RegtestNode]:
        started = start_node(tmp_path_factory.mktemp(name), extra_conf)
        try:
            yield started
        finally:
            started.stop()
    return node


@pytest.fixture(scope="session")
def bitcoind(regtest_node) -> Iterator[RegtestNode]:
    """One regtest node for the whole session, with a mature funded `miner` wallet.

    Tests that need a wallet of their own create it (`node.new_wallet(name)`); tests
    that need a chain nobody else touches use `bitcoind_module` or `regtest_node`.
    """
    with regtest_node("bitcoind") as node:
        yield node


@pytest.fixture(scope="module")
def bitcoind_module(regtest_node) -> Iterator[RegtestNode]:
    """A fresh regtest node (own chain) for one test module."""
    with regtest_node("bitcoind-module") as node:
        yield node


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (started on first use, always
    stopped); each test takes its own database with `postgres.new_database()`."""
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()
