"""revault-sync-server: the untrusted relay between wallets and watchtowers.

Stakeholders exchange revocation signatures through it (`sig`, `get_sigs`, `err_sig`),
managers announce spend attempts (`request_spend`) that watchtowers poll
(`get_spend_requests`) and judge (`spend_opinion`), and managers collect the signed
opinions (`get_spend_opinions`). It verifies nothing it cannot: wallets check every
signature they get; the one exception is an opinion's own signature, checked against
the opinion's `pubkey` so that the relay never stores a forgery.

Usage: `revault-sync-server --config /etc/revault/sync-server.toml`
(see contrib/sync-server.sample.toml for every key).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable

from bitcoin.core import CTransaction, b2lx

from revault import metrics
from revault.config import ConfigTable, ProblemCollector
from revault.daemon import CommonConfig, run_daemon
from revault.errors import InvalidParams
from revault.keys import read_secret_file
from revault.log_limit import LimitedLog
from revault.messages import (
    MANAGER, MAX_OPINIONS, SPEND_OPINIONS_PAGE_BUDGET, SPEND_REQUESTS_PAGE_BUDGET, STAKEHOLDER,
    SYNC_SERVER_METHODS, WATCHTOWER, AckResult, ErrSigParams, GetSigsParams, GetSigsResult,
    GetSpendOpinionsParams, GetSpendOpinionsResult, GetSpendRequestsParams,
    GetSpendRequestsResult, RelayedOpinion, RequestSpendParams, SigParams, SpendOpinionParams,
    SpendRequest, spend_request_json_size, verify_opinion,
)
from revault.paging import Cursor, CursorError, Stream, fill_page, merge_streams
from revault.rpc import Caller, Dispatcher
from revault.sync_rules import TABLES, Rules
from revault.sync_store import (
    DATABASE_NAME, QuotaExceeded, Quotas, Retention, Sharers, SqliteSyncStore,
    StoredOpinion, StoredSpendRequest, SyncStore, run_plan,
)

log = logging.getLogger("revault.sync_server")

DEFAULT_REQUESTS_PER_SECOND = 50.0
DEFAULT_PURGE_INTERVAL = 600.0

# No serialized spend request is smaller than this (a 1-in 1-out transaction in base64
# plus the vault id), so fetching more of one manager's rows than this could never be
# relayed in one page.
MIN_REQUEST_JSON = 200
REQUESTS_FETCH_PER_MANAGER = SPEND_REQUESTS_PAGE_BUDGET // MIN_REQUEST_JSON

# One response must carry every signature of an id (about 220 bytes each).
MAX_SIGNATURES_PER_ID = 250


BACKENDS = ("sqlite", "postgresql")
# A password file holds one line; anything longer is not one.
MAX_PASSWORD_BYTES = 1024


@dataclass(frozen=True)
class StorageConfig:
    """[storage]: where the rows live. SQLite in data_dir (one process), or PostgreSQL
    (any number of server processes on one database)."""

    backend: str = "sqlite"
    dsn: str | None = None              # postgresql: from `dsn`, or built from its parts
    password_file: Path | None = None   # postgresql: the password, kept out of the config
    pool_size: int = 8                  # postgresql: connections per server process


@dataclass(frozen=True)
class SyncServerConfig:
    common: CommonConfig
    stakeholders: list[bytes]
    managers: list[bytes]
    watchtowers: list[bytes]
    purge_interval: float
    retention: Retention
    quotas: Quotas
    storage: StorageConfig = StorageConfig()

    def sharers(self) -> Sharers:
        """Each peer's share of a group quota is the quota over its role's peers."""
        return Sharers(stakeholders=len(self.stakeholders), managers=len(self.managers),
                       watchtowers=len(self.watchtowers))


def _read_storage(table: ConfigTable, base: Path) -> StorageConfig:
    p = ProblemCollector()
    backend = p.read(table.string, "backend", "sqlite")
    if backend is not None and backend not in BACKENDS:
        p.add(f"{table.key_name('backend')}: must be one of {', '.join(BACKENDS)}, "
              f"got {backend!r}")
    postgres_keys = ("dsn", "host", "port", "user", "database", "password_file", "pool_size")
    if backend != "postgresql":
        for key in postgres_keys:
            if key in table:
                table.raw(key)
                p.add(f"{table.key_name(key)}: only with backend = \"postgresql\"")
        p.finish()
        return StorageConfig(backend=backend or "sqlite")
    dsn = p.read(table.string, "dsn", None)
    parts = {key: p.read(table.string, key, None) for key in ("host", "user", "database")}
    port = p.read(table.integer, "port", minimum=1, maximum=65535, default=None)
    password_file = p.read(table.path, "password_file", base, None)
    pool_size = p.read(table.integer, "pool_size", minimum=1, maximum=100, default=8)
    given = [key for key, value in parts.items() if value is not None] + (
        ["port"] if port is not None else [])
    if dsn is not None and given:
        p.add(f"{table.key_name('dsn')}: give either dsn or {', '.join(given)}, not both")
    elif dsn is not None and not dsn.startswith(("postgresql://", "postgres://")):
        p.add(f"{table.key_name('dsn')}: expected a postgresql:// URL")
    elif dsn is None:
        missing = [key for key in ("host", "user", "database") if parts[key] is None]
        if missing:
            p.add(f"{table.key_name('dsn')}: missing (or give {', '.join(missing)})")
        else:
            dsn = (f"postgresql://{parts['user']}@{parts['host']}:{port or 5432}"
                   f"/{parts['database']}")
    p.finish()
    return StorageConfig(backend=backend, dsn=dsn, password_file=password_file,
                         pool_size=pool_size)


def read_config(table: ConfigTable, base: Path) -> SyncServerConfig:
    """Every key of the sync server's config; unknown ones are reported by run_daemon."""
    p = ProblemCollector()
    common = p.read(CommonConfig.read, table, base,
                    requests_per_second=DEFAULT_REQUESTS_PER_SECOND)
    peers = p.read(table.table, "peers")
    stakeholders = managers = watchtowers = None
    if peers is not None:
        stakeholders = p.read(peers.noise_keys, "stakeholders")
        managers = p.read(peers.noise_keys, "managers")
        watchtowers = p.read(peers.noise_keys, "watchtowers")
    purge_interval = p.read(table.number, "purge_interval", minimum=1, maximum=86_400,
                            default=DEFAULT_PURGE_INTERVAL)
    storage_table = p.read(table.table, "storage", {})
    storage = (None if storage_table is None
               else p.read(_read_storage, storage_table, base))

    retention = quotas = None
    expiry = p.read(table.table, "expiry", {})
    if expiry is not None:
        d = Retention()
        longest = 3650 * 86_400
        values = {key: p.read(expiry.integer, key, minimum=60, maximum=longest,
                              default=getattr(d, key))
                  for key in ("signatures", "spend_requests", "spend_opinions")}
        retention = Retention(**values)
    limits = p.read(table.table, "quotas", {})
    if limits is not None:
        d = Quotas()
        maxima = {"signatures_per_id": MAX_SIGNATURES_PER_ID,
                  # GetSpendOpinionsResult refuses more than this on the client side.
                  "opinions_per_vault": MAX_OPINIONS}
        values = {key: p.read(limits.integer, key, minimum=1,
                              maximum=maxima.get(key, 1_000_000_000), default=getattr(d, key))
                  for key in Quotas.__dataclass_fields__}
        quotas = Quotas(**values)
    p.finish()
    return SyncServerConfig(
        common=common, stakeholders=stakeholders, managers=managers, watchtowers=watchtowers,
        purge_interval=purge_interval,
        retention=retention, quotas=quotas, storage=storage)


def _cursor(since: str | None, epoch: str) -> Cursor:
    try:
        return Cursor.parse(since, epoch)
    except CursorError as e:
        raise InvalidParams("since", str(e)) from None


def spend_txid(transaction_b64: str) -> str:
    """Display-order txid of an already validated base64 transaction."""
    raw = base64.b64decode(transaction_b64)
    if raw[4] != 0:
        # No witness: where a witness serialization has its marker (0), these bytes
        # have the input count, never 0 in a valid transaction. The txid is the double
        # SHA-256 of these very bytes; deserializing again would cost ten times more.
        return hashlib.sha256(hashlib.sha256(raw).digest()).digest()[::-1].hex()
    return b2lx(CTransaction.deserialize(raw).GetTxid())


# A peer can hit its quota as often as its pace allows: a few lines a minute, then a count.
_quota_notices = LimitedLog(log)


def _log_quota(e: QuotaExceeded, caller: Caller) -> None:
    metrics.sync_server().quota_refusals.labels(e.quota).inc()
    # The dispatcher logs every refusal too; this line leads with the quota, and a full
    # table is raised to a warning because it refuses every peer, not one.
    if e.quota.startswith("total_"):
        _quota_notices.log(logging.WARNING, e.quota, "%s: refusing new rows until some "
                           "expire or the quota is raised (%s)", e, caller.describe())
    else:
        _quota_notices.log(logging.INFO, caller.public_key, "%s for %s", e,
                           caller.describe())


async def _acknowledge(write: Awaitable[object], caller: Caller) -> AckResult:
    """{"ack":true} once the store's durable write returned. A quota refusal goes on to
    the dispatcher as it is (QuotaExceeded is an errors.Refused, -32002), logged here."""
    try:
        await write
    except QuotaExceeded as e:
        _log_quota(e, caller)
        raise
    return AckResult()


class SyncServer:
    """The `Service` run by run_daemon: roles, handlers, and the periodic purge."""

    def __init__(self, config: SyncServerConfig, store: SyncStore):
        self.store = store
        self._purge_interval = config.purge_interval
        roles: dict[bytes, set[str]] = {}
        for role, keys in ((STAKEHOLDER, config.stakeholders), (MANAGER, config.managers),
                           (WATCHTOWER, config.watchtowers)):
            for key in keys:
                roles.setdefault(key, set()).add(role)
        self._roles = {key: frozenset(r) for key, r in roles.items()}
        self.known_peers = list(self._roles)
        self.dispatcher = Dispatcher()
        self._register()
        self._purge_task: asyncio.Task | None = None

    def roles_of(self, peer_public: bytes) -> frozenset[str]:
        return self._roles.get(peer_public, frozenset())

    def start(self) -> None:
        self._purge_task = asyncio.get_running_loop().create_task(self._purge_loop())

    async def _purge_loop(self) -> None:
        while True:
            try:
                purged = await self.store.purge_expired()
                if purged:
                    log.info("purged %d expired rows", purged)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A purge that fails (disk full, say) must not stop the service; reads
                # still filter expired rows and the next round tries again.
                log.exception("purging expired rows failed")
            await asyncio.sleep(self._purge_interval)

    async def close(self) -> None:
        metrics.sync_server().watch(None)
        if self._purge_task is not None:
            self._purge_task.cancel()
            await asyncio.gather(self._purge_task, return_exceptions=True)
        await self.store.close()

    def _register(self) -> None:
        store = self.store

        async def sig(caller: Caller, p: SigParams) -> AckResult:
            return await _acknowledge(
                store.put_signature(p.id, p.pubkey, p.signature, caller.public_key), caller)

        async def get_sigs(caller: Caller, p: GetSigsParams) -> GetSigsResult:
            return GetSigsResult(signatures=await store.get_signatures(p.id))

        async def err_sig(caller: Caller, p: ErrSigParams) -> AckResult:
            erased = await store.erase_signatures(p.id)
            # Who asked matters when signatures keep vanishing: one stakeholder could be
            # stalling everyone's signing round.
            log.info("err_sig for id %s from %s: erased %d signatures", p.id,
                     caller.describe(), erased)
            return AckResult()

        async def request_spend(caller: Caller, p: RequestSpendParams) -> AckResult:
            return await _acknowledge(
                store.put_spend_request(p.vault_id, spend_txid(p.transaction), p.transaction,
                                        p.timestamp, caller.public_key), caller)

        async def get_spend_requests(caller: Caller,
                                     p: GetSpendRequestsParams) -> GetSpendRequestsResult:
            cursor = _cursor(p.since, store.epoch)
            streams = merge_streams(
                await store.spend_request_streams(cursor, REQUESTS_FETCH_PER_MANAGER))
            page = fill_page(cursor, streams, _request_json_size, SPEND_REQUESTS_PAGE_BUDGET)
            if page.left:
                log.debug("get_spend_requests for %s: %d requests listed, more pending",
                          caller.describe(), len(page.items))
            # Positional arguments: a frozen dataclass takes keywords at twice the cost,
            # and a page builds hundreds of these.
            return GetSpendRequestsResult(
                [SpendRequest(r.transaction, r.timestamp, r.vault_id) for r in page.items],
                str(page.cursor))

        async def spend_opinion(caller: Caller, p: SpendOpinionParams) -> AckResult:
            if not verify_opinion(p):
                raise InvalidParams("sig", "not a valid signature of this opinion by pubkey")
            return await _acknowledge(
                store.put_opinion(p.vault_id, p.txid, p.pubkey, p.accept, p.reason, p.sig,
                                  caller.public_key), caller)

        async def get_spend_opinions(caller: Caller,
                                     p: GetSpendOpinionsParams) -> GetSpendOpinionsResult:
            cursor = _cursor(p.since, store.epoch)
            streams = [
                Stream(s.name, [(seq, _relayed(o)) for seq, o in s.items], s.more)
                for s in merge_streams(await store.opinion_streams(p.vault_id, cursor))]
            page = fill_page(cursor, streams, RelayedOpinion.json_size,
                             SPEND_OPINIONS_PAGE_BUDGET)
            if page.left:
                log.debug("get_spend_opinions for %s on vault %s: %d opinions listed, more "
                          "pending", caller.describe(), p.vault_id, len(page.items))
            return GetSpendOpinionsResult(vault_id=p.vault_id, opinions=page.items,
                                          cursor=str(page.cursor))


        self.dispatcher.serve_table(SYNC_SERVER_METHODS, {
            "sig": sig, "get_sigs": get_sigs, "err_sig": err_sig,
            "request_spend": request_spend, "get_spend_requests": get_spend_requests,
            "spend_opinion": spend_opinion, "get_spend_opinions": get_spend_opinions,
        })


def _request_json_size(r: StoredSpendRequest) -> int:
    return spend_request_json_size(r.transaction, r.timestamp, r.vault_id)


def _relayed(o: StoredOpinion) -> RelayedOpinion:
    return RelayedOpinion(accepted=o.accepted, reason=o.reason, sig=o.sig, pubkey=o.pubkey,
                          txid=o.txid)


def _postgresql_password(storage: StorageConfig) -> str | None:
    if storage.password_file is None:
        return None
    return read_secret_file(storage.password_file, MAX_PASSWORD_BYTES,
                            "password file").decode("utf-8").strip("\r\n")


async def open_store(config: SyncServerConfig) -> SyncStore:
    """The configured backend's store, migrated and ready."""
    storage = config.storage
    if storage.backend == "postgresql":
        # Imported here: a SQLite deployment never loads the PostgreSQL driver.
        from revault.sync_store_postgresql import PostgresSyncStore
        return await PostgresSyncStore.open(
            storage.dsn, config.retention, config.quotas, sharers=config.sharers(),
            password=_postgresql_password(storage), pool_size=storage.pool_size)
    return await SqliteSyncStore.open(config.common.data_dir / DATABASE_NAME,
                                      config.retention, config.quotas,
                                      sharers=config.sharers())


async def make_service(config: SyncServerConfig, noise_private: bytes) -> SyncServer:
    store = await open_store(config)
    server = SyncServer(config, store)
    server.start()
    exported = metrics.sync_server()
    exported.watch(store)
    # Every series from the start, at 0: rate() and increase() need a first sample.
    for table in TABLES:
        exported.purged_rows.labels(table)
    for quota in Quotas.__dataclass_fields__:
        exported.quota_refusals.labels(quota)
    log.info("peers: %d stakeholders, %d managers, %d watchtowers; storage: %s",
             len(config.stakeholders), len(config.managers), len(config.watchtowers),
             config.storage.backend)
    return server


def _database_file(config: SyncServerConfig) -> str | None:
    """The database's file in data_dir; None when it lives on a PostgreSQL server."""
    return None if config.storage.backend == "postgresql" else DATABASE_NAME


async def read_status(config: SyncServerConfig, db: sqlite3.Connection | None) -> dict:
    """`revault-sync-server --config FILE status`: rows per table and quota use, from
    the SQLite file (`db`) or, on PostgreSQL, through a read-only connection of its own."""
    rules = Rules(now=int(time.time()), quotas=config.quotas, retention=config.retention,
                  sharers=config.sharers())
    if db is not None:
        summary = run_plan(db, rules.status())
    else:
        from revault.sync_store_postgresql import read_status as read_postgresql_status
        summary = await read_postgresql_status(config.storage.dsn,
                                               _postgresql_password(config.storage), rules)
        if "tables" not in summary:
            return summary  # never started on that database: where it is, nothing more
    summary["peers"] = {"stakeholders": len(config.stakeholders),
                        "managers": len(config.managers),
                        "watchtowers": len(config.watchtowers)}
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_daemon("sync-server", argv, read_config, make_service,
                      database_name=_database_file, status=read_status)


if __name__ == "__main__":
    sys.exit(main())
