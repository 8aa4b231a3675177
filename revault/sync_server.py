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
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Iterable

from bitcoin.core import CTransaction, b2lx

from revault.config import ConfigTable, ProblemCollector
from revault.daemon import CommonConfig, run_daemon
from revault.errors import InvalidParams
from revault.log_limit import LimitedLog
from revault.messages import (
    MANAGER, MAX_OPINIONS, STAKEHOLDER, SYNC_SERVER_METHODS, WATCHTOWER, AckResult,
    ErrSigParams, GetSigsParams, GetSigsResult, GetSpendOpinionsParams,
    GetSpendOpinionsResult, GetSpendRequestsParams, GetSpendRequestsResult, RelayedOpinion,
    RequestSpendParams, SigParams, SpendOpinionParams, SpendRequest, verify_opinion,
)
from revault.rpc import Caller, Dispatcher
from revault.sync_store import (
    DATABASE_NAME, QuotaExceeded, Quotas, Retention, SqliteSyncStore, SyncStore,
)
from revault.transport import MAX_PLAINTEXT

log = logging.getLogger("revault.sync_server")

DEFAULT_REQUESTS_PER_SECOND = 50.0
DEFAULT_PURGE_INTERVAL = 600.0

# The response envelope around a list, and the caller's echoed `id`, must fit in the
# frame too. Ids are ours to bound only here: a client using a string id longer than
# this gets "response too large" from the dispatcher instead of a truncated list.
ENVELOPE_RESERVE = 4096
RESPONSE_BUDGET = MAX_PLAINTEXT - ENVELOPE_RESERVE
# No serialized spend request is smaller than this (a 1-in 1-out transaction in base64
# plus the vault id), so fetching more rows than budget/this could never be relayed.
MIN_REQUEST_JSON = 200

# One response must carry every signature of an id (about 220 bytes each).
MAX_SIGNATURES_PER_ID = 250


@dataclass(frozen=True)
class SyncServerConfig:
    common: CommonConfig
    stakeholders: list[bytes]
    managers: list[bytes]
    watchtowers: list[bytes]
    purge_interval: float
    retention: Retention
    quotas: Quotas


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
        retention=retention, quotas=quotas)


def _json_size(obj: dict) -> int:
    # The same serialization rpc uses for responses, so the budget is exact.
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def fit_in_budget(sizes: Iterable[int], budget: int = RESPONSE_BUDGET) -> int:
    """How many items, of these JSON sizes in order, fit in one JSON array of `budget` bytes."""
    used = 2  # the brackets
    count = 0
    for size in sizes:
        used += size + (1 if count else 0)
        if used > budget:
            break
        count += 1
    return count


def spend_txid(transaction_b64: str) -> str:
    """Display-order txid of an already validated base64 transaction."""
    return b2lx(CTransaction.deserialize(base64.b64decode(transaction_b64)).GetTxid())


# A peer can hit its quota as often as its pace allows: a few lines a minute, then a count.
_quota_notices = LimitedLog(log)


def _log_quota(e: QuotaExceeded, caller: Caller) -> None:
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
        self._opinion_fetch = config.quotas.opinions_per_vault
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
            rows = await store.get_spend_requests(RESPONSE_BUDGET // MIN_REQUEST_JSON)
            requests = [SpendRequest(transaction=r.transaction, timestamp=r.timestamp,
                                     vault_id=r.vault_id) for r in rows]
            kept = fit_in_budget(r.json_size() for r in requests)
            if kept < len(requests):
                # Newest first, so what is left out is the oldest, soonest to expire.
                log.info("get_spend_requests for %s: %d of %d pending requests fit in one "
                         "response", caller.describe(), kept, len(requests))
            return GetSpendRequestsResult(requests=requests[:kept])

        async def spend_opinion(caller: Caller, p: SpendOpinionParams) -> AckResult:
            if not verify_opinion(p):
                raise InvalidParams("sig", "not a valid signature of this opinion by pubkey")
            return await _acknowledge(
                store.put_opinion(p.vault_id, p.txid, p.pubkey, p.accept, p.reason, p.sig,
                                  caller.public_key), caller)

        async def get_spend_opinions(caller: Caller,
                                     p: GetSpendOpinionsParams) -> GetSpendOpinionsResult:
            rows = await store.get_opinions(p.vault_id, self._opinion_fetch)
            opinions = [RelayedOpinion(accepted=o.accepted, reason=o.reason, sig=o.sig,
                                       pubkey=o.pubkey, txid=o.txid) for o in rows]
            # `reason` is free text that JSON may escape: these are measured by encoding.
            kept = fit_in_budget((_json_size(o.to_json()) for o in opinions),
                                 RESPONSE_BUDGET - len(p.vault_id) - 16)
            if kept < len(opinions):
                log.info("get_spend_opinions for %s: %d of %d opinions on vault %s fit in "
                         "one response", caller.describe(), kept, len(opinions),
                         p.vault_id)
            return GetSpendOpinionsResult(vault_id=p.vault_id, opinions=opinions[:kept])

        self.dispatcher.serve_table(SYNC_SERVER_METHODS, {
            "sig": sig, "get_sigs": get_sigs, "err_sig": err_sig,
            "request_spend": request_spend, "get_spend_requests": get_spend_requests,
            "spend_opinion": spend_opinion, "get_spend_opinions": get_spend_opinions,
        })


async def make_service(config: SyncServerConfig, noise_private: bytes) -> SyncServer:
    store = await SqliteSyncStore.open(config.common.data_dir / DATABASE_NAME,
                                       config.retention, config.quotas)
    server = SyncServer(config, store)
    server.start()
    log.info("peers: %d stakeholders, %d managers, %d watchtowers",
             len(config.stakeholders), len(config.managers), len(config.watchtowers))
    return server


def main(argv: list[str] | None = None) -> int:
    return run_daemon("sync-server", argv, read_config, make_service)


if __name__ == "__main__":
    sys.exit(main())
