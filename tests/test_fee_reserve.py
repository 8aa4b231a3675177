"""The fee reserve's pure parts: planning a bump, the reachable feerate, the PSBT handed
to Core's wallet (its own input final, the reserve coins with their UTXO)."""

from __future__ import annotations

import hashlib
from decimal import Decimal

import pytest
from embit.psbt import PSBT

from revault.fee_reserve import (
    Revocation, bump_psbt, kwu_from_btc_per_kvb, max_reachable_feerate, plan_best_bump,
    plan_bump, target_feerate, unsigned_bump,
)
from revault.fees import FeeBumpError, FeeCoin, Replaced
from revault.primitives import OutPoint
from revault.transactions import RBF_SEQUENCE, Tx, TxIn, TxOut

SPENT_SCRIPT = b"\x00\x20" + b"\x05" * 32
COIN_SCRIPT = b"\x00\x14" + b"\x07" * 20


def revocation() -> Revocation:
    """A signed-looking one-input one-output revocation paying 172 sat."""
    witness = (b"", b"\x30" * 72, b"\x30" * 72, b"\x52" * 71)
    tx = Tx(2, (TxIn(OutPoint("11" * 32, 0), RBF_SEQUENCE, witness),),
            (TxOut(969_828, b"\x00\x20" + b"\x06" * 32),), 0)
    return Revocation("cancel", tx, 970_000, SPENT_SCRIPT)


def coins(*values: int) -> list[FeeCoin]:
    return [FeeCoin(OutPoint(hashlib.sha256(bytes([i])).hexdigest(), i), v)
            for i, v in enumerate(values)]


def test_btc_per_kvb_to_sat_per_kwu_rounds_up():
    assert kwu_from_btc_per_kvb(Decimal("0.00001000")) == 250  # 1 sat/vB
    assert kwu_from_btc_per_kvb(Decimal("0.00000101")) == 26


def test_plan_takes_no_coin_when_the_revocation_pays_enough_and_the_least_otherwise():
    r = revocation()
    assert plan_bump(r, coins(50_000), 100).coins == ()
    # 80 sat/vB: 9,000 alone is short; 30,000 is the cheapest that reaches it.
    selection = plan_bump(r, coins(50_000, 9_000, 30_000), 20_000)
    assert [c.value for c in selection.coins] == [30_000]
    assert 1000 * selection.fee >= 20_000 * selection.max_weight
    with pytest.raises(FeeBumpError):
        plan_bump(r, coins(1_000), 10_000)


def test_a_replacement_pays_more_than_what_it_replaces():
    r = revocation()
    replaced = Replaced(fee=20_000, weight=1_200)
    selection = plan_bump(r, coins(9_000, 15_000, 30_000), 300, replaced)
    assert selection.fee > replaced.fee
    assert 1000 * selection.fee // selection.max_weight > replaced.min_feerate_sat_per_kwu() - 1


def test_max_reachable_feerate_is_the_bound_of_what_plan_accepts():
    r = revocation()
    reserve = coins(20_000, 5_000)
    rate = max_reachable_feerate(r, reserve, 1_000_000)
    plan_bump(r, reserve, rate)
    with pytest.raises(FeeBumpError):
        plan_bump(r, reserve, rate + 1)
    assert max_reachable_feerate(r, reserve, 500) == 500  # capped


def test_psbt_keeps_the_stakeholders_witness_final_and_gives_each_coin_its_utxo():
    r = revocation()
    selection = plan_bump(r, coins(30_000, 9_000), 10_000)
    scripts = {(c.outpoint.txid, c.outpoint.vout): COIN_SCRIPT for c in selection.coins}
    psbt = PSBT.from_string(bump_psbt(r, selection.coins, scripts))
    assert psbt.tx.serialize() == unsigned_bump(r, selection.coins).serialize(with_witness=False)
    first = psbt.inputs[0]
    assert [bytes(i) for i in first.final_scriptwitness.items] == list(r.tx.inputs[0].witness)
    assert first.witness_utxo.value == 970_000
    for inp, coin in zip(psbt.inputs[1:], selection.coins):
        assert inp.witness_utxo.value == coin.value
        assert inp.witness_utxo.script_pubkey.data == COIN_SCRIPT
        assert inp.final_scriptwitness is None
    # Whole coins, no change: the outputs are the revocation's, untouched.
    assert [o.value for o in psbt.tx.vout] == [969_828]


def test_target_feerate_follows_the_estimate_and_the_mempool_within_max_feerate():
    def info(minfee: str, relay: str = "0.00001") -> dict:
        return {"mempoolminfee": Decimal(minfee), "minrelaytxfee": Decimal(relay)}

    cap = 20 * 250  # max_feerate 20 sat/vB
    estimate = {"feerate": Decimal("0.0001")}  # 10 sat/vB
    assert target_feerate(info("0.00001"), estimate, cap) == 2500
    assert target_feerate(info("0.00001"), {"errors": ["no data"]}, cap) == 250
    assert target_feerate(info("0.00012"), estimate, cap) == 3000  # the mempool's minimum
    # A spike beyond max_feerate: capped (the reserve is sized for max_feerate) ...
    assert target_feerate(info("0.0005"), estimate, cap) == cap
    assert target_feerate(info("0.00001"), {"feerate": Decimal("0.01")}, cap) == cap
    # ... but never under the minimum relay feerate.
    assert target_feerate(info("0.00001", relay="0.0001"), estimate, 100) == 2500


def test_best_plan_falls_back_to_the_highest_feerate_the_coins_reach():
    r = revocation()
    reserve = coins(20_000, 5_000)
    assert plan_best_bump(r, reserve, 1_000).coins == plan_bump(r, reserve, 1_000).coins
    short = plan_best_bump(r, reserve, 1_000_000)  # far beyond: as high as they reach
    rate = max_reachable_feerate(r, reserve, 1_000_000)
    assert short.coins and short.feerate_sat_per_kwu == rate < 1_000_000
    assert short.coins == plan_bump(r, reserve, rate).coins
    assert plan_best_bump(r, coins(10), 1_000_000).coins == ()  # nothing worth adding
    # A replacement must still outbid what it replaces.
    with pytest.raises(FeeBumpError):
        plan_best_bump(r, reserve, 1_000, Replaced(fee=500_000, weight=1_200))
