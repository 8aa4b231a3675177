"""revault.clients against the real daemons (subprocesses, real Noise sockets), and
against an in-process dispatcher for the answers no conforming daemon gives."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from dataclasses import replace
from pathlib import Path

import coincurve
import pytest
import pytest_asyncio
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript

from revault import transport
from revault.clients import BadResult, CosignerClient, SyncServerClient, WatchtowerClient
from revault.errors import Forbidden, InvalidParams, Refused, UnknownMethod, WireError
from revault.keys import generate_bitcoin_key
from revault.messages import (
    MANAGER, WALLET, WATCHTOWER_METHODS, AckResult, GetSigsParams, GetSigsResult,
    GetSpendOpinionsResult, GetSpendRequestsParams, GetSpendRequestsResult, SignParams,
    SignResult, SpendRequest, WatchtowerSigParams, WatchtowerSigResult, sign_opinion,
    verify_opinion,
)
from revault.rpc import Caller, Dispatcher, RpcClient, serve_connection
from tests.support.cosigner_psbt import assert_valid_signature, make_spend, pubkey
from tests.support.cosigner_daemon import setup_cosigner
from tests.support.daemons import DaemonProcess, NoiseIdentity, write_config

HOST = "127.0.0.1"
OPINION_KEY = b"\x11" * 32


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bitcoin_sig(n: int, message: str = "m") -> tuple[str, str]:
    """(pubkey hex, DER low-S signature hex) of secp256k1 key `n`."""
    key = coincurve.PrivateKey(n.to_bytes(32, "big"))
    return (key.public_key.format().hex(),
            key.sign(hashlib.sha256(message.encode()).digest(), hasher=None).hex())


def spend_tx(seed: str) -> tuple[str, str]:
    """(base64 transaction, txid) of a well-formed one-in one-out spend."""
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(hashlib.sha256(seed.encode()).digest(), 0))],
        [CMutableTxOut(10_000, CScript([0, hashlib.sha256(seed.encode()).digest()]))],
        nVersion=2)
    return base64.b64encode(tx.serialize()).decode(), tx.GetTxid()[::-1].hex()


pytestmark = pytest.mark.asyncio(loop_scope="module")


# --- sync server ------------------------------------------------------------------------

class SyncDeployment:
    def __init__(self, tmp: Path):
        names = ("server", "stakeholder", "manager", "watchtower")
        self.keys = {name: NoiseIdentity.create(tmp / f"{name}.key") for name in names}
        config = {
            "listen": f"{HOST}:0", "data_dir": "data", "noise_key_file": "server.key",
            "requests_per_second": 10_000,
            "peers": {role + "s": [self.keys[role].public.hex()]
                      for role in ("stakeholder", "manager", "watchtower")},
            # Low enough for a test to reach, to see a refusal come back as Refused.
            "quotas": {"signatures_per_id": 2},
        }
        self.daemon = DaemonProcess("sync-server", write_config(tmp / "sync.toml", config), tmp)

    async def client(self, role: str) -> SyncServerClient:
        return await SyncServerClient.connect(HOST, self.daemon.port, self.keys[role].private,
                                              self.keys["server"].public, timeout=10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sync(daemon_module_dir):
    tmp = daemon_module_dir / "sync"
    tmp.mkdir()
    deployment = SyncDeployment(tmp)
    await deployment.daemon.start()
    try:
        yield deployment
        assert await deployment.daemon.stop() == 0
        assert "Traceback" not in deployment.daemon.stderr()
    finally:
        deployment.daemon.ensure_dead()


async def test_stakeholder_signatures_round_trip(sync):
    tx_id = h("clients-sigs")
    pub1, sig1 = bitcoin_sig(1)
    pub2, sig2 = bitcoin_sig(2)
    async with await sync.client("stakeholder") as stakeholder, \
            await sync.client("manager") as manager:
        assert await stakeholder.sig(tx_id, pub1, sig1) == AckResult(ack=True)
        assert await stakeholder.sig(tx_id, pub2, sig2) == AckResult(ack=True)
        got = await manager.get_sigs(tx_id)
        assert got == GetSigsResult(signatures={pub1: sig1, pub2: sig2})
        assert await stakeholder.err_sig(tx_id) == AckResult(ack=True)
        assert await stakeholder.get_sigs(tx_id) == GetSigsResult(signatures={})


async def test_spend_request_opinion_round_trip(sync):
    vault = h("clients-vault")
    transaction, txid = spend_tx("clients-spend")
    async with await sync.client("manager") as manager, \
            await sync.client("watchtower") as watchtower:
        assert await manager.request_spend(transaction, 1_700_000_000, vault) == AckResult()
        page = await watchtower.get_spend_requests()
        assert isinstance(page, GetSpendRequestsResult)
        assert SpendRequest(transaction=transaction, timestamp=1_700_000_000,
                            vault_id=vault) in page.requests

        opinion = sign_opinion(OPINION_KEY, vault, False, "destination not allowed", txid)
        assert await watchtower.spend_opinion(opinion) == AckResult()
        got = await manager.get_spend_opinions(vault)
        assert isinstance(got, GetSpendOpinionsResult) and got.vault_id == vault
        [relayed] = got.opinions
        assert (relayed.accepted, relayed.reason, relayed.txid) == (
            False, "destination not allowed", txid)
        assert verify_opinion(relayed.to_params(vault))


async def test_error_answers_come_back_as_their_classes(sync):
    tx_id = h("clients-errors")
    async with await sync.client("stakeholder") as stakeholder, \
            await sync.client("watchtower") as watchtower:
        # -32001: the watchtower's key lacks the stakeholder role.
        with pytest.raises(Forbidden) as forbidden:
            await watchtower.sig(tx_id, *bitcoin_sig(1))
        assert forbidden.value.code == -32001 and "sig" in forbidden.value.message

        # -32002: the third signature for one id is over this daemon's quota of two.
        for n in (1, 2):
            await stakeholder.sig(tx_id, *bitcoin_sig(n))
        with pytest.raises(Refused) as refused:
            await stakeholder.sig(tx_id, *bitcoin_sig(3))
        assert refused.value.code == -32002
        assert "signatures_per_id" in refused.value.message

        # -32602 from the daemon (the params parse; only the server checks the signature
        # against the opinion), with the field split back out of the message.
        opinion = sign_opinion(OPINION_KEY, h("clients-forged"), True, "", "bb" * 32)
        forged = replace(opinion, reason="altered after signing")
        with pytest.raises(InvalidParams) as invalid:
            await watchtower.spend_opinion(forged)
        assert (invalid.value.code, invalid.value.field) == (-32602, "sig")
        assert invalid.value.reason == "not a valid signature of this opinion by pubkey"

        # Every error left the connections usable.
        assert (await stakeholder.get_sigs(tx_id)).signatures.keys() == {
            bitcoin_sig(1)[0], bitcoin_sig(2)[0]}


async def test_bad_arguments_fail_before_sending(sync):
    async with await sync.client("stakeholder") as stakeholder:
        sent_before = stakeholder.rpc._next_id
        with pytest.raises(InvalidParams) as info:
            await stakeholder.get_sigs("not a tx uid")
        assert info.value.field == "id"
        pub, sig = bitcoin_sig(1)
        with pytest.raises(InvalidParams) as info:
            await stakeholder.sig(h("x"), pub, sig + "01")  # a sighash byte: not DER
        assert (info.value.field, info.value.reason) == ("signature", "not DER")
        assert stakeholder.rpc._next_id == sent_before


# --- cosigner ---------------------------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cosigner(daemon_module_dir):
    tmp = daemon_module_dir / "cosigner"
    tmp.mkdir()
    c = setup_cosigner(tmp, n_managers=1, log_level="info")
    daemon, secret = c.daemon, c.bitcoin_secret
    await daemon.start()
    try:
        client = await CosignerClient.connect(HOST, daemon.port, c.managers[0].private,
                                              c.noise.public, timeout=10)
        async with client:
            yield client, pubkey(secret)
        assert await daemon.stop() == 0
        assert secret.hex() not in daemon.stderr()
    finally:
        daemon.ensure_dead()


async def test_cosigner_signs_once_per_outpoint(cosigner):
    client, cosigner_pub = cosigner
    spend = make_spend(cosigner_pub, n_inputs=2)
    result = await client.sign(spend.psbt(), 1)
    assert isinstance(result, SignResult)
    assert_valid_signature(bytes.fromhex(result.signature), spend.digest(1), cosigner_pub)
    assert await client.sign(spend.psbt(), 1) == result


async def test_cosigner_refusal_is_invalid_params_naming_the_reason(cosigner):
    client, cosigner_pub = cosigner
    with pytest.raises(InvalidParams) as info:
        await client.sign(make_spend(cosigner_pub, n_inputs=2).psbt(), 3)
    assert (info.value.field, info.value.reason) == ("tx", "index 3 out of range (2 inputs)")
    # Refused locally, before the daemon sees it: not a PSBT at all.
    with pytest.raises(InvalidParams) as info:
        await client.sign(base64.b64encode(b"not a psbt").decode(), 0)
    assert info.value.field == "tx"


# --- in-process daemons: the watchtower's table, and answers no daemon should give -----

@contextlib.asynccontextmanager
async def in_process(dispatcher: Dispatcher, roles: frozenset[str]):
    """Serve `dispatcher` over real Noise on 127.0.0.1; yields a connect function."""
    server_key, client_key = b"\x03" * 32, b"\x04" * 32
    client_pub = transport.public_key(client_key)

    async def handle(conn):
        await serve_connection(conn, dispatcher, Caller(conn.peer_public, roles))

    server = await transport.start_server(HOST, 0, server_key, [client_pub], handle)

    async def connect(cls):
        return await cls.connect(HOST, server.port, client_key,
                                 transport.public_key(server_key), timeout=5)
    try:
        yield connect
    finally:
        await server.close()


async def test_watchtower_client_through_the_watchtower_table():
    received = []

    async def sig(caller, params: WatchtowerSigParams) -> WatchtowerSigResult:
        received.append(params)
        return WatchtowerSigResult(ack=True, txid=params.txid)

    dispatcher = Dispatcher()
    dispatcher.serve_table(WATCHTOWER_METHODS, {"sig": sig})
    pub, der = bitcoin_sig(1)
    async with in_process(dispatcher, frozenset({WALLET})) as connect:
        async with await connect(WatchtowerClient) as wallet:
            result = await wallet.sig({pub: der}, "aa" * 32, "bb" * 32)
    assert result == WatchtowerSigResult(ack=True, txid="aa" * 32)
    assert received == [WatchtowerSigParams(signatures={pub: der}, txid="aa" * 32,
                                            vault_txid="bb" * 32)]


async def test_get_spend_requests_cursor_absent_or_present():
    answers = [{"requests": []}, {"requests": [], "cursor": "c-1"}]
    seen = []

    async def get_spend_requests(caller, params: GetSpendRequestsParams):
        seen.append(params)
        return answers[len(seen) - 1]

    dispatcher = Dispatcher()
    dispatcher.method("get_spend_requests", GetSpendRequestsParams, [MANAGER])(
        get_spend_requests)
    async with in_process(dispatcher, frozenset({MANAGER})) as connect:
        async with await connect(SyncServerClient) as client:
            assert (await client.get_spend_requests()).cursor is None
            assert (await client.get_spend_requests(since="c-0")).cursor == "c-1"
    assert seen == [GetSpendRequestsParams(), GetSpendRequestsParams(since="c-0")]
    assert GetSpendRequestsParams().to_json() == {}


async def test_a_result_that_does_not_parse_is_bad_result_and_the_connection_survives():
    async def get_sigs(caller, params):
        return {"signatures": {"02" + "00" * 32: "3006"}}

    async def sign(caller, params):
        return {"ack": True}

    dispatcher = Dispatcher()
    dispatcher.method("get_sigs", GetSigsParams, [MANAGER])(get_sigs)
    dispatcher.method("sign", SignParams, [MANAGER])(sign)
    async with in_process(dispatcher, frozenset({MANAGER})) as connect:
        async with await connect(CosignerClient) as client:
            with pytest.raises(BadResult) as info:
                await client.sign(make_spend(pubkey(generate_bitcoin_key())).psbt(), 0)
            assert (info.value.method, info.value.field) == ("sign", "signature")
            assert not client.closed
        async with await connect(SyncServerClient) as client:
            with pytest.raises(UnknownMethod):
                await client.get_spend_opinions(h("v"))
            with pytest.raises(BadResult) as info:
                await client.get_sigs(h("x"))
            assert info.value.field.startswith("signatures.02")


async def test_unknown_error_codes_stay_wire_errors():
    async def get_sigs(caller, params):
        raise WireError(-32099, "a code from the future")

    dispatcher = Dispatcher()
    dispatcher.method("get_sigs", GetSigsParams, [MANAGER])(get_sigs)
    async with in_process(dispatcher, frozenset({MANAGER})) as connect:
        async with await connect(SyncServerClient) as client:
            with pytest.raises(WireError) as info:
                await client.get_sigs(h("x"))
    assert type(info.value) is WireError
    assert (info.value.code, info.value.message) == (-32099, "a code from the future")


async def test_raw_rpc_client_raises_the_same_classes():
    # RpcClient itself maps codes: scripts that use it directly get the same classes.
    async def refuse(caller, params):
        raise Refused("try later")

    dispatcher = Dispatcher()
    dispatcher.method("get_sigs", GetSigsParams, [MANAGER])(refuse)
    async with in_process(dispatcher, frozenset({MANAGER})) as connect:
        async with await connect(SyncServerClient) as client:
            raw: RpcClient = client.rpc
            with pytest.raises(Refused, match="try later"):
                await raw.call("get_sigs", {"id": h("x")})
            with pytest.raises(InvalidParams) as info:
                await raw.call("get_sigs", {"id": 5})
            assert (info.value.field, info.value.reason) == ("id", "not a string")
            assert info.value.message == "id: not a string"
