"""What a watchtower decides, without any I/O: transactions and blocks in, actions out.

The guard holds every guarded vault and an index from outpoint to vault: the deposit
outpoint (spent by the vault's unvault or emergency) and the unvault output (spent by
the cancel, the unvault-emergency or a spend). A transaction is matched by looking up
each of its inputs, so the cost of a mempool transaction or of a block does not depend
on how many vaults are guarded.

What the guard knows about the chain are sightings: a transaction that touched a vault,
with the height of the block holding it, or None while it is only in the mempool. The
asyncio shell feeds it (`see`, `mempool_is`, `disconnect_above`) and asks it, at each
new transaction and each new block, what to do with the vaults that have something
going on (`decide`). Everything a decision needs is in the guard, so the rules below are
unit-tested with plain objects:

- an unvault (in the mempool or mined) whose unvault output nobody spends, with no spend
  of it accepted by this watchtower: cancel it;
- the unvault output spent, in the mempool, by anything but our cancel, an
  unvault-emergency or an accepted spend: cancel, replacing that transaction;
- our cancel unconfirmed: consider a re-bump at each block;
- a cancel, emergency, or accepted spend buried under RETIRE_DEPTH blocks: retire the
  vault (a cancel's output is a new deposit, a new vault the wallet presigns again).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

RETIRE_DEPTH = 100

OutPointKey = tuple[str, int]  # (txid, vout): one key type whatever OutPoint class made it


@dataclass(frozen=True, slots=True)
class ChainTx:
    """A transaction as the guard needs it."""

    txid: str
    prevouts: tuple[OutPointKey, ...]
    outputs: tuple[tuple[int, bytes], ...]  # (value, scriptPubKey)


class SpenderKind(str, enum.Enum):
    UNVAULT = "unvault"                      # spends the deposit
    EMERGENCY = "emergency"                  # spends the deposit
    CANCEL = "cancel"                        # spends the unvault output
    UNVAULT_EMERGENCY = "unvault_emergency"  # spends the unvault output
    ACCEPTED_SPEND = "accepted spend"        # spends the unvault output, judged by us
    FOREIGN = "foreign"                      # anything else


@dataclass(slots=True)
class Sighting:
    txid: str
    kind: SpenderKind
    height: int | None  # None: in the mempool, not mined


@dataclass(eq=False, slots=True)
class GuardedVault:
    """One vault and what the chain shows of it. Identity-hashed: one object per vault.
    Slotted, and sharing one empty `accepted_spends` until a spend is accepted: a
    watchtower holds 100k of these."""

    deposit: OutPointKey
    value: int
    index: int
    vault_id: str
    unvault_txid: str
    # kind -> outputs of the stored revocation of that kind, which identify it once
    # bumped (added inputs change its txid, never its outputs). The signed transactions
    # themselves stay in the store until one is needed.
    revocations: dict[str, tuple[tuple[int, bytes], ...]]
    accepted_spends: frozenset[str] = frozenset()
    deposit_spender: Sighting | None = None
    unvault_spender: Sighting | None = None
    alarmed: bool = False

    @property
    def unvault_outpoint(self) -> OutPointKey:
        return (self.unvault_txid, 0)

    @property
    def busy(self) -> bool:
        return self.deposit_spender is not None


@dataclass(frozen=True, slots=True)
class Cancel:
    """Broadcast the vault's revocation `kind` (cancel, or unvault-emergency when no
    cancel is stored), bumped; `replaces` is the mempool transaction it must outbid."""

    vault: GuardedVault
    kind: str
    replaces: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class ConsiderRebump:
    vault: GuardedVault
    txid: str  # our revocation, unconfirmed
    kind: str  # cancel or unvault_emergency


@dataclass(frozen=True, slots=True)
class Retire:
    vault: GuardedVault
    reason: str


@dataclass(frozen=True, slots=True)
class Alarm:
    vault: GuardedVault
    message: str


Action = Cancel | ConsiderRebump | Retire | Alarm


class Guard:
    def __init__(self) -> None:
        self._by_outpoint: dict[OutPointKey, GuardedVault] = {}
        self._by_id: dict[str, list[GuardedVault]] = {}
        self.vaults: dict[OutPointKey, GuardedVault] = {}
        self.busy: set[GuardedVault] = set()

    def __len__(self) -> int:
        return len(self.vaults)

    def add(self, vault: GuardedVault) -> GuardedVault:
        """Guard `vault`, or merge revocations into the one already guarded."""
        existing = self.vaults.get(vault.deposit)
        if existing is not None:
            for kind, value in vault.revocations.items():
                existing.revocations.setdefault(kind, value)
            existing.accepted_spends = existing.accepted_spends | vault.accepted_spends
            return existing
        self.vaults[vault.deposit] = vault
        self._by_outpoint[vault.deposit] = vault
        self._by_outpoint[vault.unvault_outpoint] = vault
        self._by_id.setdefault(vault.vault_id, []).append(vault)
        return vault

    def remove(self, vault: GuardedVault) -> None:
        self.vaults.pop(vault.deposit, None)
        self._by_outpoint.pop(vault.deposit, None)
        self._by_outpoint.pop(vault.unvault_outpoint, None)
        same_id = self._by_id.get(vault.vault_id, [])
        if vault in same_id:
            same_id.remove(vault)
        if not same_id:
            self._by_id.pop(vault.vault_id, None)
        self.busy.discard(vault)

    def by_vault_id(self, vault_id: str) -> list[GuardedVault]:
        return list(self._by_id.get(vault_id, ()))

    def by_unvault_outpoint(self, outpoint: OutPointKey) -> GuardedVault | None:
        vault = self._by_outpoint.get(outpoint)
        return vault if vault is not None and vault.unvault_outpoint == outpoint else None

    # --- what the chain shows ------------------------------------------------------------

    def see(self, tx: ChainTx | ParsedTx, height: int | None) -> list[GuardedVault]:
        """A transaction entered the mempool (height None) or a block; returns the vaults
        it touched. Cost: one dict lookup per input."""
        touched = []
        for prevout in tx.prevouts:
            vault = self._by_outpoint.get(prevout)
            if vault is None:
                continue
            current = vault.deposit_spender if prevout == vault.deposit else vault.unvault_spender
            if current is not None and current.txid == tx.txid and height is None:
                # Already known; ZMQ publishes a mined transaction again: keep its height.
                touched.append(vault)
                continue
            sighting = Sighting(tx.txid, self._classify(vault, prevout, tx), height)
            if prevout == vault.deposit:
                vault.deposit_spender = sighting
            else:
                vault.unvault_spender = sighting
                if vault.deposit_spender is None:
                    # The unvault's own sighting was missed (a spend cannot come
                    # without it): it is at least in the mempool.
                    vault.deposit_spender = Sighting(vault.unvault_txid, SpenderKind.UNVAULT,
                                                     None)
            self.busy.add(vault)
            touched.append(vault)
        return touched

    def _classify(self, vault: GuardedVault, prevout: OutPointKey,
                  tx: ChainTx | ParsedTx) -> SpenderKind:
        def shaped_as(kind: str) -> bool:
            return vault.revocations.get(kind) == tx.outputs

        if prevout == vault.deposit:
            if tx.txid == vault.unvault_txid:
                return SpenderKind.UNVAULT
            return SpenderKind.EMERGENCY if shaped_as("emergency") else SpenderKind.FOREIGN
        if tx.txid in vault.accepted_spends:
            return SpenderKind.ACCEPTED_SPEND
        if shaped_as("cancel"):
            return SpenderKind.CANCEL
        if shaped_as("unvault_emergency"):
            return SpenderKind.UNVAULT_EMERGENCY
        return SpenderKind.FOREIGN

    def mempool_is(self, txids: set[str]) -> list[GuardedVault]:
        """The mempool now holds exactly `txids`: forget unmined sightings of anything
        else (replaced, evicted, or reorged out and not re-accepted)."""
        changed = []
        for vault in list(self.busy):
            before = (vault.deposit_spender, vault.unvault_spender)
            if vault.unvault_spender is not None and vault.unvault_spender.height is None \
                    and vault.unvault_spender.txid not in txids:
                vault.unvault_spender = None
            if vault.deposit_spender is not None and vault.deposit_spender.height is None \
                    and vault.deposit_spender.txid not in txids:
                vault.deposit_spender = None
                vault.unvault_spender = None  # nothing spends an output that is gone
            if (vault.deposit_spender, vault.unvault_spender) != before:
                changed.append(vault)
            if vault.deposit_spender is None:
                self.busy.discard(vault)
        return changed

    def disconnect_above(self, height: int) -> list[GuardedVault]:
        """Blocks above `height` left the chain: what they held is back to unmined (the
        node puts it back in its mempool, or `mempool_is` will forget it)."""
        changed = []
        for vault in self.busy:
            for sighting in (vault.deposit_spender, vault.unvault_spender):
                if sighting is not None and sighting.height is not None \
                        and sighting.height > height:
                    sighting.height = None
                    changed.append(vault)
        return changed

    def accept_spend(self, spend_txid: str, vaults: Iterable[GuardedVault]) -> None:
        for vault in vaults:
            vault.accepted_spends = vault.accepted_spends | {spend_txid}
            spender = vault.unvault_spender
            if spender is not None and spender.txid == spend_txid:
                spender.kind = SpenderKind.ACCEPTED_SPEND

    # --- what to do ------------------------------------------------------------------------

    def decide(self, vault: GuardedVault, tip: int) -> Action | None:
        deposit, unvault = vault.deposit_spender, vault.unvault_spender
        if deposit is None:
            return None
        if deposit.kind is not SpenderKind.UNVAULT:
            if deposit.height is not None and tip - deposit.height + 1 >= RETIRE_DEPTH:
                return Retire(vault, f"deposit spent by {deposit.kind.value} {deposit.txid}")
            if deposit.kind is SpenderKind.FOREIGN and not vault.alarmed:
                return Alarm(vault, f"deposit spent by unknown transaction {deposit.txid}")
            return None
        if unvault is None:
            if vault.accepted_spends:
                return None  # the managers wait for the csv, then broadcast the spend
            return self._cancel(vault, None, f"unvault {deposit.txid} with no accepted spend")
        if unvault.height is not None:
            if tip - unvault.height + 1 >= RETIRE_DEPTH:
                return Retire(vault, f"unvault output spent by {unvault.kind.value} "
                                     f"{unvault.txid}")
            if unvault.kind is SpenderKind.FOREIGN and not vault.alarmed:
                return Alarm(vault, f"unvault output spent by unapproved transaction "
                                    f"{unvault.txid}, mined before any cancel")
            return None
        if unvault.kind in (SpenderKind.CANCEL, SpenderKind.UNVAULT_EMERGENCY):
            return ConsiderRebump(vault, unvault.txid, unvault.kind.value)
        if unvault.kind is SpenderKind.ACCEPTED_SPEND:
            return None
        return self._cancel(vault, unvault.txid,
                            f"unvault output spent by unapproved transaction {unvault.txid}")

    def _cancel(self, vault: GuardedVault, replaces: str | None, reason: str) -> Action:
        for kind in ("cancel", "unvault_emergency"):
            if kind in vault.revocations:
                return Cancel(vault, kind, replaces, reason)
        if vault.alarmed:
            return None
        return Alarm(vault, f"{reason}, and no cancel nor unvault-emergency is stored for it")

    def decide_all(self, tip: int) -> list[Action]:
        """Every vault's action; cancels first, the largest vaults first: when many
        unvaults come at once and the reserve cannot bump every cancel to the target,
        the value most at stake gets the coins (the others still go out, less bumped)."""
        actions = [a for v in list(self.busy) if (a := self.decide(v, tip)) is not None]
        actions.sort(key=lambda a: (not isinstance(a, Cancel), -a.vault.value))
        return actions


class ParsedTx:
    """A python-bitcoinlib CTransaction as the guard sees it (a ChainTx). Its txid (a
    serialization and two hashes) and outputs are computed only when read, which the
    guard does only for a transaction that touches a vault: most of a block never is."""

    __slots__ = ("_ctx", "prevouts", "_txid", "_outputs")

    def __init__(self, ctx):
        self._ctx = ctx
        self.prevouts = tuple((i.prevout.hash[::-1].hex(), i.prevout.n) for i in ctx.vin)
        self._txid: str | None = None
        self._outputs: tuple[tuple[int, bytes], ...] | None = None

    @property
    def txid(self) -> str:
        if self._txid is None:
            self._txid = self._ctx.GetTxid()[::-1].hex()
        return self._txid

    @property
    def outputs(self) -> tuple[tuple[int, bytes], ...]:
        if self._outputs is None:
            self._outputs = tuple((o.nValue, bytes(o.scriptPubKey)) for o in self._ctx.vout)
        return self._outputs


def chain_tx_from_bitcoinlib(ctx) -> ParsedTx:
    return ParsedTx(ctx)


def outputs_of(outputs: Sequence) -> tuple[tuple[int, bytes], ...]:
    """(value, scriptPubKey) pairs of revault.transactions TxOut objects."""
    return tuple((o.value, bytes(o.script_pubkey)) for o in outputs)
