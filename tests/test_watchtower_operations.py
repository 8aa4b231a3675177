"""The watchtower as an operator sees it: its metrics scraped over HTTP and its `status`,
through a whole vault life on regtest (secured, a refused spend, unvault, cancel, mined).

Real bitcoind, sync server and watchtower processes (tests/support/watchtower.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from revault.deployment import p2wpkh
from tests.support.daemons import REPO_ROOT
from tests.support.scrape import scrape_until
from tests.support.watchtower import Deployed, Network, pub, secret, wait_for
from tests.test_contrib import assert_confined, confined


@pytest.fixture
def node(bitcoind_module):
    return bitcoind_module  # a chain of this module's own


def height(node) -> int:
    return int(node.cli("getblockcount"))


def status(net: Network) -> dict:
    result = subprocess.run([sys.executable, "-m", "revault.watchtower", "--config",
                             str(net.tmp / "tower.toml"), "status", "--json"],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_metrics_and_status_follow_a_vault_from_secured_to_cancelled(daemon_dir, node):
    net = await Network(daemon_dir, node, Deployed.create(daemon_dir.name),
                        tower_extra={"metrics_listen": "127.0.0.1:0"}).start()
    try:
        port = net.tower.metrics_port
        vault = await net.deposit()
        await net.secure(vault)
        node.mine(1)  # the reserve is evaluated at each block
        s = await scrape_until(port, lambda s: (
            s.value("revault_watchtower_reserve_cancellable_vaults") == 1
            and s.value("revault_watchtower_processed_height") == height(node)))
        assert s.value("revault_watchtower_vaults", state="active") == 1
        assert s.value("revault_watchtower_reserve_coins") == 3
        assert s.value("revault_watchtower_reserve_value_satoshis") == 600_000
        assert s.value("revault_watchtower_bitcoind_up") == 1
        assert s.value("revault_watchtower_bitcoind_height") == height(node)
        assert time.time() - 30 < s.value(
            "revault_watchtower_sync_poll_last_success_timestamp_seconds") <= time.time()
        assert s.value("revault_watchtower_oldest_pending_cancel_blocks") == 0
        assert s.value("revault_requests_total", method="sig", outcome="ok") == 3

        spend = net.deployed.spend(vault, p2wpkh(pub(secret("payee"))))
        await net.request_spend(vault, spend)
        await wait_for(lambda: net.opinions(vault), "the watchtower's opinion")
        await scrape_until(port, lambda s: s.value("revault_watchtower_opinions_total",
                                                   verdict="refuse") == 1)
        await net.unvault(vault)
        cancel = await net.wait_cancel_in_mempool(vault)
        s = await scrape_until(port, lambda s: (
            s.value("revault_watchtower_vaults", state="cancelling") == 1))
        assert s.value("revault_watchtower_cancels_broadcast_total") >= 1
        assert s.value("revault_watchtower_oldest_pending_cancel_blocks") >= 1
        assert s.value("revault_watchtower_cancels_confirmed_total") == 0

        node.mine(1)
        s = await scrape_until(port, lambda s: (
            s.value("revault_watchtower_cancels_confirmed_total") == 1))
        assert s.value("revault_watchtower_vaults", state="cancelled") == 1
        assert s.value("revault_watchtower_oldest_pending_cancel_blocks") == 0
        assert s.value("revault_daemon_info", daemon="watchtower", version="0.1.0") == 1
        secrets = [net.opinion_key.hex(), net.tower_noise.private.hex(),
                   net.wallet_noise.private.hex(), net.tower_noise.public.hex(),
                   vault.deposit.outpoint.txid, cancel["txid"], spend.txid, net.node.rpc_password]
        assert not [x for x in secrets if x.lower() in s.text.lower()]

        report = status(net)
        summary = report["watchtower"]
        assert report["accepting_connections"] is None  # listen = "127.0.0.1:0"
        assert summary["vaults"] == {"guarded": 1, "retired": 0}
        assert summary["revocations_of_guarded_vaults"] == {
            "cancel": 1, "emergency": 1, "unvault_emergency": 1}
        assert summary["verdicts"]["accepted"] == 0 and summary["verdicts"]["refused"] == 1
        assert summary["bitcoind"]["reachable"] is True
        assert summary["bitcoind"]["height"] == height(node)
        assert 0 <= summary["bitcoind"]["blocks_behind"] <= 1
        assert await net.tower.stop() == 0
    finally:
        net.stop()


async def test_status_says_when_bitcoind_is_unreachable(daemon_dir, node):
    net = await Network(daemon_dir, node, Deployed.create(daemon_dir.name)).start()
    try:
        assert await net.tower.stop() == 0
        config = (daemon_dir / "tower.toml").read_text()
        (daemon_dir / "tower.toml").write_text(
            config.replace(f"http://127.0.0.1:{node.rpc_port}", "http://127.0.0.1:9"))
        summary = status(net)["watchtower"]
        assert summary["bitcoind"]["reachable"] is False and summary["bitcoind"]["error"]
        assert node.rpc_password not in json.dumps(summary)
    finally:
        net.stop()


async def test_watchtower_guards_under_its_units_sandbox(daemon_dir, node):
    net = Network(daemon_dir, node, Deployed.create(daemon_dir.name),
                  tower_extra={"metrics_listen": "127.0.0.1:0"})
    net.tower.wrapper = confined(REPO_ROOT / "contrib" / "systemd" / "revault-watchtower.service")
    await net.start()
    try:
        assert_confined(net.tower.proc.pid)
        vault = await net.deposit()
        await net.secure(vault)  # three revocations verified, stored, acked
        await net.unvault(vault)
        await net.wait_cancel_in_mempool(vault)
        s = await scrape_until(net.tower.metrics_port, lambda s: (
            s.value("revault_watchtower_cancels_broadcast_total") >= 1))
        assert s.value("revault_watchtower_bitcoind_up") == 1
        assert await net.tower.stop() == 0
        assert "Traceback" not in net.log()
    finally:
        net.stop()
