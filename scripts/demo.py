"""The whole system in one command (scripts/run): a local Revault deployment on regtest.

Starts a regtest Bitcoin Core, a sync server, per stakeholder a `revault-watchtower`
(with a funded fee reserve) and per manager a `revault-cosigner`, for a deployment of
3 stakeholders and 2 managers, then walks vaults through their life with the wallet
library, printing each step: deposit, secure, activate, a spend the watchtowers
approve, and an unvault nobody asked for, which the watchtowers cancel. Then it stops
everything and removes its files, or with --keep-running leaves the system up and
prints how to drive it from a script.

It reuses the launchers of the end-to-end tests (tests/support), run from a checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from revault.clients import SyncServerClient  # noqa: E402
from revault.primitives import tx_uid  # noqa: E402
from revault.transactions import Coin, Deployment, OutPoint, build_vault_transactions  # noqa: E402
from tests.support.deployment_system import HOST, start_system  # noqa: E402
from tests.support.regtest import btc, start_node  # noqa: E402

DEPOSIT = 5_000_000
SPEND = 1_500_000
START = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {text}", flush=True)


async def wait_for(check, what: str, timeout: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.1)


async def walk(system, node) -> None:
    d = Deployment.from_dict(system.deployment)
    stakeholders = [p.wallet() for p in system.stakeholders]
    manager = system.managers[0].wallet()
    for w in [*stakeholders, manager]:
        await w.start()
    try:
        height = await node.rpc("getblockcount")
        say(f"deployment: 3 stakeholders, 2 managers (1 needed), 2 cosigners, "
            f"unvault_csv {d.unvault_csv}; chain at height {height}")
        address = await stakeholders[0].deposit_address()
        say(f"deposit address (wsh 3-of-3 stakeholders): {address}")
        outpoints = []
        for _ in range(2):
            txid = await node.rpc("sendtoaddress", address, btc(DEPOSIT),
                                  wallet=node.MINER_WALLET)
            outpoints.append(await _outpoint(node, txid, address))
        block = node.mine(1)[0]
        height = await node.rpc("getblockcount")
        for o in outpoints:
            say(f"deposit {o}: {DEPOSIT} sat, confirmed at height {height} ({block[:16]}...)")
        for w in stakeholders:
            vaults = {v.outpoint: v.state for v in await w.vaults()}
            assert all(vaults[o] == "funded" for o in outpoints)
        say("every stakeholder's wallet sees both vaults: funded")

        for o in outpoints:
            await asyncio.gather(*(w.secure(o) for w in stakeholders))
            txs = _chain(d, o)
            for i, w in enumerate(stakeholders):
                say(f"secure {o[:16]}...: stakeholder{i} signed cancel {txs.cancel.txid[:16]}..., "
                    f"emergency {txs.emergency.txid[:16]}..., unvault-emergency "
                    f"{txs.unvault_emergency.txid[:16]}...; its watchtower acked all three")
        for o in outpoints:
            await asyncio.gather(*(w.activate(o) for w in stakeholders))
            say(f"activate {o[:16]}...: all 3 stakeholders shared their unvault signature "
                f"(unvault {_chain(d, o).unvault.txid[:16]}...)")
        states = {v.outpoint: v.state for v in await manager.vaults()}
        say(f"manager0 sees: {', '.join(f'{o[:16]}...={states[o]}' for o in outpoints)}")

        payee = system.payee
        say(f"manager0 spends {SPEND} sat of vault {outpoints[0][:16]}... to {payee} "
            f"(the watchtowers' policy allows this address)")
        spend = asyncio.ensure_future(manager.spend([outpoints[0]], {payee: SPEND}))
        unvault = _chain(d, outpoints[0]).unvault.txid
        await wait_for(lambda: _in_mempool(node, unvault), "unvault broadcast")
        await _print_opinions(system, outpoints[0])
        say(f"cosigners signed; unvault {unvault} broadcast; mining {d.unvault_csv} "
            "blocks for the csv")
        while not spend.done():
            node.mine(1)
            await asyncio.wait([spend], timeout=0.3)
        txid = spend.result()
        node.mine(1)
        tx = await node.rpc("getrawtransaction", txid, True)
        labels = {d.cpfp_address(0): "CPFP", payee: "payee", d.deposit_address(0): "change"}
        outputs = ", ".join(f"{labels.get(o['scriptPubKey'].get('address'), '?')} "
                            f"{round(o['value'] * 100_000_000)} sat" for o in tx["vout"])
        say(f"spend {txid} confirmed at height {await node.rpc('getblockcount')}: {outputs}")

        txs = _chain(d, outpoints[1])
        await manager._restore([txs.unvault])
        await node.rpc("sendrawtransaction", txs.unvault.finalize().to_hex())
        say(f"someone broadcasts the unvault {txs.unvault.txid} of vault "
            f"{outpoints[1][:16]}... with no spend request (stolen managers' keys?)")
        await wait_for(lambda: _spent_by_cancel(node, txs), "a watchtower's cancel")
        cancel = await _spender(node, f"{txs.unvault.txid}:0")
        say(f"the watchtowers cancel it: {cancel} in the mempool, paying back to the "
            "deposit script")
        node.mine(1)
        say(f"cancel confirmed at height {await node.rpc('getblockcount')}")
        states = {v.outpoint: v.state for v in await stakeholders[0].vaults()}
        for o, state in states.items():
            say(f"vault {o}: {state}")
    finally:
        for w in [*stakeholders, manager]:
            await w.close()


def _chain(d: Deployment, outpoint: str):
    txid, vout = outpoint.split(":")
    return build_vault_transactions(d, Coin(OutPoint(txid, int(vout)), DEPOSIT, 0))


async def _outpoint(node, txid: str, address: str) -> str:
    tx = await node.rpc("getrawtransaction", txid, True)
    [vout] = [o["n"] for o in tx["vout"] if o["scriptPubKey"].get("address") == address]
    return f"{txid}:{vout}"


async def _in_mempool(node, txid: str) -> bool:
    return txid in await node.rpc("getrawmempool")


async def _spender(node, outpoint: str) -> str | None:
    txid, vout = outpoint.split(":")
    [entry] = await node.rpc("gettxspendingprevout", [{"txid": txid, "vout": int(vout)}])
    return entry.get("spendingtxid")


async def _spent_by_cancel(node, txs) -> bool:
    return await _spender(node, f"{txs.unvault.txid}:0") is not None


async def _print_opinions(system, outpoint: str) -> None:
    manager = system.managers[0]
    async with await SyncServerClient.connect(HOST, system.sync.port, manager.noise.private,
                                              system.sync_noise.public) as sync:
        result = await sync.get_spend_opinions(tx_uid(outpoint.split(":")[0]))
    for op in result.opinions:
        verdict = "ACCEPTED" if op.accepted else "REFUSED"
        say(f"watchtower {op.pubkey[:16]}... {verdict} spend {op.txid[:16]}...: "
            f"{op.reason or '(no reason given)'}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the system up at the end and say how to drive it")
    parser.add_argument("--dir", type=Path, help="where to put everything (default: a "
                        "temporary directory, removed at the end)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="revault-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    say(f"starting regtest bitcoind in {root / 'bitcoind'}")
    node = start_node(root / "bitcoind")
    system = None
    try:
        payee = await node.rpc("getnewaddress", wallet=node.MINER_WALLET)
        say("starting the sync server, 3 watchtowers and 2 cosigners")
        system = await start_system(root / "deployment", node,
                                    policies=[{"allowed_addresses": [payee]}] * 3)
        system.payee = payee
        say(f"sync server on {HOST}:{system.sync.port}; watchtowers on "
            + ", ".join(str(t.port) for t in system.watchtowers) + "; cosigners on "
            + ", ".join(str(c.port) for c in system.cosigners))
        await walk(system, node)
        if args.keep_running:
            # Handlers first: whoever reads the instructions may signal at once.
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            _instructions(system, node, root)
            await stop.wait()  # Ctrl-C or SIGTERM, then everything is stopped below
        return 0
    finally:
        if system is not None:
            system.stop_all()
        node.stop()
        if args.dir is None and not args.keep_running:
            shutil.rmtree(root, ignore_errors=True)
        say("stopped everything" + ("" if args.dir or args.keep_running
                                     else " and removed its files"))


def _instructions(system, node, root: Path) -> None:
    print(f"""
The system is up (Ctrl-C or SIGTERM stops it; its files stay). Each participant has a wallet config:
""" + "\n".join(f"  {p.name}: {p.config_path}" for p in system.stakeholders + system.managers[
        len([m for m in system.managers if m in system.stakeholders]):]) + f"""

Drive it from a script, e.g. secure every deposit as stakeholder0:

  .venv/bin/python examples/secure_deposits.py {system.stakeholders[0].config_path} --once

or from Python:

  from revault.wallet import Wallet
  async with Wallet.open("{system.stakeholders[0].config_path}") as w:
      print(await w.deposit_address())
      print(await w.vaults())

Mine blocks with:
  {node.bin_dir / 'bitcoin-cli'} -datadir={node.datadir} -generate 1
Everything lives in {root}.
""", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(0)
