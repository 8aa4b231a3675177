"""What the Prometheus instrumentation costs on the hot path, against the dispatch it rides on.

    .venv/bin/python bench/metrics.py            # a few seconds
    .venv/bin/python bench/metrics.py --quick    # under a second

Measured in one process, each the best of several rounds of CPU time (the machine may be
shared): one `rpc.Dispatcher.handle` of a trivial request (JSON parse, role check,
handler, encode, and the metrics hooks inside it); the hooks alone (two clock reads and
`COMMON.request_done`, what `handle` adds per request); one commit's hook; and one scrape
of a registry holding every series a busy sync server exports (paid per scrape, on the
event loop). Prints each and the ratio of the hooks to the dispatch. End to end, a
request through Noise, the dispatcher and SQLite costs far more than this dispatch
alone (see bench/sync_server.py), so the share there is smaller still.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from revault import metrics  # noqa: E402
from revault.rpc import Caller, Dispatcher, ERROR_NAMES  # noqa: E402

SYNC_METHODS = ("sig", "get_sigs", "err_sig", "request_spend", "get_spend_requests",
                "spend_opinion", "get_spend_opinions")


class Params:
    @classmethod
    def parse(cls, obj):
        return obj


def best_of(rounds: int, count: int, run) -> float:
    """Microseconds per call: the fastest round's CPU time over `count` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        run(count)
        best = min(best, time.process_time() - start)
    return best / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, count = (5, 5_000) if args.quick else (15, 50_000)

    dispatcher = Dispatcher()

    @dispatcher.method("echo", params=Params, roles=["client"])
    async def echo(caller, params):
        return {"echo": params}

    caller = Caller(b"k" * 32, frozenset({"client"}))
    raw = b'{"jsonrpc":"2.0","method":"echo","params":{"x":1},"id":1}'
    loop = asyncio.new_event_loop()

    def dispatch(n: int) -> None:
        async def many():
            for _ in range(n):
                await dispatcher.handle(caller, raw)
        loop.run_until_complete(many())

    def hooks(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            metrics.COMMON.request_done("echo", "ok", time.perf_counter() - started)

    def commit_hook(n: int) -> None:
        for _ in range(n):
            metrics.COMMON.commit_done(0.002, 8)

    # A busy sync server's series: every method with every outcome, all buckets filled.
    for method in SYNC_METHODS:
        for outcome in ("ok", *ERROR_NAMES.values()):
            metrics.COMMON.request_done(method, outcome, 0.003)

    def scrape(n: int) -> None:
        for _ in range(n):
            metrics.scrape()

    per_dispatch = best_of(rounds, count, dispatch)
    per_hooks = best_of(rounds, count, hooks)
    per_commit = best_of(rounds, count, commit_hook)
    per_scrape = best_of(rounds, max(10, count // 500), scrape)
    size = len(metrics.scrape())
    loop.close()
    print(f"Dispatcher.handle, trivial request, hooks included: {per_dispatch:7.2f} us")
    print(f"request hooks alone (2 clock reads + request_done):  {per_hooks:7.2f} us")
    print(f"commit hook (commit_done):                            {per_commit:7.2f} us")
    print(f"one scrape, {size} bytes:                          {per_scrape:9.0f} us")
    print(f"ratio hooks / dispatch: {per_hooks / per_dispatch:.3f} "
          f"(dispatch without them: {per_dispatch - per_hooks:.2f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
