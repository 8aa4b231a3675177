"""Cursors over what a relay holds: every pending item reachable, one frame at a time.

A store numbers each write with a sequence number that grows in commit order (a replaced
item is numbered anew), so "what a poller has seen" is a position in that order. Pages
are filled fairly: when more is pending than fits in one frame, the submitters take
turns, one item each in storage order, so one peer's flood of items cannot push another
peer's item out of every page (issue "Hostile peers": 400 small requests of one manager
used to hide everyone else's). The cursor then records, besides the position below
which everything was listed (`watermark`), how far each submitter's own items were
listed beyond it.

The cursor is opaque to clients (docs/protocol.md, "Cursors and fair pages"): a string
they pass back as `since`. Its text is `EPOCH.WATERMARK` then `.STREAM:POSITION` for each submitter
listed past the watermark, numbers in lowercase hex. EPOCH identifies the database the
positions belong to: a cursor from another database (a restored or replaced one) reads
as no cursor at all, so the poller starts again from the oldest item rather than
missing everything numbered below a stale position.

Nothing here does I/O: the store fetches the candidates (`Stream`s), `fill_page`
chooses what is listed and the next cursor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable, Generic, Sequence, TypeVar

# A cursor must fit in the response envelope next to the page it comes with.
MAX_CURSOR_CHARS = 1024
# Submitters a cursor tracks past its watermark; a page stops adding new submitters
# beyond this, so the cursor stays within MAX_CURSOR_CHARS (34 characters per entry).
MAX_CURSOR_STREAMS = 24
# Streams are named by a prefix of the submitter's key: enough to tell configured peers
# apart (finding a key that shares 8 bytes with another peer's costs 2**64 tries). Two
# submitters sharing a prefix would be paged as one stream, which stays correct (both
# in storage order) and only makes them share their turn.
STREAM_NAME_BYTES = 8
MAX_POSITION = 2**63 - 1

_CURSOR = re.compile(r"([0-9a-f]{16})\.([0-9a-f]{1,16})((?:\.[0-9a-f]{16}:[0-9a-f]{1,16})*)")

Item = TypeVar("Item")

_SEQ = itemgetter(0)  # of a (sequence number, ...) entry


class CursorError(ValueError):
    """`since` is not a cursor this server wrote."""


def stream_name(submitter: bytes) -> str:
    return submitter[:STREAM_NAME_BYTES].hex()


@dataclass(frozen=True, slots=True)
class Cursor:
    epoch: str
    watermark: int = 0
    # stream name -> position of its last listed item, for positions above the watermark
    positions: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str | None, epoch: str) -> Cursor:
        """The cursor `text`, or the start of `epoch` for None or another epoch's cursor."""
        if text is None:
            return cls(epoch)
        match = _CURSOR.fullmatch(text) if len(text) <= MAX_CURSOR_CHARS else None
        if match is None:
            raise CursorError("not a cursor from this server")
        if match.group(1) != epoch:
            return cls(epoch)
        watermark = int(match.group(2), 16)
        positions = []
        for entry in filter(None, match.group(3).split(".")):
            name, position = entry.split(":")
            positions.append((name, int(position, 16)))
        names = [name for name, _ in positions]
        if (watermark > MAX_POSITION or len(positions) > MAX_CURSOR_STREAMS
                or len(set(names)) != len(names) or names != sorted(names)
                or any(not watermark < p <= MAX_POSITION for _, p in positions)):
            raise CursorError("not a cursor from this server")
        return cls(epoch, watermark, tuple(positions))

    def __str__(self) -> str:
        return f"{self.epoch}.{self.watermark:x}" + "".join(
            f".{name}:{position:x}" for name, position in self.positions)

    def start_of(self, name: str) -> int:
        """Items of stream `name` numbered above this are not seen yet."""
        return max(self.watermark, dict(self.positions).get(name, 0))


@dataclass(slots=True)
class Stream(Generic[Item]):
    """One submitter's unseen items in storage order, as fetched by a store."""

    name: str
    items: list[tuple[int, Item]]       # (sequence number, item), ascending
    more: bool = False                  # items beyond these exist but were not fetched


def merge_streams(streams: Sequence[Stream[Item]]) -> list[Stream[Item]]:
    """One stream per name: a store fetches per submitter, and two submitters may share
    a name. Where a part was cut short by the fetch, the merge stops at that cut, so
    that `more` still means "everything after the last item"."""
    parts: dict[str, list[Stream[Item]]] = {}
    for stream in streams:
        parts.setdefault(stream.name, []).append(stream)
    merged = []
    for name, group in parts.items():
        if len(group) == 1:
            merged.append(group[0])
            continue
        items = sorted((entry for s in group for entry in s.items), key=lambda e: e[0])
        cuts = [s.items[-1][0] if s.items else -1 for s in group if s.more]
        if cuts:
            items = [entry for entry in items if entry[0] <= min(cuts)]
        merged.append(Stream(name, items, more=bool(cuts)))
    return merged


@dataclass(frozen=True, slots=True)
class Page(Generic[Item]):
    items: list[Item] = field(default_factory=list)     # in storage order
    cursor: Cursor | None = None
    left: int = 0                                       # fetched but not listed


def fill_page(cursor: Cursor, streams: Sequence[Stream[Item]], size: Callable[[Item], int],
              budget: int) -> Page[Item]:
    """What one frame lists after `cursor`: submitters in turns, each in storage order.

    `streams` has one stream per name (`merge_streams`). `size(item)` is the item's
    encoded size and `budget` what a JSON array of the page may take (brackets and
    commas included). The first item always fits (callers bound an item's size below
    the budget), so a page never comes back empty while something is pending, and a
    poller always makes progress.
    """
    tracked = {name for name, _ in cursor.positions}
    everything = [entry for s in streams for entry in s.items]
    if (sum([size(item) for _, item in everything]) + len(everything) + 1 <= budget
            and len(tracked.union([s.name for s in streams])) <= MAX_CURSOR_STREAMS):
        # All of it fits (a poller keeping up, or a short queue): no turns to take.
        if len(streams) > 1:
            everything.sort(key=_SEQ)
        return Page(items=[item for _, item in everything],
                    cursor=_advance(cursor, streams, {s.name: len(s.items) for s in streams}))
    # Round k offers every stream's k-th unlisted item; a round is served in storage
    # order. So the order of consideration is (k, seq), and each stream's listed items
    # are a prefix of its items. The page ends at the first item that does not fit.
    order = sorted((k, seq, s.name, item) for s in streams
                   for k, (seq, item) in enumerate(s.items))
    used = 2
    listed: list[tuple[int, str, Item]] = []
    heads = {s.name: 0 for s in streams}
    for _, seq, name, item in order:
        cost = size(item) + (1 if listed else 0)
        if used + cost > budget or (name not in tracked
                                    and len(tracked) >= MAX_CURSOR_STREAMS):
            break
        used += cost
        listed.append((seq, name, item))
        tracked.add(name)
        heads[name] += 1
    listed.sort(key=_SEQ)
    return Page(items=[item for _, _, item in listed],
                cursor=_advance(cursor, streams, heads),
                left=sum(len(s.items) - heads[s.name] for s in streams))


def _advance(cursor: Cursor, streams: Sequence[Stream], heads: dict[str, int]) -> Cursor:
    """The cursor after listing the first `heads[name]` items of each stream: the
    watermark moves up to the first unseen item left out (or, for a stream cut short
    by the fetch, its last fetched item)."""
    bound = MAX_POSITION
    last_listed = None
    positions = dict(cursor.positions)
    for s in streams:
        head = heads[s.name]
        if head:
            # A stream's items ascend: the last one listed is its largest.
            seq = s.items[head - 1][0]
            positions[s.name] = max(positions.get(s.name, 0), seq)
            last_listed = seq if last_listed is None else max(last_listed, seq)
        if head < len(s.items):
            bound = min(bound, s.items[head][0] - 1)
        elif s.more and s.items:
            bound = min(bound, s.items[-1][0])
        elif s.more:
            bound = min(bound, cursor.start_of(s.name))
    if last_listed is None:
        last_listed = cursor.watermark
    watermark = max(cursor.watermark, min(bound, last_listed))
    kept = tuple(sorted((name, p) for name, p in positions.items() if p > watermark))
    return Cursor(cursor.epoch, watermark, kept)
