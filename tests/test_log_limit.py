"""LimitedLog: a flood of refusals becomes a few lines and one count per window."""

import logging

from revault.log_limit import LimitedLog


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_one_summary_per_window(caplog):
    caplog.set_level(logging.INFO, logger="t")
    clock = Clock()
    limited = LimitedLog(logging.getLogger("t"), window=60, burst=2, clock=clock)
    for i in range(1000):
        limited.log(logging.INFO, "junk", "refused handshake from %s: %s", f"10.0.0.{i % 9}",
                    "no key")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused handshake from 10.0.0.0: no key",
                     "refused handshake from 10.0.0.1: no key"]
    clock.now += 61
    limited.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[2] == ("refused handshake from 10.0.0.0: no key (and 998 more like it in "
                        "the last 61 s, not logged one by one)")
    # A new window: its first lines are written again.
    limited.log(logging.INFO, "junk", "refused handshake from %s", "10.0.0.5")
    assert caplog.records[-1].getMessage() == "refused handshake from 10.0.0.5"


def test_topics_are_counted_apart_and_summary_keeps_the_worst_level(caplog):
    caplog.set_level(logging.INFO, logger="t")
    clock = Clock()
    limited = LimitedLog(logging.getLogger("t"), window=10, burst=1, clock=clock)
    limited.log(logging.INFO, b"peer-a", "refused for a")
    limited.log(logging.INFO, b"peer-b", "refused for b")
    limited.log(logging.WARNING, b"peer-a", "refused for a again")
    assert [r.getMessage() for r in caplog.records] == ["refused for a", "refused for b"]
    clock.now += 10
    limited.log(logging.INFO, b"peer-a", "later")   # the next event also ends the window
    summary = caplog.records[2]
    assert summary.levelno == logging.WARNING
    assert summary.getMessage().startswith("refused for a again (and 1 more")
    assert caplog.records[3].getMessage() == "later"


def test_disabled_level_costs_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="t")
    limited = LimitedLog(logging.getLogger("t"), burst=1, clock=Clock())
    for _ in range(10):
        limited.log(logging.INFO, "x", "quiet")
    limited.flush()
    assert caplog.records == []


def test_shutdown_flush_writes_every_pending_count(caplog):
    caplog.set_level(logging.INFO, logger="t")
    clock = Clock()
    limited = LimitedLog(logging.getLogger("t"), window=60, burst=1, clock=clock)
    for _ in range(5):
        limited.log(logging.INFO, "junk", "refused")
    limited.flush()                      # the window has not ended: nothing yet
    assert len(caplog.records) == 1
    limited.flush(every_window=True)
    assert caplog.records[-1].getMessage() == ("refused (and 4 more like it in the last 0 s, "
                                               "not logged one by one)")
