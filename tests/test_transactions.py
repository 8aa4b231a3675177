"""Pure unit tests of revault.transactions (no bitcoind; tests/test_transactions_regtest.py
has Bitcoin Core judge the same transactions)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import coincurve
import pytest
from bitcoin.core import CTransaction, b2lx
from embit.bip32 import HDKey
from embit.descriptor import Descriptor
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import Transaction as EmbitTransaction

from revault.deployment import (
    Deployment,
    DeploymentError,
    DerivationError,
    address_to_script_pubkey,
    p2wpkh,
    script_pubkey_to_address,
)
from revault.fees import (
    P2WPKH_INPUT_MAX_WEIGHT,
    FeeBumpError,
    FeeCoin,
    bump_revocation,
    select_fee_inputs,
)
from revault.primitives import SIGHASH_ALL, SIGHASH_ALL_ANYONECANPAY, OutPoint, tx_uid
from revault.transactions import (
    FEERATE_SAT_PER_KWU,
    Coin,
    build_cancel,
    Kind,
    RevaultTransaction,
    SignatureError,
    TransactionError,
    Tx,
    TxOut,
    build_emergency,
    build_spend,
    build_unvault,
    build_vault_transactions,
    check_der_signature,
    dust_threshold,
    fee_for_weight,
    request_spend_size,
)
from tests.support.chain import CHAIN_VECTOR as VECTOR, vector_deployment
from tests.support.keys import pub, secret

N_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
REGTEST_EMERGENCY = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"


STK, MGR, COS, CPFP = (1, 2, 3), (11, 12), (21, 22, 23), (31, 32)


def table(**overrides):
    d = {
        "network": "regtest",
        "stakeholders": [pub(i).hex() for i in STK],
        "managers": [pub(i).hex() for i in MGR],
        "cosigners": [pub(i).hex() for i in COS],
        "cpfp_keys": [pub(i).hex() for i in CPFP],
        "unvault_csv": 6,
        "emergency_address": REGTEST_EMERGENCY,
    }
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


@pytest.fixture
def dep() -> Deployment:
    return Deployment.from_dict(table())


DEPOSIT = Coin(OutPoint("ab" * 32, 1), 1_000_000)


def sign_all(rtx, secrets_=None):
    for index in range(len(rtx.spent)):
        for i in secrets_ or STK:
            if pub(i) in rtx.signers(index):
                rtx.sign(index, secret(i))
    return rtx


# --- Deployment ------------------------------------------------------------------------


def test_deployment_defaults(dep: Deployment) -> None:
    assert dep.managers_threshold == 2
    assert dep.watchtowers == ()
    assert dep.unvault_csv == 6
    assert not dep.uses_xpubs
    assert dep.keys(0) == dep.keys(7)  # plain keys: every vault uses them
    assert dep.emergency_script_pubkey == address_to_script_pubkey(REGTEST_EMERGENCY, "regtest")


BAD_TABLES = [
    (dict(network="mainnet"), "deployment.network", "must be one of"),
    (dict(unvault_csv=0), "deployment.unvault_csv", "between 1 and 65535"),
    (dict(unvault_csv=65536), "deployment.unvault_csv", "between 1 and 65535"),
    (dict(unvault_csv=True), "deployment.unvault_csv", "integer"),
    (dict(unvault_csv="6"), "deployment.unvault_csv", "integer"),
    (dict(managers_threshold=0), "deployment.managers_threshold", "between 1 and"),
    (dict(managers_threshold=3), "deployment.managers_threshold", "between 1 and"),
    (dict(stakeholders=[pub(i).hex() for i in range(100, 121)]), "deployment.stakeholders", "1 to 20"),
    (dict(managers=[pub(i).hex() for i in range(100, 121)]), "deployment.managers", "1 to 20"),
    (dict(cosigners=[pub(i).hex() for i in range(100, 121)]), "deployment.cosigners", "0 to 20"),
    (dict(stakeholders=[]), "deployment.stakeholders", "1 to 20"),
    (dict(managers="02aa"), "deployment.managers", "list"),
    (dict(managers=[pub(11).hex(), pub(1).hex()]), "deployment.managers[1]",
     "duplicate key (same as deployment.stakeholders[0])"),
    (dict(cosigners=[pub(21).hex(), pub(21).hex().upper()]), "deployment.cosigners[1]", "duplicate key"),
    (dict(stakeholders=[pub(1).hex(), "02" + "ff" * 32]), "deployment.stakeholders[1]", "not on the curve"),
    (dict(stakeholders=["04" + "11" * 32]), "deployment.stakeholders[0]", "compressed"),
    (dict(stakeholders=[pub(1).hex()[:-2]]), "deployment.stakeholders[0]", "nor an xpub"),
    (dict(stakeholders=[7]), "deployment.stakeholders[0]", "must be a string"),
    (dict(emergency_address="bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"), "deployment.emergency_address",
     "not a valid regtest address"),
    (dict(emergency_address="bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt081"), "deployment.emergency_address",
     "not a valid regtest address"),
    (dict(unvault_csv=None), "deployment.unvault_csv", "missing"),
    (dict(cosigners=None), "deployment.cosigners", "missing"),
    (dict(spend_limit=3), "deployment.spend_limit", "unknown key"),
    (dict(watchtowers=[pub(50).hex(), pub(50).hex()]), "deployment.watchtowers[1]", "duplicate"),
    (dict(watchtowers="x"), "deployment.watchtowers", "list"),
]


@pytest.mark.parametrize("overrides,key,reason", BAD_TABLES)
def test_deployment_refused_with_named_key(overrides, key, reason) -> None:
    with pytest.raises(DeploymentError) as err:
        Deployment.from_dict(table(**overrides))
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    assert reason in str(err.value)
    assert isinstance(err.value, ValueError)


def test_deployment_bounds_accepted_at_the_limit() -> None:
    d = Deployment.from_dict(
        table(
            stakeholders=[pub(i).hex() for i in range(100, 120)],
            managers=[pub(i).hex() for i in range(200, 220)],
            cpfp_keys=[pub(i).hex() for i in range(400, 420)],
            cosigners=[],
            unvault_csv=65535,
            managers_threshold=1,
            watchtowers=[pub(300).hex()],
        )
    )
    assert len(d.stakeholders) == 20 and len(d.managers) == 20 and d.cosigners == ()
    assert d.watchtowers == (pub(300),)


def tpub(seed: int) -> tuple[HDKey, str]:
    root = HDKey.from_seed(bytes([seed]) * 32, version=bytes.fromhex("04358394"))
    return root, root.to_public().to_string()


def test_xpub_deployment_uses_child_i_of_every_key() -> None:
    roots = [tpub(s) for s in range(1, 9)]
    d = Deployment.from_dict(
        table(
            stakeholders=[x for _, x in roots[:3]],
            managers=[x for _, x in roots[3:5]],
            cosigners=[roots[5][1], roots[6][1], pub(23).hex()],  # mixed is fine
        )
    )
    assert d.uses_xpubs
    for index in (0, 5):
        keys = d.keys(index)
        assert keys.stakeholders == tuple(r.child(index).sec() for r, _ in roots[:3])
        assert keys.managers == tuple(r.child(index).sec() for r, _ in roots[3:5])
        assert keys.cosigners[2] == pub(23)
    assert d.deposit_address(0) != d.deposit_address(5)
    assert d.unvault_address(0) != d.unvault_address(5)
    with pytest.raises(DerivationError, match="vault index"):
        d.keys(2**31)
    with pytest.raises(TransactionError, match="vault index"):
        build_unvault(d, Coin(DEPOSIT.outpoint, DEPOSIT.value, 2**31))


def test_xpub_network_and_private_keys_refused() -> None:
    root, _ = tpub(1)
    mainnet_xpub = root.to_public(version=bytes.fromhex("0488b21e")).to_string()
    with pytest.raises(DeploymentError, match=r"deployment.stakeholders\[0\]: not a regtest extended public key"):
        Deployment.from_dict(table(stakeholders=[mainnet_xpub]))
    with pytest.raises(DeploymentError, match="PRIVATE") as err:
        Deployment.from_dict(table(managers=[root.to_string()]))
    assert root.to_string() not in str(err.value)  # a secret never reaches a message
    with pytest.raises(DeploymentError, match="duplicate"):
        Deployment.from_dict(table(stakeholders=[tpub(1)[1], tpub(1)[1]]))


# --- scripts -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_stk,n_mgr,k,n_cos", [(3, 2, 2, 3), (20, 20, 20, 3), (1, 3, 1, 0), (2, 20, 13, 20)])
def test_scripts_match_miniscript_compiler(n_stk, n_mgr, k, n_cos) -> None:
    d = Deployment.from_dict(
        table(
            stakeholders=[pub(100 + i).hex() for i in range(n_stk)],
            managers=[pub(200 + i).hex() for i in range(n_mgr)],
            cosigners=[pub(300 + i).hex() for i in range(n_cos)],
            cpfp_keys=[pub(400 + i).hex() for i in range(n_mgr)],
            managers_threshold=k,
            unvault_csv=65535,
        )
    )
    unvault = Descriptor.from_string(d.unvault_descriptor().split("#")[0])
    assert unvault.witness_script().data == d.unvault_witness_script()
    assert unvault.script_pubkey().data == d.unvault_script_pubkey()
    deposit = Descriptor.from_string(d.deposit_descriptor().split("#")[0])
    assert deposit.witness_script().data == d.deposit_witness_script()
    assert d.deposit_address() == deposit.address(network=_embit_regtest())
    assert len(d.unvault_witness_script()) <= 3600  # standard P2WSH script size


def _embit_regtest():
    from embit.networks import NETWORKS

    return NETWORKS["regtest"]


def test_unvault_script_layout(dep: Deployment) -> None:
    ws = dep.unvault_witness_script()
    # 3 <3 keys> 3 CHECKMULTISIG IFDUP NOTIF 2 <2 keys> 2 CHECKMULTISIGVERIFY
    # (<key> CHECKSIGVERIFY) x3 <6> CSV ENDIF
    assert ws[0] == 0x53 and ws[1 + 3 * 34 : 1 + 3 * 34 + 4] == bytes([0x53, 0xAE, 0x73, 0x64])
    assert ws[-3:] == bytes([0x56, 0xB2, 0x68])
    assert ws.count(bytes([0xAD])) >= 3


# --- serialization, sighash ------------------------------------------------------------


def test_serialization_and_sighash_match_an_independent_implementation(dep: Deployment) -> None:
    # revault.transactions computes these with python-bitcoinlib; embit is a separate
    # implementation of the same consensus rules (and Bitcoin Core judges on regtest).
    txs = build_vault_transactions(dep, DEPOSIT)
    for rtx in (txs.unvault, txs.cancel, txs.emergency, txs.unvault_emergency):
        unsigned = rtx.tx.serialize()
        other = EmbitTransaction.parse(unsigned)
        assert other.txid().hex() == rtx.txid
        for flag in (SIGHASH_ALL, SIGHASH_ALL_ANYONECANPAY):
            ours = rtx.signature_hash(0, flag)
            theirs = other.sighash_segwit(0, Script(rtx.spent[0].witness_script),
                                          rtx.spent[0].value, flag)
            assert ours == theirs
        signed = sign_all(rtx).finalize()
        assert Tx.from_bytes(signed.serialize()) == signed
        assert Tx.from_base64(signed.to_base64()) == signed
        assert signed.txid == rtx.txid  # witness does not change the txid
        assert b2lx(CTransaction.deserialize(signed.serialize()).GetTxid()) == signed.txid


def test_parse_rejects_garbage() -> None:
    good = sign_all(build_emergency(Deployment.from_dict(table()), DEPOSIT)).finalize().serialize()
    for bad in (good[:-1], good + b"\x00", b"", good[:10]):
        with pytest.raises(TransactionError):
            Tx.from_bytes(bad)


def test_sighash_flags_by_kind(dep: Deployment) -> None:
    assert Kind.UNVAULT.sighash_type == Kind.SPEND.sighash_type == SIGHASH_ALL
    for kind in (Kind.CANCEL, Kind.EMERGENCY, Kind.UNVAULT_EMERGENCY):
        assert kind.sighash_type == SIGHASH_ALL_ANYONECANPAY
    txs = build_vault_transactions(dep, DEPOSIT)
    for rtx in (txs.unvault, txs.cancel, txs.emergency, txs.unvault_emergency):
        signed = sign_all(rtx).finalize()
        sigs = signed.inputs[0].witness[1:-1]
        assert len(sigs) == 3 and all(s[-1] == rtx.kind.sighash_type for s in sigs)


# --- determinism and fees ---------------------------------------------------------------


def test_builders_are_deterministic() -> None:
    a = build_vault_transactions(Deployment.from_dict(table()), DEPOSIT)
    b = build_vault_transactions(Deployment.from_dict(table()), DEPOSIT)
    for x, y in zip(
        (a.unvault, a.cancel, a.emergency, a.unvault_emergency),
        (b.unvault, b.cancel, b.emergency, b.unvault_emergency),
    ):
        assert x.tx.serialize() == y.tx.serialize()
        assert x.sign(0, secret(1)) == y.sign(0, secret(1))  # RFC 6979
    assert a.cancel.tx.inputs[0].outpoint == OutPoint(a.unvault.txid, 0)
    assert a.unvault_emergency.tx.inputs[0].outpoint == OutPoint(a.unvault.txid, 0)
    assert a.emergency.tx.inputs[0].outpoint == DEPOSIT.outpoint
    assert a.unvault.uid == tx_uid(a.unvault.txid)


def test_presigned_fee_is_253_per_kwu_of_the_max_signed_weight(dep: Deployment) -> None:
    txs = build_vault_transactions(dep, DEPOSIT)
    # Emergency of a 3-stakeholder vault to a P2WPKH, by hand: non-witness part
    # 4 + 1 + 41 + 1 + 31 + 4 = 82 bytes (x4 = 328); witness 2 (marker, flag) + 1 (count)
    # + 1 (dummy) + 3 x (1 + 73) + (1 + 105) (script) = 332.
    assert txs.emergency.max_weight() == 660
    assert txs.emergency.fee == 167 == fee_for_weight(660)  # ceil(253 * 660 / 1000)
    for rtx in (txs.unvault, txs.cancel, txs.emergency, txs.unvault_emergency):
        assert rtx.fee == fee_for_weight(rtx.max_weight(), FEERATE_SAT_PER_KWU)
        signed = sign_all(rtx).finalize()
        assert signed.weight <= rtx.max_weight()
        assert 1000 * rtx.fee >= FEERATE_SAT_PER_KWU * signed.weight
        assert len(rtx.tx.inputs) == 1
        assert len(rtx.tx.outputs) == (2 if rtx.kind is Kind.UNVAULT else 1)
        assert rtx.tx.version == 2
    assert txs.unvault.tx.outputs[0].value == DEPOSIT.value - 30_000 - txs.unvault.fee
    assert txs.unvault.tx.outputs[1] == TxOut(30_000, dep.cpfp_script_pubkey())
    assert txs.cancel.tx.outputs[0].script_pubkey == dep.deposit_script_pubkey()
    assert txs.unvault.tx.outputs[0].script_pubkey == dep.unvault_script_pubkey()
    assert txs.emergency.tx.outputs[0].script_pubkey == dep.emergency_script_pubkey


def test_too_small_deposit_refused(dep: Deployment) -> None:
    with pytest.raises(TransactionError, match=r"under min_deposit_value \(500000 sat\): not a vault"):
        build_unvault(dep, Coin(DEPOSIT.outpoint, 499_999))
    with pytest.raises(TransactionError, match="under min_deposit_value"):
        build_emergency(dep, Coin(DEPOSIT.outpoint, 400))
    with pytest.raises(TransactionError, match="under min_deposit_value"):
        build_vault_transactions(dep, Coin(DEPOSIT.outpoint, 400))
    with pytest.raises(TransactionError, match="dust limit"):
        build_cancel(dep, Coin(DEPOSIT.outpoint, 400))
    with pytest.raises(TransactionError, match="value out of range"):
        build_emergency(dep, Coin(DEPOSIT.outpoint, 0))
    assert build_unvault(dep, Coin(DEPOSIT.outpoint, 500_000)).tx.outputs[1].value == 30_000
    assert dust_threshold(dep.deposit_script_pubkey()) == 330
    assert dust_threshold(p2wpkh(pub(1))) == 294
    assert dust_threshold(address_to_script_pubkey("mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn", "regtest")) == 546


# --- signatures -----------------------------------------------------------------------------


def test_wrong_key_and_wrong_flag_detected(dep: Deployment) -> None:
    cancel = build_vault_transactions(dep, DEPOSIT).cancel
    digest_acp = cancel.signature_hash(0)
    digest_all = cancel.signature_hash(0, SIGHASH_ALL)
    assert digest_acp != digest_all

    good = coincurve.PrivateKey(secret(1)).sign(digest_acp, hasher=None)
    cancel.verify_signature(0, pub(1), good)
    cancel.add_signature(0, pub(1), good)

    outsider = coincurve.PrivateKey(secret(99)).sign(digest_acp, hasher=None)
    with pytest.raises(SignatureError, match="not one of its signers"):
        cancel.add_signature(0, pub(99), outsider)
    with pytest.raises(SignatureError, match="not one of its signers"):
        cancel.sign(0, secret(11))  # a manager does not sign a cancel
    with pytest.raises(SignatureError, match="invalid signature"):
        cancel.verify_signature(0, pub(2), good)  # stakeholder 1's signature given as 2's

    wrong_flag = coincurve.PrivateKey(secret(2)).sign(digest_all, hasher=None)
    with pytest.raises(SignatureError, match=r"uses sighash ALL, must be ALL\|ANYONECANPAY"):
        cancel.add_signature(0, pub(2), wrong_flag)
    with pytest.raises(SignatureError, match="sighash byte ALL, must be ALL"):
        cancel.verify_witness_signature(0, pub(1), good + bytes([SIGHASH_ALL]))
    cancel.verify_witness_signature(0, pub(1), good + bytes([SIGHASH_ALL_ANYONECANPAY]))

    unvault = build_unvault(dep, DEPOSIT)
    acp_on_unvault = coincurve.PrivateKey(secret(3)).sign(
        unvault.signature_hash(0, SIGHASH_ALL_ANYONECANPAY), hasher=None
    )
    with pytest.raises(SignatureError, match=r"uses sighash ALL\|ANYONECANPAY, must be ALL"):
        unvault.verify_signature(0, pub(3), acp_on_unvault)
    assert pub(2) not in cancel.signatures[0]


def test_non_canonical_signatures_refused(dep: Deployment) -> None:
    emergency = build_emergency(dep, DEPOSIT)
    sig = emergency.sign(0, secret(1))
    r_len = sig[3]
    r = int.from_bytes(sig[4 : 4 + r_len], "big")
    s = int.from_bytes(sig[6 + r_len :], "big")
    high_s = N_ORDER - s
    rb = r.to_bytes(33, "big").lstrip(b"\x00")
    rb = b"\x00" + rb if rb[0] & 0x80 else rb
    sb = high_s.to_bytes(33, "big").lstrip(b"\x00")
    sb = b"\x00" + sb if sb[0] & 0x80 else sb
    body = b"\x02" + bytes([len(rb)]) + rb + b"\x02" + bytes([len(sb)]) + sb
    high = b"\x30" + bytes([len(body)]) + body
    with pytest.raises(SignatureError, match="not low-S"):
        emergency.verify_signature(0, pub(1), high)
    with pytest.raises(SignatureError, match="not DER"):
        emergency.verify_signature(0, pub(1), sig + b"\x01")
    with pytest.raises(SignatureError, match="not DER"):
        check_der_signature(b"\x30\x06\x02\x01\x00\x02\x01\x80")
    check_der_signature(sig)


def test_finalize_orders_multisig_signatures_by_key(dep: Deployment) -> None:
    emergency = build_emergency(dep, DEPOSIT)
    # Sign in reverse order: the witness still follows the script's key order.
    sigs = {i: emergency.sign(0, secret(i)) for i in reversed(STK)}
    with pytest.raises(TransactionError, match="missing"):
        build_emergency(dep, DEPOSIT).finalize()
    w = emergency.finalize().inputs[0].witness
    assert w[0] == b""
    assert w[1:4] == tuple(sigs[i] + bytes([SIGHASH_ALL_ANYONECANPAY]) for i in STK)
    assert w[4] == dep.deposit_witness_script()


def test_spend_witness_managers_branch() -> None:
    d = Deployment.from_dict(table(managers=[pub(i).hex() for i in (11, 12, 13)], managers_threshold=2,
                                   cpfp_keys=[pub(i).hex() for i in (31, 32, 33)]))
    unvault = build_unvault(d, DEPOSIT)
    coin = unvault.output_coin()
    spend = build_spend(d, [coin], [TxOut(coin.value // 2, p2wpkh(pub(77)))], change_index=0)
    assert spend.tx.inputs[0].sequence == 6
    assert spend.signers(0) == (pub(11), pub(12), pub(13), pub(21), pub(22), pub(23))
    for i in COS:
        spend.sign(0, secret(i))
    spend.sign(0, secret(13))
    assert set(spend.missing_signatures(0)) == {pub(11), pub(12)}
    with pytest.raises(TransactionError, match="missing signatures"):
        spend.finalize()
    spend.sign(0, secret(11))
    assert spend.missing_signatures(0) == []
    spend.sign(0, secret(12))  # a third manager signature is not used
    w = spend.finalize().inputs[0].witness
    flag = bytes([SIGHASH_ALL])
    sig = spend.signatures[0]
    # cos3 cos2 cos1 | dummy mgr11 mgr12 | dummy + 3 empty (stakeholders say no) | script
    assert w == (
        sig[pub(23)] + flag, sig[pub(22)] + flag, sig[pub(21)] + flag,
        b"", sig[pub(11)] + flag, sig[pub(12)] + flag,
        b"", b"", b"", b"", d.unvault_witness_script(),
    )
    assert spend.finalize().weight <= spend.max_weight()


def test_spend_bounds(dep: Deployment) -> None:
    coin = build_unvault(dep, DEPOSIT).output_coin()
    with pytest.raises(TransactionError, match="exceed inputs"):
        build_spend(dep, [coin], [TxOut(coin.value + 1, p2wpkh(pub(1)))], max_feerate_sat_per_kwu=None)
    with pytest.raises(TransactionError, match="dust"):
        build_spend(dep, [coin], [TxOut(100, p2wpkh(pub(1)))])
    with pytest.raises(TransactionError, match="twice"):
        build_spend(dep, [coin, coin], [TxOut(1000, p2wpkh(pub(1)))])
    with pytest.raises(TransactionError, match="no unvault"):
        build_spend(dep, [], [TxOut(1000, p2wpkh(pub(1)))])


def test_psbt_carries_what_a_cosigner_needs(dep: Deployment) -> None:
    coin = build_unvault(dep, DEPOSIT).output_coin()
    spend = build_spend(dep, [coin], [TxOut(coin.value // 2, p2wpkh(pub(5)))], change_index=0)
    psbt = PSBT.from_string(spend.to_psbt())
    inp = psbt.inputs[0]
    assert inp.witness_script.data == dep.unvault_witness_script()
    assert inp.witness_utxo.value == coin.value
    assert psbt.tx.sighash_segwit(0, Script(dep.unvault_witness_script()), coin.value, SIGHASH_ALL) == (
        spend.signature_hash(0)
    )


def test_addresses() -> None:
    spk = address_to_script_pubkey(REGTEST_EMERGENCY, "regtest")
    assert spk == bytes.fromhex("0014751e76e8199196d454941c45d1b3a323f1433bd6")
    assert script_pubkey_to_address(spk, "regtest") == REGTEST_EMERGENCY
    assert script_pubkey_to_address(spk, "bitcoin") == "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"
    taproot = "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0"
    assert address_to_script_pubkey(taproot, "bitcoin")[:2] == b"\x51\x20"
    p2sh = address_to_script_pubkey("2MzQwSSnBHWHqSAqtTVQ6v47XtaisrJa1Vc", "testnet")
    assert p2sh[0] == 0xA9 and len(p2sh) == 23
    for address, network in (
        (taproot, "regtest"),
        ("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2", "testnet"),
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5", "bitcoin"),  # bad checksum
        ("", "bitcoin"),
    ):
        with pytest.raises(ValueError):
            address_to_script_pubkey(address, network)


# --- fee bumping -----------------------------------------------------------------------------


def _coins(values):
    return [FeeCoin(OutPoint(f"{i + 1:064x}", 0), v) for i, v in enumerate(values)]


def _brute_force_cheapest(base_weight, base_fee, coins, rate):
    """(fee, number of inputs) of the cheapest subset reaching the target, or None."""
    best = None
    for r in range(len(coins) + 1):
        for combo in itertools.combinations(coins, r):
            fee = base_fee + sum(c.value for c in combo)
            weight = base_weight + P2WPKH_INPUT_MAX_WEIGHT * r
            if 1000 * fee >= rate * weight and (best is None or (fee, r) < best):
                best = (fee, r)
    return best


def test_fee_selection_is_the_least_overpayment() -> None:
    rng = random.Random(1)
    checked = 0
    for _ in range(80):
        coins = _coins([rng.randrange(1_000, 60_000) for _ in range(rng.randrange(1, 11))])
        rate = rng.choice([1_000, 5_000, 25_000])
        base_weight, base_fee = 885, 224
        if sum(c.value for c in coins) * 1000 < rate * (base_weight + 273 * len(coins)) - base_fee * 1000:
            continue
        try:
            sel = select_fee_inputs(base_weight, base_fee, coins, rate)
        except FeeBumpError:
            assert _brute_force_cheapest(base_weight, base_fee, coins, rate) is None
            continue
        assert sel.exact
        assert sel.overpayment_msat >= 0
        assert (sel.fee, len(sel.coins)) == _brute_force_cheapest(base_weight, base_fee, coins, rate)
        assert sel.fee == base_fee + sum(c.value for c in sel.coins)
        checked += 1
    assert checked > 20


def test_fee_selection_edges() -> None:
    # Already at the target: nothing added.
    sel = select_fee_inputs(1000, 253, _coins([5000]), 253)
    assert sel.coins == () and sel.overpayment_msat == 0
    # A coin worth less than its own input weight is never picked.
    tiny = _coins([1, 100_000])
    sel = select_fee_inputs(1000, 0, tiny, 10_000)
    assert [c.value for c in sel.coins] == [100_000]
    # Unreachable: a clear error with the shortfall.
    with pytest.raises(FeeBumpError, match="short by") as err:
        select_fee_inputs(1000, 0, _coins([10_000, 10_000]), 20_000)
    # need 20 * (1000 + 2 * 273) = 30920 sat, have 20000
    assert err.value.shortfall_sat == 30_920 - 20_000
    # Coins worth less than their own input at this feerate do not count at all.
    with pytest.raises(FeeBumpError, match="0 worth adding") as err:
        select_fee_inputs(1000, 0, _coins([3_000, 3_000]), 20_000)
    assert err.value.shortfall_sat == 20_000
    with pytest.raises(FeeBumpError, match="0 worth adding"):
        select_fee_inputs(1000, 0, [], 20_000)
    # Past the search budget the greedy fallback still reaches the target.
    coins = _coins(list(range(1000, 41_000, 1000)))
    sel = select_fee_inputs(5000, 0, coins, 10_000, max_steps=1)
    assert not sel.exact and sel.overpayment_msat >= 0
    full = select_fee_inputs(5000, 0, coins, 10_000)
    assert full.exact and full.overpayment_msat >= 0
    # 50000 + 2 x 2730 = 55460 sat needed; no pair of multiples of 1000 gets closer.
    assert full.fee == 56_000 < sel.fee


def test_bump_revocation_keeps_signatures_valid(dep: Deployment) -> None:
    cancel = sign_all(build_vault_transactions(dep, DEPOSIT).cancel)
    fee_key = secret(500)
    reserve = _coins([2_000, 7_000, 50_000])
    rate = 5_000  # 20 sat/vB
    with pytest.raises(TransactionError, match="fully signed"):
        bump_revocation(build_vault_transactions(dep, DEPOSIT).cancel, reserve, rate, fee_key)
    with pytest.raises(TransactionError, match="not a revocation"):
        bump_revocation(sign_all(build_unvault(dep, DEPOSIT)), reserve, rate, fee_key)
    bumped, sel = bump_revocation(cancel, reserve, rate, fee_key)
    assert [c.value for c in sel.coins] == [7_000]
    assert bumped.tx.outputs == cancel.tx.outputs
    assert bumped.spent[1].script_pubkey == p2wpkh(pub(500))
    assert bumped.sighash_type(1) == SIGHASH_ALL
    # The stakeholders' ALL|ANYONECANPAY signatures hold on the larger transaction.
    for i in STK:
        bumped.verify_signature(0, pub(i), cancel.signatures[0][pub(i)])
    bumped.verify_signature(1, pub(500), bumped.signatures[1][pub(500)])
    signed = bumped.finalize()
    assert signed.weight <= sel.max_weight
    assert 1000 * bumped.fee >= rate * signed.weight
    assert bumped.fee == cancel.fee + 7_000


def test_psbt_is_refused_rather_than_written_for_another_transaction(dep: Deployment) -> None:
    coin = build_unvault(dep, DEPOSIT).output_coin()
    spend = build_spend(dep, [coin], [TxOut(coin.value // 2, p2wpkh(pub(5)))], change_index=0)
    assert PSBT.from_string(spend.to_psbt()).tx.serialize() == spend.tx.serialize(with_witness=False)
    # embit would write nSequence 0 as 0xFFFFFFFF: a different transaction.
    tx = dataclasses.replace(spend.tx, inputs=tuple(
        dataclasses.replace(i, sequence=0) for i in spend.tx.inputs))
    zero = RevaultTransaction(spend.kind, tx, spend.spent, spend.vault_index)
    with pytest.raises(TransactionError, match="cannot be written as a PSBT"):
        zero.to_psbt()


# --- transactions v2: the pinned vector, CPFP outputs, spend guards ----------------------

def test_the_pinned_chain_vector_is_rebuilt_byte_for_byte() -> None:
    d = vector_deployment()
    keys = d.keys(0)
    assert [k.hex() for k in keys.stakeholders] == VECTOR["stakeholders"]
    assert [k.hex() for k in keys.managers] == VECTOR["managers"]
    assert [k.hex() for k in keys.cosigners] == VECTOR["cosigners"]
    assert [k.hex() for k in keys.cpfp] == VECTOR["cpfp_keys"]
    assert d.emergency_script_pubkey.hex() == VECTOR["emergency_script_pubkey"]
    assert d.deposit_script_pubkey().hex() == VECTOR["deposit_script_pubkey"]
    assert d.unvault_script_pubkey().hex() == VECTOR["unvault_script_pubkey"]
    assert d.cpfp_script_pubkey().hex() == VECTOR["cpfp_script_pubkey"]
    deposit = Coin(OutPoint.parse(VECTOR["deposit_outpoint"]), VECTOR["deposit_value"])
    txs = build_vault_transactions(d, deposit)
    for kind in ("unvault", "cancel", "emergency", "unvault_emergency"):
        rtx = getattr(txs, kind)
        assert rtx.tx.serialize().hex() == VECTOR[kind]["hex"], kind
        assert rtx.txid == VECTOR[kind]["txid"], kind
        assert rtx.fee == VECTOR[kind]["fee"], kind


def test_cpfp_script_and_descriptor(dep: Deployment) -> None:
    ws = dep.cpfp_witness_script()
    # 1 <cpfp_1> <cpfp_2> 2 CHECKMULTISIG
    assert ws == bytes([0x51, 33]) + pub(31) + bytes([33]) + pub(32) + bytes([0x52, 0xAE])
    desc = Descriptor.from_string(dep.cpfp_descriptor().split("#")[0])
    assert desc.witness_script().data == ws
    assert dep.cpfp_address() == desc.address(network=_embit_regtest())


def test_dust_threshold_knows_op_return_is_never_dust() -> None:
    assert dust_threshold(bytes([0x6A])) == 0
    assert dust_threshold(bytes([0x6A, 4]) + b"test") == 0
    assert dust_threshold(p2wpkh(pub(1))) == 294


def test_manager_only_deployment_has_no_emergencies() -> None:
    d = Deployment.from_dict(table(emergency_address=None))
    assert d.emergency_address is None and d.emergency_script_pubkey is None
    txs = build_vault_transactions(d, DEPOSIT)
    assert txs.emergency is None and txs.unvault_emergency is None
    assert txs.revocations() == (txs.cancel,)
    # The same unvault and cancel as the stakeholders': one chain, whoever builds it.
    full = build_vault_transactions(Deployment.from_dict(table()), DEPOSIT)
    assert (txs.unvault.txid, txs.cancel.txid) == (full.unvault.txid, full.cancel.txid)
    with pytest.raises(TransactionError, match="no emergency_address"):
        build_emergency(d, DEPOSIT)


MORE_BAD_TABLES = [
    (dict(cpfp_keys=None), "deployment.cpfp_keys", "missing"),
    (dict(cpfp_keys=[pub(31).hex()]), "deployment.cpfp_keys", "one key per manager (2), got 1"),
    (dict(cpfp_keys=[pub(31).hex(), pub(11).hex()]), "deployment.cpfp_keys[1]",
     "duplicate key (same as deployment.managers[0])"),
    (dict(min_deposit_value=49_999), "deployment.min_deposit_value", "between 50000 and"),
    (dict(min_deposit_value="1"), "deployment.min_deposit_value", "integer"),
]


@pytest.mark.parametrize("overrides,key,reason", MORE_BAD_TABLES)
def test_cpfp_and_deposit_keys_refused_with_named_key(overrides, key, reason) -> None:
    with pytest.raises(DeploymentError) as err:
        Deployment.from_dict(table(**overrides))
    assert err.value.key == key and reason in str(err.value)


def _unvault_coins(d: Deployment, n: int, index: int = 0, value: int = 1_000_000) -> list[Coin]:
    return [Coin(OutPoint(f"{i + 1:064x}", 0), value, index) for i in range(n)]


def test_spend_layout_cpfp_first_at_the_highest_index_then_payees_then_change() -> None:
    roots = [tpub(s) for s in range(1, 11)]
    d = Deployment.from_dict(table(
        stakeholders=[x for _, x in roots[:3]], managers=[x for _, x in roots[3:5]],
        cosigners=[x for _, x in roots[5:8]], cpfp_keys=[x for _, x in roots[8:10]]))
    coins = [Coin(OutPoint("11" * 32, 0), 800_000, 3), Coin(OutPoint("22" * 32, 1), 900_000, 7)]
    payee = TxOut(1_000_000, p2wpkh(pub(77)))
    spend = build_spend(d, coins, [payee], change_index=9, feerate_sat_per_kwu=1_000)
    cpfp, paid, change = spend.tx.outputs
    weight = spend.max_weight()
    assert cpfp == TxOut(16 * weight, d.cpfp_script_pubkey(7))
    assert paid == payee
    assert change.script_pubkey == d.deposit_script_pubkey(9)
    assert spend.fee == fee_for_weight(weight, 1_000)
    assert change.value == 1_700_000 - 1_000_000 - 16 * weight - spend.fee
    assert [i.sequence for i in spend.tx.inputs] == [6, 6]
    assert spend.vault_index == 7 and spend.output_coin(0).index == 7


def test_spend_change_that_would_be_dust_goes_to_the_fee(dep: Deployment) -> None:
    [coin] = _unvault_coins(dep, 1)
    draft = build_spend(dep, [coin], [TxOut(500_000, p2wpkh(pub(77)))], change_index=0)
    change = draft.tx.outputs[-1].value
    payee = TxOut(500_000 + change - 100, p2wpkh(pub(77)))  # leaves a 100-sat change
    spend = build_spend(dep, [coin], [payee], change_index=0)
    assert len(spend.tx.outputs) == 2
    assert spend.fee == coin.value - payee.value - spend.tx.outputs[0].value
    assert spend.fee > draft.fee


def test_spend_guards_refuse_before_anyone_signs(dep: Deployment) -> None:
    [coin] = _unvault_coins(dep, 1)
    spk = p2wpkh(pub(77))
    with pytest.raises(TransactionError, match=r"output 1 pays 100 sat, below the dust limit 294"):
        build_spend(dep, [coin], [TxOut(100, spk)], change_index=0)
    # A zero-fee spend: the payee takes all but the CPFP output.
    draft = build_spend(dep, [coin], [TxOut(500_000, spk)], max_feerate_sat_per_kwu=None)
    cpfp = draft.tx.outputs[0].value
    with pytest.raises(TransactionError, match=r"fee 0 sat is under 253 sat/kWU"):
        build_spend(dep, [coin], [TxOut(coin.value - cpfp, spk)])
    # The floor exactly: accepted; one satoshi less: refused.
    floor = fee_for_weight(draft.max_weight())
    assert build_spend(dep, [coin], [TxOut(coin.value - cpfp - floor, spk)]).fee == floor
    with pytest.raises(TransactionError, match="under 253 sat/kWU"):
        build_spend(dep, [coin], [TxOut(coin.value - cpfp - floor + 1, spk)])
    # An insane fee (no change, a small payee): refused unless the caller lifts the bound.
    with pytest.raises(TransactionError, match=r"above the sanity bound of 1000 sat/vB"):
        build_spend(dep, [coin], [TxOut(10_000, spk)])
    assert build_spend(dep, [coin], [TxOut(10_000, spk)], max_feerate_sat_per_kwu=None).fee > 900_000
    with pytest.raises(TransactionError, match="feerate must be at least 253"):
        build_spend(dep, [coin], [TxOut(10_000, spk)], change_index=0, feerate_sat_per_kwu=252)
    with pytest.raises(TransactionError, match="no payee"):
        build_spend(dep, [coin], [])


def test_spend_over_the_standard_weight_is_refused(dep: Deployment) -> None:
    # Issue 9: a 77-input 20/20/20 spend weighed 402,663 WU and was built anyway. (One
    # frame is the tighter bound for build_spend; the weight guard still holds alone.)
    d = Deployment.from_dict(table(
        stakeholders=[pub(100 + i).hex() for i in range(20)],
        managers=[pub(200 + i).hex() for i in range(20)],
        cosigners=[pub(300 + i).hex() for i in range(20)],
        cpfp_keys=[pub(400 + i).hex() for i in range(20)]))
    with pytest.raises(TransactionError, match=r"40\d{4} WU once signed .* above the 400000 WU standard limit"):
        build_spend(d, _unvault_coins(d, 77), [TxOut(1_000_000, p2wpkh(pub(77)))], change_index=0)


def _payee_and_change(d: Deployment, n: int) -> RevaultTransaction:
    return build_spend(d, _unvault_coins(d, n), [TxOut(100_000, p2wpkh(pub(77)))], change_index=1)


def largest_batch(d: Deployment) -> tuple[int, str]:
    """The most vaults one spend (a payee and a change) can take, and why one more fails."""
    lo, hi = 1, 2
    while True:
        try:
            _payee_and_change(d, hi)
        except TransactionError:
            break
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            _payee_and_change(d, mid)
            lo = mid
        except TransactionError:
            hi = mid
    with pytest.raises(TransactionError) as err:
        _payee_and_change(d, lo + 1)
    return lo, str(err.value)


def test_largest_batch_per_deployment_shape() -> None:
    """Printed with -s: the most vaults one spend can take for each deployment shape."""
    for n_stk, n_mgr, n_cos in ((3, 2, 3), (20, 20, 3), (20, 20, 20)):
        d = Deployment.from_dict(table(
            stakeholders=[pub(100 + i).hex() for i in range(n_stk)],
            managers=[pub(200 + i).hex() for i in range(n_mgr)],
            cosigners=[pub(300 + i).hex() for i in range(n_cos)],
            cpfp_keys=[pub(400 + i).hex() for i in range(n_mgr)]))
        n, why = largest_batch(d)
        spend = _payee_and_change(d, n)
        assert spend.max_weight() <= 400_000
        assert request_spend_size(spend.worst_case_signed()) <= 65501
        assert "standard limit" in why or "over one 65501-byte frame" in why
        print(f"\nlargest batch {n_stk}/{n_mgr}/{n_cos}: {n} vaults, "
              f"{spend.max_weight()} WU, request_spend {request_spend_size(spend.worst_case_signed())} bytes; "
              f"{n + 1}: {why.split(': ', 1)[1].split(',')[0]}")
