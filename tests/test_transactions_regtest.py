"""Bitcoin Core on regtest judges the Revault transaction chain.

Deployment of the spec's example size: 3 stakeholders, 2 managers (2-of-2), 3 cosigners,
unvault_csv = 6; once with plain public keys, once with xpubs at two vault indexes.
"""

from __future__ import annotations

import json

import coincurve
import pytest

from revault.deployment import p2wpkh, script_pubkey_to_address
from revault.fees import FeeCoin, bump_revocation
from revault.primitives import SIGHASH_ALL, SIGHASH_ALL_ANYONECANPAY, OutPoint, tx_uid
from revault.transactions import (
    Coin,
    Kind,
    RevaultTransaction,
    SignatureError,
    TransactionError,
    Tx,
    TxIn,
    TxOut,
    build_spend,
    build_vault_transactions,
    sign_digest,
)
from tests.support.chain import CSV, accepted, make_participants, rejected
from tests.support.regtest import RegtestNode, fund, sats

DEPOSIT_SATS = 1_000_000
# docs/protocol.md, Transport: a frame carries at most 65501 bytes of plaintext.
MAX_MESSAGE = 65501
WEIGHTS: dict[str, dict[str, int]] = {}  # kind -> Core's numbers


async def broadcast_and_mine(node: RegtestNode, rtx: RevaultTransaction, tx: Tx | None = None) -> dict:
    """testmempoolaccept, send, check Core's fee/weight against ours, mine, confirm."""
    tx = tx if tx is not None else rtx.finalize()
    check = await accepted(node, tx)
    assert await node.rpc("sendrawtransaction", tx.to_hex()) == tx.txid
    entry = await node.rpc("getmempoolentry", tx.txid)
    fee = sats(entry["fees"]["base"])
    assert fee == rtx.fee == sats(check["fees"]["base"])
    assert entry["weight"] == tx.weight and entry["vsize"] == check["vsize"] == tx.vsize
    block = node.mine(1)[0]
    info = await node.rpc("getrawtransaction", tx.txid, True)
    assert info["blockhash"] == block and info["confirmations"] >= 1
    return {"weight": entry["weight"], "vsize": entry["vsize"], "fee": fee}


def record(kind: str, numbers: dict, rtx: RevaultTransaction) -> None:
    """Keep Core's numbers for the report (visible with -s)."""
    if kind not in WEIGHTS:
        WEIGHTS[kind] = {**numbers, "max_weight": rtx.max_weight()}
        print(f"\n{kind:34} " + " ".join(f"{k}={v}" for k, v in WEIGHTS[kind].items()))


CASES = [("pubkeys", 0), ("xpubs", 3), ("xpubs", 1000)]


@pytest.mark.parametrize("flavor,index", CASES)
async def test_chain_accepted_by_bitcoind(bitcoind: RegtestNode, flavor: str, index: int) -> None:
    p = make_participants(flavor)
    d = p.deployment

    # Core derives the same addresses from our descriptors (miniscript included).
    for descriptor, address in (
        (d.deposit_descriptor(index), d.deposit_address(index)),
        (d.unvault_descriptor(index), d.unvault_address(index)),
    ):
        assert (await bitcoind.rpc("getdescriptorinfo", descriptor))["descriptor"] == descriptor
        assert await bitcoind.rpc("deriveaddresses", descriptor) == [address]

    vaults = [await fund(bitcoind, d.deposit_address(index), DEPOSIT_SATS, index) for _ in range(4)]
    bitcoind.mine(1)
    chains = [build_vault_transactions(d, coin) for coin in vaults]
    for chain in chains:
        for rtx in (chain.unvault, chain.cancel, chain.emergency, chain.unvault_emergency):
            p.sign(rtx)

    # Vault 0: emergency straight from the deposit.
    record("emergency", await broadcast_and_mine(bitcoind, chains[0].emergency), chains[0].emergency)

    # Vaults 1-3 are unvaulted; 1 is spent, 2 cancelled, 3 sent to the emergency address.
    record("unvault", await broadcast_and_mine(bitcoind, chains[1].unvault), chains[1].unvault)
    unvault_height = await bitcoind.rpc("getblockcount")
    for chain in chains[2:]:
        await broadcast_and_mine(bitcoind, chain.unvault)

    record("cancel", await broadcast_and_mine(bitcoind, chains[2].cancel), chains[2].cancel)
    record(
        "unvault_emergency",
        await broadcast_and_mine(bitcoind, chains[3].unvault_emergency),
        chains[3].unvault_emergency,
    )

    unvault_coin = chains[1].unvault.output_coin()
    payee = p2wpkh(coincurve.PrivateKey(b"\x43" * 32).public_key.format())
    # 1 sat per weight unit, a change back to a vault at the next index.
    spend = p.sign(build_spend(d, [unvault_coin], [TxOut(400_000, payee)], change_index=index + 1,
                               feerate_sat_per_kwu=1000))
    assert spend.tx.outputs[0].script_pubkey == d.cpfp_script_pubkey(index)
    assert spend.tx.outputs[2].script_pubkey == d.deposit_script_pubkey(index + 1)
    signed = spend.finalize()
    assert all(i.sequence == CSV for i in signed.inputs)

    # BIP 68: the unvault (in block h) can be spent in block h + CSV, so the mempool
    # (which checks for the next block) refuses while the tip is below h + CSV - 1.
    tip = await bitcoind.rpc("getblockcount")
    assert tip <= unvault_height + CSV - 2
    bitcoind.mine(unvault_height + CSV - 2 - tip)
    assert await bitcoind.rpc("getblockcount") == unvault_height + CSV - 2
    assert await rejected(bitcoind, signed) == "non-BIP68-final"
    bitcoind.mine(1)
    record("spend", await broadcast_and_mine(bitcoind, spend), spend)


async def test_cancel_fee_bumped_after_signing(bitcoind: RegtestNode) -> None:
    """A signed cancel gets one reserve input appended and pays the target feerate."""
    p = make_participants("pubkeys")
    d = p.deployment
    fee_key = b"\x77" * 32
    fee_address = script_pubkey_to_address(p2wpkh(coincurve.PrivateKey(fee_key).public_key.format()), "regtest")
    vault = await fund(bitcoind, d.deposit_address(), DEPOSIT_SATS)
    reserve = []
    for value in (3_000, 15_000, 40_000):
        coin = await fund(bitcoind, fee_address, value)
        reserve.append(FeeCoin(coin.outpoint, value))
    bitcoind.mine(1)
    chain = build_vault_transactions(d, vault)
    p.sign(chain.unvault)
    p.sign(chain.cancel)
    await broadcast_and_mine(bitcoind, chain.unvault)

    target = 10_000  # sat per 1000 WU = 40 sat/vB, far above the pre-signed 253
    bumped, selection = bump_revocation(chain.cancel, reserve, target, fee_key)
    # 15000 sat is the cheapest selection that reaches the target: 3000 sat is too
    # little, alone or with 15000 (which it would only make dearer).
    assert [c.value for c in selection.coins] == [15_000]
    tx = bumped.finalize()
    assert tx.txid != chain.cancel.txid and len(tx.inputs) == 2
    check = await accepted(bitcoind, tx)
    assert await bitcoind.rpc("sendrawtransaction", tx.to_hex()) == tx.txid
    entry = await bitcoind.rpc("getmempoolentry", tx.txid)
    fee = sats(entry["fees"]["base"])
    assert fee == bumped.fee == chain.cancel.fee + 15_000 == sats(check["fees"]["base"])
    assert 1000 * fee >= target * entry["weight"]
    # ... and not by much: what the reserve's granularity forces, nothing more.
    assert 1000 * fee - target * entry["weight"] <= selection.overpayment_msat + target * 4
    record("cancel bumped (+1 input)", {"weight": entry["weight"], "vsize": entry["vsize"], "fee": fee}, bumped)
    bitcoind.mine(1)
    assert (await bitcoind.rpc("getrawtransaction", tx.txid, True))["confirmations"] >= 1


async def test_bad_signatures_caught_before_broadcast(bitcoind: RegtestNode) -> None:
    """Wrong key, wrong sighash: refused by verify_signature; Core shows why it matters."""
    p = make_participants("pubkeys")
    d = p.deployment
    vault = await fund(bitcoind, d.deposit_address(), DEPOSIT_SATS)
    bitcoind.mine(1)
    chain = build_vault_transactions(d, vault)
    p.sign(chain.unvault)
    await broadcast_and_mine(bitcoind, chain.unvault)
    stk = [p.secret(i, 0) for i in range(3)]
    pubs = [coincurve.PrivateKey(s).public_key.format() for s in stk]

    # Wrong key: stakeholder 1 signs but the signature is sent as stakeholder 0's.
    cancel = chain.cancel
    wrong_key = sign_digest(stk[1], cancel.signature_hash(0))
    with pytest.raises(SignatureError, match="invalid signature"):
        cancel.add_signature(0, pubs[0], wrong_key)
    # A manager's key is not a cancel signer at all.
    manager_sk = p.secret(3, 0)
    manager_pub = coincurve.PrivateKey(manager_sk).public_key.format()
    with pytest.raises(SignatureError, match="not one of its signers"):
        cancel.add_signature(0, manager_pub, sign_digest(manager_sk, cancel.signature_hash(0)))

    # Wrong flag: a stakeholder signs the cancel with ALL instead of ALL|ANYONECANPAY.
    all_sig = sign_digest(stk[2], cancel.signature_hash(0, SIGHASH_ALL))
    with pytest.raises(SignatureError, match=r"must be ALL\|ANYONECANPAY"):
        cancel.add_signature(0, pubs[2], all_sig)

    # Why it matters: Core accepts that cancel as long as nobody bumps it, and rejects
    # it the moment a watchtower appends a fee input, which is exactly when it counts.
    cancel.add_signature(0, pubs[0], sign_digest(stk[0], cancel.signature_hash(0)))
    cancel.add_signature(0, pubs[1], sign_digest(stk[1], cancel.signature_hash(0)))
    good = RevaultTransaction(Kind.CANCEL, cancel.tx, cancel.spent, cancel.vault_index)
    good.signatures[0] = dict(cancel.signatures[0])
    good.signatures[0][pubs[2]] = sign_digest(stk[2], cancel.signature_hash(0))
    honest = good.finalize()
    w = list(honest.inputs[0].witness)
    w[3] = all_sig + bytes([SIGHASH_ALL])
    sneaky = Tx(honest.version, (TxIn(honest.inputs[0].outpoint, honest.inputs[0].sequence, tuple(w)),),
                honest.outputs, honest.locktime)
    await accepted(bitcoind, sneaky)
    fee_key = b"\x78" * 32
    fee_coin = await fund(
        bitcoind, script_pubkey_to_address(p2wpkh(coincurve.PrivateKey(fee_key).public_key.format()), "regtest"),
        50_000,
    )
    bitcoind.mine(1)
    bumped_good, _ = bump_revocation(good, [FeeCoin(fee_coin.outpoint, 50_000)], 5_000, fee_key)
    good_tx = bumped_good.finalize()
    bad_w = list(good_tx.inputs[0].witness)
    bad_w[3] = all_sig + bytes([SIGHASH_ALL])
    bumped_bad = Tx(good_tx.version, (TxIn(good_tx.inputs[0].outpoint, good_tx.inputs[0].sequence, tuple(bad_w)),
                                     good_tx.inputs[1]), good_tx.outputs, good_tx.locktime)
    assert "script-verify" in await rejected(bitcoind, bumped_bad)
    await accepted(bitcoind, good_tx)

    # A wrong-key signature that slipped through is refused by Core as well.
    wrong_w = list(honest.inputs[0].witness)
    wrong_w[1] = wrong_key + bytes([SIGHASH_ALL_ANYONECANPAY])
    forged = Tx(honest.version, (TxIn(honest.inputs[0].outpoint, honest.inputs[0].sequence, tuple(wrong_w)),),
                honest.outputs, honest.locktime)
    assert "script-verify" in await rejected(bitcoind, forged)


def request_spend_envelope(tx: Tx, vault_txid: str) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "method": "request_spend",
            "params": {"transaction": tx.to_base64(), "timestamp": 1700000000, "vault_id": tx_uid(vault_txid)},
            "id": 1,
        },
        separators=(",", ":"),
    ).encode()


LARGEST_BATCH = 15


async def test_largest_deployment_batch_of_15_fits_one_message(bitcoind: RegtestNode) -> None:
    """20 stakeholders, 20 managers (20-of-20), 3 cosigners: a spend of at most 15
    vaults (to one P2WPKH payee and a change back to a vault), fully signed with every
    signature at its largest, fits in one 65501-byte request_spend message; 16 do not."""
    p = make_participants("pubkeys", n_stk=20, n_mgr=20, n_cos=3)
    d = p.deployment
    payee = p2wpkh(coincurve.PrivateKey(b"\x44" * 32).public_key.format())

    def spend_of(unvault_coins: list[Coin]) -> RevaultTransaction:
        # 1 sat per weight unit; build_spend refuses what would not fit one frame.
        return build_spend(d, unvault_coins, [TxOut(100_000, payee)], change_index=0,
                           feerate_sat_per_kwu=1000)

    def fits(n: int) -> bool:
        fake = [Coin(OutPoint(f"{i + 1:064x}", 0), 900_000) for i in range(n)]
        try:
            worst = spend_of(fake).worst_case_signed()
        except TransactionError as e:
            assert "over one 65501-byte frame" in str(e)
            return False
        return len(request_spend_envelope(worst, fake[0].outpoint.txid)) <= MAX_MESSAGE

    largest = max(n for n in range(1, 40) if fits(n))
    assert largest == LARGEST_BATCH
    assert not fits(LARGEST_BATCH + 1)

    vaults = [await fund(bitcoind, d.deposit_address(), DEPOSIT_SATS) for _ in range(LARGEST_BATCH)]
    bitcoind.mine(1)
    unvaults = []
    for vault in vaults:
        chain = build_vault_transactions(d, vault)
        p.sign(chain.unvault)
        tx = chain.unvault.finalize()
        assert await bitcoind.rpc("sendrawtransaction", tx.to_hex()) == tx.txid
        unvaults.append(chain.unvault)
        record("unvault (20/20/3)", {"weight": tx.weight, "vsize": tx.vsize, "fee": chain.unvault.fee}, chain.unvault)
    bitcoind.mine(CSV)
    spend = p.sign(spend_of([u.output_coin() for u in unvaults]))
    signed = spend.finalize()
    envelope = request_spend_envelope(signed, vaults[0].outpoint.txid)
    assert len(envelope) <= MAX_MESSAGE
    assert signed.weight <= spend.max_weight()
    result = await accepted(bitcoind, signed)
    assert sats(result["fees"]["base"]) == spend.fee
    record(
        f"spend of {LARGEST_BATCH} vaults (20/20/3)",
        {"weight": signed.weight, "vsize": result["vsize"], "fee": spend.fee, "message_bytes": len(envelope)},
        spend,
    )
