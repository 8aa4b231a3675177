"""Prometheus metrics: the listener, and real daemons scraped over HTTP after real traffic."""

from __future__ import annotations

import asyncio

import pytest

from revault import metrics, transport
from revault.rpc import RpcClient, RpcError
from revault.sync_mirror import ROW_BYTES
from revault.sync_store import Quotas, Retention, SqliteSyncStore
from revault.sync_store_postgresql import PostgresSyncStore
from tests.support.cosigner_psbt import make_spend
from tests.support.scrape import http_get, scrape, scrape_until
from tests.test_cosigner import setup_cosigner, sign
from tests.test_sync_server import (
    HOST, der, h, pubkey, spend_tx, started,
)

# --- the listener, in process --------------------------------------------------------


@pytest.fixture
async def listener():
    served = await metrics.start_listener("127.0.0.1", 0)
    try:
        yield served
    finally:
        await served.close()


async def test_listener_answers_get_and_head_of_metrics_only(listener):
    ok = await http_get(listener.port)
    assert ok.status == 200
    assert ok.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(ok.headers["Content-Length"]) == len(ok.text.encode())
    assert ok.value("revault_rate_limited_requests_total") is not None
    assert ok.value("process_open_fds") > 0
    head = await http_get(listener.port, method="HEAD")
    assert head.status == 200 and head.text == "" and int(head.headers["Content-Length"]) > 0
    assert (await http_get(listener.port, "/")).status == 404
    assert (await http_get(listener.port, "/metrics/../x")).status == 404
    assert (await http_get(listener.port, method="POST")).status == 405
    assert (await http_get(listener.port, raw=b"hello there\r\n\r\n")).status == 400
    assert (await http_get(listener.port, "/metrics?name[]=x")).status == 200


class _StoreReads:
    """A sync store's two scrape-time reads, answering or failing on demand."""

    def __init__(self):
        self.fail = False

    async def row_counts(self) -> dict[str, int]:
        if self.fail:
            raise ConnectionError("database server unreachable")
        return {"signatures": 7, "spend_requests": 0, "opinions": 0}

    async def quota_use(self) -> dict[str, tuple[int, int]]:
        return {"total_signatures": (7, 1_000_000)}

    def memory_bytes(self) -> int:
        return 4096


async def test_store_gauges_are_read_at_each_scrape_and_absent_when_unreadable(listener):
    store = _StoreReads()
    metrics.sync_server().watch(store)
    try:
        ok = await http_get(listener.port)
        assert ok.value("revault_sync_rows", table="signatures") == 7
        assert ok.value("revault_sync_quota_limit_rows", quota="total_signatures") == 1_000_000
        assert ok.value("revault_sync_memory_bytes") == 4096
        store.fail = True
        # No stale value: the series are gone from the scrape, and the log says why.
        failed = await http_get(listener.port)
        assert failed.status == 200
        assert failed.total("revault_sync_rows") == 0
        assert failed.value("revault_sync_quota_used_rows", quota="total_signatures") is None
        store.fail = False
        assert (await http_get(listener.port)).value("revault_sync_rows",
                                                     table="signatures") == 7
    finally:
        metrics.sync_server().watch(None)


async def _answer(port: int, data: bytes) -> bytes:
    """What the listener sends back to `data` before it closes (b"" for nothing)."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""
        finally:
            writer.close()


async def test_listener_drops_oversized_slow_and_surplus_scrapers(listener, monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.3)
    oversized = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * metrics.MAX_REQUEST_HEAD + b"\r\n\r\n"
    assert await _answer(listener.port, oversized) == b""
    # A head that never ends is dropped after REQUEST_TIMEOUT (the 10 s bound is _answer's).
    assert await _answer(listener.port, b"GET /metrics HTTP/1.1\r\n") == b""

    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 30)
    idle = [await asyncio.open_connection("127.0.0.1", listener.port)
            for _ in range(metrics.MAX_SCRAPERS)]
    try:
        await asyncio.sleep(0)  # polled below with a bound; this only lets them register
        for _ in range(200):
            if len(listener._handlers) == metrics.MAX_SCRAPERS:
                break
            await asyncio.sleep(0.01)
        assert len(listener._handlers) == metrics.MAX_SCRAPERS
        assert await _answer(listener.port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
    finally:
        for _, writer in idle:
            writer.close()
    for _ in range(200):
        if not listener._handlers:
            break
        await asyncio.sleep(0.01)
    assert (await http_get(listener.port)).status == 200


def test_every_metric_is_named_the_prometheus_way():
    registry = metrics.every_metric()
    for family in registry.collect():
        if family.name.startswith("process_"):
            continue
        assert family.name.startswith("revault_"), family.name
        assert family.documentation, family.name
        assert not family.name.endswith("_total"), family.name  # the client adds it
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_per_commit")), family.name


@pytest.mark.parametrize("backend_name", ["sqlite", "postgresql"])
async def test_purged_rows_are_counted_per_table(tmp_path, request, backend_name):
    now = [1_000_000.0]
    if backend_name == "postgresql":
        store = await PostgresSyncStore.open(request.getfixturevalue("postgres").new_database(),
                                             Retention(signatures=60), Quotas(), lambda: now[0])
    else:
        store = await SqliteSyncStore.open(tmp_path / "sync.sqlite3", Retention(signatures=60),
                                           Quotas(), lambda: now[0])

    def purged() -> float:
        return metrics.REGISTRY.get_sample_value("revault_sync_purged_rows_total",
                                                 {"table": "signatures"}) or 0.0

    try:
        before = purged()
        for i in range(3):
            await store.put_signature(h(f"id{i}"), pubkey(1), der(1), b"k" * 32)
        now[0] += 61
        assert await store.purge_expired() == 3
        assert purged() - before == 3
    finally:
        await store.close()


# --- real daemons ---------------------------------------------------------------------


def assert_no_secret(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret.lower() not in text.lower(), f"{secret[:12]}... leaked into the scrape"


async def test_sync_server_metrics_count_what_happened_and_expose_no_key(daemon_dir, sync_backend):
    sync = await started(daemon_dir, sync_backend[1](), metrics_listen=f"{HOST}:0",
                         # Three stakeholders: a share of 2 each (sync_rules.Sharers).
                         quotas={"signatures_per_id": 6})
    port = sync.daemon.metrics_port
    assert port
    peers = sync.peers
    tx_uid = h("tx")
    signatures = [der(n) for n in (1, 2, 3)]
    spend, txid = spend_tx("spend")
    try:
        async with await sync.client(peers.stakeholder) as rpc:
            for n in (1, 2):
                await rpc.call("sig", {"id": tx_uid, "pubkey": pubkey(n),
                                       "signature": signatures[n - 1]})
            with pytest.raises(RpcError):  # signatures_per_id's share = 2
                await rpc.call("sig", {"id": tx_uid, "pubkey": pubkey(3),
                                       "signature": signatures[2]})
            assert len((await rpc.call("get_sigs", {"id": tx_uid}))["signatures"]) == 2
            with pytest.raises(RpcError):  # a stakeholder is no watchtower
                await rpc.call("get_spend_requests", {})
            with pytest.raises(RpcError):
                await rpc.call("sig", {"id": "not hex", "pubkey": pubkey(1),
                                       "signature": signatures[0]})
            with pytest.raises(RpcError):  # a name nobody registered is one label value
                await rpc.call("x" * 200 + pubkey(9), {})
            await rpc.call("err_sig", {"id": h("other")})
            open_now = await scrape(port)
            assert open_now.value("revault_connections_open") == 1
        async with await sync.client(peers.manager) as rpc:
            await rpc.call("request_spend", {"transaction": spend, "timestamp": 1_700_000_000,
                                             "vault_id": h("vault")})
        # Frames that are no request.
        conn = await transport.connect(HOST, sync.daemon.port, peers.everything.private,
                                       peers.server.public)
        await conn.send(b"{not json")
        await conn.recv(timeout=10)
        await conn.close()
        # Someone the server does not know, and a bare TCP probe.
        with pytest.raises((transport.TransportError, OSError, asyncio.TimeoutError)):
            await RpcClient.connect(HOST, sync.daemon.port, peers.stranger.private,
                                    peers.server.public, timeout=5)
        _, writer = await asyncio.open_connection(HOST, sync.daemon.port)
        writer.close()

        s = await scrape_until(port, lambda s: (
            s.value("revault_handshakes_total", outcome="failed") == 1
            and s.value("revault_handshakes_total", outcome="abandoned") == 1
            and s.value("revault_connections_open") == 0))
        requests = {(method, outcome): s.value("revault_requests_total", method=method,
                                               outcome=outcome)
                    for method, outcome in [("sig", "ok"), ("sig", "refused"),
                                            ("sig", "invalid_params"), ("get_sigs", "ok"),
                                            ("get_spend_requests", "forbidden"),
                                            ("unknown", "method_not_found"),
                                            ("err_sig", "ok"), ("request_spend", "ok"),
                                            ("invalid", "parse_error")]}
        assert requests == {
            ("sig", "ok"): 2, ("sig", "refused"): 1, ("sig", "invalid_params"): 1,
            ("get_sigs", "ok"): 1, ("get_spend_requests", "forbidden"): 1,
            ("unknown", "method_not_found"): 1, ("err_sig", "ok"): 1,
            ("request_spend", "ok"): 1, ("invalid", "parse_error"): 1}
        assert s.total("revault_requests_total") == 10
        assert s.value("revault_request_duration_seconds_count", method="sig") == 4
        assert s.value("revault_handshakes_total", outcome="ok") == 3
        assert s.value("revault_sync_quota_refusals_total", quota="signatures_per_id") == 1
        assert s.value("revault_sync_rows", table="signatures") == 2
        assert s.value("revault_sync_rows", table="spend_requests") == 1
        # On SQLite the one spend request is held in memory too, to answer polls.
        if sync_backend[0] == "sqlite":
            assert s.value("revault_sync_memory_bytes") > ROW_BYTES
        else:
            assert s.value("revault_sync_memory_bytes") == 0
        assert s.value("revault_sync_quota_used_rows", quota="total_signatures") == 2
        assert s.value("revault_sync_quota_used_rows", quota="signatures_per_peer") == 2
        assert s.value("revault_sync_quota_limit_rows", quota="signatures_per_peer") == 20_000
        # The three writes (two sig, one request_spend; err_sig of nothing too) committed.
        assert s.total("revault_db_writes_per_commit_sum") >= 3
        assert s.value("revault_db_commit_duration_seconds_count") >= 1
        assert s.value("revault_daemon_info", daemon="sync-server", version="0.1.0") == 1
        method_labels = {labels for (name, labels) in s.samples()
                         if name == "revault_requests_total"}
        assert all(len(dict(labels)["method"]) < 30 for labels in method_labels)
        identities = [peers.server, peers.stakeholder, peers.stakeman, peers.manager,
                      peers.watchtower, peers.everything, peers.stranger]
        assert_no_secret(s.text, [i.private.hex() for i in identities]
                         + [i.public.hex() for i in identities]
                         + [i.public[:4].hex() for i in identities]
                         + signatures + [pubkey(n) for n in (1, 2, 3, 9)]
                         + [tx_uid, txid, spend, h("vault")])
        assert await sync.daemon.stop() == 0
    finally:
        sync.daemon.ensure_dead()


async def test_requests_over_the_rate_are_paced_and_counted(daemon_dir):
    sync = await started(daemon_dir, {}, metrics_listen=f"{HOST}:0", requests_per_second=5)
    try:
        async with await sync.client(sync.peers.stakeholder) as rpc:
            # A burst of 5 passes at once; the next 5 wait for their turn (0.2 s each).
            for _ in range(10):
                await rpc.call("get_sigs", {"id": h("x")})
        s = await scrape(sync.daemon.metrics_port)
        assert 4 <= s.value("revault_rate_limited_requests_total") <= 5
        assert 0.6 <= s.value("revault_rate_limit_wait_seconds_total") <= 1.5
        assert s.value("revault_requests_total", method="get_sigs", outcome="ok") == 10
        assert s.total("revault_requests_total", outcome="refused") == 0
    finally:
        sync.daemon.ensure_dead()


async def test_metrics_are_off_unless_configured(daemon_dir):
    sync = await started(daemon_dir, {})
    try:
        assert sync.daemon.metrics_port == 0
        assert "metrics on" not in sync.daemon.stderr()
    finally:
        sync.daemon.ensure_dead()


async def test_cosigner_counts_signatures_replays_and_conflicts(daemon_dir):
    cosigner = setup_cosigner(daemon_dir, metrics_listen="127.0.0.1:0")
    await cosigner.daemon.start()
    try:
        port = cosigner.daemon.metrics_port
        before = await scrape(port)
        assert before.value("revault_cosigner_signatures_total") == 0
        first = make_spend(cosigner.bitcoin_pub)
        txid, vout = first.inputs[0].txid, first.inputs[0].vout
        conflicting = make_spend(cosigner.bitcoin_pub, txid=txid, vout=vout)
        async with await cosigner.client(0) as rpc:
            signature = await sign(rpc, first.psbt())
            assert await sign(rpc, first.psbt()) == signature
            with pytest.raises(RpcError):  # already signed for `first`
                await sign(rpc, conflicting.psbt())
            with pytest.raises(RpcError):
                await rpc.call("sign", {"tx": "bm90IGEgcHNidA==", "index": 0})
        s = await scrape(port)
        assert s.value("revault_cosigner_signatures_total") == 1
        assert s.value("revault_cosigner_replays_total") == 1
        assert s.value("revault_cosigner_conflicting_requests_total") == 1
        assert s.value("revault_requests_total", method="sign", outcome="ok") == 2
        assert s.value("revault_requests_total", method="sign", outcome="refused") == 1
        assert s.value("revault_requests_total", method="sign", outcome="invalid_params") == 1
        assert s.value("revault_db_commit_duration_seconds_count") >= 1
        assert s.value("revault_daemon_info", daemon="cosigner", version="0.1.0") == 1
        assert_no_secret(s.text, cosigner.secrets() + [signature.hex(), txid.hex(),
                                                       cosigner.bitcoin_pub.hex()]
                         + [m.public.hex() for m in cosigner.managers])
        assert await cosigner.daemon.stop() == 0
    finally:
        cosigner.daemon.ensure_dead()
