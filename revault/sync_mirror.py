"""The spend requests and opinions of a SQLite sync store, held in memory as committed.

Pollers ask for them far more often than they change: every watchtower polls
`get_spend_requests`, every manager `get_spend_opinions`. Read from SQLite, each poll
ran its queries and rebuilt every row it listed (under the bench's mixed load, 14% of
the server's busy time went to those two reads' SQL). The mirror holds those rows as built
items, in sequence order, and answers the same reads with the same result
(tests/test_sync_mirror.py holds it to the SQL plans of revault/sync_rules.py, which
stay the one statement of the rules: writes still run them, and the mirror only
follows what they stored).

- It follows commits, never writes in flight: a write plan returns what it stored
  (`sync_rules.Stored` or `Refreshed`), the store collects those per batch and applies
  them once the batch's COMMIT returned (`GroupCommitWriter`'s after_batch), before any
  caller resumes. A batch that fails changes nothing here.
- Expired rows stay until the store's purge has deleted them from the file, and reads
  filter them with the same cutoff as SQL's.
- It is bounded: past `budget` bytes (the rows' text plus an estimate of their objects)
  it empties itself and the store reads SQLite again, as it did before; each purge
  tries to load it again, a chunk of rows per turn of the event loop, and stops as
  soon as the budget is passed.

One process only: with PostgreSQL other processes write too, and reads stay in SQL.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from bisect import bisect_left, bisect_right
from operator import itemgetter
from typing import Iterator

from revault.paging import Cursor, Stream, stream_name
from revault.sync_rules import (
    OPINION_COLUMNS, REQUEST_COLUMNS, Refreshed, Rules, Stored, StoredOpinion,
    StoredSpendRequest, stored_opinion, stored_request, streams_of_rows,
)

__all__ = ["Mirror", "DEFAULT_BUDGET", "LOAD_CHUNK", "ROW_BYTES"]

log = logging.getLogger("revault.sync_mirror")

DEFAULT_BUDGET = 64 * 2**20
# Rows read per turn of the event loop while loading: ~20 ms of the loop each here
# (a full 64 MiB load took 0.4 s in one go).
LOAD_CHUNK = 2_000
# What one row costs besides its text: the item's tuple, its strings' headers, its key,
# its entries in the dicts and lists below. Measured with tracemalloc over 20,000 rows:
# ~330 bytes for a spend request; ~1,070 for an opinion when each is alone in its vault
# (the vault's own index counted in), the most an opinion row can cost.
ROW_BYTES = 1_100

# A mirrored row: (seq, submitter, item, stored_at), the first two as streams_of_rows
# reads them.
_ITEM = itemgetter(2)


class _InSequence:
    """Rows in sequence-number order: the rows after a number in logarithmic time.

    Sequence numbers only grow (sync_rules numbers writes in commit order), so a new row
    goes at the end; a removed one leaves its number in `_numbers` until they are
    compacted, when more than half of them are gone."""

    __slots__ = ("_numbers", "rows")

    def __init__(self) -> None:
        self._numbers: list[int] = []
        self.rows: dict[int, tuple] = {}

    def add(self, row: tuple) -> None:
        seq = row[0]
        numbers = self._numbers
        if not numbers or seq > numbers[-1]:
            numbers.append(seq)
        else:
            # A write kept aside during a load (Mirror.load) comes after rows numbered
            # above it, and may be applied a second time: then its number can still be
            # listed, left by the removal of the row it replaces.
            i = bisect_left(numbers, seq)
            if i == len(numbers) or numbers[i] != seq:
                numbers.insert(i, seq)
        self.rows[seq] = row

    def remove(self, seq: int) -> None:
        del self.rows[seq]
        if len(self._numbers) > 2 * len(self.rows) + 32:
            rows = self.rows
            self._numbers = [n for n in self._numbers if n in rows]

    def after(self, seq: int) -> Iterator[tuple]:
        """The rows numbered above `seq`, ascending."""
        rows = self.rows
        numbers = self._numbers
        for i in range(bisect_right(numbers, seq), len(numbers)):
            row = rows.get(numbers[i])
            if row is not None:
                yield row


class Mirror:
    """The rows `SqliteSyncStore` lists, in memory; `active` says whether it holds them."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self.active = False
        self._loading = False
        self._held_aside: list = []     # writes committed while loading
        self._clear()

    def _clear(self) -> None:
        self.bytes = 0
        self._requests = _InSequence()
        self._requests_by_key: dict[tuple, tuple] = {}
        self._requests_by_submitter: dict[bytes, _InSequence] = {}
        self._opinions_by_key: dict[tuple, tuple] = {}
        self._opinions_by_vault: dict[str, _InSequence] = {}

    # --- following the store ----------------------------------------------------------

    async def load(self, db: sqlite3.Connection, chunk: int = LOAD_CHUNK) -> bool:
        """Read every row from `db` (live or not yet purged), `chunk` rows per turn of the
        event loop so that a large load never stalls the other clients for long; False,
        and empty, if they do not fit in the budget.

        Writes go on meanwhile: what they commit is kept aside and applied once every
        row is read. A row read in one chunk and changed before the load ends is
        changed again by that; a row changed before its chunk is read comes in changed;
        applying a write twice leaves the row as it was (a row is replaced by key, and
        a refresh sets its age). Reads go to SQLite until the load ends.
        """
        self.active = False
        self._clear()
        self._loading = True
        try:
            for table, columns in (("spend_requests", REQUEST_COLUMNS),
                                   ("opinions", OPINION_COLUMNS)):
                after = 0
                while True:
                    rows = db.execute(f"SELECT {columns} FROM {table} WHERE seq > ? "
                                      f"ORDER BY seq LIMIT ?", (after, chunk)).fetchall()
                    for row in rows:
                        self._store(Stored(table, row))
                        if not self._loading:
                            return False    # past the budget: _grow emptied it
                    if len(rows) < chunk:
                        break
                    after = rows[-1][0]
                    await asyncio.sleep(0)
            self.active = True
            held_aside, self._held_aside = self._held_aside, []
            for effect in held_aside:
                self.apply(effect)
        finally:
            self._loading = False
            self._held_aside = []
        if self.active:
            log.info("%d spend requests and %d opinions held in memory (%d KiB)",
                     len(self._requests_by_key), len(self._opinions_by_key), self.bytes >> 10)
        return self.active

    def apply(self, effect: object) -> None:
        """Follow one committed write (a write plan's result); others are ignored."""
        if not self.active:
            if self._loading:
                self._held_aside.append(effect)
            return
        if isinstance(effect, Stored):
            self._store(effect)
        elif isinstance(effect, Refreshed):
            try:
                self._refresh(effect)
            except KeyError:
                # A refreshed row is a live row, so it is here, unless this copy has
                # gone wrong: then the reads go back to SQLite rather than miss rows.
                log.error("sync mirror: refreshed row missing from memory; reading "
                          "spend requests and opinions from the database until the "
                          "next purge reloads them")
                self.active = False
                self._clear()

    def drop_expired(self, rules: Rules) -> None:
        """Forget the rows expired at `rules.now`, once the purge deleted them from the file."""
        if not self.active:
            return
        cutoff = rules.cutoff("spend_requests")
        for key, row in list(self._requests_by_key.items()):
            if row[3] <= cutoff:
                self._remove_request(key)
        cutoff = rules.cutoff("opinions")
        for key, row in list(self._opinions_by_key.items()):
            if row[3] <= cutoff:
                self._remove_opinion(key)

    def _store(self, effect: Stored) -> None:
        r = effect.row
        if effect.table == "spend_requests":
            key = (r[2], r[3])
            self._remove_request(key)
            item = stored_request(r)
            row = (r[0], bytes(r[1]), item, item.stored_at)
            self._requests_by_key[key] = row
            self._requests.add(row)
            self._requests_by_submitter.setdefault(row[1], _InSequence()).add(row)
            self._grow(len(item.transaction))
        else:
            key = (r[2], r[3], r[4])
            self._remove_opinion(key)
            item = stored_opinion(r)
            row = (r[0], bytes(r[1]), item, item.stored_at)
            self._opinions_by_key[key] = row
            self._opinions_by_vault.setdefault(item.vault_id, _InSequence()).add(row)
            self._grow(len(item.reason) + len(item.sig))

    def _refresh(self, effect: Refreshed) -> None:
        if effect.table == "spend_requests":
            seq, submitter, item, _ = self._requests_by_key[effect.key]
            row = (seq, submitter, item._replace(stored_at=effect.stored_at), effect.stored_at)
            self._requests_by_key[effect.key] = row
            self._requests.rows[seq] = row
            self._requests_by_submitter[submitter].rows[seq] = row
        else:
            seq, submitter, item, _ = self._opinions_by_key[effect.key]
            row = (seq, submitter, item._replace(stored_at=effect.stored_at), effect.stored_at)
            self._opinions_by_key[effect.key] = row
            self._opinions_by_vault[item.vault_id].rows[seq] = row

    def _remove_request(self, key: tuple) -> None:
        row = self._requests_by_key.pop(key, None)
        if row is None:
            return
        self._requests.remove(row[0])
        of_submitter = self._requests_by_submitter[row[1]]
        of_submitter.remove(row[0])
        if not of_submitter.rows:
            del self._requests_by_submitter[row[1]]
        self.bytes -= len(row[2].transaction) + ROW_BYTES

    def _remove_opinion(self, key: tuple) -> None:
        row = self._opinions_by_key.pop(key, None)
        if row is None:
            return
        of_vault = self._opinions_by_vault[key[0]]
        of_vault.remove(row[0])
        if not of_vault.rows:
            del self._opinions_by_vault[key[0]]
        self.bytes -= len(row[2].reason) + len(row[2].sig) + ROW_BYTES

    def _grow(self, text: int) -> None:
        self.bytes += text + ROW_BYTES
        if self.bytes > self.budget:
            log.warning("spend requests and opinions take more than %d MiB: reading them "
                        "from the database until a purge makes room", self.budget >> 20)
            self.active = False
            self._loading = False
            self._clear()

    # --- reads: the results of sync_rules.Rules.spend_request_streams and opinion_streams

    def spend_request_streams(self, cursor: Cursor, fetch: int,
                              rules: Rules) -> list[Stream[StoredSpendRequest]]:
        cutoff = rules.cutoff("spend_requests")
        rows = []
        for row in self._requests.after(cursor.watermark):
            if row[3] > cutoff:
                rows.append(row)
                if len(rows) > fetch:
                    break
        if len(rows) <= fetch:
            return streams_of_rows(cursor, rows, _ITEM)
        # More unseen than one fetch: each manager's own, as the plan's per-submitter
        # queries read them, so that one manager's flood cannot take the others' turn.
        streams = []
        for submitter, of_submitter in self._requests_by_submitter.items():
            name = stream_name(submitter)
            rows = []
            for row in of_submitter.after(cursor.start_of(name)):
                if row[3] > cutoff:
                    rows.append(row)
                    if len(rows) > fetch:
                        break
            if rows:
                streams.append(Stream(name, [(row[0], row[2]) for row in rows[:fetch]],
                                      more=len(rows) > fetch))
        return streams

    def opinion_streams(self, vault_id: str, cursor: Cursor,
                        rules: Rules) -> list[Stream[StoredOpinion]]:
        of_vault = self._opinions_by_vault.get(vault_id)
        if of_vault is None:
            return []
        cutoff = rules.cutoff("opinions")
        return streams_of_rows(cursor, [row for row in of_vault.after(cursor.watermark)
                                        if row[3] > cutoff], _ITEM)
