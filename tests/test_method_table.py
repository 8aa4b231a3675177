"""The method tables of messages.py, and the daemons and dispatcher that serve them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from revault import errors, messages as m
from revault.clients import CosignerClient, SyncServerClient, WatchtowerClient
from revault.cosigner import CosignerConfig, CosignerService
from revault.cosigner_signing import CosignerKey, PsbtRefused
from revault.cosigner_store import StoreClosed
from revault.rpc import Caller, Dispatcher
from revault.sync_server import SyncServer, SyncServerConfig
from revault.sync_store import QuotaExceeded, Quotas, Retention, SqliteSyncStore
from tests.support.design import DESIGN_ROLES

ROLES = {m.STAKEHOLDER, m.MANAGER, m.WATCHTOWER, m.WALLET}


def test_tables_match_the_design_roles():
    assert {daemon: {name: set(method.roles) for name, method in table.items()}
            for daemon, table in m.METHODS.items()} == DESIGN_ROLES


@pytest.mark.parametrize("daemon,name", [(d, n) for d, t in m.METHODS.items() for n in t])
def test_every_row_is_complete(daemon, name):
    method = m.METHODS[daemon][name]
    assert method.name == name
    assert method.roles and method.roles <= ROLES
    for cls in (method.params, method.result):
        assert callable(getattr(cls, "parse")) and callable(getattr(cls, "to_json"))
    assert method.params.__name__.endswith("Params")
    assert method.result.__name__.endswith("Result")


def test_tables_are_read_only():
    with pytest.raises(TypeError):
        m.SYNC_SERVER_METHODS["extra"] = m.SYNC_SERVER_METHODS["sig"]
    with pytest.raises(TypeError):
        m.METHODS["wallet"] = {}


def test_each_client_offers_every_method_of_its_daemon():
    for client, daemon in ((SyncServerClient, "sync-server"), (WatchtowerClient, "watchtower"),
                           (CosignerClient, "cosigner")):
        assert client.METHODS is m.METHODS[daemon]
        assert all(callable(getattr(client, name, None)) for name in m.METHODS[daemon])


# --- daemons register from the table -------------------------------------------------

def sync_server() -> SyncServer:
    config = SyncServerConfig(common=None, stakeholders=[b"s" * 32], managers=[b"m" * 32],
                              watchtowers=[b"w" * 32], purge_interval=60,
                              retention=Retention(), quotas=Quotas())
    return SyncServer(config, store=None)


def cosigner() -> CosignerService:
    config = CosignerConfig(common=None, bitcoin_key_file=Path("unused"),
                            managers=(b"m" * 32,))
    return CosignerService(config, CosignerKey(b"\x01" * 32), store=None)


async def answer(dispatcher: Dispatcher, roles: set[str], method: str, params) -> dict:
    raw = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
    return json.loads(await dispatcher.handle(Caller(b"\x00" * 32, frozenset(roles)),
                                              raw.encode()))


@pytest.mark.parametrize("daemon,make", [("sync-server", sync_server), ("cosigner", cosigner)])
async def test_daemon_serves_exactly_its_table(daemon, make):
    dispatcher = make().dispatcher
    for name, method in m.METHODS[daemon].items():
        # Every other role is forbidden; an allowed one reaches the params class (an
        # array is no method's params), so the handler is registered with these roles.
        others = ROLES - method.roles
        assert (await answer(dispatcher, others, name, {}))["error"]["code"] == \
            errors.FORBIDDEN
        got = await answer(dispatcher, set(method.roles), name, [1])
        assert got["error"] == {"code": errors.INVALID_PARAMS, "message": "params: not an object"}
    other_names = {n for t in m.METHODS.values() for n in t} - set(m.METHODS[daemon])
    for name in other_names:
        assert (await answer(dispatcher, ROLES, name, {}))["error"]["code"] == \
            errors.METHOD_NOT_FOUND


def test_serve_table_refuses_a_missing_or_an_unlisted_handler():
    async def handler(caller, params):
        return m.AckResult()

    handlers = {name: handler for name in m.SYNC_SERVER_METHODS}
    Dispatcher().serve_table(m.SYNC_SERVER_METHODS, handlers)
    with pytest.raises(ValueError, match="no handler for get_sigs"):
        Dispatcher().serve_table(m.SYNC_SERVER_METHODS,
                                 {k: v for k, v in handlers.items() if k != "get_sigs"})
    with pytest.raises(ValueError, match="not in the method table: get_everything"):
        Dispatcher().serve_table(m.SYNC_SERVER_METHODS, {**handlers, "get_everything": handler})


async def test_a_handler_answering_another_result_class_is_an_internal_error(caplog):
    async def sign(caller, params):
        return m.AckResult()  # a dict-able object, but not the table's SignResult

    dispatcher = Dispatcher()
    dispatcher.serve_table(m.COSIGNER_METHODS, {"sign": sign})
    caplog.set_level(logging.ERROR, logger="revault.rpc")
    got = await answer(dispatcher, {m.MANAGER}, "sign",
                       {"tx": "cHNidP8BAAA=", "index": 0})
    assert got["error"] == {"code": errors.INTERNAL_ERROR, "message": "internal error"}
    assert "TypeError" in caplog.text


# --- errors cross the wire with their own code --------------------------------------

@pytest.mark.parametrize("raised,code,message", [
    (QuotaExceeded("signatures_per_id", 2), errors.REFUSED, "quota signatures_per_id reached (2)"),
    (StoreClosed("cosigner is shutting down"), errors.REFUSED, "cosigner is shutting down"),
    (PsbtRefused("tx", "input 0 has no witness_utxo"), errors.INVALID_PARAMS,
     "tx: input 0 has no witness_utxo"),
    (m.ParamsError("index", "out of range"), errors.INVALID_PARAMS, "index: out of range"),
    (errors.Forbidden("not yours"), errors.FORBIDDEN, "not yours"),
])
async def test_store_and_daemon_errors_are_answered_with_their_code(raised, code, message):
    async def handler(caller, params):
        raise raised

    dispatcher = Dispatcher()
    dispatcher.method("get_sigs", m.GetSigsParams, [m.MANAGER])(handler)
    got = await answer(dispatcher, {m.MANAGER}, "get_sigs", {"id": "ab" * 32})
    assert got["error"] == {"code": code, "message": message}


async def test_a_closed_sync_store_refuses_writes(tmp_path):
    # A write racing the daemon's shutdown is answered -32002, not as an internal error.
    store = await SqliteSyncStore.open(tmp_path / "sync.sqlite3")
    await store.close()
    with pytest.raises(errors.Refused, match="shutting down"):
        await store.put_signature("ab" * 32, "02" + "11" * 32, "30", b"p" * 32)


def test_error_from_wire_gives_the_class_of_the_code():
    cases = {errors.PARSE_ERROR: errors.ParseError, errors.INVALID_REQUEST: errors.InvalidRequest,
             errors.METHOD_NOT_FOUND: errors.UnknownMethod, errors.FORBIDDEN: errors.Forbidden,
             errors.REFUSED: errors.Refused, errors.INTERNAL_ERROR: errors.InternalError}
    for code, cls in cases.items():
        error = errors.error_from_wire(code, "why")
        assert type(error) is cls and (error.code, error.message, str(error)) == (code, "why",
                                                                                   "why")
    params = errors.error_from_wire(errors.INVALID_PARAMS, "opinions[2].sig: not DER")
    assert isinstance(params, errors.InvalidParams) and isinstance(params, ValueError)
    assert (params.field, params.reason, params.message) == ("opinions[2].sig", "not DER",
                                                             "opinions[2].sig: not DER")
    # A server that names no field: the message is kept as it came.
    vague = errors.error_from_wire(errors.INVALID_PARAMS, "bad")
    assert (vague.field, vague.reason, vague.message, str(vague)) == ("params", "bad", "bad",
                                                                      "bad")
    unknown = errors.error_from_wire(-32050, "later")
    assert type(unknown) is errors.WireError and unknown.code == -32050


def test_old_names_are_the_same_classes():
    from revault import rpc
    assert m.ParamsError is errors.InvalidParams
    assert rpc.RpcError is errors.WireError
    assert issubclass(PsbtRefused, errors.InvalidParams)
    assert issubclass(QuotaExceeded, errors.Refused) and issubclass(StoreClosed, errors.Refused)
