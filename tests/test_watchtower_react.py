"""The watchtower's reaction loop over the guard's actions, with its I/O replaced (the
chain and the reserve are the e2e tests' business)."""

from __future__ import annotations

from revault.daemon import load_app_config
from revault.primitives import OutPoint
from revault.transactions import Tx, TxIn, TxOut
from revault.watchtower import Watchtower, read_config
from revault.watchtower_guard import Cancel
from tests.test_watchtower_config import SAMPLE
from tests.test_watchtower_guard import unvault_tx, vault


async def test_one_vault_failing_unexpectedly_does_not_stop_the_other_cancels():
    tower = Watchtower(load_app_config("watchtower", SAMPLE, read_config), None,
                       b"\x11" * 32, b"\x00" * 32)
    tower.chain.tip = (100, "00" * 32)
    vaults = [tower.guard.add(vault(n)) for n in range(3)]
    for n, v in enumerate(vaults):
        v.value = 1_000_000 * (n + 1)
        tower.guard.see(unvault_tx(v), None)
    attempted = []

    async def cancel(action: Cancel, tip: int) -> None:
        attempted.append(action.vault)
        if action.vault is vaults[2]:  # the largest: tried first
            raise KeyError("fees")  # e.g. an RPC answer of an unexpected shape

    tower.cancel = cancel
    await tower.react(new_block=True)
    assert attempted == [vaults[2], vaults[1], vaults[0]]
    assert set(tower.failed) == {vaults[2]}


class MempoolNode:
    """Answers the two calls that find a mempool spender of an outpoint."""

    def __init__(self, spenders: dict[tuple[str, int], Tx]):
        self.spenders = spenders

    async def call(self, method: str, *params):
        if method == "gettxspendingprevout":
            [outpoint] = params[0]
            tx = self.spenders.get((outpoint["txid"], outpoint["vout"]))
            return [dict(outpoint, **({"spendingtxid": tx.txid} if tx else {}))]
        assert method == "getrawtransaction"
        return next(t for t in self.spenders.values() if t.txid == params[0]).to_hex()


async def test_an_unvault_already_in_the_mempool_when_a_vault_gets_guarded_is_seen():
    """The race of `sig`: the unvault enters the mempool after the deposit was checked
    unspent, before the vault is guarded. The follower showed it to the guard when it
    matched nothing; the sig's last step looks for it, so it is cancelled at once."""
    tower = Watchtower(load_app_config("watchtower", SAMPLE, read_config), None,
                       b"\x11" * 32, b"\x00" * 32)
    tower.chain.tip = (100, "00" * 32)
    v = vault()
    unvault = Tx(2, (TxIn(OutPoint(*v.deposit), 0xFFFFFFFD),),
                 (TxOut(990_000, b"\x00\x20" + b"\x33" * 32),), 0)
    v.unvault_txid = unvault.txid
    tower.guard.add(v)
    tower.node = MempoolNode({v.deposit: unvault})
    await tower.see_deposit_spender(v)
    assert v.busy
    [action] = tower.guard.decide_all(100)
    assert isinstance(action, Cancel) and action.vault is v
    # Nothing spends it: nothing changes.
    other = tower.guard.add(vault(1))
    await tower.see_deposit_spender(other)
    assert not other.busy
