"""The watchtower's reaction loop over the guard's actions, with its I/O replaced (the
chain and the reserve are the e2e tests' business)."""

from __future__ import annotations

from revault.daemon import load_app_config
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
