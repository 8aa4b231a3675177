"""Build PSBTs for cosigner tests with python-bitcoinlib and a hand-written BIP 174 writer.

Deliberately independent of embit (which the cosigner parses with) so that a test's
expectations are not computed by the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field

import coincurve
from bitcoin.core import COutPoint, CMutableTransaction, CMutableTxIn, CMutableTxOut, CTxOut
from bitcoin.core.script import (OP_0, OP_2, OP_CHECKMULTISIGVERIFY,
                                 OP_CHECKSEQUENCEVERIFY, OP_CHECKSIGVERIFY, SIGHASH_ALL,
                                 SIGVERSION_WITNESS_V0, CScript, SignatureHash)

from revault.primitives import PSBT_MAGIC, SECP256K1_HALF_ORDER


def compact_size(n: int) -> bytes:
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return b"\xfe" + n.to_bytes(4, "little")
    return b"\xff" + n.to_bytes(8, "little")


def kv(key: bytes, value: bytes) -> bytes:
    return compact_size(len(key)) + key + compact_size(len(value)) + value


def serialize_psbt(unsigned_tx: bytes, inputs: list[list[tuple[bytes, bytes]]],
                   outputs_count: int, global_extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    out = PSBT_MAGIC + kv(b"\x00", unsigned_tx)
    for key, value in global_extra:
        out += kv(key, value)
    out += b"\x00"
    for fields in inputs:
        for key, value in fields:
            out += kv(key, value)
        out += b"\x00"
    out += b"\x00" * outputs_count
    return out


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def random_key() -> bytes:
    while True:
        secret = os.urandom(32)
        try:
            coincurve.PrivateKey(secret)
            return secret
        except ValueError:
            continue


def pubkey(secret: bytes) -> bytes:
    return coincurve.PrivateKey(secret).public_key.format(compressed=True)


def spend_script(manager_keys: list[bytes], cosigner_key: bytes, csv: int = 6) -> CScript:
    """Shaped like the manager branch of a Revault unvault script."""
    return CScript([OP_2, *manager_keys, OP_2, OP_CHECKMULTISIGVERIFY, cosigner_key,
                    OP_CHECKSIGVERIFY, csv, OP_CHECKSEQUENCEVERIFY])


def p2wsh(script: bytes) -> CScript:
    return CScript([OP_0, hashlib.sha256(script).digest()])


@dataclass
class SpendInput:
    txid: bytes = field(default_factory=lambda: os.urandom(32))  # display order
    vout: int = 0
    amount: int = 100_000
    witness_script: bytes = b""
    sequence: int = 6
    # What ends up in the PSBT input map; tests tamper with these.
    witness_utxo_script: bytes | None = None
    include_witness_utxo: bool = True
    include_witness_script: bool = True
    extra_fields: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def outpoint(self) -> str:
        return f"{self.txid.hex()}:{self.vout}"


@dataclass
class Spend:
    inputs: list[SpendInput]
    outputs: list[tuple[int, bytes]]  # (amount, scriptPubKey)
    version: int = 2
    locktime: int = 0

    def tx(self) -> CMutableTransaction:
        vin = [CMutableTxIn(COutPoint(i.txid[::-1], i.vout), nSequence=i.sequence)
               for i in self.inputs]
        vout = [CMutableTxOut(amount, CScript(spk)) for amount, spk in self.outputs]
        return CMutableTransaction(vin, vout, nLockTime=self.locktime, nVersion=self.version)

    def psbt_bytes(self) -> bytes:
        maps = []
        for i in self.inputs:
            fields = []
            if i.include_witness_utxo:
                spk = i.witness_utxo_script if i.witness_utxo_script is not None \
                    else bytes(p2wsh(i.witness_script))
                fields.append((b"\x01", CTxOut(i.amount, CScript(spk)).serialize()))
            if i.include_witness_script:
                fields.append((b"\x05", i.witness_script))
            fields.extend(i.extra_fields)
            maps.append(fields)
        return serialize_psbt(self.tx().serialize(), maps, len(self.outputs))

    def psbt(self) -> str:
        return b64(self.psbt_bytes())

    def digest(self, index: int) -> bytes:
        """The BIP 143 SIGHASH_ALL digest, computed by python-bitcoinlib."""
        i = self.inputs[index]
        return SignatureHash(CScript(i.witness_script), self.tx(), index, SIGHASH_ALL,
                             amount=i.amount, sigversion=SIGVERSION_WITNESS_V0)


def make_spend(cosigner_pub: bytes, n_inputs: int = 1, *, txid: bytes | None = None,
               vout: int = 0, destination: bytes | None = None, **kwargs) -> Spend:
    """A spend of `n_inputs` manager-branch outputs; input 0 may be pinned to an outpoint."""
    managers = [pubkey(random_key()), pubkey(random_key())]
    script = bytes(spend_script(managers, cosigner_pub))
    inputs = [SpendInput(witness_script=script) for _ in range(n_inputs)]
    if txid is not None:
        inputs[0].txid = txid
        inputs[0].vout = vout
    dest = destination if destination is not None else bytes(p2wsh(os.urandom(20)))
    return Spend(inputs, [(90_000 * n_inputs, dest)], **kwargs)


def der_s(signature: bytes) -> int:
    """The S value of a DER signature (strictly parsed, so a malformed one fails here)."""
    assert signature[0] == 0x30 and signature[1] == len(signature) - 2
    assert signature[2] == 0x02
    r_len = signature[3]
    s_at = 4 + r_len
    assert signature[s_at] == 0x02
    s_len = signature[s_at + 1]
    assert s_at + 2 + s_len == len(signature)
    return int.from_bytes(signature[s_at + 2:], "big")


def assert_valid_signature(signature: bytes, digest: bytes, pub: bytes) -> None:
    assert coincurve.PublicKey(pub).verify(signature, digest, hasher=None)
    assert der_s(signature) <= SECP256K1_HALF_ORDER, "signature is not low-S"

