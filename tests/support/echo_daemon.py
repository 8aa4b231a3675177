"""The smallest daemon built on revault.daemon: one `echo` method for role "client".

It exists to test the shared scaffolding (config errors, data_dir, READY=1, signals)
apart from any real daemon, and serves as the trivial-handler ceiling in benchmarks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from revault.config import ConfigTable
from revault.daemon import CommonConfig, run_daemon
from revault.rpc import Dispatcher


@dataclass(frozen=True)
class EchoConfig:
    common: CommonConfig
    clients: list[bytes]


@dataclass(frozen=True)
class EchoParams:
    value: object

    @classmethod
    def parse(cls, obj) -> "EchoParams":
        return cls(obj)


class EchoService:
    def __init__(self, config: EchoConfig):
        self.known_peers = list(config.clients)
        self.dispatcher = Dispatcher()

        @self.dispatcher.method("echo", params=EchoParams, roles=["client"])
        async def echo(caller, params: EchoParams):
            return {"echo": params.value}

    def roles_of(self, peer_public: bytes) -> frozenset[str]:
        return frozenset({"client"}) if peer_public in self.known_peers else frozenset()

    async def close(self) -> None:
        pass


def read_config(table: ConfigTable, base: Path) -> EchoConfig:
    return EchoConfig(common=CommonConfig.read(table, base), clients=table.noise_keys("clients"))


async def make_service(config: EchoConfig, noise_private: bytes) -> EchoService:
    return EchoService(config)


async def clients(config: EchoConfig) -> int:
    """`--config FILE clients`: a one-shot command, run instead of the daemon."""
    for key in config.clients:
        print(key.hex())
    return 0


def main(argv=None) -> int:
    return run_daemon("echo", argv, read_config, make_service, commands={"clients": clients})


if __name__ == "__main__":
    sys.exit(main())
