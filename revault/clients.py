"""Typed async clients, one per daemon, on top of `rpc.RpcClient`.

Each method builds its params object, checks it with the params class's own `parse`
(so a bad argument fails here, naming the member, as the daemon would), calls, and
parses the answer with the result class of the daemon's row in `messages.METHODS`:
a client accepts exactly what the daemons are specified to answer.

What a call raises:
- an `errors.WireError` subclass for an error answer: `Refused` (-32002: a quota, a
  rate, a daemon shutting down; the same call may succeed later), `InvalidParams`
  (-32602, with `field` and `reason`), `Forbidden` (-32001: this key lacks the role),
  and so on (`errors.error_from_wire`);
- `BadResult` for an answer that is not the method's result (the connection stays
  usable), `rpc.ProtocolError` for a frame that is not a JSON-RPC answer;
- `TimeoutError` past the client's timeout, `transport.TransportError` or `OSError`
  when the connection fails (after either, reconnect: see `RpcClient.call`).

The watchtower (which polls the sync server) and the wallet use these; so can any
script that speaks to a deployment.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Self

from revault.errors import InvalidParams
from revault.messages import (
    COSIGNER_METHODS, SYNC_SERVER_METHODS, WATCHTOWER_METHODS, AckResult, ErrSigParams,
    GetSigsParams, GetSigsResult, GetSpendOpinionsParams, GetSpendOpinionsResult,
    GetSpendRequestsParams, GetSpendRequestsResult, Method, RequestSpendParams, SigParams,
    SignParams, SignResult, SpendOpinionParams, WatchtowerSigParams, WatchtowerSigResult,
)
from revault.rpc import ProtocolError, RpcClient

__all__ = ["DEFAULT_TIMEOUT", "BadResult", "SyncServerClient", "WatchtowerClient",
           "CosignerClient"]

DEFAULT_TIMEOUT = 30.0  # seconds for one call: send, the daemon's durable write, answer


class BadResult(ProtocolError):
    """The daemon answered a result that its method's result class refuses."""

    def __init__(self, method: str, error: InvalidParams):
        super().__init__(f"{method} result: {error}")
        self.method = method
        self.field = error.field
        self.reason = error.reason


class _DaemonClient:
    """One Noise connection to one daemon, calling the methods of its table."""

    METHODS: ClassVar[Mapping[str, Method]]

    def __init__(self, rpc: RpcClient, *, timeout: float = DEFAULT_TIMEOUT):
        self.rpc = rpc
        self.timeout = timeout

    @classmethod
    async def connect(cls, host: str, port: int, local_private: bytes, remote_public: bytes,
                      *, connect_timeout: float = 10.0,
                      timeout: float = DEFAULT_TIMEOUT) -> Self:
        """Connect and finish the Noise handshake (both within `connect_timeout`)."""
        rpc = await RpcClient.connect(host, port, local_private, remote_public,
                                      timeout=connect_timeout)
        return cls(rpc, timeout=timeout)

    @property
    def closed(self) -> bool:
        return self.rpc.closed

    async def _call(self, method: str, params: Any) -> Any:
        spec = self.METHODS[method]
        wire = params.to_json()
        spec.params.parse(wire)
        answer = await self.rpc.call(method, wire, timeout=self.timeout)
        try:
            return spec.result.parse(answer)
        except InvalidParams as e:
            raise BadResult(method, e) from None

    async def close(self) -> None:
        await self.rpc.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class SyncServerClient(_DaemonClient):
    """The sync server, as a stakeholder, a manager or a watchtower: the server checks
    that this connection's Noise key has the role a method needs (else Forbidden)."""

    METHODS = SYNC_SERVER_METHODS

    # stakeholders
    async def sig(self, id: str, pubkey: str, signature: str) -> AckResult:
        """Store `pubkey`'s signature for tx uid `id`; acked once durable."""
        return await self._call("sig", SigParams(pubkey=pubkey, signature=signature, id=id))

    async def err_sig(self, id: str) -> AckResult:
        """Erase every signature stored for tx uid `id`."""
        return await self._call("err_sig", ErrSigParams(id=id))

    # stakeholders and managers
    async def get_sigs(self, id: str) -> GetSigsResult:
        return await self._call("get_sigs", GetSigsParams(id=id))

    # managers
    async def request_spend(self, transaction: str, timestamp: int,
                            vault_id: str) -> AckResult:
        return await self._call("request_spend", RequestSpendParams(
            transaction=transaction, timestamp=timestamp, vault_id=vault_id))

    async def get_spend_opinions(self, vault_id: str,
                                 since: str | None = None) -> GetSpendOpinionsResult:
        """Opinions on `vault_id` after cursor `since` (from the oldest without it); pass
        the result's `cursor` back until a page comes back empty to have them all."""
        return await self._call("get_spend_opinions",
                                GetSpendOpinionsParams(vault_id=vault_id, since=since))

    # watchtowers
    async def get_spend_requests(self, since: str | None = None) -> GetSpendRequestsResult:
        """Pending requests after cursor `since` (from the oldest without it). The
        result's `cursor` is None when the server sent none: poll without one then."""
        return await self._call("get_spend_requests", GetSpendRequestsParams(since=since))

    async def spend_opinion(self, opinion: SpendOpinionParams) -> AckResult:
        """Relay an opinion made by `messages.sign_opinion`; acked once durable."""
        return await self._call("spend_opinion", opinion)


class WatchtowerClient(_DaemonClient):
    """A watchtower, as its one paired wallet."""

    METHODS = WATCHTOWER_METHODS

    async def sig(self, signatures: Mapping[str, str], txid: str,
                  vault_txid: str) -> WatchtowerSigResult:
        """Hand over a revocation's signatures (pubkey -> DER hex, ALL|ANYONECANPAY)."""
        return await self._call("sig", WatchtowerSigParams(
            signatures=dict(signatures), txid=txid, vault_txid=vault_txid))


class CosignerClient(_DaemonClient):
    """A cosigning server, as a manager."""

    METHODS = COSIGNER_METHODS

    async def sign(self, tx: str, index: int) -> SignResult:
        """The cosigner's signature (DER hex, SIGHASH_ALL implied) of input `index` of
        the base64 PSBT `tx`."""
        return await self._call("sign", SignParams(tx=tx, index=index))
