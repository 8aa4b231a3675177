"""The wallet's SQLite state: what a resumed flow finds after a reopen."""

from __future__ import annotations

import pytest

from revault.wallet_store import SPEND_STAGES, StoredVault, WalletStore


async def test_everything_written_is_there_after_a_reopen(tmp_path):
    store = await WalletStore.open(tmp_path)
    await store.set_meta("birth", "1700000000")
    await store.add_deposit_index(0, "bcrt1qaddress0")
    await store.add_deposit_index(0, "ignored: an index is handed out once")
    vault = StoredVault("aa" * 32 + ":1", 2_000_000, 0)
    await store.add_vaults([vault, vault])
    await store.add_signatures("bb" * 32, 0, {b"\x02" * 33: b"\x30\x01"})
    await store.add_signatures("bb" * 32, 0, {b"\x03" * 33: b"\x30\x02"})
    await store.add_acks([("bb" * 32, "cc" * 32), ("bb" * 32, "cc" * 32)])
    await store.add_spend("dd" * 32, "AAAA", 1_700_000_001, [vault.outpoint])
    await store.set_spend_stage("dd" * 32, "cosigned")
    with pytest.raises(ValueError, match="unknown spend stage"):
        await store.set_spend_stage("dd" * 32, "approved-ish")
    await store.close()

    store = await WalletStore.open(tmp_path)
    try:
        assert await store.meta("birth") == "1700000000"
        assert await store.meta("absent") is None
        assert await store.deposit_indexes() == {0: "bcrt1qaddress0"}
        assert await store.vaults() == [vault]
        assert await store.vault(vault.outpoint) == vault
        assert await store.vault("ee" * 32 + ":0") is None
        assert await store.signatures("bb" * 32) == {
            0: {b"\x02" * 33: b"\x30\x01", b"\x03" * 33: b"\x30\x02"}}
        assert await store.acks(["bb" * 32, "ff" * 32]) == {("bb" * 32, "cc" * 32)}
        [spend] = await store.spends()
        assert (spend.txid, spend.stage, spend.outpoints) == ("dd" * 32, "cosigned",
                                                               (vault.outpoint,))
        assert await store.spend_of([vault.outpoint]) == spend
        assert await store.spend_of(["ee" * 32 + ":0"]) is None
    finally:
        await store.close()
    assert SPEND_STAGES[0] == "requested" and SPEND_STAGES[-1] == "broadcast"


async def test_a_spend_is_stored_whole_or_not_at_all(tmp_path):
    store = await WalletStore.open(tmp_path)
    try:
        await store.add_spend("dd" * 32, "AAAA", 1, ["aa" * 32 + ":0"])
        # The same txid again: the insert of the spend fails, so its inputs are not added.
        with pytest.raises(Exception, match="UNIQUE"):
            await store.add_spend("dd" * 32, "AAAA", 1, ["aa" * 32 + ":0", "ab" * 32 + ":0"])
        [spend] = await store.spends()
        assert spend.outpoints == ("aa" * 32 + ":0",)
    finally:
        await store.close()
