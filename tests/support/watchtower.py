"""A deployment on regtest with a real sync server and a real watchtower, for e2e tests.

The test plays every other participant itself: it holds the stakeholders', managers'
and cosigner's bitcoin keys, signs the revocations like the wallet would and sends them
to the watchtower over Noise as the paired wallet, broadcasts unvaults and spends, and
posts spend requests to the sync server as a manager.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from embit.bip32 import HDKey
from embit.networks import NETWORKS as EMBIT_NETWORKS

from revault.bitcoind import BitcoindError
from revault.keys import create_key_file
from revault.rpc import RpcClient
from revault.deployment import Deployment, p2wpkh, script_pubkey_to_address
from revault.primitives import OutPoint
from revault.transactions import (
    Coin, RevaultTransaction, TxOut, VaultTransactions, build_spend, build_vault_transactions,
    fee_for_weight, sign_digest,
)
from tests.support.daemons import DaemonProcess, NoiseIdentity, write_config
from tests.support.keys import pub, secret
from tests.support.regtest import RegtestNode, btc, free_port, fund, sats

DEPOSIT_SATS = 1_000_000
WAIT = 60.0  # seconds any condition is waited for, polled


def zmq_conf(topics: tuple[str, ...] = ("rawtx", "rawblock")
             ) -> tuple[tuple[str, ...], dict[str, str]]:
    """bitcoin.conf lines publishing `topics` on one endpoint, and the watchtower's keys."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    return (tuple(f"zmqpub{topic}={endpoint}" for topic in topics),
            {f"zmq_{topic}": endpoint for topic in topics})


async def wait_for(predicate, what: str, timeout: float = WAIT):
    """Poll `predicate` (sync or async) until truthy; its value. Bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)  # polling interval, bounded by the deadline


def vault_uid(vault) -> str:
    return hashlib.sha256(bytes.fromhex(vault.deposit.outpoint.txid)).hexdigest()


@dataclass
class Vault:
    deposit: Coin
    txs: VaultTransactions

    @property
    def unvault_coin(self) -> Coin:
        return self.txs.unvault.output_coin(0)


@dataclass
class Deployed:
    """A deployment whose every key the test holds."""

    label: str
    stakeholders: list[bytes]
    managers: list[bytes]
    cosigners: list[bytes]
    cpfp: list[bytes]
    csv: int
    xpubs: bool = False  # keys as BIP 32 roots of these seeds: vault i uses child i
    table: dict = field(init=False)
    deployment: Deployment = field(init=False)

    def key_text(self, secret: bytes) -> str:
        if not self.xpubs:
            return pub(secret).hex()
        return HDKey.from_seed(secret).to_public().to_string(
            version=EMBIT_NETWORKS["regtest"]["xpub"])

    def secret_at(self, secret: bytes, index: int) -> bytes:
        """The private key of `secret`'s participant in vault number `index`."""
        return HDKey.from_seed(secret).child(index).key.secret if self.xpubs else secret

    def __post_init__(self):
        self.table = {
            "network": "regtest",
            "stakeholders": [self.key_text(s) for s in self.stakeholders],
            "managers": [self.key_text(s) for s in self.managers],
            "cosigners": [self.key_text(s) for s in self.cosigners],
            "cpfp_keys": [self.key_text(s) for s in self.cpfp],
            "unvault_csv": self.csv,
            "emergency_address": script_pubkey_to_address(
                p2wpkh(pub(secret(f"{self.label} emergency"))), "regtest"),
        }
        self.deployment = Deployment.from_dict(self.table)

    @classmethod
    def create(cls, label: str, csv: int = 6, xpubs: bool = False) -> Deployed:
        return cls(label, [secret(f"{label} stakeholder {i}") for i in range(2)],
                   [secret(f"{label} manager 0")], [secret(f"{label} cosigner 0")],
                   [secret(f"{label} cpfp 0")], csv, xpubs)

    def vault(self, deposit: Coin) -> Vault:
        return Vault(deposit, build_vault_transactions(self.deployment, deposit))

    def signatures(self, tx: RevaultTransaction, sighash: int | None = None) -> dict[str, str]:
        """Every stakeholder's signature of input 0, as the wallet sends them."""
        digest = tx.signature_hash(0, sighash)
        keys = [self.secret_at(s, tx.vault_index) for s in self.stakeholders]
        return {pub(k).hex(): sign_digest(k, digest).hex() for k in keys}

    def signed_unvault(self, vault: Vault):
        unvault = build_vault_transactions(self.deployment, vault.deposit).unvault
        for s in self.stakeholders:
            unvault.sign(0, self.secret_at(s, vault.deposit.index))
        return unvault.finalize()

    def spend(self, vault: Vault | list[Vault], payee: bytes,
              feerate_sat_per_kwu: int = 1000):
        """The managers' and cosigner's fully signed spend of the unvault output of one
        vault (or a batch of them), paying all of it to `payee` but the fee."""
        coins = [v.unvault_coin for v in (vault if isinstance(vault, list) else [vault])]
        total = sum(c.value for c in coins)
        draft = build_spend(self.deployment, coins, [TxOut(total // 2, payee)],
                            max_feerate_sat_per_kwu=None)  # only sizes the real one
        cpfp = draft.tx.outputs[0].value
        fee = fee_for_weight(draft.max_weight(), feerate_sat_per_kwu)
        spend = build_spend(self.deployment, coins, [TxOut(total - cpfp - fee, payee)])
        for n, coin in enumerate(coins):
            for sk in self.managers + self.cosigners:
                spend.sign(n, self.secret_at(sk, coin.index))
        return spend.finalize()


class Network:
    """bitcoind + sync server + watchtower, with the test as wallet and manager."""

    def __init__(self, tmp: Path, node: RegtestNode, deployed: Deployed, *,
                 zmq: dict[str, str] | None = None, policy: dict | None = None,
                 max_feerate: int = 50, reserve_coins: tuple[int, ...] = (200_000,) * 3,
                 env: dict[str, str] | None = None, tower_extra: dict | None = None):
        self.tmp = tmp
        self.node = node
        self.deployed = deployed
        self.d = deployed.deployment
        self.reserve_wallet = f"reserve-{tmp.name}"
        self.sync_noise = NoiseIdentity.create(tmp / "sync.key")
        self.tower_noise = NoiseIdentity.create(tmp / "tower.key")
        self.wallet_noise = NoiseIdentity.create(tmp / "wallet.key")
        self.manager_noise = NoiseIdentity.create(tmp / "manager.key")
        self.opinion_key = secret(f"{tmp.name} opinion")
        create_key_file(tmp / "opinion.key", self.opinion_key)
        self.reserve_coins = reserve_coins
        # A fixed port: a sync server stopped and started again is found where it was.
        self.sync_port = free_port()
        write_config(tmp / "sync.toml", {
            "listen": f"127.0.0.1:{self.sync_port}", "data_dir": "sync-data",
            "noise_key_file": "sync.key",
            "log_level": "debug",
            "peers": {"stakeholders": [], "managers": [self.manager_noise.public.hex()],
                      "watchtowers": [self.tower_noise.public.hex()]},
        })
        self.sync = DaemonProcess("sync-server", tmp / "sync.toml", tmp)
        self.tower = DaemonProcess("watchtower", tmp / "tower.toml", tmp)
        self.tower_env = env
        self.zmq = zmq or {}
        self.policy = policy
        self.max_feerate = max_feerate
        self.tower_extra = tower_extra or {}  # more keys of the watchtower's config

    def write_tower_config(self) -> None:
        config = {
            "listen": "127.0.0.1:0", "data_dir": "tower-data", "noise_key_file": "tower.key",
            "log_level": "debug", "opinion_key_file": "opinion.key",
            "wallet_noise_key": self.wallet_noise.public.hex(), "poll_interval": 0.2,
            "sync_server": {"host": "127.0.0.1", "port": self.sync_port,
                            "noise_key": self.sync_noise.public.hex()},
            "bitcoind": {"rpc_url": f"http://127.0.0.1:{self.node.rpc_port}",
                         "rpc_user": self.node.rpc_user,
                         "rpc_password": self.node.rpc_password,
                         "wallet": self.reserve_wallet, **self.zmq},
            "fees": {"max_feerate": self.max_feerate},
            "deployment": self.deployed.table,
        }
        if self.policy is not None:
            config["policy"] = self.policy
        config.update(self.tower_extra)
        write_config(self.tmp / "tower.toml", config)

    async def start(self) -> Network:
        self.node.cli("createwallet", self.reserve_wallet)
        await self.fund_reserve(self.reserve_coins)
        await self.sync.start()
        self.write_tower_config()
        await self.start_tower()
        return self

    async def start_tower(self) -> None:
        if self.tower_env:
            import os
            saved = dict(os.environ)
            os.environ.update(self.tower_env)
            try:
                await self.tower.start()
            finally:
                os.environ.clear()
                os.environ.update(saved)
        else:
            await self.tower.start()

    def stop(self) -> None:
        self.tower.ensure_dead()
        self.sync.ensure_dead()

    async def fund_reserve(self, values) -> None:
        if not values:
            return
        address = self.node.cli("getnewaddress", "", "bech32", wallet=self.reserve_wallet)
        for value in values:
            self.node.cli("sendtoaddress", address, str(btc(value)),
                          wallet=self.node.MINER_WALLET)
        self.node.mine(1)

    # --- as the paired wallet ------------------------------------------------------------

    async def wallet_client(self) -> RpcClient:
        return await RpcClient.connect("127.0.0.1", self.tower.port, self.wallet_noise.private,
                                       self.tower_noise.public)

    async def send_sig(self, params: dict) -> dict:
        async with await self.wallet_client() as client:
            return await client.call("sig", params)

    def sig_params(self, vault: Vault, tx: RevaultTransaction,
                   sighash: int | None = None) -> dict:
        return {"signatures": self.deployed.signatures(tx, sighash), "txid": tx.txid,
                "vault_txid": vault.deposit.outpoint.txid}

    async def secure(self, vault: Vault) -> None:
        """Send every revocation of the vault; each must be acked."""
        for tx in vault.txs.revocations():
            result = await self.send_sig(self.sig_params(vault, tx))
            assert result == {"ack": True, "txid": tx.txid}, result

    async def deposit(self, value: int = DEPOSIT_SATS, *, confirm: bool = True,
                      index: int = 0) -> Vault:
        address = self.d.deposit_address(index)
        coin = await fund(self.node, address, value, index)
        if confirm:
            self.node.mine(1)
        return self.deployed.vault(coin)

    async def unvault(self, vault: Vault) -> str:
        tx = self.deployed.signed_unvault(vault)
        return await self.node.rpc("sendrawtransaction", tx.to_hex())

    # --- as a manager ------------------------------------------------------------------------

    async def request_spend(self, vault: Vault, spend, vault_id: str | None = None) -> None:
        async with await RpcClient.connect("127.0.0.1", self.sync.port,
                                           self.manager_noise.private,
                                           self.sync_noise.public) as client:
            result = await client.call("request_spend", {
                "transaction": spend.to_base64(), "timestamp": int(time.time()),
                "vault_id": vault_id or vault_uid(vault),
            })
            assert result == {"ack": True}

    async def opinions(self, vault: Vault, vault_id: str | None = None) -> list[dict]:
        async with await RpcClient.connect("127.0.0.1", self.sync.port,
                                           self.manager_noise.private,
                                           self.sync_noise.public) as client:
            result = await client.call("get_spend_opinions",
                                       {"vault_id": vault_id or vault_uid(vault)})
        return result["opinions"]

    # --- watching ------------------------------------------------------------------------------

    async def mempool_spender(self, outpoint: OutPoint) -> str | None:
        [entry] = await self.node.rpc("gettxspendingprevout",
                                      [{"txid": outpoint.txid, "vout": outpoint.vout}])
        return entry.get("spendingtxid")

    async def wait_cancel_in_mempool(self, vault: Vault, timeout: float = WAIT) -> dict:
        """The cancel spending the vault's unvault output, once it is in the mempool."""
        cancel_spk = vault.txs.cancel.tx.outputs[0].script_pubkey

        async def found():
            txid = await self.mempool_spender(vault.unvault_coin.outpoint)
            if txid is None:
                return None
            try:
                tx = await self.node.rpc("getrawtransaction", txid, True)
            except BitcoindError as e:
                if e.code != -5:
                    raise
                return None  # replaced in between (by the cancel, say): look again
            if bytes.fromhex(tx["vout"][0]["scriptPubKey"]["hex"]) == cancel_spk:
                return tx
            return None

        return await wait_for(found, f"the cancel of {vault.deposit.outpoint}", timeout)

    def log(self) -> str:
        return self.tower.stderr()


async def fill_mempool(node: RegtestNode, feerate_sat_vb: int, *, until_sat_vb: float,
                       limit: int = 150) -> int:
    """Fill the node's mempool (run it with a small maxmempool) with large transactions
    at `feerate_sat_vb` until its minimum feerate reaches `until_sat_vb`. Each spends one
    mature coinbase of the miner wallet into 2,000 outputs; returns how many were sent."""
    from bitcoin.core import CMutableTransaction, COutPoint, CScript, CTxIn, CTxOut, lx

    from revault.deployment import address_to_script_pubkey

    miner = node.MINER_WALLET
    change = address_to_script_pubkey(await node.rpc("getnewaddress", wallet=miner), "regtest")
    coins = [u for u in await node.rpc("listunspent", 100, wallet=miner)
             if sats(u["amount"]) >= 10 * 10**8]
    sent = 0
    for coin in coins[:limit]:
        info = await node.rpc("getmempoolinfo")
        if sats(info["mempoolminfee"]) / 1000 >= until_sat_vb:
            return sent
        outputs = [CTxOut(1000, CScript(b"\x00\x20" + hashlib.sha256(
            f"{coin['txid']} {i}".encode()).digest())) for i in range(2000)]
        vsize = 2000 * 43 + 200
        rest = sats(coin["amount"]) - 2000 * 1000 - feerate_sat_vb * vsize
        outputs.append(CTxOut(rest, CScript(change)))
        tx = CMutableTransaction([CTxIn(COutPoint(lx(coin["txid"]), coin["vout"]))], outputs)
        signed = await node.rpc("signrawtransactionwithwallet", tx.serialize().hex(),
                                wallet=miner)
        try:
            await node.rpc("sendrawtransaction", signed["hex"], 0)
        except BitcoindError as e:
            # Between getmempoolinfo and here the minimum rose past this transaction's
            # feerate (other transactions, a cancel among them, pushed it up): what this
            # helper is after. The next turn of the loop reads the new minimum.
            if e.message != "mempool full":
                raise
            continue
        sent += 1
    raise AssertionError(f"the mempool minimum feerate did not reach {until_sat_vb} sat/vB "
                         f"after {sent} transactions")
