"""The Revault transaction chain: deployment, scripts, builders, signatures, fee bumping.

Everything here is pure (no I/O) and deterministic: every participant who holds the
same `[deployment]` table and sees the same deposit builds byte-identical unsigned
transactions, which is what lets signatures be exchanged by transaction id alone.

Scripts (segwit v0, transactions version 2, keys in the order of the config table):

* deposit (a "vault"):  ``wsh(multi(N, stk_1..stk_N))``, N-of-N stakeholders.
* unvault output, as the miniscript

  ``wsh(or_d(multi(N,stk_1..stk_N),and_v(v:multi(k,mgr_1..mgr_M),and_v(v:pk(cos_1),...and_v(v:pk(cos_C),older(csv))))))``

  i.e. the witness script::

      N <stk..> N CHECKMULTISIG IFDUP NOTIF
          k <mgr..> M CHECKMULTISIGVERIFY
          <cos_1> CHECKSIGVERIFY ... <cos_C> CHECKSIGVERIFY
          <csv> CHECKSEQUENCEVERIFY
      ENDIF

  The stakeholders branch (used by cancel and unvault-emergency) needs no timelock;
  the managers branch (used by spend) needs k of the M managers, every cosigner and
  the relative lock. With zero cosigners the branch is ``and_v(v:multi(k,..),older(csv))``
  (allowed: 0..20 cosigners; the spec's deployments always have some).
* one output per unvault transaction: the spec's CPFP output is left out (DESIGN.md
  describes a single unvault output).

Fees: pre-signed transactions (unvault, cancel, emergency, unvault-emergency) pay
``ceil(253 * max_weight / 1000)`` where ``max_weight`` is the weight of the transaction
once fully signed with every signature at its largest (72 DER bytes + 1 sighash byte).
Real low-S signatures are at most 71 + 1 bytes, so the real feerate is never below
253 sat per 1000 weight units and the fee itself is known before anyone signs.

Sighash types: ALL|ANYONECANPAY for cancel, emergency and unvault-emergency (so a
watchtower can append fee inputs without invalidating them), ALL for unvault and spend.

With xpubs in the deployment, vault number ``index`` uses the non-hardened child
``index`` of every key; with plain public keys every vault uses the same keys.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import coincurve
from bitcoin.core import (
    COutPoint, CScriptWitness, CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness, b2lx, lx,
)
from bitcoin.core import script
from bitcoin.core.script import SIGVERSION_WITNESS_V0, CScript, SignatureHash
from embit import base58, bech32
from embit.bip32 import HDKey
from embit.descriptor.checksum import add_checksum

__all__ = [
    "FEERATE_SAT_PER_KWU", "SIGHASH_ALL", "SIGHASH_ALL_ANYONECANPAY", "MAX_STAKEHOLDERS",
    "MAX_MANAGERS", "MAX_COSIGNERS", "MAX_CSV", "NETWORKS",
    "DeploymentError", "TransactionError", "SignatureError", "FeeBumpError",
    "DeploymentKey", "VaultKeys", "Deployment",
    "OutPoint", "TxIn", "TxOut", "Tx", "Coin", "Kind", "SpendPath", "SpentOutput",
    "RevaultTransaction", "VaultTransactions", "FeeCoin", "FeeSelection",
    "build_unvault", "build_cancel", "build_emergency", "build_unvault_emergency",
    "build_spend", "build_vault_transactions", "select_fee_inputs", "bump_revocation",
    "address_to_script_pubkey", "script_pubkey_to_address", "p2wsh", "p2wpkh",
    "dust_threshold", "fee_for_weight", "sign_digest", "check_der_signature",
    "tx_uid", "P2WPKH_INPUT_MAX_WEIGHT", "RBF_SEQUENCE", "TX_VERSION",
]

FEERATE_SAT_PER_KWU = 253  # the seed's fixed feerate for pre-signed transactions
SIGHASH_ALL = 0x01
SIGHASH_ANYONECANPAY = 0x80
SIGHASH_ALL_ANYONECANPAY = SIGHASH_ALL | SIGHASH_ANYONECANPAY
MAX_STAKEHOLDERS = 20  # CHECKMULTISIG takes at most 20 keys
MAX_MANAGERS = 20
MAX_COSIGNERS = 20  # keeps the witness script far below the 3600-byte policy limit
MAX_CSV = 0xFFFF  # BIP 68 block-based relative locks are 16 bits
MAX_DER_SIGNATURE = 72
MAX_WITNESS_SIGNATURE = MAX_DER_SIGNATURE + 1  # + sighash byte
TX_VERSION = 2  # BIP 68 relative locks need version >= 2
RBF_SEQUENCE = 0xFFFFFFFD  # replaceable, locktime enabled, BIP 68 disabled
DUST_RELAY_FEERATE = 3000  # sat per 1000 vbytes, Bitcoin Core's -dustrelayfee default
P2WPKH_INPUT_MAX_WEIGHT = 41 * 4 + 1 + (1 + MAX_WITNESS_SIGNATURE) + (1 + 33)
# Fee inputs are appended while the input count stays encodable in one byte, so the
# weight of each addition is exactly known (252 inputs is far beyond any real need).
MAX_INPUTS_ONE_BYTE_COUNT = 252

# network name in the config -> (bech32 hrp, p2pkh version, p2sh version, xpub version)
NETWORKS: dict[str, tuple[str, int, int, bytes]] = {
    "bitcoin": ("bc", 0x00, 0x05, bytes.fromhex("0488b21e")),
    "testnet": ("tb", 0x6F, 0xC4, bytes.fromhex("043587cf")),
    "signet": ("tb", 0x6F, 0xC4, bytes.fromhex("043587cf")),
    "regtest": ("bcrt", 0x6F, 0xC4, bytes.fromhex("043587cf")),
}
_PRIVATE_XKEY_VERSIONS = {bytes.fromhex("0488ade4"), bytes.fromhex("04358394")}

OP_0, OP_1 = 0x00, 0x51
OP_DUP, OP_HASH160, OP_EQUAL, OP_EQUALVERIFY = 0x76, 0xA9, 0x87, 0x88
OP_CHECKSIG = 0xAC

_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class DeploymentError(ValueError):
    """A `[deployment]` table that breaks the spec; the message names the key."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class TransactionError(ValueError):
    """A transaction cannot be built or finalized as asked (value too small, bad index...)."""


class SignatureError(ValueError):
    """A signature that must not be used: not DER/low-S, wrong key, wrong sighash type,
    or not valid for this transaction input."""


class FeeBumpError(ValueError):
    """The fee reserve cannot bring a revocation transaction to the target feerate."""

    def __init__(self, message: str, *, shortfall_sat: int):
        super().__init__(message)
        self.shortfall_sat = shortfall_sat


# --------------------------------------------------------------------------------------
# Encoding helpers
# --------------------------------------------------------------------------------------


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hash256(data: bytes) -> bytes:
    return _sha256(_sha256(data))


def _hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", _sha256(data)).digest()


# --------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------


def p2wsh(witness_script: bytes) -> bytes:
    return b"\x00\x20" + _sha256(witness_script)


def p2wpkh(pubkey: bytes) -> bytes:
    return b"\x00\x14" + _hash160(pubkey)


def _p2wpkh_script_code(pubkey: bytes) -> bytes:
    return bytes([OP_DUP, OP_HASH160, 20]) + _hash160(pubkey) + bytes([OP_EQUALVERIFY, OP_CHECKSIG])


def address_to_script_pubkey(address: str, network: str) -> bytes:
    """scriptPubKey of `address`; ValueError if it is not a valid address for `network`."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}")
    hrp, p2pkh_version, p2sh_version, _ = NETWORKS[network]
    if not isinstance(address, str) or not address:
        raise ValueError("not an address")
    if address.lower().startswith(hrp + "1"):
        version, program = bech32.decode(hrp, address)
        if version is None:
            raise ValueError(f"not a valid {network} segwit address")
        if version == 1 and len(program) != 32:
            raise ValueError("taproot programs are 32 bytes")
        op = OP_0 if version == 0 else OP_1 + version - 1
        return bytes([op, len(program)]) + bytes(program)
    try:
        raw = base58.decode_check(address)
    except Exception:
        raise ValueError(f"not a valid {network} address") from None
    if len(raw) == 21 and raw[0] == p2pkh_version:
        return bytes([OP_DUP, OP_HASH160, 20]) + raw[1:] + bytes([OP_EQUALVERIFY, OP_CHECKSIG])
    if len(raw) == 21 and raw[0] == p2sh_version:
        return bytes([OP_HASH160, 20]) + raw[1:] + bytes([OP_EQUAL])
    raise ValueError(f"not a valid {network} address")


def script_pubkey_to_address(script_pubkey: bytes, network: str) -> str:
    hrp, p2pkh_version, p2sh_version, _ = NETWORKS[network]
    program = _witness_program(script_pubkey)
    if program is not None:
        address = bech32.encode(hrp, program[0], program[1])
        if address is None:
            raise ValueError("witness program has no address")
        return address
    spk = script_pubkey
    if len(spk) == 25 and spk[:3] == bytes([OP_DUP, OP_HASH160, 20]) and spk[23:] == bytes([OP_EQUALVERIFY, OP_CHECKSIG]):
        return base58.encode_check(bytes([p2pkh_version]) + spk[3:23])
    if len(spk) == 23 and spk[:2] == bytes([OP_HASH160, 20]) and spk[22] == OP_EQUAL:
        return base58.encode_check(bytes([p2sh_version]) + spk[2:22])
    raise ValueError("script has no standard address")


def _witness_program(spk: bytes) -> tuple[int, bytes] | None:
    if 4 <= len(spk) <= 42 and spk[1] == len(spk) - 2:
        if spk[0] == OP_0:
            return 0, spk[2:]
        if OP_1 <= spk[0] <= OP_1 + 15:
            return spk[0] - OP_1 + 1, spk[2:]
    return None


def dust_threshold(script_pubkey: bytes) -> int:
    """Bitcoin Core's dust limit for an output to `script_pubkey` (default -dustrelayfee)."""
    size = len(TxOut(0, script_pubkey).serialize())
    size += (32 + 4 + 1 + 107 // 4 + 4) if _witness_program(script_pubkey) else (32 + 4 + 1 + 107 + 4)
    return size * DUST_RELAY_FEERATE // 1000


def fee_for_weight(weight: int, feerate_sat_per_kwu: int = FEERATE_SAT_PER_KWU) -> int:
    """The smallest fee whose rate over `weight` is at least `feerate_sat_per_kwu`."""
    return -(-weight * feerate_sat_per_kwu // 1000)


def tx_uid(txid: str) -> str:
    """The id used on the wire for a transaction or vault (DESIGN.md: sha256 of the txid bytes)."""
    return hashlib.sha256(bytes.fromhex(txid)).hexdigest()


# --------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------


def check_der_signature(sig: bytes) -> None:
    """SignatureError unless `sig` is strict DER (BIP 66) with a low S (BIP 146)."""
    n = len(sig)
    if n < 8 or n > MAX_DER_SIGNATURE:
        raise SignatureError(f"not a DER signature ({n} bytes)")
    if sig[0] != 0x30 or sig[1] != n - 2:
        raise SignatureError("not a DER signature (bad sequence header)")
    len_r = sig[3]
    if sig[2] != 0x02 or 5 + len_r >= n or len_r == 0:
        raise SignatureError("not a DER signature (bad R)")
    len_s = sig[5 + len_r]
    if sig[4 + len_r] != 0x02 or len_s == 0 or len_r + len_s + 6 != n:
        raise SignatureError("not a DER signature (bad S)")
    r, s = sig[4 : 4 + len_r], sig[6 + len_r :]
    for name, v in (("R", r), ("S", s)):
        if v[0] & 0x80:
            raise SignatureError(f"not a DER signature (negative {name})")
        if len(v) > 1 and v[0] == 0 and not v[1] & 0x80:
            raise SignatureError(f"not a DER signature (padded {name})")
    s_value = int.from_bytes(s, "big")
    if s_value > _SECP256K1_ORDER // 2:
        raise SignatureError("signature has a high S (not low-S)")


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
# Deployment
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _derive_child(xpub: str, index: int) -> bytes:
    return HDKey.from_string(xpub).child(index).sec()


@dataclass(frozen=True, slots=True)
class DeploymentKey:
    """A key of the deployment as written in the config: a compressed public key, or an
    xpub whose child *i* is vault *i*'s key."""

    text: str
    pubkey: bytes  # the key itself, or the xpub's own public key
    is_xpub: bool

    def at(self, index: int) -> bytes:
        """The 33-byte public key used by vault number `index`."""
        if not self.is_xpub:
            return self.pubkey
        return _derive_child(self.text, index)

    @classmethod
    def parse(cls, key: str, value: Any, network: str) -> DeploymentKey:
        if not isinstance(value, str):
            raise DeploymentError(key, "must be a string (hex public key or xpub)")
        if len(value) == 66 and all(c in "0123456789abcdefABCDEF" for c in value):
            raw = bytes.fromhex(value)
            if raw[0] not in (2, 3):
                raise DeploymentError(key, "not a compressed public key (must start with 02 or 03)")
            try:
                coincurve.PublicKey(raw)
            except ValueError:
                raise DeploymentError(key, "not a valid public key (not on the curve)") from None
            return cls(raw.hex(), raw, False)
        try:
            decoded = base58.decode_check(value)
        except Exception:
            raise DeploymentError(
                key, "not a 33-byte compressed public key in hex nor an xpub"
            ) from None
        if len(decoded) != 78:
            raise DeploymentError(key, "not a 33-byte compressed public key in hex nor an xpub")
        version = decoded[:4]
        if version in _PRIVATE_XKEY_VERSIONS:
            raise DeploymentError(key, "is an extended PRIVATE key; put only the xpub here")
        expected = NETWORKS[network][3]
        if version != expected:
            want = "xpub" if network == "bitcoin" else "tpub"
            raise DeploymentError(key, f"not a {network} extended public key (expected {want}...)")
        try:
            hd = HDKey.from_string(value)
        except Exception as exc:
            raise DeploymentError(key, f"invalid xpub ({exc})") from None
        return cls(value, hd.sec(), True)


@dataclass(frozen=True, slots=True)
class VaultKeys:
    """The concrete keys of one vault (a derivation index of the deployment)."""

    stakeholders: tuple[bytes, ...]
    managers: tuple[bytes, ...]
    managers_threshold: int
    cosigners: tuple[bytes, ...]
    unvault_csv: int

    def deposit_script(self) -> bytes:
        return bytes(CScript(_multisig(len(self.stakeholders), self.stakeholders,
                                       script.OP_CHECKMULTISIG)))

    def unvault_script(self) -> bytes:
        # or_d(multi(N,stk), and_v(v:multi(k,mgr), and_v(v:pk(cos)..., older(csv)))):
        # the stakeholders' N-of-N, else (IFDUP NOTIF) the managers' k-of-M, every
        # cosigner, and the relative timelock.
        items = _multisig(len(self.stakeholders), self.stakeholders, script.OP_CHECKMULTISIG)
        items += [script.OP_IFDUP, script.OP_NOTIF]
        items += _multisig(self.managers_threshold, self.managers, script.OP_CHECKMULTISIGVERIFY)
        for key in self.cosigners:
            items += [key, script.OP_CHECKSIGVERIFY]
        items += [self.unvault_csv, script.OP_CHECKSEQUENCEVERIFY, script.OP_ENDIF]
        return bytes(CScript(items))

    def deposit_descriptor(self) -> str:
        return add_checksum(f"wsh(multi({len(self.stakeholders)},{_hexes(self.stakeholders)}))")

    def unvault_descriptor(self) -> str:
        managers_path = f"older({self.unvault_csv})"
        for key in reversed(self.cosigners):
            managers_path = f"and_v(v:pk({key.hex()}),{managers_path})"
        managers_path = (
            f"and_v(v:multi({self.managers_threshold},{_hexes(self.managers)}),{managers_path})"
        )
        return add_checksum(
            f"wsh(or_d(multi({len(self.stakeholders)},{_hexes(self.stakeholders)}),{managers_path}))"
        )


def _hexes(keys: Iterable[bytes]) -> str:
    return ",".join(k.hex() for k in keys)


def _multisig(k: int, keys: Sequence[bytes], opcode) -> list:
    # CScript encodes 1..16 as OP_1..OP_16 and larger numbers minimally, as consensus wants.
    return [k, *keys, len(keys), opcode]


_DEPLOYMENT_KEYS = (
    "network", "stakeholders", "managers", "managers_threshold", "cosigners",
    "unvault_csv", "emergency_address", "watchtowers",
)


@dataclass(frozen=True, slots=True)
class Deployment:
    """The `[deployment]` table shared by wallets and watchtowers. Build it with
    `Deployment.from_dict`, which enforces the spec's bounds."""

    network: str
    stakeholders: tuple[DeploymentKey, ...]
    managers: tuple[DeploymentKey, ...]
    managers_threshold: int
    cosigners: tuple[DeploymentKey, ...]
    unvault_csv: int
    emergency_address: str
    watchtowers: tuple[bytes, ...] = ()
    emergency_script_pubkey: bytes = field(default=b"", repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, prefix: str = "deployment") -> Deployment:
        """Parse and check a `[deployment]` table; DeploymentError names the bad key."""
        if not isinstance(d, Mapping):
            raise DeploymentError(prefix, "must be a table")
        for name in d:
            if name not in _DEPLOYMENT_KEYS:
                raise DeploymentError(f"{prefix}.{name}", "unknown key")
        for name in ("network", "stakeholders", "managers", "unvault_csv", "emergency_address"):
            if name not in d:
                raise DeploymentError(f"{prefix}.{name}", "missing")

        network = d["network"]
        if network not in NETWORKS:
            raise DeploymentError(
                f"{prefix}.network", f"must be one of {', '.join(NETWORKS)} (got {network!r})"
            )

        seen: dict[bytes, str] = {}

        def key_list(name: str, lo: int, hi: int) -> tuple[DeploymentKey, ...]:
            value = d.get(name, [])
            if not isinstance(value, list):
                raise DeploymentError(f"{prefix}.{name}", "must be a list of keys")
            if not lo <= len(value) <= hi:
                raise DeploymentError(
                    f"{prefix}.{name}", f"must hold {lo} to {hi} keys (got {len(value)})"
                )
            keys = []
            for i, item in enumerate(value):
                where = f"{prefix}.{name}[{i}]"
                key = DeploymentKey.parse(where, item, network)
                if key.pubkey in seen:
                    raise DeploymentError(where, f"duplicate key (same as {seen[key.pubkey]})")
                seen[key.pubkey] = where
                keys.append(key)
            return tuple(keys)

        stakeholders = key_list("stakeholders", 1, MAX_STAKEHOLDERS)
        managers = key_list("managers", 1, MAX_MANAGERS)
        if "cosigners" not in d:
            raise DeploymentError(f"{prefix}.cosigners", "missing (use [] for none)")
        cosigners = key_list("cosigners", 0, MAX_COSIGNERS)

        threshold = d.get("managers_threshold", len(managers))
        if not isinstance(threshold, int) or isinstance(threshold, bool):
            raise DeploymentError(f"{prefix}.managers_threshold", "must be an integer")
        if not 1 <= threshold <= len(managers):
            raise DeploymentError(
                f"{prefix}.managers_threshold",
                f"must be between 1 and the number of managers ({len(managers)}), got {threshold}",
            )

        csv = d["unvault_csv"]
        if not isinstance(csv, int) or isinstance(csv, bool):
            raise DeploymentError(f"{prefix}.unvault_csv", "must be an integer (blocks)")
        if not 1 <= csv <= MAX_CSV:
            raise DeploymentError(
                f"{prefix}.unvault_csv",
                f"must be between 1 and {MAX_CSV} blocks (BIP 68 relative lock), got {csv}",
            )

        address = d["emergency_address"]
        try:
            emergency_spk = address_to_script_pubkey(address, network)
        except ValueError as exc:
            raise DeploymentError(
                f"{prefix}.emergency_address", f"not a valid {network} address ({exc})"
            ) from None

        towers = d.get("watchtowers", [])
        if not isinstance(towers, list):
            raise DeploymentError(f"{prefix}.watchtowers", "must be a list of public keys")
        watchtowers: list[bytes] = []
        for i, item in enumerate(towers):
            where = f"{prefix}.watchtowers[{i}]"
            key = DeploymentKey.parse(where, item, network)
            if key.is_xpub:
                raise DeploymentError(where, "must be a public key (33 bytes hex), not an xpub")
            if key.pubkey in watchtowers:
                raise DeploymentError(where, "duplicate key")
            watchtowers.append(key.pubkey)

        return cls(
            network=network,
            stakeholders=stakeholders,
            managers=managers,
            managers_threshold=threshold,
            cosigners=cosigners,
            unvault_csv=csv,
            emergency_address=address,
            watchtowers=tuple(watchtowers),
            emergency_script_pubkey=emergency_spk,
        )

    @property
    def uses_xpubs(self) -> bool:
        return any(k.is_xpub for k in self.stakeholders + self.managers + self.cosigners)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (frozen, hashable, long-lived)
    def keys(self, index: int = 0) -> VaultKeys:
        """The keys of vault number `index`."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2**31:
            raise TransactionError(f"vault index must be in 0..2^31-1, got {index!r}")
        vault = VaultKeys(
            stakeholders=tuple(k.at(index) for k in self.stakeholders),
            managers=tuple(k.at(index) for k in self.managers),
            managers_threshold=self.managers_threshold,
            cosigners=tuple(k.at(index) for k in self.cosigners),
            unvault_csv=self.unvault_csv,
        )
        every = vault.stakeholders + vault.managers + vault.cosigners
        if len(set(every)) != len(every):
            raise TransactionError(f"vault {index}: two xpubs derive the same child key")
        return vault

    def deposit_witness_script(self, index: int = 0) -> bytes:
        return self.keys(index).deposit_script()

    def deposit_script_pubkey(self, index: int = 0) -> bytes:
        return p2wsh(self.deposit_witness_script(index))

    def deposit_address(self, index: int = 0) -> str:
        return script_pubkey_to_address(self.deposit_script_pubkey(index), self.network)

    def deposit_descriptor(self, index: int = 0) -> str:
        return self.keys(index).deposit_descriptor()

    def unvault_witness_script(self, index: int = 0) -> bytes:
        return self.keys(index).unvault_script()

    def unvault_script_pubkey(self, index: int = 0) -> bytes:
        return p2wsh(self.unvault_witness_script(index))

    def unvault_address(self, index: int = 0) -> str:
        return script_pubkey_to_address(self.unvault_script_pubkey(index), self.network)

    def unvault_descriptor(self, index: int = 0) -> str:
        return self.keys(index).unvault_descriptor()


# --------------------------------------------------------------------------------------
# Transactions (consensus serialization, BIP 143)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutPoint:
    txid: str  # display order hex, as bitcoind prints it
    vout: int

    def __post_init__(self) -> None:
        if not isinstance(self.txid, str) or len(self.txid) != 64:
            raise TransactionError("txid must be 64 hex characters")
        try:
            bytes.fromhex(self.txid)
        except ValueError:
            raise TransactionError("txid must be 64 hex characters") from None
        if not isinstance(self.vout, int) or not 0 <= self.vout <= 0xFFFFFFFF:
            raise TransactionError("vout out of range")

    def serialize(self) -> bytes:
        return bytes.fromhex(self.txid)[::-1] + self.vout.to_bytes(4, "little")

    def __str__(self) -> str:
        return f"{self.txid}:{self.vout}"


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

    @property
    def sighash_type(self) -> int:
        return SIGHASH_ALL if self in (Kind.UNVAULT, Kind.SPEND) else SIGHASH_ALL_ANYONECANPAY

    @property
    def is_revocation(self) -> bool:
        return self.sighash_type == SIGHASH_ALL_ANYONECANPAY


class SpendPath(str, enum.Enum):
    DEPOSIT = "deposit"  # N-of-N stakeholders of the deposit script
    UNVAULT_STAKEHOLDERS = "unvault_stakeholders"  # or_d's first branch
    UNVAULT_MANAGERS = "unvault_managers"  # managers + cosigners after the csv
    FEE_P2WPKH = "fee_p2wpkh"  # a fee-reserve coin appended by a watchtower


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
        return [k for k in self.signers if k not in sigs]

    def witness(self, sigs: Mapping[bytes, bytes]) -> tuple[bytes, ...]:
        """The witness, given witness signatures (DER + sighash byte) by key."""
        if self.path is SpendPath.FEE_P2WPKH:
            return (sigs[self.fee_pubkey], self.fee_pubkey)
        assert self.keys is not None
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
    if not isinstance(coin.value, int) or coin.value <= 0 or coin.value > 21_000_000 * 100_000_000:
        raise TransactionError(f"{what} value out of range: {coin.value!r}")


def _presigned(
    kind: Kind, coin: Coin, spent: SpentOutput, script_pubkey: bytes, vault_index: int
) -> RevaultTransaction:
    """A one-input, one-output pre-signed transaction paying exactly 253 sat/kWU."""
    draft = _revault_tx(kind, [(coin, spent, RBF_SEQUENCE)], [TxOut(0, script_pubkey)], vault_index)
    fee = fee_for_weight(draft.max_weight())
    value = coin.value - fee
    dust = dust_threshold(script_pubkey)
    if value < dust:
        raise TransactionError(
            f"{kind.value}: {coin.value} sat cannot pay the {fee} sat fee and leave at least "
            f"{dust} sat (dust limit)"
        )
    return _revault_tx(kind, [(coin, spent, RBF_SEQUENCE)], [TxOut(value, script_pubkey)], vault_index)


def _deposit_spent(d: Deployment, coin: Coin, kind: Kind) -> SpentOutput:
    keys = d.keys(coin.index)
    ws = keys.deposit_script()
    return SpentOutput(coin.value, p2wsh(ws), ws, SpendPath.DEPOSIT, kind.sighash_type, keys)


def _unvault_spent(d: Deployment, coin: Coin, kind: Kind, path: SpendPath) -> SpentOutput:
    keys = d.keys(coin.index)
    ws = keys.unvault_script()
    return SpentOutput(coin.value, p2wsh(ws), ws, path, kind.sighash_type, keys)


def build_unvault(d: Deployment, deposit: Coin) -> RevaultTransaction:
    """Deposit -> unvault output (same vault index), ALL, 253 sat/kWU."""
    _check_coin(deposit, "deposit")
    spent = _deposit_spent(d, deposit, Kind.UNVAULT)
    return _presigned(Kind.UNVAULT, deposit, spent, d.unvault_script_pubkey(deposit.index), deposit.index)


def build_cancel(d: Deployment, unvault: Coin) -> RevaultTransaction:
    """Unvault output -> the vault's deposit script again, ALL|ANYONECANPAY."""
    _check_coin(unvault, "unvault output")
    spent = _unvault_spent(d, unvault, Kind.CANCEL, SpendPath.UNVAULT_STAKEHOLDERS)
    return _presigned(Kind.CANCEL, unvault, spent, d.deposit_script_pubkey(unvault.index), unvault.index)


def build_emergency(d: Deployment, deposit: Coin) -> RevaultTransaction:
    """Deposit -> emergency_address, ALL|ANYONECANPAY."""
    _check_coin(deposit, "deposit")
    spent = _deposit_spent(d, deposit, Kind.EMERGENCY)
    return _presigned(Kind.EMERGENCY, deposit, spent, d.emergency_script_pubkey, deposit.index)


def build_unvault_emergency(d: Deployment, unvault: Coin) -> RevaultTransaction:
    """Unvault output -> emergency_address, ALL|ANYONECANPAY."""
    _check_coin(unvault, "unvault output")
    spent = _unvault_spent(d, unvault, Kind.UNVAULT_EMERGENCY, SpendPath.UNVAULT_STAKEHOLDERS)
    return _presigned(Kind.UNVAULT_EMERGENCY, unvault, spent, d.emergency_script_pubkey, unvault.index)


def build_spend(d: Deployment, unvaults: Sequence[Coin], outputs: Sequence[TxOut]) -> RevaultTransaction:
    """Unvault outputs (a batch) -> `outputs`, through the managers + cosigners branch,
    every input with nSequence = unvault_csv. The fee is what the inputs leave over;
    size it with `max_weight()` of a draft."""
    if not unvaults:
        raise TransactionError("spend: no unvault output to spend")
    if not outputs:
        raise TransactionError("spend: no output")
    if len({c.outpoint for c in unvaults}) != len(unvaults):
        raise TransactionError("spend: the same unvault output twice")
    spent = []
    for n, coin in enumerate(unvaults):
        _check_coin(coin, f"spend: unvault output {n}")
        spent.append((coin, _unvault_spent(d, coin, Kind.SPEND, SpendPath.UNVAULT_MANAGERS), d.unvault_csv))
    for n, out in enumerate(outputs):
        if not isinstance(out, TxOut) or not isinstance(out.value, int):
            raise TransactionError(f"spend: output {n} must be a TxOut")
        if out.value < dust_threshold(out.script_pubkey):
            raise TransactionError(
                f"spend: output {n} pays {out.value} sat, below the dust limit "
                f"{dust_threshold(out.script_pubkey)}"
            )
    total_in = sum(c.value for c in unvaults)
    total_out = sum(o.value for o in outputs)
    if total_out > total_in:
        raise TransactionError(f"spend: outputs ({total_out} sat) exceed inputs ({total_in} sat)")
    return _revault_tx(Kind.SPEND, spent, outputs, unvaults[0].index)


@dataclass(frozen=True, slots=True)
class VaultTransactions:
    """The pre-signed transactions of one vault."""

    unvault: RevaultTransaction
    cancel: RevaultTransaction
    emergency: RevaultTransaction
    unvault_emergency: RevaultTransaction

    def revocations(self) -> tuple[RevaultTransaction, ...]:
        return (self.cancel, self.emergency, self.unvault_emergency)


def build_vault_transactions(d: Deployment, deposit: Coin) -> VaultTransactions:
    """Every pre-signed transaction of the vault at `deposit`."""
    unvault = build_unvault(d, deposit)
    unvault_coin = unvault.output_coin(0)
    return VaultTransactions(
        unvault=unvault,
        cancel=build_cancel(d, unvault_coin),
        emergency=build_emergency(d, deposit),
        unvault_emergency=build_unvault_emergency(d, unvault_coin),
    )


# --------------------------------------------------------------------------------------
# Fee bumping of revocation transactions
# --------------------------------------------------------------------------------------

BNB_MAX_STEPS = 100_000  # exact search budget before settling for greedy


@dataclass(frozen=True, slots=True)
class FeeCoin:
    """A fee-reserve coin: a P2WPKH output of the bumper's key."""

    outpoint: OutPoint
    value: int


@dataclass(frozen=True, slots=True)
class FeeSelection:
    coins: tuple[FeeCoin, ...]
    fee: int  # total fee once the coins are added
    max_weight: int  # weight once the coins are signed (signatures at their largest)
    exact: bool  # True when the search proved this is the least overpayment
    feerate_sat_per_kwu: int

    @property
    def overpayment_msat(self) -> int:
        """Fee above target x max_weight / 1000, in millisatoshis."""
        return 1000 * self.fee - self.feerate_sat_per_kwu * self.max_weight


def select_fee_inputs(
    base_weight: int,
    base_fee: int,
    reserve: Sequence[FeeCoin],
    feerate_sat_per_kwu: int,
    *,
    base_inputs: int = 1,
    max_steps: int = BNB_MAX_STEPS,
) -> FeeSelection:
    """Choose reserve coins so that (base_fee + their value) / (base_weight + their
    weight) reaches the target, overpaying as little as possible: with no change
    output, that is the selection of least total value. Ties: fewer inputs.

    Exact branch and bound while it fits in `max_steps`, then the best found or a greedy
    pick. FeeBumpError (with `shortfall_sat`) when even the whole reserve is not enough.
    """
    if feerate_sat_per_kwu <= 0:
        raise ValueError("target feerate must be positive")
    # Work in millisatoshis so that the feerate condition is exact integer arithmetic:
    # 1000 * fee >= feerate * weight.
    deficit = feerate_sat_per_kwu * base_weight - 1000 * base_fee
    if deficit <= 0:
        return FeeSelection((), base_fee, base_weight, True, feerate_sat_per_kwu)
    room = MAX_INPUTS_ONE_BYTE_COUNT - base_inputs
    per_input = feerate_sat_per_kwu * P2WPKH_INPUT_MAX_WEIGHT
    useful = sorted(
        (c for c in reserve if 1000 * c.value > per_input),
        key=lambda c: (-c.value, c.outpoint.txid, c.outpoint.vout),
    )
    effective = [1000 * c.value - per_input for c in useful]

    def result(chosen: Sequence[int], exact: bool) -> FeeSelection:
        coins = tuple(useful[i] for i in chosen)
        return FeeSelection(
            coins, base_fee + sum(c.value for c in coins),
            base_weight + P2WPKH_INPUT_MAX_WEIGHT * len(coins), exact, feerate_sat_per_kwu,
        )

    best_total = sum(effective[:room])
    if best_total < deficit:
        shortfall = -(-(deficit - best_total) // 1000)
        raise FeeBumpError(
            f"fee reserve cannot reach {feerate_sat_per_kwu} sat/kWU: "
            f"{len(reserve)} coin(s), {len(useful)} worth adding, short by {shortfall} sat",
            shortfall_sat=shortfall,
        )

    # Every satoshi taken from the reserve becomes fee (there is no change), so the
    # least overpayment is the cheapest selection that reaches the target; ties go to
    # fewer inputs (a lighter transaction, a higher feerate). Branch and bound over
    # coins by decreasing value: a branch stops when it reaches the target (more coins
    # only cost more), when it cannot reach it with every remaining coin, or when it
    # already costs as much as the best selection found.
    values = [c.value for c in useful]
    suffix = [0] * (len(effective) + 1)
    for i in range(len(effective) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + effective[i]
    best: list[int] | None = None
    best_cost = 0
    steps = 0
    exhausted = True
    stack: list[tuple[int, int, int, list[int]]] = [(0, 0, 0, [])]
    while stack:
        steps += 1
        if steps > max_steps:
            exhausted = False
            break
        pos, total, cost, chosen = stack.pop()
        if best is not None and (cost > best_cost or (cost == best_cost and len(chosen) >= len(best))):
            continue
        if total >= deficit:
            best, best_cost = chosen, cost
            continue
        if pos == len(effective) or len(chosen) >= room or total + suffix[pos] < deficit:
            continue
        # A coin adds at most its value to the effective total, so what is still
        # missing costs at least that much more.
        if best is not None and 1000 * cost + (deficit - total) > 1000 * best_cost:
            continue
        # Pushed last = explored first: including the coin finds a solution fast.
        stack.append((pos + 1, total, cost, chosen))
        stack.append((pos + 1, total + effective[pos], cost + values[pos], chosen + [pos]))
    if best is not None:
        return result(best, exhausted)

    chosen: list[int] = []
    total = 0
    for i, e in enumerate(effective):
        if total >= deficit or len(chosen) >= room:
            break
        chosen.append(i)
        total += e
    for i in sorted(chosen, key=lambda i: -effective[i]):
        if total - effective[i] >= deficit:
            chosen.remove(i)
            total -= effective[i]
    return result(sorted(chosen), False)


def bump_revocation(
    revocation: RevaultTransaction,
    reserve: Sequence[FeeCoin],
    feerate_sat_per_kwu: int,
    fee_key: bytes,
    *,
    max_steps: int = BNB_MAX_STEPS,
) -> tuple[RevaultTransaction, FeeSelection]:
    """Append reserve coins (P2WPKH of `fee_key`) to a fully signed revocation so that
    it pays at least `feerate_sat_per_kwu`, sign them ALL, and return the complete
    transaction. Its own ALL|ANYONECANPAY signatures stay valid: they commit to the
    outputs and to their own input only. FeeBumpError when the reserve is too small."""
    if not revocation.kind.is_revocation:
        raise TransactionError(f"{revocation.kind.value} is not a revocation transaction (ALL-signed)")
    if not revocation.is_complete():
        raise TransactionError(f"{revocation.kind.value} must be fully signed before a fee bump")
    signed = revocation.finalize()
    selection = select_fee_inputs(
        signed.weight, revocation.fee, reserve, feerate_sat_per_kwu,
        base_inputs=len(signed.inputs), max_steps=max_steps,
    )
    pubkey = coincurve.PrivateKey(fee_key).public_key.format(compressed=True)
    spk = p2wpkh(pubkey)
    script_code = _p2wpkh_script_code(pubkey)
    inputs = revocation.tx.inputs + tuple(TxIn(c.outpoint, RBF_SEQUENCE) for c in selection.coins)
    spent = revocation.spent + tuple(
        SpentOutput(c.value, spk, script_code, SpendPath.FEE_P2WPKH, SIGHASH_ALL, None, pubkey)
        for c in selection.coins
    )
    bumped = RevaultTransaction(
        revocation.kind,
        Tx(revocation.tx.version, inputs, revocation.tx.outputs, revocation.tx.locktime),
        spent,
        revocation.vault_index,
    )
    for i, sigs in enumerate(revocation.signatures):
        bumped.signatures[i] = dict(sigs)
    for i in range(len(revocation.spent), len(spent)):
        bumped.sign(i, fee_key)
    return bumped, selection
