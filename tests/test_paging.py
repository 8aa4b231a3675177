"""Cursors and fair pages (revault/paging.py), driven without a store."""

from __future__ import annotations

import random

import pytest

from revault.paging import (
    MAX_CURSOR_CHARS, MAX_CURSOR_STREAMS, Cursor, CursorError, Stream, fill_page,
    merge_streams, stream_name,
)

EPOCH = "0123456789abcdef"


class Log:
    """A store in miniature: items numbered in commit order, a replaced one anew."""

    def __init__(self):
        self.seq = 0
        self.items: dict[str, tuple[int, str]] = {}   # key -> (seq, submitter name)

    def put(self, key: str, submitter: str) -> None:
        self.seq += 1
        self.items[key] = (self.seq, submitter)

    def streams(self, cursor: Cursor, fetch: int) -> list[Stream]:
        by_name: dict[str, list] = {}
        for key, (seq, name) in self.items.items():
            if seq > cursor.start_of(name):
                by_name.setdefault(name, []).append((seq, key))
        streams = []
        for name, items in by_name.items():
            items.sort()
            streams.append(Stream(name, items[:fetch], more=len(items) > fetch))
        return streams


def page(log: Log, cursor: Cursor, budget: int, fetch: int = 1000, size=lambda key: 10):
    result = fill_page(cursor, log.streams(cursor, fetch), size, budget)
    return result.items, result.cursor


def test_cursor_text_round_trips_and_refuses_garbage():
    c = Cursor(EPOCH, 0x1f, (("00" * 8, 0x20), ("ff" * 8, 0x31)))
    assert Cursor.parse(str(c), EPOCH) == c
    assert Cursor.parse(None, EPOCH) == Cursor(EPOCH)
    # Another database's cursor starts over instead of hiding everything below it.
    assert Cursor.parse(str(c), "f" * 16) == Cursor("f" * 16)
    for bad in ("", "x", f"{EPOCH}.", f"{EPOCH}.1.{'00' * 8}:1",      # position <= watermark
                f"{EPOCH}.2.{'ff' * 8}:3.{'00' * 8}:4",                # not sorted
                f"{EPOCH}.{'f' * 17}", f"{EPOCH}.1" + "0" * MAX_CURSOR_CHARS, f"{EPOCH}.A"):
        with pytest.raises(CursorError):
            Cursor.parse(bad, EPOCH)


def test_everything_reachable_in_storage_order_then_only_new():
    log = Log()
    for i in range(50):
        log.put(f"k{i}", "aa" * 8)
    seen, cursor = [], Cursor(EPOCH)
    for _ in range(20):
        items, cursor = page(log, cursor, budget=2 + 11 * 7)
        seen += items
        if not items:
            break
    assert seen == [f"k{i}" for i in range(50)]
    assert page(log, cursor, 1000)[0] == []
    log.put("k3", "aa" * 8)  # replaced: listed again, as new
    log.put("new", "bb" * 8)
    assert page(log, cursor, 1000)[0] == ["k3", "new"]


def test_a_flood_from_one_submitter_does_not_push_others_out():
    log = Log()
    for i in range(400):
        log.put(f"flood{i}", "aa" * 8)
    log.put("honest", "bb" * 8)
    items, cursor = page(log, Cursor(EPOCH), budget=2 + 11 * 10)
    assert "honest" in items and len(items) == 10
    # The flood is still all reachable afterwards, in order.
    rest = []
    while True:
        more, cursor = page(log, cursor, budget=2 + 11 * 50)
        if not more:
            break
        rest += more
    assert [i for i in items if i != "honest"] + rest == [f"flood{i}" for i in range(400)]


def test_the_first_item_always_fits_so_a_poller_progresses():
    log = Log()
    log.put("big", "aa" * 8)
    log.put("small", "bb" * 8)
    sizes = {"big": 90, "small": 10}
    items, cursor = page(log, Cursor(EPOCH), budget=100, size=sizes.get)
    assert items == ["big"]
    assert page(log, cursor, 100, size=sizes.get)[0] == ["small"]


def test_cursor_tracks_a_bounded_number_of_submitters():
    log = Log()
    for s in range(MAX_CURSOR_STREAMS + 10):
        log.put(f"a{s}", f"{s:016x}")
        log.put(f"b{s}", f"{s:016x}")
    seen, cursor = [], Cursor(EPOCH)
    while True:
        items, cursor = page(log, cursor, budget=10_000)
        assert len(cursor.positions) <= MAX_CURSOR_STREAMS
        assert len(str(cursor)) <= MAX_CURSOR_CHARS
        if not items:
            break
        seen += items
    assert sorted(seen) == sorted(log.items)


@pytest.mark.parametrize("seed", range(30))
def test_random_interleaving_reaches_every_item_exactly_once_per_version(seed):
    """Writers, replacements and pages interleaved at random, fetches cut short: every
    version of every item is listed exactly once, each submitter in storage order."""
    rng = random.Random(seed)
    log = Log()
    names = [f"{i:016x}" for i in range(rng.randint(1, 6))]
    cursor, listed, written = Cursor(EPOCH), [], []
    for _ in range(300):
        if rng.random() < 0.6:
            key = f"k{rng.randint(0, 60)}"
            log.put(key, rng.choice(names))
            written.append((key, log.seq))
        else:
            streams = log.streams(cursor, fetch=rng.randint(1, 5))
            result = fill_page(cursor, streams, lambda key: 10, rng.choice([12, 40, 200]))
            listed += [(key, log.items[key][0]) for key in result.items]
            cursor = result.cursor
    while True:
        result = fill_page(cursor, log.streams(cursor, 3), lambda key: 10, 40)
        if not result.items:
            break
        listed += [(key, log.items[key][0]) for key in result.items]
        cursor = result.cursor
    # Each listed version is listed once; every version still current was listed.
    assert len(listed) == len(set(listed))
    current = {(key, seq) for key, (seq, _) in log.items.items()}
    assert current <= set(listed)
    # Within one submitter, versions come in storage order.
    for name in names:
        mine = [seq for key, seq in listed if any(
            seq == s and name == log_name for k2, (s, log_name) in log.items.items())]
        assert mine == sorted(mine)


def test_merge_streams_keeps_storage_order_and_cuts_at_the_shortest_fetch():
    name = stream_name(b"\x01" * 32)
    a = Stream(name, [(1, "a1"), (5, "a5")], more=True)
    b = Stream(name, [(2, "b2"), (3, "b3"), (9, "b9")], more=False)
    [merged] = merge_streams([a, b])
    assert merged.items == [(1, "a1"), (2, "b2"), (3, "b3"), (5, "a5")] and merged.more
