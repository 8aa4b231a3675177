"""Bitcoin Core on regtest accepts a spend carrying the running cosigner's signatures.

Deployment: 2 stakeholders, 2 managers (2-of-2), 1 cosigner = the `revault-cosigner`
daemon under test (its bitcoin key is in every unvault script). Two vaults are
deposited and unvaulted, then spent together in one batch: the managers sign, the
daemon signs input 0 and input 1 (over real Noise connections, from the PSBT that
revault.transactions produces), and Core takes the result once `unvault_csv` has passed.
A conflicting spend of the same unvault output is then refused (-32002, naming the
spend signed), and Core refuses what a manager could build with the signature given.
"""

from __future__ import annotations

import pytest

from revault.deployment import Deployment, p2wpkh, script_pubkey_to_address
from revault.rpc import REFUSED, RpcError
from revault.transactions import SignatureError, TxOut, build_spend, build_vault_transactions
from tests.support.keys import pub, secret
from tests.support.regtest import RegtestNode, fund, sats

CSV = 4
DEPOSIT_SATS = 2_000_000


async def mempool_verdict(node: RegtestNode, tx) -> dict:
    [result] = await node.rpc("testmempoolaccept", [tx.to_hex()])
    return result


async def test_spend_with_daemon_signatures_accepted_by_bitcoind(bitcoind: RegtestNode, cosigner):
    stakeholders = [secret("stakeholder 0"), secret("stakeholder 1")]
    managers = [secret("manager 0"), secret("manager 1")]
    d = Deployment.from_dict({
        "network": "regtest",
        "stakeholders": [pub(s).hex() for s in stakeholders],
        "managers": [pub(s).hex() for s in managers],
        "cosigners": [cosigner.bitcoin_pub.hex()],
        "cpfp_keys": [pub(secret("cpfp 0")).hex(), pub(secret("cpfp 1")).hex()],
        "unvault_csv": CSV,
        "emergency_address": script_pubkey_to_address(p2wpkh(pub(secret("emergency"))),
                                                      "regtest"),
    })

    # Two vaults, deposited then unvaulted (the stakeholders sign the unvaults).
    deposits = [await fund(bitcoind, d.deposit_address(), DEPOSIT_SATS) for _ in range(2)]
    bitcoind.mine(1)
    unvault_coins = []
    for deposit in deposits:
        unvault = build_vault_transactions(d, deposit).unvault
        for sk in stakeholders:
            unvault.sign(0, sk)
        tx = unvault.finalize()
        assert await bitcoind.rpc("sendrawtransaction", tx.to_hex()) == tx.txid
        unvault_coins.append(unvault.output_coin())
    bitcoind.mine(1)
    unvault_height = await bitcoind.rpc("getblockcount")

    # The managers' batch spend of both unvault outputs.
    payee = p2wpkh(pub(secret("payee")))
    # 1 sat/WU, the change back to a vault: a spend's fee is the managers' choice.
    spend = build_spend(d, unvault_coins, [TxOut(1_500_000, payee)], change_index=1,
                        feerate_sat_per_kwu=1000)
    for index in range(2):
        for sk in managers:
            spend.sign(index, sk)
    assert spend.missing_signatures(0) == [cosigner.bitcoin_pub]

    psbt = spend.to_psbt()
    async with await cosigner.client(0) as client:
        for index in range(2):
            result = await client.call("sign", {"tx": psbt, "index": index})
            # Checked against revault.transactions' own BIP 143 digest for this input.
            spend.add_signature(index, cosigner.bitcoin_pub, bytes.fromhex(result["signature"]))
    assert spend.is_complete()
    signed = spend.finalize()

    # BIP 68: refused until the unvault output is CSV blocks deep (next block counts).
    tip = await bitcoind.rpc("getblockcount")
    bitcoind.mine(unvault_height + CSV - 2 - tip)
    verdict = await mempool_verdict(bitcoind, signed)
    assert not verdict["allowed"] and verdict["reject-reason"] == "non-BIP68-final", verdict
    bitcoind.mine(1)
    verdict = await mempool_verdict(bitcoind, signed)
    assert verdict["allowed"], verdict
    assert sats(verdict["fees"]["base"]) == spend.fee

    # A conflicting spend of unvault output 0, asked of the cosigner by the other manager:
    # refused (-32002) naming the spend already signed; and the signature it gave does not
    # sign this transaction, so no valid conflicting spend can be completed.
    thief = p2wpkh(pub(secret("thief")))
    conflict = build_spend(d, unvault_coins[:1], [TxOut(900_000, thief)], change_index=2,
                           feerate_sat_per_kwu=1000)
    for sk in managers:
        conflict.sign(0, sk)
    async with await cosigner.client(1) as client:
        with pytest.raises(RpcError) as refused:
            await client.call("sign", {"tx": conflict.to_psbt(), "index": 0})
    assert refused.value.code == REFUSED
    assert refused.value.message == (f"outpoint {unvault_coins[0].outpoint} already signed for "
                                     f"spend {spend.txid}")
    given = spend.signatures[0][cosigner.bitcoin_pub]
    with pytest.raises(SignatureError):
        conflict.add_signature(0, cosigner.bitcoin_pub, given)
    conflict.signatures[0][cosigner.bitcoin_pub] = given  # what a thief would try
    verdict = await mempool_verdict(bitcoind, conflict.finalize())
    assert not verdict["allowed"]
    assert "script-verify" in verdict["reject-reason"], verdict

    # The honest spend goes through and confirms.
    assert await bitcoind.rpc("sendrawtransaction", signed.to_hex()) == signed.txid
    block = bitcoind.mine(1)[0]
    info = await bitcoind.rpc("getrawtransaction", signed.txid, True)
    assert info["blockhash"] == block

    assert await cosigner.daemon.stop() == 0
    log = cosigner.daemon.stderr()
    for coin in unvault_coins:
        assert f"signed outpoint {coin.outpoint}: new signature" in log
    assert f"sign refused for outpoint {unvault_coins[0].outpoint}: manager" in log
