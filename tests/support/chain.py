"""A Revault deployment with every private key behind it, and regtest helpers to judge
its transactions (shared by the regtest tests of the chain and of fees; funding is
`tests.support.regtest.fund`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import coincurve
from embit.bip32 import HDKey

from revault.deployment import Deployment, p2wpkh, script_pubkey_to_address
from revault.transactions import RevaultTransaction, Tx
from tests.support.keys import pub
from tests.support.regtest import RegtestNode

CSV = 6

# The pinned chain vector (docs/protocol.md, "Chain test vector"): private keys 01*32 ..
# 09*32, a 1 BTC deposit at aa..aa:1, and the unsigned pre-signed transactions.
CHAIN_VECTOR = json.loads((Path(__file__).parents[1] / "vectors" / "revault-chain.json")
                          .read_text())


def vector_deployment() -> Deployment:
    """The deployment of CHAIN_VECTOR, built from its private keys."""
    return Deployment.from_dict({
        "network": "regtest",
        "stakeholders": [pub(bytes([i]) * 32).hex() for i in (1, 2, 3)],
        "managers": [pub(bytes([i]) * 32).hex() for i in (4, 5)],
        "cosigners": [pub(bytes([6]) * 32).hex()],
        "cpfp_keys": [pub(bytes([i]) * 32).hex() for i in (7, 8)],
        "unvault_csv": CHAIN_VECTOR["unvault_csv"],
        "emergency_address": script_pubkey_to_address(
            bytes.fromhex(CHAIN_VECTOR["emergency_script_pubkey"]), "regtest"),
    })


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


async def accepted(node: RegtestNode, tx: Tx) -> dict:
    [result] = await node.rpc("testmempoolaccept", [tx.to_hex()])
    assert result["allowed"], result
    assert result["txid"] == tx.txid
    return result


async def rejected(node: RegtestNode, tx: Tx) -> str:
    [result] = await node.rpc("testmempoolaccept", [tx.to_hex()])
    assert not result["allowed"], result
    return result["reject-reason"]
