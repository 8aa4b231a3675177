"""`revault-cosigner`: signs one input of a manager's spend, once per outpoint, ever.

A cosigning server is run by each non-manager participant; its key is in the manager
branch of every unvault script, so managers cannot spend without it. It signs whatever
a manager asks (policy is the watchtowers' business) but only once per outpoint: the
first request for an outpoint gets a fresh signature, every later one gets that same
signature back, whatever transaction it carries. That is what stops a compromised
manager set from double-spending a vault: a second, conflicting spend of the same
unvault output cannot be completed.

Only the managers' Noise keys are known peers, so anyone else is dropped at the
handshake. The signing rules are in `cosigner_signing` (pure), the once-per-outpoint
guarantee in `cosigner_store` (durable, serialized); this module wires them to the
daemon scaffolding and logs every outpoint signed.

Config (TOML; see contrib/cosigner.sample.toml):

    listen = "127.0.0.1:8383"
    data_dir = "/var/lib/revault-cosigner"
    noise_key_file = "noise.key"
    bitcoin_key_file = "bitcoin.key"
    managers = ["<64 hex>", ...]
    # optional: requests_per_second (per manager key, default 10), idle_timeout,
    # max_connections, max_handshakes, max_handshakes_per_address,
    # max_connections_per_peer, write_timeout, log_level

The store grows by one row per outpoint signed and never shrinks (see cosigner_store).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from revault.config import ConfigTable, ProblemCollector
from revault.cosigner_signing import CosignerKey, PsbtRefused
from revault.cosigner_store import DATABASE_NAME, SignatureStore
from revault.daemon import CommonConfig, run_daemon
from revault.errors import Refused
from revault.keys import KeyFileError, read_key_file
from revault.log_limit import LimitedLog
from revault.messages import COSIGNER_METHODS, MANAGER, SignParams, SignResult
from revault.rpc import Caller, Dispatcher
from revault.transport import key_prefix

log = logging.getLogger("revault.cosigner")
_refusal_notices = LimitedLog(log)

NAME = "cosigner"
DEFAULT_REQUESTS_PER_SECOND = 10.0


@dataclass(frozen=True)
class CosignerConfig:
    common: CommonConfig
    bitcoin_key_file: Path
    managers: tuple[bytes, ...]


def read_config(table: ConfigTable, base: Path) -> CosignerConfig:
    """Read and check every key; ConfigError lists each bad one (files are not touched)."""
    p = ProblemCollector()
    common = p.read(CommonConfig.read, table, base,
                    requests_per_second=DEFAULT_REQUESTS_PER_SECOND)
    bitcoin_key_file = p.read(table.path, "bitcoin_key_file", base)
    managers = p.read(table.noise_keys, "managers")
    if managers == []:
        p.add("managers: must list at least one manager's Noise public key")
    p.finish()
    return CosignerConfig(common=common, bitcoin_key_file=bitcoin_key_file,
                          managers=tuple(managers))


class CosignerService:
    """The daemon's Service: the `sign` method for managers, backed by the store."""

    def __init__(self, config: CosignerConfig, key: CosignerKey, store: SignatureStore):
        self._key = key
        self._store = store
        self._managers = frozenset(config.managers)
        self.known_peers: list[bytes] = list(config.managers)
        self.dispatcher = Dispatcher()
        self.dispatcher.serve_table(COSIGNER_METHODS, {"sign": self.sign})

    def roles_of(self, peer_public: bytes) -> frozenset[str]:
        return frozenset({MANAGER}) if peer_public in self._managers else frozenset()

    async def sign(self, caller: Caller, params: SignParams) -> SignResult:
        manager = key_prefix(caller.public_key)
        try:
            request = self._key.prepare(params.tx, params.index)
        except PsbtRefused as e:
            # The dispatcher answers it (-32602); this line says which manager sent it,
            # a few times a minute per manager at most.
            _refusal_notices.log(logging.INFO, caller.public_key,
                                 "sign refused for manager %s: %s", manager, e)
            raise
        # A store that is closing raises StoreClosed, answered -32002 by the dispatcher.
        outcome = await self._store.sign_once(request, caller.public_key)
        stored = outcome.stored
        if outcome.new:
            log.info("signed outpoint %s: new signature for manager %s (spend %s)",
                     request.outpoint, manager, request.spend_txid)
        elif stored.spend_txid == request.spend_txid:
            log.info("signed outpoint %s: replayed stored signature to manager %s "
                     "(same spend %s)", request.outpoint, manager, request.spend_txid)
        else:
            # A different transaction for an outpoint already signed: either a manager
            # rebuilt its spend, or someone is attempting a conflicting one. The stored
            # signature is useless for it (docs/protocol.md: refused, naming the spend signed);
            # operators want to see this.
            log.warning("sign refused for outpoint %s: manager %s asked for spend %s; it was "
                        "signed for spend %s (manager %s)",
                        request.outpoint, manager, request.spend_txid, stored.spend_txid,
                        key_prefix(stored.manager))
            raise Refused(f"outpoint {request.outpoint} already signed for spend {stored.spend_txid}")
        return SignResult(signature=stored.signature.hex())

    async def close(self) -> None:
        await self._store.close()


async def make_service(config: CosignerConfig, noise_private: bytes) -> CosignerService:
    try:
        key = CosignerKey(read_key_file(config.bitcoin_key_file))
    except KeyFileError as e:
        raise KeyFileError(f"bitcoin_key_file: {e}") from None
    except ValueError:  # 0 or >= the curve order: coincurve refuses it
        raise KeyFileError(
            f"bitcoin_key_file: {config.bitcoin_key_file}: not a valid secp256k1 secret key") from None
    store = await SignatureStore.open(config.common.data_dir / DATABASE_NAME, key.sign)
    log.info("cosigner bitcoin public key %s, %d manager(s), %s requests/s per manager key",
             key.public_key.hex(), len(config.managers), f"{config.common.requests_per_second:g}")
    return CosignerService(config, key, store)


def main(argv: list[str] | None = None) -> int:
    return run_daemon(NAME, argv, read_config, make_service)


if __name__ == "__main__":
    sys.exit(main())
