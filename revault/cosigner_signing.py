"""The cosigner's signing core: check a PSBT input, compute its BIP 143 digest, sign it.

Pure: no I/O, no asyncio, no storage. `CosignerKey.prepare()` turns `(psbt, index)` into
a `SigningRequest` (the outpoint that keys the once-per-outpoint store, and the digest to
sign) or raises `PsbtRefused` naming the reason; `CosignerKey.sign()` signs the digest.
The daemon decides *whether* to sign (the store); this module only decides *what*,
and refuses, before anything is stored, a spend that could never be valid or standard
(docs/protocol.md, "Cosigner rules"), so that no outpoint's one signature is burnt on it.

embit parses the PSBT container, but the transaction whose digest we sign is taken from
the PSBT's global unsigned transaction exactly as serialized: embit's `PSBT.tx` rebuilds
it with `sequence or 0xFFFFFFFF` and `version or 2`, which would silently sign a
different transaction for an input with nSequence 0 or a version-0 transaction.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

import coincurve
from bitcoin.core.script import CScript, CScriptInvalidError
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import Transaction, TransactionInput

from revault.deployment import MAX_MONEY, VaultKeys, p2wsh, script_relative_lock
from revault.errors import InvalidParams
from revault.primitives import PSBT_MAGIC, SIGHASH_ALL, OutPoint
from revault.transactions import (
    MAX_STANDARD_WEIGHT, MAX_WITNESS_SIGNATURE, TX_VERSION, Kind, SpendPath, SpentOutput, Tx,
    TxIn, TxOut, dust_threshold,
)


class PsbtRefused(InvalidParams):
    """A PSBT the cosigner will not sign: answered -32602, `"<field>: <reason>"`."""


@dataclass(frozen=True, slots=True)
class SigningRequest:
    """What the daemon needs to sign one input, and to log and audit it."""

    outpoint: OutPoint
    digest: bytes      # BIP 143 SIGHASH_ALL digest of the input
    spend_txid: str    # txid of the unsigned transaction (for the audit trail)
    amount: int        # satoshis of the spent output, as the PSBT claims


class _ExactTransaction(Transaction):
    """embit's Transaction, refusing bytes it would not write back identically (it reads
    a short nLockTime without complaint): the transaction signed must be the one sent."""

    @classmethod
    def parse(cls, data: bytes) -> _ExactTransaction:
        tx = super().parse(data)
        if tx.serialize() != data:
            raise ValueError("global transaction does not re-serialize to the same bytes")
        return tx


class _UnsignedTxPSBT(PSBT):
    """embit's PSBT, keeping the global unsigned transaction as parsed."""

    TX_CLS = _ExactTransaction
    unsigned_tx: Transaction | None = None

    def parse_tx(self, tx):
        self.unsigned_tx = tx
        super().parse_tx(tx)


def parse_psbt(tx_b64: str) -> _UnsignedTxPSBT:
    """Decode base64 and parse a BIP 174 (version 0) PSBT, or refuse it."""
    try:
        raw = binascii.a2b_base64(tx_b64.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise PsbtRefused("tx", "not valid base64") from None
    if not raw.startswith(PSBT_MAGIC):
        raise PsbtRefused("tx", "not a PSBT (bad magic)")
    try:
        psbt = _UnsignedTxPSBT.parse(raw)
    except Exception as e:  # noqa: BLE001 - embit raises anything from EmbitError to IndexError on garbage
        raise PsbtRefused("tx", f"not a valid PSBT ({_short(e)})") from None
    if psbt.version not in (None, 0):
        raise PsbtRefused("tx", f"PSBT version {psbt.version} is not supported (only version 0)")
    tx = psbt.unsigned_tx
    if tx is None:
        raise PsbtRefused("tx", "PSBT has no unsigned transaction")
    for i, txin in enumerate(tx.vin):
        # BIP 174: the global transaction is unsigned; a signed one means a confused client.
        if txin.script_sig.data or txin.witness.items:
            raise PsbtRefused("tx", f"input {i} of the unsigned transaction carries a scriptSig or witness")
        scope = psbt.inputs[i]
        # Version-0 PSBTs must not carry the v2 per-input outpoint fields; embit would let
        # them override the global transaction's, and we would key the store by the wrong one.
        # (Sequences are not compared: embit's own copy already turned nSequence 0 into
        # 0xffffffff; the digest uses the unsigned transaction's.)
        if (scope.txid, scope.vout) != (txin.txid, txin.vout):
            raise PsbtRefused("tx", f"input {i} fields contradict the unsigned transaction")
    return psbt


def _short(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def script_pushes(script: bytes) -> list[tuple[int, bytes]]:
    """(opcode, data) of every push in `script`; ValueError if a push runs past the end."""
    try:
        return [(op, data) for op, data, _ in CScript(script).raw_iter() if data is not None]
    except CScriptInvalidError as e:
        raise ValueError(str(e) or "truncated push") from None


def bip143_digest(tx: Transaction, index: int, witness_script: bytes, amount: int) -> bytes:
    """The SIGHASH_ALL BIP 143 digest of input `index`, script code = the witness script."""
    # A copy with plain inputs: the digest depends on prevouts, sequences, outputs,
    # version and locktime only, never on scriptSigs or witnesses.
    bare = Transaction(
        version=tx.version,
        locktime=tx.locktime,
        vin=[TransactionInput(txin.txid, txin.vout, sequence=txin.sequence) for txin in tx.vin],
        vout=list(tx.vout),
    )
    return bare.sighash_segwit(index, Script(witness_script), amount, SIGHASH_ALL)


def _check_spend(psbt: _UnsignedTxPSBT) -> None:
    """PsbtRefused unless the whole spend could be valid and standard once signed."""
    tx = psbt.unsigned_tx
    if tx.version != TX_VERSION:
        raise PsbtRefused("tx", f"version {tx.version}: a Revault spend is version {TX_VERSION}")
    if tx.locktime != 0:
        raise PsbtRefused("tx", f"nLockTime {tx.locktime}: a Revault spend has nLockTime 0")
    outpoints = [(txin.txid, txin.vout) for txin in tx.vin]
    if len(set(outpoints)) != len(outpoints):
        raise PsbtRefused("tx", "the same outpoint is spent twice")
    total_in = 0
    inputs = []
    for i, (txin, scope) in enumerate(zip(tx.vin, psbt.inputs)):
        utxo = scope.witness_utxo
        if utxo is None:
            raise PsbtRefused("tx", f"input {i} has no witness_utxo")
        if not 0 <= utxo.value <= MAX_MONEY:
            # An amount is a signed 64-bit integer (CAmount); embit reads it unsigned.
            amount = utxo.value - 2**64 if utxo.value >= 2**63 else utxo.value
            raise PsbtRefused("tx", f"input {i} witness_utxo amount {amount} is outside 0..21M BTC")
        total_in += utxo.value
        spk = utxo.script_pubkey.data
        if len(spk) != 34 or spk[:2] != b"\x00\x20":
            raise PsbtRefused("tx", f"input {i} is not P2WSH")
        if scope.witness_script is None:
            raise PsbtRefused("tx", f"input {i} has no witness_script")
        ws = scope.witness_script.data
        if p2wsh(ws) != spk:
            raise PsbtRefused("tx", f"input {i} witness_script does not match the witness_utxo scriptPubKey")
        csv = script_relative_lock(ws)
        if csv is None:
            raise PsbtRefused("tx", f"input {i} witness_script has no relative timelock (not an unvault output)")
        if txin.sequence != csv:
            raise PsbtRefused(
                "tx", f"input {i} nSequence {txin.sequence:#x} is not the csv ({csv}) of its witness script")
        inputs.append(TxIn(OutPoint(txin.txid.hex(), txin.vout), txin.sequence, _max_witness(ws)))
    outputs = []
    for n, out in enumerate(tx.vout):
        spk = out.script_pubkey.data
        if out.value < dust_threshold(spk):
            raise PsbtRefused("tx", f"output {n} pays {out.value} sat, below the dust limit {dust_threshold(spk)}")
        outputs.append(TxOut(out.value, spk))
    total_out = sum(o.value for o in outputs)
    if total_out > total_in:
        raise PsbtRefused("tx", f"outputs ({total_out} sat) exceed inputs ({total_in} sat)")
    weight = Tx(tx.version, tuple(inputs), tuple(outputs), tx.locktime).weight
    if weight > MAX_STANDARD_WEIGHT:
        raise PsbtRefused("tx", f"{weight} WU once signed (every signature at its largest), above the "
                                f"{MAX_STANDARD_WEIGHT} WU standard limit")


def _max_witness(witness_script: bytes) -> tuple[bytes, ...]:
    """The largest witness that can satisfy `witness_script`: exactly what build_spend
    counts for a Revault unvault output, else a bound (a signature for every key)."""
    keys = VaultKeys.from_unvault_script(witness_script)
    if keys is not None:
        return SpentOutput(0, p2wsh(witness_script), witness_script, SpendPath.UNVAULT_MANAGERS,
                           Kind.SPEND.sighash_type, keys).max_witness()
    pushes = script_pushes(witness_script)
    signatures = [b"\x00" * MAX_WITNESS_SIGNATURE for op, _ in pushes if op == 33]
    dummies = [b"" for _ in range(witness_script.count(0xAE) + witness_script.count(0xAF))]
    return (*signatures, *dummies, witness_script)


class CosignerKey:
    """The cosigner's secp256k1 key; the secret never appears in repr or messages."""

    __slots__ = ("_private", "public_key")

    def __init__(self, secret: bytes):
        self._private = coincurve.PrivateKey(secret)
        self.public_key: bytes = self._private.public_key.format(compressed=True)

    def __repr__(self) -> str:
        return f"CosignerKey(public_key={self.public_key.hex()})"

    def prepare(self, tx_b64: str, index: int) -> SigningRequest:
        """Check input `index` of the PSBT and compute what to sign; PsbtRefused if not."""
        psbt = parse_psbt(tx_b64)
        tx = psbt.unsigned_tx
        count = len(tx.vin)
        if not 0 <= index < count:
            plural = "input" if count == 1 else "inputs"
            raise PsbtRefused("tx", f"index {index} out of range ({count} {plural})")
        scope = psbt.inputs[index]
        if scope.witness_utxo is None:
            raise PsbtRefused("tx", f"input {index} has no witness_utxo")
        if scope.witness_script is None:
            raise PsbtRefused("tx", f"input {index} has no witness_script")
        if scope.sighash_type is not None and scope.sighash_type != SIGHASH_ALL:
            raise PsbtRefused(
                "tx", f"input {index} asks for sighash type {scope.sighash_type:#x}; only ALL (0x1) is signed")
        witness_script = scope.witness_script.data
        script_pubkey = scope.witness_utxo.script_pubkey.data
        if script_pubkey != p2wsh(witness_script):
            raise PsbtRefused(
                "tx", f"input {index} witness_script does not match the witness_utxo scriptPubKey "
                      "(expected P2WSH of the witness script)")
        try:
            pushes = script_pushes(witness_script)
        except ValueError as e:
            raise PsbtRefused("tx", f"input {index} witness_script is malformed ({e})") from None
        if not any(op == 33 and data == self.public_key for op, data in pushes):
            raise PsbtRefused("tx", f"input {index} witness_script does not contain the cosigner's key")
        _check_spend(psbt)
        amount = scope.witness_utxo.value
        txin = tx.vin[index]
        return SigningRequest(
            outpoint=OutPoint(txin.txid.hex(), txin.vout),
            digest=bip143_digest(tx, index, witness_script, amount),
            spend_txid=tx.txid().hex(),
            amount=amount,
        )

    def sign(self, digest: bytes) -> bytes:
        """DER ECDSA over a 32-byte digest; libsecp256k1 always yields low-S (RFC 6979 nonces)."""
        if len(digest) != 32:
            raise ValueError("a sighash digest is 32 bytes")
        return self._private.sign(digest, hasher=None)
