"""The watchtower's decisions, from plain transactions (no bitcoind, no I/O)."""

from __future__ import annotations

import hashlib

from revault.watchtower_guard import (
    RETIRE_DEPTH, Alarm, Cancel, ChainTx, ConsiderRebump, Guard, GuardedVault, Retire,
    SpenderKind,
)

DEPOSIT_SPK = b"\x00\x20" + b"\x11" * 32
EMERGENCY_SPK = b"\x00\x14" + b"\x22" * 20
CANCEL_OUT = ((980_000, DEPOSIT_SPK),)
EMERGENCY_OUT = ((990_000, EMERGENCY_SPK),)
UNVAULT_EMERGENCY_OUT = ((975_000, EMERGENCY_SPK),)


def txid(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def vault(n: int = 0, kinds=("cancel", "emergency", "unvault_emergency")) -> GuardedVault:
    outputs = {"cancel": CANCEL_OUT, "emergency": EMERGENCY_OUT,
               "unvault_emergency": UNVAULT_EMERGENCY_OUT}
    return GuardedVault(deposit=(txid(f"deposit {n}"), 1), value=1_000_000, index=0,
                        vault_id=txid(f"vault id {n}"), unvault_txid=txid(f"unvault {n}"),
                        revocations={k: outputs[k] for k in kinds})


def unvault_tx(v: GuardedVault) -> ChainTx:
    return ChainTx(v.unvault_txid, (v.deposit,), ((990_000, b"\x00\x20" + b"\x33" * 32),))


def spend_of(v: GuardedVault, label: str, outputs=((900_000, b"\x00\x14" + b"\x44" * 20),),
             extra_inputs=()) -> ChainTx:
    return ChainTx(txid(label), (v.unvault_outpoint, *extra_inputs), outputs)


def test_unrelated_transactions_touch_nothing():
    g = Guard()
    g.add(vault())
    assert g.see(ChainTx(txid("x"), ((txid("other"), 0),), ()), None) == []
    assert not g.busy
    assert g.decide_all(100) == []


def test_unvault_without_accepted_spend_is_cancelled_in_mempool_and_when_mined():
    for height in (None, 50):
        g = Guard()
        v = g.add(vault())
        assert g.see(unvault_tx(v), height) == [v]
        [action] = g.decide_all(60)
        assert isinstance(action, Cancel) and action.kind == "cancel"
        assert action.replaces is None


def test_unvault_with_accepted_spend_is_left_alone_until_another_spend_appears():
    g = Guard()
    v = g.add(vault())
    spend = spend_of(v, "spend")
    g.accept_spend(spend.txid, [v])
    g.see(unvault_tx(v), None)
    assert g.decide_all(60) == []
    g.see(spend, None)
    assert v.unvault_spender.kind is SpenderKind.ACCEPTED_SPEND
    assert g.decide_all(60) == []
    # A different spend replaces the accepted one in the mempool: cancel, replacing it.
    thief = spend_of(v, "thief")
    g.see(thief, None)
    [action] = g.decide_all(60)
    assert isinstance(action, Cancel) and action.replaces == thief.txid


def test_our_bumped_cancel_is_recognised_by_its_outputs_and_considered_for_rebump():
    g = Guard()
    v = g.add(vault())
    g.see(unvault_tx(v), None)
    bumped = spend_of(v, "bumped cancel", CANCEL_OUT, extra_inputs=((txid("fee coin"), 0),))
    g.see(bumped, None)
    assert v.unvault_spender.kind is SpenderKind.CANCEL
    assert g.decide_all(60) == [ConsiderRebump(v, bumped.txid, "cancel")]
    # Mined: nothing to do until it is buried, then the vault retires.
    g.see(bumped, 61)
    assert g.decide_all(61) == []
    assert g.decide_all(61 + RETIRE_DEPTH - 2) == []
    [action] = g.decide_all(61 + RETIRE_DEPTH - 1)
    assert isinstance(action, Retire)


def test_zmq_republishing_a_mined_transaction_keeps_its_height():
    g = Guard()
    v = g.add(vault())
    g.see(unvault_tx(v), 10)
    g.see(unvault_tx(v), None)
    assert v.deposit_spender.height == 10
    g.mempool_is(set())
    assert v.busy


def test_replaced_or_evicted_transactions_are_forgotten():
    g = Guard()
    v = g.add(vault())
    g.see(unvault_tx(v), None)
    cancel = spend_of(v, "cancel", CANCEL_OUT)
    g.see(cancel, None)
    # Our cancel left the mempool (evicted): the unvault is there, cancel again.
    g.mempool_is({v.unvault_txid})
    assert v.unvault_spender is None
    assert isinstance(g.decide_all(60)[0], Cancel)
    # The unvault itself left the mempool: nothing is going on any more.
    g.mempool_is(set())
    assert not v.busy and g.decide_all(60) == []


def test_reorg_unmines_then_mempool_decides():
    g = Guard()
    v = g.add(vault())
    g.see(unvault_tx(v), 20)
    cancel = spend_of(v, "cancel", CANCEL_OUT)
    g.see(cancel, 21)
    g.disconnect_above(20)
    assert v.unvault_spender.height is None and v.deposit_spender.height == 20
    # Back in the mempool: a re-bump candidate again.
    assert g.decide_all(21) == [ConsiderRebump(v, cancel.txid, "cancel")]
    # Not back: the unvault is still mined, so cancel anew.
    g.mempool_is(set())
    assert isinstance(g.decide_all(21)[0], Cancel)
    # The unvault's block leaves too, and it is not in the mempool: nothing to do.
    g.disconnect_above(19)
    g.mempool_is(set())
    assert g.decide_all(19) == []


def test_emergency_spends_retire_the_vault_once_buried():
    g = Guard()
    v = g.add(vault())
    emergency = ChainTx(txid("emergency"), (v.deposit, (txid("fee"), 0)), EMERGENCY_OUT)
    g.see(emergency, 30)
    assert v.deposit_spender.kind is SpenderKind.EMERGENCY
    assert g.decide_all(30) == []
    assert isinstance(g.decide_all(30 + RETIRE_DEPTH - 1)[0], Retire)


def test_foreign_spend_mined_raises_an_alarm_once():
    g = Guard()
    v = g.add(vault())
    g.see(unvault_tx(v), 10)
    g.see(spend_of(v, "thief"), 11)
    [action] = g.decide_all(11)
    assert isinstance(action, Alarm)
    v.alarmed = True
    assert g.decide_all(12) == []


def test_unvault_emergency_used_when_no_cancel_is_stored():
    g = Guard()
    v = g.add(vault(kinds=("unvault_emergency",)))
    g.see(unvault_tx(v), None)
    [action] = g.decide_all(5)
    assert isinstance(action, Cancel) and action.kind == "unvault_emergency"


def test_matching_is_by_outpoint_and_vaults_are_found_by_id_and_unvault_output():
    g = Guard()
    vaults = [g.add(vault(n)) for n in range(1000)]
    assert g.by_unvault_outpoint(vaults[7].unvault_outpoint) is vaults[7]
    assert g.by_unvault_outpoint(vaults[7].deposit) is None
    assert g.by_vault_id(vaults[3].vault_id) == [vaults[3]]
    assert g.see(unvault_tx(vaults[500]), None) == [vaults[500]]
    assert g.busy == {vaults[500]}
    g.remove(vaults[500])
    assert g.busy == set() and len(g) == 999
    # Adding a vault again merges revocations instead of duplicating it.
    again = vault(1, kinds=("cancel",))
    assert g.add(again) is vaults[1]


def test_parsed_transactions_read_like_the_chain_writes_them():
    from bitcoin.core import CTransaction

    from revault.primitives import OutPoint
    from revault.transactions import Tx, TxIn, TxOut
    from revault.watchtower_guard import chain_tx_from_bitcoinlib

    tx = Tx(2, (TxIn(OutPoint(txid("a"), 3), 0xFFFFFFFD, (b"\x01" * 72, b"\x02" * 33)),
                TxIn(OutPoint(txid("b"), 0), 0xFFFFFFFD, (b"\x03" * 71, b"\x02" * 33))),
            (TxOut(5000, DEPOSIT_SPK), TxOut(7000, EMERGENCY_SPK)), 0)
    parsed = chain_tx_from_bitcoinlib(CTransaction.deserialize(tx.serialize()))
    assert parsed.prevouts == ((txid("a"), 3), (txid("b"), 0))
    assert parsed.txid == tx.txid  # display order, witness excluded
    assert parsed.outputs == ((5000, DEPOSIT_SPK), (7000, EMERGENCY_SPK))


def test_many_unvaults_at_once_cancels_come_first_the_largest_vaults_first():
    g = Guard()
    values = [300_000, 5_000_000, 1_000_000, 2_000_000]
    vaults = [g.add(vault(n)) for n in range(len(values))]
    for v, value in zip(vaults, values):
        v.value = value
        g.see(unvault_tx(v), None)
    # One more vault whose cancel is already out: a re-bump candidate, after the cancels.
    busy = g.add(vault(99))
    busy.value = 10**9
    g.see(unvault_tx(busy), None)
    g.see(spend_of(busy, "bumped cancel", CANCEL_OUT), None)
    actions = g.decide_all(60)
    assert [type(a) for a in actions] == [Cancel] * 4 + [ConsiderRebump]
    assert [a.vault.value for a in actions[:4]] == sorted(values, reverse=True)
