"""Fee bumping: reserve coins added to revocations, CPFP children for unvaults and spends.

On top of `revault.transactions`, pure (no I/O; `revault.bitcoind.submit_package` sends
a package):

* Revocations (cancel, emergency, unvault-emergency): a watchtower keeps a reserve of
  P2WPKH coins and, when a revocation must get into a busy mempool, appends whole
  reserve coins to it as inputs (`bump_revocation`). There is no change output: the
  stakeholders' ALL|ANYONECANPAY signatures commit to the outputs, so every satoshi
  taken from the reserve becomes fee, and the best selection is the one that overpays
  least (`select_fee_inputs`).
* Unvaults and spends (signed ALL, so nothing can be added to them): a child spends
  their CPFP output, plus coins of the managers' CPFP wallet, and pays for the package
  (`build_cpfp`).
* Replacing a version already in the mempool (a re-bump) pays at least its fee plus the
  incremental relay fee on the new size, at a higher feerate (BIP 125 rules 3, 4, 6):
  pass it as `replaces`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import coincurve

from revault.deployment import Deployment, DerivationError, p2wpkh, p2wpkh_script_code, p2wsh
from revault.primitives import SIGHASH_ALL, OutPoint
from revault.transactions import (
    MAX_WITNESS_SIGNATURE, RBF_SEQUENCE, TX_VERSION, Coin, Kind, RevaultTransaction, SpendPath,
    SpentOutput, TransactionError, Tx, TxIn, TxOut, cpfp_spent, dust_threshold,
)

__all__ = [
    "BNB_MAX_STEPS", "P2WPKH_INPUT_MAX_WEIGHT", "INCREMENTAL_RELAY_SAT_PER_KWU", "CPFP_MIN_CHANGE",
    "FeeBumpError", "FeeCoin", "FeeSelection", "Replaced", "CpfpParent", "CpfpPackage",
    "select_fee_inputs", "bump_revocation", "build_cpfp", "replacement_min_fee",
]

P2WPKH_INPUT_MAX_WEIGHT = 41 * 4 + 1 + (1 + MAX_WITNESS_SIGNATURE) + (1 + 33)
# Fee inputs are appended while the input count stays encodable in one byte, so the
# weight of each addition is exactly known (252 inputs is far beyond any real need).
MAX_INPUTS_ONE_BYTE_COUNT = 252
BNB_MAX_STEPS = 100_000  # exact search budget before settling for greedy
# Bitcoin Core's -incrementalrelayfee default up to v29 (1 sat/vB; later versions ask
# less, so paying this is enough everywhere).
INCREMENTAL_RELAY_SAT_PER_KWU = 250
CPFP_MIN_CHANGE = 10_000  # sat; a smaller CPFP change goes to the fee (docs/protocol.md)
# Bitcoin Core refuses a transaction under 65 bytes without witness (tx-size-small).
MIN_STANDARD_TX_NONWITNESS_SIZE = 65
_OP_RETURN = 0x6A


class FeeBumpError(ValueError):
    """The fee reserve cannot bring a revocation transaction to the target feerate."""

    def __init__(self, message: str, *, shortfall_sat: int):
        super().__init__(message)
        self.shortfall_sat = shortfall_sat


@dataclass(frozen=True, slots=True)
class Replaced:
    """The version already in the mempool that a new one replaces: its fee and weight
    (Bitcoin Core's `getmempoolentry`: `fees.base`, `weight`)."""

    fee: int
    weight: int

    def min_feerate_sat_per_kwu(self) -> int:
        """The least feerate strictly above this version's (BIP 125 rule 6)."""
        return 1000 * self.fee // self.weight + 1


def replacement_min_fee(replaced: Replaced, weight: int,
                        incremental_sat_per_kwu: int = INCREMENTAL_RELAY_SAT_PER_KWU) -> int:
    """The least fee of a replacement weighing `weight`: the replaced fee plus the
    incremental relay fee on the replacement's virtual size (BIP 125 rules 3 and 4)."""
    vsize = -(-weight // 4)
    return replaced.fee + -(-incremental_sat_per_kwu * 4 * vsize // 1000)


@dataclass(frozen=True, slots=True)
class FeeCoin:
    """A fee-reserve coin: a P2WPKH output of the bumper's key."""

    outpoint: OutPoint
    value: int


@dataclass(frozen=True, slots=True)
class FeeSelection:
    coins: tuple[FeeCoin, ...]
    fee: int  # total fee once the coins are added
    max_weight: int  # weight once the coins are signed (signatures at their largest)
    exact: bool  # True when the search proved this is the least overpayment
    feerate_sat_per_kwu: int

    @property
    def overpayment_msat(self) -> int:
        """Fee above target x max_weight / 1000, in millisatoshis."""
        return 1000 * self.fee - self.feerate_sat_per_kwu * self.max_weight


def select_fee_inputs(
    base_weight: int,
    base_fee: int,
    reserve: Sequence[FeeCoin],
    feerate_sat_per_kwu: int,
    *,
    base_inputs: int = 1,
    max_steps: int = BNB_MAX_STEPS,
    replaces: Replaced | None = None,
) -> FeeSelection:
    """Choose reserve coins so that (base_fee + their value) / (base_weight + their
    weight) reaches the target, overpaying as little as possible: with no change
    output, that is the selection of least total value. Ties: fewer inputs.

    With `replaces` (the version already in the mempool), the result also pays what a
    replacement must: more than that version's feerate, and at least its fee plus the
    incremental relay fee on the new size (`replacement_min_fee`).

    Exact branch and bound while it fits in `max_steps`, then the best found or a greedy
    pick. FeeBumpError (with `shortfall_sat`) when even the whole reserve is not enough.
    """
    if feerate_sat_per_kwu <= 0:
        raise ValueError("target feerate must be positive")
    # Work in millisatoshis so that the feerate condition is exact integer arithmetic:
    # 1000 * fee >= feerate * weight.
    deficit = feerate_sat_per_kwu * base_weight - 1000 * base_fee
    if replaces is not None:
        # Rule 6 raises the rate; rules 3 and 4 (fee >= old fee + incremental x vsize,
        # written as 1000 fee >= 1000 (old fee + 1) + incremental (weight + 3)) add a
        # fixed deficit whose per-input part the (larger) target rate already covers.
        feerate_sat_per_kwu = max(feerate_sat_per_kwu, replaces.min_feerate_sat_per_kwu(),
                                  INCREMENTAL_RELAY_SAT_PER_KWU)
        deficit = max(
            feerate_sat_per_kwu * base_weight - 1000 * base_fee,
            1000 * (replaces.fee + 1) + INCREMENTAL_RELAY_SAT_PER_KWU * (base_weight + 3)
            - 1000 * base_fee,
        )
    if deficit <= 0:
        return FeeSelection((), base_fee, base_weight, True, feerate_sat_per_kwu)
    room = MAX_INPUTS_ONE_BYTE_COUNT - base_inputs
    per_input = feerate_sat_per_kwu * P2WPKH_INPUT_MAX_WEIGHT
    useful = sorted(
        (c for c in reserve if 1000 * c.value > per_input),
        key=lambda c: (-c.value, c.outpoint.txid, c.outpoint.vout),
    )
    effective = [1000 * c.value - per_input for c in useful]

    def result(chosen: Sequence[int], exact: bool) -> FeeSelection:
        coins = tuple(useful[i] for i in chosen)
        return FeeSelection(
            coins, base_fee + sum(c.value for c in coins),
            base_weight + P2WPKH_INPUT_MAX_WEIGHT * len(coins), exact, feerate_sat_per_kwu,
        )

    best_total = sum(effective[:room])
    if best_total < deficit:
        shortfall = -(-(deficit - best_total) // 1000)
        raise FeeBumpError(
            f"fee reserve cannot reach {feerate_sat_per_kwu} sat/kWU: "
            f"{len(reserve)} coin(s), {len(useful)} worth adding, short by {shortfall} sat",
            shortfall_sat=shortfall,
        )

    # Every satoshi taken from the reserve becomes fee (there is no change), so the
    # least overpayment is the cheapest selection that reaches the target; ties go to
    # fewer inputs (a lighter transaction, a higher feerate). Branch and bound over
    # coins by decreasing value: a branch stops when it reaches the target (more coins
    # only cost more), when it cannot reach it with every remaining coin, or when it
    # already costs as much as the best selection found.
    values = [c.value for c in useful]
    suffix = [0] * (len(effective) + 1)
    for i in range(len(effective) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + effective[i]
    best: list[int] | None = None
    best_cost = 0
    steps = 0
    exhausted = True
    stack: list[tuple[int, int, int, list[int]]] = [(0, 0, 0, [])]
    while stack:
        steps += 1
        if steps > max_steps:
            exhausted = False
            break
        pos, total, cost, chosen = stack.pop()
        if best is not None and (cost > best_cost or (cost == best_cost and len(chosen) >= len(best))):
            continue
        if total >= deficit:
            best, best_cost = chosen, cost
            continue
        if pos == len(effective) or len(chosen) >= room or total + suffix[pos] < deficit:
            continue
        # A coin adds at most its value to the effective total, so what is still
        # missing costs at least that much more.
        if best is not None and 1000 * cost + (deficit - total) > 1000 * best_cost:
            continue
        # Pushed last = explored first: including the coin finds a solution fast.
        stack.append((pos + 1, total, cost, chosen))
        stack.append((pos + 1, total + effective[pos], cost + values[pos], chosen + [pos]))
    if best is not None:
        return result(best, exhausted)

    chosen: list[int] = []
    total = 0
    for i, e in enumerate(effective):
        if total >= deficit or len(chosen) >= room:
            break
        chosen.append(i)
        total += e
    for i in sorted(chosen, key=lambda i: -effective[i]):
        if total - effective[i] >= deficit:
            chosen.remove(i)
            total -= effective[i]
    return result(sorted(chosen), False)


def bump_revocation(
    revocation: RevaultTransaction,
    reserve: Sequence[FeeCoin],
    feerate_sat_per_kwu: int,
    fee_key: bytes,
    *,
    max_steps: int = BNB_MAX_STEPS,
    replaces: Replaced | None = None,
) -> tuple[RevaultTransaction, FeeSelection]:
    """Append reserve coins (P2WPKH of `fee_key`) to a fully signed revocation so that
    it pays at least `feerate_sat_per_kwu`, sign them ALL, and return the complete
    transaction. Its own ALL|ANYONECANPAY signatures stay valid: they commit to the
    outputs and to their own input only. FeeBumpError when the reserve is too small.
    The target is over weight; Bitcoin Core judges over vsize = ceil(weight / 4), which
    can be 3 WU more: aim a little above a mempool's minimum, never exactly at it.

    `replaces`: the version of this revocation already in the mempool (an earlier bump,
    or the bare pre-signed one); the result then pays enough to replace it. The reserve
    may include that version's own fee coins: the replacement conflicts with it anyway."""
    if not revocation.kind.is_revocation:
        raise TransactionError(f"{revocation.kind.value} is not a revocation transaction (ALL-signed)")
    if not revocation.is_complete():
        raise TransactionError(f"{revocation.kind.value} must be fully signed before a fee bump")
    signed = revocation.finalize()
    selection = select_fee_inputs(
        signed.weight, revocation.fee, reserve, feerate_sat_per_kwu,
        base_inputs=len(signed.inputs), max_steps=max_steps, replaces=replaces,
    )
    pubkey = coincurve.PrivateKey(fee_key).public_key.format(compressed=True)
    spk = p2wpkh(pubkey)
    script_code = p2wpkh_script_code(pubkey)
    inputs = revocation.tx.inputs + tuple(TxIn(c.outpoint, RBF_SEQUENCE) for c in selection.coins)
    spent = revocation.spent + tuple(
        SpentOutput(c.value, spk, script_code, SpendPath.FEE_P2WPKH, SIGHASH_ALL, None, pubkey)
        for c in selection.coins
    )
    bumped = RevaultTransaction(
        revocation.kind,
        Tx(revocation.tx.version, inputs, revocation.tx.outputs, revocation.tx.locktime),
        spent,
        revocation.vault_index,
    )
    for i, sigs in enumerate(revocation.signatures):
        bumped.signatures[i] = dict(sigs)
    for i in range(len(revocation.spent), len(spent)):
        bumped.sign(i, fee_key)
    return bumped, selection


# --------------------------------------------------------------------------------------
# CPFP: a child pays for an unvault's or a spend's frozen fee
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpfpParent:
    """An unconfirmed, fully signed unvault or spend and its CPFP output."""

    tx: Tx
    fee: int
    cpfp_output: Coin  # its outpoint, value and vault index (the CPFP script's index)

    @classmethod
    def of(cls, rtx: RevaultTransaction) -> CpfpParent:
        """The parent for a complete unvault (CPFP output [1]) or spend ([0])."""
        vout = {Kind.UNVAULT: 1, Kind.SPEND: 0}.get(rtx.kind)
        if vout is None:
            raise TransactionError(f"a {rtx.kind.value} has no CPFP output")
        return cls(rtx.finalize(), rtx.fee, rtx.output_coin(vout))

    @property
    def vsize(self) -> int:
        return self.tx.vsize


@dataclass(frozen=True, slots=True)
class CpfpPackage:
    """Parents and the child that pays for them. Sign every input of `child` with a
    CPFP key (`child.sign(i, key)`), then submit `parents` + `child.finalize()`."""

    parents: tuple[CpfpParent, ...]
    child: RevaultTransaction
    wallet_coins: tuple[Coin, ...]  # the CPFP wallet's coins the child spends
    target_sat_per_kwu: int

    @property
    def package_fee(self) -> int:
        return sum(p.fee for p in self.parents) + self.child.fee

    @property
    def package_vsize(self) -> int:
        """With the child at its worst-case size (real signatures make it no larger)."""
        return sum(p.vsize for p in self.parents) + -(-self.child.max_weight() // 4)

    @property
    def feerate_sat_per_kwu(self) -> float:
        """The package feerate as Bitcoin Core computes it (fees over virtual sizes)."""
        return 1000 * self.package_fee / (4 * self.package_vsize)


def _op_return_script(n_inputs: int) -> bytes:
    """A bare OP_RETURN, padded with a zero push only when a one-input child would
    otherwise fall under the standard minimum non-witness size."""
    # version 4 + counts 1 + 1 + inputs 41 each + output 8 + 1 + script + locktime 4
    short = MIN_STANDARD_TX_NONWITNESS_SIZE - (19 + 41 * n_inputs + 1)
    return bytes([_OP_RETURN]) if short <= 0 else bytes([_OP_RETURN, short - 1]) + b"\x00" * (short - 1)


def build_cpfp(
    d: Deployment,
    parents: Sequence[CpfpParent],
    wallet_coins: Sequence[Coin],
    feerate_sat_per_kwu: int,
    *,
    change_index: int = 0,
    replaces: Replaced | None = None,
) -> CpfpPackage:
    """The child that brings `parents` (unconfirmed unvaults or spends) to a package
    feerate of at least `feerate_sat_per_kwu`: (parents' fees + its fee) over (parents'
    virtual sizes + its own, worst case) as Bitcoin Core counts them; and its own
    feerate reaches the target too, so it never drags the package down.

    It spends every parent's CPFP output, then the largest `wallet_coins` (coins of the
    managers' CPFP wallet: CPFP-script outputs, `Coin.index` their vault index) while
    more are needed; one output: change to the CPFP script of `change_index`, or a
    0-value OP_RETURN when the change would be under 10,000 sat (it goes to the fee).
    Inputs signal RBF. `replaces`: the child already in the mempool for these parents;
    the new one pays enough to replace it. FeeBumpError when the coins cannot pay.
    """
    if not parents:
        raise TransactionError("cpfp: no parent to pay for")
    if feerate_sat_per_kwu <= 0:
        raise ValueError("target feerate must be positive")
    outpoints = [p.cpfp_output.outpoint for p in parents] + [c.outpoint for c in wallet_coins]
    if len(set(outpoints)) != len(outpoints):
        raise TransactionError("cpfp: the same coin twice")
    try:
        change_spk = p2wsh(d.keys(change_index).cpfp_script())
    except DerivationError as e:
        raise TransactionError(f"cpfp: change {e}") from None
    parents_fee = sum(p.fee for p in parents)
    parents_vsize = sum(p.vsize for p in parents)
    base = [p.cpfp_output for p in parents]
    extra = sorted(wallet_coins, key=lambda c: (-c.value, c.outpoint))

    def child(coins: Sequence[Coin], output_spk: bytes, value: int) -> RevaultTransaction:
        spent = [cpfp_spent(d, c) for c in coins]
        tx = Tx(TX_VERSION, tuple(TxIn(c.outpoint, RBF_SEQUENCE) for c in coins),
                (TxOut(value, output_spk),), 0)
        return RevaultTransaction(Kind.CPFP, tx, spent, change_index)

    def fee_needed(draft: RevaultTransaction) -> int:
        vsize = -(-draft.max_weight() // 4)
        rate = feerate_sat_per_kwu
        fee = max(-(-rate * 4 * (parents_vsize + vsize) // 1000) - parents_fee,
                  -(-rate * 4 * vsize // 1000))
        if replaces is not None:
            fee = max(fee, replacement_min_fee(replaces, draft.max_weight()),
                      -(-replaces.min_feerate_sat_per_kwu() * 4 * vsize // 1000))
        return fee

    shortfall = 0
    for n in range(len(extra) + 1):
        coins = base + extra[:n]
        total = sum(c.value for c in coins)
        with_change = child(coins, change_spk, 0)
        change = total - fee_needed(with_change)
        if change >= max(CPFP_MIN_CHANGE, dust_threshold(change_spk)):
            return CpfpPackage(tuple(parents), child(coins, change_spk, change),
                               tuple(extra[:n]), feerate_sat_per_kwu)
        burn = child(coins, _op_return_script(len(coins)), 0)
        shortfall = fee_needed(burn) - total
        if shortfall <= 0:
            return CpfpPackage(tuple(parents), burn, tuple(extra[:n]), feerate_sat_per_kwu)
    raise FeeBumpError(
        f"cpfp: {len(parents)} CPFP output(s) and {len(extra)} CPFP wallet coin(s) cannot "
        f"bring the package to {feerate_sat_per_kwu} sat/kWU: short by {shortfall} sat",
        shortfall_sat=shortfall,
    )
