"""The sync server's store on PostgreSQL (asyncpg): several server processes, one truth.

Selected by `[storage] backend = "postgresql"`. The rules are revault/sync_rules.py's
plans, the same the SQLite store runs, so a write means the same on both:

- Durability: a write returns (and the server acks it) only after the COMMIT holding
  it returned, with `synchronous_commit = on` forced for our sessions.
- One writer at a time across every process: each write transaction first takes one
  transaction-scoped advisory lock. Quotas, shares and bindings are then checked
  against everything committed before, by any process, and sequence numbers grow in
  commit order (what cursors need). Writes arriving meanwhile queue in each process
  and are committed together by its next transaction (group commit), one SAVEPOINT
  each, so a refused write rolls back alone.
- Schema versions: `schema_version` holds how many of `MIGRATIONS` have run; each
  migration runs in its own transaction, under an advisory lock so that processes
  starting together migrate once. A database newer than this program is refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Callable

import asyncpg

from revault.errors import Refused
from revault.metrics import COMMON as METRICS
from revault.storage import GroupCommitWriter, StorageError
from revault.sync_rules import (
    TABLES, Execute, Plan, Quotas, Retention, Rules, RulesStore, Sharers,
)

log = logging.getLogger("revault.sync_store_postgresql")

# pg_advisory_xact_lock keys: one for writers, one for migrations ("revault" in ASCII).
WRITE_LOCK = 0x7265_7661_756C_7401
MIGRATION_LOCK = 0x7265_7661_756C_7402
POOL_SIZE = 8

_COUNT_TRIGGERS = "".join(f"""
    CREATE TRIGGER {table}_count AFTER INSERT OR DELETE ON {table}
        FOR EACH ROW EXECUTE FUNCTION count_rows_by_submitter();
    CREATE TRIGGER {table}_count_update AFTER UPDATE OF submitter ON {table}
        FOR EACH ROW WHEN (OLD.submitter IS DISTINCT FROM NEW.submitter)
        EXECUTE FUNCTION count_rows_by_submitter();
""" for table in TABLES)

# Like every released migration, these texts never change; a schema change is a new one.
MIGRATIONS = [
    """
    CREATE TABLE signatures (
        tx_id TEXT NOT NULL,
        pubkey TEXT NOT NULL,
        signature TEXT NOT NULL,
        submitter BYTEA NOT NULL,
        stored_at BIGINT NOT NULL,
        PRIMARY KEY (tx_id, pubkey)
    );
    CREATE INDEX signatures_by_submitter ON signatures (submitter, stored_at);
    CREATE INDEX signatures_by_age ON signatures (stored_at);

    CREATE TABLE spend_requests (
        vault_id TEXT NOT NULL,
        txid TEXT NOT NULL,
        tx TEXT NOT NULL,
        request_timestamp BIGINT NOT NULL,
        submitter BYTEA NOT NULL,
        stored_at BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (vault_id, txid)
    );
    CREATE INDEX spend_requests_by_submitter ON spend_requests (submitter, seq);
    CREATE INDEX spend_requests_in_order ON spend_requests (seq);
    CREATE INDEX spend_requests_by_age ON spend_requests (stored_at);

    -- reason is the one free text: BYTEA holds any UTF-8, NUL included, unlike TEXT.
    CREATE TABLE opinions (
        vault_id TEXT NOT NULL,
        txid TEXT NOT NULL,
        pubkey TEXT NOT NULL,
        accepted BOOLEAN NOT NULL,
        reason BYTEA NOT NULL,
        sig TEXT NOT NULL,
        submitter BYTEA NOT NULL,
        stored_at BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (vault_id, txid, pubkey)
    );
    CREATE INDEX opinions_by_vault ON opinions (vault_id, seq);
    CREATE INDEX opinions_by_submitter ON opinions (submitter, stored_at);
    CREATE INDEX opinions_by_age ON opinions (stored_at);

    CREATE TABLE opinion_keys (
        pubkey TEXT PRIMARY KEY,
        submitter BYTEA NOT NULL,
        stored_at BIGINT NOT NULL
    );
    CREATE INDEX opinion_keys_by_age ON opinion_keys (stored_at);

    CREATE TABLE sequences (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO sequences (name, value) VALUES ('spend_requests', 0), ('opinions', 0);

    CREATE TABLE store_meta (epoch TEXT NOT NULL);
    INSERT INTO store_meta (epoch)
        VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 16));

    CREATE TABLE rows_by_submitter (
        tbl TEXT NOT NULL,
        submitter BYTEA NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (tbl, submitter)
    );
    CREATE FUNCTION count_rows_by_submitter() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            UPDATE rows_by_submitter SET n = n - 1
                WHERE tbl = TG_TABLE_NAME AND submitter = OLD.submitter;
            DELETE FROM rows_by_submitter
                WHERE tbl = TG_TABLE_NAME AND submitter = OLD.submitter AND n = 0;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            INSERT INTO rows_by_submitter (tbl, submitter, n)
                VALUES (TG_TABLE_NAME, NEW.submitter, 1)
                ON CONFLICT (tbl, submitter) DO UPDATE SET n = rows_by_submitter.n + 1;
        END IF;
        RETURN NULL;
    END $$;
    """ + _COUNT_TRIGGERS,
]

_placeholders: dict[str, str] = {}


def to_postgres(sql: str) -> str:
    """The plans' `?` placeholders as PostgreSQL's `$1, $2, ...` (none sit in literals)."""
    converted = _placeholders.get(sql)
    if converted is None:
        parts = sql.split("?")
        converted = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        _placeholders[sql] = converted
    return converted


async def run_plan(conn: asyncpg.Connection, plan: Plan):
    """Drive a sync_rules plan on `conn`; returns what the plan returns."""
    try:
        step = next(plan)
        while True:
            if isinstance(step, Execute):
                status = await conn.execute(to_postgres(step.sql), *step.args)
                value = int(status.rsplit(" ", 1)[-1])
            else:
                value = await conn.fetch(to_postgres(step.sql), *step.args)
            step = plan.send(value)
    except StopIteration as stop:
        return stop.value


async def migrate(conn: asyncpg.Connection, migrations: list[str], where: str) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = await conn.fetchrow("SELECT version FROM schema_version")
        if row is None:
            await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0
        else:
            version = row[0]
    if version > len(migrations):
        raise StorageError(f"{where}: schema version {version} is newer than this program "
                           f"knows ({len(migrations)}); refusing to touch it")
    for target in range(version + 1, len(migrations) + 1):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            (current,) = await conn.fetchrow("SELECT version FROM schema_version")
            if current >= target:
                continue  # another process ran it while we waited for the lock
            await conn.execute(migrations[target - 1])
            await conn.execute("UPDATE schema_version SET version = $1", target)


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return "(dsn)"
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}://{userinfo.split(':', 1)[0]}@{host}" if at else dsn


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a connection it takes back: nothing beyond what asyncpg
    always does first (roll back a transaction left open, drop listeners).

    asyncpg's default also sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`, one more round trip to the database per read. This store changes none
    of that session state: its only lock is transaction-scoped (pg_advisory_xact_lock),
    it declares no cursor, listens to nothing and sets no setting.
    """


async def _roll_back(conn: asyncpg.Connection) -> None:
    """End a batch's transaction that failed; a connection too broken for that is
    closed by the pool when it takes it back."""
    if conn.is_closed() or not conn.is_in_transaction():
        return
    try:
        await conn.execute("ROLLBACK")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        log.debug("rollback of a failed batch: %s", e)


class PostgresGroupCommit(GroupCommitWriter):
    """storage.GroupCommitWriter's batching on a PostgreSQL pool: each batch is one
    transaction holding the write lock, each job (a coroutine function of the
    connection) in its own SAVEPOINT."""

    def _begin(self, batch: list) -> None:
        # asyncpg is asynchronous all through: the transaction is a task of its own, and
        # its end settles the batch from a plain callback (where callers resume at once).
        self._transaction_task = task = self._loop.create_task(
            self._transaction([job for job, _ in batch]), name=self._name)
        task.add_done_callback(functools.partial(self._transaction_done, batch))

    def _transaction_done(self, batch: list, task: asyncio.Task) -> None:
        if task.cancelled():
            self._batch_done(batch, None, RuntimeError("the transaction was cancelled"))
        elif (error := task.exception()) is not None:
            self._batch_done(batch, None, error)
        else:
            self._batch_done(batch, task.result(), None)

    async def _transaction(self, jobs: list) -> list[tuple[Exception | None, object]]:
        # A batch is a chain of round trips to the database, one after the other, and
        # other processes' batches wait for its lock: statements without parameters go
        # together as one simple query wherever the order allows (BEGIN with the lock and
        # the first SAVEPOINT; each RELEASE with the next SAVEPOINT; the last RELEASE is
        # the COMMIT's). Two round trips per batch and one per job fewer than one each.
        outcomes: list[tuple[Exception | None, object]] = []
        async with self.db.acquire() as conn:
            await conn.execute(
                f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK:d}); SAVEPOINT job")
            try:
                for i, job in enumerate(jobs):
                    try:
                        outcomes.append((None, await job(conn)))
                    except Exception as e:
                        # As on SQLite, a refused or failed write rolls back alone; a
                        # broken connection fails the ROLLBACK TO, and so the batch.
                        outcomes.append((e, None))
                        await conn.execute("ROLLBACK TO SAVEPOINT job")
                    if i + 1 < len(jobs):
                        await conn.execute("RELEASE SAVEPOINT job; SAVEPOINT job")
            except BaseException:
                await _roll_back(conn)
                raise
            # Timed alone, as on SQLite: the COMMIT is what every acknowledged write
            # waits for (the WAL flush on the database server).
            started = time.perf_counter()
            await conn.execute("COMMIT")
            METRICS.commit_done(time.perf_counter() - started, len(jobs))
        return outcomes

    async def _close_database(self) -> None:
        await self.db.close()


class PostgresSyncStore(RulesStore):
    """`SyncStore` on PostgreSQL: a connection pool, one write transaction at a time."""

    ROWID = "ctid"  # the physical row id the purge batches on

    def __init__(self, pool: asyncpg.Pool, epoch: str, retention: Retention, quotas: Quotas,
                 sharers: Sharers, clock: Callable[[], float]):
        self._pool = pool
        self._configure(epoch, retention, quotas, sharers, clock)
        self._writer = PostgresGroupCommit(
            pool, name="sync-store (postgresql)",
            closed_error=lambda: Refused("sync server is shutting down"))

    @classmethod
    async def open(cls, dsn: str, retention: Retention = Retention(),
                   quotas: Quotas = Quotas(), clock: Callable[[], float] = time.time, *,
                   sharers: Sharers = Sharers(), password: str | None = None,
                   pool_size: int = POOL_SIZE) -> PostgresSyncStore:
        where = describe_dsn(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn, password=password, min_size=1, max_size=pool_size, timeout=10,
                command_timeout=60, reset=_keep_session,
                # An ack promises the write survives a crash of the database server too.
                server_settings={"synchronous_commit": "on",
                                 "application_name": "revault-sync-server"})
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as e:
            raise StorageError(f"{where}: cannot connect: {e}") from None
        try:
            async with pool.acquire() as conn:
                await migrate(conn, MIGRATIONS, where)
                epoch = await run_plan(conn, Rules.epoch())
        except BaseException:
            await pool.close()
            raise
        return cls(pool, epoch, retention, quotas, sharers, clock)

    async def _read(self, make_plan: Callable[[Rules], Plan]):
        async with self._pool.acquire() as conn:
            return await run_plan(conn, make_plan(self._rules()))

    async def _write(self, make_plan: Callable[[Rules], Plan]):
        """Run the plan in the next group transaction; return once it is committed."""
        return await self._writer.run(lambda conn: run_plan(conn, make_plan(self._rules())))

    async def close(self) -> None:
        # Writes already queued are committed (and acknowledged) before closing.
        await self._writer.close()



async def read_status(dsn: str, password: str | None, rules: Rules) -> dict:
    """`revault-sync-server status` on PostgreSQL: the database (where, its schema
    version) and `rules.status()`, read on one connection of its own in a read-only
    session; nothing is created or migrated. Raises StorageError when it cannot be read."""
    where = describe_dsn(dsn)
    try:
        conn = await asyncpg.connect(
            dsn, password=password, timeout=10, command_timeout=60,
            server_settings={"default_transaction_read_only": "on",
                             "application_name": "revault-sync-server status"})
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as e:
        raise StorageError(f"{where}: cannot connect: {e}") from None
    try:
        database = {"backend": "postgresql", "dsn": where, "schema_version": None}
        if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
            return {"database": database}  # never started on this database
        database["schema_version"] = await conn.fetchval("SELECT version FROM schema_version")
        if database["schema_version"] != len(MIGRATIONS):
            # Another program's tables, or not migrated: the status plan would misread them.
            return {"database": database}
        summary = await run_plan(conn, rules.status())
        return {"database": database, **summary}
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as e:
        raise StorageError(f"{where}: cannot read: {e}") from None
    finally:
        await conn.close()
