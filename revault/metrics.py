"""Prometheus metrics: every name the daemons export, and the listener that serves them.

Off unless a daemon's config sets `metrics_listen = "HOST:PORT"`; then a plain-HTTP
listener answers `GET /metrics` in the Prometheus text format. The metrics are counts,
durations, sizes and heights only: never a key, a signature, a txid, a vault id or a
peer's identity, so a scrape is safe to send to a monitoring system. Label values come
from fixed sets (method names the dispatcher registered, error names, table and quota
names, verdicts); nothing a peer sends can add a label value, so no peer can grow the
registry.

Recording is always on (a few hundred nanoseconds per event, children cached), so that
turning the listener on needs no restart of the counting and costs nothing more.

Who sets what:

- `COMMON`, every daemon: the transport (handshakes, rejected connections), the RPC
  dispatcher (requests by method and outcome, their durations, rate limiting), storage
  (commit latency, writes per commit) and daemon.py (open connections, daemon info).
- One metric set per daemon, created by that daemon when it starts (`sync_server()`,
  `cosigner()`, `watchtower()`), so that a process only exports its own.

docs/metrics.md lists every metric with its meaning; a test checks that it, the alerting
rules and the Grafana dashboard only name metrics defined here.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Awaitable, Callable, Iterable, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
    disable_created_metrics, generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from revault.log_limit import LimitedLog

log = logging.getLogger("revault.metrics")

# Collectors whose values may be read asynchronously (see _CallbackCollector).
_async_collectors: weakref.WeakSet[_CallbackCollector] = weakref.WeakSet()
# A database down fails every scrape: a few lines per minute say so.
_refresh_failures = LimitedLog(log)

# `*_created` series double every counter's size for information Prometheus does not use.
disable_created_metrics()

REGISTRY = CollectorRegistry()
# process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
# process_max_fds, ...: what an operator checks first when a daemon misbehaves.
ProcessCollector(registry=REGISTRY)

# Request and commit durations: from a cached read (0.1 ms) to an fsync on a slow disk.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)
# Group commit sizes, up to the stores' batch bound (256).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class CommonMetrics:
    """What every daemon exports; recorded by the shared layer."""

    def __init__(self, registry: CollectorRegistry):
        self.daemon_info = Gauge(
            "revault_daemon_info", "Always 1; labels name the daemon and its version.",
            ["daemon", "version"], registry=registry)
        self.connections_open = Gauge(
            "revault_connections_open",
            "Connections open now on the Noise listener, handshakes in progress included.",
            registry=registry)
        self.handshakes = Counter(
            "revault_handshakes",
            "Noise handshakes on the listener by how they ended: ok (the first frame "
            "decrypted: the peer holds its key); failed (no configured key decrypts act "
            "one, or a wrong payload); refused (no connection slot for that peer); "
            "timeout (no first frame in time); abandoned (the peer closed first, e.g. a "
            "liveness probe); evicted (closed to make room, see connections_evicted).",
            ["outcome"], registry=registry)
        self.connections_rejected = Counter(
            "revault_connections_rejected",
            "Connections refused by a limit: max_connections (closed at once), or at act "
            "one max_connections_per_peer, peer_slots (no slot left for a peer that "
            "already holds one), unknown_peer.",
            ["limit"], registry=registry)
        self.connections_evicted = Counter(
            "revault_connections_evicted",
            "Connections still in their handshake closed to make room for a newer one: "
            "max_handshakes_per_address, max_handshakes, newer_handshake (the same peer's).",
            ["limit"], registry=registry)
        self.requests = Counter(
            "revault_requests",
            "JSON-RPC requests answered, by method and outcome (ok, or the error's name: "
            "parse_error, invalid_request, method_not_found, invalid_params, forbidden, "
            "refused, internal_error). Unregistered method names count as \"unknown\", "
            "frames that are no request as \"invalid\".",
            ["method", "outcome"], registry=registry)
        self.request_duration = Histogram(
            "revault_request_duration_seconds",
            "Time from a request's frame to its encoded response, by method.",
            ["method"], buckets=DURATION_BUCKETS, registry=registry)
        self.rate_limited = Counter(
            "revault_rate_limited_requests",
            "Requests that arrived faster than their peer's requests_per_second (one "
            "budget per key), held until the peer's turn: never refused for it.",
            registry=registry)
        self.rate_limit_wait = Counter(
            "revault_rate_limit_wait_seconds",
            "Time requests were held for their peer's pace, added up.", registry=registry)
        self.db_commit_duration = Histogram(
            "revault_db_commit_duration_seconds",
            "Duration of each durable database COMMIT (its fsync included).",
            buckets=DURATION_BUCKETS, registry=registry)
        self.db_writes_per_commit = Histogram(
            "revault_db_writes_per_commit",
            "Logical writes made durable by one COMMIT (group commit).",
            buckets=BATCH_BUCKETS, registry=registry)
        for outcome in ("ok", "failed", "refused", "timeout", "abandoned", "evicted"):
            self.handshakes.labels(outcome)
        for limit in ("max_connections", "max_connections_per_peer", "peer_slots"):
            self.connections_rejected.labels(limit)
        for limit in ("max_handshakes_per_address", "max_handshakes", "newer_handshake"):
            self.connections_evicted.labels(limit)
        # (method, outcome) -> (counter child, histogram child): a label lookup takes a
        # lock and hashes the labels; the cache is bounded by the fixed label sets.
        self._request_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def request_done(self, method: str, outcome: str, seconds: float) -> None:
        children = self._request_children.get((method, outcome))
        if children is None:
            children = (self.requests.labels(method, outcome),
                        self.request_duration.labels(method))
            self._request_children[(method, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    def rate_limit_paced(self, seconds: float) -> None:
        self.rate_limited.inc()
        self.rate_limit_wait.inc(seconds)

    def commit_done(self, seconds: float, writes: int) -> None:
        self.db_commit_duration.observe(seconds)
        self.db_writes_per_commit.observe(writes)


Values = dict[str, dict[tuple[str, ...], float]]
"""Metric name -> {label values: value}."""


class _CallbackCollector:
    """Gauges computed at scrape time from whatever `source` currently returns.

    `source()` returns `Values`; it is read on the thread serving the scrape (the event
    loop's, see MetricsListener). A source that must wait for its values (a query to a
    database server) is set as `read` instead: the listener awaits `refresh()` of every
    such collector before it answers (`refresh_async_sources`), and the scrape shows
    what that read returned. Replacing either (a store re-opened in the same process)
    needs no re-registration.
    """

    def __init__(self, names: Iterable[tuple[str, str, tuple[str, ...]]]):
        self._names = list(names)
        self.source: Callable[[], Values] | None = None
        self.read: Callable[[], Awaitable[Values]] | None = None
        self._read_values: Values = {}
        _async_collectors.add(self)

    async def refresh(self) -> None:
        if self.read is None:
            self._read_values = {}
            return
        try:
            self._read_values = await self.read()
        except Exception as e:
            # No value rather than a stale one: the series are absent from this scrape
            # (what absent() alerts see), and the log says why.
            self._read_values = {}
            _refresh_failures.log(logging.WARNING, id(self), "metrics: cannot read %s: %s",
                                  ", ".join(n for n, _, _ in self._names), e)

    def describe(self):
        for name, documentation, labels in self._names:
            yield GaugeMetricFamily(name, documentation, labels=list(labels))

    def collect(self):
        values = self.source() if self.source is not None else self._read_values
        for name, documentation, labels in self._names:
            family = GaugeMetricFamily(name, documentation, labels=list(labels))
            for label_values, value in values.get(name, {}).items():
                family.add_metric(list(label_values), value)
            yield family


class _QuotaSource(Protocol):
    async def row_counts(self) -> dict[str, int]: ...

    async def quota_use(self) -> dict[str, tuple[int, int]]: ...

    def memory_bytes(self) -> int: ...


class SyncServerMetrics:
    """Exported by the sync server: its tables, their quotas, the purge."""

    def __init__(self, registry: CollectorRegistry):
        self.tables = _CallbackCollector([
            ("revault_sync_rows", "Rows stored per table, expired ones not yet purged "
             "included.", ("table",)),
            ("revault_sync_quota_used_rows", "Rows counted against each quota: the "
             "table's rows for total_* quotas, the busiest peer's rows for per-peer "
             "quotas.", ("quota",)),
            ("revault_sync_quota_limit_rows", "Each quota's configured bound.",
             ("quota",)),
            ("revault_sync_memory_bytes", "Bytes of rows (spend requests, opinions, "
             "signatures) the SQLite backend holds in memory to answer polls (an "
             "estimate); those past their budget are read from the database and not "
             "counted; 0 on PostgreSQL.", ()),
        ])
        registry.register(self.tables)
        self.purged_rows = Counter(
            "revault_sync_purged_rows",
            "Expired rows deleted by the periodic purge, by table.",
            ["table"], registry=registry)
        self.quota_refusals = Counter(
            "revault_sync_quota_refusals",
            "Writes refused because a quota was reached, by quota (config key name).",
            ["quota"], registry=registry)

    def watch(self, store: _QuotaSource | None) -> None:
        """Read the table gauges from `store` at each scrape (None: stop reading); the
        store's reads are awaited (a PostgreSQL store asks its server)."""
        if store is None:
            self.tables.read = None
            return

        async def values() -> Values:
            use = await store.quota_use()
            return {
                "revault_sync_rows": {(t,): n for t, n in (await store.row_counts()).items()},
                "revault_sync_quota_used_rows": {(q,): u for q, (u, _) in use.items()},
                "revault_sync_quota_limit_rows": {(q,): b for q, (_, b) in use.items()},
                "revault_sync_memory_bytes": {(): store.memory_bytes()},
            }

        self.tables.read = values


class CosignerMetrics:
    """Exported by the cosigner: what it signed and what it answered from storage."""

    def __init__(self, registry: CollectorRegistry):
        self.signatures = Counter(
            "revault_cosigner_signatures",
            "New signatures made (one per outpoint, ever).", registry=registry)
        self.replays = Counter(
            "revault_cosigner_replays",
            "Requests for an outpoint already signed for the same spend, answered with "
            "the stored signature.", registry=registry)
        self.conflicting_requests = Counter(
            "revault_cosigner_conflicting_requests",
            "Requests for an outpoint already signed for a different spend, refused: a "
            "manager rebuilt its spend, or someone attempts a conflicting one.",
            registry=registry)


class _WatchtowerSource(Protocol):
    def metric_values(self) -> dict[str, dict[tuple[str, ...], float]]: ...


class WatchtowerMetrics:
    """Exported by the watchtower. Its state (vaults, heights, bitcoind, the last poll,
    pending cancels) is read from the running watchtower at each scrape (`watch`), so
    it costs nothing between scrapes; events are counted as they happen; the reserve
    gauges are set where the reserve is evaluated (each new block).

    Heights and timestamps are exported as they are; lags and ages are computed by the
    queries (`revault_watchtower_bitcoind_height - revault_watchtower_processed_height`,
    `time() - revault_watchtower_sync_poll_last_success_timestamp_seconds`), the
    Prometheus way, so they stay right when the daemon itself is stuck.
    """

    def __init__(self, registry: CollectorRegistry):
        self.state = _CallbackCollector([
            ("revault_watchtower_vaults", "Vaults guarded now, by state (retired vaults "
             "are not counted).", ("state",)),
            ("revault_watchtower_processed_height", "Height of the last block the "
             "watchtower has fully processed.", ()),
            ("revault_watchtower_bitcoind_height", "Height of bitcoind's chain tip, as "
             "last seen.", ()),
            ("revault_watchtower_bitcoind_up", "1 if the last call to bitcoind succeeded, "
             "else 0 (nothing is protected while bitcoind is unreachable).", ()),
            ("revault_watchtower_sync_poll_last_success_timestamp_seconds", "Unix time of "
             "the last successful get_spend_requests poll of the sync server.", ()),
            ("revault_watchtower_oldest_pending_cancel_blocks", "Blocks mined since the "
             "oldest still unconfirmed cancel was first broadcast; 0 when none is "
             "pending.", ()),
        ])
        registry.register(self.state)
        self.opinions = Counter(
            "revault_watchtower_opinions",
            "Spend opinions given, by verdict (accept, refuse).",
            ["verdict"], registry=registry)
        self.cancels_broadcast = Counter(
            "revault_watchtower_cancels_broadcast",
            "Cancel transactions broadcast (re-bumps of the same cancel included).",
            registry=registry)
        self.cancels_confirmed = Counter(
            "revault_watchtower_cancels_confirmed",
            "Cancel transactions seen confirmed.", registry=registry)
        self.reserve_coins = Gauge(
            "revault_watchtower_reserve_coins",
            "Confirmed coins in the fee reserve wallet.", registry=registry)
        self.reserve_value = Gauge(
            "revault_watchtower_reserve_value_satoshis",
            "Value of the fee reserve's confirmed coins.", registry=registry)
        self.reserve_cancellable_vaults = Gauge(
            "revault_watchtower_reserve_cancellable_vaults",
            "How many guarded vaults the reserve can cancel at once at max_feerate.",
            registry=registry)
        for verdict in ("accept", "refuse"):
            self.opinions.labels(verdict)

    def watch(self, watchtower: _WatchtowerSource | None) -> None:
        """Read the state gauges from `watchtower.metric_values()` at each scrape."""
        self.state.source = None if watchtower is None else watchtower.metric_values


COMMON = CommonMetrics(REGISTRY)

MetricSet = TypeVar("MetricSet", SyncServerMetrics, CosignerMetrics, WatchtowerMetrics)
_daemon_sets: dict[type, object] = {}


def _daemon_set(kind: type[MetricSet]) -> MetricSet:
    """The process's one instance of a daemon's metric set, registered on first use."""
    metric_set = _daemon_sets.get(kind)
    if metric_set is None:
        metric_set = _daemon_sets[kind] = kind(REGISTRY)
    return metric_set


def sync_server() -> SyncServerMetrics:
    return _daemon_set(SyncServerMetrics)


def cosigner() -> CosignerMetrics:
    return _daemon_set(CosignerMetrics)


def watchtower() -> WatchtowerMetrics:
    return _daemon_set(WatchtowerMetrics)


def every_metric(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """A registry holding every metric any daemon exports (for docs and checks)."""
    registry = registry if registry is not None else CollectorRegistry()
    ProcessCollector(registry=registry)
    CommonMetrics(registry)
    for kind in (SyncServerMetrics, CosignerMetrics, WatchtowerMetrics):
        kind(registry)
    return registry


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape of `registry` can show (`_total`, `_bucket`, ...)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix for family in registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


async def refresh_async_sources() -> None:
    """Await every gauge source that reads from elsewhere, before a scrape."""
    await asyncio.gather(*(collector.refresh() for collector in _async_collectors
                           if collector.read is not None))


def scrape() -> bytes:
    return generate_latest(REGISTRY)


# --- the HTTP listener ----------------------------------------------------------------

MAX_REQUEST_HEAD = 8192     # bytes of request line and headers
REQUEST_TIMEOUT = 10.0      # seconds to receive them and send the answer
MAX_SCRAPERS = 16           # connections served at once; more are closed at once


class MetricsListener:
    """A minimal HTTP/1.x server: `GET /metrics` (and HEAD); anything else 404/405/400.

    It runs on the daemon's event loop, so a scrape reads the metrics without locks
    or threads, and every connection is bounded in size, time and number.
    """

    def __init__(self):
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port,
                                                  limit=MAX_REQUEST_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= MAX_SCRAPERS:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                await refresh_async_sources()
                writer.write(_response(head))
                await writer.drain()
            writer.close()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            # Too slow, too big or gone: drop it without waiting for it to read.
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


def _response(head: bytes) -> bytes:
    """The whole HTTP response to a request whose head (request line, headers) is `head`."""
    parts = head.split(b"\r\n", 1)[0].split()
    content_type = "text/plain; charset=utf-8"
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        status, body = "400 Bad Request", b"bad request\n"
    elif parts[0] not in (b"GET", b"HEAD"):
        status, body = "405 Method Not Allowed", b"only GET and HEAD\n"
    elif parts[1].split(b"?", 1)[0] != b"/metrics":
        status, body = "404 Not Found", b"metrics are at /metrics\n"
    else:
        status, body, content_type = "200 OK", scrape(), CONTENT_TYPE_PLAIN_0_0_4
    head_out = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
    return head_out if parts[:1] == [b"HEAD"] else head_out + body


async def start_listener(host: str, port: int) -> MetricsListener:
    listener = MetricsListener()
    await listener.start(host, port)
    return listener

