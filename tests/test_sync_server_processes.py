"""Several sync-server processes, one PostgreSQL: one truth (issue "Sync server at scale", 3).

Two real daemons share one database and the same peers, as they would behind a TCP
load balancer: what one acknowledges the other returns at once, quotas hold across
both, and one of them killed with SIGKILL under load loses nothing it acknowledged
while the other keeps serving.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
import pytest_asyncio

from revault import transport
from revault.rpc import REFUSED, RpcError
from tests.test_sync_server import (
    Sync, der, h, make_peers, poll, pubkey, spend_tx, sync_config,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module")
async def pair(daemon_dir, postgres):
    """Two daemons on one fresh database; both stopped (or killed) at the end."""
    dsn = postgres.new_database()
    peers = make_peers(daemon_dir)
    syncs = []

    async def start(**extra) -> tuple[Sync, Sync]:
        for name in ("a", "b"):
            workdir = daemon_dir / name  # its own notify socket and logs
            workdir.mkdir()
            config = sync_config(peers, data_dir=str(workdir / "data"),
                                 noise_key_file=str(peers.server.path),
                                 storage={"backend": "postgresql", "dsn": dsn}, **extra)
            syncs.append(Sync(workdir, peers, config))
        await asyncio.gather(*(s.daemon.start() for s in syncs))
        return syncs[0], syncs[1]

    yield start
    for s in syncs:
        s.daemon.ensure_dead()


async def test_what_one_acks_the_other_returns_at_once(pair):
    a, b = await pair()
    p = a.peers
    tx_id = h("two-processes")
    for i in range(20):
        first, second = (a, b) if i % 2 else (b, a)
        await first.call(p.stakeholder, "sig", {"pubkey": pubkey(200 + i),
                                                "signature": der(200 + i), "id": tx_id})
        # No waiting: the ack came after the COMMIT, which the other process sees.
        got = await second.call(p.manager, "get_sigs", {"id": tx_id})
        assert got["signatures"][pubkey(200 + i)] == der(200 + i)
    # A watchtower's cursor from one process is good on the other.
    tx, _ = spend_tx("two-processes")
    await a.call(p.manager, "request_spend", {"transaction": tx, "timestamp": 1,
                                              "vault_id": h("two-processes-vault")})
    seen = await b.call(p.watchtower, "get_spend_requests", {})
    assert [r["transaction"] for r in seen["requests"]] == [tx]
    tx2, _ = spend_tx("two-processes-2")
    await b.call(p.manager, "request_spend", {"transaction": tx2, "timestamp": 2,
                                              "vault_id": h("two-processes-vault")})
    new = await a.call(p.watchtower, "get_spend_requests", {"since": seen["cursor"]})
    assert [r["transaction"] for r in new["requests"]] == [tx2]
    # Bindings too: a pubkey posted through one is the poster's on the other.
    e = None
    try:
        await b.call(p.stakeman, "sig", {"pubkey": pubkey(200), "signature": der(9),
                                         "id": tx_id})
    except RpcError as error:
        e = error
    assert e is not None and e.code == REFUSED
    assert await a.daemon.stop() == 0 and await b.daemon.stop() == 0


async def test_quotas_hold_across_both_processes(pair):
    a, b = await pair(quotas={"spend_requests_per_manager": 5}, requests_per_second=100_000)
    p = a.peers

    async def request(server: Sync, i: int):
        tx, _ = spend_tx(f"quota-across-{i}")
        try:
            await server.call(p.manager, "request_spend", {
                "transaction": tx, "timestamp": i, "vault_id": h(f"quota-across-{i}")})
            return True
        except RpcError as e:
            assert e.code == REFUSED and "spend_requests_per_manager" in e.message, e
            return False

    results = await asyncio.gather(*(request(a if i % 2 else b, i) for i in range(12)))
    assert sum(results) == 5
    got = await a.call(p.watchtower, "get_spend_requests", {})
    assert len(got["requests"]) == 5
    assert await a.daemon.stop() == 0 and await b.daemon.stop() == 0


async def test_one_killed_under_load_loses_nothing_acked_and_the_other_serves(pair):
    a, b = await pair()
    p = a.peers
    writers, kill_after, after_kill = 20, 200, 200
    acked: list[tuple[str, str, str]] = []
    acked_by_b_after_kill = 0
    killed = asyncio.Event()

    async def writer(w: int, server: Sync) -> None:
        nonlocal acked_by_b_after_kill
        key = pubkey(500 + w)
        async with await server.client(p.stakeholder) as rpc:
            n = 0
            while acked_by_b_after_kill < after_kill:
                tx_id, sig = h(f"kill-both-{w}-{n}"), der(500 + w, f"{n}")
                try:
                    await rpc.call("sig", {"pubkey": key, "signature": sig, "id": tx_id},
                                   timeout=20)
                except (transport.TransportError, ConnectionError, asyncio.TimeoutError):
                    assert server is a and killed.is_set()
                    return
                acked.append((tx_id, key, sig))
                if server is b and killed.is_set():
                    acked_by_b_after_kill += 1
                n += 1

    tasks = [asyncio.create_task(writer(w, a if w % 2 else b)) for w in range(writers)]

    async def enough():
        return len(acked) >= kill_after or any(t.done() for t in tasks)

    await poll(enough, timeout=60)
    assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
    a.daemon.proc.send_signal(signal.SIGKILL)
    killed.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert await a.daemon.stop() == -signal.SIGKILL
    assert acked_by_b_after_kill >= after_kill

    missing = []
    async with await b.client(p.manager) as rpc:
        for tx_id, key, sig in acked:
            got = await rpc.call("get_sigs", {"id": tx_id})
            if got["signatures"].get(key) != sig:
                missing.append(tx_id)
    print(f"\nkill -9 of one of two: {len(acked)} acked in all, {acked_by_b_after_kill} by the "
          f"survivor after the kill; {len(acked) - len(missing)} present")
    assert not missing, f"{len(missing)} acknowledged signatures lost"
    # The killed one comes back on the same database and serves what the other stored.
    await a.daemon.start()
    tx_id, key, sig = acked[-1]
    assert (await a.call(p.manager, "get_sigs", {"id": tx_id}))["signatures"][key] == sig
    assert await a.daemon.stop() == 0 and await b.daemon.stop() == 0
