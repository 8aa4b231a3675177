"""The sync server's storage rules, once, for every backend.

Each write and each paged read is a *plan*: a generator that yields SQL steps (`Query`
for rows, `Execute` for a row count) and receives their results, and returns the
outcome. Plans do no I/O; a backend drives them, SQLite synchronously on its own
connection, PostgreSQL through asyncpg (`?` placeholders become `$n`). So the quotas,
the shares, the bindings and the sequence numbers mean the same thing whichever
database holds the rows, and are tested against both.

The rules:

- Quotas (`Quotas`): a new row must fit its table's total, its group (the signatures
  of one tx uid, the requests or opinions of one vault) and its submitter's own bound.
  Within a group each peer has its own share, `group quota // peers of that role`
  (at least 1), so one peer can fill only its own part of a vault or a tx uid (issue
  "Hostile peers", 5). Replacing one's own row is always allowed.
- Bindings (docs/protocol.md, "Roles"): a pubkey's signature for a tx uid belongs to the Noise
  key that first posted it until `err_sig` erases it (or it expires); an opinion key
  belongs to the first watchtower that used it while any of its opinions is kept.
  Another peer's attempt to replace either raises `Taken`.
- What was stored: a write plan returns it (`Stored`; `Refreshed` for the same spend
  request or opinion sent again; `Erased` for err_sig), for a backend that also keeps
  the rows in memory (revault/sync_mirror.py); the others ignore it.
- Sequence numbers: every stored or replaced spend request and opinion takes the next
  number of its table's sequence, inside the write transaction. Writers are serialized
  (SQLite has one writer; PostgreSQL takes one lock per transaction), so numbers grow in
  commit order and a reader that sees number N sees everything below it: what cursors
  (revault/paging.py) rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator, NamedTuple

from revault import metrics
from revault.errors import Refused
from revault.paging import Cursor, Stream, stream_name

DAY = 86_400

TABLES = ("signatures", "spend_requests", "opinions")
PURGE_BATCH = 5_000  # rows per purge write: bounds how long one write holds the writer


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind of row is kept after it was last written, in seconds."""

    # A vault's revocation signatures are gathered within hours of the deposit; a month
    # covers stakeholders who are away for a while, and every wallet keeps its own copy.
    signatures: int = 30 * DAY
    # A spend request is about an unvault that happens within days; a week is generous.
    spend_requests: int = 7 * DAY
    spend_opinions: int = 7 * DAY

    def of(self, table: str) -> int:
        return getattr(self, _RETENTION_FIELDS[table])


@dataclass(frozen=True, slots=True)
class Quotas:
    """Upper bounds on stored rows; the names are the config keys under [quotas]."""

    signatures_per_id: int = 100            # pubkeys with a signature for one tx uid
    signatures_per_peer: int = 20_000       # signatures one stakeholder has stored
    total_signatures: int = 1_000_000
    spend_requests_per_vault: int = 16      # distinct spend transactions for one vault
    spend_requests_per_manager: int = 1_000
    total_spend_requests: int = 10_000
    opinions_per_vault: int = 256           # (spend txid, opinion key) pairs for one vault
    opinions_per_watchtower: int = 10_000
    total_opinions: int = 100_000


@dataclass(frozen=True, slots=True)
class Sharers:
    """How many peers share each group quota: the configured peers of the writing role."""

    stakeholders: int = 1
    managers: int = 1
    watchtowers: int = 1

    def of(self, table: str) -> int:
        return max(1, getattr(self, _SHARER_FIELDS[table]))


# Per table, the field of Retention and of Sharers that applies to it.
_RETENTION_FIELDS = {"signatures": "signatures", "spend_requests": "spend_requests",
                     "opinions": "spend_opinions"}
_SHARER_FIELDS = {"signatures": "stakeholders", "spend_requests": "managers",
                  "opinions": "watchtowers"}


# Per table: the column that groups rows under one bound, and the names (Quotas fields
# and config keys) of its total, per-group and per-peer quotas.
QUOTA_NAMES = {
    "signatures": ("tx_id", "total_signatures", "signatures_per_id", "signatures_per_peer"),
    "spend_requests": ("vault_id", "total_spend_requests", "spend_requests_per_vault",
                       "spend_requests_per_manager"),
    "opinions": ("vault_id", "total_opinions", "opinions_per_vault",
                 "opinions_per_watchtower"),
}


class QuotaExceeded(Refused):
    """A write refused because it would take a table over one of its `Quotas` (-32002)."""

    def __init__(self, quota: str, limit: int, per_peer_share: bool = False):
        self.quota = quota
        self.limit = limit
        share = " for this peer's share" if per_peer_share else ""
        super().__init__(f"quota {quota} reached ({limit}{share})")


class Taken(Refused):
    """A write refused because the entry belongs to another peer (docs/protocol.md, "Roles"),
    -32002."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


# The columns of a row as the reads select it and as `Stored` carries it: a signature's
# as get_signatures reads it; a spend request's and an opinion's as the streams read
# them, the sequence number and the submitter first.
SIGNATURE_COLUMNS = "tx_id, pubkey, signature, stored_at"
REQUEST_COLUMNS = "seq, submitter, vault_id, txid, tx, request_timestamp, stored_at"
OPINION_COLUMNS = "seq, submitter, vault_id, txid, pubkey, accepted, reason, sig, stored_at"


# Named tuples: a request runs several statements, and a tuple is built several times
# faster than a frozen dataclass.
class Query(NamedTuple):
    """A statement whose rows the plan receives (a list of index-addressable rows)."""
    sql: str
    args: tuple = ()


class Execute(NamedTuple):
    """A statement whose affected row count the plan receives."""
    sql: str
    args: tuple = ()


Plan = Generator[Query | Execute, Any, Any]


# Named tuples, not frozen dataclasses: a poll builds hundreds of these, and a tuple is
# built several times faster.
class StoredSpendRequest(NamedTuple):
    vault_id: str
    txid: str
    transaction: str
    timestamp: int
    stored_at: int


class StoredOpinion(NamedTuple):
    vault_id: str
    txid: str
    pubkey: str
    accepted: bool
    reason: str
    sig: str
    stored_at: int


class Stored(NamedTuple):
    """What a write stored (a write plan's result): the row as the reads select it, for
    a backend that keeps those rows in memory (revault/sync_mirror.py)."""
    table: str                  # "signatures", "spend_requests" or "opinions"
    row: tuple                  # SIGNATURE_COLUMNS, REQUEST_COLUMNS or OPINION_COLUMNS


class Erased(NamedTuple):
    """What err_sig's write did: every signature for `tx_id` erased, `live` of them live."""
    tx_id: str
    live: int


class Refreshed(NamedTuple):
    """A write that only refreshed the age of the row at `key` (the same row sent again)."""
    table: str
    key: tuple                  # (vault_id, txid) or (vault_id, txid, pubkey)
    stored_at: int


class _Row(NamedTuple):
    """What a write needs of the row it would replace."""
    submitter: bytes
    live: bool                  # not expired


@dataclass(frozen=True, slots=True)
class Rules:
    """The rules as configured, at one instant (`now`), in one backend's dialect."""

    now: int
    quotas: Quotas
    retention: Retention
    sharers: Sharers
    rowid: str = "rowid"        # the physical row id the purge batches on ("ctid" in PostgreSQL)

    def cutoff(self, table: str) -> int:
        """Rows of `table` with stored_at at or below this are expired."""
        return self.now - self.retention.of(table)

    # --- admission ------------------------------------------------------------------

    def _total(self, table: str) -> Plan:
        rows = yield Query("SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM rows_by_submitter "
                           "WHERE tbl = ?", (table,))
        return rows[0][0]

    def _used(self, table: str, submitter: bytes) -> Plan:
        rows = yield Query("SELECT n FROM rows_by_submitter WHERE tbl = ? AND submitter = ?",
                           (table, submitter))
        return rows[0][0] if rows else 0

    def _check_total(self, table: str, quota: str) -> Plan:
        limit = getattr(self.quotas, quota)
        if (yield from self._total(table)) < limit:
            return
        # Expired rows may still be waiting for the periodic purge; they must not
        # refuse a live write.
        yield Execute(f"DELETE FROM {table} WHERE stored_at <= ?", (self.cutoff(table),))
        if (yield from self._total(table)) >= limit:
            raise QuotaExceeded(quota, limit)

    def _check_peer(self, table: str, submitter: bytes, quota: str) -> Plan:
        """The trigger-kept count of the submitter's rows (expired ones included until
        purged); only at the limit are its expired rows purged and the count read again,
        so a live write is never refused because of dead rows."""
        limit = getattr(self.quotas, quota)
        if (yield from self._used(table, submitter)) < limit:
            return
        yield Execute(f"DELETE FROM {table} WHERE submitter = ? AND stored_at <= ?",
                      (submitter, self.cutoff(table)))
        if (yield from self._used(table, submitter)) >= limit:
            raise QuotaExceeded(quota, limit)

    def _existing(self, table: str, key: dict[str, Any]) -> Plan:
        """The row of `table` at `key`, live or expired, as a `_Row`, or None."""
        where = " AND ".join(f"{column} = ?" for column in key)
        rows = yield Query(f"SELECT submitter, stored_at FROM {table} WHERE {where}",
                           tuple(key.values()))
        if not rows:
            return None
        return _Row(bytes(rows[0][0]), rows[0][1] > self.cutoff(table))

    def _admit(self, table: str, key: dict[str, str], submitter: bytes,
               existing: _Row | None) -> Plan:
        """Every quota check before writing the row of `table` that `key` identifies
        (`existing`, as `_existing` read it)."""
        group_column, total, per_group, per_peer = QUOTA_NAMES[table]
        if existing is None:
            yield from self._check_total(table, total)
            group = yield Query(f"SELECT submitter FROM {table} WHERE {group_column} = ? "
                                f"AND stored_at > ?", (key[group_column], self.cutoff(table)))
            limit = getattr(self.quotas, per_group)
            if len(group) >= limit:
                raise QuotaExceeded(per_group, limit)
            share = max(1, limit // self.sharers.of(table))
            if sum(1 for row in group if bytes(row[0]) == submitter) >= share:
                raise QuotaExceeded(per_group, share, per_peer_share=True)
        if existing is None or existing.submitter != submitter:
            yield from self._check_peer(table, submitter, per_peer)

    def _next_seq(self, table: str) -> Plan:
        rows = yield Query("UPDATE sequences SET value = value + 1 WHERE name = ? "
                           "RETURNING value", (table,))
        return rows[0][0]

    # --- writes ---------------------------------------------------------------------

    def put_signature(self, tx_id: str, pubkey: str, signature: str, submitter: bytes) -> Plan:
        key = {"tx_id": tx_id, "pubkey": pubkey}
        existing = yield from self._existing("signatures", key)
        if existing is not None and existing.live and existing.submitter != submitter:
            raise Taken("pubkey", "its signature for this id was posted by another "
                                  "stakeholder (err_sig releases it)")
        yield from self._admit("signatures", key, submitter, existing)
        yield Execute(
            "INSERT INTO signatures (tx_id, pubkey, signature, submitter, stored_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tx_id, pubkey) DO UPDATE SET "
            "signature = excluded.signature, submitter = excluded.submitter, "
            "stored_at = excluded.stored_at",
            (tx_id, pubkey, signature, submitter, self.now))
        return Stored("signatures", (tx_id, pubkey, signature, self.now))

    def erase_signatures(self, tx_id: str) -> Plan:
        live = yield Query("SELECT COUNT(*) FROM signatures WHERE tx_id = ? AND stored_at > ?",
                           (tx_id, self.cutoff("signatures")))
        yield Execute("DELETE FROM signatures WHERE tx_id = ?", (tx_id,))
        return Erased(tx_id, live[0][0])

    def _refresh_if_same(self, table: str, key: dict[str, Any], values: dict[str, Any],
                         submitter: bytes, unless: tuple[str, tuple] = ("", ())) -> Plan:
        """True, with the row's age refreshed, when the live row at `key` already holds
        `values` from `submitter` (and the SQL condition `unless`, with its arguments,
        does not hold): sent again, it is not stored anew, so a poller's cursor does not
        bring it back (a wallet resuming re-sends what it sent). One statement: the
        UPDATE compares the row itself, so a re-sent row costs one statement, and on
        PostgreSQL one round trip."""
        columns = {**key, **values}
        where = " AND ".join(f"{column} = ?" for column in columns)
        condition, arguments = unless
        refreshed = yield Execute(
            f"UPDATE {table} SET stored_at = ? WHERE {where} AND submitter = ? "
            f"AND stored_at > ?{' AND NOT ' + condition if condition else ''}",
            (self.now, *columns.values(), submitter, self.cutoff(table), *arguments))
        return refreshed > 0

    def put_spend_request(self, vault_id: str, txid: str, transaction: str, timestamp: int,
                          submitter: bytes) -> Plan:
        key = {"vault_id": vault_id, "txid": txid}
        if (yield from self._refresh_if_same(
                "spend_requests", key, {"tx": transaction, "request_timestamp": timestamp},
                submitter)):
            return Refreshed("spend_requests", (vault_id, txid), self.now)
        existing = yield from self._existing("spend_requests", key)
        yield from self._admit("spend_requests", key, submitter, existing)
        seq = yield from self._next_seq("spend_requests")
        yield Execute(
            "INSERT INTO spend_requests "
            "(vault_id, txid, tx, request_timestamp, submitter, stored_at, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (vault_id, txid) DO UPDATE SET "
            "tx = excluded.tx, request_timestamp = excluded.request_timestamp, "
            "submitter = excluded.submitter, stored_at = excluded.stored_at, "
            "seq = excluded.seq",
            (vault_id, txid, transaction, timestamp, submitter, self.now, seq))
        return Stored("spend_requests",
                      (seq, submitter, vault_id, txid, transaction, timestamp, self.now))

    def put_opinion(self, vault_id: str, txid: str, pubkey: str, accepted: bool, reason: str,
                    sig: str, submitter: bytes) -> Plan:
        cutoff = self.cutoff("opinions")
        key = {"vault_id": vault_id, "txid": txid, "pubkey": pubkey}
        # The same opinion sent again is refreshed only where the binding below would let
        # it through: the key is not another watchtower's.
        if (yield from self._refresh_if_same(
                "opinions", key, {"accepted": accepted, "reason": reason.encode("utf-8"),
                                  "sig": sig}, submitter,
                unless=("EXISTS (SELECT 1 FROM opinion_keys WHERE pubkey = ? "
                        "AND submitter <> ? AND stored_at > ?)", (pubkey, submitter, cutoff)))):
            yield Execute("UPDATE opinion_keys SET stored_at = ? WHERE pubkey = ?",
                          (self.now, pubkey))
            return Refreshed("opinions", (vault_id, txid, pubkey), self.now)
        owner = yield Query("SELECT submitter FROM opinion_keys WHERE pubkey = ? "
                            "AND stored_at > ?", (pubkey, cutoff))
        if owner and bytes(owner[0][0]) != submitter:
            raise Taken("pubkey", "this opinion key is used by another watchtower")
        existing = yield from self._existing("opinions", key)
        yield from self._admit("opinions", key, submitter, existing)
        seq = yield from self._next_seq("opinions")
        yield Execute(
            "INSERT INTO opinions "
            "(vault_id, txid, pubkey, accepted, reason, sig, submitter, stored_at, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (vault_id, txid, pubkey) "
            "DO UPDATE SET accepted = excluded.accepted, reason = excluded.reason, "
            "sig = excluded.sig, submitter = excluded.submitter, "
            "stored_at = excluded.stored_at, seq = excluded.seq",
            # The reason goes in as UTF-8 bytes: the one free text, and PostgreSQL's
            # TEXT cannot hold a NUL that JSON may carry ("\u0000").
            (vault_id, txid, pubkey, accepted, reason.encode("utf-8"), sig, submitter,
             self.now, seq))
        yield Execute(
            "INSERT INTO opinion_keys (pubkey, submitter, stored_at) VALUES (?, ?, ?) "
            "ON CONFLICT (pubkey) DO UPDATE SET submitter = excluded.submitter, "
            "stored_at = excluded.stored_at", (pubkey, submitter, self.now))
        return Stored("opinions", (seq, submitter, vault_id, txid, pubkey, accepted,
                                   reason.encode("utf-8"), sig, self.now))

    def purge_batch(self, table: str, batch: int) -> Plan:
        """Delete up to `batch` expired rows of `table` (or of opinion_keys); returns how many."""
        column = "stored_at"
        cutoff = self.cutoff("opinions" if table == "opinion_keys" else table)
        if table == "opinion_keys":
            # No physical row id needed: the key is the primary key.
            deleted = yield Execute(
                "DELETE FROM opinion_keys WHERE pubkey IN (SELECT pubkey FROM opinion_keys "
                f"WHERE {column} <= ? LIMIT ?)", (cutoff, batch))
            return deleted
        deleted = yield Execute(
            f"DELETE FROM {table} WHERE {self.rowid} IN (SELECT {self.rowid} FROM {table} "
            f"WHERE {column} <= ? LIMIT ?)", (cutoff, batch))
        return deleted

    # --- reads ----------------------------------------------------------------------

    def get_signatures(self, tx_id: str) -> Plan:
        rows = yield Query("SELECT pubkey, signature FROM signatures WHERE tx_id = ? "
                           "AND stored_at > ? ORDER BY pubkey",
                           (tx_id, self.cutoff("signatures")))
        return {row[0]: row[1] for row in rows}

    def spend_request_streams(self, cursor: Cursor, fetch: int) -> Plan:
        """Each manager's unseen requests after `cursor`, at most `fetch` each.

        A poller keeping up has only a few unseen requests: one query in storage order
        finds them all. Only when more than `fetch` are unseen (a first poll, a flood)
        does each manager get a query of its own, so that one manager's flood cannot
        take the others' turn in the page. Those several statements are bounded by the
        sequence number read first, which gives them one consistent view without a read
        transaction (a number visible means every lower one is committed).
        """
        rows = yield Query(
            f"SELECT {REQUEST_COLUMNS} FROM spend_requests WHERE seq > ? AND stored_at > ? "
            f"ORDER BY seq LIMIT ?", (cursor.watermark, self.cutoff("spend_requests"),
                                      fetch + 1))
        if len(rows) <= fetch:
            return streams_of_rows(cursor, rows, stored_request)
        top = (yield Query("SELECT value FROM sequences WHERE name = ?",
                           ("spend_requests",)))[0][0]
        submitters = yield Query("SELECT submitter FROM rows_by_submitter WHERE tbl = ?",
                                 ("spend_requests",))
        streams = []
        for (submitter,) in submitters:
            submitter = bytes(submitter)
            name = stream_name(submitter)
            rows = yield Query(
                f"SELECT {REQUEST_COLUMNS} FROM spend_requests WHERE submitter = ? AND seq > ? "
                f"AND seq <= ? AND stored_at > ? ORDER BY seq LIMIT ?",
                (submitter, cursor.start_of(name), top, self.cutoff("spend_requests"),
                 fetch + 1))
            if rows:
                streams.append(Stream(name, [(r[0], stored_request(r))
                                             for r in rows[:fetch]], more=len(rows) > fetch))
        return streams

    def opinion_streams(self, vault_id: str, cursor: Cursor) -> Plan:
        """Each watchtower's unseen opinions on `vault_id` (bounded by opinions_per_vault)."""
        rows = yield Query(
            f"SELECT {OPINION_COLUMNS} "
            "FROM opinions WHERE vault_id = ? AND seq > ? AND stored_at > ? ORDER BY seq",
            (vault_id, cursor.watermark, self.cutoff("opinions")))
        return streams_of_rows(cursor, rows, stored_opinion)

    @staticmethod
    def epoch() -> Plan:
        rows = yield Query("SELECT epoch FROM store_meta")
        return rows[0][0]

    @staticmethod
    def _rows_by_table() -> Plan:
        """Per table, (its rows, the rows of the peer that stored the most), expired rows
        included until purged: one read of the small trigger-kept rows_by_submitter."""
        rows = yield Query("SELECT tbl, CAST(SUM(n) AS BIGINT), MAX(n) FROM rows_by_submitter "
                           "GROUP BY tbl")
        return dict.fromkeys(TABLES, (0, 0)) | {row[0]: (row[1], row[2]) for row in rows}

    @staticmethod
    def row_counts() -> Plan:
        by_table = yield from Rules._rows_by_table()
        return {table: rows for table, (rows, _) in by_table.items()}

    def quota_use(self) -> Plan:
        """Quota name -> (rows counted against it, its bound), for the table-wide quotas
        and the per-peer ones (the busiest peer's rows). Counted as admission counts them
        (expired rows until purged); cheap enough for every metrics scrape."""
        by_table = yield from self._rows_by_table()
        use = {}
        for table, (_, total, _, per_peer) in QUOTA_NAMES.items():
            rows, busiest_peer = by_table[table]
            use[total] = (rows, getattr(self.quotas, total))
            use[per_peer] = (busiest_peer, getattr(self.quotas, per_peer))
        return use

    def status(self) -> Plan:
        """What `revault-sync-server status` shows: each table's rows (live, and expired
        but not yet purged), the age of its oldest live row, and every quota's use (for
        per-group and per-peer quotas, the busiest group's or peer's). Reads only; full
        scans are fine for a command an operator runs by hand."""
        tables, use = {}, (yield from self.quota_use())
        for table in TABLES:
            cutoff = self.cutoff(table)
            count, live, oldest = (yield Query(
                f"SELECT COUNT(*), COUNT(*) FILTER (WHERE stored_at > ?), "
                f"MIN(stored_at) FILTER (WHERE stored_at > ?) FROM {table}",
                (cutoff, cutoff)))[0]
            tables[table] = {"live": live, "expired_not_purged": count - live,
                             "oldest_live_age_seconds": (None if oldest is None
                                                         else self.now - oldest),
                             "retention_seconds": self.retention.of(table)}
            group_column, _, per_group, _ = QUOTA_NAMES[table]
            busiest_group = (yield Query(
                f"SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM {table} "
                f"WHERE stored_at > ? GROUP BY {group_column}) AS groups", (cutoff,)))[0][0]
            use[per_group] = (busiest_group, getattr(self.quotas, per_group))
        return {
            "tables": tables,
            "quotas": {name: {"used": used, "limit": limit,
                              "percent": round(100 * used / limit, 1)}
                       for name, (used, limit) in sorted(use.items())},
        }


def streams_of_rows(cursor: Cursor, rows: list, item: Callable[[Any], Any]) -> list[Stream]:
    """Rows of (seq, submitter, ...) in storage order as one stream per submitter,
    leaving out what the cursor says that submitter's stream has listed already."""
    positions = dict(cursor.positions)
    # submitter -> (its stream's items, the cursor's position in that stream): looked up
    # once per submitter rather than per row (a poll's rows come from a few submitters).
    by_submitter: dict[bytes, tuple[list, int]] = {}
    streams: dict[str, Stream] = {}
    for r in rows:
        seen = by_submitter.get(r[1])
        if seen is None:
            name = stream_name(bytes(r[1]))
            stream = streams.get(name)
            if stream is None:
                stream = streams[name] = Stream(name, [])
            seen = by_submitter[r[1]] = (stream.items, positions.get(name, 0))
        if r[0] > seen[1]:  # rows are above the watermark already
            seen[0].append((r[0], item(r)))
    return [stream for stream in streams.values() if stream.items]


_new_tuple = tuple.__new__


def stored_request(r) -> StoredSpendRequest:
    # tuple.__new__ directly: _make is a Python-level call with a length check, per row
    # (the row's columns are REQUEST_COLUMNS: the item's, after seq and submitter).
    return _new_tuple(StoredSpendRequest, r[2:])


def stored_opinion(r) -> StoredOpinion:
    # Rows written before SQLite migration 3 hold the reason as TEXT.
    reason = r[6] if isinstance(r[6], str) else bytes(r[6]).decode("utf-8")
    return StoredOpinion(vault_id=r[2], txid=r[3], pubkey=r[4], accepted=bool(r[5]),
                         reason=reason, sig=r[7], stored_at=r[8])


async def purge_all(write: Callable[[Callable[[Rules], Plan]], Awaitable[Any]]) -> int:
    """Delete every expired row through a store's `write`; returns how many (keys of
    opinions aside), counted per table in the purged rows metric. One batch per write:
    writers queued behind the purge wait for one batch at most, not for the whole
    backlog."""
    purged = 0
    purged_rows = metrics.sync_server().purged_rows
    for table in TABLES + ("opinion_keys",):
        while True:
            batch = PURGE_BATCH
            deleted = await write(lambda r, table=table, batch=batch: r.purge_batch(table, batch))
            if table != "opinion_keys":
                purged += deleted
                purged_rows.labels(table).inc(deleted)
            if deleted < batch:
                break
    return purged


class RulesStore:
    """The `SyncStore` methods, written once: each is one plan of `Rules`, run by the
    backend's `_read` (a consistent read) or `_write` (atomic, returns once durably
    committed). A backend sets the configured rules with `_configure` and provides
    `_read`, `_write`, `close` and its `ROWID`."""

    ROWID = "rowid"

    def _configure(self, epoch: str, retention: Retention, quotas: Quotas,
                   sharers: Sharers, clock: Callable[[], float]) -> None:
        self.epoch = epoch
        self._retention = retention
        self._quotas = quotas
        self._sharers = sharers
        self._clock = clock
        self._current_rules: Rules | None = None

    def _rules(self) -> Rules:
        # The same rules for every request within one second (they hold nothing else
        # that changes): one object, not one per request.
        now = int(self._clock())
        rules = self._current_rules
        if rules is None or rules.now != now:
            rules = self._current_rules = Rules(
                now=now, quotas=self._quotas, retention=self._retention,
                sharers=self._sharers, rowid=self.ROWID)
        return rules

    async def put_signature(self, tx_id: str, pubkey: str, signature: str,
                            submitter: bytes) -> None:
        await self._write(lambda r: r.put_signature(tx_id, pubkey, signature, submitter))

    async def get_signatures(self, tx_id: str) -> dict[str, str]:
        return await self._read(lambda r: r.get_signatures(tx_id))

    async def erase_signatures(self, tx_id: str) -> int:
        erased = await self._write(lambda r: r.erase_signatures(tx_id))
        return erased.live

    async def put_spend_request(self, vault_id: str, txid: str, transaction: str,
                                timestamp: int, submitter: bytes) -> None:
        await self._write(lambda r: r.put_spend_request(vault_id, txid, transaction,
                                                        timestamp, submitter))

    async def spend_request_streams(self, cursor: Cursor,
                                    fetch: int) -> list[Stream[StoredSpendRequest]]:
        return await self._read(lambda r: r.spend_request_streams(cursor, fetch))

    async def put_opinion(self, vault_id: str, txid: str, pubkey: str, accepted: bool,
                          reason: str, sig: str, submitter: bytes) -> None:
        await self._write(lambda r: r.put_opinion(vault_id, txid, pubkey, accepted, reason,
                                                  sig, submitter))

    async def opinion_streams(self, vault_id: str,
                              cursor: Cursor) -> list[Stream[StoredOpinion]]:
        return await self._read(lambda r: r.opinion_streams(vault_id, cursor))

    async def purge_expired(self) -> int:
        return await purge_all(self._write)

    async def row_counts(self) -> dict[str, int]:
        return await self._read(lambda r: r.row_counts())

    async def quota_use(self) -> dict[str, tuple[int, int]]:
        return await self._read(lambda r: r.quota_use())

    def memory_bytes(self) -> int:
        return 0    # a backend that holds rows in memory says how much
