"""The wallet against real parts: regtest bitcoind, the sync server and cosigners as
subprocesses, three stakeholders' wallets exchanging signatures over Noise."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from revault.clients import SyncServerClient
from revault.primitives import tx_uid
from revault.deployment import Deployment
from revault.wallet import PeerUnavailable, WalletError
from revault.wallet_config import default_bitcoind_wallet
from revault.wallet_flows import NotSecured
from revault.wallet_store import WalletStore
from tests.support.regtest import RegtestNode, btc
from tests.support.deployment_system import HOST, start_system

DEPOSIT = 2_000_000


@pytest.fixture
async def system(daemon_dir, bitcoind: RegtestNode):
    s = await start_system(daemon_dir / "system", bitcoind)
    try:
        yield s
    finally:
        s.stop_all()


async def deposit(node: RegtestNode, address: str, amount: int = DEPOSIT) -> str:
    txid = await node.rpc("sendtoaddress", address, btc(amount), wallet=node.MINER_WALLET)
    tx = await node.rpc("getrawtransaction", txid, True)
    [vout] = [o["n"] for o in tx["vout"] if o["scriptPubKey"].get("address") == address
              and o["value"] == Decimal(btc(amount))]
    return f"{txid}:{vout}"


async def test_deposits_become_vaults_in_a_watch_only_wallet(system, bitcoind):
    d = Deployment.from_dict(system.deployment)
    async with system.stakeholders[0].wallet() as w:
        address = await w.deposit_address()
        assert address == d.deposit_address(0) == await w.deposit_address()
        big = await deposit(bitcoind, address)
        small = await deposit(bitcoind, address, 100_000)  # under min_deposit_value
        bitcoind.sync_wallets()
        [vault] = await w.vaults()
        assert (vault.outpoint, vault.value, vault.index, vault.state, vault.confirmations) \
            == (big, DEPOSIT, 0, "funded", 0)
        bitcoind.mine(1)
        [vault] = await w.vaults()
        assert vault.confirmations == 1 and vault.state == "funded"
        assert small not in [v.outpoint for v in await w.vaults()]
        # The watch-only wallet is Core's, named after the data directory, key-less.
        name = default_bitcoind_wallet(system.stakeholders[0].directory / "wallet-data")
        info = await bitcoind.rpc("getwalletinfo", wallet=name)
        assert info["private_keys_enabled"] is False and info["descriptors"] is True
    # A manager's wallet (another data_dir, another watch-only wallet) sees it too.
    async with system.managers[1].wallet() as m:
        assert [v.outpoint for v in await m.vaults()] == [big]
        with pytest.raises(WalletError, match="stakeholder_key_file"):
            await m.secure(big)


async def test_secure_exchanges_verified_signatures_but_never_activates_without_ack(
        system, bitcoind):
    async with system.stakeholders[0].wallet() as w:
        outpoint = await deposit(bitcoind, await w.deposit_address())
    bitcoind.mine(1)
    wallets = [p.wallet(retry_timeout=1.0) for p in system.stakeholders]
    for w in wallets:
        await w.start()
    try:
        # A faulty wallet of stakeholder 2 first posts a signature of the wrong tx: the
        # others err_sig it, stakeholder 2's wallet reposts its valid one.
        txs = wallets[2]._transactions(await _stored(wallets[2], outpoint))
        wrong = txs.emergency.sign(0, system.stakeholders[2].stakeholder_secret)
        async with await SyncServerClient.connect(
                HOST, system.sync.port, system.stakeholders[2].noise.private,
                system.sync_noise.public) as rogue:
            await rogue.sig(txs.cancel.uid, txs.cancel.signers(0)[2].hex(), wrong.hex())
        # Stakeholder 0 alone first: it sees the invalid signature and err_sigs it.
        first = asyncio.ensure_future(wallets[0].secure(outpoint, timeout=60))
        async with await SyncServerClient.connect(
                HOST, system.sync.port, system.managers[1].noise.private,
                system.sync_noise.public) as manager:
            stk2 = txs.cancel.signers(0)[2].hex()
            await poll(lambda: _lacks(manager, txs.cancel.uid, stk2))
        rest = [asyncio.ensure_future(w.secure(outpoint, timeout=60)) for w in wallets[1:]]
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        # No watchtower answers: each wallet stops there, naming it.
        for w, result in zip(wallets, results):
            assert isinstance(result, PeerUnavailable), result
            assert "refused" in str(result.error) or "onnect" in str(result.error)
            assert str(w.config.watchtowers[0].port) in str(result)
        for w in wallets:
            sigs = [await w.store.signatures(r.txid) for r in txs.revocations()]
            assert all(len(s[0]) == 3 for s in sigs)  # every revocation complete, verified
            with pytest.raises(NotSecured, match="not acked by watchtower"):
                await w.activate(outpoint)
            assert (await w.vaults())[0].state == "funded"
        # No unvault signature ever reached the sync server.
        async with await SyncServerClient.connect(
                HOST, system.sync.port, system.managers[1].noise.private,
                system.sync_noise.public) as manager:
            assert (await manager.get_sigs(txs.unvault.uid)).signatures == {}
            cancel = (await manager.get_sigs(tx_uid(txs.cancel.txid))).signatures
            assert len(cancel) == 3
        # The stored state survives a reopen.
        await wallets[0].close()
        store = await WalletStore.open(wallets[0].config.data_dir)
        assert len((await store.signatures(txs.cancel.txid))[0]) == 3
        await store.close()
    finally:
        for w in wallets:
            await w.close()


async def _lacks(client, uid: str, pubkey: str) -> bool:
    return pubkey not in (await client.get_sigs(uid)).signatures


async def poll(check, timeout: float = 30.0):
    """Until `await check()` is true, for at most `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _stored(w, outpoint):
    await w.vaults()
    return await w.store.vault(outpoint)
