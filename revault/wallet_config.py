"""The wallet's TOML config (docs/protocol.md, "Keys and config files", Wallet).

    data_dir = "wallet-data"                 # the wallet's SQLite state (created 0700)
    noise_key_file = "noise.key"             # this participant's Noise static key
    stakeholder_key_file = "stakeholder.key" # and/or manager_key_file (a participant
    manager_key_file = "manager.key"         #   with both roles has two keys)
    cpfp_key_file = "cpfp.key"               # managers (the hot key of `cpfp_keys`)
    [sync_server]    host, port, noise_key
    [[watchtowers]]  host, port, noise_key   # stakeholders: one or more
    [[cosigners]]    host, port, noise_key   # managers: one per deployment cosigner
    [bitcoind]       rpc_url, cookie_file | rpc_user + rpc_password, optional wallet
    [deployment]     as shared with the watchtowers

Read through `ConfigTable`/`ProblemCollector` like the daemons' configs: every bad or
unknown key is reported at once, naming it. Key files are read (and their modes
checked) by `load_wallet_config`, which also checks that each key is the deployment's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from embit.bip32 import HDKey

from revault.bitcoind import BitcoindConfig, read_bitcoind_config
from revault.config import ConfigError, ConfigTable, ProblemCollector, load_config_file
from revault.keys import KeyFileError, bitcoin_public_key, read_key_file
from revault.deployment import Deployment, DeploymentKey, read_deployment

__all__ = ["Endpoint", "ParticipantKey", "WalletConfig", "read_wallet_config",
           "load_wallet_config", "default_bitcoind_wallet"]

MAX_ENDPOINTS = 100  # watchtowers or cosigners per wallet: far beyond any deployment

# BIP 32 private versions by network: a seed's master key must print as the
# deployment's xpub, so it is built with the network's own version bytes.
_XPRV_VERSIONS = {"bitcoin": bytes.fromhex("0488ade4")}
_TPRV = bytes.fromhex("04358394")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A daemon this wallet talks to."""

    name: str  # what errors call it, e.g. "watchtowers[1] (127.0.0.1:8384)"
    host: str
    port: int
    noise_key: bytes


@dataclass(frozen=True)
class ParticipantKey:
    """One of this participant's bitcoin keys, at its position in a deployment list.

    For plain keys `secret_at` is the same secret for every vault; for xpub deployments
    the key file is a BIP 32 seed and vault *i* uses child *i* of its master key.
    """

    role: str                 # "stakeholder" or "manager"
    position: int             # index in the deployment's list
    _secret: bytes = field(repr=False)
    _hd: HDKey | None = field(repr=False, default=None)

    def secret_at(self, index: int) -> bytes:
        if self._hd is None:
            return self._secret
        return self._hd.child(index).key.secret


@dataclass(frozen=True)
class WalletConfig:
    path: Path
    data_dir: Path
    noise_key_file: Path
    stakeholder_key_file: Path | None
    manager_key_file: Path | None
    cpfp_key_file: Path | None
    sync_server: Endpoint
    watchtowers: tuple[Endpoint, ...]
    cosigners: tuple[Endpoint, ...]
    bitcoind: BitcoindConfig
    deployment: Deployment


def default_bitcoind_wallet(data_dir: Path) -> str:
    """The watch-only wallet's name when `[bitcoind] wallet` is not set: derived from
    the data directory, so that two wallets on one node never share one."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return f"revault-watchonly-{digest}"


def _read_endpoint(table: ConfigTable, name: str) -> Endpoint:
    p = ProblemCollector()
    host = p.read(table.string, "host")
    port = p.read(table.integer, "port", minimum=1, maximum=65535)
    noise_key = p.read(table.noise_key, "noise_key")
    if host == "":
        p.add(f"{table.key_name('host')}: must not be empty")
    p.finish()
    return Endpoint(f"{name} ({host}:{port})", host, port, noise_key)


def _read_endpoints(table: ConfigTable, key: str, p: ProblemCollector) -> tuple[Endpoint, ...]:
    """An array of tables (`[[watchtowers]]`), each an endpoint; unknown keys reported."""
    value = p.read(table.raw, key, [])
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        p.add(f"{table.key_name(key)}: expected an array of tables ([[{key}]])")
        return ()
    if len(value) > MAX_ENDPOINTS:
        p.add(f"{table.key_name(key)}: at most {MAX_ENDPOINTS} entries")
        return ()
    endpoints = []
    for i, item in enumerate(value):
        child = ConfigTable(item, f"{key}[{i}]")
        endpoint = p.read(_read_endpoint, child, f"{key}[{i}]")
        for unknown in child.unknown_keys():
            p.add(f"{unknown}: unknown key")
        if endpoint is not None:
            endpoints.append(endpoint)
    keys = [e.noise_key for e in endpoints]
    if len(set(keys)) != len(keys):
        p.add(f"{table.key_name(key)}: the same noise_key twice")
    return tuple(endpoints)


def read_wallet_config(table: ConfigTable, base: Path, path: Path | None = None) -> WalletConfig:
    """Read and check every key (files are not touched); ConfigError lists each bad one."""
    p = ProblemCollector()
    data_dir = p.read(table.path, "data_dir", base)
    noise_key_file = p.read(table.path, "noise_key_file", base)
    stakeholder_key_file = p.read(table.path, "stakeholder_key_file", base, None)
    manager_key_file = p.read(table.path, "manager_key_file", base, None)
    cpfp_key_file = p.read(table.path, "cpfp_key_file", base, None)
    sync_table = p.read(table.table, "sync_server")
    sync_server = p.read(_read_endpoint, sync_table, "sync_server") if sync_table else None
    watchtowers = _read_endpoints(table, "watchtowers", p)
    cosigners = _read_endpoints(table, "cosigners", p)
    bitcoind_table = p.read(table.table, "bitcoind")
    bitcoind = p.read(read_bitcoind_config, bitcoind_table, base) if bitcoind_table else None
    deployment_table = p.read(table.table, "deployment")
    deployment = read_deployment(deployment_table, p) if deployment_table else None
    if stakeholder_key_file is None and manager_key_file is None and not p.problems:
        p.add("stakeholder_key_file: give stakeholder_key_file and/or manager_key_file")
    if stakeholder_key_file is not None and not watchtowers and "watchtowers" not in table:
        p.add("watchtowers: missing; a stakeholder needs at least one [[watchtowers]]")
    elif stakeholder_key_file is not None and not watchtowers and not p.problems:
        p.add("watchtowers: a stakeholder needs at least one [[watchtowers]]")
    if manager_key_file is not None:
        if cpfp_key_file is None:
            p.add("cpfp_key_file: missing; a manager needs its CPFP key")
        if deployment is not None and len(cosigners) != len(deployment.cosigners):
            p.add(f"cosigners: the deployment has {len(deployment.cosigners)} cosigner(s), "
                  f"this config lists {len(cosigners)} [[cosigners]]")
    for unknown in table.unknown_keys():
        p.add(f"{unknown}: unknown key")
    p.finish()
    return WalletConfig(
        path=path or base, data_dir=data_dir, noise_key_file=noise_key_file,
        stakeholder_key_file=stakeholder_key_file, manager_key_file=manager_key_file,
        cpfp_key_file=cpfp_key_file, sync_server=sync_server, watchtowers=watchtowers,
        cosigners=cosigners, bitcoind=bitcoind, deployment=deployment)


def load_wallet_config(path: Path | str) -> WalletConfig:
    path = Path(path)
    table = load_config_file(path)
    return read_wallet_config(table, path.resolve().parent, path)


def participant_key(role: str, key_file: Path, keys: tuple[DeploymentKey, ...],
                    network: str) -> ParticipantKey:
    """Read `key_file` and find its key in the deployment's `role` list (ConfigError,
    naming the file, when it is not there)."""
    try:
        secret = read_key_file(key_file)
        hd = None
        if any(k.is_xpub for k in keys):
            hd = HDKey.from_seed(secret, version=_XPRV_VERSIONS.get(network, _TPRV))
            pubkey = hd.sec()
        else:
            pubkey = bitcoin_public_key(secret)
    except KeyFileError as e:
        raise ConfigError(f"{role}_key_file: {e}") from None
    for position, key in enumerate(keys):
        if key.pubkey == pubkey:
            return ParticipantKey(role, position, secret, hd)
    shown = hd.to_public().to_string() if hd is not None else pubkey.hex()
    raise ConfigError(f"{role}_key_file: {key_file}: its key {shown} is not one of the "
                      f"deployment's {role}s")

