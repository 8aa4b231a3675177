"""A whole Revault deployment on one machine, for end-to-end tests.

Real parts only: the session's regtest bitcoind, the sync server, per manager a
cosigner and (when asked) per stakeholder a watchtower, each a subprocess started with
its console module exactly as a user runs it, and one wallet config per participant.
"""

from __future__ import annotations

import hashlib
import secrets
from decimal import Decimal
from dataclasses import dataclass, field
from pathlib import Path

import coincurve
from embit.bip32 import HDKey

from revault.keys import create_key_file, generate_bitcoin_key
from revault.deployment import p2wpkh, script_pubkey_to_address
from revault.wallet import Wallet
from tests.support.daemons import DaemonProcess, NoiseIdentity, to_toml, write_config
from tests.support.regtest import RegtestNode, free_port

HOST = "127.0.0.1"
TPRV = bytes.fromhex("04358394")  # BIP 32 private version of test networks (regtest)


def pub(secret: bytes) -> bytes:
    return coincurve.PrivateKey(secret).public_key.format(compressed=True)


def bitcoin_key(path: Path) -> bytes:
    secret = generate_bitcoin_key()
    create_key_file(path, secret)
    return secret


@dataclass
class Participant:
    name: str
    directory: Path
    noise: NoiseIdentity
    stakeholder_secret: bytes | None = None
    manager_secret: bytes | None = None
    cpfp_secret: bytes | None = None
    config_path: Path | None = None
    wallet_table: dict = field(default_factory=dict)

    def wallet(self, **options) -> Wallet:
        return Wallet.open(self.config_path, **options)


@dataclass
class System:
    root: Path
    node: RegtestNode
    sync_noise: NoiseIdentity
    sync: DaemonProcess
    deployment: dict
    stakeholders: list[Participant]
    managers: list[Participant]
    cosigners: list[DaemonProcess] = field(default_factory=list)
    cosigner_noise: list[NoiseIdentity] = field(default_factory=list)
    watchtowers: list[DaemonProcess] = field(default_factory=list)
    payee: str = ""  # an address the demo pays, outside the deployment

    def daemons(self) -> list[DaemonProcess]:
        return [self.sync, *self.cosigners, *self.watchtowers]

    def stop_all(self) -> None:
        for daemon in self.daemons():
            daemon.ensure_dead()


def _bitcoind_table(node: RegtestNode) -> dict:
    return {"rpc_url": f"http://{HOST}:{node.rpc_port}", "rpc_user": node.rpc_user,
            "rpc_password": node.rpc_password}


async def start_system(root: Path, node: RegtestNode, *, n_stakeholders: int = 3,
                       n_managers: int = 2, unvault_csv: int = 3, both_roles: int = 0,
                       policies: list[dict] | None = None, xpubs: bool = False) -> System:
    """Keys, configs and daemons for a deployment; `both_roles` of the stakeholders
    are also managers (one wallet with both keys). `policies[i]` is the `[policy]` of
    stakeholder i's watchtower (`revault-watchtower`, with a funded fee reserve). With
    no policies, no watchtower runs: each stakeholder's [[watchtowers]] entry is a
    port where nothing listens, so a flow that needs a watchtower's ack cannot complete.
    With `xpubs`, the stakeholders', managers' and CPFP key files are BIP 32 seeds and
    the deployment lists their master tpubs (the cosigners keep plain keys)."""

    def key_text(secret: bytes) -> str:
        if xpubs:
            return HDKey.from_seed(secret, version=TPRV).to_public().to_string()
        return pub(secret).hex()

    root.mkdir(parents=True, exist_ok=True)
    sync_noise = NoiseIdentity.create(root / "sync.noise.key")
    stakeholders = []
    for i in range(n_stakeholders):
        d = root / f"stakeholder{i}"
        d.mkdir()
        p = Participant(f"stakeholder{i}", d, NoiseIdentity.create(d / "noise.key"),
                        stakeholder_secret=bitcoin_key(d / "stakeholder.key"))
        if i < both_roles:
            p.manager_secret = bitcoin_key(d / "manager.key")
            p.cpfp_secret = bitcoin_key(d / "cpfp.key")
        stakeholders.append(p)
    managers = [p for p in stakeholders if p.manager_secret is not None]
    for j in range(n_managers - len(managers)):
        d = root / f"manager{j}"
        d.mkdir()
        managers.append(Participant(f"manager{j}", d, NoiseIdentity.create(d / "noise.key"),
                                    manager_secret=bitcoin_key(d / "manager.key"),
                                    cpfp_secret=bitcoin_key(d / "cpfp.key")))

    # Per manager a cosigner.
    cosigners, cosigner_noise, cosigner_pubs = [], [], []
    for j in range(len(managers)):
        d = root / f"cosigner{j}"
        d.mkdir()
        noise = NoiseIdentity.create(d / "noise.key")
        cosigner_pubs.append(pub(bitcoin_key(d / "bitcoin.key")).hex())
        config = write_config(d / "cosigner.toml", {
            "listen": f"{HOST}:0", "data_dir": "data", "noise_key_file": "noise.key",
            "bitcoin_key_file": "bitcoin.key",
            "managers": [m.noise.public.hex() for m in managers],
            "requests_per_second": 1000,
        })
        cosigners.append(DaemonProcess("cosigner", config, d))
        cosigner_noise.append(noise)

    towers = []  # (directory, noise identity, opinion secret) per stakeholder
    for i, p in enumerate(stakeholders if policies is not None else []):
        d = root / f"watchtower{i}"
        d.mkdir()
        towers.append((d, NoiseIdentity.create(d / "noise.key"),
                       bitcoin_key(d / "opinion.key")))

    emergency = script_pubkey_to_address(p2wpkh(pub(hashlib.sha256(
        b"emergency " + root.name.encode()).digest())), "regtest")
    deployment = {
        "network": "regtest",
        "stakeholders": [key_text(p.stakeholder_secret) for p in stakeholders],
        "managers": [key_text(p.manager_secret) for p in managers],
        "managers_threshold": 1,
        "cosigners": cosigner_pubs,
        "unvault_csv": unvault_csv,
        "cpfp_keys": [key_text(p.cpfp_secret) for p in managers],
        "emergency_address": emergency,
        "watchtowers": [pub(opinion).hex() for _, _, opinion in towers],
    }

    # A fixed port: the wallets' configs name it, and it survives a restart.
    sync_config = write_config(root / "sync.toml", {
        "listen": f"{HOST}:{free_port()}", "data_dir": "sync-data", "noise_key_file": "sync.noise.key",
        "requests_per_second": 10_000,
        "peers": {
            "stakeholders": [p.noise.public.hex() for p in stakeholders],
            "managers": [p.noise.public.hex() for p in managers],
            "watchtowers": [noise.public.hex() for _, noise, _ in towers],
        },
    })
    system = System(root, node, sync_noise, DaemonProcess("sync-server", sync_config, root),
                    deployment, stakeholders, managers, cosigners, cosigner_noise)
    try:
        await system.sync.start()
        for cosigner in cosigners:
            await cosigner.start()
        for i, (d, _, _) in enumerate(towers):
            system.watchtowers.append(await _start_watchtower(system, d, stakeholders[i],
                                                              policies[i]))
        nowhere = [NoiseIdentity.create(p.directory / "absent-watchtower.key")
                   for p in stakeholders] if not towers else []
        for p in {id(p): p for p in stakeholders + managers}.values():
            table = {
                "data_dir": "wallet-data",
                "noise_key_file": "noise.key",
                "sync_server": {"host": HOST, "port": system.sync.port,
                                "noise_key": sync_noise.public.hex()},
                "bitcoind": _bitcoind_table(node),
                "deployment": deployment,
            }
            if p.stakeholder_secret is None:
                # docs/protocol.md: a manager who is not a stakeholder never learns it.
                table["deployment"] = {k: v for k, v in deployment.items()
                                       if k != "emergency_address"}
            if p.stakeholder_secret is not None:
                table["stakeholder_key_file"] = "stakeholder.key"
                i = stakeholders.index(p)
                if towers:
                    table["watchtowers"] = [{"host": HOST, "port": system.watchtowers[i].port,
                                             "noise_key": towers[i][1].public.hex()}]
                else:
                    table["watchtowers"] = [{"host": HOST, "port": free_port(),
                                             "noise_key": nowhere[i].public.hex()}]
            if p.manager_secret is not None:
                table["manager_key_file"] = "manager.key"
                table["cpfp_key_file"] = "cpfp.key"
                table["cosigners"] = [{"host": HOST, "port": c.port,
                                       "noise_key": n.public.hex()}
                                      for c, n in zip(cosigners, cosigner_noise)]
            p.wallet_table = table
            p.config_path = write_wallet_config(p.directory / "wallet.toml", table)
    except BaseException:
        system.stop_all()
        raise
    return system


async def _start_watchtower(system: System, d: Path, stakeholder: Participant,
                            policy: dict) -> DaemonProcess:
    """`revault-watchtower` in `d` (holding noise.key and opinion.key), paired with
    `stakeholder`'s wallet, with a fee reserve of its own funded with 1 BTC."""
    reserve = f"reserve-{secrets.token_hex(4)}"  # one node, many systems
    system.node.new_wallet(reserve, fund=Decimal(1))
    config = write_config(d / "watchtower.toml", {
        "listen": f"{HOST}:0", "data_dir": "data", "noise_key_file": "noise.key",
        "opinion_key_file": "opinion.key",
        "wallet_noise_key": stakeholder.noise.public.hex(),
        "poll_interval": 0.1,
        "sync_server": {"host": HOST, "port": system.sync.port,
                        "noise_key": system.sync_noise.public.hex()},
        "bitcoind": dict(_bitcoind_table(system.node), wallet=reserve),
        "fees": {"max_feerate": 50},
        "policy": policy,
        "deployment": system.deployment,
    })
    tower = DaemonProcess("watchtower", config, d)
    try:
        await tower.start()
    except BaseException:
        tower.ensure_dead()
        raise
    return tower


async def add_watchtower(system: System, stakeholder: Participant,
                         policy: dict) -> DaemonProcess:
    """A further watchtower for `stakeholder`, added to its wallet config's
    [[watchtowers]] (a wallet opened afterwards talks to it too)."""
    d = system.root / f"wt{len(system.watchtowers)}"  # short: an AF_UNIX path lives here
    d.mkdir()
    noise = NoiseIdentity.create(d / "noise.key")
    bitcoin_key(d / "opinion.key")
    tower = await _start_watchtower(system, d, stakeholder, policy)
    system.watchtowers.append(tower)
    stakeholder.wallet_table["watchtowers"].append(
        {"host": HOST, "port": tower.port, "noise_key": noise.public.hex()})
    write_wallet_config(stakeholder.config_path, stakeholder.wallet_table)
    return tower


def write_wallet_config_text(table: dict) -> str:
    """TOML with arrays of tables ([[watchtowers]], [[cosigners]]), which
    tests.support.daemons.to_toml does not write."""
    arrays = {k: table[k] for k in ("watchtowers", "cosigners") if k in table}
    text = to_toml({k: v for k, v in table.items() if k not in arrays})
    for key, entries in arrays.items():
        for entry in entries:
            text += f"\n[[{key}]]\n" + to_toml(entry)
    return text


def write_wallet_config(path: Path, table: dict) -> Path:
    path.write_text(write_wallet_config_text(table))
    return path
