"""The cosigner's pure signing core (its store is tested in test_cosigner_store.py)."""

from __future__ import annotations

import hashlib
import os

import pytest
from bitcoin.core.script import OP_CHECKMULTISIGVERIFY, OP_CHECKSEQUENCEVERIFY, OP_CHECKSIGVERIFY, CScript

from revault.cosigner_signing import CosignerKey, PsbtRefused, bip143_digest, parse_psbt, script_pushes
from revault.primitives import OutPoint
from tests.support.cosigner_psbt import (assert_valid_signature, b64, kv, make_spend,
                                         p2wsh, pubkey, random_key, serialize_psbt)


@pytest.fixture
def key() -> CosignerKey:
    return CosignerKey(random_key())


def refusal(key: CosignerKey, psbt: str, index: int = 0) -> str:
    with pytest.raises(PsbtRefused) as info:
        key.prepare(psbt, index)
    assert info.value.field == "tx"
    return str(info.value)


# --- digest and signature ------------------------------------------------------------

@pytest.mark.parametrize("index", [0, 1, 2])
def test_signature_verifies_against_independent_bip143_digest(key, index):
    spend = make_spend(key.public_key, n_inputs=3)
    spend.inputs[1].amount = 123_456_789
    request = key.prepare(spend.psbt(), index)
    digest = spend.digest(index)  # python-bitcoinlib, not embit
    assert request.digest == digest
    assert request.outpoint == OutPoint(spend.inputs[index].txid.hex(), spend.inputs[index].vout)
    assert request.amount == spend.inputs[index].amount
    assert request.spend_txid == spend.tx().GetTxid()[::-1].hex()
    assert_valid_signature(key.sign(request.digest), digest, key.public_key)


@pytest.mark.parametrize("sequence,version,locktime", [
    (0, 2, 0),               # embit's PSBT.tx would turn sequence 0 into 0xffffffff
    (0xFFFFFFFF, 1, 0),
    (0xFFFFFFFE, 0, 800_000),  # ... and version 0 into 2
    (6, 2, 0x7FFFFFFF),  # python-bitcoinlib packs nLockTime signed
])
def test_digest_commits_to_exact_sequence_version_locktime(key, sequence, version, locktime):
    # prepare() refuses all of these before signing (see the refusals below); the digest
    # itself is still the one of the transaction exactly as serialized.
    spend = make_spend(key.public_key, n_inputs=2, version=version, locktime=locktime)
    for i in spend.inputs:
        i.sequence = sequence
    tx = parse_psbt(spend.psbt()).unsigned_tx
    digest = bip143_digest(tx, 1, spend.inputs[1].witness_script, spend.inputs[1].amount)
    assert digest == spend.digest(1)
    with pytest.raises(PsbtRefused):
        key.prepare(spend.psbt(), 1)


def test_amount_is_committed(key):
    spend = make_spend(key.public_key)
    first = key.prepare(spend.psbt(), 0).digest
    spend.inputs[0].amount += 1
    assert key.prepare(spend.psbt(), 0).digest != first


def test_signatures_are_low_s_der_over_many_digests(key):
    for _ in range(200):
        digest = os.urandom(32)
        assert_valid_signature(key.sign(digest), digest, key.public_key)


def test_sign_refuses_a_non_digest(key):
    with pytest.raises(ValueError):
        key.sign(b"\x00" * 31)


def test_explicit_sighash_all_is_accepted(key):
    spend = make_spend(key.public_key)
    spend.inputs[0].extra_fields.append((b"\x03", (1).to_bytes(4, "little")))
    assert key.prepare(spend.psbt(), 0).digest == spend.digest(0)


def test_repr_never_shows_the_secret():
    secret = random_key()
    key = CosignerKey(secret)
    assert secret.hex() not in repr(key)
    assert key.public_key.hex() in repr(key)


# --- refusals ---------------------------------------------------------------------------

@pytest.mark.parametrize("garbage,reason", [
    ("", "not a PSBT"),
    ("not base64 at all!", "not valid base64"),
    ("cHNidP8", "not valid base64"),                      # unpadded
    (b64(b"hello world"), "not a PSBT (bad magic)"),
    (b64(b"psbt\xff"), "not a valid PSBT"),
    (b64(b"psbt\xff\x01\x00\x05abcde\x00"), "not a valid PSBT"),
    ("é", "not valid base64"),
])
def test_garbage_is_refused(key, garbage, reason):
    assert reason in refusal(key, garbage)


def test_truncated_and_trailing_bytes_are_refused(key):
    raw = make_spend(key.public_key).psbt_bytes()
    for cut in (5, len(raw) // 2, len(raw) - 1):
        assert "not a valid PSBT" in refusal(key, b64(raw[:cut]))
    assert "not a valid PSBT" in refusal(key, b64(raw + b"\x00"))


def test_index_out_of_range(key):
    spend = make_spend(key.public_key, n_inputs=2)
    assert refusal(key, spend.psbt(), 3) == "tx: index 3 out of range (2 inputs)"
    assert refusal(key, spend.psbt(), 2) == "tx: index 2 out of range (2 inputs)"
    one = make_spend(key.public_key, n_inputs=1)
    assert refusal(key, one.psbt(), 1) == "tx: index 1 out of range (1 input)"


def test_missing_witness_utxo(key):
    spend = make_spend(key.public_key, n_inputs=2)
    spend.inputs[1].include_witness_utxo = False
    assert refusal(key, spend.psbt(), 1) == "tx: input 1 has no witness_utxo"
    # Without it the spend's fee and validity are unknown: input 0 is refused too.
    assert refusal(key, spend.psbt(), 0) == "tx: input 1 has no witness_utxo"


def test_non_witness_utxo_alone_is_not_enough(key):
    spend = make_spend(key.public_key)
    spend.inputs[0].include_witness_utxo = False
    prev = make_spend(key.public_key).tx().serialize()
    spend.inputs[0].extra_fields.append((b"\x00", prev))
    assert refusal(key, spend.psbt()) == "tx: input 0 has no witness_utxo"


def test_missing_witness_script(key):
    spend = make_spend(key.public_key)
    spend.inputs[0].include_witness_script = False
    assert refusal(key, spend.psbt()) == "tx: input 0 has no witness_script"


@pytest.mark.parametrize("bad_spk", [
    "other_script", "p2sh_wrapped", "raw_script", "v1_program",
])
def test_witness_script_not_matching_script_pubkey(key, bad_spk):
    spend = make_spend(key.public_key)
    script = spend.inputs[0].witness_script
    spk = {
        "other_script": bytes(p2wsh(script + b"\x51")),
        "p2sh_wrapped": b"\xa9\x14" + hashlib.new("ripemd160", hashlib.sha256(script).digest()).digest() + b"\x87",
        "raw_script": script,
        "v1_program": b"\x51\x20" + hashlib.sha256(script).digest(),
    }[bad_spk]
    spend.inputs[0].witness_utxo_script = spk
    assert "does not match the witness_utxo scriptPubKey" in refusal(key, spend.psbt())


def test_key_absent_from_witness_script(key):
    other = pubkey(random_key())
    spend = make_spend(other)
    assert refusal(key, spend.psbt()) == \
        "tx: input 0 witness_script does not contain the cosigner's key"


def test_key_must_be_a_33_byte_push(key):
    # The key's bytes inside a longer push, or behind a non-minimal OP_PUSHDATA1, are not
    # a key the script checks a signature against.
    for script in (b"\x22" + key.public_key + b"\x00" + b"\xac",
                   b"\x4c\x21" + key.public_key + b"\xac"):
        spend = make_spend(key.public_key)
        spend.inputs[0].witness_script = script
        assert "does not contain the cosigner's key" in refusal(key, spend.psbt())


def test_malformed_witness_script(key):
    spend = make_spend(key.public_key)
    spend.inputs[0].witness_script = b"\x21" + key.public_key + b"\x4d\xff"
    assert "witness_script is malformed" in refusal(key, spend.psbt())


@pytest.mark.parametrize("sighash_type", [0x81, 0x02, 0x03, 0x00, 0x41])
def test_sighash_other_than_all_is_refused(key, sighash_type):
    spend = make_spend(key.public_key)
    spend.inputs[0].extra_fields.append((b"\x03", sighash_type.to_bytes(4, "little")))
    assert f"sighash type {sighash_type:#x}" in refusal(key, spend.psbt())


def test_v2_outpoint_fields_in_a_v0_psbt_are_refused(key):
    spend = make_spend(key.public_key)
    spend.inputs[0].extra_fields.append((b"\x0e", os.urandom(32)))
    assert refusal(key, spend.psbt()) == "tx: input 0 fields contradict the unsigned transaction"


def test_psbt_version_2_is_refused(key):
    spend = make_spend(key.public_key)
    tx = spend.tx().serialize()
    version_2 = (b"\xfb", (2).to_bytes(4, "little"))
    raw = serialize_psbt(tx, [[]], 1, global_extra=[version_2])
    assert "not a valid PSBT" in refusal(key, b64(raw))
    # A well-formed BIP 370 PSBT: no global transaction, outpoints in the input maps.
    raw = (b"psbt\xff" + kv(b"\x02", (2).to_bytes(4, "little")) + kv(b"\x04", b"\x01")
           + kv(b"\x05", b"\x01") + kv(*version_2) + b"\x00"
           + kv(b"\x0e", os.urandom(32)) + kv(b"\x0f", b"\x00\x00\x00\x00")
           + kv(b"\x05", spend.inputs[0].witness_script) + b"\x00"
           + kv(b"\x03", (1000).to_bytes(8, "little")) + kv(b"\x04", b"\x51") + b"\x00")
    assert refusal(key, b64(raw)) == "tx: PSBT version 2 is not supported (only version 0)"


def test_signed_global_transaction_is_refused(key):
    spend = make_spend(key.public_key)
    tx = spend.tx()
    tx.vin[0].scriptSig = b"\x51"
    raw = serialize_psbt(tx.serialize(), [[(b"\x05", spend.inputs[0].witness_script)]], 1)
    assert "carries a scriptSig or witness" in refusal(key, b64(raw))


def test_script_pushes():
    assert script_pushes(b"\x00\x51\x02ab\x4c\x01c\x4d\x01\x00d\x4e\x01\x00\x00\x00e") == [
        (0, b""), (2, b"ab"), (0x4C, b"c"), (0x4D, b"d"), (0x4E, b"e")]
    for bad in (b"\x02a", b"\x4c", b"\x4d\x01", b"\x4e\x01\x00\x00", b"\x4c\x05abc"):
        with pytest.raises(ValueError):
            script_pushes(bad)


def test_psbt_with_other_inputs_lacking_metadata(key):
    # docs/protocol.md, "Cosigner rules": every input must show what it spends (amount, script), or the
    # spend's validity cannot be judged before its one signature is given.
    spend = make_spend(key.public_key, n_inputs=3)
    spend.inputs[2].include_witness_script = False
    assert refusal(key, spend.psbt(), 1) == "tx: input 2 has no witness_script"
    spend.inputs[0].include_witness_utxo = False
    assert refusal(key, spend.psbt(), 1) == "tx: input 0 has no witness_utxo"


def test_unknown_fields_are_tolerated(key):
    spend = make_spend(key.public_key)
    spend.inputs[0].extra_fields.append((b"\xfc\x05hello", b"proprietary"))
    assert key.prepare(spend.psbt(), 0).digest == spend.digest(0)


# --- what would burn an outpoint (docs/protocol.md, "Cosigner rules"; issue 9 item 6, issue 12 item 10) ---

def _tweaked(key, **changes):
    spend = make_spend(key.public_key, n_inputs=2)
    for name, value in changes.items():
        setattr(spend, name, value)
    return spend


@pytest.mark.parametrize("tweak,reason", [
    (dict(version=1), "tx: version 1: a Revault spend is version 2"),
    (dict(version=3), "tx: version 3: a Revault spend is version 2"),
    (dict(locktime=1), "tx: nLockTime 1: a Revault spend has nLockTime 0"),
    (dict(locktime=800_000), "tx: nLockTime 800000: a Revault spend has nLockTime 0"),
])
def test_version_and_locktime_refused(key, tweak, reason):
    assert refusal(key, _tweaked(key, **tweak).psbt(), 0) == reason


@pytest.mark.parametrize("field,value,reason", [
    *(("sequence", n, f"input 1 nSequence {n:#x} is not the csv (6) of its witness script")
      for n in (0xFFFFFFFD, 0xFFFFFFFF, 5, 7, 0)),
    *(("amount", n, f"input 1 witness_utxo amount {n} is outside 0..21M BTC")
      for n in (-1, -2**63, 2**63 - 1, 21_000_000 * 100_000_000 + 1)),
])
def test_one_bad_input_refuses_every_input(key, field, value, reason):
    spend = make_spend(key.public_key, n_inputs=2)
    setattr(spend.inputs[1], field, value)
    # Input 1 makes the whole spend invalid: input 0's signature is refused too.
    assert refusal(key, spend.psbt(), 0) == f"tx: {reason}"


def test_duplicate_inputs_refused(key):
    spend = make_spend(key.public_key, n_inputs=2)
    spend.inputs[1].txid, spend.inputs[1].vout = spend.inputs[0].txid, spend.inputs[0].vout
    assert refusal(key, spend.psbt(), 0) == "tx: the same outpoint is spent twice"


def test_non_p2wsh_input_refused(key):
    spend = make_spend(key.public_key, n_inputs=2)
    spend.inputs[1].witness_utxo_script = b"\x00\x14" + os.urandom(20)
    assert refusal(key, spend.psbt(), 0) == "tx: input 1 is not P2WSH"


def test_input_without_relative_lock_refused(key):
    spend = make_spend(key.public_key, n_inputs=2)
    spend.inputs[1].witness_script = b"\x21" + pubkey(random_key()) + b"\xac"
    assert refusal(key, spend.psbt(), 0) == \
        "tx: input 1 witness_script has no relative timelock (not an unvault output)"


def test_outputs_worth_more_than_inputs_refused(key):
    spend = make_spend(key.public_key, n_inputs=2)  # 200,000 in
    spend.outputs = [(200_001, spend.outputs[0][1])]
    assert refusal(key, spend.psbt(), 0) == "tx: outputs (200001 sat) exceed inputs (200000 sat)"
    spend.outputs = [(200_000, spend.outputs[0][1])]
    key.prepare(spend.psbt(), 0)  # a zero fee is for the CPFP output to fix, not invalid


def test_dust_output_refused(key):
    spend = make_spend(key.public_key)
    spend.outputs.append((1, bytes(p2wsh(b"x"))))
    assert refusal(key, spend.psbt(), 0) == "tx: output 1 pays 1 sat, below the dust limit 330"
    spend.outputs[-1] = (0, b"\x6a")  # a 0-value OP_RETURN is not dust
    key.prepare(spend.psbt(), 0)


def test_global_transaction_that_does_not_reserialize_refused(key):
    spend = make_spend(key.public_key)
    tx = spend.tx().serialize()
    for cut in (1, 2, 3, 4):  # embit reads a short nLockTime without complaint
        raw = serialize_psbt(tx[:-cut], [[(b"\x05", spend.inputs[0].witness_script)]], 1)
        assert "global transaction does not re-serialize to the same bytes" in refusal(key, b64(raw))


def test_worst_case_weight_over_the_standard_limit_refused(key):
    # 20 manager keys per input: a signature bound of 20 x 74 bytes each; enough inputs
    # push the worst case over 400,000 WU while the unsigned PSBT stays small.
    managers = [pubkey(random_key()) for _ in range(19)]
    script = bytes(CScript([19, *managers, 19, OP_CHECKMULTISIGVERIFY, key.public_key,
                            OP_CHECKSIGVERIFY, 6, OP_CHECKSEQUENCEVERIFY]))
    spend = make_spend(key.public_key, n_inputs=200)
    for i in spend.inputs:
        i.witness_script = script
    reason = refusal(key, spend.psbt(), 0)
    assert reason.startswith("tx: ") and "WU once signed" in reason and "400000 WU standard limit" in reason
    spend.inputs = spend.inputs[:100]
    spend.outputs = [(90_000 * 100, spend.outputs[0][1])]
    key.prepare(spend.psbt(), 0)
