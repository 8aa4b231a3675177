"""The wallet's pure state machines: events in, actions out, no I/O, no clock."""

from __future__ import annotations

import hashlib

import coincurve
import pytest

from revault.messages import RelayedOpinion, sign_opinion
from revault.primitives import tx_uid
from revault.deployment import Deployment, p2wpkh, script_pubkey_to_address
from revault.primitives import OutPoint
from revault.transactions import Coin, TxOut, build_spend, build_vault_transactions
from revault.wallet_flows import (
    BACKOFF_MAX, MAX_ERR_SIG_ROUNDS, MAX_WATCHTOWER_NACKS, ActivateFlow, BadSignatures,
    CosignerMisbehaved, CosignerSign, ErrSig, FetchOpinions, FetchSigs, FlowError, NotSecured,
    PostSig, RequestSpend, SecuredVault, SecureFlow, SendToWatchtower, SignatureRound,
    SpendFlow, SpendRefused, WatchtowerRefused, backoff,
)


def secret(label: str) -> bytes:
    return hashlib.sha256(f"wallet flows {label}".encode()).digest()


def pub(sk: bytes) -> bytes:
    return coincurve.PrivateKey(sk).public_key.format(compressed=True)


STK = [secret(f"stakeholder {i}") for i in range(3)]
MGR = [secret(f"manager {i}") for i in range(2)]
COS = [secret("cosigner 0")]
TOWER_KEYS = [secret(f"opinion {i}") for i in range(2)]
DEPLOYMENT = Deployment.from_dict({
    "network": "regtest",
    "stakeholders": [pub(s).hex() for s in STK],
    "managers": [pub(s).hex() for s in MGR],
    "managers_threshold": 1,
    "cosigners": [pub(s).hex() for s in COS],
    "cpfp_keys": [pub(secret(f"cpfp {i}")).hex() for i in range(2)],
    "unvault_csv": 6,
    "emergency_address": script_pubkey_to_address(p2wpkh(pub(secret("emergency"))), "regtest"),
    "watchtowers": [pub(s).hex() for s in TOWER_KEYS],
})
DEPOSIT = Coin(OutPoint("ab" * 32, 1), 2_000_000, 0)
TOWERS = ["tower A", "tower B"]


def vault_txs():
    return build_vault_transactions(DEPLOYMENT, DEPOSIT)


def sigs_of(rtx, secrets) -> dict[str, str]:
    """Each stakeholder's valid signature of input 0, as the server relays them."""
    return {pub(sk).hex(): rtx.sign(0, sk).hex() for sk in secrets}


def test_backoff_doubles_to_a_bound():
    assert backoff(0) == 0
    assert backoff(1) < backoff(2) < backoff(3)
    assert backoff(50) == BACKOFF_MAX


def test_round_posts_own_polls_with_backoff_and_completes():
    rtx = vault_txs().cancel
    round_ = SignatureRound(rtx, (pub(STK[0]), rtx.sign(0, STK[0])))
    first = round_.start()
    assert [type(a) for a in first] == [PostSig, FetchSigs]
    assert first[0].pubkey == pub(STK[0]).hex() and first[1].uid == tx_uid(rtx.txid)
    reference = vault_txs().cancel  # a fresh copy to make the others' signatures
    others = sigs_of(reference, STK[1:2])
    own = {pub(STK[0]).hex(): first[0].signature}
    polls = [round_.on_sigs({**own, **others}) for _ in range(3)]
    assert all(len(p) == 1 and isinstance(p[0], FetchSigs) for p in polls)
    assert polls[0][0].after < polls[1][0].after < polls[2][0].after
    assert round_.take_fresh() == {pub(STK[0]): bytes.fromhex(first[0].signature),
                                   pub(STK[1]): bytes.fromhex(others[pub(STK[1]).hex()])}
    assert round_.on_sigs({**own, **sigs_of(reference, STK[1:])}) == []
    assert round_.complete
    assert set(round_.take_fresh()) == {pub(STK[2])}


def test_round_reposts_own_when_it_went_missing():
    rtx = vault_txs().emergency
    round_ = SignatureRound(rtx, (pub(STK[1]), rtx.sign(0, STK[1])))
    round_.start()
    actions = round_.on_sigs(sigs_of(vault_txs().emergency, STK[:1]))
    assert [type(a) for a in actions] == [PostSig, FetchSigs]
    assert actions[0].pubkey == pub(STK[1]).hex()


def test_invalid_signature_gets_err_sig_then_replacement_accepted():
    rtx = vault_txs().cancel
    round_ = SignatureRound(rtx, (pub(STK[0]), rtx.sign(0, STK[0])))
    round_.start()
    good = sigs_of(vault_txs().cancel, STK)
    # stakeholder 2's "signature" is stakeholder 2 signing the emergency instead
    bad = dict(good, **{pub(STK[2]).hex(): vault_txs().emergency.sign(0, STK[2]).hex()})
    actions = round_.on_sigs(bad)
    assert [type(a) for a in actions] == [ErrSig, PostSig, FetchSigs]
    assert not round_.complete
    assert set(round_.take_fresh()) == {pub(STK[0]), pub(STK[1])}  # valid ones kept
    # after err_sig the server is empty until each wallet reposts
    assert [type(a) for a in round_.on_sigs({})] == [PostSig, FetchSigs]
    assert round_.on_sigs(good) == []
    assert round_.complete


def test_endless_invalid_signatures_give_up_naming_the_key():
    rtx = vault_txs().cancel
    round_ = SignatureRound(rtx)
    bad = {pub(STK[2]).hex(): vault_txs().emergency.sign(0, STK[2]).hex()}
    for _ in range(MAX_ERR_SIG_ROUNDS):
        assert isinstance(round_.on_sigs(bad)[0], ErrSig)
    with pytest.raises(BadSignatures, match=pub(STK[2]).hex()):
        round_.on_sigs(bad)


def test_signatures_of_unknown_keys_are_ignored():
    rtx = vault_txs().cancel
    round_ = SignatureRound(rtx)
    stranger = secret("stranger")
    actions = round_.on_sigs({pub(stranger).hex(): "3006020101020101"})
    assert [type(a) for a in actions] == [FetchSigs]
    assert rtx.signatures[0] == {}


def complete_secure(flow: SecureFlow, txs) -> list:
    """Feed every round every stakeholder's signature; the handoffs that follow."""
    handoffs = []
    for uid, round_ in flow.rounds.items():
        reference = {r.kind: r for r in vault_txs().revocations()}[round_.rtx.kind]
        handoffs += flow.on_sigs(uid, sigs_of(reference, STK))
    return handoffs


def test_secure_hands_every_complete_revocation_to_every_tower_then_done():
    txs = vault_txs()
    flow = SecureFlow(txs, DEPOSIT.outpoint.txid, STK[0], TOWERS, set())
    start = flow.start()
    assert sum(isinstance(a, PostSig) for a in start) == 3
    assert sum(isinstance(a, FetchSigs) for a in start) == 3
    handoffs = complete_secure(flow, txs)
    assert {(a.tower, a.txid) for a in handoffs} == {
        (t, r.txid) for t in range(2) for r in txs.revocations()}
    assert all(isinstance(a, SendToWatchtower) and a.vault_txid == DEPOSIT.outpoint.txid
               and len(a.signatures) == 3 for a in handoffs)
    assert not flow.done
    for a in handoffs:
        assert flow.on_ack(a.tower, a.txid, True, "") == []
    assert flow.done
    assert len(flow.fresh_acks) == 6


def test_secure_resumes_from_stored_acks_and_reaches_a_new_tower():
    txs = vault_txs()
    for rtx, reference in zip(txs.revocations(), vault_txs().revocations()):
        for sk in STK:
            rtx.signatures[0][pub(sk)] = reference.sign(0, sk)
    acked = {(r.txid, 0) for r in txs.revocations()}
    flow = SecureFlow(txs, DEPOSIT.outpoint.txid, STK[1], TOWERS, acked)
    handoffs = [a for a in flow.start() if isinstance(a, SendToWatchtower)]
    # tower 0 has them all already; only tower 1 (added since) gets them
    assert {a.tower for a in handoffs} == {1} and len(handoffs) == 3
    assert not any(isinstance(a, FetchSigs) for a in flow.start())


def test_watchtower_nack_is_retried_then_reported_with_its_reason():
    txs = vault_txs()
    flow = SecureFlow(txs, DEPOSIT.outpoint.txid, STK[0], TOWERS, set())
    flow.start()
    handoff = complete_secure(flow, txs)[0]
    for _ in range(MAX_WATCHTOWER_NACKS):
        [again] = flow.on_ack(handoff.tower, handoff.txid, False, "deposit unconfirmed")
        assert again.tower == handoff.tower and again.txid == handoff.txid and again.after > 0
    with pytest.raises(WatchtowerRefused, match="deposit unconfirmed"):
        flow.on_ack(handoff.tower, handoff.txid, False, "deposit unconfirmed")


def test_unvault_signature_needs_complete_acked_revocations():
    txs = vault_txs()
    with pytest.raises(NotSecured, match="lacks signatures"):
        SecuredVault.check(txs, TOWERS, set())
    for rtx, reference in zip(txs.revocations(), vault_txs().revocations()):
        for sk in STK:
            rtx.signatures[0][pub(sk)] = reference.sign(0, sk)
    some = {(r.txid, 0) for r in txs.revocations()}
    with pytest.raises(NotSecured, match="not acked by watchtower tower B"):
        SecuredVault.check(txs, TOWERS, some)
    with pytest.raises(NotSecured, match="no watchtower"):
        SecuredVault.check(txs, [], some)
    # A hand-made proof does not pass for one.
    with pytest.raises(NotSecured):
        ActivateFlow(SecuredVault(txs, object()), STK[0])
    secured = SecuredVault.check(txs, TOWERS, some | {(r.txid, 1) for r in txs.revocations()})
    activate = ActivateFlow(secured, STK[0])
    post, fetch = activate.start()
    assert post.uid == tx_uid(txs.unvault.txid) and isinstance(fetch, FetchSigs)


# --- spend ----------------------------------------------------------------------------

def spend_flow():
    txs = vault_txs()
    coin = txs.unvault.output_coin(0)
    payee = p2wpkh(pub(secret("payee")))
    spend = build_spend(DEPLOYMENT, [coin], [TxOut(coin.value - 100_000, payee)])
    spend.sign(0, MGR[0])
    vault_id = tx_uid(DEPOSIT.outpoint.txid)
    cosigners = [[pub(COS[0])]]
    return SpendFlow(spend, [vault_id], 1_700_000_000, [pub(k) for k in TOWER_KEYS],
                     cosigners), vault_id


def opinion(key: bytes, vault_id: str, accept: bool, reason: str, txid: str) -> RelayedOpinion:
    return RelayedOpinion.from_params(sign_opinion(key, vault_id, accept, reason, txid))


def test_spend_waits_for_every_watchtower_then_asks_every_cosigner():
    flow, vault_id = spend_flow()
    start = flow.start()
    assert [type(a) for a in start] == [RequestSpend, FetchOpinions]
    assert start[0].vault_id == vault_id and start[0].timestamp == 1_700_000_000
    one = [opinion(TOWER_KEYS[0], vault_id, True, "", flow.txid)]
    [poll] = flow.on_opinions(vault_id, one)
    assert isinstance(poll, FetchOpinions) and poll.after > 0
    both = one + [opinion(TOWER_KEYS[1], vault_id, True, "within limits", flow.txid)]
    [cosign] = flow.on_opinions(vault_id, both)
    assert isinstance(cosign, CosignerSign) and cosign.index == 0 and cosign.cosigner == 0
    assert not flow.done
    signature = flow.spend.signature_hash(0)
    sig = coincurve.PrivateKey(COS[0]).sign(signature, hasher=None)
    assert flow.on_cosignature(0, "cosigner", 0, sig) == []
    assert flow.done and flow.spend.is_complete()


def test_opinions_that_prove_nothing_are_not_counted():
    flow, vault_id = spend_flow()
    flow.start()
    other_txid = "cd" * 32
    stranger = secret("not a deployment watchtower")
    forged = opinion(TOWER_KEYS[1], vault_id, True, "", flow.txid)
    forged = RelayedOpinion(True, "changed after signing", forged.sig, forged.pubkey, forged.txid)
    opinions = [
        opinion(TOWER_KEYS[0], vault_id, True, "", flow.txid),
        opinion(TOWER_KEYS[1], vault_id, True, "", other_txid),   # another spend
        opinion(stranger, vault_id, True, "", flow.txid),         # not ours
        forged,                                                   # altered
        opinion(TOWER_KEYS[1], "ef" * 32, True, "", flow.txid),   # signed for another vault
    ]
    [poll] = flow.on_opinions(vault_id, opinions)
    assert isinstance(poll, FetchOpinions)
    assert not flow.approved
    assert len(flow.ignored) == 4


def test_a_refusal_names_the_watchtower_and_its_reason():
    flow, vault_id = spend_flow()
    flow.start()
    refusal = opinion(TOWER_KEYS[1], vault_id, False, "destination not allowed", flow.txid)
    with pytest.raises(SpendRefused) as info:
        flow.on_opinions(vault_id, [refusal])
    assert info.value.refusals == [(pub(TOWER_KEYS[1]).hex(), "destination not allowed")]
    assert "destination not allowed" in str(info.value)


def test_a_cosigner_signature_for_another_spend_is_refused():
    flow, vault_id = spend_flow()
    flow.start()
    flow.on_opinions(vault_id, [opinion(k, vault_id, True, "", flow.txid) for k in TOWER_KEYS])
    other = coincurve.PrivateKey(COS[0]).sign(b"\x01" * 32, hasher=None)
    with pytest.raises(CosignerMisbehaved, match="input 0"):
        flow.on_cosignature(0, "cosigner", 0, other)


def test_no_deployment_watchtower_means_no_spend():
    flow, _ = spend_flow()
    flow.watchtowers = set()
    with pytest.raises(FlowError, match="no watchtowers"):
        flow.start()


def test_a_batch_needs_each_watchtower_once_whichever_vault_it_answered():
    txs = [vault_txs(), build_vault_transactions(DEPLOYMENT, Coin(OutPoint("cd" * 32, 0),
                                                                   3_000_000, 0))]
    coins = [t.unvault.output_coin(0) for t in txs]
    spend = build_spend(DEPLOYMENT, coins, [TxOut(4_000_000, p2wpkh(pub(secret("payee"))))],
                        change_index=0)
    ids = [tx_uid("ab" * 32), tx_uid("cd" * 32)]
    flow = SpendFlow(spend, ids, 1, [pub(k) for k in TOWER_KEYS], [[pub(COS[0])] * 2])
    assert len(flow.start()) == 4  # a request and a poll per vault
    [again] = flow.on_opinions(ids[0], [opinion(TOWER_KEYS[0], ids[0], True, "", flow.txid)])
    assert again.vault_id == ids[0]
    cosign = flow.on_opinions(ids[1], [opinion(TOWER_KEYS[1], ids[1], True, "", flow.txid)])
    assert sorted(a.index for a in cosign) == [0, 1]
    # A late answer on the first vault asks nothing more.
    assert flow.on_opinions(ids[0], [opinion(k, ids[0], True, "", flow.txid)
                                      for k in TOWER_KEYS]) == []
    # A refusal on any vault of the batch refuses the spend.
    flow2 = SpendFlow(spend, ids, 1, [pub(k) for k in TOWER_KEYS], [[pub(COS[0])] * 2])
    flow2.start()
    with pytest.raises(SpendRefused):
        flow2.on_opinions(ids[1], [opinion(TOWER_KEYS[0], ids[1], False, "no", flow.txid)])


def test_a_vault_secured_with_every_tower_asks_nothing_more():
    txs = vault_txs()
    for rtx, reference in zip(txs.revocations(), vault_txs().revocations()):
        for sk in STK:
            rtx.signatures[0][pub(sk)] = reference.sign(0, sk)
    acked = {(r.txid, t) for r in txs.revocations() for t in range(2)}
    flow = SecureFlow(txs, DEPOSIT.outpoint.txid, STK[0], TOWERS, acked)
    assert flow.done and flow.start() == []
