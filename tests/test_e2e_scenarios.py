"""End-to-end scenarios: a 3-stakeholder, 2-manager deployment, everything real.

Per scenario: the session's regtest bitcoind; one sync server; per stakeholder a
`revault-watchtower` with its own funded fee reserve; per manager a `revault-cosigner`;
all subprocesses started as a user starts them; one wallet per participant. Each
scenario ends by asserting the on-chain state through Bitcoin Core.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from revault.primitives import tx_uid
from revault.transactions import Coin, Deployment, OutPoint, build_vault_transactions
from revault.wallet import Wallet
from revault.wallet_flows import CosignerMisbehaved, FlowError, NotSecured, SpendRefused
from revault.wallet_store import WalletStore
from tests.support.regtest import RegtestNode, btc, sats
from tests.support.deployment_system import HOST, System, start_system

REPO = Path(__file__).resolve().parents[1]
DEPOSIT = 2_000_000
ACCEPT_ALL = {"accept_all": True}
TIMEOUT = 120.0


@pytest.fixture
async def make_system(daemon_dir, bitcoind: RegtestNode):
    systems: list[System] = []

    async def make(**options) -> System:
        options.setdefault("policies", [ACCEPT_ALL] * options.get("n_stakeholders", 3))
        s = await start_system(daemon_dir / f"system{len(systems)}", bitcoind, **options)
        systems.append(s)
        return s

    yield make
    for s in systems:
        s.stop_all()
        for daemon in s.daemons():
            assert "Traceback" not in daemon.stderr(), daemon.stderr()


# --- helpers --------------------------------------------------------------------------

async def deposit(node: RegtestNode, address: str, amount: int = DEPOSIT) -> str:
    txid = await node.rpc("sendtoaddress", address, btc(amount), wallet=node.MINER_WALLET)
    tx = await node.rpc("getrawtransaction", txid, True)
    [vout] = [o["n"] for o in tx["vout"] if o["scriptPubKey"].get("address") == address
              and sats(o["value"]) == amount]
    return f"{txid}:{vout}"


def chain_of(system: System, outpoint: str, value: int = DEPOSIT, index: int = 0):
    txid, vout = outpoint.split(":")
    d = Deployment.from_dict(system.deployment)
    return build_vault_transactions(d, Coin(OutPoint(txid, int(vout)), value, index))


async def poll(check, timeout: float = TIMEOUT, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"{what} not reached in {timeout}s"
        await asyncio.sleep(0.1)


async def in_mempool(node: RegtestNode, txid: str) -> bool:
    return txid in await node.rpc("getrawmempool")


async def spender(node: RegtestNode, outpoint: str, depth: int = 10) -> str | None:
    """The txid of the transaction spending `outpoint`: in the mempool, or in one of the
    last `depth` blocks."""
    txid, vout = outpoint.split(":")
    [entry] = await node.rpc("gettxspendingprevout", [{"txid": txid, "vout": int(vout)}])
    if "spendingtxid" in entry:
        return entry["spendingtxid"]
    height = await node.rpc("getblockcount")
    for h in range(height, max(height - depth, 0), -1):
        block = await node.rpc("getblock", await node.rpc("getblockhash", h), 2)
        for tx in block["tx"]:
            if any(i.get("txid") == txid and i.get("vout") == int(vout) for i in tx["vin"]):
                return tx["txid"]
    return None


async def cancelled_by_a_watchtower(system: System, node: RegtestNode, txs) -> str:
    """Wait for the cancel (as signed, or a watchtower's fee bump of it: more inputs,
    the same single output to the vault's deposit script), mine it; its txid."""
    unvault_output = f"{txs.unvault.txid}:0"

    async def seen() -> bool:
        return await spender(node, unvault_output) is not None
    try:
        await poll(seen, what="a watchtower's cancel")
    except AssertionError:
        logs = "\n".join(t.stderr()[-3000:] for t in system.watchtowers)
        raise AssertionError(f"no cancel of {txs.unvault.txid}; watchtower logs:\n{logs}")
    txid = await spender(node, unvault_output)
    tx = await node.rpc("getrawtransaction", txid, True)
    deposit_address = Deployment.from_dict(system.deployment).deposit_address(0)
    assert [o["scriptPubKey"].get("address") for o in tx["vout"]] == [deposit_address]
    assert tx["vout"][0]["value"] == btc(txs.cancel.tx.outputs[0].value)
    if not await confirmed(node, txid):
        node.mine(1)
    assert await confirmed(node, txid)
    return txid


async def confirmed(node: RegtestNode, txid: str) -> bool:
    try:
        tx = await node.rpc("getrawtransaction", txid, True)
    except Exception:
        return False
    return tx.get("confirmations", 0) >= 1


async def open_wallets(participants) -> list[Wallet]:
    wallets = [p.wallet() for p in participants]
    for w in wallets:
        await w.start()
    return wallets


async def close_all(wallets) -> None:
    for w in wallets:
        await w.close()


async def deposited_vaults(system: System, node: RegtestNode, n: int = 1) -> list[str]:
    async with system.stakeholders[0].wallet() as w:
        outpoints = [await deposit(node, await w.deposit_address()) for _ in range(n)]
    node.mine(1)
    return outpoints


async def secure_and_activate(wallets: list[Wallet], outpoints: list[str]) -> None:
    for outpoint in outpoints:
        await asyncio.gather(*(w.secure(outpoint, timeout=TIMEOUT) for w in wallets))
    for outpoint in outpoints:
        await asyncio.gather(*(w.activate(outpoint, timeout=TIMEOUT) for w in wallets))


async def secure_and_activate_all(system: System, outpoints: list[str]) -> None:
    """Every stakeholder's wallet secures, then activates, `outpoints`."""
    stakeholders = await open_wallets(system.stakeholders)
    try:
        await secure_and_activate(stakeholders, outpoints)
    finally:
        await close_all(stakeholders)


async def state_of(w: Wallet, outpoint: str) -> str:
    return {v.outpoint: v.state for v in await w.vaults()}[outpoint]


async def mine_until(node: RegtestNode, task: asyncio.Future, timeout: float = TIMEOUT):
    """Mine a block every 0.2 s until `task` (a spend waiting out its csv) is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        assert loop.time() < deadline, "task not done in time"
        await asyncio.wait([task], timeout=0.2)
        if not task.done():
            node.mine(1)
    return task.result()


async def payee(node: RegtestNode) -> str:
    return await node.rpc("getnewaddress", wallet=node.MINER_WALLET)


# --- scenarios --------------------------------------------------------------------------

async def test_life_of_a_vault_spent_with_every_watchtowers_approval(make_system, bitcoind):
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    stakeholders = await open_wallets(system.stakeholders)
    [manager] = await open_wallets(system.managers[:1])
    try:
        assert await state_of(stakeholders[0], outpoint) == "funded"
        await asyncio.gather(*(w.secure(outpoint, timeout=TIMEOUT) for w in stakeholders))
        assert await state_of(stakeholders[0], outpoint) == "secured"
        await asyncio.gather(*(w.activate(outpoint, timeout=TIMEOUT) for w in stakeholders))
        assert await state_of(manager, outpoint) == "active"
        to = await payee(bitcoind)
        # 10 sat/vB, above the unvault's and the spend's own ~1 sat/vB: each goes out
        # with a CPFP child spending its CPFP output, as one package.
        task = asyncio.ensure_future(manager.spend([outpoint], {to: 1_000_000}, timeout=TIMEOUT,
                                                   cpfp_feerate_sat_per_kwu=2_500))
        txid = await mine_until(bitcoind, task)
        bitcoind.mine(1)
        tx = await bitcoind.rpc("getrawtransaction", txid, True)
        assert tx["confirmations"] >= 1
        paid = [o for o in tx["vout"] if o["scriptPubKey"].get("address") == to]
        assert sats(paid[0]["value"]) == 1_000_000
        unvault = chain_of(system, outpoint).unvault.txid
        for parent, cpfp_vout in ((unvault, 1), (txid, 0)):
            child = await spender(bitcoind, f"{parent}:{cpfp_vout}", depth=20)
            assert child is not None, f"no CPFP child of {parent}"
            assert await confirmed(bitcoind, child)
        assert await state_of(stakeholders[1], outpoint) == "spent"
        # The change went back to a deposit: a new vault, seen as funded.
        vaults = {v.outpoint: v for v in await stakeholders[0].vaults()}
        assert any(o.startswith(txid) and v.state == "funded" for o, v in vaults.items())
        # Resumable and idempotent: the same call returns the same txid, nothing new.
        assert await manager.spend([outpoint], {to: 1_000_000}) == txid
    finally:
        await close_all(stakeholders + [manager])


async def test_refused_spend_then_unvault_broadcast_anyway_is_cancelled(make_system, bitcoind):
    allowed = await payee(bitcoind)
    policies = [ACCEPT_ALL, {"allowed_addresses": [allowed]}, ACCEPT_ALL]
    system = await make_system(policies=policies)
    [outpoint] = await deposited_vaults(system, bitcoind)
    stakeholders = await open_wallets(system.stakeholders)
    [manager] = await open_wallets(system.managers[:1])
    try:
        await secure_and_activate(stakeholders, [outpoint])
        elsewhere = await payee(bitcoind)
        with pytest.raises(SpendRefused) as info:
            await manager.spend([outpoint], {elsewhere: 1_000_000}, timeout=TIMEOUT)
        opinion_key = system.deployment["watchtowers"][1]
        assert [pk for pk, _ in info.value.refusals] == [opinion_key]
        assert info.value.refusals[0][1]  # the watchtower said why
        # The unvault is fully signed since activation: broadcast it anyway.
        txs = chain_of(system, outpoint)
        await manager._restore([txs.unvault])
        await bitcoind.rpc("sendrawtransaction", txs.unvault.finalize().to_hex())
        cancel = await cancelled_by_a_watchtower(system, bitcoind, txs)
        assert await state_of(stakeholders[0], outpoint) == "cancelled"
        # The cancel paid back to the deposit script: a new vault at the same index.
        assert f"{cancel}:0" in {v.outpoint for v in await stakeholders[2].vaults()}
    finally:
        await close_all(stakeholders + [manager])


async def test_unvault_with_stolen_manager_keys_and_no_request_is_cancelled(
        make_system, bitcoind):
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    stakeholders = await open_wallets(system.stakeholders)
    try:
        await secure_and_activate(stakeholders, [outpoint])
        txs = chain_of(system, outpoint)
        await stakeholders[0]._restore([txs.unvault])
        await bitcoind.rpc("sendrawtransaction", txs.unvault.finalize().to_hex())
        bitcoind.mine(1)  # even once mined, it is cancelled before the csv
        await cancelled_by_a_watchtower(system, bitcoind, txs)
        assert await state_of(stakeholders[1], outpoint) == "cancelled"
    finally:
        await close_all(stakeholders)


async def test_conflicting_spends_the_cosigners_refuse_the_second(make_system, bitcoind):
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    stakeholders = await open_wallets(system.stakeholders)
    # The second manager's wallet gives a refusing daemon 2 s (the cosigners' refusal
    # of a second spend of an outpoint will not change).
    managers = [system.managers[0].wallet(), system.managers[1].wallet(retry_timeout=2.0)]
    for w in managers:
        await w.start()
    try:
        await secure_and_activate(stakeholders, [outpoint])
        txs = chain_of(system, outpoint)
        first_payee, second_payee = await payee(bitcoind), await payee(bitcoind)
        first = asyncio.ensure_future(
            managers[0].spend([outpoint], {first_payee: 1_000_000}, timeout=TIMEOUT))
        await poll(lambda: in_mempool(bitcoind, txs.unvault.txid), what="unvault broadcast")
        with pytest.raises(CosignerMisbehaved, match="only that spend can be completed"):
            await managers[1].spend([outpoint], {second_payee: 1_200_000}, timeout=TIMEOUT)
        txid = await mine_until(bitcoind, first)
        bitcoind.mine(1)
        tx = await bitcoind.rpc("getrawtransaction", txid, True)
        assert tx["confirmations"] >= 1
        assert first_payee in [o["scriptPubKey"].get("address") for o in tx["vout"]]
    finally:
        await close_all(stakeholders + managers)


async def test_batch_spend_of_three_vaults(make_system, bitcoind):
    system = await make_system()
    outpoints = await deposited_vaults(system, bitcoind, 3)
    stakeholders = await open_wallets(system.stakeholders)
    [manager] = await open_wallets(system.managers[1:])
    try:
        await secure_and_activate(stakeholders, outpoints)
        to = await payee(bitcoind)
        task = asyncio.ensure_future(manager.spend(outpoints, {to: 5_000_000}, timeout=TIMEOUT))
        txid = await mine_until(bitcoind, task)
        bitcoind.mine(1)
        tx = await bitcoind.rpc("getrawtransaction", txid, True)
        assert tx["confirmations"] >= 1 and len(tx["vin"]) == 3
        unvaults = {chain_of(system, o).unvault.txid for o in outpoints}
        assert {i["txid"] for i in tx["vin"]} == unvaults
        assert all(s == "spent" for s in [await state_of(stakeholders[0], o) for o in outpoints])
    finally:
        await close_all(stakeholders + [manager])


async def test_a_participant_both_stakeholder_and_manager(make_system, bitcoind):
    system = await make_system(both_roles=1)
    assert system.stakeholders[0] is system.managers[0]
    [outpoint] = await deposited_vaults(system, bitcoind)
    stakeholders = await open_wallets(system.stakeholders)
    both = stakeholders[0]
    try:
        await secure_and_activate(stakeholders, [outpoint])
        to = await payee(bitcoind)
        # The manager's example script, as written, picks the active vault and spends.
        script = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "examples" / "spend.py"),
            str(system.stakeholders[0].config_path), to, "700000",
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await mine_until(bitcoind, asyncio.ensure_future(script.communicate()))
        assert script.returncode == 0, err.decode()
        txid = out.decode().strip()
        bitcoind.mine(1)
        assert await confirmed(bitcoind, txid)
        assert await state_of(both, outpoint) == "spent"
    finally:
        await close_all(stakeholders)


async def test_sync_server_killed_and_restarted_while_securing(make_system, bitcoind):
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    stakeholders = await open_wallets(system.stakeholders)
    try:
        # Two stakeholders start; the third is late, so they are mid-flow, polling.
        early = [asyncio.ensure_future(w.secure(outpoint, timeout=TIMEOUT))
                 for w in stakeholders[:2]]
        txs = chain_of(system, outpoint)
        await poll(lambda: _has_sigs(stakeholders[0], txs.cancel.txid, 2),
                   what="both early signatures")
        await system.sync.kill()
        await system.sync.start()  # same port, same database: acked sigs are there
        late = asyncio.ensure_future(stakeholders[2].secure(outpoint, timeout=TIMEOUT))
        await asyncio.gather(*early, late)
        await asyncio.gather(*(w.activate(outpoint, timeout=TIMEOUT) for w in stakeholders))
        assert await state_of(stakeholders[0], outpoint) == "active"
    finally:
        await close_all(stakeholders)


async def _has_sigs(w: Wallet, txid: str, n: int) -> bool:
    return len((await w.store.signatures(txid)).get(0, {})) >= n


async def test_wallet_script_killed_mid_flow_resumes(make_system, bitcoind):
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    script = REPO / "examples" / "secure_deposits.py"
    config = system.stakeholders[0].config_path
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # Alone, it cannot finish (the others have not signed): killed mid-flow.
    proc = subprocess.Popen([sys.executable, str(script), str(config), "--once"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    txs = chain_of(system, outpoint)
    data_dir = system.stakeholders[0].directory / "wallet-data"
    try:
        await poll(lambda: _stored_sig_count(data_dir, txs.cancel.txid, 1),
                   what="the script's own signature stored")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    others = await open_wallets(system.stakeholders[1:])
    try:
        pending = [asyncio.ensure_future(w.secure(outpoint, timeout=TIMEOUT)) for w in others]
        # Run again: it resumes from its state and completes with the others.
        rerun = await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(config), "--once", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(rerun.communicate(), TIMEOUT)
        assert rerun.returncode == 0, out.decode()
        assert f"secured {outpoint}" in out.decode()
        await asyncio.gather(*pending)
    finally:
        await close_all(others)
    async with system.stakeholders[0].wallet() as w:
        assert await state_of(w, outpoint) == "secured"


async def _stored_sig_count(data_dir: Path, txid: str, n: int) -> bool:
    if not (data_dir / "wallet.sqlite3").exists():
        return False
    store = await WalletStore.open(data_dir)
    try:
        return len((await store.signatures(txid)).get(0, {})) >= n
    finally:
        await store.close()


async def test_err_sig_round_replaces_a_bad_signature(make_system, bitcoind):
    from revault.clients import SyncServerClient
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    stakeholders = await open_wallets(system.stakeholders)
    try:
        txs = chain_of(system, outpoint)
        wrong = txs.emergency.sign(0, system.stakeholders[2].stakeholder_secret)
        async with await SyncServerClient.connect(
                HOST, system.sync.port, system.stakeholders[2].noise.private,
                system.sync_noise.public) as faulty:
            await faulty.sig(txs.cancel.uid, txs.cancel.signers(0)[2].hex(), wrong.hex())
        first = asyncio.ensure_future(stakeholders[0].secure(outpoint, timeout=TIMEOUT))
        async with await SyncServerClient.connect(
                HOST, system.sync.port, system.managers[0].noise.private,
                system.sync_noise.public) as manager:
            stk2 = txs.cancel.signers(0)[2].hex()

            async def erased() -> bool:
                return stk2 not in (await manager.get_sigs(tx_uid(txs.cancel.txid))).signatures
            await poll(erased, what="err_sig")
        await asyncio.gather(first, *(w.secure(outpoint, timeout=TIMEOUT)
                                      for w in stakeholders[1:]))
        for w in stakeholders:
            cancel = (await w.store.signatures(txs.cancel.txid))[0]
            assert cancel[txs.cancel.signers(0)[2]] != wrong
        await asyncio.gather(*(w.activate(outpoint, timeout=TIMEOUT) for w in stakeholders))
        assert await state_of(stakeholders[1], outpoint) == "active"
    finally:
        await close_all(stakeholders)


async def test_emergency_moves_every_vault_to_the_emergency_address(make_system, bitcoind):
    system = await make_system()
    outpoints = await deposited_vaults(system, bitcoind, 2)
    stakeholders = await open_wallets(system.stakeholders)
    [manager] = await open_wallets(system.managers[:1])
    try:
        await secure_and_activate(stakeholders, outpoints)
        # Vault 1 is being spent (approved, unvault in the mempool): it takes the
        # unvault-emergency; vault 0 is still deposited: it takes the emergency.
        to = await payee(bitcoind)
        spending = asyncio.ensure_future(manager.spend([outpoints[1]], {to: 1_000_000},
                                                       timeout=TIMEOUT))
        tx1 = chain_of(system, outpoints[1])
        await poll(lambda: in_mempool(bitcoind, tx1.unvault.txid), what="unvault broadcast")
        sent = await stakeholders[2].emergency()
        assert len(sent) == 2
        tx0 = chain_of(system, outpoints[0])
        moved = {outpoints[0]: None, f"{tx1.unvault.txid}:0": None}
        bitcoind.mine(1)
        for txid in sent:
            # Ours, or a watchtower's bump of it (more inputs, the same output).
            tx = await bitcoind.rpc("getrawtransaction", txid, True)
            assert tx["confirmations"] >= 1
            assert [o["scriptPubKey"].get("address") for o in tx["vout"]] == \
                [system.deployment["emergency_address"]]
            for i in tx["vin"]:
                if f"{i['txid']}:{i['vout']}" in moved:
                    moved[f"{i['txid']}:{i['vout']}"] = txid
        assert all(moved.values()), moved
        assert tx0.emergency.txid in sent or moved[outpoints[0]] in sent
        assert {await state_of(stakeholders[0], o) for o in outpoints} == {"emergencied"}
        # The spend in progress cannot complete: its unvault output is gone.
        with pytest.raises(FlowError):
            await mine_until(bitcoind, spending)
        assert await stakeholders[0].emergency() == []  # nothing left to move
    finally:
        await close_all(stakeholders + [manager])


async def test_activation_refused_until_secured(make_system, bitcoind):
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    stakeholders = await open_wallets(system.stakeholders)
    try:
        with pytest.raises(NotSecured, match="run secure"):
            await stakeholders[0].activate(outpoint)
        assert await state_of(stakeholders[0], outpoint) == "funded"
    finally:
        await close_all(stakeholders)



async def test_a_watchtower_added_later_gets_the_active_vaults_and_guards_them(
        make_system, bitcoind):
    from tests.support.deployment_system import add_watchtower
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    await secure_and_activate_all(system, [outpoint])
    original = list(system.watchtowers)
    await add_watchtower(system, system.stakeholders[0], ACCEPT_ALL)
    async with system.stakeholders[0].wallet() as w:
        assert len(w.config.watchtowers) == 2
        assert await state_of(w, outpoint) == "active"
        await w.secure(outpoint, timeout=TIMEOUT)  # the next run: the new tower catches up
        txs = chain_of(system, outpoint)
        acks = await w.store.acks(r.txid for r in txs.revocations())
        assert {k for _, k in acks} == {t.noise_key.hex() for t in w.config.watchtowers}
    # Only the new watchtower is left: it alone cancels an unrequested unvault.
    for tower in original:
        assert await tower.stop() == 0
    async with system.stakeholders[1].wallet() as w:
        await w._restore([txs.unvault])
    await bitcoind.rpc("sendrawtransaction", txs.unvault.finalize().to_hex())
    await cancelled_by_a_watchtower(system, bitcoind, txs)


async def test_xpub_deployment_fresh_index_per_deposit_address(make_system, bitcoind):
    system = await make_system(xpubs=True)
    d = Deployment.from_dict(system.deployment)
    assert d.uses_xpubs
    stakeholders = await open_wallets(system.stakeholders)
    [manager] = await open_wallets(system.managers[:1])
    try:
        addresses = [await stakeholders[0].deposit_address() for _ in range(2)]
        assert addresses == [d.deposit_address(0), d.deposit_address(1)]
        outpoints = [await deposit(bitcoind, a) for a in addresses]
        bitcoind.mine(1)
        # The other wallets never handed these indexes out: they find them within their
        # lookahead, and hand out the next index after them.
        vaults = {v.outpoint: v for v in await stakeholders[1].vaults()}
        assert [vaults[o].index for o in outpoints] == [0, 1]
        assert await stakeholders[1].deposit_address() == d.deposit_address(2)
        for o, index in zip(outpoints, (0, 1)):
            await asyncio.gather(*(w.secure(o, timeout=TIMEOUT) for w in stakeholders))
            await asyncio.gather(*(w.activate(o, timeout=TIMEOUT) for w in stakeholders))
        to = await payee(bitcoind)
        task = asyncio.ensure_future(manager.spend(outpoints, {to: 1_000_000}, timeout=TIMEOUT))
        txid = await mine_until(bitcoind, task)
        bitcoind.mine(1)
        tx = await bitcoind.rpc("getrawtransaction", txid, True)
        assert tx["confirmations"] >= 1
        # The change went to the deposit script of the highest index spent (1).
        change = [o for o in tx["vout"] if o["scriptPubKey"].get("address") == addresses[1]]
        assert len(change) == 1
        states = {v.outpoint: v.state for v in await stakeholders[0].vaults()}
        assert [states[o] for o in outpoints] == ["spent", "spent"]
    finally:
        await close_all(stakeholders + [manager])


async def test_cpfp_children_draw_on_the_managers_cpfp_wallet(make_system, bitcoind):
    system = await make_system()
    d = Deployment.from_dict(system.deployment)
    [outpoint] = await deposited_vaults(system, bitcoind)
    # The operator funds the managers' CPFP wallet (the CPFP script: any manager's hot key).
    for _ in range(2):
        await deposit(bitcoind, d.cpfp_address(0), 100_000)
    bitcoind.mine(1)
    stakeholders = await open_wallets(system.stakeholders)
    [manager] = await open_wallets(system.managers[1:])
    try:
        await secure_and_activate(stakeholders, [outpoint])
        to = await payee(bitcoind)
        # 100 sat/vB: more than the unvault's 30,000 sat CPFP output (or the spend's)
        # can pay for its package alone.
        task = asyncio.ensure_future(manager.spend([outpoint], {to: 1_000_000}, timeout=TIMEOUT,
                                                   cpfp_feerate_sat_per_kwu=25_000))
        txid = await mine_until(bitcoind, task)
        bitcoind.mine(1)
        unvault = chain_of(system, outpoint).unvault.txid
        for parent, cpfp_vout in ((unvault, 1), (txid, 0)):
            child_txid = await spender(bitcoind, f"{parent}:{cpfp_vout}", depth=20)
            child = await bitcoind.rpc("getrawtransaction", child_txid, True)
            assert child["confirmations"] >= 1
            assert len(child["vin"]) >= 2, "the CPFP wallet's coin was not used"
            fee_rate = await _package_rate(bitcoind, [parent, child_txid])
            assert fee_rate >= 25_000 * 4 / 1000 * 0.99, fee_rate  # sat/vB, Core's count
    finally:
        await close_all(stakeholders + [manager])


async def _package_rate(node: RegtestNode, txids: list[str]) -> float:
    """(fees) / (vsizes) of confirmed transactions, in sat/vB."""
    fee = vsize = 0
    for txid in txids:
        tx = await node.rpc("getrawtransaction", txid, 2, await _blockhash(node, txid))
        fee += sats(tx["fee"])
        vsize += tx["vsize"]
    return fee / vsize


async def _blockhash(node: RegtestNode, txid: str) -> str:
    return (await node.rpc("getrawtransaction", txid, True))["blockhash"]


async def test_spend_script_killed_after_the_unvaults_resumes_the_same_spend(
        make_system, bitcoind):
    system = await make_system()
    [outpoint] = await deposited_vaults(system, bitcoind)
    await secure_and_activate_all(system, [outpoint])
    to = await payee(bitcoind)
    config = str(system.managers[0].config_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, str(REPO / "examples" / "spend.py"), config, to, "900000", outpoint]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    unvault = chain_of(system, outpoint).unvault.txid
    try:
        # Approved, cosigned, unvault out: now it waits for the csv. Kill it there.
        await poll(lambda: in_mempool(bitcoind, unvault), what="unvault broadcast")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    bitcoind.mine(1)
    second = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await mine_until(bitcoind, asyncio.ensure_future(second.communicate()))
    assert second.returncode == 0, err.decode()
    txid = out.decode().strip()
    bitcoind.mine(1)
    tx = await bitcoind.rpc("getrawtransaction", txid, True)
    assert tx["confirmations"] >= 1 and tx["vin"][0]["txid"] == unvault
    async with system.managers[0].wallet() as w:
        [spend] = await w.store.spends()
        assert (spend.txid, spend.stage) == (txid, "broadcast")  # one spend, resumed
