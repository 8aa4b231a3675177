from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests.support` must import the same way however pytest was invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.postgres import PostgresServer  # noqa: E402
from tests.support.regtest import RegtestNode, start_node  # noqa: E402


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (started on first use, always
    stopped); each test takes its own database with `postgres.new_database()`."""
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()
