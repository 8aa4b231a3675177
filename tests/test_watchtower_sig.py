"""`sig` from the paired wallet, end to end: real bitcoind, sync server and watchtower.

Every ack and every refusal of the watchtower's `sig`: the deposit unknown, unconfirmed
or spent; a txid that is none of the vault's revocations; a signature missing, invalid
or of the wrong sighash type; a fee reserve that cannot bump the transaction to
max_feerate (then can, once funded); malformed params; a repeated sig; another peer.
"""

from __future__ import annotations

import hashlib

import pytest

from revault.rpc import INVALID_PARAMS, RpcClient, RpcError
from revault.primitives import SIGHASH_ALL
from revault.transport import TransportError
from revault.watchtower_store import DATABASE_NAME
from tests.support.daemons import NoiseIdentity
from tests.support.keys import pub, secret
from tests.support.watchtower import Deployed, Network


@pytest.fixture(scope="module")
def node(regtest_node):
    with regtest_node("bitcoind-watchtower-sig") as n:
        yield n


@pytest.fixture
async def net(daemon_dir, node):
    network = Network(daemon_dir, node, Deployed.create(daemon_dir.name))
    try:
        yield await network.start()
    finally:
        network.stop()


def refusal(result: dict, txid: str, reason_part: str) -> None:
    assert result["ack"] is False and result["txid"] == txid, result
    assert reason_part in result["reason"], result


async def test_every_revocation_acked_stored_and_acked_again(net: Network):
    vault = await net.deposit()
    await net.secure(vault)
    # A repeated identical sig is acked again.
    cancel = vault.txs.cancel
    assert await net.send_sig(net.sig_params(vault, cancel)) == {"ack": True,
                                                                "txid": cancel.txid}
    assert await net.tower.stop() == 0
    import sqlite3
    db = sqlite3.connect(net.tmp / "tower-data" / DATABASE_NAME)
    rows = db.execute("SELECT kind, txid FROM revocations").fetchall()
    assert sorted(rows) == sorted((t.kind.value, t.txid) for t in vault.txs.revocations())
    # What is stored is the fully signed transaction, and bitcoind would take the
    # emergency as it is (nothing spends the deposit yet).
    [signed] = db.execute("SELECT signed_tx FROM revocations WHERE kind = 'emergency'").fetchone()
    [verdict] = await net.node.rpc("testmempoolaccept", [bytes(signed).hex()])
    assert verdict["allowed"], verdict
    # The cancel and the unvault-emergency too, each as the child of the real unvault.
    unvault = net.deployed.signed_unvault(vault).to_hex()
    for kind in ("cancel", "unvault_emergency"):
        [signed] = db.execute("SELECT signed_tx FROM revocations WHERE kind = ?",
                              (kind,)).fetchone()
        verdicts = await net.node.rpc("testmempoolaccept", [unvault, bytes(signed).hex()])
        assert all(v["allowed"] for v in verdicts), (kind, verdicts)


async def test_deposit_unknown_unconfirmed_and_spent(net: Network):
    cancel_of = lambda v: v.txs.cancel  # noqa: E731
    unknown = await net.deposit(confirm=False)
    params = net.sig_params(unknown, cancel_of(unknown))
    params["vault_txid"] = hashlib.sha256(b"no such transaction").hexdigest()
    refusal(await net.send_sig(params), params["txid"], "deposit unknown")

    refusal(await net.send_sig(net.sig_params(unknown, cancel_of(unknown))),
            unknown.txs.cancel.txid, "deposit unconfirmed")

    net.node.mine(1)
    await net.unvault(unknown)
    refusal(await net.send_sig(net.sig_params(unknown, cancel_of(unknown))),
            unknown.txs.cancel.txid, "deposit already spent")


async def test_txid_none_of_the_revocations(net: Network):
    vault = await net.deposit()
    params = net.sig_params(vault, vault.txs.unvault)  # the unvault is no revocation
    refusal(await net.send_sig(params), vault.txs.unvault.txid, "matches none")


async def test_signature_missing_invalid_or_wrong_sighash(net: Network):
    vault = await net.deposit()
    cancel = vault.txs.cancel
    params = net.sig_params(vault, cancel)
    first = next(iter(params["signatures"]))
    missing = dict(params, signatures={k: v for k, v in params["signatures"].items()
                                       if k != first})
    refusal(await net.send_sig(missing), cancel.txid, "missing the signature")

    # A valid signature, but of the emergency: invalid for the cancel.
    other = net.sig_params(vault, vault.txs.emergency)["signatures"]
    invalid = dict(params, signatures=dict(params["signatures"], **{first: other[first]}))
    refusal(await net.send_sig(invalid), cancel.txid, "invalid signature")

    wrong = net.sig_params(vault, cancel, sighash=SIGHASH_ALL)
    refusal(await net.send_sig(wrong), cancel.txid, "uses sighash ALL")

    stranger = net.sig_params(vault, cancel)
    outsider = pub(secret("not a stakeholder")).hex()
    stranger["signatures"][outsider] = next(iter(params["signatures"].values()))
    refusal(await net.send_sig(stranger), cancel.txid, f"{outsider}: not a stakeholder key")
    # Nothing of these was stored: the good one is still acked as new.
    assert await net.send_sig(params) == {"ack": True, "txid": cancel.txid}
    assert f"cancel {cancel.txid} verified and stored" in net.log()
    assert "already stored" not in net.log()


async def test_malformed_params_get_32602(net: Network):
    async with await net.wallet_client() as client:
        for params, field in (({}, "signatures"),
                              ({"signatures": {}, "txid": "00" * 32, "vault_txid": "00" * 32},
                               "signatures"),
                              ({"signatures": {"02" + "00" * 32: "30"}, "txid": "zz",
                                "vault_txid": "00" * 32}, "signatures")):
            with pytest.raises(RpcError) as e:
                await client.call("sig", params)
            assert e.value.code == INVALID_PARAMS and field in e.value.message


async def test_other_peers_are_refused(net: Network, tmp_path):
    stranger = NoiseIdentity.create(tmp_path / "stranger.key")
    with pytest.raises((TransportError, OSError)):
        async with await RpcClient.connect("127.0.0.1", net.tower.port, stranger.private,
                                           net.tower_noise.public, timeout=5) as client:
            await client.call("sig", {}, timeout=5)


async def test_reserve_too_small_refuses_then_funded_accepts(daemon_dir, node):
    network = Network(daemon_dir, node, Deployed.create(daemon_dir.name), reserve_coins=(),
                      max_feerate=20)
    try:
        await network.start()
        vault = await network.deposit()
        cancel = vault.txs.cancel
        refusal(await network.send_sig(network.sig_params(vault, cancel)), cancel.txid,
                "fee reserve cannot bump it to max_feerate 20 sat/vB")
        await network.fund_reserve([100_000])
        assert await network.send_sig(network.sig_params(vault, cancel)) == {
            "ack": True, "txid": cancel.txid}
    finally:
        network.stop()
