from __future__ import annotations

import base64
import hashlib
import json

import coincurve
import pytest
from bitcoin.core import COutPoint, CMutableTransaction, CScriptWitness, CTxIn, CTxInWitness, \
    CTxOut, CTxWitness, lx
from bitcoin.core.script import CScript

from revault import messages as m
from revault.errors import InvalidParams as ParamsError
from revault.primitives import SECP256K1_HALF_ORDER, SECP256K1_ORDER, EncodingError, tx_uid

MISSING = object()

KEY_A = coincurve.PrivateKey(b"\x01" * 32)
KEY_B = coincurve.PrivateKey(b"\x02" * 32)
PUB_A = KEY_A.public_key.format().hex()
PUB_B = KEY_B.public_key.format().hex()
# x = 5: 5**3 + 7 is not a square mod p, so no point has this x.
OFF_CURVE = "02" + (5).to_bytes(32, "big").hex()
ID = "ab" * 32
TXID = "cd" * 32
N = SECP256K1_ORDER


def der(r: int, s: int) -> str:
    def integer(v: int) -> bytes:
        b = v.to_bytes((v.bit_length() + 7) // 8 or 1, "big")
        if b[0] & 0x80:
            b = b"\x00" + b
        return b"\x02" + bytes([len(b)]) + b
    body = integer(r) + integer(s)
    return (b"\x30" + bytes([len(body)]) + body).hex()


SIG = KEY_A.sign(hashlib.sha256(b"revault").digest(), hasher=None).hex()
R_INT = int.from_bytes(bytes.fromhex(SIG)[4:4 + bytes.fromhex(SIG)[3]], "big")
S_INT = 1234567  # any low S; r comes from a real signature to keep it in range
LOW_S_SIG = der(R_INT, S_INT)
HIGH_S_SIG = der(R_INT, N - S_INT)
# r with its high bit clear, padded with a superfluous 0x00: BER, not DER.
PADDED_R_SIG = "3007" + "02020001" + "020101"
NEGATIVE_R_SIG = "3006" + "020181" + "020101"
BAD_LENGTH_SIG = "3007" + "020101" + "020101"
ZERO_LENGTH_R_SIG = "3005" + "0200" + "020101"
# The outer length covers a byte after S: consistent framing, but not DER.
TRAILING_IN_SEQUENCE_SIG = "3007" + "020101" + "020101" + "00"


def make_tx(witness: bool) -> str:
    tx = CMutableTransaction(
        [CTxIn(COutPoint(lx(TXID), 1), nSequence=0xFFFFFFFD)],
        [CTxOut(12345, CScript(b"\x00\x14" + b"\x11" * 20))],
        nLockTime=0, nVersion=2)
    if witness:
        tx.wit = CTxWitness([CTxInWitness(CScriptWitness([b"\x30" * 71, b"\x02" * 33]))])
    return base64.b64encode(tx.serialize()).decode()


TX = make_tx(witness=False)
TX_WITNESS = make_tx(witness=True)
TX_BYTES = base64.b64decode(TX)
PSBT = base64.b64encode(b"psbt\xff" + b"\x01\x00\x00").decode()


def with_(good: dict, field: str, value) -> dict:
    obj = dict(good)
    if value is MISSING:
        del obj[field]
    else:
        obj[field] = value
    return obj


# --- reusable bad values per kind of field ---------------------------------------

def bad_ids(field):
    return [
        (field, MISSING), (field, None), (field, 5), (field, "ab" * 31),
        (field, "ab" * 33), (field, "AB" * 32), (field, "zz" * 32), (field, " " + "a" * 63),
        (field, ["ab" * 32]),
    ]


def bad_pubkeys(field):
    return [
        (field, MISSING), (field, 3), (field, PUB_A.upper()), (field, PUB_A[:-2]),
        (field, "04" + PUB_A[2:]), (field, OFF_CURVE),
        (field, KEY_A.public_key.format(compressed=False).hex()),
    ]


def bad_sigs(field):
    return [
        (field, MISSING), (field, 1), (field, ""), (field, SIG.upper()), (field, SIG + "01"),
        (field, SIG + "81"), (field, HIGH_S_SIG), (field, PADDED_R_SIG), (field, NEGATIVE_R_SIG),
        (field, BAD_LENGTH_SIG), (field, ZERO_LENGTH_R_SIG), (field, TRAILING_IN_SEQUENCE_SIG),
        (field, der(0, 1)),
        (field, der(N, 1)), (field, der(1, 0)), (field, "30" * 73), (field, SIG[:-1]),
    ]


def bad_transactions(field):
    return [
        (field, MISSING), (field, 7), (field, ""), (field, "not base64!"),
        (field, TX.rstrip("=")),                          # padding removed
        (field, TX[:-4]),                                 # truncated transaction
        (field, base64.b64encode(TX_BYTES + b"\x00").decode()),   # trailing byte
        (field, base64.urlsafe_b64encode(b"\xfb\xff" + TX_BYTES).decode()),
        (field, TX[:8] + "\n" + TX[8:]),
        (field, "A" * (4 * m.MAX_TX_BYTES)),             # too long, refused before decoding
    ]


CASES = [
    (m.SigParams, {"pubkey": PUB_A, "signature": SIG, "id": ID},
     bad_pubkeys("pubkey") + bad_sigs("signature") + bad_ids("id")),
    (m.GetSigsParams, {"id": ID}, bad_ids("id")),
    (m.ErrSigParams, {"id": ID}, bad_ids("id")),
    (m.GetSigsResult, {"signatures": {PUB_A: SIG, PUB_B: LOW_S_SIG}},
     [("signatures", MISSING), ("signatures", []), ("signatures", "x"),
      ("signatures", {f"02{i:064x}": SIG for i in range(m.MAX_RESULT_SIGNATURES + 1)})]),
    (m.RequestSpendParams, {"transaction": TX, "timestamp": 1_700_000_000, "vault_id": ID},
     bad_transactions("transaction") + bad_ids("vault_id") + [
         ("timestamp", MISSING), ("timestamp", -1), ("timestamp", 2**63), ("timestamp", True),
         ("timestamp", 1.0), ("timestamp", "1")]),
    (m.SpendRequest, {"transaction": TX_WITNESS, "timestamp": 0, "vault_id": ID},
     bad_transactions("transaction") + bad_ids("vault_id") + [("timestamp", False)]),
    (m.SpendOpinionParams,
     {"vault_id": ID, "accept": False, "reason": "too much", "sig": SIG, "pubkey": PUB_A,
      "txid": TXID},
     bad_ids("vault_id") + bad_ids("txid") + bad_sigs("sig") + bad_pubkeys("pubkey") + [
         ("accept", MISSING), ("accept", 0), ("accept", "false"), ("accept", None),
         ("reason", MISSING), ("reason", ""), ("reason", None), ("reason", 3),
         ("reason", "x" * (m.MAX_REASON_CHARS + 1)), ("reason", "bad \ud800 text")]),
    (m.RelayedOpinion,
     {"accepted": True, "reason": "", "sig": SIG, "pubkey": PUB_B, "txid": TXID},
     bad_ids("txid") + bad_sigs("sig") + bad_pubkeys("pubkey") + [
         ("accepted", MISSING), ("accepted", 1), ("reason", MISSING), ("reason", [])]),
    (m.GetSpendOpinionsParams, {"vault_id": ID}, bad_ids("vault_id")),
    (m.AckResult, {"ack": True}, [("ack", MISSING), ("ack", 1), ("ack", "true")]),
    (m.WatchtowerSigParams, {"signatures": {PUB_A: SIG}, "txid": TXID, "vault_txid": ID},
     bad_ids("txid") + bad_ids("vault_txid") + [
         ("signatures", MISSING), ("signatures", {}), ("signatures", [PUB_A, SIG]),
         ("signatures", {f"02{i:064x}": SIG for i in range(m.MAX_SIGNATURES + 1)})]),
    (m.WatchtowerSigResult, {"ack": True, "txid": TXID},
     bad_ids("txid") + [("ack", MISSING), ("ack", None)]),
    (m.SignParams, {"tx": PSBT, "index": 0}, [
        ("tx", MISSING), ("tx", 1), ("tx", ""), ("tx", TX),
        ("tx", base64.b64encode(b"psbt\x00").decode()), ("tx", PSBT.rstrip("=")),
        ("tx", "cHNid/8="[:-1] + "!"), ("index", MISSING), ("index", -1), ("index", 2**32),
        ("index", True), ("index", 0.0), ("index", "0")]),
    (m.SignResult, {"signature": SIG}, bad_sigs("signature")),
]

GOOD = [pytest.param(cls, good, id=cls.__name__) for cls, good, _ in CASES]
BAD = [pytest.param(cls, good, field, value, id=f"{cls.__name__}-{field}-{i}")
       for cls, good, bads in CASES for i, (field, value) in enumerate(bads)]


@pytest.mark.parametrize("cls,good", GOOD)
def test_good_params_round_trip(cls, good):
    parsed = cls.parse(dict(good, unknown_member={"ignored": [1, 2]}))
    assert parsed.to_json() == good
    assert cls.parse(parsed.to_json()) == parsed


@pytest.mark.parametrize("cls,good,field,value", BAD)
def test_bad_params_name_the_field(cls, good, field, value):
    with pytest.raises(ParamsError) as info:
        cls.parse(with_(good, field, value))
    assert info.value.field == field
    assert str(info.value) == f"{field}: {info.value.reason}"


@pytest.mark.parametrize("cls", [cls for cls, _, _ in CASES] + [m.GetSpendRequestsParams])
@pytest.mark.parametrize("obj", [None, [], "x", 1, True])
def test_params_must_be_an_object(cls, obj):
    with pytest.raises(ParamsError) as info:
        cls.parse(obj)
    assert info.value.field == "params"


def test_get_spend_requests_params_takes_nothing():
    assert m.GetSpendRequestsParams.parse({}).to_json() == {}
    assert m.GetSpendRequestsParams.parse({"future": 1}) == m.GetSpendRequestsParams()


def test_specific_reasons():
    def reason(cls, obj):
        with pytest.raises(ParamsError) as info:
            cls.parse(obj)
        return str(info.value)

    good = {"pubkey": PUB_A, "signature": SIG, "id": ID}
    assert reason(m.SigParams, with_(good, "signature", HIGH_S_SIG)) == "signature: not low-S"
    assert reason(m.SigParams, with_(good, "signature", SIG + "01")) == "signature: not DER"
    assert reason(m.SigParams, with_(good, "signature", PADDED_R_SIG)) == "signature: not DER"
    assert reason(m.SigParams, with_(good, "id", MISSING)) == "id: missing"
    assert reason(m.SigParams, with_(good, "id", ID.upper())) == "id: not lowercase hex"
    assert reason(m.SigParams, with_(good, "pubkey", OFF_CURVE)) == \
        "pubkey: not a valid public key"


def test_nested_signature_errors_name_the_pubkey():
    good = {"signatures": {PUB_A: SIG, PUB_B: SIG}, "txid": TXID, "vault_txid": ID}
    with pytest.raises(ParamsError) as info:
        m.WatchtowerSigParams.parse(dict(good, signatures={PUB_A: SIG, PUB_B: HIGH_S_SIG}))
    assert info.value.field == f"signatures.{PUB_B}"
    assert str(info.value) == f"signatures.{PUB_B}: not low-S"
    with pytest.raises(ParamsError) as info:
        m.GetSigsResult.parse({"signatures": {OFF_CURVE: SIG}})
    assert info.value.field == f"signatures.{OFF_CURVE}"
    with pytest.raises(ParamsError) as info:
        m.GetSigsResult.parse({"signatures": {PUB_A.upper(): SIG}})
    assert info.value.field == f"signatures.{PUB_A.upper()}"
    # A hostile key is not echoed whole.
    with pytest.raises(ParamsError) as info:
        m.GetSigsResult.parse({"signatures": {"k" * 10_000: SIG}})
    assert len(info.value.field) < 100


def test_empty_signature_map_is_a_valid_get_sigs_answer():
    assert m.GetSigsResult.parse({"signatures": {}}).signatures == {}


def test_boundaries_accepted():
    assert m.RequestSpendParams.parse(
        {"transaction": TX, "timestamp": 2**63 - 1, "vault_id": ID}).timestamp == 2**63 - 1
    assert m.SignParams.parse({"tx": PSBT, "index": 2**32 - 1}).index == 2**32 - 1
    assert m.check_der_low_s("s", der(R_INT, SECP256K1_HALF_ORDER)) == \
        bytes.fromhex(der(R_INT, SECP256K1_HALF_ORDER))
    with pytest.raises(ParamsError, match="not low-S"):
        m.check_der_low_s("s", der(R_INT, SECP256K1_HALF_ORDER + 1))
    reason = "r" * m.MAX_REASON_CHARS
    ok = {"vault_id": ID, "accept": False, "reason": reason, "sig": SIG, "pubkey": PUB_A,
          "txid": TXID}
    assert m.SpendOpinionParams.parse(ok).reason == reason


def test_non_canonical_transaction_encodings_refused():
    # A segwit marker with an all-empty witness deserializes but is not what Core accepts.
    raw = TX_BYTES[:4] + b"\x00\x01" + TX_BYTES[4:-4] + b"\x00" + TX_BYTES[-4:]
    assert raw != TX_BYTES
    with pytest.raises(ParamsError) as info:
        m.RequestSpendParams.parse({"transaction": base64.b64encode(raw).decode(),
                                    "timestamp": 0, "vault_id": ID})
    assert info.value.field == "transaction"
    # Base64 whose last character carries non-zero unused bits decodes to the same bytes.
    canonical = base64.b64encode(b"psbt\xff\x01\x02").decode()
    assert canonical.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = canonical[-3]
    # With "==" the last character carries 4 unused bits, which must be zero.
    twin = canonical[:-3] + alphabet[alphabet.index(last) + 1] + "=="
    assert base64.b64decode(twin) == base64.b64decode(canonical)
    assert m.SignParams.parse({"tx": canonical, "index": 0}).tx == canonical
    with pytest.raises(ParamsError, match="not canonical base64"):
        m.SignParams.parse({"tx": twin, "index": 0})


@pytest.mark.parametrize("vin,vout", [
    ([], [CTxOut(1, CScript(b"\x51"))]),
    ([CTxIn(COutPoint(lx(TXID), 0))], []),
])
def test_transaction_without_inputs_or_outputs_refused(vin, vout):
    tx = CMutableTransaction(vin, vout, nVersion=2)
    with pytest.raises(ParamsError) as info:
        m.RequestSpendParams.parse({"transaction": base64.b64encode(tx.serialize()).decode(),
                                    "timestamp": 0, "vault_id": ID})
    assert info.value.field == "transaction"
    if vin:
        assert info.value.reason == "transaction has no inputs or no outputs"


def test_list_results_name_the_element():
    good_request = {"transaction": TX, "timestamp": 5, "vault_id": ID}
    parsed = m.GetSpendRequestsResult.parse({"requests": [good_request]})
    assert parsed.requests == [m.SpendRequest(TX, 5, ID)]
    assert parsed.to_json() == {"requests": [good_request]}
    with pytest.raises(ParamsError) as info:
        m.GetSpendRequestsResult.parse(
            {"requests": [good_request, dict(good_request, timestamp=-5)]})
    assert info.value.field == "requests[1].timestamp"
    with pytest.raises(ParamsError) as info:
        m.GetSpendRequestsResult.parse({"requests": [good_request, 3]})
    assert info.value.field == "requests[1]"
    with pytest.raises(ParamsError) as info:
        m.GetSpendRequestsResult.parse({"requests": {}})
    assert info.value.field == "requests"

    opinion = {"accepted": True, "reason": "", "sig": SIG, "pubkey": PUB_A, "txid": TXID}
    result = m.GetSpendOpinionsResult.parse({"vault_id": ID, "opinions": [opinion]})
    assert result.to_json() == {"vault_id": ID, "opinions": [opinion]}
    with pytest.raises(ParamsError) as info:
        m.GetSpendOpinionsResult.parse({"vault_id": ID, "opinions": [dict(opinion, sig="")]})
    assert info.value.field == "opinions[0].sig"
    with pytest.raises(ParamsError) as info:
        m.GetSpendOpinionsResult.parse({"vault_id": "x", "opinions": []})
    assert info.value.field == "vault_id"
    with pytest.raises(ParamsError) as info:
        m.GetSpendOpinionsResult.parse({"vault_id": ID,
                                        "opinions": [opinion] * (m.MAX_OPINIONS + 1)})
    assert info.value.field == "opinions"


def test_tx_uid():
    assert tx_uid("aa" * 32) == \
        "e0e77a507412b120f6ede61f62295b1a7b2ff19d3dcc8f7253e51663470c888e"
    with pytest.raises(EncodingError):
        tx_uid("AA" * 32)


def test_validators_return_bytes():
    assert m.check_hex("f", "00ff", 2) == b"\x00\xff"
    assert m.check_hex("f", "", None) == b""
    with pytest.raises(ParamsError, match="odd number"):
        m.check_hex("f", "abc", None)
    assert m.check_pubkey("f", PUB_A) == bytes.fromhex(PUB_A)
    assert m.check_der_low_s("f", SIG) == bytes.fromhex(SIG)


# --- opinions ---------------------------------------------------------------------------

VECTOR_KEY = b"\x11" * 32
VECTOR_VAULT_ID = "e0e77a507412b120f6ede61f62295b1a7b2ff19d3dcc8f7253e51663470c888e"
VECTOR_BYTES = (
    b'{"accept":false,"pubkey":"034f355bdcb7cc0af728ef3cceb9615d90684bb5b2ca5f859ab0f0b70407'
    b'5871aa","reason":"destination not allowed","sig":"","txid":"bbbbbbbbbbbbbbbbbbbbbbbbbbbb'
    b'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","vault_id":"e0e77a507412b120f6ede61f62295b1a7b2ff1'
    b'9d3dcc8f7253e51663470c888e"}')
VECTOR_SHA256 = "8b265ffc85b514801d49c5b5ecf4940137d6bdc37eebb22a27565721c9068837"
VECTOR_SIG = ("3044022036c532872f1ca4867e95bed71baf7f0e8ad41a3fb9b22d29bd7c3f7b81cf3b41022034"
              "37122e5766910afb78d335a9ae74d99dfe89e86bf66e684296ba442fda3894")


def vector_opinion() -> m.SpendOpinionParams:
    return m.sign_opinion(VECTOR_KEY, VECTOR_VAULT_ID, False, "destination not allowed", "b" * 64)


def test_opinion_test_vector_byte_for_byte():
    params = vector_opinion()
    assert params.pubkey == "034f355bdcb7cc0af728ef3cceb9615d90684bb5b2ca5f859ab0f0b704075871aa"
    assert m.opinion_signing_bytes(params) == VECTOR_BYTES
    assert hashlib.sha256(VECTOR_BYTES).hexdigest() == VECTOR_SHA256
    assert params.sig == VECTOR_SIG
    assert m.verify_opinion(params)


def test_opinion_vector_parsed_from_the_wire_verifies():
    wire = json.loads(VECTOR_BYTES)
    wire["sig"] = VECTOR_SIG
    wire["from_a_future_version"] = True
    params = m.SpendOpinionParams.parse(wire)
    assert m.opinion_signing_bytes(params) == VECTOR_BYTES
    assert m.verify_opinion(params)


def test_signing_bytes_keep_non_ascii_as_utf8():
    params = m.sign_opinion(VECTOR_KEY, ID, False, "montant refusé \u20ac", TXID)
    assert "montant refusé €".encode() in m.opinion_signing_bytes(params)
    assert m.verify_opinion(params)


def test_sign_verify_round_trip_accepting():
    params = m.sign_opinion(b"\x22" * 32, ID, True, "", TXID)
    assert params.accept is True and params.reason == ""
    assert m.SpendOpinionParams.parse(params.to_json()) == params
    assert m.verify_opinion(params)


@pytest.mark.parametrize("change", [
    {"accept": True}, {"reason": "destination allowed"}, {"txid": "bc" * 32},
    {"vault_id": "ef" * 32}, {"pubkey": PUB_A}, {"sig": SIG}, {"sig": ""},
    {"pubkey": OFF_CURVE},
])
def test_tampered_opinion_fails(change):
    params = vector_opinion()
    tampered = m.SpendOpinionParams(**{**params.to_json(), **change})
    assert not m.verify_opinion(tampered)


def test_high_s_twin_of_a_valid_opinion_fails():
    params = vector_opinion()
    sig = bytes.fromhex(params.sig)
    r = int.from_bytes(sig[4:4 + sig[3]], "big")
    s = int.from_bytes(sig[6 + sig[3]:], "big")
    twin = m.SpendOpinionParams(**{**params.to_json(), "sig": der(r, N - s)})
    assert not m.verify_opinion(twin)


def test_sign_opinion_refuses_bad_members():
    with pytest.raises(ParamsError) as info:
        m.sign_opinion(VECTOR_KEY, ID, False, "", TXID)
    assert info.value.field == "reason"
    with pytest.raises(ParamsError) as info:
        m.sign_opinion(VECTOR_KEY, "nope", True, "", TXID)
    assert info.value.field == "vault_id"
    with pytest.raises(ParamsError) as info:
        m.sign_opinion(VECTOR_KEY, ID, 1, "x", TXID)
    assert info.value.field == "accept"
    with pytest.raises(ValueError) as info:
        m.sign_opinion(b"\x11" * 31, ID, True, "", TXID)
    assert "11" * 31 not in str(info.value)


def test_relayed_opinion_to_params_round_trip_verifies():
    params = vector_opinion()
    relayed = m.RelayedOpinion.from_params(params)
    wire = relayed.to_json()
    assert wire == {"accepted": False, "reason": "destination not allowed",
                    "sig": VECTOR_SIG, "pubkey": params.pubkey, "txid": "b" * 64}
    rebuilt = m.RelayedOpinion.parse(json.loads(json.dumps(wire))).to_params(VECTOR_VAULT_ID)
    assert rebuilt == params
    assert m.verify_opinion(rebuilt)
    # Relayed under another vault, the same opinion no longer verifies.
    assert not m.verify_opinion(m.RelayedOpinion.parse(wire).to_params("ee" * 32))
    with pytest.raises(ParamsError) as info:
        relayed.to_params("EE" * 32)
    assert info.value.field == "vault_id"


@pytest.mark.parametrize("timestamp", [0, 7, 1_700_000_000, 2**63 - 1])
def test_spend_request_json_size_is_the_encoded_size(timestamp):
    request = m.SpendRequest.parse({"transaction": TX_WITNESS, "timestamp": timestamp,
                                    "vault_id": ID})
    encoded = json.dumps(request.to_json(), separators=(",", ":"), ensure_ascii=False)
    assert request.json_size() == len(encoded.encode("utf-8"))
