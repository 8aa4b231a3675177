"""A manager's spend: pay an address from the active vaults.

    python examples/spend.py wallet.toml ADDRESS SATS [OUTPOINT ...]

Without outpoints it takes active vaults, largest first, until they cover SATS. It
waits for every watchtower's acceptance and every cosigner's signature, broadcasts the
unvaults, waits out the csv, broadcasts the spend and prints its txid. Run it again
with the same vaults to resume an interrupted spend.
"""

import argparse
import asyncio
import sys

from revault.wallet import Wallet
from revault.wallet_flows import FlowError


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("address")
    parser.add_argument("sats", type=int)
    parser.add_argument("outpoints", nargs="*")
    args = parser.parse_args()
    async with Wallet.open(args.config) as w:
        outpoints = args.outpoints
        if not outpoints:
            active = sorted((v for v in await w.vaults() if v.state == "active"),
                            key=lambda v: -v.value)
            total = 0
            for vault in active:
                if total > args.sats:
                    break
                outpoints.append(vault.outpoint)
                total += vault.value
        if not outpoints:
            print("no active vault to spend", file=sys.stderr)
            return 1
        try:
            txid = await w.spend(outpoints, {args.address: args.sats})
        except FlowError as e:
            print(f"spend failed: {e}", file=sys.stderr)
            return 1
        print(txid)
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
