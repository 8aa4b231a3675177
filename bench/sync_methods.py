"""What each sync-server method costs in-process, against the echo handler on the same footing.

    .venv/bin/python bench/sync_methods.py            # a few seconds
    .venv/bin/python bench/sync_methods.py --quick    # under a second

No sockets and no Noise: the requests of bench/sync_server.py's mixed workload (its
`Workload`, so the same rows, re-sends and cursors) go straight to the sync server's
`Dispatcher.handle`, on a real SQLite store in a temporary directory, `CLIENTS` calls of
one method at a time, the way a loop turn under load meets them (the writes of a turn
share one group COMMIT). Measured for each method: CPU time of the event-loop thread
per call (what bounds a one-process server), and of the whole process (the COMMIT's
thread too). The baseline is the echo daemon's handler (tests/support/echo_daemon.py)
given the same params in the same way: the ratio is what the method's own work
(validation, signature checks, store) multiplies a request's dispatch by. Requests are
encoded and responses decoded outside the measured time; the task each call runs in is
inside it, as it is in the baseline.

bench/sync_server.py measures the whole path under load; this one says where, by method,
the server's own time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.sync_server import Workload  # noqa: E402
from revault.rpc import Caller, decode_response, encode_request  # noqa: E402
from revault.sync_rules import Quotas, Retention  # noqa: E402
from revault.sync_server import SyncServer, SyncServerConfig  # noqa: E402
from revault.sync_store import SqliteSyncStore  # noqa: E402
from tests.support.echo_daemon import EchoConfig, EchoService  # noqa: E402

CLIENTS = 100
IDENTITIES = 8  # peer keys, each in all three roles, as in bench/sync_server.py
ALL_ROLES = frozenset({"stakeholder", "manager", "watchtower"})


class Totals:
    def __init__(self) -> None:
        self.loop_thread = self.process = 0.0
        self.calls = 0

    def add(self, loop_thread: float, process: float, calls: int) -> None:
        self.loop_thread += loop_thread
        self.process += process
        self.calls += calls


async def run(rounds: int, warmup: int) -> tuple[dict[str, Totals], Totals]:
    keys = [os.urandom(32) for _ in range(IDENTITIES)]
    directory = tempfile.TemporaryDirectory(prefix="revault-bench-methods-")
    store = await SqliteSyncStore.open(Path(directory.name) / "sync-server.sqlite3")
    config = SyncServerConfig(common=None, stakeholders=keys, managers=keys, watchtowers=keys,
                              purge_interval=3600, retention=Retention(), quotas=Quotas())
    server = SyncServer(config, store)
    echo = EchoService(EchoConfig(common=None, clients=keys))
    callers = [Caller(keys[i % IDENTITIES], ALL_ROLES) for i in range(CLIENTS)]
    echo_callers = [Caller(keys[i % IDENTITIES], frozenset({"client"}))
                    for i in range(CLIENTS)]
    workloads = [Workload(i) for i in range(CLIENTS)]
    next_n = list(range(CLIENTS))

    def next_params(i: int, method: str) -> dict:
        """The params of client i's next request of `method` in its cycle."""
        while True:
            m, params = workloads[i].request(next_n[i])
            next_n[i] += 1
            if m == method:
                return params

    async def measure(dispatcher, who: list[Caller], requests: list[bytes]) -> tuple:
        responses: list[bytes | None] = [None] * len(requests)

        async def one(i: int) -> None:
            responses[i] = await dispatcher.handle(who[i], requests[i])

        thread, process = time.thread_time(), time.process_time()
        await asyncio.gather(*(one(i) for i in range(len(requests))))
        return time.thread_time() - thread, time.process_time() - process, responses

    totals = {method: Totals() for method in Workload.METHODS}
    echo_totals = Totals()
    try:
        for round_ in range(warmup + rounds):
            for method in Workload.METHODS:
                params = [next_params(i, method) for i in range(CLIENTS)]
                thread, process, responses = await measure(
                    server.dispatcher, callers,
                    [encode_request(method, p, i) for i, p in enumerate(params)])
                for i, response in enumerate(responses):
                    answer = decode_response(response)
                    if answer.error is not None:
                        raise RuntimeError(f"{method} refused: {answer.error}")
                    workloads[i].answered(method, answer.result)
                if round_ >= warmup:
                    totals[method].add(thread, process, CLIENTS)
                # The echo handler, given the same params as this method's.
                thread, process, _ = await measure(
                    echo.dispatcher, echo_callers,
                    [encode_request("echo", p, i) for i, p in enumerate(params)])
                if round_ >= warmup:
                    echo_totals.add(thread, process, CLIENTS)
    finally:
        await server.close()
        directory.cleanup()
    return totals, echo_totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args()
    rounds, warmup = (5, 2) if args.quick else (50, 10)
    totals, echo = asyncio.run(run(rounds, warmup))
    echo_us = echo.loop_thread / echo.calls * 1e6
    print(f"sync-server methods in-process: {CLIENTS} calls of one method at a time, "
          f"{rounds} rounds of the mixed workload, SQLite in a temporary directory")
    print(f"  {'method':<22}{'loop thread':>14}{'vs echo':>10}{'process':>14}")
    for method, t in totals.items():
        us = t.loop_thread / t.calls * 1e6
        print(f"  {method:<22}{us:>11.1f} us{us / echo_us:>9.2f}x"
              f"{t.process / t.calls * 1e6:>11.1f} us")
    mean = sum(t.loop_thread / t.calls for t in totals.values()) / len(totals) * 1e6
    print(f"  {'mean of the six':<22}{mean:>11.1f} us{mean / echo_us:>9.2f}x")
    print(f"  {'echo (baseline)':<22}{echo_us:>11.1f} us{1:>9.2f}x"
          f"{echo.process / echo.calls * 1e6:>11.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
