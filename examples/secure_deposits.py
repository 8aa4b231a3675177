"""A stakeholder's loop: secure every new confirmed deposit, then activate it.

Secured and active vaults are passed to secure() again at each pass: that costs nothing
when every watchtower of the config has them, and hands them to a watchtower added to
the config since (or replacing a lost one).

    python examples/secure_deposits.py wallet.toml            # forever, every 30 s
    python examples/secure_deposits.py wallet.toml --once     # one pass, then exit

Killed at any point, it resumes where it stopped when run again: the wallet keeps
every signature and watchtower ack it got in its data_dir. Securing a vault that is
already secured only brings a newly added watchtower up to date.
"""

import argparse
import asyncio

from revault.wallet import Wallet


async def one_pass(w: Wallet, activate: bool) -> None:
    for vault in await w.vaults():
        if vault.state not in ("funded", "secured", "active") or vault.confirmations < 1:
            continue
        await w.secure(vault.outpoint)
        print(f"secured {vault.outpoint} ({vault.value} sat)", flush=True)
        if activate and vault.state != "active":
            await w.activate(vault.outpoint)
            print(f"activated {vault.outpoint}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    parser.add_argument("--activate", action="store_true",
                        help="also share the unvault signature of each secured vault")
    parser.add_argument("--interval", type=float, default=30.0)
    args = parser.parse_args()
    async with Wallet.open(args.config) as w:
        while True:
            await one_pass(w, args.activate)
            if args.once:
                return
            await asyncio.sleep(args.interval)


if __name__ == "__main__":
    asyncio.run(main())
