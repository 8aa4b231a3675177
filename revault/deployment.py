"""The deployment: keys, scripts, descriptors and addresses of one Revault setup.

Everything here is pure (no I/O) and deterministic: every participant who holds the
same `[deployment]` table derives byte-identical scripts, which is what lets the
transaction chain (`revault.transactions`) be rebuilt by each of them and signatures be
exchanged by transaction id alone.

Scripts (segwit v0, keys in the order of the config table, never sorted):

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
* CPFP output (on every unvault and spend, so that a pre-signed transaction can be
  fee-bumped by a child): ``wsh(multi(1, cpfp_1..cpfp_M))``, one hot key per manager.

With xpubs in the deployment, vault number ``index`` uses the non-hardened child
``index`` of every key; with plain public keys every vault uses the same keys.

The `[deployment]` table is read like every other config table (`read_deployment`,
through `config.ConfigTable` and `config.ProblemCollector`), so a bad key stops a daemon
at start with a message naming it; `Deployment.from_dict` does the same for a plain
dict and raises `DeploymentError`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bitcoin.core import script
from bitcoin.core.script import CScript, CScriptInvalidError
from embit import base58, bech32
from embit.bip32 import HDKey
from embit.descriptor.checksum import add_checksum

from revault.config import MISSING, ConfigError, ConfigTable, ProblemCollector
from revault.primitives import pubkey_problem

__all__ = [
    "MAX_STAKEHOLDERS", "MAX_MANAGERS", "MAX_COSIGNERS", "MAX_CSV", "MAX_VAULT_INDEX", "NETWORKS",
    "DeploymentError", "DerivationError", "DeploymentKey", "VaultKeys", "Deployment",
    "read_deployment", "address_to_script_pubkey", "script_pubkey_to_address",
    "witness_program", "p2wsh", "p2wpkh", "p2wpkh_script_code", "sha256", "hash160",
    "script_relative_lock", "DEFAULT_MIN_DEPOSIT_VALUE", "MIN_DEPOSIT_VALUE_FLOOR", "MAX_MONEY",
]

MAX_STAKEHOLDERS = 20  # CHECKMULTISIG takes at most 20 keys
MAX_MANAGERS = 20
MAX_COSIGNERS = 20  # keeps the witness script far below the 3600-byte policy limit
MAX_CSV = 0xFFFF  # BIP 68 block-based relative locks are 16 bits
MAX_VAULT_INDEX = 2**31 - 1  # non-hardened BIP 32 children
MAX_MONEY = 21_000_000 * 100_000_000  # satoshis
DEFAULT_MIN_DEPOSIT_VALUE = 500_000  # sat; docs/protocol.md: smaller deposits are not vaults
# A vault must pay the unvault's 30,000-sat CPFP output and the pre-signed fees and
# still leave more than dust: a floor far below any sensible min_deposit_value.
MIN_DEPOSIT_VALUE_FLOOR = 50_000

# network name in the config -> (bech32 hrp, p2pkh version, p2sh version, xpub version)
NETWORKS: dict[str, tuple[str, int, int, bytes]] = {
    "bitcoin": ("bc", 0x00, 0x05, bytes.fromhex("0488b21e")),
    "testnet": ("tb", 0x6F, 0xC4, bytes.fromhex("043587cf")),
    "signet": ("tb", 0x6F, 0xC4, bytes.fromhex("043587cf")),
    "regtest": ("bcrt", 0x6F, 0xC4, bytes.fromhex("043587cf")),
}
_PUBLIC_XKEY_VERSIONS = {v[3] for v in NETWORKS.values()}
_PRIVATE_XKEY_VERSIONS = {bytes.fromhex("0488ade4"), bytes.fromhex("04358394")}
_PUBKEY_HINTS = {"not a compressed public key": "must start with 02 or 03",
                 "not a valid public key": "not on the curve"}

_OP_0, _OP_1 = 0x00, 0x51
_OP_DUP, _OP_HASH160, _OP_EQUAL, _OP_EQUALVERIFY = 0x76, 0xA9, 0x87, 0x88
_OP_CHECKSIG = 0xAC


class DeploymentError(ConfigError, ValueError):
    """A `[deployment]` table that breaks the spec. `key` and `reason` are the first
    problem (the message starts with "key: reason"); `problems` lists every one."""

    def __init__(self, key: str, reason: str, *, problems: Sequence[str] | None = None):
        self.key = key
        self.reason = reason
        ConfigError.__init__(self, list(problems) if problems else [f"{key}: {reason}"])

    @classmethod
    def from_problems(cls, problems: Sequence[str]) -> DeploymentError:
        key, _, reason = problems[0].partition(": ")
        return cls(key, reason, problems=problems)


class DerivationError(ValueError):
    """A vault index that has no keys: out of 0..2^31-1, or two xpubs whose children
    at that index collide."""


# --------------------------------------------------------------------------------------
# Hashes and addresses
# --------------------------------------------------------------------------------------


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", sha256(data)).digest()


def p2wsh(witness_script: bytes) -> bytes:
    return b"\x00\x20" + sha256(witness_script)


def p2wpkh(pubkey: bytes) -> bytes:
    return b"\x00\x14" + hash160(pubkey)


def p2wpkh_script_code(pubkey: bytes) -> bytes:
    """BIP 143 script code of a P2WPKH input (the P2PKH script of the key)."""
    return bytes([_OP_DUP, _OP_HASH160, 20]) + hash160(pubkey) + bytes([_OP_EQUALVERIFY, _OP_CHECKSIG])


def witness_program(script_pubkey: bytes) -> tuple[int, bytes] | None:
    """(version, program) of a segwit scriptPubKey, or None."""
    spk = script_pubkey
    if 4 <= len(spk) <= 42 and spk[1] == len(spk) - 2:
        if spk[0] == _OP_0:
            return 0, spk[2:]
        if _OP_1 <= spk[0] <= _OP_1 + 15:
            return spk[0] - _OP_1 + 1, spk[2:]
    return None


def _script_number(item: int | bytes) -> int | None:
    """The value of a number pushed by a script (an OP_n or minimal little-endian bytes)."""
    if isinstance(item, int) and not isinstance(item, script.CScriptOp):
        return item
    if isinstance(item, bytes) and 0 < len(item) <= 5 and not item[-1] & 0x80:
        return int.from_bytes(item, "little")
    return None


def _script_items(witness_script: bytes) -> list | None:
    try:
        return list(CScript(witness_script))
    except CScriptInvalidError:
        return None


def script_relative_lock(witness_script: bytes) -> int | None:
    """The number checked by the first CHECKSEQUENCEVERIFY of `witness_script` (the
    nSequence an input spending it through that branch must carry), or None."""
    items = _script_items(witness_script) or []
    for i, item in enumerate(items):
        if isinstance(item, script.CScriptOp) and item == script.OP_CHECKSEQUENCEVERIFY:
            return _script_number(items[i - 1]) if i else None
    return None


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
        op = _OP_0 if version == 0 else _OP_1 + version - 1
        return bytes([op, len(program)]) + bytes(program)
    try:
        raw = base58.decode_check(address)
    except Exception:
        raise ValueError(f"not a valid {network} address") from None
    if len(raw) == 21 and raw[0] == p2pkh_version:
        return bytes([_OP_DUP, _OP_HASH160, 20]) + raw[1:] + bytes([_OP_EQUALVERIFY, _OP_CHECKSIG])
    if len(raw) == 21 and raw[0] == p2sh_version:
        return bytes([_OP_HASH160, 20]) + raw[1:] + bytes([_OP_EQUAL])
    raise ValueError(f"not a valid {network} address")


def script_pubkey_to_address(script_pubkey: bytes, network: str) -> str:
    hrp, p2pkh_version, p2sh_version, _ = NETWORKS[network]
    program = witness_program(script_pubkey)
    if program is not None:
        address = bech32.encode(hrp, program[0], program[1])
        if address is None:
            raise ValueError("witness program has no address")
        return address
    spk = script_pubkey
    if len(spk) == 25 and spk[:3] == bytes([_OP_DUP, _OP_HASH160, 20]) \
            and spk[23:] == bytes([_OP_EQUALVERIFY, _OP_CHECKSIG]):
        return base58.encode_check(bytes([p2pkh_version]) + spk[3:23])
    if len(spk) == 23 and spk[:2] == bytes([_OP_HASH160, 20]) and spk[22] == _OP_EQUAL:
        return base58.encode_check(bytes([p2sh_version]) + spk[2:22])
    raise ValueError("script has no standard address")


# --------------------------------------------------------------------------------------
# Keys and scripts
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
    def parse(cls, key: str, value: Any, network: str | None) -> DeploymentKey:
        """DeploymentError naming `key` unless `value` is a compressed public key in hex
        or an extended public key of `network` (of any network when it is None: the
        network key itself was bad and is reported on its own)."""
        if not isinstance(value, str):
            raise DeploymentError(key, "must be a string (hex public key or xpub)")
        if len(value) == 66 and all(c in "0123456789abcdefABCDEF" for c in value):
            raw = bytes.fromhex(value)
            problem = pubkey_problem(raw)
            if problem is not None:
                raise DeploymentError(key, f"{problem} ({_PUBKEY_HINTS[problem]})")
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
        expected = {NETWORKS[network][3]} if network in NETWORKS else _PUBLIC_XKEY_VERSIONS
        if version not in expected:
            want = "xpub" if network == "bitcoin" else "tpub"
            raise DeploymentError(key, f"not a {network} extended public key (expected {want}...)")
        try:
            hd = HDKey.from_string(value)
        except Exception as exc:
            raise DeploymentError(key, f"invalid xpub ({exc})") from None
        return cls(value, hd.sec(), True)


def _hexes(keys: Iterable[bytes]) -> str:
    return ",".join(k.hex() for k in keys)


def _multisig(k: int, keys: Sequence[bytes], opcode) -> list:
    # CScript encodes 1..16 as OP_1..OP_16 and larger numbers minimally, as consensus wants.
    return [k, *keys, len(keys), opcode]


@dataclass(frozen=True, slots=True)
class VaultKeys:
    """The concrete keys of one vault (a derivation index of the deployment)."""

    stakeholders: tuple[bytes, ...]
    managers: tuple[bytes, ...]
    managers_threshold: int
    cosigners: tuple[bytes, ...]
    unvault_csv: int
    cpfp: tuple[bytes, ...] = ()

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

    def cpfp_script(self) -> bytes:
        """multi(1, cpfp_1..cpfp_M): any one manager's hot CPFP key spends it."""
        return bytes(CScript(_multisig(1, self.cpfp, script.OP_CHECKMULTISIG)))

    def deposit_descriptor(self) -> str:
        return add_checksum(f"wsh(multi({len(self.stakeholders)},{_hexes(self.stakeholders)}))")

    def cpfp_descriptor(self) -> str:
        return add_checksum(f"wsh(multi(1,{_hexes(self.cpfp)}))")

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

    @classmethod
    def from_unvault_script(cls, witness_script: bytes) -> VaultKeys | None:
        """The keys behind an unvault witness script (no CPFP keys: the script does not
        hold them), or None when `witness_script` is not exactly one this module builds.
        Lets a cosigner size a spend's worst-case witness like `build_spend` does."""
        items = _script_items(witness_script)
        try:
            n = _script_number(items[0])
            stakeholders = tuple(items[1 : 1 + n])
            k = _script_number(items[5 + n])
            at = 6 + n
            managers = []
            while isinstance(items[at], bytes) and len(items[at]) == 33:
                managers.append(items[at])
                at += 1
            at += 2  # M, CHECKMULTISIGVERIFY
            cosigners = []
            while isinstance(items[at], bytes) and len(items[at]) == 33:
                cosigners.append(items[at])
                at += 2  # key, CHECKSIGVERIFY
            csv = _script_number(items[at])
            keys = cls(stakeholders, tuple(managers), k, tuple(cosigners), csv)
            if keys.unvault_script() == witness_script:
                return keys
        except (TypeError, IndexError, ValueError):
            pass  # not shaped like an unvault script: the rebuilt bytes would differ
        return None


# --------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deployment:
    """The `[deployment]` table shared by wallets and watchtowers. Build it with
    `read_deployment` (a config file) or `Deployment.from_dict` (a plain dict), which
    enforce the spec's bounds."""

    network: str
    stakeholders: tuple[DeploymentKey, ...]
    managers: tuple[DeploymentKey, ...]
    managers_threshold: int
    cosigners: tuple[DeploymentKey, ...]
    unvault_csv: int
    cpfp_keys: tuple[DeploymentKey, ...]
    # None for a participant who is a manager only: such a wallet never learns the
    # emergency address, so it can never rebuild (or leak) an emergency transaction.
    emergency_address: str | None = None
    watchtowers: tuple[bytes, ...] = ()
    min_deposit_value: int = DEFAULT_MIN_DEPOSIT_VALUE
    emergency_script_pubkey: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, prefix: str = "deployment") -> Deployment:
        """Parse and check a `[deployment]` table given as a dict (unknown keys refused);
        DeploymentError names the first bad key and lists every problem."""
        if not isinstance(d, Mapping):
            raise DeploymentError(prefix, "must be a table")
        table = ConfigTable(dict(d), prefix)
        problems = ProblemCollector()
        deployment = read_deployment(table, problems)
        for key in table.unknown_keys():
            problems.add(f"{key}: unknown key")
        if problems.problems or deployment is None:
            raise DeploymentError.from_problems(problems.problems)
        return deployment

    @property
    def uses_xpubs(self) -> bool:
        return any(k.is_xpub for k in self.stakeholders + self.managers + self.cosigners + self.cpfp_keys)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (frozen, hashable, long-lived)
    def keys(self, index: int = 0) -> VaultKeys:
        """The keys of vault number `index`; DerivationError if it has none."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_VAULT_INDEX:
            raise DerivationError(f"vault index must be in 0..2^31-1, got {index!r}")
        vault = VaultKeys(
            stakeholders=tuple(k.at(index) for k in self.stakeholders),
            managers=tuple(k.at(index) for k in self.managers),
            managers_threshold=self.managers_threshold,
            cosigners=tuple(k.at(index) for k in self.cosigners),
            unvault_csv=self.unvault_csv,
            cpfp=tuple(k.at(index) for k in self.cpfp_keys),
        )
        every = vault.stakeholders + vault.managers + vault.cosigners + vault.cpfp
        if len(set(every)) != len(every):
            raise DerivationError(f"vault {index}: two xpubs derive the same child key")
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

    def cpfp_witness_script(self, index: int = 0) -> bytes:
        return self.keys(index).cpfp_script()

    def cpfp_script_pubkey(self, index: int = 0) -> bytes:
        return p2wsh(self.cpfp_witness_script(index))

    def cpfp_address(self, index: int = 0) -> str:
        return script_pubkey_to_address(self.cpfp_script_pubkey(index), self.network)

    def cpfp_descriptor(self, index: int = 0) -> str:
        return self.keys(index).cpfp_descriptor()


def _read_network(table: ConfigTable) -> str:
    network = table.raw("network")
    if network not in NETWORKS:
        raise DeploymentError(
            table.key_name("network"), f"must be one of {', '.join(NETWORKS)} (got {network!r})")
    return network


def _read_integer(table: ConfigTable, key: str, lo: int, hi: int, *, bounds: str, unit: str = "",
                  default: Any = MISSING) -> int:
    """An integer key whose range message says what the bounds mean."""
    value = table.raw(key, default)
    name = table.key_name(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DeploymentError(name, f"must be an integer{unit}")
    if not lo <= value <= hi:
        raise DeploymentError(name, f"must be between {bounds}, got {value}")
    return value


class _KeyReader:
    """Reads the key lists of one table, refusing a key that appears twice anywhere."""

    def __init__(self, table: ConfigTable, network: str | None):
        self.table = table
        self.network = network
        self.seen: dict[bytes, str] = {}

    def keys(self, key: str, lo: int, hi: int, default: Any = ()) -> tuple[DeploymentKey, ...]:
        value = self.table.raw(key, default)
        name = self.table.key_name(key)
        if not isinstance(value, (list, tuple)):
            raise DeploymentError(name, "must be a list of keys")
        if not lo <= len(value) <= hi:
            raise DeploymentError(name, f"must hold {lo} to {hi} keys (got {len(value)})")
        keys = []
        for i, item in enumerate(value):
            where = f"{name}[{i}]"
            parsed = DeploymentKey.parse(where, item, self.network)
            if parsed.pubkey in self.seen:
                raise DeploymentError(where, f"duplicate key (same as {self.seen[parsed.pubkey]})")
            self.seen[parsed.pubkey] = where
            keys.append(parsed)
        return tuple(keys)

    def opinion_keys(self, key: str) -> tuple[bytes, ...]:
        """Plain public keys (no xpubs), distinct among themselves."""
        value = self.table.raw(key, [])
        name = self.table.key_name(key)
        if not isinstance(value, list):
            raise DeploymentError(name, "must be a list of public keys")
        keys: list[bytes] = []
        for i, item in enumerate(value):
            where = f"{name}[{i}]"
            parsed = DeploymentKey.parse(where, item, self.network)
            if parsed.is_xpub:
                raise DeploymentError(where, "must be a public key (33 bytes hex), not an xpub")
            if parsed.pubkey in keys:
                raise DeploymentError(where, "duplicate key")
            keys.append(parsed.pubkey)
        return tuple(keys)


def read_deployment(table: ConfigTable, problems: ProblemCollector) -> Deployment | None:
    """Read a `[deployment]` table; every bad key is added to `problems` (one line each,
    naming the key) and None is returned, so a daemon reports them with its other config
    problems and exits 2. Unknown keys are left to the caller's `ConfigTable.finish()` /
    `unknown_keys()`, as for any table."""
    before = len(problems.problems)
    network = problems.read(_read_network, table)
    reader = _KeyReader(table, network)
    stakeholders = problems.read(reader.keys, "stakeholders", 1, MAX_STAKEHOLDERS, MISSING)
    managers = problems.read(reader.keys, "managers", 1, MAX_MANAGERS, MISSING)
    if "cosigners" not in table:
        problems.add(f"{table.key_name('cosigners')}: missing (use [] for none)")
        cosigners: tuple[DeploymentKey, ...] | None = None
    else:
        cosigners = problems.read(reader.keys, "cosigners", 0, MAX_COSIGNERS)
    # Read even when `managers` is bad (else it would be misreported as unknown); its
    # bound is then the largest possible, and the deployment is refused anyway.
    n_managers = len(managers) if managers else MAX_MANAGERS
    threshold = problems.read(
        _read_integer, table, "managers_threshold", 1, n_managers,
        bounds=f"1 and the number of managers ({n_managers})", default=n_managers)
    cpfp_keys = problems.read(reader.keys, "cpfp_keys", 1, MAX_MANAGERS, MISSING)
    if managers and cpfp_keys and len(cpfp_keys) != len(managers):
        problems.add(f"{table.key_name('cpfp_keys')}: must hold one key per manager "
                     f"({len(managers)}), got {len(cpfp_keys)}")
    csv = problems.read(_read_integer, table, "unvault_csv", 1, MAX_CSV,
                        bounds=f"1 and {MAX_CSV} blocks (BIP 68 relative lock)", unit=" (blocks)")
    min_deposit_value = problems.read(
        _read_integer, table, "min_deposit_value", MIN_DEPOSIT_VALUE_FLOOR, MAX_MONEY,
        bounds=f"{MIN_DEPOSIT_VALUE_FLOOR} and {MAX_MONEY} sat", unit=" (sat)",
        default=DEFAULT_MIN_DEPOSIT_VALUE)
    address = problems.read(table.string, "emergency_address", None)
    emergency_spk = None
    if address is not None and network is not None:
        try:
            emergency_spk = address_to_script_pubkey(address, network)
        except ValueError as exc:
            problems.add(f"{table.key_name('emergency_address')}: not a valid {network} address ({exc})")
    watchtowers = problems.read(reader.opinion_keys, "watchtowers")
    if len(problems.problems) > before:
        return None
    return Deployment(
        network=network,
        stakeholders=stakeholders,
        managers=managers,
        managers_threshold=threshold,
        cosigners=cosigners,
        unvault_csv=csv,
        cpfp_keys=cpfp_keys,
        emergency_address=address,
        watchtowers=watchtowers,
        min_deposit_value=min_deposit_value,
        emergency_script_pubkey=emergency_spk,
    )
