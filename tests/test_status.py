"""`revault-<name> --config FILE status [--json]`: real daemons, real databases, real CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from revault.rpc import RpcError
from tests.support.cosigner_psbt import make_spend
from tests.support.daemons import REPO_ROOT, write_config
from tests.test_cosigner import setup_cosigner, sign
from revault import sync_store, sync_store_postgresql
from tests.test_sync_server import (
    HOST, der, h, make_peers, pubkey, spend_tx, started, sync_config,
)


def status(module: str, config, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, "--config", str(config), "status",
                           *extra], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def status_json(module: str, config) -> dict:
    result = status(module, config, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def test_sync_server_status_reads_its_database_live_and_stopped(daemon_dir, sync_backend):
    port = free_port()
    sync = await started(daemon_dir, sync_backend[1](), listen=f"{HOST}:{port}",
                         # Three managers: a share of 2 each (sync_rules.Sharers).
                         quotas={"spend_requests_per_vault": 8})
    config = sync.daemon.config_path
    try:
        async with await sync.client(sync.peers.stakeholder) as rpc:
            for n in (1, 2, 3):
                await rpc.call("sig", {"id": h("a"), "pubkey": pubkey(n), "signature": der(n)})
            await rpc.call("sig", {"id": h("b"), "pubkey": pubkey(1), "signature": der(1)})
        async with await sync.client(sync.peers.manager) as rpc:
            for seed in ("s1", "s2"):
                await rpc.call("request_spend", {"transaction": spend_tx(seed)[0],
                                                 "timestamp": 1_700_000_000,
                                                 "vault_id": h("vault")})
        report = status_json("revault.sync_server", config)
        assert report["daemon"] == "sync-server"
        assert report["listen"] == f"{HOST}:{port}"
        assert report["accepting_connections"] is True
        migrations = {"sqlite": sync_store.MIGRATIONS,
                      "postgresql": sync_store_postgresql.MIGRATIONS}[sync_backend[0]]
        assert report["database"]["schema_version"] == len(migrations)
        if sync_backend[0] == "postgresql":  # where, without the password
            assert report["database"]["backend"] == "postgresql"
            assert report["database"]["dsn"].startswith("postgresql://")
        summary = report["sync_server"]
        assert summary["tables"]["signatures"]["live"] == 4
        assert summary["tables"]["signatures"]["expired_not_purged"] == 0
        assert summary["tables"]["spend_requests"]["live"] == 2
        assert summary["tables"]["opinions"]["live"] == 0
        assert summary["tables"]["opinions"]["oldest_live_age_seconds"] is None
        quotas = summary["quotas"]
        assert quotas["total_signatures"] == {"used": 4, "limit": 1_000_000, "percent": 0.0}
        assert quotas["signatures_per_id"]["used"] == 3
        assert quotas["signatures_per_peer"]["used"] == 4
        assert quotas["spend_requests_per_vault"] == {"used": 2, "limit": 8, "percent": 25.0}
        assert summary["peers"] == {"stakeholders": 3, "managers": 3, "watchtowers": 2}

        text = status("revault.sync_server", config)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert "accepting connections: yes" in lines
        assert "    spend requests per vault: used=2, limit=8, percent=25.0" in lines
        assert "  peers: stakeholders=3, managers=3, watchtowers=2" in lines
        secret_hexes = [i.private.hex() for i in (sync.peers.server, sync.peers.stakeholder)]
        assert not any(s in text.stdout + text.stderr for s in secret_hexes)

        assert await sync.daemon.stop() == 0
        stopped = status_json("revault.sync_server", config)
        assert stopped["accepting_connections"] is False
        assert stopped["sync_server"]["tables"]["signatures"]["live"] == 4
    finally:
        sync.daemon.ensure_dead()


def test_postgresql_status_before_the_first_start_creates_nothing(tmp_path, postgres):
    peers = make_peers(tmp_path)
    dsn = postgres.new_database()
    config = write_config(tmp_path / "sync.toml", sync_config(
        peers, storage={"backend": "postgresql", "dsn": dsn}))
    report = status_json("revault.sync_server", config)
    assert report["database"]["schema_version"] is None
    assert "sync_server" not in report
    assert postgres.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                         dsn.rsplit("/", 1)[1]).strip() == "0"


def failed_status(tmp_path, exit_status: int, **config) -> str:
    """`status` with a sync server config holding `config`, which must fail with
    `exit_status` and a message, no traceback; the message."""
    written = write_config(tmp_path / "sync.toml", sync_config(make_peers(tmp_path), **config))
    result = status("revault.sync_server", written)
    assert result.returncode == exit_status
    assert "Traceback" not in result.stderr
    return result.stderr


def test_postgresql_status_of_an_unreachable_server_fails_with_the_cause(tmp_path):
    from tests.support.postgres import _free_port
    assert "cannot connect" in failed_status(tmp_path, 1, storage={
        "backend": "postgresql", "dsn": f"postgresql://revault@127.0.0.1:{_free_port()}/x"})


def test_status_before_the_first_start_creates_nothing(tmp_path):
    peers = make_peers(tmp_path)
    config = write_config(tmp_path / "sync.toml", sync_config(peers))
    report = status_json("revault.sync_server", config)
    assert report["database"] is None and report["accepting_connections"] is None
    assert "sync_server" not in report
    assert not (tmp_path / "data").exists()
    text = status("revault.sync_server", config)
    assert "database: -" in text.stdout.splitlines()


def test_status_refuses_a_bad_config_like_the_daemon(tmp_path):
    assert "log_levl: unknown key" in failed_status(tmp_path, 2, log_levl="info")


def test_status_of_an_unreadable_database_fails_with_the_cause(tmp_path):
    (tmp_path / "data").mkdir(mode=0o700)
    (tmp_path / "data" / "sync-server.sqlite3").write_bytes(b"not a database" * 100)
    assert "cannot read the database" in failed_status(tmp_path, 1)


async def test_cosigner_status_counts_outpoints_per_manager(daemon_dir):
    cosigner = setup_cosigner(daemon_dir)
    await cosigner.daemon.start()
    try:
        async with await cosigner.client(0) as first, await cosigner.client(1) as second:
            await sign(first, make_spend(cosigner.bitcoin_pub, n_inputs=1).psbt())
            await sign(first, make_spend(cosigner.bitcoin_pub, n_inputs=1).psbt())
            await sign(second, make_spend(cosigner.bitcoin_pub, n_inputs=1).psbt())
            try:
                await second.call("sign", {"tx": "bm90IGEgcHNidA==", "index": 0})
            except RpcError:
                pass  # refused, so not stored: must not be counted
        report = status_json("revault.cosigner", cosigner.daemon.config_path)
        summary = report["cosigner"]
        assert summary["signed_outpoints"] == 3
        assert summary["signed_last_24h"] == 3
        assert 0 <= summary["last_signature_age_seconds"] < 600
        assert summary["signed_by_manager"] == {
            cosigner.managers[0].public[:4].hex(): 2, cosigner.managers[1].public[:4].hex(): 1}
        assert summary["managers_configured"] == 2
        text = status("revault.cosigner", cosigner.daemon.config_path)
        assert "  signed outpoints: 3" in text.stdout.splitlines()
        assert not any(s in text.stdout for s in cosigner.secrets())
    finally:
        cosigner.daemon.ensure_dead()
