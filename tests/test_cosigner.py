"""`revault-cosigner` end to end: the real daemon subprocess over real Noise connections."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revault import transport
from revault.cosigner import read_config
from revault.daemon import load_app_config
from revault.keys import create_key_file, generate_bitcoin_key
from revault.rpc import INVALID_PARAMS, REFUSED, RpcClient, RpcError
from tests.support.cosigner_psbt import (assert_valid_signature, b64, make_spend, p2wsh, pubkey,
                                         random_key)
from tests.support.cosigner_daemon import setup_cosigner
from tests.support.daemons import REPO_ROOT, NoiseIdentity, write_config

SAMPLE_CONFIG = REPO_ROOT / "contrib" / "cosigner.sample.toml"
UNIT_FILE = REPO_ROOT / "contrib" / "systemd" / "revault-cosigner.service"


async def sign(client: RpcClient, psbt: str, index: int = 0) -> bytes:
    result = await client.call("sign", {"tx": psbt, "index": index})
    assert set(result) == {"signature"}
    assert re.fullmatch(r"[0-9a-f]+", result["signature"])
    return bytes.fromhex(result["signature"])


# --- signing, replay, logs --------------------------------------------------------------

async def test_sign_then_replay_or_refuse_another_transaction(cosigner):
    txid = os.urandom(32)
    first = make_spend(cosigner.bitcoin_pub, n_inputs=2)
    first.inputs[1].txid, first.inputs[1].vout = txid, 3
    first_txid = first.tx().GetTxid()[::-1].hex()
    async with await cosigner.client(0) as a, await cosigner.client(1) as b:
        sig = await sign(a, first.psbt(), 1)
        # Verified against python-bitcoinlib's BIP 143 digest; no sighash byte appended.
        assert_valid_signature(sig, first.digest(1), cosigner.bitcoin_pub)
        second = make_spend(cosigner.bitcoin_pub, txid=txid, vout=3)
        assert second.digest(0) != first.digest(1)
        # docs/protocol.md, "Cosigner rules": another spend of that outpoint is refused, naming the first.
        with pytest.raises(RpcError) as info:
            await sign(b, second.psbt(), 0)
        assert info.value.code == REFUSED
        assert info.value.message == f"outpoint {txid.hex()}:3 already signed for spend {first_txid}"
        assert await sign(a, first.psbt(), 1) == sig
        # Another vout of the same txid is another outpoint.
        third = make_spend(cosigner.bitcoin_pub, txid=txid, vout=4)
        other = await sign(a, third.psbt(), 0)
        assert other != sig
        assert_valid_signature(other, third.digest(0), cosigner.bitcoin_pub)
    assert await cosigner.daemon.stop() == 0
    log = cosigner.daemon.stderr()
    outpoint = f"{txid.hex()}:3"
    prefix_a = cosigner.managers[0].public[:4].hex()
    prefix_b = cosigner.managers[1].public[:4].hex()
    assert re.search(rf"signed outpoint {outpoint}: new signature for manager {prefix_a}", log)
    assert re.search(rf"sign refused for outpoint {outpoint}: manager {prefix_b} asked for spend "
                     rf"{second.tx().GetTxid()[::-1].hex()}; it was signed for spend {first_txid} "
                     rf"\(manager {prefix_a}\)", log)
    assert re.search(rf"signed outpoint {outpoint}: replayed stored signature to manager "
                     rf"{prefix_a} \(same spend", log)
    assert f"signed outpoint {txid.hex()}:4: new signature" in log
    for secret in cosigner.secrets():
        assert secret not in log
    assert len(cosigner.rows()) == 2


async def test_refusals_name_the_reason(cosigner):
    pub = cosigner.bitcoin_pub
    cases = []

    spend = make_spend(pub, n_inputs=2)
    cases.append((spend.psbt(), 3, "tx: index 3 out of range (2 inputs)"))
    cases.append((b64(b"psbt\xff\x00\x00garbage"), 0, "tx: not a valid PSBT"))
    cases.append((b64(b"definitely not"), 0, "tx: not a PSBT"))
    cases.append(("%%%", 0, "tx: "))

    spend = make_spend(pub)
    spend.inputs[0].include_witness_utxo = False
    cases.append((spend.psbt(), 0, "tx: input 0 has no witness_utxo"))

    spend = make_spend(pub)
    spend.inputs[0].include_witness_script = False
    cases.append((spend.psbt(), 0, "tx: input 0 has no witness_script"))

    spend = make_spend(pub)
    spend.inputs[0].witness_utxo_script = bytes(p2wsh(b"\x51"))
    cases.append((spend.psbt(), 0, "tx: input 0 witness_script does not match the witness_utxo "
                                   "scriptPubKey"))

    spend = make_spend(pubkey(random_key()))
    cases.append((spend.psbt(), 0, "tx: input 0 witness_script does not contain the cosigner's key"))

    spend = make_spend(pub)
    spend.inputs[0].extra_fields.append((b"\x03", (0x81).to_bytes(4, "little")))
    cases.append((spend.psbt(), 0, "tx: input 0 asks for sighash type 0x81"))

    async with await cosigner.client() as client:
        for psbt, index, reason in cases:
            with pytest.raises(RpcError) as info:
                await client.call("sign", {"tx": psbt, "index": index})
            assert info.value.code == INVALID_PARAMS, (reason, info.value)
            assert info.value.message.startswith(reason), (reason, info.value.message)
        for params, field in (({"index": 0}, "tx"), ({"tx": make_spend(pub).psbt()}, "index"),
                              ({"tx": make_spend(pub).psbt(), "index": -1}, "index"),
                              ({"tx": make_spend(pub).psbt(), "index": "0"}, "index")):
            with pytest.raises(RpcError) as info:
                await client.call("sign", params)
            assert info.value.code == INVALID_PARAMS
            assert info.value.message.startswith(f"{field}:")
        # Nothing was signed, and the connection still serves.
        good = make_spend(pub)
        assert_valid_signature(await sign(client, good.psbt()), good.digest(0), pub)
    assert len(cosigner.rows()) == 1


async def test_non_manager_is_dropped_at_handshake(cosigner):
    stranger = NoiseIdentity.create(cosigner.workdir / "stranger.key")
    with pytest.raises(transport.TransportError):
        await RpcClient.connect("127.0.0.1", cosigner.daemon.port, stranger.private,
                                cosigner.noise.public, timeout=10)
    # A manager who has the wrong idea of the cosigner's key is dropped too.
    wrong = NoiseIdentity.create(cosigner.workdir / "wrong.key")
    with pytest.raises(transport.TransportError):
        await RpcClient.connect("127.0.0.1", cosigner.daemon.port, cosigner.managers[0].private,
                                wrong.public, timeout=10)
    async with await cosigner.client() as client:
        spend = make_spend(cosigner.bitcoin_pub)
        await sign(client, spend.psbt())
    assert len(cosigner.rows()) == 1


async def test_rate_paces_each_manager_across_its_connections(daemon_dir):
    # 2 per second per key, burst 2: four signatures over two connections are all
    # made, the two past the burst about a second later; the rate bounds store growth.
    c = setup_cosigner(daemon_dir, requests_per_second=2)
    await c.daemon.start()
    try:
        started_at = time.monotonic()
        async with await c.client() as a, await c.client() as b:
            await asyncio.gather(*(sign(client, make_spend(c.bitcoin_pub).psbt())
                                   for client in (a, b, a, b)))
        assert time.monotonic() - started_at >= 0.9
        assert len(c.rows()) == 4
    finally:
        c.daemon.ensure_dead()


# --- once per outpoint under concurrency and crashes -----------------------------------

async def test_fifty_concurrent_conflicting_requests_yield_one_signature(daemon_dir):
    c = setup_cosigner(daemon_dir, n_managers=50)
    await c.daemon.start()
    try:
        txid = os.urandom(32)
        spends = [make_spend(c.bitcoin_pub, txid=txid, vout=1) for _ in range(50)]
        assert len({s.digest(0) for s in spends}) == 50
        clients = await asyncio.gather(*(c.client(i) for i in range(50)))
        ready = asyncio.Event()

        async def ask(client, spend):
            await ready.wait()
            try:
                return await sign(client, spend.psbt())
            except RpcError as e:  # the 49 other spends: refused, naming the one signed
                assert e.code == REFUSED
                return e.message

        tasks = [asyncio.create_task(ask(cl, s)) for cl, s in zip(clients, spends)]
        ready.set()
        answers = await asyncio.gather(*tasks)
        await asyncio.gather(*(cl.close() for cl in clients))
        signatures = [a for a in answers if isinstance(a, bytes)]
        refusals = [a for a in answers if isinstance(a, str)]
        distinct = set(signatures)
        print(f"\n50 concurrent conflicting requests: {len(distinct)} distinct signature(s)")
        assert len(distinct) == 1 and len(signatures) == 1
        (sig,) = distinct
        valid_for = [s for s in spends if _verifies(sig, s.digest(0), c.bitcoin_pub)]
        assert len(valid_for) == 1
        signed_txid = valid_for[0].tx().GetTxid()[::-1].hex()
        assert refusals == [f"outpoint {txid.hex()}:1 already signed for spend {signed_txid}"] * 49
        assert c.rows() == [(txid.hex(), 1, sig)]
        assert await c.daemon.stop() == 0
        log = c.daemon.stderr()
        assert log.count(f"signed outpoint {txid.hex()}:1: new signature") == 1
        assert log.count(f"sign refused for outpoint {txid.hex()}:1:") == 49
    finally:
        c.daemon.ensure_dead()


def _verifies(sig: bytes, digest: bytes, pub: bytes) -> bool:
    try:
        assert_valid_signature(sig, digest, pub)
        return True
    except AssertionError:
        return False


async def test_kill_9_loop_never_yields_a_second_signature(daemon_dir):
    """10 rounds of: start, sign, race requests, kill -9 mid-flight, restart."""
    c = setup_cosigner(daemon_dir, n_managers=4)
    rng = random.Random(0xC05)
    shared = os.urandom(32)
    pool = [(shared, 0)] + [(os.urandom(32), rng.randrange(4)) for _ in range(24)]
    seen: dict[tuple[bytes, int], set[bytes]] = {op: set() for op in pool}
    # Every transaction sent per outpoint: the one signature must be valid for one of them.
    sent: dict[tuple[bytes, int], list] = {op: [] for op in pool}
    in_flight_at_kill = []
    received = 0
    refused: dict[tuple[bytes, int], set[str]] = {op: set() for op in pool}
    shared_spend = make_spend(c.bitcoin_pub, txid=shared, vout=0)
    sent[(shared, 0)].append(shared_spend)

    def record(outpoint, sig):
        nonlocal received
        seen[outpoint].add(sig)
        received += 1

    async def ask(client, outpoint, spend):
        """Sign, or record the refusal (another spend of that outpoint was signed)."""
        try:
            record(outpoint, await sign(client, spend.psbt()))
        except RpcError as e:
            if e.code != REFUSED:
                raise
            refused[outpoint].add(e.message)

    try:
        for round_ in range(10):
            await c.daemon.start()
            # The outpoint signed in an earlier round keeps its signature across the crash.
            async with await c.client(0) as client:
                record((shared, 0), await sign(client, shared_spend.psbt()))
            clients = await asyncio.gather(*(c.client(i % 4) for i in range(8)))
            done_count = 0
            threshold = 3 + 4 * round_  # kill at a different point of the burst each round
            reached = asyncio.Event()
            pending: set[tuple[bytes, int]] = set()

            async def hammer(client):
                nonlocal done_count
                while True:
                    outpoint = rng.choice(pool)
                    spend = make_spend(c.bitcoin_pub, txid=outpoint[0], vout=outpoint[1])
                    sent[outpoint].append(spend)
                    pending.add(outpoint)
                    try:
                        await ask(client, outpoint, spend)
                    except (transport.TransportError, OSError, RpcError):
                        return
                    finally:
                        pending.discard(outpoint)
                    done_count += 1
                    if done_count >= threshold:
                        reached.set()

            tasks = [asyncio.create_task(hammer(cl)) for cl in clients]
            await asyncio.wait_for(reached.wait(), 30)
            in_flight_at_kill.append(len(pending))
            await c.daemon.kill()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            await asyncio.gather(*(cl.close() for cl in clients))

        # Final pass: every outpoint asked once more, with yet another transaction.
        await c.daemon.start()
        async with await c.client(1) as client:
            for outpoint in pool:
                spend = make_spend(c.bitcoin_pub, txid=outpoint[0], vout=outpoint[1])
                sent[outpoint].append(spend)
                await ask(client, outpoint, spend)
        assert await c.daemon.stop() == 0
    finally:
        c.daemon.ensure_dead()

    print(f"\nkill -9 loop: 10 rounds, requests in flight at each kill: {in_flight_at_kill}, "
          f"{received} signatures received, "
          f"max distinct per outpoint: {max(len(s) for s in seen.values())}")
    assert sum(in_flight_at_kill) > 0
    # The final pass asked for every outpoint, so each has its one stored signature: the
    # one received (if any), valid for one of the spends sent, and every refusal names it.
    rows = {(bytes.fromhex(t), v): s for t, v, s in c.rows()}
    assert set(rows) == set(pool)
    for outpoint, stored in rows.items():
        assert seen[outpoint] <= {stored}, f"{outpoint[0].hex()}:{outpoint[1]} got {len(seen[outpoint])}"
        [signed] = [s for s in sent[outpoint] if _verifies(stored, s.digest(0), c.bitcoin_pub)]
        signed_txid = signed.tx().GetTxid()[::-1].hex()
        assert refused[outpoint] <= {f"outpoint {outpoint[0].hex()}:{outpoint[1]} already signed "
                                     f"for spend {signed_txid}"}


# --- configuration and operations -------------------------------------------------------

def run_cosigner(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "revault.cosigner", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def test_bad_config_stops_at_start_naming_each_key(daemon_dir):
    NoiseIdentity.create(daemon_dir / "noise.key")
    config = {
        "listen": "127.0.0.1:0",
        "data_dir": "data",
        "noise_key_file": "noise.key",
        "bitcoin_key_file": "bitcoin.key",
        "managers": ["ab" * 31],
        "requests_per_second": 0,
        "manager": [],
    }
    result = run_cosigner(write_config(daemon_dir / "c.toml", config))
    assert result.returncode == 2
    assert "managers[0]: expected 64 hex characters" in result.stderr
    assert "requests_per_second: must be at least" in result.stderr
    assert "manager: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (daemon_dir / "data").exists()

    config.update(managers=[], requests_per_second=5)
    del config["manager"]
    result = run_cosigner(write_config(daemon_dir / "c.toml", config))
    assert result.returncode == 2
    assert "managers: must list at least one" in result.stderr


def test_bad_bitcoin_key_file_stops_at_start(daemon_dir):
    NoiseIdentity.create(daemon_dir / "noise.key")
    secret = generate_bitcoin_key()
    create_key_file(daemon_dir / "bitcoin.key", secret)
    os.chmod(daemon_dir / "bitcoin.key", 0o644)
    config = {
        "listen": "127.0.0.1:0", "data_dir": "data", "noise_key_file": "noise.key",
        "bitcoin_key_file": "bitcoin.key", "managers": ["ab" * 32],
    }
    result = run_cosigner(write_config(daemon_dir / "c.toml", config))
    assert result.returncode == 2  # a config problem, like every other
    assert "bitcoin_key_file" in result.stderr and "group or others" in result.stderr
    assert "Traceback" not in result.stderr
    assert secret.hex() not in result.stderr

    (daemon_dir / "zero.key").write_bytes(b"\x00" * 32)
    os.chmod(daemon_dir / "zero.key", 0o600)
    config["bitcoin_key_file"] = "zero.key"
    result = run_cosigner(write_config(daemon_dir / "c.toml", config))
    assert result.returncode == 2
    assert "not a valid secp256k1 secret key" in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigterm_stops_cleanly_and_state_survives(daemon_dir):
    c = setup_cosigner(daemon_dir)
    try:
        await c.daemon.start()
        txid = os.urandom(32)
        spend = make_spend(c.bitcoin_pub, txid=txid)
        async with await c.client() as client:
            sig = await sign(client, spend.psbt())
        assert await c.daemon.stop(signal.SIGTERM) == 0
        await c.daemon.start()
        async with await c.client(1) as client:
            assert await sign(client, spend.psbt()) == sig
        assert await c.daemon.stop(signal.SIGINT) == 0
        assert "cosigner stopped" in c.daemon.stderr()
    finally:
        c.daemon.ensure_dead()


def test_sample_config_is_valid_and_documents_every_key():
    config = load_app_config("cosigner", SAMPLE_CONFIG, read_config)
    assert config.common.listen_port > 0
    assert config.common.data_dir == Path("/var/lib/revault-cosigner")
    assert len(config.managers) >= 1
    text = SAMPLE_CONFIG.read_text()
    for key in ("listen", "data_dir", "noise_key_file", "bitcoin_key_file", "managers",
                "requests_per_second", "idle_timeout", "max_connections", "log_level"):
        line = re.search(rf"^#? ?{key} = ", text, re.MULTILINE)
        assert line, f"sample config does not show {key}"
        before = text[:line.start()].rstrip("\n").rsplit("\n", 1)[-1]
        assert before.startswith("#"), f"{key} has no comment above it"


def test_unit_file_is_hardened_notify_service():
    unit = UNIT_FILE.read_text()
    directives = {}
    for line in unit.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    expect = {
        "Type": "notify", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "MemoryDenyWriteExecute": "yes", "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "", "UMask": "0077", "StateDirectory": "revault-cosigner",
        "StateDirectoryMode": "0700",
    }
    for key, value in expect.items():
        assert value in directives.get(key, []), key
    assert directives["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert directives["User"] and directives["User"] != ["root"]
    assert re.search(r"revault-cosigner --config /etc/revault/cosigner\.toml",
                     directives["ExecStart"][0])
