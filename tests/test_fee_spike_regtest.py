"""Bitcoin Core on regtest, in a fee spike: nothing pre-signed is kept out of the mempool.

A node of its own with `maxmempool=5` (MB), filled with large transactions until its
minimum fee is about 10 sat/vB, some 40 times the pre-signed 253 sat/kWU. Then, for the
3/2/3 deployment (pubkeys): an unvault alone is refused and enters with a CPFP child
through `submitpackage`; a spend (its fee frozen at signing) enters the same way once the
csv has passed; a cancel and an emergency are refused alone and enter once bumped with
reserve coins; and a re-bumped cancel replaces the previous one. Blocks are mined with
`generateblock` and an explicit list, so the spike lasts as long as the test needs it.

Run with -s to see the figures (fill time, minimum fee, package feerates).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import coincurve
import pytest

from revault.bitcoind import BitcoindError, PackageRejected, submit_package
from revault.deployment import p2wpkh, script_pubkey_to_address
from revault.fees import CpfpPackage, CpfpParent, FeeCoin, Replaced, build_cpfp, bump_revocation
from revault.transactions import Tx, TxOut, build_spend, build_vault_transactions
from tests.support.chain import CSV, Participants, make_participants
from tests.support.regtest import RegtestNode, fund, remove_datadir, sats

DEPOSIT_SATS = 1_000_000
FILL_TX_DATA_BYTES = 99_500  # one OP_RETURN each: ~100 kvB, under the 400,000 WU standard limit
FILL_START_SAT_PER_VB = Decimal(10)
SPIKE_SAT_PER_VB = Decimal(10)  # the mempool minimum fee the fill must reach
MAX_FILL_TXS = 80


@dataclass
class Spike:
    node: RegtestNode
    min_fee_sat_per_vb: Decimal
    fill: str  # what it took, for the report

    @property
    def target_sat_per_kwu(self) -> int:
        """Half again above the mempool's minimum fee."""
        return math.ceil(float(self.min_fee_sat_per_vb) * 1.5 * 250)


@pytest.fixture(scope="module")
def spiked(regtest_node) -> Iterator[Spike]:
    with regtest_node("bitcoind-spike", extra_conf=["maxmempool=5"]) as node:
        # The RPC client holds no loop state: a loop of its own for this module fixture.
        count, seconds, min_fee = asyncio.run(fill_mempool(node))
        yield Spike(node, min_fee, f"{count} transactions of ~100 kvB in {seconds:.2f} s, "
                                   f"mempool min fee {min_fee:.2f} sat/vB")
    remove_datadir(node)


async def fill_mempool(node: RegtestNode) -> tuple[int, float, Decimal]:
    """Send ~100 kvB transactions at rising feerates until the mempool, full, refuses
    anything under SPIKE_SAT_PER_VB. Returns (transactions sent, seconds, min fee sat/vB)."""
    start = time.monotonic()
    data = "00" * FILL_TX_DATA_BYTES
    for n in range(MAX_FILL_TXS):
        rate = FILL_START_SAT_PER_VB + Decimal(n) / 10
        await node.rpc("send", [{"data": data}], None, "unset", rate, wallet=node.MINER_WALLET)
        info = await node.rpc("getmempoolinfo")
        min_fee = info["mempoolminfee"] * 100_000  # BTC/kvB -> sat/vB
        if min_fee >= SPIKE_SAT_PER_VB:
            return n + 1, time.monotonic() - start, min_fee
    raise AssertionError(f"{MAX_FILL_TXS} transactions did not fill the mempool: {info}")


async def refused_for_fee(node: RegtestNode, tx: Tx) -> None:
    [verdict] = await node.rpc("testmempoolaccept", [tx.to_hex()])
    assert not verdict["allowed"] and verdict["reject-reason"] == "mempool min fee not met", verdict


async def in_mempool(node: RegtestNode, txid: str) -> dict:
    return await node.rpc("getmempoolentry", txid)


async def submit_cpfp(node: RegtestNode, p: Participants, package: CpfpPackage,
                      replacing: str | None = None) -> dict:
    """Sign the child with a manager's CPFP key, submit parent + child, check Core's view
    (and that the child replaced the one `replacing`, when given)."""
    child = package.child
    cpfp_secrets = [p.secret(3 + 2 + 3 + i, child.vault_index) for i in range(2)]
    for index in range(len(child.spent)):
        child.sign(index, cpfp_secrets[index % 2])  # either manager's key will do
    signed = child.finalize()
    result = await submit_package(node.client(), [p_.tx.to_hex() for p_ in package.parents] + [signed.to_hex()])
    assert result.txids == tuple(p_.tx.txid for p_ in package.parents) + (signed.txid,)
    assert result.replaced == ((replacing,) if replacing else ())
    entries = [await in_mempool(node, txid) for txid in result.txids]
    fee = sum(sats(e["fees"]["base"]) for e in entries)
    vsize = sum(e["vsize"] for e in entries)
    assert fee == package.package_fee and vsize <= package.package_vsize
    return {"fee": fee, "vsize": vsize, "sat_per_vb": fee / vsize, "child_vsize": entries[-1]["vsize"]}


async def confirm(node: RegtestNode, transactions: list[str], then_empty: int = 0) -> int:
    """Mine a block with exactly `transactions` (txids in the mempool or raw hex), then
    `then_empty` empty blocks: the rest of the mempool, and so the spike, stays."""
    address = node.address
    await node.rpc("generateblock", address, transactions)
    for _ in range(then_empty):
        await node.rpc("generateblock", address, [])
    node.sync_wallets()
    return await node.rpc("getblockcount")


def reserve_address(fee_key: bytes) -> str:
    return script_pubkey_to_address(p2wpkh(coincurve.PrivateKey(fee_key).public_key.format()), "regtest")


async def test_nothing_presigned_is_kept_out_by_a_fee_spike(spiked: Spike) -> None:
    node = spiked.node
    p = make_participants("pubkeys")
    d = p.deployment
    fee_key = b"\x79" * 32
    figures: dict[str, str] = {}

    # Before the spike: three vaults (spent, cancelled, emergencied), two coins of the
    # managers' CPFP wallet, three reserve coins of the watchtower.
    vaults = [await fund(node, d.deposit_address(), DEPOSIT_SATS) for _ in range(3)]
    cpfp_wallet = [await fund(node, d.cpfp_address(), value) for value in (40_000, 60_000)]
    reserve = []
    for value in (12_000, 25_000, 80_000):
        coin = await fund(node, reserve_address(fee_key), value)
        reserve.append(FeeCoin(coin.outpoint, value))
    await confirm(node, [c.outpoint.txid for c in vaults + cpfp_wallet] + [c.outpoint.txid for c in reserve])
    chains = [build_vault_transactions(d, v) for v in vaults]
    for chain in chains:
        for rtx in (chain.unvault, chain.cancel, chain.emergency):
            p.sign(rtx)

    figures["fill"] = spiked.fill
    target = spiked.target_sat_per_kwu

    # 1. The unvault, signed at 253 sat/kWU, is refused alone; its CPFP child carries it.
    unvault = chains[0].unvault
    await refused_for_fee(node, unvault.finalize())
    package = build_cpfp(d, [CpfpParent.of(unvault)], cpfp_wallet, target)
    figures["unvault + CPFP"] = _package_figures(await submit_cpfp(node, p, package), package)
    # The spike worsens: a re-bumped child replaces the first (the parent stays).
    entry = await in_mempool(node, package.child.txid)
    first_child = package.child.txid
    package = build_cpfp(d, [CpfpParent.of(unvault)], cpfp_wallet, 2 * target,
                         replaces=Replaced(sats(entry["fees"]["base"]), entry["weight"]))
    figures["unvault re-bumped"] = _package_figures(
        await submit_cpfp(node, p, package, replacing=first_child), package)
    change = package.child.output_coin(0)

    # 2. Confirmed, then csv blocks later the spend (fee frozen when the cosigners signed,
    # at the floor) is refused alone and enters with a child paid by the first child's change.
    height = await confirm(node, [unvault.txid, package.child.txid], then_empty=CSV - 1)
    assert (await node.rpc("getrawtransaction", unvault.txid, True))["confirmations"] == CSV
    payee = p2wpkh(coincurve.PrivateKey(b"\x45" * 32).public_key.format())
    spend = p.sign(build_spend(d, [unvault.output_coin(0)], [TxOut(500_000, payee)], change_index=1))
    await refused_for_fee(node, spend.finalize())
    package = build_cpfp(d, [CpfpParent.of(spend)], [change] if change.value else [], target)
    figures["spend + CPFP"] = _package_figures(await submit_cpfp(node, p, package), package)

    # 3. A cancel of the second vault's unvault (mined directly: it is refused alone too),
    # bumped from the reserve; then re-bumped higher, replacing the first bump.
    await confirm(node, [chains[1].unvault.finalize().to_hex()])
    cancel = chains[1].cancel
    await refused_for_fee(node, cancel.finalize())
    bumped, _ = bump_revocation(cancel, reserve, target, fee_key)
    first = bumped.finalize()
    assert await node.rpc("sendrawtransaction", first.to_hex()) == first.txid
    entry = await in_mempool(node, first.txid)
    figures["cancel bumped"] = _entry_figures(entry)
    rebumped, _ = bump_revocation(cancel, reserve, 2 * target, fee_key,
                                  replaces=Replaced(sats(entry["fees"]["base"]), entry["weight"]))
    second = rebumped.finalize()
    assert await node.rpc("sendrawtransaction", second.to_hex()) == second.txid
    with pytest.raises(BitcoindError):
        await in_mempool(node, first.txid)  # replaced
    figures["cancel re-bumped"] = _entry_figures(await in_mempool(node, second.txid))

    # 4. The third vault's emergency, straight from the deposit, bumped from what is left.
    emergency = chains[2].emergency
    await refused_for_fee(node, emergency.finalize())
    spent_by_cancel = {i.outpoint for i in second.inputs}
    bumped, _ = bump_revocation(emergency, [c for c in reserve if c.outpoint not in spent_by_cancel],
                                target, fee_key)
    tx = bumped.finalize()
    assert await node.rpc("sendrawtransaction", tx.to_hex()) == tx.txid
    figures["emergency bumped"] = _entry_figures(await in_mempool(node, tx.txid))

    # Everything above is mined in one block alongside the spike's own transactions.
    await confirm(node, [spend.txid, package.child.txid, second.txid, tx.txid])
    for txid in (spend.txid, second.txid, tx.txid):
        assert (await node.rpc("getrawtransaction", txid, True))["confirmations"] == 1
    assert await node.rpc("getblockcount") == height + 2
    print("\nfee spike (3/2/3, pubkeys), target " f"{target} sat/kWU = {target / 250:g} sat/vB:")
    for what, text in figures.items():
        print(f"  {what:18} {text}")


def _package_figures(core: dict, package: CpfpPackage) -> str:
    parents = ", ".join(f"weight {p.tx.weight} fee {p.fee}" for p in package.parents)
    return (f"package fee {core['fee']} sat / {core['vsize']} vB = {core['sat_per_vb']:.2f} sat/vB "
            f"(parent {parents}; child {core['child_vsize']} vB fee {package.child.fee}, "
            f"{len(package.child.tx.inputs)} input(s), "
            f"{'change' if package.child.tx.outputs[0].value else 'OP_RETURN'})")


def _entry_figures(entry: dict) -> str:
    fee = sats(entry["fees"]["base"])
    return f"fee {fee} sat / {entry['vsize']} vB = {fee / entry['vsize']:.2f} sat/vB, weight {entry['weight']}"


async def test_a_package_core_refuses_is_reported_with_its_reason(spiked: Spike) -> None:
    node = spiked.node
    p = make_participants("pubkeys")
    d = p.deployment
    vault = await fund(node, d.deposit_address(), DEPOSIT_SATS)
    await confirm(node, [vault.outpoint.txid])
    unvault = p.sign(build_vault_transactions(d, vault).unvault)
    # A child at 253 sat/kWU cannot lift its parent over a 10 sat/vB minimum.
    package = build_cpfp(d, [CpfpParent.of(unvault)], [], 253)
    with pytest.raises(PackageRejected) as err:
        await submit_cpfp(node, p, package)
    assert "mempool min fee not met" in str(err.value), err.value
    print(f"\nrefused package: {err.value}")
