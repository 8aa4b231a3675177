"""A `revault-cosigner` daemon with generated keys and config, for tests and benchmarks."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from revault.cosigner_store import DATABASE_NAME
from revault.keys import bitcoin_public_key, create_key_file, generate_bitcoin_key
from revault.rpc import RpcClient
from tests.support.daemons import DaemonProcess, NoiseIdentity, write_config


@dataclass
class Cosigner:
    daemon: DaemonProcess
    noise: NoiseIdentity
    managers: list[NoiseIdentity]
    bitcoin_secret: bytes
    workdir: Path

    @property
    def bitcoin_pub(self) -> bytes:
        return bitcoin_public_key(self.bitcoin_secret)

    @property
    def database(self) -> Path:
        return self.workdir / "data" / DATABASE_NAME

    async def client(self, manager: int = 0, timeout: float = 10.0) -> RpcClient:
        return await RpcClient.connect("127.0.0.1", self.daemon.port,
                                       self.managers[manager].private, self.noise.public,
                                       timeout=timeout)

    def rows(self) -> list[tuple]:
        with sqlite3.connect(self.database) as db:
            return db.execute("SELECT txid, vout, signature FROM signatures").fetchall()

    def secrets(self) -> list[str]:
        return [self.bitcoin_secret.hex(), self.noise.private.hex(),
                *(m.private.hex() for m in self.managers)]


def setup_cosigner(tmp: Path, n_managers: int = 2, **extra) -> Cosigner:
    """Keys and config in `tmp` (not started); `extra` adds or overrides config keys."""
    noise = NoiseIdentity.create(tmp / "noise.key")
    managers = [NoiseIdentity.create(tmp / f"manager{i}.key") for i in range(n_managers)]
    secret = generate_bitcoin_key()
    create_key_file(tmp / "bitcoin.key", secret)
    config = {
        "listen": "127.0.0.1:0",
        "data_dir": "data",
        "noise_key_file": "noise.key",
        "bitcoin_key_file": "bitcoin.key",
        "managers": [m.public.hex() for m in managers],
        "log_level": "debug",
        "requests_per_second": 10_000,
        **extra,
    }
    path = write_config(tmp / "cosigner.toml", config)
    return Cosigner(DaemonProcess("cosigner", path, tmp), noise, managers, secret, tmp)
