"""`revault-watchtower`: stores verified revocations, judges spends, cancels the rest.

A watchtower is paired with one wallet (`wallet_noise_key`, the only peer it serves).
The wallet sends it every revocation transaction of a vault with all the stakeholders'
signatures (`sig`); the watchtower finds the deposit on chain, rebuilds the vault's
transactions from the `[deployment]`, checks every signature and that its fee reserve
can bump the transaction to `max_feerate`, stores it durably, and only then acks. From
then on the vault is guarded: any unvault of it that no spend accepted by this
watchtower follows is cancelled at once, bumped from the reserve.

Pieces (each its own module): `watchtower_guard` (what to do, pure), `watchtower_chain`
(bitcoind and ZMQ into the guard), `watchtower_policy` (spend verdicts, pure),
`fee_reserve` (Core's wallet signs the fee inputs), `watchtower_store` (SQLite). This
module reads the config and runs them: the `sig` method, the chain loop, the
spend-request loop, and the `reserve` and `emergency` commands.

Usage: `revault-watchtower --config FILE [reserve | emergency]`
(see contrib/watchtower.sample.toml for every key).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import coincurve

from revault import metrics
from revault.bitcoind import BitcoindClient, BitcoindError, BitcoindUnreachable, read_bitcoind_config
from revault.config import ConfigError, ConfigTable, ProblemCollector, parse_host_port
from revault.daemon import CommonConfig, run_daemon
from revault.deployment import Deployment, read_deployment
from revault.fee_reserve import (
    SAT_PER_VB_TO_KWU, Bump, FeeReserve, ReserveError, Revocation, max_reachable_feerate,
    plan_bump, sat, target_feerate,
)
from revault.fees import FeeBumpError, FeeCoin, Replaced
from revault.keys import KeyFileError, read_key_file
from revault.clients import SyncServerClient
from revault.errors import WireError
from revault.messages import (
    WALLET, WATCHTOWER_METHODS, SpendRequest, WatchtowerSigParams, WatchtowerSigResult,
    sign_opinion,
)
from revault.primitives import OutPoint, tx_uid
from revault.rpc import Caller, Dispatcher, ProtocolError
from revault.transactions import (
    Coin, SignatureError, TransactionError, Tx, build_unvault, build_vault_transactions,
)
from revault.transport import TransportError
from revault.watchtower_chain import ChainFollower, ZmqListener
from revault.watchtower_guard import (
    RETIRE_DEPTH, Alarm, Cancel, ChainTx, ConsiderRebump, Guard, GuardedVault, Retire,
    SpenderKind, outputs_of,
)
from revault.watchtower_policy import (
    Policy, PolicyConfig, SpendFacts, load_plugins, payees_of, read_policy,
)
from revault.watchtower_store import (
    DATABASE_NAME, StoredRevocation, StoredVault, Verdict, WatchtowerStore, status_summary,
)

log = logging.getLogger("revault.watchtower")

NAME = "watchtower"
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_REQUESTS_PER_SECOND = 10.0
# With xpubs, a deposit's derivation index is found by trying the next indexes after the
# highest one guarded so far.
XPUB_LOOKAHEAD = 200
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
RETRY_FAILED_AFTER = 5.0  # seconds before a failed broadcast is tried again
ZMQ_TOPICS = ("rawtx", "rawblock", "sequence")
DAY = 86_400


# --- config -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BitcoindConfig:
    host: str
    port: int
    wallet: str
    cookie_file: Path | None = None
    rpc_user: str | None = None
    rpc_password: str | None = field(default=None, repr=False)
    zmq: dict[str, str] = field(default_factory=dict)  # topic -> endpoint

    def client(self) -> BitcoindClient:
        return BitcoindClient(self.port, host=self.host, user=self.rpc_user,
                              password=self.rpc_password, cookie_file=self.cookie_file)


@dataclass(frozen=True)
class SyncServerPeer:
    host: str
    port: int
    noise_key: bytes


@dataclass(frozen=True)
class WatchtowerConfig:
    common: CommonConfig
    opinion_key_file: Path
    wallet_noise_key: bytes
    sync_server: SyncServerPeer
    bitcoind: BitcoindConfig
    poll_interval: float
    max_feerate: int  # sat/vB
    policy: PolicyConfig
    deployment: Deployment

    @property
    def max_feerate_kwu(self) -> int:
        return self.max_feerate * SAT_PER_VB_TO_KWU


def _read_bitcoind(t: ConfigTable, base: Path, p: ProblemCollector) -> BitcoindConfig | None:
    # RPC address and login: the one `[bitcoind]` reader every part shares.
    node = p.read(read_bitcoind_config, t, base)
    if node is not None and node.wallet is None:
        p.add(f"{t.key_name('wallet')}: missing (the fee reserve wallet needs a name)")
    zmq = {}
    for topic in ZMQ_TOPICS:
        endpoint = p.read(t.string, f"zmq_{topic}", None)
        if endpoint is None:
            continue
        if not endpoint.startswith("tcp://"):
            p.add(f"{t.key_name('zmq_' + topic)}: expected tcp://HOST:PORT, got {endpoint!r}")
            continue
        if p.read(parse_host_port, endpoint[len("tcp://"):], t.key_name("zmq_" + topic)):
            zmq[topic] = endpoint
    if node is None or node.wallet is None:
        return None
    return BitcoindConfig(host=node.host, port=node.port, wallet=node.wallet,
                          cookie_file=node.cookie_file, rpc_user=node.user,
                          rpc_password=node.password, zmq=zmq)


def read_config(table: ConfigTable, base: Path) -> WatchtowerConfig:
    p = ProblemCollector()
    common = p.read(CommonConfig.read, table, base,
                    requests_per_second=DEFAULT_REQUESTS_PER_SECOND)
    opinion_key_file = p.read(table.path, "opinion_key_file", base)
    wallet_noise_key = p.read(table.noise_key, "wallet_noise_key")
    poll_interval = p.read(table.number, "poll_interval", minimum=0.05, maximum=3600,
                           default=DEFAULT_POLL_INTERVAL)
    sync_server = None
    s = p.read(table.table, "sync_server")
    if s is not None:
        host = p.read(s.string, "host")
        port = p.read(s.integer, "port", minimum=1, maximum=65535)
        key = p.read(s.noise_key, "noise_key")
        if None not in (host, port, key):
            sync_server = SyncServerPeer(host, port, key)
    bitcoind = None
    b = p.read(table.table, "bitcoind")
    if b is not None:
        bitcoind = _read_bitcoind(b, base, p)
    max_feerate = None
    f = p.read(table.table, "fees")
    if f is not None:
        max_feerate = p.read(f.integer, "max_feerate", minimum=1, maximum=100_000)
    deployment = None
    d = p.read(table.table, "deployment")
    if d is not None:
        deployment = read_deployment(d, p)
        if deployment is not None and deployment.emergency_address is None:
            p.add(f"{d.key_name('emergency_address')}: missing (a watchtower stores and "
                  "broadcasts emergency transactions)")
    policy = p.read(read_policy, p.read(table.table, "policy", {}) or ConfigTable({}, "policy"),
                    deployment.network if deployment else None)
    p.finish()
    return WatchtowerConfig(common=common, opinion_key_file=opinion_key_file,
                            wallet_noise_key=wallet_noise_key, sync_server=sync_server,
                            bitcoind=bitcoind, poll_interval=poll_interval,
                            max_feerate=max_feerate, policy=policy, deployment=deployment)


# --- the watchtower --------------------------------------------------------------------------

def guarded_vault(stored: StoredVault, accepted: frozenset[str] = frozenset()) -> GuardedVault:
    deposit = stored.deposit
    return GuardedVault(
        deposit=(deposit.txid, deposit.vout), value=stored.value, index=stored.index,
        vault_id=tx_uid(deposit.txid), unvault_txid=stored.unvault_txid,
        revocations={kind: (output,) for kind, output in stored.revocation_outputs.items()},
        accepted_spends=frozenset(accepted))


def revocation_of(stored: StoredRevocation) -> Revocation:
    return Revocation(stored.kind, Tx.from_bytes(stored.signed_tx), stored.spent_value,
                      stored.spent_script)


def short(vault: GuardedVault) -> str:
    return f"{vault.deposit[0]}:{vault.deposit[1]}"


@dataclass
class PendingBump:
    """A bumped revocation of ours in the mempool."""

    bump: Bump
    height: int  # the tip it was broadcast at
    first_height: int  # the tip its first broadcast (before any re-bump) was at
    confirmed: bool = False  # seen mined (and counted in the metrics)


# What the metrics call a vault, from what the chain shows of it (a fixed set of labels).
VAULT_STATES = ("active", "unvaulting", "cancelling", "cancelled", "spending", "spent",
                "emergency", "foreign_spend")


def vault_state(vault: GuardedVault) -> str:
    deposit, unvault = vault.deposit_spender, vault.unvault_spender
    if deposit is None:
        return "active"
    if deposit.kind is SpenderKind.EMERGENCY:
        return "emergency"
    if deposit.kind is not SpenderKind.UNVAULT:
        return "foreign_spend"
    if unvault is None:
        return "unvaulting"
    if unvault.kind is SpenderKind.CANCEL:
        return "cancelling" if unvault.height is None else "cancelled"
    if unvault.kind is SpenderKind.ACCEPTED_SPEND:
        return "spending" if unvault.height is None else "spent"
    if unvault.kind is SpenderKind.UNVAULT_EMERGENCY:
        return "emergency"
    return "foreign_spend"


class Backoff:
    def __init__(self) -> None:
        self.delay = BACKOFF_MIN

    def next(self) -> float:
        delay, self.delay = self.delay, min(BACKOFF_MAX, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = BACKOFF_MIN


class Watchtower:
    """Everything the daemon runs, around one guard."""

    def __init__(self, config: WatchtowerConfig, store: WatchtowerStore, opinion_key: bytes,
                 noise_private: bytes):
        self.config = config
        self.deployment = config.deployment
        self.store = store
        self.opinion_key = opinion_key
        self.opinion_pubkey = coincurve.PrivateKey(opinion_key).public_key.format(True).hex()
        self.noise_private = noise_private
        self.node = config.bitcoind.client()
        self.reserve = FeeReserve(self.node.for_wallet(config.bitcoind.wallet))
        self.guard = Guard()
        self.chain = ChainFollower(
            self.node, self.guard,
            rescan_depth=RETIRE_DEPTH + self.deployment.unvault_csv + 6)
        self.policy = Policy(config.policy, self.deployment, load_plugins(config.policy.plugins))
        self.pending: dict[GuardedVault, PendingBump] = {}
        self.failed: dict[GuardedVault, float] = {}
        # (vault_id, spend txid) of the opinions posted by this run
        self.posted: set[tuple[str, str]] = set()
        self.wake_event = asyncio.Event()
        self.react_lock = asyncio.Lock()
        self.bitcoind_down_since: float | None = None
        self.last_sync_poll: float | None = None
        self._deposit_scripts: dict[bytes, int] = {}
        self._lookahead_to = -1
        self._highest_index = -1  # of the vaults guarded: where the xpub lookahead starts
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        accepted = await self.store.accepted_spends()
        for stored in self.store.iter_vaults():
            self.guard.add(guarded_vault(stored, accepted.get(stored.deposit, frozenset())))
            self._highest_index = max(self._highest_index, stored.index)
        log.info("%d guarded vaults loaded, opinion key %s, policy: %s", len(self.guard),
                 self.opinion_pubkey,
                 "default (refuse every spend)" if not self.config.policy.has_rules
                 else self.config.policy)

    async def revocation(self, vault: GuardedVault, kind: str) -> Revocation:
        stored = await self.store.revocation(OutPoint(*vault.deposit), kind)
        if stored is None:
            raise TransactionError(f"no {kind} stored for vault {short(vault)}")
        return revocation_of(stored)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.follow_chain(), name="chain"))
        self._tasks.append(loop.create_task(self.poll_spend_requests(), name="spend requests"))
        if self.config.bitcoind.zmq:
            listener = ZmqListener(self.config.bitcoind.zmq, self.chain, self._on_touched,
                                   self.wake)
            self._tasks.append(loop.create_task(self._run_zmq(listener), name="zmq"))

    async def close(self) -> None:
        self._stopping = True
        self.wake()
        # Cancel until every loop is done: a cancellation can be lost when it races a
        # timeout's completion (asyncio.wait_for before Python 3.12), so ask again.
        pending = [t for t in self._tasks if not t.done()]
        while pending:
            for task in pending:
                task.cancel()
            _, still = await asyncio.wait(pending, timeout=1.0)
            pending = list(still)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s loop ended with %r", task.get_name(), task.exception())
        await self.store.close()

    def wake(self) -> None:
        self.wake_event.set()

    def _on_touched(self, vaults: list[GuardedVault]) -> None:
        self.wake()

    async def _run_zmq(self, listener: ZmqListener) -> None:
        backoff = Backoff()
        while True:
            try:
                await listener.run()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("ZMQ listener stopped (%s: %s); polling continues, retrying",
                          type(e).__name__, e)
                await asyncio.sleep(backoff.next())

    # --- sig from the wallet -----------------------------------------------------------------

    def deposit_index(self, script_pubkey: bytes) -> int | None:
        """The vault index whose deposit script this is, or None."""
        d = self.deployment
        if not d.uses_xpubs:
            if not self._deposit_scripts:
                self._deposit_scripts[d.deposit_script_pubkey(0)] = 0
            return self._deposit_scripts.get(script_pubkey)
        while self._lookahead_to < self._highest_index + XPUB_LOOKAHEAD:
            self._lookahead_to += 1
            self._deposit_scripts[d.deposit_script_pubkey(self._lookahead_to)] = \
                self._lookahead_to
        return self._deposit_scripts.get(script_pubkey)

    async def on_sig(self, caller: Caller, p: WatchtowerSigParams) -> WatchtowerSigResult:
        try:
            reason = await self._check_and_store(p)
        except BitcoindUnreachable as e:
            reason = f"cannot check the deposit: bitcoind unreachable ({e})"
        except BitcoindError as e:  # e.g. still loading its block index after a restart
            reason = f"cannot check the deposit: {e}"
        if reason is None:
            return WatchtowerSigResult(ack=True, txid=p.txid)
        log.info("sig for revocation %s of vault tx %s refused: %s", p.txid, p.vault_txid,
                 reason)
        return WatchtowerSigResult(ack=False, txid=p.txid, reason=reason)

    async def _check_and_store(self, p: WatchtowerSigParams) -> str | None:
        """None once stored durably, or why the revocation is refused."""
        try:
            funding = await self.node.call("getrawtransaction", p.vault_txid, True)
        except BitcoindError as e:
            if e.code == -5:
                return "deposit unknown: the node knows no transaction vault_txid"
            raise
        candidates = []
        for out in funding["vout"]:
            index = self.deposit_index(bytes.fromhex(out["scriptPubKey"]["hex"]))
            if index is not None:
                candidates.append((out["n"], sat(out["value"]), index))
        if not candidates:
            return "deposit unknown: vault_txid pays no deposit script of this deployment"
        if funding.get("confirmations", 0) < 1:
            return "deposit unconfirmed"
        match = None
        too_small = None
        for vout, value, index in candidates:
            if value < self.deployment.min_deposit_value:
                too_small = (f"deposit of {value} sat is under min_deposit_value "
                             f"({self.deployment.min_deposit_value} sat): not a vault")
                continue
            try:
                txs = build_vault_transactions(
                    self.deployment, Coin(OutPoint(p.vault_txid, vout), value, index))
            except TransactionError:
                continue
            for revocation in txs.revocations():
                if revocation.txid == p.txid:
                    match = (vout, value, index, txs, revocation)
        if match is None:
            return too_small or "txid matches none of this vault's revocation transactions"
        vout, value, index, txs, revocation = match
        if await self.node.call("gettxout", p.vault_txid, vout, True) is None:
            return "deposit already spent"
        signers = revocation.signers(0)
        given = {bytes.fromhex(k): bytes.fromhex(v) for k, v in p.signatures.items()}
        for key in given:
            if key not in signers:
                return f"signatures.{key.hex()}: not a stakeholder key of this vault"
        for key in signers:
            if key not in given:
                return f"signatures: missing the signature of stakeholder {key.hex()}"
            try:
                revocation.add_signature(0, key, given[key])
            except SignatureError as e:
                return f"signatures.{key.hex()}: {e}"
        signed = revocation.finalize()
        spent = revocation.spent[0]
        stored = StoredRevocation(
            kind=revocation.kind.value, txid=revocation.txid, signed_tx=signed.serialize(),
            spent_value=spent.value, spent_script=spent.script_pubkey,
            output_value=signed.outputs[0].value, output_script=signed.outputs[0].script_pubkey)
        try:
            coins = await self.reserve.coins(exclude=self._pending_coins())
            plan_bump(revocation_of(stored), coins, self.config.max_feerate_kwu)
        except FeeBumpError as e:
            return (f"the fee reserve cannot bump it to max_feerate "
                    f"{self.config.max_feerate} sat/vB: {e}")
        except (BitcoindError, ReserveError) as e:
            return f"the fee reserve wallet is not usable: {e}"
        deposit = OutPoint(p.vault_txid, vout)
        new = await self.store.put_revocation(deposit, value, index, txs.unvault.txid, stored)
        self._highest_index = max(self._highest_index, index)
        vault = self.guard.add(guarded_vault(StoredVault(
            deposit, value, index, txs.unvault.txid, "guarded",
            {stored.kind: (stored.output_value, stored.output_script)})))
        log.info("vault %s (index %d, %d sat): %s %s verified and stored%s", deposit, index,
                 value, stored.kind, stored.txid, "" if new else " (already stored)")
        if not vault.busy:
            await self.see_deposit_spender(vault)
        if vault.busy:
            self.wake()
        return None

    async def see_deposit_spender(self, vault: GuardedVault) -> None:
        """Show the guard what spends the vault's deposit in the mempool. An unvault that
        entered the mempool between the deposit check above and the vault's guarding was
        shown to the guard when it matched nothing, and would otherwise only be seen
        once mined."""
        try:
            [entry] = await self.node.call("gettxspendingprevout",
                                           [{"txid": vault.deposit[0], "vout": vault.deposit[1]}])
            if "spendingtxid" in entry:
                raw = await self.node.call("getrawtransaction", entry["spendingtxid"])
                self.chain.see_raw(bytes.fromhex(raw))
        except BitcoindError as e:  # gone since: the chain loop sees it if it is mined
            log.warning("vault %s: cannot read what spends its deposit: %s", short(vault), e)

    # --- the chain ---------------------------------------------------------------------------

    async def follow_chain(self) -> None:
        backoff = Backoff()
        while not self._stopping:
            try:
                if not self.chain.started:
                    await self.reserve.ensure_loaded()
                    await self.chain.start(await self.store.tip())
                    changed = True
                else:
                    changed = await self.chain.sync_blocks()
                    await self.chain.sync_mempool()
                await self.react(new_block=changed)
                if changed:
                    await self.store.set_tip(*self.chain.tip)
                    await self.update_reserve_metrics()
                if self.bitcoind_down_since is not None:
                    log.warning("bitcoind is back after %.0f s: guarding %d vaults again",
                                time.monotonic() - self.bitcoind_down_since, len(self.guard))
                    self.bitcoind_down_since = None
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except (BitcoindUnreachable, BitcoindError, ReserveError) as e:
                if self.bitcoind_down_since is None:
                    self.bitcoind_down_since = time.monotonic()
                delay = backoff.next()
                log.error("BITCOIND UNUSABLE, NO VAULT IS PROTECTED: %s (retrying in %.0f s)",
                          e, delay)
                await asyncio.sleep(delay)
                continue
            except Exception:
                log.exception("chain loop failed; retrying")
                await asyncio.sleep(backoff.next())
                continue
            try:
                async with asyncio.timeout(self.config.poll_interval):
                    await self.wake_event.wait()
            except TimeoutError:
                pass
            self.wake_event.clear()

    async def react(self, new_block: bool) -> None:
        async with self.react_lock:
            tip = self.chain.tip[0]
            self._count_confirmed_cancels()
            for action in self.guard.decide_all(tip):
                vault = action.vault
                try:
                    if isinstance(action, Cancel):
                        failed_at = self.failed.get(vault)
                        if failed_at is not None and not new_block \
                                and time.monotonic() - failed_at < RETRY_FAILED_AFTER:
                            continue
                        await self.cancel(action, tip)
                    elif isinstance(action, ConsiderRebump):
                        if new_block:
                            await self.rebump(action, tip)
                    elif isinstance(action, Retire):
                        await self.store.retire(OutPoint(*vault.deposit), action.reason)
                        self.guard.remove(vault)
                        self.pending.pop(vault, None)
                        log.info("vault %s retired: %s, %d blocks deep", short(vault),
                                 action.reason, RETIRE_DEPTH)
                    elif isinstance(action, Alarm):
                        vault.alarmed = True
                        log.critical("vault %s: %s", short(vault), action.message)
                except BitcoindUnreachable:
                    raise
                except (BitcoindError, ReserveError, FeeBumpError, TransactionError) as e:
                    self.failed[vault] = time.monotonic()
                    log.error("vault %s: %s failed: %s", short(vault),
                              type(action).__name__.lower(), e)
                except Exception:
                    # Whatever goes wrong with one vault (a bug, an answer we did not
                    # expect) must not keep the next vaults' cancels from going out.
                    self.failed[vault] = time.monotonic()
                    log.exception("vault %s: %s failed", short(vault),
                                  type(action).__name__.lower())

    async def target_feerate(self) -> int:
        """sat/kWU: what estimatesmartfee gives for the next blocks or what the node's
        mempool takes, at most max_feerate, at least the minimum relay feerate."""
        return target_feerate(await self.node.call("getmempoolinfo"),
                              await self.node.call("estimatesmartfee", 2),
                              self.config.max_feerate_kwu)

    def _pending_coins(self, but: GuardedVault | None = None) -> set[tuple[str, int]]:
        return {(c.outpoint.txid, c.outpoint.vout)
                for v, p in self.pending.items() if v is not but for c in p.bump.coins}

    async def _in_mempool(self, txid: str) -> bool:
        try:
            await self.node.call("getmempoolentry", txid)
            return True
        except BitcoindError:
            return False

    async def _replaced(self, txid: str | None) -> Replaced | None:
        """What a replacement of mempool transaction `txid` must outbid: its fee with its
        descendants' (all evicted with it) over its own weight; None if it is gone."""
        if txid is None:
            return None
        try:
            entry = await self.node.call("getmempoolentry", txid)
        except BitcoindError:
            return None
        return Replaced(fee=sat(entry["fees"]["descendant"]), weight=entry["weight"])

    async def cancel(self, action: Cancel, tip: int) -> None:
        vault = action.vault
        await self._free_evicted(vault)
        revocation = await self.revocation(vault, action.kind)
        target = await self.target_feerate()
        # Short of coins (many unvaults at once), better the revocation at what the
        # reserve has left, down to its own 253 sat/kWU, than nothing at all.
        bump = await self.reserve.bump(
            revocation, target, replaces=await self._replaced(action.replaces),
            exclude=self._pending_coins(vault), best_effort=True)
        if 1000 * bump.fee < target * bump.selection.max_weight:
            log.error("vault %s: the fee reserve cannot bump the %s to %.1f sat/vB; "
                      "broadcasting it at what it can reach", short(vault), action.kind,
                      target / SAT_PER_VB_TO_KWU)
        await self._broadcast(vault, action.kind, bump, tip, action.reason)

    async def _free_evicted(self, vault: GuardedVault) -> None:
        """A bump of ours that left the mempool unmined (evicted by a fee spike, or
        replaced by someone else's) still holds its reserve coins in the wallet's eyes:
        abandon it so that they can bump the next one."""
        previous = self.pending.pop(vault, None)
        if previous is None or not previous.bump.coins:
            return
        try:
            await self.reserve.client.call("abandontransaction", previous.bump.tx.txid)
        except BitcoindError:
            return  # back in the mempool or mined: its coins are spent indeed
        log.info("vault %s: %s left the mempool unmined; its reserve coins %s are free again",
                 short(vault), previous.bump.tx.txid,
                 ", ".join(str(c.outpoint) for c in previous.bump.coins))

    async def rebump(self, action: ConsiderRebump, tip: int) -> None:
        vault, kind = action.vault, action.kind
        try:
            entry = await self.node.call("getmempoolentry", action.txid)
        except BitcoindError:
            return  # mined or gone since: the next round sees it
        fee = sat(entry["fees"]["base"])
        rate = 1000 * fee // entry["weight"]
        target = await self.target_feerate()
        if rate >= target:
            return
        pending = self.pending.get(vault)
        extra: list[FeeCoin] = []
        if pending is not None and pending.bump.tx.txid == action.txid:
            extra = list(pending.bump.coins)
        else:  # broadcast before a restart: find its reserve coins on chain
            raw = await self.node.call("getrawtransaction", action.txid)
            for txin in Tx.from_hex(raw).inputs[1:]:
                out = await self.node.call("gettxout", txin.outpoint.txid, txin.outpoint.vout,
                                           False)
                if out is not None:
                    extra.append(FeeCoin(txin.outpoint, sat(out["value"])))
                    self.reserve.scripts[(txin.outpoint.txid, txin.outpoint.vout)] = \
                        bytes.fromhex(out["scriptPubKey"]["hex"])
        bump = await self.reserve.bump(
            await self.revocation(vault, kind), target,
            replaces=Replaced(fee=sat(entry["fees"]["descendant"]), weight=entry["weight"]),
            exclude=self._pending_coins(vault) | {(c.outpoint.txid, c.outpoint.vout)
                                                  for c in extra},
            extra=extra)
        await self._broadcast(vault, kind, bump, tip,
                              f"re-bump: {rate / SAT_PER_VB_TO_KWU:.1f} sat/vB is below the "
                              f"{target / SAT_PER_VB_TO_KWU:.1f} sat/vB target")

    async def _broadcast(self, vault: GuardedVault, kind: str, bump: Bump, tip: int,
                         reason: str) -> None:
        # maxfeerate 0: our own bound (max_feerate) applies, and whole coins may overshoot.
        txid = await self.node.call("sendrawtransaction", bump.tx.to_hex(), 0)
        previous = self.pending.get(vault)
        self.pending[vault] = PendingBump(bump, tip, tip if previous is None
                                          else previous.first_height)
        if kind == "cancel":
            metrics.watchtower().cancels_broadcast.inc()
        self.failed.pop(vault, None)
        self.chain.see(ChainTx(txid, tuple((i.outpoint.txid, i.outpoint.vout)
                                           for i in bump.tx.inputs),
                               outputs_of(bump.tx.outputs)))
        coins = ", ".join(f"{c.outpoint}={c.value}" for c in bump.coins) or "none"
        log.warning("vault %s: %s %s broadcast at %.1f sat/vB (fee %d sat, reserve coins "
                    "used: %s) because %s", short(vault), kind, txid,
                    1000 * bump.fee / bump.tx.weight / SAT_PER_VB_TO_KWU, bump.fee, coins,
                    reason)

    # --- spend requests ----------------------------------------------------------------------

    async def poll_spend_requests(self) -> None:
        server = self.config.sync_server
        backoff = Backoff()
        client: SyncServerClient | None = None
        cursor = await self.store.sync_cursor()
        try:
            while not self._stopping:
                try:
                    if client is None or client.closed:
                        client = await SyncServerClient.connect(server.host, server.port,
                                                                self.noise_private,
                                                                server.noise_key)
                    # With a cursor (a server that gives one) only what is new comes
                    # back; a seed server lists every pending request each time.
                    result = await client.get_spend_requests(cursor)
                    for request in result.requests:
                        try:
                            opinion = await self.judge(request)
                        except Exception:
                            # One request we cannot judge (it gets no opinion: a refusal
                            # for the managers) must not stop us judging the others.
                            log.exception("spend request for vault %s could not be judged",
                                          request.vault_id)
                            continue
                        if opinion is not None \
                                and (opinion.vault_id, opinion.txid) not in self.posted:
                            await client.spend_opinion(opinion)
                            self.posted.add((opinion.vault_id, opinion.txid))
                            metrics.watchtower().opinions.labels(
                                "accept" if opinion.accept else "refuse").inc()
                    if result.cursor is not None and result.cursor != cursor:
                        cursor = result.cursor
                        await self.store.set_sync_cursor(cursor)
                    self.last_sync_poll = time.time()
                    backoff.reset()
                    await asyncio.sleep(self.config.poll_interval)
                except (OSError, TransportError, WireError, ProtocolError,
                        asyncio.TimeoutError) as e:
                    delay = backoff.next()
                    log.warning("sync server %s:%d: %s: %s (retrying in %.0f s)", server.host,
                                server.port, type(e).__name__, e, delay)
                    if client is not None:
                        await client.close()
                        client = None
                    await asyncio.sleep(delay)
        finally:
            if client is not None:
                await client.close()

    def internal_scripts(self, vaults: list[GuardedVault]) -> set[bytes]:
        """Outputs of a spend that stay in the deployment: its CPFP output and change to
        a deposit script (of the vaults it spends)."""
        d = self.deployment
        return ({d.deposit_script_pubkey(v.index) for v in vaults}
                | {d.cpfp_script_pubkey(v.index) for v in vaults})

    def value_moved(self, spend: Tx, vaults: list[GuardedVault]) -> tuple[int, int]:
        """(what the guarded unvault outputs a spend consumes are worth, what it pays
        back to their deposit scripts): the value leaving the vaults is the difference."""
        d = self.deployment
        spent = sum(build_unvault(d, Coin(OutPoint(*v.deposit), v.value, v.index))
                    .tx.outputs[0].value for v in vaults)
        deposits = {d.deposit_script_pubkey(v.index) for v in vaults}
        return spent, sum(o.value for o in spend.outputs if o.script_pubkey in deposits)

    async def judge(self, request: SpendRequest):
        """The signed opinion on a spend request of one of our vaults, or None when it
        spends none of them. The verdict is stored before it is signed."""
        try:
            spend = Tx.from_base64(request.transaction)
        except TransactionError:
            return None
        vaults = []
        for txin in spend.inputs:
            vault = self.guard.by_unvault_outpoint((txin.outpoint.txid, txin.outpoint.vout))
            if vault is not None:
                vaults.append(vault)
        if not vaults:
            return None
        if len({i.outpoint for i in spend.inputs}) != len(spend.inputs):
            reason = "the transaction spends the same output twice: it can never be valid"
            log.info("spend %s refused: %s", spend.txid, reason)
            return sign_opinion(self.opinion_key, request.vault_id, False, reason, spend.txid)
        if request.vault_id not in {v.vault_id for v in vaults}:
            # A manager's mistake, or an attempt to have our verdict on this spend shown
            # under another vault: refused, and not remembered as the spend's verdict.
            reason = "vault_id is not the id of a vault this transaction spends"
            log.info("spend %s refused: %s (%s)", spend.txid, reason, request.vault_id)
            return sign_opinion(self.opinion_key, request.vault_id, False, reason, spend.txid)
        verdict = await self.store.verdict(spend.txid)
        if verdict is None:
            payees = payees_of(spend, self.internal_scripts(vaults), self.deployment.network)
            now = int(time.time())
            facts = SpendFacts(spend, tuple(vaults), payees,
                               await self.store.accepted_value_since(now - DAY),
                               *self.value_moved(spend, vaults))
            accepted, reason = self.policy.judge(facts)
            verdict = await self.store.put_verdict(Verdict(
                spend.txid, accepted, reason, facts.value_out, now,
                tuple(OutPoint(*v.deposit) for v in vaults)))
            log.info("spend %s of vault(s) %s %s by policy: %s", spend.txid,
                     ", ".join(short(v) for v in vaults),
                     "ACCEPTED" if verdict.accepted else "refused", verdict.reason)
        if verdict.accepted:
            self.guard.accept_spend(spend.txid, vaults)
        return sign_opinion(self.opinion_key, request.vault_id, verdict.accepted,
                            verdict.reason, spend.txid)

    # --- metrics -----------------------------------------------------------------------------

    def metric_values(self) -> dict[str, dict[tuple[str, ...], float]]:
        """The state gauges (metrics.WatchtowerMetrics), read at each scrape: one pass
        over the vaults that have something going on, the others are active."""
        states = dict.fromkeys(VAULT_STATES, 0)
        states["active"] = len(self.guard) - len(self.guard.busy)
        for vault in self.guard.busy:
            states[vault_state(vault)] += 1
        tip = self.chain.tip[0] if self.chain.tip is not None else None
        pending = [tip - p.first_height + 1 for v, p in self.pending.items()
                   if vault_state(v) == "cancelling"] if tip is not None else []
        values = {
            "revault_watchtower_vaults": {(state,): n for state, n in states.items()},
            "revault_watchtower_bitcoind_up": {(): float(
                self.chain.started and self.bitcoind_down_since is None)},
            "revault_watchtower_oldest_pending_cancel_blocks": {(): max(pending, default=0)},
        }
        if tip is not None:
            values["revault_watchtower_processed_height"] = {(): tip}
        if self.chain.node_height is not None:
            values["revault_watchtower_bitcoind_height"] = {(): self.chain.node_height}
        if self.last_sync_poll is not None:
            values["revault_watchtower_sync_poll_last_success_timestamp_seconds"] = {
                (): self.last_sync_poll}
        return values

    def _count_confirmed_cancels(self) -> None:
        for vault, pending in self.pending.items():
            if not pending.confirmed and vault_state(vault) == "cancelled":
                pending.confirmed = True
                metrics.watchtower().cancels_confirmed.inc()

    async def update_reserve_metrics(self) -> None:
        """The reserve gauges, once per block: a store read per vault with a cancel."""
        try:
            coins = await self.reserve.coins()
            at_once, _ = await self.cancellable_at_once(coins)
        except (ReserveError, TransactionError, BitcoindError) as e:
            # The chain loop reports bitcoind itself; the guarding goes on regardless.
            log.warning("fee reserve metrics not updated: %s", e)
            return
        exported = metrics.watchtower()
        exported.reserve_coins.set(len(coins))
        exported.reserve_value.set(sum(c.value for c in coins))
        exported.reserve_cancellable_vaults.set(at_once)

    async def cancellable_at_once(self, coins: list[FeeCoin]) -> tuple[int, list]:
        """How many guarded vaults `coins` can cancel at once at max_feerate, each taking
        the coins it needs from what the others left; and (vault, the feerate its cancel
        alone can reach) for every vault with a cancel."""
        cap = self.config.max_feerate_kwu
        remaining = list(coins)
        at_once = 0
        reachable = []
        for n, vault in enumerate(v for v in list(self.guard.vaults.values())
                                  if "cancel" in v.revocations):
            if n % 64 == 63:
                await asyncio.sleep(0)  # a large guard must not hold the loop
            revocation = await self.revocation(vault, "cancel")
            reachable.append((vault, max_reachable_feerate(revocation, coins, cap)))
            try:
                selection = plan_bump(revocation, remaining, cap)
            except FeeBumpError:
                continue
            at_once += 1
            chosen = set(selection.coins)
            remaining = [c for c in remaining if c not in chosen]
        return at_once, reachable

    # --- commands ----------------------------------------------------------------------------

    async def emergency(self) -> list[tuple[str, str, str]]:
        """Broadcast every guarded vault's emergency (or, when its deposit is already
        unvaulted, its unvault-emergency), bumped to max_feerate as far as the reserve
        allows. Returns (vault, kind, txid or error) per vault."""
        report = []
        used: set[tuple[str, int]] = set()
        for vault in list(self.guard.vaults.values()):
            txid, vout = vault.deposit
            replaces = None
            if await self.node.call("gettxout", txid, vout, True) is not None:
                kind = "emergency"
            elif await self.node.call("gettxout", vault.unvault_txid, 0, False) is not None \
                    or await self._in_mempool(vault.unvault_txid):
                # The unvault is pending (mined or in the mempool); a cancel of ours may
                # already spend its output in the mempool: the emergency replaces it.
                kind = "unvault_emergency"
                [spending] = await self.node.call(
                    "gettxspendingprevout", [{"txid": vault.unvault_txid, "vout": 0}])
                replaces = spending.get("spendingtxid")
            else:
                report.append((short(vault), "-", "nothing to do: no unspent vault output"))
                continue
            if kind not in vault.revocations:
                report.append((short(vault), kind, f"error: no {kind} stored"))
                continue
            revocation = await self.revocation(vault, kind)
            replaced = await self._replaced(replaces)
            try:
                bump = await self.reserve.bump(revocation, self.config.max_feerate_kwu,
                                               replaces=replaced, exclude=used,
                                               best_effort=True)
                used |= {(c.outpoint.txid, c.outpoint.vout) for c in bump.coins}
                sent = await self.node.call("sendrawtransaction", bump.tx.to_hex(), 0)
                log.warning("vault %s: %s %s broadcast at %.1f sat/vB (fee %d sat, reserve "
                            "coins used: %s) on the emergency command", short(vault), kind,
                            sent, 1000 * bump.fee / bump.tx.weight / SAT_PER_VB_TO_KWU,
                            bump.fee, ", ".join(str(c.outpoint) for c in bump.coins) or "none")
                report.append((short(vault), kind, sent))
            except (BitcoindError, ReserveError, FeeBumpError) as e:
                report.append((short(vault), kind, f"error: {e}"))
        return report

    async def reserve_report(self) -> str:
        address = await self.reserve.address()
        coins = await self.reserve.coins()
        lines = [f"fund the fee reserve (wallet {self.config.bitcoind.wallet!r}) at: {address}",
                 f"confirmed coins: {len(coins)}, {sum(c.value for c in coins)} sat"]
        lines += [f"  {c.outpoint} {c.value} sat" for c in coins]
        at_once, reachable = await self.cancellable_at_once(coins)
        lines.append(f"guarded vaults with a cancel: {len(reachable)} "
                     f"(max_feerate {self.config.max_feerate} sat/vB)")
        lines += [f"  vault {short(vault)}: cancel can reach "
                  f"{rate / SAT_PER_VB_TO_KWU:.1f} sat/vB" for vault, rate in reachable]
        lines.append(f"vaults that can be cancelled at once at max_feerate: {at_once} of "
                     f"{len(reachable)}")
        return "\n".join(lines)


# --- the daemon ------------------------------------------------------------------------------

class WatchtowerService:
    """The `Service` run by run_daemon: `sig` for the paired wallet, and the loops."""

    def __init__(self, watchtower: Watchtower):
        self.watchtower = watchtower
        self._wallet = watchtower.config.wallet_noise_key
        self.known_peers = [self._wallet]
        self.dispatcher = Dispatcher()
        self.dispatcher.serve_table(WATCHTOWER_METHODS, {"sig": watchtower.on_sig})

    def roles_of(self, peer_public: bytes) -> frozenset[str]:
        return frozenset({WALLET}) if peer_public == self._wallet else frozenset()

    async def close(self) -> None:
        metrics.watchtower().watch(None)
        await self.watchtower.close()


def read_opinion_key(config: WatchtowerConfig) -> bytes:
    try:
        key = read_key_file(config.opinion_key_file)
        coincurve.PrivateKey(key)
    except KeyFileError as e:
        raise KeyFileError(f"opinion_key_file: {e}") from None
    except ValueError:
        raise KeyFileError(f"opinion_key_file: {config.opinion_key_file}: not a valid "
                           "secp256k1 secret key") from None
    return key


async def open_watchtower(config: WatchtowerConfig, noise_private: bytes) -> Watchtower:
    opinion_key = read_opinion_key(config)
    store = await WatchtowerStore.open(config.common.data_dir / DATABASE_NAME)
    try:
        watchtower = Watchtower(config, store, opinion_key, noise_private)
        await watchtower.load()
    except BaseException:
        await store.close()
        raise
    return watchtower


async def make_service(config: WatchtowerConfig, noise_private: bytes) -> WatchtowerService:
    watchtower = await open_watchtower(config, noise_private)
    metrics.watchtower().watch(watchtower)
    watchtower.start()
    return WatchtowerService(watchtower)


async def _command(config: WatchtowerConfig, run) -> int:
    try:
        watchtower = await open_watchtower(config, b"\0" * 32)
    except (KeyFileError, ConfigError) as e:
        print(f"revault-watchtower: {e}", file=sys.stderr)
        return 2
    try:
        await watchtower.reserve.ensure_loaded()
        return await run(watchtower)
    except (BitcoindUnreachable, BitcoindError, ReserveError) as e:
        print(f"revault-watchtower: bitcoind: {e}", file=sys.stderr)
        return 1
    finally:
        await watchtower.store.close()


async def reserve_command(config: WatchtowerConfig) -> int:
    async def run(w: Watchtower) -> int:
        print(await w.reserve_report())
        return 0
    return await _command(config, run)


async def emergency_command(config: WatchtowerConfig) -> int:
    async def run(w: Watchtower) -> int:
        report = await w.emergency()
        for vault, kind, outcome in report:
            print(f"{vault} {kind} {outcome}")
        return 1 if any(o.startswith("error") for _, _, o in report) else 0
    return await _command(config, run)


STATUS_BITCOIND_TIMEOUT = 5.0  # seconds for `status` to ask bitcoind its height


async def read_status(config: WatchtowerConfig, db: sqlite3.Connection) -> dict:
    """`revault-watchtower --config FILE status`: the database, and bitcoind's height."""
    summary = status_summary(db)
    try:
        height = await config.bitcoind.client().call("getblockcount",
                                                     timeout=STATUS_BITCOIND_TIMEOUT)
    except (BitcoindUnreachable, BitcoindError, TimeoutError) as e:
        summary["bitcoind"] = {"reachable": False, "error": str(e) or type(e).__name__}
        return summary
    processed = summary["processed_height"]
    summary["bitcoind"] = {"reachable": True, "height": height,
                           "blocks_behind": None if processed is None else height - processed}
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_daemon(NAME, argv, read_config, make_service,
                      database_name=DATABASE_NAME, status=read_status,
                      commands={"reserve": reserve_command, "emergency": emergency_command})


if __name__ == "__main__":
    sys.exit(main())
