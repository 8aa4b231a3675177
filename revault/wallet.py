"""`revault.wallet`: the library a stakeholder's or a manager's scripts import.

    from revault.wallet import Wallet
    async with Wallet.open("wallet.toml") as w:
        address = await w.deposit_address()
        for vault in await w.vaults():          # .outpoint .value .index .state
            await w.secure(vault.outpoint)       # stakeholder
            await w.activate(vault.outpoint)     # stakeholder, only once secured
        txid = await w.spend([outpoint], {address: sats})   # manager
        await w.emergency()

This module is the thin asyncio shell around `revault.wallet_flows` (the pure state
machines): it performs their actions against the sync server, the watchtowers and the
cosigners through `revault.clients`, persists what they learn in `WalletStore` before
going on, and talks to Bitcoin Core. Deposits are watched by a watch-only descriptor
wallet on the configured node (no chain scanning here): the deposit and unvault
descriptors of every index handed out are imported into it, so Core reports the
deposits, and every transaction that spends them, through its wallet RPCs.

Every verb is idempotent and resumable: called again (after a crash, a timeout, a
restart of any daemon) it continues from the stored state. Every call to a daemon is
bounded in time and retried with backoff on a refusal (-32002) or a dropped
connection, for at most `retry_timeout` seconds; a flow waits for others (signatures,
opinions, blocks) for at most the `timeout` its verb is given, then raises
`FlowTimeout` saying what is still missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from revault.bitcoind import (
    RPC_VERIFY_ALREADY_IN_CHAIN, RPC_WALLET_NOT_FOUND, BitcoindClient, BitcoindError,
    PackageRejected, submit_package,
)
from revault.clients import CosignerClient, SyncServerClient, WatchtowerClient
from revault.config import ConfigError
from revault.daemon import ensure_data_dir
from revault.errors import Refused
from revault.keys import KeyFileError, read_key_file
from revault.deployment import Deployment, p2wsh
from revault.fees import CpfpParent, FeeBumpError, build_cpfp
from revault.primitives import OutPoint, tx_uid
from revault.transactions import (
    FEERATE_SAT_PER_KWU, MAX_SANE_FEERATE_SAT_PER_KWU, Coin, Kind, RevaultTransaction,
    SpendPath, SpentOutput, TransactionError, Tx, TxOut, VaultTransactions, build_spend,
    build_vault_transactions,
)
from revault.transport import TransportError
from revault.wallet_config import (
    Endpoint, ParticipantKey, WalletConfig, default_bitcoind_wallet, load_wallet_config,
    participant_key,
)
from revault.wallet_flows import (
    ActivateFlow, CosignerMisbehaved, CosignerSign, ErrSig, FetchOpinions, FetchSigs, FlowError, PostSig,
    RequestSpend, SecuredVault, SecureFlow, SendToWatchtower, SignatureRound, SpendFlow,
    backoff,
)
from revault.wallet_store import SPEND_STAGES, StoredVault, WalletStore

__all__ = ["Wallet", "Vault", "WalletStats", "VAULT_STATES", "WalletError", "FlowError", "FlowTimeout",
           "PeerUnavailable"]

log = logging.getLogger("revault.wallet")

VAULT_STATES = ("funded", "secured", "active", "unvaulting", "spent", "cancelled",
                "emergencied")
DEFAULT_RETRY_TIMEOUT = 60.0   # seconds a daemon may stay unreachable or refusing
DEFAULT_FLOW_TIMEOUT = 600.0   # seconds a verb waits for the other participants
RPC_WALLET_ALREADY_LOADED = -35
LOOKAHEAD = 20  # xpub deployments: indexes watched beyond the last one handed out or seen
WALLET_LAG_POLLS = 6  # looks (0.05 s to 1.6 s apart) before a transaction counts as gone

T = TypeVar("T")


class WalletError(Exception):
    """A verb cannot run as asked (unknown vault, wrong role, bad address)."""


class FlowTimeout(FlowError):
    """A flow waited `timeout` seconds; calling the verb again resumes it."""


class PeerUnavailable(FlowError):
    def __init__(self, name: str, error: BaseException):
        super().__init__(f"{name}: unreachable or refusing for too long "
                         f"(last: {type(error).__name__}: {error})")
        self.name = name
        self.error = error


class _TowerUnavailable(Exception):
    """Inside `Wallet._run` only: a watchtower's PeerUnavailable, kept for the end."""

    def __init__(self, error: PeerUnavailable):
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class WalletStats:
    """What this wallet spent its time on since it was opened (for benchmarks, logs)."""

    poll_wait_seconds: float = 0.0  # sleeping between polls: waiting for the others
    daemon_calls: int = 0           # calls to the sync server, watchtowers, cosigners

    async def sleep(self, seconds: float) -> None:
        self.poll_wait_seconds += seconds
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class _WalletTx:
    txid: str
    inputs: tuple[str, ...]     # outpoints spent
    outputs: tuple[bytes, ...]  # scriptPubKeys, in order


@dataclass(frozen=True, slots=True)
class _ChainView:
    unspent: set[str]                 # the watch-only wallet's unspent outpoints
    spenders: dict[str, _WalletTx]    # outpoint -> the wallet transaction spending it


@dataclass(frozen=True, slots=True)
class Vault:
    outpoint: str       # "txid:vout" of the deposit
    value: int          # sat
    index: int          # derivation index (0 for a deployment of plain keys)
    state: str          # one of VAULT_STATES
    confirmations: int  # of the deposit


# --- connections ----------------------------------------------------------------------

class _Peers:
    """Lazily connected clients, one per daemon, with bounded retries."""

    def __init__(self, noise_private: bytes, retry_timeout: float, call_timeout: float):
        self._noise = noise_private
        self.retry_timeout = retry_timeout
        self.call_timeout = call_timeout
        self._clients: dict[bytes, Any] = {}
        self._locks: dict[bytes, asyncio.Lock] = {}

    async def _client(self, endpoint: Endpoint, cls: type[T]) -> T:
        lock = self._locks.setdefault(endpoint.noise_key, asyncio.Lock())
        async with lock:
            client = self._clients.get(endpoint.noise_key)
            if client is None or client.closed:
                client = await cls.connect(endpoint.host, endpoint.port, self._noise,
                                           endpoint.noise_key, connect_timeout=self.call_timeout,
                                           timeout=self.call_timeout)
                self._clients[endpoint.noise_key] = client
            return client

    async def call(self, endpoint: Endpoint, cls: type, call: Callable[[Any], Awaitable[T]],
                   retry_timeout: float | None = None) -> T:
        """`call(client)`, retried on a refusal or a broken connection with backoff."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.retry_timeout if retry_timeout is None else retry_timeout)
        attempt = 0
        while True:
            try:
                return await call(await self._client(endpoint, cls))
            except Refused as e:
                error: BaseException = e
            except (TransportError, OSError, TimeoutError) as e:
                error = e
                await self._drop(endpoint)
            attempt += 1
            pause = backoff(attempt)
            if loop.time() + pause > deadline:
                raise PeerUnavailable(endpoint.name, error)
            log.info("%s: %s; retrying in %.2fs", endpoint.name, error, pause)
            await asyncio.sleep(pause)

    async def _drop(self, endpoint: Endpoint) -> None:
        client = self._clients.pop(endpoint.noise_key, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()


# --- the wallet -----------------------------------------------------------------------

class Wallet:
    """One participant's wallet. Use `async with Wallet.open(path) as w:`."""

    def __init__(self, config: WalletConfig, *, retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
                 call_timeout: float = 30.0):
        self.config = config
        self.deployment = config.deployment
        self._retry_timeout = retry_timeout
        self._call_timeout = call_timeout
        self.stakeholder: ParticipantKey | None = None
        self.manager: ParticipantKey | None = None
        self.cpfp: ParticipantKey | None = None
        self._store: WalletStore | None = None
        self._peers: _Peers | None = None
        self._node: BitcoindClient | None = None
        self._chain: BitcoindClient | None = None  # the watch-only wallet
        self._chain_ready = False
        self._chain_lock = asyncio.Lock()
        self._towers = [t.noise_key.hex() for t in config.watchtowers]
        self._decoded: dict[str, _WalletTx] = {}
        self.stats = WalletStats()

    @classmethod
    def open(cls, path: str | Path, **options: Any) -> Wallet:
        """The wallet of the config file at `path`; enter it with `async with`."""
        return cls(load_wallet_config(path), **options)

    async def __aenter__(self) -> Wallet:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        config, d = self.config, self.deployment
        try:
            noise = read_key_file(config.noise_key_file)
        except KeyFileError as e:
            raise ConfigError(f"noise_key_file: {e}") from None
        if config.stakeholder_key_file is not None:
            self.stakeholder = participant_key("stakeholder", config.stakeholder_key_file,
                                               d.stakeholders, d.network)
        if config.manager_key_file is not None:
            self.manager = participant_key("manager", config.manager_key_file, d.managers,
                                           d.network)
            self.cpfp = participant_key("cpfp", config.cpfp_key_file, d.cpfp_keys, d.network)
        ensure_data_dir(config.data_dir)
        self._store = await WalletStore.open(config.data_dir)
        self._peers = _Peers(noise, self._retry_timeout, self._call_timeout)
        self._node = config.bitcoind.client(timeout=self._call_timeout)
        name = config.bitcoind.wallet or default_bitcoind_wallet(config.data_dir)
        self._chain = self._node.for_wallet(name)

    async def close(self) -> None:
        if self._peers is not None:
            await self._peers.close()
            self._peers = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    @property
    def store(self) -> WalletStore:
        if self._store is None:
            raise WalletError("the wallet is not open: use `async with Wallet.open(path)`")
        return self._store

    # --- the watch-only wallet ----------------------------------------------------------

    @property
    def bitcoind_wallet(self) -> str:
        assert self._chain is not None
        return self._chain.wallet

    async def _ensure_chain(self) -> BitcoindClient:
        """Load (or create) the watch-only descriptor wallet and import the descriptors
        of every index it must watch, once per run."""
        async with self._chain_lock:
            if not self._chain_ready:
                await self._load_watchonly()
                if not self.deployment.uses_xpubs:
                    await self.store.add_deposit_index(0, self.deployment.deposit_address(0))
                await self._import(await self._window())
                self._chain_ready = True
        return self._chain

    async def _window(self) -> range:
        """The indexes watched: every one handed out or seen, and LOOKAHEAD more (the
        other participants' wallets hand out indexes too; a deposit to one of theirs is
        found as long as it is within the window, which then moves on)."""
        if not self.deployment.uses_xpubs:
            return range(1)
        handed = await self.store.deposit_indexes()
        return range(max(handed, default=-1) + 1 + LOOKAHEAD)

    async def _load_watchonly(self) -> None:
        name = self.bitcoind_wallet
        try:
            await self._node.call("loadwallet", name)
        except BitcoindError as e:
            if e.code == RPC_WALLET_ALREADY_LOADED:
                return
            if e.code != RPC_WALLET_NOT_FOUND:
                raise
            # disable_private_keys, blank, no passphrase, no avoid_reuse, descriptors,
            # load on startup: a watch-only wallet that nodes reload by themselves.
            await self._node.call("createwallet", name, True, True, "", False, True, True)
            log.info("created watch-only wallet %r on bitcoind", name)
        if await self.store.meta("birth") is None:
            await self.store.set_meta("birth", str(int(time.time()) - 7200))

    async def _import(self, indexes: Iterable[int]) -> None:
        """Import the deposit and unvault descriptors of `indexes` not yet in the wallet.
        Their timestamp is this wallet's birth, so a recreated watch-only wallet rescans
        what it missed."""
        have = {entry["desc"].split("#")[0] for entry in
                (await self._chain.call("listdescriptors"))["descriptors"]}
        birth = int(await self.store.meta("birth"))
        wanted = []
        for idx in indexes:
            descriptors = [self.deployment.deposit_descriptor(idx),
                           self.deployment.unvault_descriptor(idx)]
            if self.manager is not None:
                # The managers' CPFP wallet: coins at the CPFP script pay for children.
                descriptors.append(self.deployment.cpfp_descriptor(idx))
            for desc in descriptors:
                # Core lists a descriptor as given (hex keys, no origin), checksum apart.
                if desc.split("#")[0] not in have:
                    wanted.append({"desc": desc, "timestamp": birth,
                                   "label": f"revault vault {idx}"})
        if not wanted:
            return
        for result in await self._chain.call("importdescriptors", wanted, timeout=600):
            if not result.get("success"):
                raise WalletError(f"bitcoind refused a descriptor: {result.get('error')}")

    # --- deposits and vaults ----------------------------------------------------------

    async def deposit_address(self) -> str:
        """An address to deposit to. With xpubs, a fresh derivation index each call,
        watched before it is returned; with plain keys, the one deposit address."""
        await self._ensure_chain()
        d = self.deployment
        if not d.uses_xpubs:
            return d.deposit_address(0)
        indexes = await self.store.deposit_indexes()
        idx = max(indexes, default=-1) + 1
        address = d.deposit_address(idx)
        await self.store.add_deposit_index(idx, address)
        await self._import(await self._window())  # watched before it is handed out
        return address

    @property
    def min_deposit_value(self) -> int:
        return self.deployment.min_deposit_value

    async def _discover(self) -> _ChainView:
        """Record every deposit Core's wallet reports (vaults never leave the store);
        return what the wallet knows: its unspent outputs, and which of its
        transactions spends each output it saw spent."""
        chain = await self._ensure_chain()
        window = await self._window()
        by_address = {self.deployment.deposit_address(i): i for i in window}
        unspent = {f"{u['txid']}:{u['vout']}"
                   for u in await chain.call("listunspent", 0, 9_999_999)}
        since = await chain.call("listsinceblock", "", 1, True, False)
        found, live = [], set()
        for entry in since["transactions"]:
            if entry.get("confirmations", 0) < 0:
                continue  # lost to a conflict
            live.add(entry["txid"])
            if entry.get("category") != "receive" or entry.get("address") not in by_address:
                continue
            value = _sats(entry["amount"])
            if value >= self.min_deposit_value:
                found.append(StoredVault(f"{entry['txid']}:{entry['vout']}", value,
                                         by_address[entry["address"]]))
        await self.store.add_vaults(found)
        seen = {v.index for v in found} - set(await self.store.deposit_indexes())
        for idx in sorted(seen):
            await self.store.add_deposit_index(idx, self.deployment.deposit_address(idx))
        if seen and max(seen) + LOOKAHEAD >= window.stop:
            await self._import(await self._window())  # the window moves on
        spenders = {}
        for txid in live:
            tx = self._decoded.get(txid)
            if tx is None:
                raw = (await chain.call("gettransaction", txid, True, True))["decoded"]
                tx = _WalletTx(txid, tuple(f"{i['txid']}:{i['vout']}" for i in raw["vin"]
                                           if "txid" in i),
                               tuple(bytes.fromhex(o["scriptPubKey"]["hex"]) for o in raw["vout"]))
                self._decoded[txid] = tx  # a txid's inputs and outputs never change
            for outpoint in tx.inputs:
                spenders[outpoint] = tx
        return _ChainView(unspent, spenders)

    async def vaults(self) -> list[Vault]:
        """Every vault with its state, as Bitcoin Core and this wallet's state say."""
        view = await self._discover()
        out = []
        for stored in await self.store.vaults():
            vault = await self._vault(stored, view)
            if vault is not None:
                out.append(vault)
        return out

    async def _vault(self, stored: StoredVault, view: _ChainView) -> Vault | None:
        txs = self._transactions(stored)
        deposit_txid = stored.outpoint.split(":")[0]
        confirmations = await self._confirmations(deposit_txid)
        if confirmations is None:
            return None  # conflicted or forgotten by the node: not a vault
        state = await self._state(stored, txs, view)
        return Vault(stored.outpoint, stored.value, stored.index, state, confirmations)

    async def _state(self, stored: StoredVault, txs: VaultTransactions,
                     view: _ChainView) -> str:
        if stored.outpoint in view.unspent:
            await self._restore(txs)
            if not txs.unvault.is_complete() and self.manager is not None:
                # A manager learns a vault is active from the sync server: one look.
                await self._refresh_unvault(txs)
            if txs.unvault.is_complete():
                return "active"
            if self.stakeholder is not None and self._secured(txs, await self._acks(txs)):
                return "secured"
            return "funded"
        # What spent it, by what it pays: a watchtower's fee bump of a revocation has
        # another txid than the one signed, and the same outputs.
        emergency = self.deployment.emergency_script_pubkey
        spender = view.spenders.get(stored.outpoint)
        if spender is None:
            return "spent"
        if spender.txid != txs.unvault.txid:
            return "emergencied" if emergency in spender.outputs else "spent"
        unvault_output = f"{txs.unvault.txid}:0"
        spender = view.spenders.get(unvault_output)
        if unvault_output in view.unspent or spender is None:
            return "unvaulting"
        if emergency in spender.outputs:
            return "emergencied"
        if spender.outputs == (self.deployment.deposit_script_pubkey(stored.index),):
            return "cancelled"
        return "spent"

    async def _confirmations(self, txid: str, *, settle: bool = True) -> int | None:
        """Confirmations of a transaction of the watch-only wallet (0: in the mempool),
        None when the wallet does not have it or it lost to a conflict. `settle=False`:
        one look, for a caller that only wants to know whether it is there already."""
        for attempt in range(WALLET_LAG_POLLS if settle else 1):
            try:
                tx = await self._chain.call("gettransaction", txid)
            except BitcoindError as e:
                if e.code != -5:  # RPC_INVALID_ADDRESS_OR_KEY: not a wallet transaction
                    raise
                tx = None
            if tx is not None and tx.get("confirmations", 0) < 0:
                return None
            if tx is not None and tx.get("confirmations", 0) > 0:
                return tx["confirmations"]
            try:
                await self._node.call("getmempoolentry", txid)
                return 0
            except BitcoindError:
                pass
            # Neither in a block the wallet saw nor in the mempool: the wallet may not
            # have processed the newest block or transaction yet (Core notifies wallets
            # asynchronously); a few short looks before concluding it is gone.
            if settle:
                await self.stats.sleep(backoff(attempt + 1))
        return None

    def _transactions(self, stored: StoredVault) -> VaultTransactions:
        txid, vout = stored.outpoint.split(":")
        return build_vault_transactions(
            self.deployment, Coin(OutPoint(txid, int(vout)), stored.value, stored.index))

    async def _restore(self, txs: VaultTransactions | Iterable[RevaultTransaction]) -> None:
        """Put every verified signature from the store back on these transactions."""
        rtxs = (txs.unvault, *txs.revocations()) if isinstance(txs, VaultTransactions) else txs
        for rtx in rtxs:
            for index, sigs in (await self.store.signatures(rtx.txid)).items():
                rtx.signatures[index].update(sigs)

    async def _acks(self, txs: VaultTransactions) -> set[tuple[str, int]]:
        """The (txid, tower position) acks stored for this vault's revocations."""
        stored = await self.store.acks(r.txid for r in txs.revocations())
        return {(txid, t) for txid, key in stored for t, tower in enumerate(self._towers)
                if tower == key}

    def _secured(self, txs: VaultTransactions, acked: set[tuple[str, int]]) -> bool:
        try:
            SecuredVault.check(txs, self._tower_names, acked)
        except FlowError:
            return False
        return True

    @property
    def _tower_names(self) -> list[str]:
        return [t.name for t in self.config.watchtowers]

    async def _known_vault(self, outpoint: str) -> tuple[StoredVault, VaultTransactions]:
        try:
            canonical = str(OutPoint.parse(outpoint))
        except ValueError as e:
            raise WalletError(f"{outpoint!r}: not a \"txid:vout\" outpoint ({e})") from None
        stored = await self.store.vault(canonical)
        if stored is None:
            await self._discover()
            stored = await self.store.vault(canonical)
        if stored is None:
            raise WalletError(f"{canonical}: no vault at this outpoint (is it a deposit to "
                              f"this deployment of at least {self.min_deposit_value} sat?)")
        txs = self._transactions(stored)
        await self._restore(txs)
        return stored, txs

    def _role(self, key: ParticipantKey | None, role: str, verb: str) -> ParticipantKey:
        if key is None:
            raise WalletError(f"{verb} is for {role}s: this wallet's config has no "
                              f"{role}_key_file")
        return key

    # --- secure and activate ------------------------------------------------------------

    async def secure(self, outpoint: str, *, timeout: float = DEFAULT_FLOW_TIMEOUT) -> None:
        """Presign the vault's revocations, collect every stakeholder's signature, and
        hand each complete set to each watchtower of this wallet until all acked.
        Also brings a watchtower added to the config since up to date."""
        key = self._role(self.stakeholder, "stakeholder", "secure")
        stored, txs = await self._known_vault(outpoint)
        confirmations = await self._confirmations(stored.outpoint.split(":")[0])
        if not confirmations:
            raise FlowError(f"{stored.outpoint}: the deposit is not confirmed yet; secure it "
                            "once it has a confirmation")
        flow = SecureFlow(txs, stored.outpoint.split(":")[0], key.secret_at(stored.index),
                          self._tower_names, await self._acks(txs))
        await self._persist_rounds(flow.rounds.values())

        async def handle(action, outcome) -> list:
            if isinstance(action, FetchSigs):
                actions = flow.on_sigs(action.uid, outcome)
                await self._persist_rounds([flow.rounds[action.uid]])
                return actions
            if isinstance(action, SendToWatchtower):
                actions = flow.on_ack(action.tower, action.txid, outcome.ack, outcome.reason)
                fresh, flow.fresh_acks = flow.fresh_acks, []
                await self.store.add_acks((txid, self._towers[t]) for txid, t in fresh)
                if outcome.ack:
                    log.info("%s: watchtower %s acked %s", stored.outpoint,
                             self._tower_names[action.tower], action.txid)
                return actions
            return []

        def missing() -> str:
            try:
                SecuredVault.check(txs, self._tower_names, flow.acked)
            except FlowError as e:
                return str(e)
            return "nothing"

        await self._run(flow.start(), handle, lambda: flow.done, missing, timeout,
                        f"secure {stored.outpoint}")

    async def activate(self, outpoint: str, *, timeout: float = DEFAULT_FLOW_TIMEOUT) -> None:
        """Share this stakeholder's unvault signature, which is only made once every
        revocation is complete and acked by every watchtower of this wallet (else
        NotSecured, naming what is missing), and collect the others' until complete."""
        key = self._role(self.stakeholder, "stakeholder", "activate")
        stored, txs = await self._known_vault(outpoint)
        secured = SecuredVault.check(txs, self._tower_names, await self._acks(txs))
        round_ = ActivateFlow(secured, key.secret_at(stored.index))
        await self._collect(round_, timeout, f"activate {stored.outpoint}")

    async def _persist_rounds(self, rounds: Iterable[SignatureRound]) -> None:
        for r in rounds:
            await self.store.add_signatures(r.rtx.txid, 0, r.take_fresh())

    async def _collect(self, round_: SignatureRound, timeout: float, what: str) -> None:
        """Run one signature round to completion, persisting what it verifies."""
        await self._persist_rounds([round_])

        async def handle(action, outcome) -> list:
            if isinstance(action, FetchSigs):
                actions = round_.on_sigs(outcome)
                await self._persist_rounds([round_])
                return actions
            return []

        def missing() -> str:
            return "signatures of " + ", ".join(k.hex() for k in round_.rtx.missing_signatures(0))

        await self._run(round_.start(), handle, lambda: round_.complete, missing, timeout, what)

    # --- the action runner --------------------------------------------------------------

    async def _run(self, actions: list, handle, done: Callable[[], bool],
                   missing: Callable[[], str], timeout: float, what: str) -> None:
        """Perform actions concurrently (each after its `after` delay), feed each outcome
        to `handle`, which returns the next actions, until none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tasks: set[asyncio.Task] = set()

        def schedule(new: list) -> None:
            for action in new:
                tasks.add(asyncio.ensure_future(self._perform(action)))

        schedule(actions)
        # A watchtower that stays unreachable does not stop the signature rounds: the
        # other stakeholders may still need ours. Its error is raised at the end.
        unreachable: PeerUnavailable | None = None
        try:
            while tasks:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise FlowTimeout(f"{what}: gave up after {timeout:g}s, still waiting "
                                      f"for {missing()}; call it again to resume")
                finished, _ = await asyncio.wait(tasks, timeout=remaining,
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    tasks.discard(task)
                    try:
                        action, outcome = task.result()
                    except _TowerUnavailable as e:
                        unreachable = e.error
                        continue
                    schedule(await handle(action, outcome))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if unreachable is not None and not done():
            raise unreachable
        if not done():
            raise FlowError(f"{what}: stopped before completion; missing {missing()}")

    async def _perform(self, action) -> tuple[Any, Any]:
        if action.after:
            await self.stats.sleep(action.after)
        self.stats.daemon_calls += 1
        peers, sync = self._peers, self.config.sync_server
        match action:
            case PostSig(uid, pubkey, signature):
                outcome = await peers.call(sync, SyncServerClient,
                                           lambda c: c.sig(uid, pubkey, signature))
            case FetchSigs(uid):
                outcome = (await peers.call(sync, SyncServerClient,
                                            lambda c: c.get_sigs(uid))).signatures
            case ErrSig(uid):
                log.warning("err_sig %s: the sync server returned an invalid signature", uid)
                outcome = await peers.call(sync, SyncServerClient, lambda c: c.err_sig(uid))
            case SendToWatchtower(tower, txid, signatures, vault_txid):
                try:
                    outcome = await peers.call(
                        self.config.watchtowers[tower], WatchtowerClient,
                        lambda c: c.sig(signatures, txid, vault_txid))
                except PeerUnavailable as e:
                    raise _TowerUnavailable(e) from None
            case RequestSpend(vault_id, transaction, timestamp):
                outcome = await peers.call(
                    sync, SyncServerClient,
                    lambda c: c.request_spend(transaction, timestamp, vault_id))
            case FetchOpinions(vault_id):
                outcome = (await peers.call(sync, SyncServerClient,
                                            lambda c: c.get_spend_opinions(vault_id))).opinions
            case CosignerSign(cosigner, psbt, index, txid):
                endpoint = self.config.cosigners[cosigner]
                try:
                    result = await peers.call(endpoint, CosignerClient,
                                              lambda c: c.sign(psbt, index))
                except PeerUnavailable as e:
                    if isinstance(e.error, Refused):  # e.g. the outpoint signed for another spend
                        raise CosignerMisbehaved(endpoint.name, index, txid,
                                                 e.error.message) from None
                    raise
                outcome = bytes.fromhex(result.signature)
            case _:
                raise TypeError(f"unknown action {action!r}")
        return action, outcome

    # --- spend --------------------------------------------------------------------------

    async def spend(self, outpoints: Sequence[str], payees: Mapping[str, int], *,
                    feerate_sat_per_kwu: int = FEERATE_SAT_PER_KWU,
                    max_feerate_sat_per_kwu: int | None = MAX_SANE_FEERATE_SAT_PER_KWU,
                    cpfp_feerate_sat_per_kwu: int | None = None,
                    timeout: float = DEFAULT_FLOW_TIMEOUT) -> str:
        """Spend active vaults (one transaction for all of them) to `payees` (address ->
        sat); the spend's CPFP output comes first, the rest less the fee goes back to a
        deposit address as a new vault. Waits for every deployment watchtower's signed
        acceptance of this very txid, then every cosigner's signature; broadcasts the
        unvaults (with a CPFP child when `cpfp_feerate_sat_per_kwu`, or Core's estimate,
        is above their fixed feerate), waits the csv, then broadcasts the spend the same
        way and returns its txid. SpendRefused names who refused and why. Called again
        with the same vaults, it resumes the same spend."""
        key = self._role(self.manager, "manager", "spend")
        if not outpoints:
            raise WalletError("spend: give at least one vault outpoint")
        vaults = []
        for outpoint in outpoints:
            vaults.append(await self._known_vault(outpoint))
        canonical = [stored.outpoint for stored, _ in vaults]
        if len(set(canonical)) != len(canonical):
            raise WalletError("spend: the same vault twice")
        existing = await self.store.spend_of(canonical)
        if existing is None:
            spend = await self._new_spend(vaults, payees, key, feerate_sat_per_kwu,
                                          max_feerate_sat_per_kwu)
            stage, timestamp = SPEND_STAGES[0], int(time.time())
            await self.store.add_spend(spend.txid, spend.tx.to_base64(), timestamp, canonical)
            for i, sigs in enumerate(spend.signatures):
                await self.store.add_signatures(spend.txid, i, sigs)
            log.info("spend %s of %s: built and signed", spend.txid, ", ".join(canonical))
        else:
            spend = self._rebuild_spend(vaults, existing.tx)
            await self._restore([spend])
            stage, timestamp = existing.stage, existing.timestamp

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if stage == "requested":
            await self._approve_and_cosign(spend, vaults, timestamp, deadline - loop.time())
            stage = "cosigned"
            await self.store.set_spend_stage(spend.txid, stage)
        if stage == "cosigned":
            target = await self._cpfp_target(cpfp_feerate_sat_per_kwu)
            for _, txs in vaults:
                await self._broadcast_bumped(txs.unvault, target)
            stage = "unvaulted"
            await self.store.set_spend_stage(spend.txid, stage)
        if stage == "unvaulted":
            await self._wait_csv([txs.unvault.txid for _, txs in vaults], deadline)
            await self._broadcast_bumped(spend, await self._cpfp_target(cpfp_feerate_sat_per_kwu))
            stage = "broadcast"
            await self.store.set_spend_stage(spend.txid, stage)
        return spend.txid

    async def _new_spend(self, vaults, payees: Mapping[str, int], key: ParticipantKey,
                         feerate: int, max_feerate: int | None) -> RevaultTransaction:
        d = self.deployment
        if d.managers_threshold > 1:
            raise WalletError(
                f"spend: the deployment needs {d.managers_threshold} managers' signatures; "
                "this wallet holds one manager key and can only spend alone in a "
                "deployment with managers_threshold = 1")
        for stored, txs in vaults:
            if not txs.unvault.is_complete():
                await self._refresh_unvault(txs)
            if not txs.unvault.is_complete():
                raise WalletError(f"spend: vault {stored.outpoint} is not active (its unvault "
                                  "lacks stakeholders' signatures)")
        outputs = []
        for address, value in payees.items():
            try:
                outputs.append(TxOut.to_address(address, value, d.network))
            except ValueError as e:
                raise WalletError(f"spend: payee {address!r}: {e}") from None
        coins = [txs.unvault.output_coin(0) for _, txs in vaults]
        try:
            spend = build_spend(d, coins, outputs,
                                change_index=max(stored.index for stored, _ in vaults),
                                feerate_sat_per_kwu=feerate, max_feerate_sat_per_kwu=max_feerate)
        except TransactionError as e:
            raise WalletError(str(e)) from None
        for i, (stored, _) in enumerate(vaults):
            spend.sign(i, key.secret_at(stored.index))
        return spend

    def _rebuild_spend(self, vaults, tx_base64: str) -> RevaultTransaction:
        """The stored spend with what signing needs (the spent outputs and scripts)."""
        tx = Tx.from_base64(tx_base64)
        coins = [txs.unvault.output_coin(0) for _, txs in vaults]
        spent = [_spend_input(self.deployment, c) for c in coins]
        spend = RevaultTransaction(Kind.SPEND, tx, spent, max(c.index for c in coins))
        if [i.outpoint for i in tx.inputs] != [c.outpoint for c in coins]:
            raise WalletError(f"stored spend {tx.txid} does not spend these vaults")
        return spend

    async def _refresh_unvault(self, txs: VaultTransactions) -> None:
        """Fetch the unvault's signatures once (a manager learns a vault is active)."""
        round_ = SignatureRound(txs.unvault)
        signatures = (await self._peers.call(
            self.config.sync_server, SyncServerClient,
            lambda c: c.get_sigs(round_.uid))).signatures
        round_.on_sigs(signatures)
        await self._persist_rounds([round_])

    async def _approve_and_cosign(self, spend: RevaultTransaction, vaults, timestamp: int,
                                  timeout: float) -> None:
        d = self.deployment
        cosigners = [[d.keys(stored.index).cosigners[c] for stored, _ in vaults]
                     for c in range(len(d.cosigners))]
        vault_ids = [tx_uid(stored.outpoint.split(":")[0]) for stored, _ in vaults]
        flow = SpendFlow(spend, vault_ids, timestamp, d.watchtowers, cosigners)

        async def handle(action, outcome) -> list:
            if isinstance(action, FetchOpinions):
                actions = flow.on_opinions(action.vault_id, outcome)
                if flow.approved and actions:
                    log.info("spend %s: accepted by every watchtower", spend.txid)
                return actions
            if isinstance(action, CosignerSign):
                name = self.config.cosigners[action.cosigner].name
                actions = flow.on_cosignature(action.cosigner, name, action.index, outcome)
                await self.store.add_signatures(
                    spend.txid, action.index,
                    {flow.cosigners[action.cosigner][action.index]: outcome})
                return actions
            return []

        def missing() -> str:
            waiting = sorted(flow.watchtowers - flow.accepted)
            if waiting:
                return "the acceptance of watchtower(s) " + ", ".join(waiting)
            return "cosigner signatures"

        start = flow.start() if not flow.done else []
        await self._run(start, handle, lambda: flow.done, missing, timeout,
                        f"spend {spend.txid}")

    async def _cpfp_target(self, feerate: int | None) -> int | None:
        """The feerate (sat/kWU) an unvault or spend must reach: the caller's, else
        Core's 6-block estimate, else None (no estimate: regtest, a fresh node)."""
        if feerate is not None:
            return feerate
        estimate = await self._node.call("estimatesmartfee", 6)
        if "feerate" not in estimate:
            return None
        return int(Decimal(estimate["feerate"]) * 100_000_000 / 4)  # BTC/kvB -> sat/kWU

    async def _broadcast_bumped(self, rtx: RevaultTransaction, target: int | None) -> None:
        """Broadcast a complete unvault or spend; when its own feerate is under `target`,
        with a CPFP child spending its CPFP output, signed with this manager's CPFP key,
        the two submitted as a package."""
        tx = rtx.finalize()
        if target is None or 1000 * rtx.fee >= target * tx.weight:
            await self._broadcast(tx, rtx.kind.value)
            return
        if await self._confirmations(tx.txid, settle=False) is not None:
            return  # already in (a resumed spend): its child went with it
        key = self._role(self.cpfp, "manager", "CPFP")
        parent = CpfpParent.of(rtx)
        coins = [c for c in await self._cpfp_wallet_coins()
                 if c.outpoint != parent.cpfp_output.outpoint]
        try:
            package = build_cpfp(self.deployment, [parent], coins, target,
                                 change_index=rtx.vault_index)
        except (FeeBumpError, TransactionError) as e:
            raise FlowError(f"{rtx.kind.value} {tx.txid}: cannot CPFP it to {target} "
                            f"sat/kWU: {e}") from None
        child = package.child
        indexes = [rtx.vault_index] + [c.index for c in package.wallet_coins]
        for i, index in enumerate(indexes):
            child.sign(i, key.secret_at(index))
        try:
            await submit_package(self._node, [tx.to_hex(), child.finalize().to_hex()])
        except PackageRejected as e:
            raise FlowError(f"{rtx.kind.value} {tx.txid}: bitcoind refused it with its CPFP "
                            f"child: {e}") from None
        log.info("%s %s broadcast with CPFP child %s (package at %d sat/kWU)",
                 rtx.kind.value, tx.txid, child.txid, package.feerate_sat_per_kwu)

    async def _emergency_of(self, stored: StoredVault, state: str,
                            candidates: list[RevaultTransaction],
                            unvault_txid: str) -> tuple[bool, str]:
        """(True, txid moving the vault to the emergency address) or (False, why not).
        The first candidate is what the wallet's view calls for; when Core refuses it
        because the deposit was unvaulted meanwhile (the view lags the node), the
        unvault-emergency follows."""
        for rtx in candidates:
            if not rtx.is_complete():
                return False, f"{stored.outpoint} ({state}: {rtx.kind.value} not fully signed)"
            spent = str(rtx.tx.inputs[0].outpoint)
            try:
                await self._broadcast(rtx.finalize(), rtx.kind.value)
                return True, rtx.txid
            except FlowError as e:
                error = e
            # Already replaced by a watchtower's bumped copy (same outputs)?
            spender = await self._spender(spent)
            if spender is not None and self.deployment.emergency_script_pubkey in spender.outputs:
                return True, spender.txid
            if spender is None or spender.txid != unvault_txid:
                break  # spent by something else: nothing pre-signed follows
        return False, f"{stored.outpoint} ({error})"

    async def _spender(self, outpoint: str) -> _WalletTx | None:
        """The transaction spending `outpoint`: the node's mempool first (synchronous
        with what was just refused as a conflict), else what the wallet saw mined."""
        txid, vout = outpoint.split(":")
        [entry] = await self._node.call("gettxspendingprevout",
                                        [{"txid": txid, "vout": int(vout)}])
        if "spendingtxid" in entry:
            raw = await self._node.call("getrawtransaction", entry["spendingtxid"], True)
            return _WalletTx(raw["txid"], tuple(f"{i['txid']}:{i['vout']}" for i in raw["vin"]),
                             tuple(bytes.fromhex(o["scriptPubKey"]["hex"]) for o in raw["vout"]))
        return (await self._discover()).spenders.get(outpoint)

    async def _cpfp_wallet_coins(self) -> list[Coin]:
        """Confirmed coins of the managers' CPFP wallet (CPFP-script outputs the
        watch-only wallet sees: funded by the operator, or confirmed unvaults' and
        children's change), each with the vault index of its script."""
        window = await self._window()
        by_address = {self.deployment.cpfp_address(i): i for i in window}
        coins = []
        for u in await self._chain.call("listunspent", 1, 9_999_999):
            index = by_address.get(u.get("address"))
            if index is not None:
                coins.append(Coin(OutPoint(u["txid"], u["vout"]), _sats(u["amount"]), index))
        return coins

    async def _broadcast(self, tx: Tx, what: str) -> None:
        try:
            await self._node.call("sendrawtransaction", tx.to_hex())
        except BitcoindError as e:
            if e.code != RPC_VERIFY_ALREADY_IN_CHAIN:
                raise FlowError(f"{what} {tx.txid}: bitcoind refused it: {e.message}") from None
        log.info("%s %s broadcast", what, tx.txid)

    async def _wait_csv(self, unvault_txids: Sequence[str], deadline: float) -> None:
        """Until every unvault has `unvault_csv` confirmations (BIP 68: the spend may be
        mined in the next block), polling the node with a bounded backoff."""
        loop = asyncio.get_running_loop()
        csv = self.deployment.unvault_csv
        attempt = 0
        while True:
            # The unvault output as the node's chainstate (and mempool) has it: no wallet lag.
            outputs = [await self._node.call("gettxout", t, 0, True) for t in unvault_txids]
            if any(out is None for out in outputs):
                gone = [t for t, out in zip(unvault_txids, outputs) if out is None]
                raise FlowError(f"the unvault output of {', '.join(gone)} is spent or gone: "
                                "was the vault cancelled?")
            depths = [out["confirmations"] for out in outputs]
            if min(depths) >= csv:
                return
            attempt += 1
            pause = backoff(attempt)
            if loop.time() + pause > deadline:
                raise FlowTimeout(f"unvaults have {min(depths)} of the {csv} confirmations the "
                                  "spend needs; call spend() again to resume")
            await self.stats.sleep(pause)

    # --- emergency ----------------------------------------------------------------------

    async def emergency(self) -> list[str]:
        """Broadcast the emergency of every vault still deposited and the
        unvault-emergency of every vault unvaulting. Returns the txids now moving
        vaults to the emergency address (a watchtower may have bumped one first: its
        txid is returned then). After doing all it can, raises FlowError naming any
        vault it could not move (never secured: no complete emergency exists for it)."""
        self._role(self.stakeholder, "stakeholder", "emergency")
        view = await self._discover()
        sent, stuck = [], []
        for stored in await self.store.vaults():
            txs = self._transactions(stored)
            state = await self._state(stored, txs, view)
            await self._restore(txs)
            if state in ("funded", "secured", "active"):
                candidates = [txs.emergency, txs.unvault_emergency]
            elif state == "unvaulting":
                candidates = [txs.unvault_emergency]
            else:
                continue
            outcome = await self._emergency_of(stored, state, candidates, txs.unvault.txid)
            (sent if outcome[0] else stuck).append(outcome[1])
        if stuck:
            raise FlowError(f"emergency: broadcast {len(sent)} transaction(s) but could not "
                            "move " + "; ".join(stuck))
        return sent


def _spend_input(d: Deployment, unvault: Coin) -> SpentOutput:
    """How a spend's input spends an unvault output: the managers' branch, ALL."""
    keys = d.keys(unvault.index)
    script = keys.unvault_script()
    return SpentOutput(unvault.value, p2wsh(script), script, SpendPath.UNVAULT_MANAGERS,
                       Kind.SPEND.sighash_type, keys)


def _sats(amount: Decimal) -> int:
    """Bitcoin Core's BTC amount (a Decimal, never a float) in satoshis."""
    return int(Decimal(amount) * 100_000_000)
