"""Fee reserve selection and fee bumping of revocation transactions.

On top of `revault.transactions`: a watchtower keeps a reserve of P2WPKH coins and,
when a revocation (cancel, emergency, unvault-emergency) must get into a busy mempool,
appends whole reserve coins to it as inputs. There is no change output: the
stakeholders' ALL|ANYONECANPAY signatures commit to the outputs, so every satoshi taken
from the reserve becomes fee, and the best selection is the one that overpays least.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import coincurve

from revault.deployment import p2wpkh, p2wpkh_script_code
from revault.primitives import SIGHASH_ALL, OutPoint
from revault.transactions import (
    MAX_WITNESS_SIGNATURE, RBF_SEQUENCE, RevaultTransaction, SpendPath, SpentOutput,
    TransactionError, Tx, TxIn,
)

__all__ = [
    "BNB_MAX_STEPS", "P2WPKH_INPUT_MAX_WEIGHT", "FeeBumpError", "FeeCoin", "FeeSelection",
    "select_fee_inputs", "bump_revocation",
]

P2WPKH_INPUT_MAX_WEIGHT = 41 * 4 + 1 + (1 + MAX_WITNESS_SIGNATURE) + (1 + 33)
# Fee inputs are appended while the input count stays encodable in one byte, so the
# weight of each addition is exactly known (252 inputs is far beyond any real need).
MAX_INPUTS_ONE_BYTE_COUNT = 252
BNB_MAX_STEPS = 100_000  # exact search budget before settling for greedy


class FeeBumpError(ValueError):
    """The fee reserve cannot bring a revocation transaction to the target feerate."""

    def __init__(self, message: str, *, shortfall_sat: int):
        super().__init__(message)
        self.shortfall_sat = shortfall_sat


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
) -> FeeSelection:
    """Choose reserve coins so that (base_fee + their value) / (base_weight + their
    weight) reaches the target, overpaying as little as possible: with no change
    output, that is the selection of least total value. Ties: fewer inputs.

    Exact branch and bound while it fits in `max_steps`, then the best found or a greedy
    pick. FeeBumpError (with `shortfall_sat`) when even the whole reserve is not enough.
    """
    if feerate_sat_per_kwu <= 0:
        raise ValueError("target feerate must be positive")
    # Work in millisatoshis so that the feerate condition is exact integer arithmetic:
    # 1000 * fee >= feerate * weight.
    deficit = feerate_sat_per_kwu * base_weight - 1000 * base_fee
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
) -> tuple[RevaultTransaction, FeeSelection]:
    """Append reserve coins (P2WPKH of `fee_key`) to a fully signed revocation so that
    it pays at least `feerate_sat_per_kwu`, sign them ALL, and return the complete
    transaction. Its own ALL|ANYONECANPAY signatures stay valid: they commit to the
    outputs and to their own input only. FeeBumpError when the reserve is too small."""
    if not revocation.kind.is_revocation:
        raise TransactionError(f"{revocation.kind.value} is not a revocation transaction (ALL-signed)")
    if not revocation.is_complete():
        raise TransactionError(f"{revocation.kind.value} must be fully signed before a fee bump")
    signed = revocation.finalize()
    selection = select_fee_inputs(
        signed.weight, revocation.fee, reserve, feerate_sat_per_kwu,
        base_inputs=len(signed.inputs), max_steps=max_steps,
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
