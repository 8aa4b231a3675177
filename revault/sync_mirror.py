"""What a SQLite sync store's pollers read, held in memory as committed.

Pollers ask for it far more often than it changes: every watchtower polls
`get_spend_requests`, every manager `get_spend_opinions`, every wallet `get_sigs`. Read
from SQLite, each poll ran its queries and rebuilt every row it listed (under the
bench's mixed load, 14% of the server's busy time went to the first two reads' SQL, 4%
to the third's; SQLite's page cache does not help a reader after another connection's
commit). `Mirror` holds the spend requests and opinions as built items, in sequence
order; `SignatureMirror` the signatures by tx uid. They answer the same reads with the
same results (tests/test_sync_mirror.py holds them to the SQL plans of
revault/sync_rules.py, which stay the one statement of the rules: writes still run
them, and the mirrors only follow what they stored).

- They follow commits, never writes in flight: a write plan returns what it stored
  (`sync_rules.Stored`, `Refreshed`, `Erased`), the store collects those per batch and
  applies them once the batch's COMMIT returned (`GroupCommitWriter`'s after_batch),
  before any caller resumes. A batch that fails changes nothing here.
- Expired rows stay until the store's purge has deleted them from the file, and reads
  filter them with the same cutoff as SQL's.
- Each is bounded: past `budget` bytes (the rows' text plus an estimate of their
  objects) it empties itself and the store reads SQLite again, as it did before; each
  purge tries to load it again, a chunk of rows per turn of the event loop, and stops
  as soon as the budget is passed.

One process only: with PostgreSQL other processes write too, and reads stay in SQL.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from itertools import islice
from operator import itemgetter
from typing import Iterator

from revault.paging import Cursor, Stream, stream_name
from revault.sync_rules import (
    OPINION_COLUMNS, REQUEST_COLUMNS, SIGNATURE_COLUMNS, Erased, Refreshed, Rules, Stored,
    StoredOpinion, StoredSpendRequest, stored_opinion, stored_request, streams_of_rows,
)

__all__ = ["Mirror", "SignatureMirror", "DEFAULT_BUDGET", "LOAD_CHUNK", "ROW_BYTES"]

log = logging.getLogger("revault.sync_mirror")

DEFAULT_BUDGET = 64 * 2**20
# Rows read per turn of the event loop while loading: ~20 ms of the loop each here
# (a full 64 MiB load took 0.4 s in one go).
LOAD_CHUNK = 2_000
# What one row costs besides its text: the item's tuple, its strings' headers, its key,
# its entries in the dicts and lists below. Measured with tracemalloc over 20,000 rows:
# ~330 bytes for a spend request; ~1,070 for an opinion when each is alone in its vault
# (the vault's own index counted in), the most an opinion row can cost. A signature:
# ~300 bytes when four share a tx uid, ~540 alone (SignatureMirror.ROW_BYTES).
ROW_BYTES = 1_100

# A mirrored row: (seq, submitter, item, stored_at), the first two as streams_of_rows
# reads them.
_ITEM = itemgetter(2)


def _live(rows: Iterator[tuple], cutoff: int, limit: int) -> list[tuple]:
    """The first `limit` of `rows` stored after `cutoff` (not expired)."""
    return list(islice((row for row in rows if row[3] > cutoff), limit))


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


class _InMemory(ABC):
    """Rows of some tables in memory, as committed, within a budget of bytes.

    A subclass says which rows (`_SOURCES`), how it keeps them (`_clear`, `_store`,
    `_follow` for the other kinds of writes) and what `_kind` of rows they are for the
    log; this class loads them and follows the writes."""

    # (table, a SELECT of its rows numbered above ? in that order, LIMIT ?, each row
    # preceded by its number): the rows a load reads, one chunk at a time.
    _SOURCES: tuple[tuple[str, str], ...] = ()
    _kind = "rows"
    ROW_BYTES = ROW_BYTES

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self.active = False
        self._loading = False
        self._held_aside: list = []     # writes committed while loading
        self._clear()

    @abstractmethod
    def _clear(self) -> None:
        """Hold nothing (and set `bytes` to 0)."""

    @abstractmethod
    def _store(self, effect: Stored) -> None:
        """Hold the row a write stored, if it is of these tables (through `_grow`)."""

    @abstractmethod
    def _follow(self, effect: object) -> None:
        """A committed write that is not a `Stored` row, if it concerns these rows."""

    async def load(self, db: sqlite3.Connection, chunk: int = LOAD_CHUNK) -> bool:
        """Read every row from `db` (live or not yet purged), `chunk` rows per turn of the
        event loop so that a large load never stalls the other clients for long; False,
        and empty, if they do not fit in the budget.

        Writes go on meanwhile: what they commit is kept aside and applied once every
        row is read. A row read in one chunk and changed before the load ends is
        changed again by that; a row changed before its chunk is read comes in changed;
        applying a write twice leaves the rows as they were (a row is replaced by key, a
        refresh sets its age, an erasure removes what is there). Reads go to SQLite
        until the load ends.
        """
        self.active = False
        self._clear()
        self._loading = True
        try:
            for table, select in self._SOURCES:
                after = 0
                while True:
                    rows = db.execute(select, (after, chunk)).fetchall()
                    for row in rows:
                        self._store(Stored(table, row[1:]))
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
            log.info("%s held in memory (%d KiB)", self._kind, self.bytes >> 10)
        return self.active

    def apply(self, effect: object) -> None:
        """Follow one committed write (a write plan's result); others are ignored."""
        if not self.active:
            if self._loading:
                self._held_aside.append(effect)
            return
        try:
            if isinstance(effect, Stored):
                self._store(effect)
            else:
                self._follow(effect)
        except KeyError:
            # A refreshed row is a live row, so it is here, unless this copy has gone
            # wrong: then the reads go back to SQLite rather than miss rows.
            log.error("%s in memory: a refreshed row is missing; reading them from the "
                      "database until the next purge reloads them", self._kind)
            self.active = False
            self._clear()

    def _grow(self, text: int) -> None:
        self.bytes += text + self.ROW_BYTES
        if self.bytes > self.budget:
            log.warning("%s take more than %d MiB: reading them from the database until "
                        "a purge makes room", self._kind, self.budget >> 20)
            self.active = False
            self._loading = False
            self._clear()


class Mirror(_InMemory):
    """The spend requests and opinions `SqliteSyncStore` lists, in memory; `active`
    says whether it holds them."""

    _SOURCES = (
        ("spend_requests", f"SELECT seq, {REQUEST_COLUMNS} FROM spend_requests "
                           f"WHERE seq > ? ORDER BY seq LIMIT ?"),
        ("opinions", f"SELECT seq, {OPINION_COLUMNS} FROM opinions "
                     f"WHERE seq > ? ORDER BY seq LIMIT ?"),
    )
    _kind = "spend requests and opinions"

    def _clear(self) -> None:
        self.bytes = 0
        self._requests = _InSequence()
        self._requests_by_key: dict[tuple, tuple] = {}
        self._requests_by_submitter: dict[bytes, _InSequence] = {}
        self._opinions_by_key: dict[tuple, tuple] = {}
        self._opinions_by_vault: dict[str, _InSequence] = {}

    def _follow(self, effect: object) -> None:
        if isinstance(effect, Refreshed):
            self._refresh(effect)

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
        if effect.table == "signatures":
            return
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
        self.bytes -= len(row[2].transaction) + self.ROW_BYTES

    def _remove_opinion(self, key: tuple) -> None:
        row = self._opinions_by_key.pop(key, None)
        if row is None:
            return
        of_vault = self._opinions_by_vault[key[0]]
        of_vault.remove(row[0])
        if not of_vault.rows:
            del self._opinions_by_vault[key[0]]
        self.bytes -= len(row[2].reason) + len(row[2].sig) + self.ROW_BYTES

    # --- reads: the results of sync_rules.Rules.spend_request_streams and opinion_streams

    def spend_request_streams(self, cursor: Cursor, fetch: int,
                              rules: Rules) -> list[Stream[StoredSpendRequest]]:
        cutoff = rules.cutoff("spend_requests")
        rows = _live(self._requests.after(cursor.watermark), cutoff, fetch + 1)
        if len(rows) <= fetch:
            return streams_of_rows(cursor, rows, _ITEM)
        # More unseen than one fetch: each manager's own, as the plan's per-submitter
        # queries read them, so that one manager's flood cannot take the others' turn.
        streams = []
        for submitter, of_submitter in self._requests_by_submitter.items():
            name = stream_name(submitter)
            rows = _live(of_submitter.after(cursor.start_of(name)), cutoff, fetch + 1)
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


class SignatureMirror(_InMemory):
    """The signatures `SqliteSyncStore` returns for get_sigs, in memory, by tx uid."""

    _SOURCES = (("signatures", f"SELECT rowid, {SIGNATURE_COLUMNS} FROM signatures "
                               f"WHERE rowid > ? ORDER BY rowid LIMIT ?"),)
    _kind = "signatures"
    ROW_BYTES = 576

    def _clear(self) -> None:
        self.bytes = 0
        # tx uid -> pubkey -> (signature, stored_at)
        self._by_id: dict[str, dict[str, tuple[str, int]]] = {}

    def _store(self, effect: Stored) -> None:
        if effect.table != "signatures":
            return
        tx_id, pubkey, signature, stored_at = effect.row
        of_id = self._by_id.setdefault(tx_id, {})
        replaced = of_id.get(pubkey)
        if replaced is not None:
            self.bytes -= len(replaced[0]) + self.ROW_BYTES
        of_id[pubkey] = (signature, stored_at)
        self._grow(len(signature))

    def _follow(self, effect: object) -> None:
        if isinstance(effect, Erased):
            for signature, _ in self._by_id.pop(effect.tx_id, {}).values():
                self.bytes -= len(signature) + self.ROW_BYTES

    def drop_expired(self, rules: Rules) -> None:
        """Forget the signatures expired at `rules.now`, once the purge deleted them."""
        if not self.active:
            return
        cutoff = rules.cutoff("signatures")
        for tx_id, of_id in list(self._by_id.items()):
            for pubkey, (signature, stored_at) in list(of_id.items()):
                if stored_at <= cutoff:
                    del of_id[pubkey]
                    self.bytes -= len(signature) + self.ROW_BYTES
            if not of_id:
                del self._by_id[tx_id]

    def get_signatures(self, tx_id: str, rules: Rules) -> dict[str, str]:
        """The result of sync_rules.Rules.get_signatures: live ones, by pubkey."""
        of_id = self._by_id.get(tx_id)
        if not of_id:
            return {}
        cutoff = rules.cutoff("signatures")
        return {pubkey: signature for pubkey, (signature, stored_at) in sorted(of_id.items())
                if stored_at > cutoff}
