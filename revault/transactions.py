"""The Revault transaction chain: its transactions, their builders, their signatures.

Everything here is pure (no I/O) and deterministic: every participant who holds the
same deployment (`revault.deployment`: keys, scripts, addresses) and sees the same
deposit builds byte-identical unsigned transactions, which is what lets signatures be
exchanged by transaction id alone. Fee reserve selection and bumping live in
`revault.fees`, on top of this module.

Fees: pre-signed transactions (unvault, cancel, emergency, unvault-emergency) pay
``ceil(253 * max_weight / 1000)`` where ``max_weight`` is the weight of the transaction
once fully signed with every signature at its largest (72 DER bytes + 1 sighash byte).
Real low-S signatures are at most 71 + 1 bytes, so the real feerate is never below
253 sat per 1000 weight units and the fee itself is known before anyone signs.

The unvault and the spend carry a CPFP output (the unvault's `[1]`, 30,000 sat; the
spend's `[0]`, 16 sat per worst-case weight unit) so that a child can pay for them when
their frozen fee no longer gets into the mempool (`revault.fees.build_cpfp`).

Sighash types: ALL|ANYONECANPAY for cancel, emergency and unvault-emergency (so a
watchtower can append fee inputs without invalidating them), ALL for unvault, spend and
CPFP children.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import coincurve
from bitcoin.core import (
    COutPoint, CScriptWitness, CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness, b2lx, lx,
)
from bitcoin.core.script import SIGVERSION_WITNESS_V0, CScript, SignatureHash

from revault.deployment import (
    MAX_MONEY, Deployment, DerivationError, VaultKeys, address_to_script_pubkey, p2wsh,
    witness_program,
)
from revault.primitives import (
    MAX_DER_SIGNATURE, SIGHASH_ALL, SIGHASH_ALL_ANYONECANPAY, OutPoint, der_signature_problem,
    tx_uid,
)
from revault.transport import MAX_PLAINTEXT

__all__ = [
    "FEERATE_SAT_PER_KWU", "MAX_WITNESS_SIGNATURE", "RBF_SEQUENCE", "TX_VERSION",
    "TransactionError", "SignatureError",
    "TxIn", "TxOut", "Tx", "Coin", "Kind", "SpendPath", "SpentOutput",
    "RevaultTransaction", "VaultTransactions",
    "build_unvault", "build_cancel", "build_emergency", "build_unvault_emergency",
    "build_spend", "build_vault_transactions", "cpfp_spent", "request_spend_size",
    "dust_threshold", "fee_for_weight", "sign_digest", "check_der_signature",
    "UNVAULT_CPFP_VALUE", "SPEND_CPFP_SAT_PER_WU", "MAX_STANDARD_WEIGHT",
    "MAX_SANE_FEERATE_SAT_PER_KWU",
]

FEERATE_SAT_PER_KWU = 253  # the seed's fixed feerate for pre-signed transactions
MAX_WITNESS_SIGNATURE = MAX_DER_SIGNATURE + 1  # + sighash byte
TX_VERSION = 2  # BIP 68 relative locks need version >= 2
RBF_SEQUENCE = 0xFFFFFFFD  # replaceable, locktime enabled, BIP 68 disabled
DUST_RELAY_FEERATE = 3000  # sat per 1000 vbytes, Bitcoin Core's -dustrelayfee default
UNVAULT_CPFP_VALUE = 30_000  # sat, the unvault's output [1] (docs/protocol.md, the spec)
SPEND_CPFP_SAT_PER_WU = 16  # a spend's CPFP output: 16 sat per worst-case weight unit
MAX_STANDARD_WEIGHT = 400_000  # Bitcoin Core's MAX_STANDARD_TX_WEIGHT
# Above 1,000 sat/vB a fee is a mistake (a misplaced change, a unit confusion) more
# often than a wish; build_spend refuses it unless the caller lifts the bound.
MAX_SANE_FEERATE_SAT_PER_KWU = 250_000
OP_RETURN = 0x6A
MAX_SCRIPT_SIZE = 10_000  # consensus: a longer scriptPubKey can never be spent
# request_spend's widest members (messages: timestamp < 2^63; ids are client counters).
_WIDEST_TIMESTAMP = 2**63 - 1
_WIDEST_REQUEST_ID = 2**63 - 1


class TransactionError(ValueError):
    """A transaction cannot be built or finalized as asked (value too small, bad index...)."""


class SignatureError(ValueError):
    """A signature that must not be used: not DER/low-S, wrong key, wrong sighash type,
    or not valid for this transaction input."""


# --------------------------------------------------------------------------------------
# Fees and signatures
# --------------------------------------------------------------------------------------


def _hash256(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def dust_threshold(script_pubkey: bytes) -> int:
    """Bitcoin Core's dust limit for an output to `script_pubkey` (default -dustrelayfee);
    0 for an unspendable output (OP_RETURN), which is never dust, even worth 0 sat."""
    if script_pubkey[:1] == bytes([OP_RETURN]) or len(script_pubkey) > MAX_SCRIPT_SIZE:
        return 0
    size = len(TxOut(0, script_pubkey).serialize())
    size += (32 + 4 + 1 + 107 // 4 + 4) if witness_program(script_pubkey) else (32 + 4 + 1 + 107 + 4)
    return size * DUST_RELAY_FEERATE // 1000


def fee_for_weight(weight: int, feerate_sat_per_kwu: int = FEERATE_SAT_PER_KWU) -> int:
    """The smallest fee whose rate over `weight` is at least `feerate_sat_per_kwu`."""
    return -(-weight * feerate_sat_per_kwu // 1000)


def check_der_signature(sig: bytes) -> None:
    """SignatureError unless `sig` is strict DER (BIP 66) with a low S (BIP 146)."""
    problem = der_signature_problem(sig)
    if problem is not None:
        raise SignatureError(f"bad signature: {problem}")


def sign_digest(private_key: bytes, digest: bytes) -> bytes:
    """Deterministic (RFC 6979) ECDSA signature of a 32-byte digest, DER, low-S."""
    sig = coincurve.PrivateKey(private_key).sign(digest, hasher=None)
    check_der_signature(sig)  # libsecp256k1 always normalizes; this keeps it a contract
    return sig


def _verify_digest(pubkey: bytes, sig: bytes, digest: bytes) -> bool:
    try:
        return coincurve.PublicKey(pubkey).verify(sig, digest, hasher=None)
    except (ValueError, TypeError):
        return False


def _sighash_name(sighash_type: int) -> str:
    return {SIGHASH_ALL: "ALL", SIGHASH_ALL_ANYONECANPAY: "ALL|ANYONECANPAY"}.get(
        sighash_type, f"0x{sighash_type:02x}"
    )


# --------------------------------------------------------------------------------------
# Transactions (consensus serialization, BIP 143)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxIn:
    outpoint: OutPoint
    sequence: int
    witness: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class TxOut:
    value: int
    script_pubkey: bytes

    def serialize(self) -> bytes:
        return CTxOut(self.value, CScript(self.script_pubkey)).serialize()

    @classmethod
    def to_address(cls, address: str, value: int, network: str) -> TxOut:
        return cls(value, address_to_script_pubkey(address, network))


@dataclass(frozen=True, slots=True)
class Tx:
    version: int
    inputs: tuple[TxIn, ...]
    outputs: tuple[TxOut, ...]
    locktime: int = 0

    def to_bitcoinlib(self, with_witness: bool = True) -> CTransaction:
        vin = [CTxIn(COutPoint(lx(i.outpoint.txid), i.outpoint.vout), CScript(), i.sequence)
               for i in self.inputs]
        vout = [CTxOut(o.value, CScript(o.script_pubkey)) for o in self.outputs]
        witness = CTxWitness([CTxInWitness(CScriptWitness(list(i.witness)) if with_witness
                                           else CScriptWitness())
                              for i in self.inputs])
        return CTransaction(vin, vout, self.locktime, self.version, witness)

    def serialize(self, with_witness: bool = True) -> bytes:
        return self.to_bitcoinlib(with_witness).serialize()

    @property
    def txid(self) -> str:
        return _hash256(self.serialize(with_witness=False))[::-1].hex()

    @property
    def wtxid(self) -> str:
        return _hash256(self.serialize())[::-1].hex()

    @property
    def weight(self) -> int:
        return len(self.serialize(with_witness=False)) * 3 + len(self.serialize())

    @property
    def vsize(self) -> int:
        return (self.weight + 3) // 4

    def to_hex(self) -> str:
        return self.serialize().hex()

    def to_base64(self) -> str:
        return base64.b64encode(self.serialize()).decode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Tx:
        try:
            ctx = CTransaction.deserialize(bytes(data))
        except Exception as e:  # python-bitcoinlib raises several types for bad bytes
            raise TransactionError(f"not a transaction: {e}") from None
        if not ctx.vin:
            raise TransactionError("transaction without inputs")
        if any(txin.scriptSig for txin in ctx.vin):
            raise TransactionError("non-empty scriptSig (Revault transactions are native segwit)")
        witnesses = [tuple(bytes(item) for item in w.scriptWitness.stack) for w in ctx.wit.vtxinwit]
        witnesses += [()] * (len(ctx.vin) - len(witnesses))
        tx = cls(
            ctx.nVersion,
            tuple(TxIn(OutPoint(b2lx(txin.prevout.hash), txin.prevout.n), txin.nSequence, w)
                  for txin, w in zip(ctx.vin, witnesses)),
            tuple(TxOut(txout.nValue, bytes(txout.scriptPubKey)) for txout in ctx.vout),
            ctx.nLockTime,
        )
        # One transaction, one encoding: refuse a segwit marker with no witness and any
        # other form that would not serialize back to the same bytes.
        if tx.serialize() != bytes(data):
            raise TransactionError("non-canonical transaction serialization")
        return tx

    @classmethod
    def from_hex(cls, text: str) -> Tx:
        return cls.from_bytes(bytes.fromhex(text))

    @classmethod
    def from_base64(cls, text: str) -> Tx:
        return cls.from_bytes(base64.b64decode(text, validate=True))

    def signature_hash(self, index: int, script_code: bytes, value: int, sighash_type: int) -> bytes:
        """BIP 143 digest of input `index` (only ALL and ALL|ANYONECANPAY are used here)."""
        if sighash_type not in (SIGHASH_ALL, SIGHASH_ALL_ANYONECANPAY):
            raise TransactionError(f"unsupported sighash type 0x{sighash_type:02x}")
        return SignatureHash(CScript(script_code), self.to_bitcoinlib(with_witness=False),
                             index, sighash_type, amount=value,
                             sigversion=SIGVERSION_WITNESS_V0)


# --------------------------------------------------------------------------------------
# Revault transactions
# --------------------------------------------------------------------------------------


class Kind(str, enum.Enum):
    UNVAULT = "unvault"
    CANCEL = "cancel"
    EMERGENCY = "emergency"
    UNVAULT_EMERGENCY = "unvault_emergency"
    SPEND = "spend"
    CPFP = "cpfp"  # a child paying for an unvault's or a spend's CPFP output

    @property
    def sighash_type(self) -> int:
        return SIGHASH_ALL if self in (Kind.UNVAULT, Kind.SPEND, Kind.CPFP) else SIGHASH_ALL_ANYONECANPAY

    @property
    def is_revocation(self) -> bool:
        return self.sighash_type == SIGHASH_ALL_ANYONECANPAY


class SpendPath(str, enum.Enum):
    DEPOSIT = "deposit"  # N-of-N stakeholders of the deposit script
    UNVAULT_STAKEHOLDERS = "unvault_stakeholders"  # or_d's first branch
    UNVAULT_MANAGERS = "unvault_managers"  # managers + cosigners after the csv
    FEE_P2WPKH = "fee_p2wpkh"  # a fee-reserve coin appended by a watchtower
    CPFP = "cpfp"  # a CPFP output or CPFP-wallet coin: multi(1, cpfp keys)


@dataclass(frozen=True, slots=True)
class Coin:
    """An output of the chain: its outpoint, value, and the vault index it belongs to."""

    outpoint: OutPoint
    value: int
    index: int = 0


@dataclass(frozen=True, slots=True)
class SpentOutput:
    """What an input spends and how it is satisfied."""

    value: int
    script_pubkey: bytes
    witness_script: bytes  # the P2WPKH script code for FEE_P2WPKH
    path: SpendPath
    sighash_type: int
    keys: VaultKeys | None = None
    fee_pubkey: bytes = b""

    @property
    def signers(self) -> tuple[bytes, ...]:
        if self.path is SpendPath.FEE_P2WPKH:
            return (self.fee_pubkey,)
        assert self.keys is not None
        if self.path is SpendPath.UNVAULT_MANAGERS:
            return self.keys.managers + self.keys.cosigners
        if self.path is SpendPath.CPFP:
            return self.keys.cpfp
        return self.keys.stakeholders

    def missing(self, sigs: Mapping[bytes, bytes]) -> list[bytes]:
        """Keys whose signatures are still needed (for the managers: any of the unsigned
        ones while fewer than the threshold have signed)."""
        if self.path is SpendPath.UNVAULT_MANAGERS:
            assert self.keys is not None
            have = sum(1 for k in self.keys.managers if k in sigs)
            missing = [] if have >= self.keys.managers_threshold else [
                k for k in self.keys.managers if k not in sigs
            ]
            return missing + [k for k in self.keys.cosigners if k not in sigs]
        if self.path is SpendPath.CPFP:
            return [] if any(k in sigs for k in self.signers) else list(self.signers)
        return [k for k in self.signers if k not in sigs]

    def witness(self, sigs: Mapping[bytes, bytes]) -> tuple[bytes, ...]:
        """The witness, given witness signatures (DER + sighash byte) by key."""
        if self.path is SpendPath.FEE_P2WPKH:
            return (sigs[self.fee_pubkey], self.fee_pubkey)
        assert self.keys is not None
        if self.path is SpendPath.CPFP:
            # multi(1, ...): a dummy, then the signature of the first key that signed.
            signer = next(k for k in self.keys.cpfp if k in sigs)
            return (b"", sigs[signer], self.witness_script)
        n = len(self.keys.stakeholders)
        if self.path in (SpendPath.DEPOSIT, SpendPath.UNVAULT_STAKEHOLDERS):
            # CHECKMULTISIG wants signatures in the order of the keys, after a dummy.
            return (b"", *(sigs[k] for k in self.keys.stakeholders), self.witness_script)
        chosen = [k for k in self.keys.managers if k in sigs][: self.keys.managers_threshold]
        cosigner_sigs = [sigs[k] for k in reversed(self.keys.cosigners)]
        # Bottom to top: cosigners (the last one deepest, the first CHECKSIGVERIFY pops
        # the top), then the managers' CHECKMULTISIGVERIFY, then empty signatures that
        # make the stakeholders' CHECKMULTISIG return false (NULLFAIL forbids non-empty).
        return (
            *cosigner_sigs, b"", *(sigs[k] for k in chosen), b"", *([b""] * n), self.witness_script,
        )

    def max_witness(self) -> tuple[bytes, ...]:
        placeholder = b"\x00" * MAX_WITNESS_SIGNATURE
        return self.witness({k: placeholder for k in self.signers})

    def script_code(self) -> bytes:
        return self.witness_script


class RevaultTransaction:
    """One transaction of the chain with what is needed to sign, check and finalize it.

    The unsigned transaction (`tx`) is fixed at construction; signatures are collected
    per input as DER without the sighash byte (the wire format), keyed by public key.
    """

    def __init__(self, kind: Kind, tx: Tx, spent: Sequence[SpentOutput], vault_index: int = 0):
        if len(spent) != len(tx.inputs):
            raise TransactionError("one spent output per input is needed")
        self.kind = kind
        self.vault_index = vault_index  # of the first input; outputs belong to that vault
        self.tx = tx
        self.spent = tuple(spent)
        self.signatures: list[dict[bytes, bytes]] = [{} for _ in spent]

    def __repr__(self) -> str:
        return f"RevaultTransaction({self.kind.value}, txid={self.txid})"

    @property
    def txid(self) -> str:
        return self.tx.txid

    @property
    def uid(self) -> str:
        return tx_uid(self.txid)

    @property
    def fee(self) -> int:
        return sum(s.value for s in self.spent) - sum(o.value for o in self.tx.outputs)

    def worst_case_signed(self) -> Tx:
        """The transaction as large as it can be once signed: every signature at 72 + 1
        bytes (placeholders, not valid). For size and fee bounds before signing."""
        inputs = tuple(
            TxIn(i.outpoint, i.sequence, s.max_witness()) for i, s in zip(self.tx.inputs, self.spent)
        )
        return Tx(self.tx.version, inputs, self.tx.outputs, self.tx.locktime)

    def max_weight(self) -> int:
        """Weight once fully signed with the largest possible signatures."""
        return self.worst_case_signed().weight

    def output_coin(self, vout: int = 0) -> Coin:
        """The output `vout` as a coin of the chain (same vault index as the input 0)."""
        if not 0 <= vout < len(self.tx.outputs):
            raise TransactionError(f"{self.kind.value} has no output {vout}")
        return Coin(OutPoint(self.txid, vout), self.tx.outputs[vout].value, self.vault_index)

    def _check_index(self, index: int) -> SpentOutput:
        if not isinstance(index, int) or not 0 <= index < len(self.spent):
            raise TransactionError(f"{self.kind.value} has no input {index}")
        return self.spent[index]

    def signers(self, index: int) -> tuple[bytes, ...]:
        return self._check_index(index).signers

    def sighash_type(self, index: int = 0) -> int:
        return self._check_index(index).sighash_type

    def signature_hash(self, index: int, sighash_type: int | None = None) -> bytes:
        s = self._check_index(index)
        return self.tx.signature_hash(
            index, s.script_code(), s.value, s.sighash_type if sighash_type is None else sighash_type
        )

    def sign(self, index: int, private_key: bytes) -> bytes:
        """Sign input `index` with `private_key` (which must be one of its signers),
        record the signature and return it (DER, no sighash byte)."""
        s = self._check_index(index)
        pubkey = coincurve.PrivateKey(private_key).public_key.format(compressed=True)
        if pubkey not in s.signers:
            raise SignatureError(
                f"{self.kind.value} input {index}: key {pubkey.hex()} is not one of its signers"
            )
        sig = sign_digest(private_key, self.signature_hash(index))
        self.signatures[index][pubkey] = sig
        return sig

    def verify_signature(self, index: int, pubkey: bytes, signature: bytes) -> None:
        """SignatureError unless `signature` (DER, no sighash byte) is `pubkey`'s valid
        signature of input `index` with this kind's sighash type."""
        s = self._check_index(index)
        where = f"{self.kind.value} input {index}"
        if pubkey not in s.signers:
            raise SignatureError(f"{where}: key {pubkey.hex()} is not one of its signers")
        check_der_signature(signature)
        if _verify_digest(pubkey, signature, self.signature_hash(index)):
            return
        other = SIGHASH_ALL if s.sighash_type == SIGHASH_ALL_ANYONECANPAY else SIGHASH_ALL_ANYONECANPAY
        if _verify_digest(pubkey, signature, self.signature_hash(index, other)):
            raise SignatureError(
                f"{where}: signature by {pubkey.hex()} uses sighash {_sighash_name(other)}, "
                f"must be {_sighash_name(s.sighash_type)}"
            )
        raise SignatureError(f"{where}: invalid signature for key {pubkey.hex()}")

    def verify_witness_signature(self, index: int, pubkey: bytes, signature: bytes) -> None:
        """As verify_signature, for a signature ending with its sighash byte."""
        if not signature:
            raise SignatureError("empty signature")
        s = self._check_index(index)
        if signature[-1] != s.sighash_type:
            raise SignatureError(
                f"{self.kind.value} input {index}: sighash byte {_sighash_name(signature[-1])}, "
                f"must be {_sighash_name(s.sighash_type)}"
            )
        self.verify_signature(index, pubkey, signature[:-1])

    def add_signature(self, index: int, pubkey: bytes, signature: bytes) -> None:
        """Check then record a signature received from another participant."""
        self.verify_signature(index, pubkey, signature)
        self.signatures[index][pubkey] = signature

    def missing_signatures(self, index: int) -> list[bytes]:
        return self._check_index(index).missing(self.signatures[index])

    def is_complete(self) -> bool:
        return all(not s.missing(sigs) for s, sigs in zip(self.spent, self.signatures))

    def finalize(self) -> Tx:
        """The fully signed transaction; TransactionError naming what is missing."""
        inputs = []
        for index, (txin, s, sigs) in enumerate(zip(self.tx.inputs, self.spent, self.signatures)):
            missing = s.missing(sigs)
            if missing:
                raise TransactionError(
                    f"{self.kind.value} input {index}: missing signatures of "
                    + ", ".join(k.hex() for k in missing)
                )
            flagged = {k: v + bytes([s.sighash_type]) for k, v in sigs.items()}
            inputs.append(TxIn(txin.outpoint, txin.sequence, s.witness(flagged)))
        return Tx(self.tx.version, tuple(inputs), self.tx.outputs, self.tx.locktime)

    def to_psbt(self) -> str:
        """The unsigned transaction as a BIP 174 PSBT (base64) with, per input, the
        witness UTXO, the witness script and the sighash type (what the cosigner reads)."""
        from embit.psbt import PSBT
        from embit.script import Script
        from embit.transaction import Transaction, TransactionOutput

        psbt = PSBT(Transaction.parse(self.tx.serialize(with_witness=False)))
        for inp, s in zip(psbt.inputs, self.spent):
            inp.witness_utxo = TransactionOutput(s.value, Script(s.script_pubkey))
            if s.path is not SpendPath.FEE_P2WPKH:
                inp.witness_script = Script(s.witness_script)
            inp.sighash_type = s.sighash_type
        encoded = psbt.to_string()
        # embit rebuilds the unsigned transaction when writing, turning nSequence 0 into
        # 0xFFFFFFFF and version 0 into 2. Revault transactions never use either, but a
        # PSBT for a different transaction than ours must never leave this function.
        unsigned = self.tx.serialize(with_witness=False)
        if PSBT.from_string(encoded).tx.serialize() != unsigned:
            raise TransactionError("this transaction cannot be written as a PSBT by embit "
                                   "without changing it (nSequence 0 or version 0)")
        return encoded


def _revault_tx(
    kind: Kind, spent: Sequence[tuple[Coin, SpentOutput, int]], outputs: Sequence[TxOut], vault_index: int
) -> RevaultTransaction:
    inputs = tuple(TxIn(coin.outpoint, sequence) for coin, _, sequence in spent)
    tx = Tx(TX_VERSION, inputs, tuple(outputs), 0)
    return RevaultTransaction(kind, tx, [s for _, s, _ in spent], vault_index)


def _check_coin(coin: Coin, what: str) -> None:
    if not isinstance(coin, Coin):
        raise TransactionError(f"{what} must be a Coin")
    if not isinstance(coin.value, int) or coin.value <= 0 or coin.value > MAX_MONEY:
        raise TransactionError(f"{what} value out of range: {coin.value!r}")


def _presigned(
    kind: Kind, coin: Coin, spent: SpentOutput, script_pubkey: bytes, vault_index: int,
    fixed_outputs: Sequence[TxOut] = (),
) -> RevaultTransaction:
    """A one-input pre-signed transaction paying exactly 253 sat/kWU of its worst-case
    weight: output 0 to `script_pubkey` takes what the fee and `fixed_outputs` leave."""
    draft = _revault_tx(kind, [(coin, spent, RBF_SEQUENCE)],
                        [TxOut(0, script_pubkey), *fixed_outputs], vault_index)
    fee = fee_for_weight(draft.max_weight())
    value = coin.value - fee - sum(o.value for o in fixed_outputs)
    dust = dust_threshold(script_pubkey)
    if value < dust:
        raise TransactionError(
            f"{kind.value}: {coin.value} sat cannot pay the {fee} sat fee"
            + (f" and {sum(o.value for o in fixed_outputs)} sat of CPFP output" if fixed_outputs else "")
            + f" and leave at least {dust} sat (dust limit)"
        )
    return _revault_tx(kind, [(coin, spent, RBF_SEQUENCE)],
                       [TxOut(value, script_pubkey), *fixed_outputs], vault_index)


def _vault_keys(d: Deployment, index: int) -> VaultKeys:
    try:
        return d.keys(index)
    except DerivationError as e:
        raise TransactionError(str(e)) from None


def _deposit_spent(d: Deployment, coin: Coin, kind: Kind) -> SpentOutput:
    keys = _vault_keys(d, coin.index)
    ws = keys.deposit_script()
    return SpentOutput(coin.value, p2wsh(ws), ws, SpendPath.DEPOSIT, kind.sighash_type, keys)


def _unvault_spent(d: Deployment, coin: Coin, kind: Kind, path: SpendPath) -> SpentOutput:
    keys = _vault_keys(d, coin.index)
    ws = keys.unvault_script()
    return SpentOutput(coin.value, p2wsh(ws), ws, path, kind.sighash_type, keys)


def cpfp_spent(d: Deployment, coin: Coin) -> SpentOutput:
    """How a CPFP output (or a coin of the managers' CPFP wallet, at the same script
    for its index) is spent: one signature of any CPFP key, ALL."""
    keys = _vault_keys(d, coin.index)
    ws = keys.cpfp_script()
    return SpentOutput(coin.value, p2wsh(ws), ws, SpendPath.CPFP, SIGHASH_ALL, keys)


def _check_deposit(d: Deployment, deposit: Coin) -> None:
    _check_coin(deposit, "deposit")
    if deposit.value < d.min_deposit_value:
        raise TransactionError(
            f"deposit of {deposit.value} sat is under min_deposit_value ({d.min_deposit_value} sat): "
            "not a vault")


def _emergency_script_pubkey(d: Deployment) -> bytes:
    if d.emergency_script_pubkey is None:
        raise TransactionError(
            "this deployment has no emergency_address (a manager-only participant cannot "
            "build emergency transactions)")
    return d.emergency_script_pubkey


def build_unvault(d: Deployment, deposit: Coin) -> RevaultTransaction:
    """Deposit -> [0] unvault output (same vault index), [1] CPFP output of 30,000 sat;
    ALL, 253 sat/kWU. TransactionError for a deposit under `min_deposit_value`."""
    _check_deposit(d, deposit)
    spent = _deposit_spent(d, deposit, Kind.UNVAULT)
    cpfp = TxOut(UNVAULT_CPFP_VALUE, d.cpfp_script_pubkey(deposit.index))
    return _presigned(Kind.UNVAULT, deposit, spent, d.unvault_script_pubkey(deposit.index),
                      deposit.index, [cpfp])


def build_cancel(d: Deployment, unvault: Coin) -> RevaultTransaction:
    """Unvault output -> the vault's deposit script again, ALL|ANYONECANPAY."""
    _check_coin(unvault, "unvault output")
    spent = _unvault_spent(d, unvault, Kind.CANCEL, SpendPath.UNVAULT_STAKEHOLDERS)
    return _presigned(Kind.CANCEL, unvault, spent, d.deposit_script_pubkey(unvault.index), unvault.index)


def build_emergency(d: Deployment, deposit: Coin) -> RevaultTransaction:
    """Deposit -> emergency_address, ALL|ANYONECANPAY."""
    _check_deposit(d, deposit)
    spent = _deposit_spent(d, deposit, Kind.EMERGENCY)
    return _presigned(Kind.EMERGENCY, deposit, spent, _emergency_script_pubkey(d), deposit.index)


def build_unvault_emergency(d: Deployment, unvault: Coin) -> RevaultTransaction:
    """Unvault output -> emergency_address, ALL|ANYONECANPAY."""
    _check_coin(unvault, "unvault output")
    spent = _unvault_spent(d, unvault, Kind.UNVAULT_EMERGENCY, SpendPath.UNVAULT_STAKEHOLDERS)
    return _presigned(Kind.UNVAULT_EMERGENCY, unvault, spent, _emergency_script_pubkey(d), unvault.index)


def request_spend_size(tx: Tx) -> int:
    """Bytes of the `request_spend` frame that carries `tx`, with the widest timestamp
    and request id any client sends: what must fit in one frame's plaintext."""
    return len(json.dumps(
        {"jsonrpc": "2.0", "method": "request_spend",
         "params": {"transaction": tx.to_base64(), "timestamp": _WIDEST_TIMESTAMP,
                    "vault_id": "0" * 64},
         "id": _WIDEST_REQUEST_ID},
        separators=(",", ":"),
    ))


def build_spend(
    d: Deployment,
    unvaults: Sequence[Coin],
    payees: Sequence[TxOut],
    *,
    change_index: int | None = None,
    feerate_sat_per_kwu: int = FEERATE_SAT_PER_KWU,
    max_feerate_sat_per_kwu: int | None = MAX_SANE_FEERATE_SAT_PER_KWU,
) -> RevaultTransaction:
    """Unvault outputs (a batch) -> [0] the CPFP output (script of the highest vault
    index among the inputs, 16 sat per worst-case weight unit), then `payees`, then, with
    `change_index`, the change to the deposit script of that vault index.

    Every input spends through the managers + cosigners branch with nSequence =
    unvault_csv. With a change output the fee is `feerate_sat_per_kwu` of the worst-case
    weight and the change takes the rest (it is left out, its value going to the fee,
    when it would be dust); without one the fee is what the inputs leave over.

    Refused with TransactionError before anyone signs (docs/protocol.md, "Transactions"): an output
    under the dust limit, a fee under 253 sat/kWU of the worst-case weight, a worst-case
    weight over 400,000, a `request_spend` frame over one frame, and a fee above
    `max_feerate_sat_per_kwu` (1,000 sat/vB unless lifted; None lifts it).
    """
    if not unvaults:
        raise TransactionError("spend: no unvault output to spend")
    if not payees:
        raise TransactionError("spend: no payee")
    if len({c.outpoint for c in unvaults}) != len(unvaults):
        raise TransactionError("spend: the same unvault output twice")
    if not isinstance(feerate_sat_per_kwu, int) or feerate_sat_per_kwu < FEERATE_SAT_PER_KWU:
        raise TransactionError(f"spend: feerate must be at least {FEERATE_SAT_PER_KWU} sat/kWU")
    spent = []
    for n, coin in enumerate(unvaults):
        _check_coin(coin, f"spend: unvault output {n}")
        spent.append((coin, _unvault_spent(d, coin, Kind.SPEND, SpendPath.UNVAULT_MANAGERS), d.unvault_csv))
    for n, out in enumerate(payees):
        if not isinstance(out, TxOut) or not isinstance(out.value, int) or isinstance(out.value, bool):
            raise TransactionError(f"spend: payee {n} must be a TxOut")
    top = max(c.index for c in unvaults)
    cpfp_spk = p2wsh(_vault_keys(d, top).cpfp_script())
    change_spk = None if change_index is None else p2wsh(_vault_keys(d, change_index).deposit_script())
    total_in = sum(c.value for c in unvaults)
    total_pay = sum(o.value for o in payees)

    def outputs(with_change: bool) -> list[TxOut]:
        # Output values do not change the weight (always 8 bytes): size with a draft.
        draft = [TxOut(0, cpfp_spk), *payees] + ([TxOut(0, change_spk)] if with_change else [])
        weight = _revault_tx(Kind.SPEND, spent, draft, top).max_weight()
        cpfp = TxOut(SPEND_CPFP_SAT_PER_WU * weight, cpfp_spk)
        if not with_change:
            return [cpfp, *payees]
        change = total_in - total_pay - cpfp.value - fee_for_weight(weight, feerate_sat_per_kwu)
        return [cpfp, *payees, TxOut(change, change_spk)]

    chosen = outputs(with_change=change_spk is not None)
    if change_spk is not None and chosen[-1].value < dust_threshold(change_spk):
        chosen = outputs(with_change=False)  # dust (or negative) change: left to the fee
    spend = _revault_tx(Kind.SPEND, spent, chosen, top)
    _check_spend(spend, max_feerate_sat_per_kwu)
    return spend


def _check_spend(spend: RevaultTransaction, max_feerate_sat_per_kwu: int | None) -> None:
    """The guards of docs/protocol.md, "Transactions": what no cosigner must be asked to sign."""
    for n, out in enumerate(spend.tx.outputs):
        what = "CPFP output" if n == 0 else f"output {n}"
        if out.value < dust_threshold(out.script_pubkey):
            raise TransactionError(
                f"spend: {what} pays {out.value} sat, below the dust limit "
                f"{dust_threshold(out.script_pubkey)}")
    total_in = sum(s.value for s in spend.spent)
    total_out = sum(o.value for o in spend.tx.outputs)
    if total_out > total_in:
        raise TransactionError(f"spend: outputs ({total_out} sat) exceed inputs ({total_in} sat)")
    worst = spend.worst_case_signed()
    weight = worst.weight
    if weight > MAX_STANDARD_WEIGHT:
        raise TransactionError(
            f"spend: {weight} WU once signed (every signature at its largest), above the "
            f"{MAX_STANDARD_WEIGHT} WU standard limit: spend fewer vaults at once")
    fee = spend.fee
    if fee < fee_for_weight(weight):
        raise TransactionError(
            f"spend: fee {fee} sat is under {FEERATE_SAT_PER_KWU} sat/kWU of its worst-case "
            f"weight {weight} WU (at least {fee_for_weight(weight)} sat)")
    size = request_spend_size(worst)
    if size > MAX_PLAINTEXT:
        raise TransactionError(
            f"spend: its request_spend would take {size} bytes once signed (every signature "
            f"at its largest), over one {MAX_PLAINTEXT}-byte frame: spend fewer vaults at once")
    if max_feerate_sat_per_kwu is not None and 1000 * fee > max_feerate_sat_per_kwu * weight:
        raise TransactionError(
            f"spend: fee {fee} sat is {fee * 4000 // weight / 1000:g} sat/vB, above the sanity "
            f"bound of {max_feerate_sat_per_kwu / 250:g} sat/vB (pass max_feerate_sat_per_kwu "
            "to allow it)")


@dataclass(frozen=True, slots=True)
class VaultTransactions:
    """The pre-signed transactions of one vault. A deployment without
    `emergency_address` (a manager-only participant) has no emergencies."""

    unvault: RevaultTransaction
    cancel: RevaultTransaction
    emergency: RevaultTransaction | None
    unvault_emergency: RevaultTransaction | None

    def revocations(self) -> tuple[RevaultTransaction, ...]:
        return tuple(t for t in (self.cancel, self.emergency, self.unvault_emergency) if t is not None)


def build_vault_transactions(d: Deployment, deposit: Coin) -> VaultTransactions:
    """Every pre-signed transaction of the vault at `deposit` (the emergencies only when
    the deployment has an emergency address)."""
    unvault = build_unvault(d, deposit)
    unvault_coin = unvault.output_coin(0)
    has_emergency = d.emergency_script_pubkey is not None
    return VaultTransactions(
        unvault=unvault,
        cancel=build_cancel(d, unvault_coin),
        emergency=build_emergency(d, deposit) if has_emergency else None,
        unvault_emergency=build_unvault_emergency(d, unvault_coin) if has_emergency else None,
    )
