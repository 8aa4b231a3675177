"""The watchtower's store: what it acknowledged survives a reopen, verdicts never change."""

from __future__ import annotations

import pytest

from revault.errors import Refused
from revault.primitives import OutPoint
from revault.watchtower_store import StoredRevocation, Verdict, WatchtowerStore

DEPOSIT = OutPoint("aa" * 32, 1)


def revocation(kind: str, txid: str = "bb" * 32) -> StoredRevocation:
    return StoredRevocation(kind, txid, b"signed " + kind.encode(), 990_000, b"\x00\x20" + b"\1" * 32,
                            980_000, b"\x00\x20" + b"\2" * 32)


async def test_revocations_are_kept_first_wins_and_survive_a_reopen(tmp_path):
    store = await WatchtowerStore.open(tmp_path / "w.sqlite3")
    assert await store.put_revocation(DEPOSIT, 1_000_000, 3, "cc" * 32, revocation("cancel"))
    assert not await store.put_revocation(DEPOSIT, 1_000_000, 3, "cc" * 32,
                                          revocation("cancel", "dd" * 32))
    assert await store.put_revocation(DEPOSIT, 1_000_000, 3, "cc" * 32, revocation("emergency"))
    await store.set_tip(120, "ee" * 32)
    await store.close()
    with pytest.raises(Refused):
        await store.set_tip(121, "ff" * 32)

    store = await WatchtowerStore.open(tmp_path / "w.sqlite3")
    try:
        [vault] = await store.vaults()
        assert (vault.deposit, vault.value, vault.index, vault.unvault_txid) == (
            DEPOSIT, 1_000_000, 3, "cc" * 32)
        assert vault.revocation_outputs == {
            "cancel": (980_000, b"\x00\x20" + b"\2" * 32),
            "emergency": (980_000, b"\x00\x20" + b"\2" * 32)}
        assert await store.revocation(DEPOSIT, "cancel") == revocation("cancel")
        assert await store.revocation(DEPOSIT, "unvault_emergency") is None
        assert await store.tip() == (120, "ee" * 32)
        await store.retire(DEPOSIT, "cancel buried")
        assert await store.vaults() == []
        assert len(await store.vaults(include_retired=True)) == 1
    finally:
        await store.close()


async def test_a_verdict_once_given_holds_and_counts_toward_the_day(tmp_path):
    store = await WatchtowerStore.open(tmp_path / "w.sqlite3")
    try:
        accepted = Verdict("11" * 32, True, "accepted by accept_all", 5_000, 1000, (DEPOSIT,))
        assert await store.put_verdict(accepted) == accepted
        refused = Verdict("11" * 32, False, "changed my mind", 5_000, 2000, (DEPOSIT,))
        assert await store.put_verdict(refused) == accepted
        assert await store.verdict("11" * 32) == accepted
        await store.put_verdict(Verdict("22" * 32, True, "ok", 7_000, 1500, (DEPOSIT,)))
        await store.put_verdict(Verdict("33" * 32, False, "no", 9_000, 1600, (DEPOSIT,)))
        assert await store.accepted_value_since(1000) == 12_000
        assert await store.accepted_value_since(1200) == 7_000
        assert await store.accepted_spends() == {DEPOSIT: frozenset({"11" * 32, "22" * 32})}
        assert await store.sync_cursor() is None
        await store.set_sync_cursor("c1")
        assert await store.sync_cursor() == "c1"
    finally:
        await store.close()
