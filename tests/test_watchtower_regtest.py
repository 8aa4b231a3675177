"""The watchtower guarding vaults on regtest: cancels, accepted spends, reorgs, crashes.

Real bitcoind (one per chain-watching mode: ZMQ, and polling), real sync server and
watchtower processes; the test plays the stakeholders, the managers and the wallet.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from revault.deployment import p2wpkh, script_pubkey_to_address
from revault.transactions import Tx
from revault.watchtower_guard import RETIRE_DEPTH
from tests.support.daemons import REPO_ROOT
from tests.support.regtest import sats
from tests.support.keys import pub, secret
from tests.support.watchtower import Deployed, Network, fill_mempool, wait_for, zmq_conf

MODES = ("zmq", "zmq-sequence", "poll")


@pytest.fixture(scope="module", params=MODES)
def chain(request, regtest_node):
    """(node, ZMQ keys for the watchtower or None): one node per mode, own chain."""
    if request.param == "zmq":
        conf, keys = zmq_conf()
    elif request.param == "zmq-sequence":
        conf, keys = zmq_conf(("sequence",))
    else:
        conf, keys = (), None
    with regtest_node(f"bitcoind-watchtower-{request.param}", conf) as node:
        yield node, keys


@pytest.fixture(scope="module")
def poll_chain(regtest_node):
    """A node for tests that need only one mode (polling) and abuse the chain."""
    with regtest_node("bitcoind-watchtower-abuse") as node:
        yield node


async def network(tmp_path, node, zmq=None, **kwargs) -> Network:
    return await Network(tmp_path, node, Deployed.create(tmp_path.name), zmq=zmq,
                         **kwargs).start()


async def confirmations(net: Network, txid: str) -> int:
    tx = await net.node.rpc("getrawtransaction", txid, True)
    return tx.get("confirmations", 0)


def payee(label: str) -> bytes:
    return p2wpkh(pub(secret(label)))


async def test_unvault_without_spend_request_is_cancelled_back_to_a_deposit(daemon_dir, chain):
    node, zmq = chain
    net = await network(daemon_dir, node, zmq)
    try:
        vault = await net.deposit()
        await net.secure(vault)
        unvault_txid = await net.unvault(vault)
        cancel = await net.wait_cancel_in_mempool(vault)
        node.mine(1)
        assert await confirmations(net, unvault_txid) == 1
        assert await confirmations(net, cancel["txid"]) == 1
        # The cancel's output is a deposit of the vault's own index again.
        assert cancel["vout"][0]["scriptPubKey"]["hex"] == \
            net.d.deposit_script_pubkey(0).hex()
        await wait_for(lambda: f"cancel {cancel['txid']} broadcast at" in net.log(),
                       "the watchtower's log line")
        assert f"unvault {unvault_txid} with no accepted spend" in net.log()
        if zmq:
            assert f"ZMQ: subscribed to {', '.join(t[4:] for t in zmq)}" in net.log()
    finally:
        net.stop()


async def test_accepted_spend_left_alone_and_confirms_after_the_csv(daemon_dir, chain):
    node, zmq = chain
    net = await network(daemon_dir, node, zmq, policy={"accept_all": True})
    try:
        vault = await net.deposit()
        await net.secure(vault)
        spend = net.deployed.spend(vault, payee("payee"))
        # Asked under another vault's id first: refused there, and not remembered.
        other_id = "ab" * 32
        await net.request_spend(vault, spend, vault_id=other_id)
        [wrong] = await wait_for(lambda: net.opinions(vault, other_id), "an opinion there")
        assert wrong["accepted"] is False and "not the id of a vault" in wrong["reason"]
        await net.request_spend(vault, spend)
        [opinion] = await wait_for(lambda: net.opinions(vault), "the watchtower's opinion")
        assert opinion["accepted"] is True and opinion["txid"] == spend.txid
        unvault_txid = await net.unvault(vault)
        node.mine(net.d.unvault_csv)
        assert await net.mempool_spender(vault.unvault_coin.outpoint) is None
        assert await node.rpc("sendrawtransaction", spend.to_hex()) == spend.txid
        node.mine(1)
        assert await confirmations(net, spend.txid) == 1
        assert await confirmations(net, unvault_txid) == net.d.unvault_csv + 1
        assert "broadcast at" not in net.log()
        assert f"spend {spend.txid} of vault(s) {vault.deposit.outpoint} ACCEPTED" in net.log()
    finally:
        net.stop()


async def test_spend_refused_by_the_default_policy_is_cancelled(daemon_dir, chain):
    node, zmq = chain
    net = await network(daemon_dir, node, zmq)
    try:
        vault = await net.deposit()
        await net.secure(vault)
        spend = net.deployed.spend(vault, payee("payee"))
        await net.request_spend(vault, spend)
        [opinion] = await wait_for(lambda: net.opinions(vault), "the watchtower's opinion")
        assert opinion["accepted"] is False and "no spend policy" in opinion["reason"]
        await net.unvault(vault)
        await net.wait_cancel_in_mempool(vault)
    finally:
        net.stop()


async def test_accepted_spend_replaced_by_another_spend_is_cancelled(daemon_dir, poll_chain):
    node = poll_chain
    net = await network(daemon_dir, node, policy={"accept_all": True})
    try:
        vault = await net.deposit()
        await net.secure(vault)
        spend = net.deployed.spend(vault, payee("payee"))
        await net.request_spend(vault, spend)
        await wait_for(lambda: net.opinions(vault), "the watchtower's opinion")
        await net.unvault(vault)
        node.mine(net.d.unvault_csv)
        assert await node.rpc("sendrawtransaction", spend.to_hex()) == spend.txid
        # A compromised manager set replaces it with another spend, paying more fee.
        thief = net.deployed.spend(vault, payee("thief"), feerate_sat_per_kwu=3000)
        assert await node.rpc("sendrawtransaction", thief.to_hex()) == thief.txid
        cancel = await net.wait_cancel_in_mempool(vault)
        # (bitcoind has it before the watchtower's log line is written)
        await wait_for(lambda: f"unvault output spent by unapproved transaction {thief.txid}"
                       in net.log(), "the watchtower's log line")
        node.mine(1)
        assert await confirmations(net, cancel["txid"]) == 1
    finally:
        net.stop()


async def test_reorg_of_the_unvault_and_cancel(daemon_dir, poll_chain):
    node = poll_chain
    net = await network(daemon_dir, node)

    def processed(block: str, times: int = 1):
        return lambda: net.log().count(f" {block}: ") >= times

    try:
        vault = await net.deposit()
        await net.secure(vault)
        unvault_txid = await net.unvault(vault)
        cancel = await net.wait_cancel_in_mempool(vault)
        [block] = node.mine(1)
        height = await node.rpc("getblockcount")
        await wait_for(processed(block), "the watchtower reading the block")
        # Both leave the chain and return to the mempool: the watchtower sees the reorg
        # and the cancel it broadcast still spends the unvault output.
        node.cli("invalidateblock", block)
        await wait_for(lambda: f"reorg: blocks {height}..{height} left the chain" in net.log(),
                       "the watchtower seeing the reorg")
        assert await net.mempool_spender(vault.unvault_coin.outpoint) == cancel["txid"]
        node.cli("reconsiderblock", block)
        await wait_for(processed(block, 2), "the watchtower reading the block again")
        assert await confirmations(net, cancel["txid"]) == 1
        # The block leaves for good; a longer branch mines them again from the mempool.
        node.cli("invalidateblock", block)
        # (to another address: the same block again would be the invalid one)
        branch = node.mine(2, node.cli("getnewaddress", wallet=node.MINER_WALLET))
        await wait_for(processed(branch[-1]), "the watchtower reading the new branch")
        assert await confirmations(net, unvault_txid) == 2
        assert await confirmations(net, cancel["txid"]) == 2
        # One cancel only, never a second one for the same unvault.
        assert net.log().count("broadcast at") == 1
        assert net.tower.proc.poll() is None
        assert "Traceback" not in net.log()
    finally:
        net.stop()


async def test_killed_between_unvault_and_csv_still_cancels_after_restart(daemon_dir, poll_chain):
    node = poll_chain
    net = await network(daemon_dir, node)
    try:
        vault = await net.deposit()
        await net.secure(vault)
        await net.tower.kill()
        unvault_txid = await net.unvault(vault)
        node.mine(2)  # mined while nobody watched; the csv (6) has not passed
        await net.tower.start()
        cancel = await net.wait_cancel_in_mempool(vault)
        node.mine(1)
        assert await confirmations(net, cancel["txid"]) == 1
        assert await confirmations(net, unvault_txid) == 3
        # Buried under 100 blocks, the cancelled vault retires (its new deposit is a new
        # vault), and stays retired across a restart.
        node.mine(RETIRE_DEPTH - 1)
        await wait_for(lambda: f"vault {vault.deposit.outpoint} retired: unvault output spent "
                               f"by cancel {cancel['txid']}" in net.log(), "the vault retiring")
        await net.tower.restart()
        await wait_for(lambda: "0 guarded vaults loaded" in net.log(), "the restart")
    finally:
        net.stop()


async def test_bitcoind_restarted_under_it(daemon_dir, poll_chain):
    node = poll_chain
    net = await network(daemon_dir, node)
    try:
        vault = await net.deposit()
        await net.secure(vault)
        wallets = node.cli("listwallets")
        node.stop()
        await wait_for(lambda: "BITCOIND UNUSABLE, NO VAULT IS PROTECTED" in net.log(),
                       "the watchtower noticing bitcoind is gone")
        node.start_again(wallets)
        await wait_for(lambda: "bitcoind is back" in net.log(), "the watchtower reconnecting")
        await net.unvault(vault)
        await net.wait_cancel_in_mempool(vault)
        assert net.tower.proc.poll() is None
    finally:
        net.stop()


def run_command(net: Network, command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "revault.watchtower", "--config",
                           str(net.tmp / "tower.toml"), command],
                          capture_output=True, text=True, timeout=60, env=env)


async def test_reserve_and_emergency_commands(daemon_dir, poll_chain):
    node = poll_chain
    # Small coins: a bump adds whole coins and has no change output.
    net = await network(daemon_dir, node, max_feerate=20, reserve_coins=(20_000,) * 8)
    try:
        vaults = [await net.deposit() for _ in range(2)]
        for vault in vaults:
            await net.secure(vault)
        report = run_command(net, "reserve")
        assert report.returncode == 0, report.stderr
        out = report.stdout
        assert "fund the fee reserve" in out and "bcrt1q" in out
        assert "confirmed coins: 8, 160000 sat" in out
        for vault in vaults:
            assert f"vault {vault.deposit.outpoint}: cancel can reach 20.0 sat/vB" in out
        assert "vaults that can be cancelled at once at max_feerate: 2 of 2" in out

        # One vault is unvaulting when the emergency is declared.
        await net.unvault(vaults[1])
        await net.wait_cancel_in_mempool(vaults[1])
        await net.tower.stop()
        done = run_command(net, "emergency")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = dict((line.split()[0], line.split()[1:]) for line in done.stdout.splitlines())
        assert lines[str(vaults[0].deposit.outpoint)][0] == "emergency"
        assert lines[str(vaults[1].deposit.outpoint)][0] == "unvault_emergency"
        for vault in vaults:
            txid = lines[str(vault.deposit.outpoint)][1]
            tx = await node.rpc("getrawtransaction", txid, True)
            assert tx["vout"][0]["scriptPubKey"]["address"] == \
                net.deployed.table["emergency_address"]
        node.mine(1)
        for vault in vaults:
            assert await confirmations(net, lines[str(vault.deposit.outpoint)][1]) == 1
    finally:
        net.stop()


PLUGIN = """
def small(vaults, spend, deployment):
    total = sum(o.value for o in spend.outputs)
    return total < 1_500_000, f"{total} sat is not small"
"""


def install_plugin(tmp_path) -> dict[str, str]:
    """A policy plugin installed the way pip would: a module and its dist-info with an
    entry point of group revault.policies; the PYTHONPATH that makes it importable."""
    root = tmp_path / "plugins"
    info = root / "revault_test_policies-1.0.dist-info"
    info.mkdir(parents=True)
    (root / "revault_test_policies.py").write_text(PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: revault-test-policies\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text("[revault.policies]\n"
                                           "small = revault_test_policies:small\n")
    return {"PYTHONPATH": os.pathsep.join([str(root), str(REPO_ROOT)])}


@pytest.mark.parametrize("policy", ["max_value", "max_value_per_day", "allowed_addresses",
                                    "plugins"])
async def test_each_built_in_policy(daemon_dir, poll_chain, policy):
    """Two spends each: the first within the rule (accepted), the second beyond it."""
    node = poll_chain
    allowed = script_pubkey_to_address(payee("allowed"), "regtest")
    config, env = {
        "max_value": ({"max_value": 1_500_000}, None),
        "max_value_per_day": ({"max_value_per_day": 1_500_000}, None),
        "allowed_addresses": ({"allowed_addresses": [allowed]}, None),
        "plugins": ({"plugins": ["small"]}, install_plugin(daemon_dir)),
    }[policy]
    net = await network(daemon_dir, node, policy=config, env=env)
    try:
        small, large = await net.deposit(1_000_000), await net.deposit(2_000_000)
        first, second = (small, large) if policy != "max_value_per_day" else (small, small)
        if policy == "max_value_per_day":
            second = await net.deposit(1_000_000)
        spends = []
        for vault, to in ((first, "allowed"), (second, "other")):
            await net.secure(vault)
            spend = net.deployed.spend(vault, payee(to))
            await net.request_spend(vault, spend)
            [opinion] = await wait_for(lambda: net.opinions(vault), f"opinion on {to}")
            assert opinion["txid"] == spend.txid
            spends.append(opinion)
        assert spends[0]["accepted"] is True, spends[0]
        assert spends[1]["accepted"] is False, spends[1]
        assert {
            "max_value": "above max_value 1500000",
            "max_value_per_day": "above max_value_per_day 1500000",
            "allowed_addresses": "not allowed",
            "plugins": "policy plugin small refused",
        }[policy] in spends[1]["reason"]
        # A restart never changes a verdict: the accepted spend stays accepted even
        # under a policy that now refuses everything.
        await net.tower.stop()
        net.policy = None
        net.write_tower_config()
        await net.start_tower()
        await net.unvault(first)
        node.mine(net.d.unvault_csv)
        await net.unvault(second)
        await net.wait_cancel_in_mempool(second)
        assert await net.mempool_spender(first.unvault_coin.outpoint) is None
    finally:
        net.stop()


@pytest.fixture
def small_mempool_chain(regtest_node):
    """A node whose mempool holds 5 MB: filling it raises its minimum feerate."""
    with regtest_node("bitcoind-watchtower-spike", ("maxmempool=5",)) as node:
        node.mine(150)  # mature coinbases to fill the mempool with, twice
        yield node


async def cancel_feerate(net: Network, txid: str) -> float:
    entry = await net.node.rpc("getmempoolentry", txid)
    return sats(entry["fees"]["base"]) / entry["vsize"]


async def test_cancel_bumped_then_outbid_again_when_the_mempool_feerate_rises(
        daemon_dir, small_mempool_chain):
    node = small_mempool_chain
    net = await network(daemon_dir, node, max_feerate=80, reserve_coins=(10_000,) * 30)
    try:
        vault = await net.deposit()
        await net.secure(vault)
        # The unvault gets mined while the watchtower is down (no cancel yet).
        await net.tower.kill()
        unvault_txid = await net.unvault(vault)
        node.mine(1)
        # A fee spike: the mempool takes nothing under ~10 sat/vB any more.
        await fill_mempool(node, 10, until_sat_vb=5)
        await net.tower.start()
        first = await net.wait_cancel_in_mempool(vault)
        first_rate = await cancel_feerate(net, first["txid"])
        assert first_rate >= 5, first_rate
        assert len(first["vin"]) > 1  # reserve coins were added
        # The spike rises above the first cancel, which the mempool evicts: the
        # watchtower cancels again, outbidding the new minimum.
        await fill_mempool(node, 50, until_sat_vb=35)

        async def higher():
            tx = await net.wait_cancel_in_mempool(vault)
            if tx["txid"] != first["txid"] and await cancel_feerate(net, tx["txid"]) >= 35:
                return tx
            return None

        await wait_for(higher, "a cancel outbidding the spike")
        await wait_for(lambda: net.log().count(" broadcast at ") >= 2, "the second log line")
        # The evicted first cancel's reserve coin is usable again (abandoned in the wallet).
        [freed] = [line for line in net.log().splitlines()
                   if f"{first['txid']} left the mempool unmined" in line]
        assert all(f"{i['txid']}:{i['vout']}" in freed for i in first["vin"][1:])
        # A cancel confirms (blocks take the spike's transactions first, so a few blocks).
        for _ in range(8):
            node.mine(1, node.cli("getnewaddress", wallet=node.MINER_WALLET))
            if await node.rpc("gettxout", unvault_txid, 0, True) is None \
                    and await net.mempool_spender(vault.unvault_coin.outpoint) is None:
                break
        else:
            raise AssertionError("no cancel confirmed after 8 blocks")
        assert await confirmations(net, unvault_txid) >= 2
    finally:
        net.stop()


async def test_bitcoind_and_sync_server_down_at_start_then_back(daemon_dir, poll_chain):
    node = poll_chain
    net = await network(daemon_dir, node, policy={"accept_all": True})
    try:
        await net.tower.stop()
        await net.sync.stop()
        wallets = node.cli("listwallets")
        node.stop()
        # Neither is there: the watchtower starts anyway, serves, and says so loudly.
        await net.tower.start()
        await wait_for(lambda: "BITCOIND UNUSABLE, NO VAULT IS PROTECTED" in net.log()
                       and f"sync server 127.0.0.1:{net.sync_port}" in net.log(),
                       "the watchtower reporting both down")
        node.start_again(wallets)
        await net.sync.start()
        await wait_for(lambda: "bitcoind is back" in net.log(), "bitcoind found again")
        vault = await net.deposit()
        await net.secure(vault)
        spend = net.deployed.spend(vault, payee("payee"))
        await net.request_spend(vault, spend)
        [opinion] = await wait_for(lambda: net.opinions(vault), "an opinion, once reconnected")
        assert opinion["accepted"] is True
        assert net.tower.proc.poll() is None and "Traceback" not in net.log()
    finally:
        net.stop()


async def test_xpub_deployment_vaults_found_at_their_derivation_index(daemon_dir, poll_chain):
    """With xpubs, a sig's deposit is found at its index among the next 200 after the
    highest index guarded so far; further ones only once the gap is filled."""
    node = poll_chain
    net = await Network(daemon_dir, node, Deployed.create(daemon_dir.name, xpubs=True)).start()
    try:
        far = await net.deposit(index=260)
        refusal = await net.send_sig(net.sig_params(far, far.txs.cancel))
        assert refusal["ack"] is False and "pays no deposit script" in refusal["reason"]
        near = await net.deposit(index=150)
        await net.secure(near)
        await net.secure(far)  # 260 is now within 150 + 200
        await net.unvault(far)
        cancel = await net.wait_cancel_in_mempool(far)
        assert cancel["vout"][0]["scriptPubKey"]["hex"] == net.d.deposit_script_pubkey(260).hex()
        assert f"vault {far.deposit.outpoint} (index 260," in net.log()
    finally:
        net.stop()


@pytest.fixture
def fresh_chain(regtest_node):
    """A node whose fee estimator has seen nothing yet, mining nothing under 5 sat/vB."""
    with regtest_node("bitcoind-watchtower-estimates", ("blockmintxfee=0.00005",)) as node:
        yield node


async def test_cancel_rebumped_at_each_block_as_estimatesmartfee_rises(daemon_dir, fresh_chain):
    node = fresh_chain
    net = await network(daemon_dir, node, max_feerate=100, reserve_coins=(10_000,) * 30)
    try:
        vault = await net.deposit()
        await net.secure(vault)
        await net.unvault(vault)
        # No estimate yet: the cancel goes out at its own pre-signed feerate.
        first = await net.wait_cancel_in_mempool(vault)
        assert len(first["vin"]) == 1
        # Miners take nothing under 5 sat/vB here, so it stays unconfirmed (with its
        # unvault) while blocks of 50 sat/vB transactions teach the node's estimator a
        # higher feerate: at one of the next blocks the watchtower re-bumps it.
        payee_address = await node.rpc("getnewaddress", wallet=node.MINER_WALLET)
        for _ in range(12):
            for _ in range(4):
                await node.rpc("sendtoaddress", payee_address, 0.01, "", "", False, True,
                               None, "unset", None, 50, wallet=node.MINER_WALLET)
            [block] = node.mine(1)
            await wait_for(lambda: f" {block}: " in net.log(), "the watchtower reading the block")
            if "because re-bump: 1.0 sat/vB is below the" in net.log():
                break
        else:
            raise AssertionError("no re-bump after 12 blocks")
        line = next(line for line in net.log().splitlines() if "because re-bump:" in line)
        bumped_txid = re.search(r"cancel ([0-9a-f]{64}) broadcast", line).group(1)
        assert bumped_txid != first["txid"]
        bumped = await node.rpc("getrawtransaction", bumped_txid, True)
        assert len(bumped["vin"]) > 1  # reserve coins
        # Minable now (it may already be in the block that ended the loop).
        if not await confirmations(net, bumped_txid):
            node.mine(1)
        assert await confirmations(net, bumped_txid) >= 1
        assert float(re.search(r"broadcast at ([0-9.]+) sat/vB", line).group(1)) >= 5
    finally:
        net.stop()


async def test_batch_spend_of_two_vaults_accepted_once_for_both(daemon_dir, poll_chain):
    node = poll_chain
    net = await network(daemon_dir, node, policy={"max_value": 1_950_000})
    try:
        vaults = [await net.deposit() for _ in range(2)]
        for vault in vaults:
            await net.secure(vault)
        spend = net.deployed.spend(vaults, payee("payee"))
        await net.request_spend(vaults[0], spend)  # one request, under one of its vaults
        [opinion] = await wait_for(lambda: net.opinions(vaults[0]), "the opinion")
        assert opinion["accepted"] is True, opinion
        for vault in vaults:
            await net.unvault(vault)
        node.mine(net.d.unvault_csv)
        for vault in vaults:
            assert await net.mempool_spender(vault.unvault_coin.outpoint) is None
        assert await node.rpc("sendrawtransaction", spend.to_hex()) == spend.txid
        node.mine(1)
        assert await confirmations(net, spend.txid) == 1
        assert " broadcast at " not in net.log()
        # One verdict, for both vaults (inputs in the order build_spend was given them).
        assert (f"of vault(s) {vaults[0].deposit.outpoint}, {vaults[1].deposit.outpoint} "
                "ACCEPTED") in net.log()
    finally:
        net.stop()


async def test_a_spend_request_spending_an_output_twice_is_refused_and_the_next_judged(
        daemon_dir, poll_chain):
    """Relayed by the (untrusted) sync server from a manager: a transaction spending a
    guarded unvault output twice. Its verdict's vault rows once collided in the store,
    which ended the spend-request loop, and every restart's (the cursor never passed
    it): no spend was ever judged again."""
    node = poll_chain
    net = await network(daemon_dir, node, policy={"accept_all": True})
    try:
        vault = await net.deposit()
        await net.secure(vault)
        good = net.deployed.spend(vault, payee("payee"))
        twice = Tx(good.version, good.inputs + good.inputs[:1], good.outputs, good.locktime)
        await net.request_spend(vault, twice)
        await net.request_spend(vault, good)
        opinions = await wait_for(
            lambda: _opinions_by_txid(net, vault, 2), "both opinions")
        assert opinions[twice.txid]["accepted"] is False
        assert "same output twice" in opinions[twice.txid]["reason"]
        assert opinions[good.txid]["accepted"] is True
        assert net.tower.proc.poll() is None and "Traceback" not in net.log()
    finally:
        net.stop()


async def _opinions_by_txid(net: Network, vault, count: int) -> dict | None:
    opinions = {o["txid"]: o for o in await net.opinions(vault)}
    return opinions if len(opinions) >= count else None
