"""revault.fees beyond reserve selection: CPFP children and replacements (pure; the
fee-spike test in tests/test_fee_spike_regtest.py has Bitcoin Core judge them)."""

from __future__ import annotations

import pytest

from revault.deployment import Deployment, p2wpkh
from revault.fees import (
    CPFP_MIN_CHANGE,
    CpfpParent,
    FeeBumpError,
    FeeCoin,
    Replaced,
    build_cpfp,
    bump_revocation,
    replacement_min_fee,
)
from revault.primitives import SIGHASH_ALL, OutPoint
from revault.transactions import Coin, Kind, TransactionError, TxOut, build_spend, build_vault_transactions
from tests.support.keys import pub, secret

EMERGENCY = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
STK, MGR, COS, CPFP = (1, 2, 3), (11, 12), (21,), (31, 32)


@pytest.fixture
def dep() -> Deployment:
    return Deployment.from_dict({
        "network": "regtest", "stakeholders": [pub(i).hex() for i in STK],
        "managers": [pub(i).hex() for i in MGR], "cosigners": [pub(i).hex() for i in COS],
        "cpfp_keys": [pub(i).hex() for i in CPFP], "unvault_csv": 6, "emergency_address": EMERGENCY,
    })


DEPOSIT = Coin(OutPoint("ab" * 32, 1), 1_000_000)


def signed(rtx, keys):
    for index in range(len(rtx.spent)):
        for i in keys:
            if pub(i) in rtx.signers(index):
                rtx.sign(index, secret(i))
    assert rtx.is_complete()
    return rtx


def unvault_parent(d: Deployment, deposit: Coin = DEPOSIT) -> CpfpParent:
    return CpfpParent.of(signed(build_vault_transactions(d, deposit).unvault, STK))


def wallet_coin(n: int, value: int, index: int = 0) -> Coin:
    return Coin(OutPoint(f"{n:064x}", 0), value, index)


def package_rate(package) -> float:
    """Checked independently of CpfpPackage's own arithmetic: fees over vsizes."""
    child_vsize = -(-package.child.max_weight() // 4)
    fee = sum(p.fee for p in package.parents) + package.child.fee
    return 1000 * fee / (4 * (sum(p.tx.vsize for p in package.parents) + child_vsize))


def test_cpfp_of_an_unvault_pays_for_the_package_and_keeps_the_change(dep) -> None:
    parent = unvault_parent(dep)
    assert parent.cpfp_output == Coin(OutPoint(parent.tx.txid, 1), 30_000, 0)
    package = build_cpfp(dep, [parent], [], 5_000)  # 20 sat/vB
    child = package.child
    assert child.kind is Kind.CPFP and child.sighash_type(0) == SIGHASH_ALL
    assert [i.outpoint for i in child.tx.inputs] == [parent.cpfp_output.outpoint]
    assert child.tx.inputs[0].sequence == 0xFFFFFFFD
    [out] = child.tx.outputs
    assert out.script_pubkey == dep.cpfp_script_pubkey(0) and out.value >= CPFP_MIN_CHANGE
    assert 5_000 <= package_rate(package) < 5_000 + 20  # not a satoshi per vbyte more than needed
    assert package.feerate_sat_per_kwu == pytest.approx(package_rate(package))
    # Any one CPFP key signs: a dummy, the signature, the script.
    child.sign(0, secret(32))
    witness = child.finalize().inputs[0].witness
    assert witness[0] == b"" and witness[2] == dep.cpfp_witness_script() and witness[1][-1] == SIGHASH_ALL
    assert child.finalize().weight <= child.max_weight()


def test_cpfp_adds_wallet_coins_largest_first_and_burns_a_small_change(dep) -> None:
    parent = unvault_parent(dep)
    coins = [wallet_coin(1, 20_000), wallet_coin(2, 50_000, index=3), wallet_coin(3, 5_000)]
    package = build_cpfp(dep, [parent], coins, 30_000)  # 120 sat/vB
    assert package.wallet_coins == (coins[1],)
    assert package.child.spent[1].script_pubkey == dep.cpfp_script_pubkey(3)
    assert package_rate(package) >= 30_000
    # A target that the CPFP output alone nearly reaches: the change would be under
    # 10,000 sat, so it is burnt in a 0-value OP_RETURN (never dust) rather than kept.
    burnt = build_cpfp(dep, [parent], [], 20_000)
    [out] = burnt.child.tx.outputs
    assert out.value == 0 and out.script_pubkey[0] == 0x6A
    assert burnt.child.fee == 30_000 and package_rate(burnt) >= 20_000
    assert len(burnt.child.tx.serialize(with_witness=False)) >= 65  # not tx-size-small


def test_cpfp_that_cannot_pay_names_the_shortfall(dep) -> None:
    with pytest.raises(FeeBumpError, match="short by") as err:
        build_cpfp(dep, [unvault_parent(dep)], [wallet_coin(1, 1_000)], 500_000)
    assert err.value.shortfall_sat > 0
    with pytest.raises(TransactionError, match="no parent"):
        build_cpfp(dep, [], [wallet_coin(1, 100_000)], 5_000)
    parent = unvault_parent(dep)
    with pytest.raises(TransactionError, match="twice"):
        build_cpfp(dep, [parent], [parent.cpfp_output], 5_000)
    with pytest.raises(TransactionError, match="vault index"):
        build_cpfp(dep, [parent], [], 5_000, change_index=2**31)


def test_cpfp_re_bump_replaces_the_child(dep) -> None:
    parent = unvault_parent(dep)
    coins = [wallet_coin(1, 200_000)]
    first = build_cpfp(dep, [parent], coins, 5_000)
    old = Replaced(first.child.fee, first.child.max_weight())
    again = build_cpfp(dep, [parent], coins, 5_000, replaces=old)  # same target: still replaces
    assert again.child.fee >= replacement_min_fee(old, again.child.max_weight())
    assert again.child.fee >= old.fee + -(-again.child.max_weight() // 4)  # + 1 sat/vB
    assert 1000 * again.child.fee > old.min_feerate_sat_per_kwu() * again.child.max_weight() - 1000
    higher = build_cpfp(dep, [parent], coins, 25_000, replaces=old)
    assert package_rate(higher) >= 25_000 and higher.child.fee > again.child.fee


def test_cpfp_of_a_spend_uses_its_output_0(dep) -> None:
    unvault = build_vault_transactions(dep, DEPOSIT).unvault
    coin = unvault.output_coin(0)
    spend = signed(build_spend(dep, [coin], [TxOut(500_000, p2wpkh(pub(77)))], change_index=1),
                   MGR + COS)
    parent = CpfpParent.of(spend)
    assert parent.cpfp_output == spend.output_coin(0) and parent.fee == spend.fee
    package = build_cpfp(dep, [parent], [], 2_500)
    assert package_rate(package) >= 2_500
    with pytest.raises(TransactionError, match="has no CPFP output"):
        CpfpParent.of(signed(build_vault_transactions(dep, DEPOSIT).cancel, STK))


def test_revocation_re_bump_pays_for_the_replacement(dep) -> None:
    cancel = signed(build_vault_transactions(dep, DEPOSIT).cancel, STK)
    reserve = [FeeCoin(OutPoint(f"{i + 1:064x}", 0), v) for i, v in enumerate((4_000, 9_000, 30_000))]
    first, _ = bump_revocation(cancel, reserve, 5_000, secret(500))
    in_mempool = Replaced(first.fee, first.finalize().weight)
    # The same target again would be refused by Core as an insufficient replacement;
    # with `replaces`, the new version pays the old fee plus 1 sat/vB of its own size.
    second, selection = bump_revocation(cancel, reserve, 5_000, secret(500), replaces=in_mempool)
    vsize = second.finalize().vsize
    assert second.fee >= first.fee + vsize
    assert 1000 * second.fee / second.finalize().weight > 1000 * first.fee / in_mempool.weight
    assert second.fee == cancel.fee + sum(c.value for c in selection.coins)
    # Without `replaces`, the same bump as the first (what Core would refuse).
    assert bump_revocation(cancel, reserve, 5_000, secret(500))[0].fee == first.fee < second.fee
