"""The watchtower's fee reserve: a Bitcoin Core descriptor wallet whose confirmed coins
bump revocation transactions.

A revocation is signed ALL|ANYONECANPAY by the stakeholders, so inputs can be added
without touching their signatures, but not outputs: a bump adds whole reserve coins
and no change, and every satoshi of them becomes fee. Which coins is decided by
`select_fee_inputs` (least overpayment); signing them is left to Core
(`walletprocesspsbt`), so the reserve's keys never leave bitcoind.

The reserve wallet must hold P2WPKH coins only (what `select_fee_inputs` sizes inputs
for); `address()` asks for bech32 addresses, and coins of any other type are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from embit.psbt import PSBT
from embit.script import Script, Witness
from embit.transaction import Transaction, TransactionOutput

from revault.bitcoind import BitcoindClient, BitcoindError
from revault.fees import FeeBumpError, FeeCoin, FeeSelection, Replaced, select_fee_inputs
from revault.primitives import OutPoint
from revault.transactions import RBF_SEQUENCE, Tx, TxIn

log = logging.getLogger("revault.watchtower.reserve")

SAT_PER_VB_TO_KWU = 250  # 1 sat/vB = 1 sat per 4 WU = 250 sat per 1000 WU


class ReserveError(Exception):
    """The reserve wallet cannot be used (missing, not a descriptor wallet, signing failed)."""


def sat(amount: Decimal) -> int:
    return int((Decimal(amount) * 100_000_000).to_integral_exact())


def kwu_from_btc_per_kvb(rate: Decimal) -> int:
    """Bitcoin Core's BTC/kvB as sat per 1000 weight units, rounded up."""
    return -(-sat(rate) // 4)


def target_feerate(mempool_info: dict, estimate: dict, ceiling_kwu: int) -> int:
    """sat/kWU a revocation is bumped to, from Core's `getmempoolinfo` and
    `estimatesmartfee`: the estimate for the next blocks, or the mempool's minimum when
    higher (or when there is no estimate yet), never above `ceiling_kwu` (max_feerate:
    what the reserve was sized for, so a spike cannot drain it on one vault), and never
    under the minimum relay feerate."""
    wanted = kwu_from_btc_per_kvb(mempool_info["mempoolminfee"])
    if "feerate" in estimate:
        wanted = max(wanted, kwu_from_btc_per_kvb(estimate["feerate"]))
    return max(kwu_from_btc_per_kvb(mempool_info["minrelaytxfee"]), min(wanted, ceiling_kwu))


@dataclass(frozen=True, slots=True)
class Revocation:
    """A fully signed revocation as stored, with what its input spends."""

    kind: str
    tx: Tx
    spent_value: int
    spent_script: bytes

    @property
    def fee(self) -> int:
        return self.spent_value - sum(o.value for o in self.tx.outputs)


@dataclass(frozen=True, slots=True)
class Bump:
    tx: Tx  # complete, ready to broadcast
    selection: FeeSelection
    feerate_sat_per_kwu: int

    @property
    def fee(self) -> int:
        return self.selection.fee

    @property
    def coins(self) -> tuple[FeeCoin, ...]:
        return self.selection.coins


def plan_bump(revocation: Revocation, coins: Sequence[FeeCoin], feerate_sat_per_kwu: int,
              replaces: Replaced | None = None) -> FeeSelection:
    """The coins that bring `revocation` to the feerate and, when it replaces a mempool
    transaction, pay what Bitcoin Core's replacement rules ask. FeeBumpError when the
    coins cannot."""
    return select_fee_inputs(revocation.tx.weight, revocation.fee, coins,
                             max(1, feerate_sat_per_kwu),
                             base_inputs=len(revocation.tx.inputs), replaces=replaces)


def plan_best_bump(revocation: Revocation, coins: Sequence[FeeCoin], feerate_sat_per_kwu: int,
                   replaces: Replaced | None = None) -> FeeSelection:
    """`plan_bump` to the feerate, or, when the coins cannot reach it, to the highest
    feerate they can (no coin at all: the revocation as signed). A cancel that must go
    out goes out with what the reserve has left. A replacement still has to pay what
    replacing asks: FeeBumpError when even that is out of reach."""
    try:
        return plan_bump(revocation, coins, feerate_sat_per_kwu, replaces)
    except FeeBumpError:
        rate = max_reachable_feerate(revocation, coins, feerate_sat_per_kwu)
        return plan_bump(revocation, coins, rate, replaces)


def max_reachable_feerate(revocation: Revocation, coins: Sequence[FeeCoin],
                          ceiling_kwu: int) -> int:
    """The largest feerate (sat/kWU, at most `ceiling_kwu`) the coins can bring it to."""
    def reachable(rate: int) -> bool:
        try:
            select_fee_inputs(revocation.tx.weight, revocation.fee, coins, rate,
                              base_inputs=len(revocation.tx.inputs), max_steps=2000)
            return True
        except FeeBumpError:
            return False

    lo, hi = 0, ceiling_kwu
    if reachable(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reachable(mid):
            lo = mid
        else:
            hi = mid
    return lo


def unsigned_bump(revocation: Revocation, coins: Iterable[FeeCoin]) -> Tx:
    """The revocation with the coins appended as inputs (unsigned: no witness)."""
    inputs = revocation.tx.inputs + tuple(TxIn(c.outpoint, RBF_SEQUENCE) for c in coins)
    return Tx(revocation.tx.version, inputs, revocation.tx.outputs, revocation.tx.locktime)


def bump_psbt(revocation: Revocation, coins: Sequence[FeeCoin],
              coin_scripts: dict[tuple[str, int], bytes]) -> str:
    """A PSBT of the bumped revocation: its own input final (the stakeholders'
    witness), the reserve coins with their UTXO, for the wallet to sign."""
    tx = unsigned_bump(revocation, coins)
    psbt = PSBT(Transaction.parse(tx.serialize(with_witness=False)))
    first = psbt.inputs[0]
    first.witness_utxo = TransactionOutput(revocation.spent_value, Script(revocation.spent_script))
    first.final_scriptwitness = Witness(list(revocation.tx.inputs[0].witness))
    for inp, coin in zip(psbt.inputs[1:], coins):
        key = (coin.outpoint.txid, coin.outpoint.vout)
        inp.witness_utxo = TransactionOutput(coin.value, Script(coin_scripts[key]))
    return psbt.to_string()


class FeeReserve:
    """The reserve wallet on the watchtower's node."""

    def __init__(self, client: BitcoindClient):
        if client.wallet is None:
            raise ValueError("the fee reserve needs a wallet-bound client")
        self.client = client
        self.wallet = client.wallet
        # outpoint -> scriptPubKey of the reserve coins seen: a PSBT input needs its UTXO
        self.scripts: dict[tuple[str, int], bytes] = {}

    async def ensure_loaded(self) -> None:
        """Load the wallet if the node has it on disk but not loaded; ReserveError if it
        does not exist (an operator creates it: it holds money)."""
        loaded = await self.client.call("listwallets", wallet=None)
        if self.wallet in loaded:
            return
        try:
            await self.client.call("loadwallet", self.wallet, wallet=None)
        except BitcoindError as e:
            raise ReserveError(f"fee reserve wallet {self.wallet!r}: {e.message}. Create it "
                               f"with: bitcoin-cli createwallet {self.wallet}") from None

    async def address(self) -> str:
        return await self.client.call("getnewaddress", "fee reserve", "bech32")

    async def coins(self, exclude: Iterable[tuple[str, int]] = ()) -> list[FeeCoin]:
        """Confirmed, spendable P2WPKH coins of the reserve, minus `exclude` (coins a
        pending bump of ours already uses)."""
        excluded = set(exclude)
        unspent = await self.client.call("listunspent", 1)
        coins = []
        for u in unspent:
            spk = bytes.fromhex(u["scriptPubKey"])
            key = (u["txid"], u["vout"])
            if len(spk) != 22 or spk[:2] != b"\x00\x14" or not u.get("spendable", False) \
                    or key in excluded:
                continue
            self.scripts[key] = spk
            coins.append(FeeCoin(OutPoint(u["txid"], u["vout"]), sat(u["amount"])))
        return coins

    async def sign(self, revocation: Revocation, selection: FeeSelection) -> Bump:
        """Have the wallet sign the selected coins; the complete transaction."""
        rate = selection.feerate_sat_per_kwu
        if not selection.coins:
            return Bump(revocation.tx, selection, rate)
        psbt = bump_psbt(revocation, selection.coins, self.scripts)
        processed = await self.client.call("walletprocesspsbt", psbt, True, "ALL", True, True)
        if not processed.get("complete"):
            raise ReserveError("the reserve wallet could not sign every fee input "
                               "(is it a wallet with private keys?)")
        raw = processed.get("hex")
        if raw is None:
            raw = (await self.client.call("finalizepsbt", processed["psbt"], wallet=None))["hex"]
        tx = Tx.from_hex(raw)
        if tx.txid != unsigned_bump(revocation, selection.coins).txid:
            raise ReserveError("the reserve wallet returned a different transaction")
        return Bump(tx, selection, rate)

    async def bump(self, revocation: Revocation, feerate_sat_per_kwu: int, *,
                   replaces: Replaced | None = None, exclude: Iterable[tuple[str, int]] = (),
                   extra: Sequence[FeeCoin] = (), best_effort: bool = False) -> Bump:
        """Select, sign, return. `extra`: coins usable although the wallet sees them spent
        (those of the pending bump this one replaces). `best_effort`: below the feerate
        when the coins cannot reach it (`plan_best_bump`) instead of FeeBumpError."""
        coins = await self.coins(exclude) + list(extra)
        plan = plan_best_bump if best_effort else plan_bump
        return await self.sign(revocation, plan(revocation, coins, feerate_sat_per_kwu, replaces))
