"""A Revault deployment with every private key behind it, and regtest helpers to fund
and judge its transactions (shared by the regtest tests of the chain and of fees)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal

import coincurve
from embit.bip32 import HDKey

from revault.deployment import Deployment, p2wpkh, script_pubkey_to_address
from revault.primitives import OutPoint
from revault.transactions import Coin, RevaultTransaction, Tx
from tests.support.regtest import RegtestNode, sats

CSV = 6


@dataclass
class Participants:
    """A deployment together with every private key behind it."""

    deployment: Deployment
    secrets: list  # per role position: a 32-byte key, or an HDKey (xprv) for xpubs

    def secret(self, position: int, index: int) -> bytes:
        s = self.secrets[position]
        return s.child(index).key.secret if isinstance(s, HDKey) else s

    def keys_for(self, rtx: RevaultTransaction, input_index: int, vault_index: int) -> list[bytes]:
        """The private keys able to sign that input (stakeholders or managers+cosigners)."""
        wanted = set(rtx.signers(input_index))
        out = []
        for pos in range(len(self.secrets)):
            sk = self.secret(pos, vault_index)
            if coincurve.PrivateKey(sk).public_key.format() in wanted:
                out.append(sk)
        return out

    def sign(self, rtx: RevaultTransaction, vault_indexes: list[int] | None = None) -> RevaultTransaction:
        for i in range(len(rtx.spent)):
            index = (vault_indexes or [rtx.vault_index] * len(rtx.spent))[i]
            for sk in self.keys_for(rtx, i, index):
                rtx.sign(i, sk)
        assert rtx.is_complete()
        return rtx


def make_participants(flavor: str, n_stk=3, n_mgr=2, n_cos=3, threshold=None) -> Participants:
    sizes = (n_stk, n_mgr, n_cos, n_mgr)  # the last: the managers' CPFP keys
    secrets: list = []
    texts: list[list[str]] = [[], [], [], []]
    for role, count in enumerate(sizes):
        for j in range(count):
            seed = bytes([role + 1, j + 1]) * 16
            if flavor == "xpubs":
                root = HDKey.from_seed(seed, version=bytes.fromhex("04358394"))
                secrets.append(root)
                texts[role].append(root.to_public().to_string())
            else:
                sk = hashlib.sha256(seed).digest()
                secrets.append(sk)
                texts[role].append(coincurve.PrivateKey(sk).public_key.format().hex())
    table = {
        "network": "regtest",
        "stakeholders": texts[0],
        "managers": texts[1],
        "cosigners": texts[2],
        "cpfp_keys": texts[3],
        "unvault_csv": CSV,
        # p2wpkh of key 0x42..42: an address nobody in the test signs for.
        "emergency_address": script_pubkey_to_address(
            p2wpkh(coincurve.PrivateKey(b"\x42" * 32).public_key.format()), "regtest"
        ),
    }
    if threshold is not None:
        table["managers_threshold"] = threshold
    return Participants(Deployment.from_dict(table), secrets)


async def fund(node: RegtestNode, address: str, amount: int, index: int = 0) -> Coin:
    txid = await node.rpc("sendtoaddress", address, Decimal(amount) / Decimal(10**8), wallet=node.MINER_WALLET)
    tx = await node.rpc("getrawtransaction", txid, True)
    for out in tx["vout"]:
        if out["scriptPubKey"].get("address") == address and sats(out["value"]) == amount:
            return Coin(OutPoint(txid, out["n"]), amount, index)
    raise AssertionError(f"{txid} does not pay {address}")


async def accepted(node: RegtestNode, tx: Tx) -> dict:
    [result] = await node.rpc("testmempoolaccept", [tx.to_hex()])
    assert result["allowed"], result
    assert result["txid"] == tx.txid
    return result


async def rejected(node: RegtestNode, tx: Tx) -> str:
    [result] = await node.rpc("testmempoolaccept", [tx.to_hex()])
    assert not result["allowed"], result
    return result["reject-reason"]
