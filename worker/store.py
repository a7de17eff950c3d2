"""Postgres: the schema migrations and the one transaction that writes a batch.

The event-time rules live in the SQL (UPSERT's `DO UPDATE ... WHERE`, MERGE's `WHEN` clauses),
so the database, not a worker's memory, decides what is newer; several workers can write the
same customers at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from msgspec.structs import astuple

from worker.fold import Rejected, Row

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key for migrations: any constant shared by all workers.
MIGRATION_LOCK = 0x75706761746573  # "upgates"
RETENTION_LOCK = MIGRATION_LOCK + 1


# An event's data wins when its (time, rank, fingerprint) is greater; see fold.Row.merge, which
# is the same join in Python. bytea compares like Python bytes. `new` is the batch's row.
def _rules(new: str) -> tuple[str, str, str]:
    """When the new row's data, its status, its creation or update time is newer than c's."""
    data = f"""({new}.version_at, {new}.version_rank, {new}.version_fp)
    > (c.version_at, c.version_rank, c.version_fp)"""
    status = f"""({new}.status_at IS NOT NULL AND (c.status_at IS NULL OR
      ({new}.status_at, {new}.status_rank, {new}.status_fp)
    > (c.status_at, c.status_rank, c.status_fp)))"""
    times = f"""({new}.created_at > c.created_at
   OR (c.created_at IS NULL AND {new}.created_at IS NOT NULL)
   OR {new}.updated_at > c.updated_at
   OR (c.updated_at IS NULL AND {new}.updated_at IS NOT NULL))"""
    return data, status, times


# The worker's connections exchange a timestamptz as the int8 Postgres stores: microseconds
# since 2000-01-01 UTC, the one form every time takes from decode to write (worker/fold.py).
# asyncpg then encodes a time in C, as any int8, far more cheaply than a datetime or a Python
# codec. Both ways: a time given to such a connection must be an int, and one read from it is an
# int (fold.as_datetime makes it a datetime).


async def times_as_micros(conn: asyncpg.Connection) -> None:
    """Let this connection exchange a timestamptz as int8 microseconds since 2000-01-01 UTC."""
    await conn.set_builtin_type_codec(
        "timestamptz",
        schema="pg_catalog",
        codec_name="int8",
        format="binary",  # binary only: the text form of an int8 is no time Postgres would read
    )


def open_pool(dsn: str, **options: Any) -> asyncpg.Pool:
    """A connection pool write_batch can use (its connections exchange times as ints)."""
    return asyncpg.create_pool(dsn, init=times_as_micros, **options)


# Any other batch is COPY'd into this session-local table, then applied from it in one
# statement. Binary COPY costs the worker and the server less than binding 15 arrays (asyncpg
# checks every array element). The table lives as long as the connection; its rows go at
# COMMIT or ROLLBACK, so a retried batch starts empty.
BATCH_TABLE = "customer_batch"
BATCH_COLUMNS = Row.__struct_fields__  # a Row's fields are the columns, in this order
CREATE_BATCH_TABLE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {BATCH_TABLE} (
    project_name text, customer_id bigint, email text, code text, deleted_at timestamptz,
    version_at timestamptz, version_rank smallint, version_fp bytea, active_yn boolean,
    blocked_yn boolean, status_at timestamptz, status_rank smallint, status_fp bytea,
    created_at timestamptz, updated_at timestamptz
) ON COMMIT DELETE ROWS
"""

# Built from constants only; the data travels through COPY.
# A temporary table has no index and is never scanned in parallel: the SELECT (and MERGE's
# nested loop) reads it in the order it was written, which is key order, so concurrent workers
# lock rows in one global order.
_COLUMNS = ", ".join(BATCH_COLUMNS)
INSERT = f"""
INSERT INTO customers AS c ({_COLUMNS})
SELECT {_COLUMNS} FROM pg_temp.{BATCH_TABLE}
"""  # noqa: S608

_NEWER, _STATUS_NEWER, _TIMES_NEWER = _rules("EXCLUDED")
UPSERT = f"""{INSERT}ON CONFLICT (project_name, customer_id) DO UPDATE SET
    email        = CASE WHEN {_NEWER} THEN EXCLUDED.email ELSE c.email END,
    code         = CASE WHEN {_NEWER} THEN EXCLUDED.code ELSE c.code END,
    deleted_at   = CASE WHEN {_NEWER} THEN EXCLUDED.deleted_at ELSE c.deleted_at END,
    version_at   = CASE WHEN {_NEWER} THEN EXCLUDED.version_at ELSE c.version_at END,
    version_rank = CASE WHEN {_NEWER} THEN EXCLUDED.version_rank ELSE c.version_rank END,
    version_fp   = CASE WHEN {_NEWER} THEN EXCLUDED.version_fp ELSE c.version_fp END,
    active_yn    = CASE WHEN {_STATUS_NEWER} THEN EXCLUDED.active_yn ELSE c.active_yn END,
    blocked_yn   = CASE WHEN {_STATUS_NEWER} THEN EXCLUDED.blocked_yn ELSE c.blocked_yn END,
    status_at    = CASE WHEN {_STATUS_NEWER} THEN EXCLUDED.status_at ELSE c.status_at END,
    status_rank  = CASE WHEN {_STATUS_NEWER} THEN EXCLUDED.status_rank ELSE c.status_rank END,
    status_fp    = CASE WHEN {_STATUS_NEWER} THEN EXCLUDED.status_fp ELSE c.status_fp END,
    created_at   = GREATEST(c.created_at, EXCLUDED.created_at),  -- GREATEST skips NULLs
    updated_at   = GREATEST(c.updated_at, EXCLUDED.updated_at),
    ingested_at  = now()
WHERE {_NEWER} OR {_STATUS_NEWER} OR {_TIMES_NEWER}
"""

# The rows the upsert changed, counted by the event of their row in the batch: a count, not a
# row per key, which would cost the worker more than the upsert itself.
UPSERT_COUNTING_CHANGES = f"""
WITH written AS ({UPSERT} RETURNING project_name, customer_id)
SELECT b.version_rank, count(*)::int
FROM written JOIN pg_temp.{BATCH_TABLE} AS b USING (project_name, customer_id)
GROUP BY b.version_rank
"""  # noqa: S608

# A batch of one event (a shop's bulk update, say) is applied by MERGE instead, the same rules
# as the upsert's in WHEN clauses: each row's comparisons are made once, where the upsert's
# SET repeats them for every column, and a row found is updated without a separate probe for
# the conflict and lock, which costs Postgres less CPU. MERGE cannot settle a new key that
# another transaction inserts meanwhile (a unique violation): the upsert then does.
_B_NEWER, _B_STATUS_NEWER, _B_TIMES_NEWER = _rules("b")
_DATA = """email = b.email, code = b.code, deleted_at = b.deleted_at,
        version_at = b.version_at, version_rank = b.version_rank, version_fp = b.version_fp"""
_STATUS = """active_yn = b.active_yn, blocked_yn = b.blocked_yn,
        status_at = b.status_at, status_rank = b.status_rank, status_fp = b.status_fp"""
_TIMES = """created_at = GREATEST(c.created_at, b.created_at),
        updated_at = GREATEST(c.updated_at, b.updated_at), ingested_at = now()"""


def _merge(source: str, on: str) -> str:
    return f"""
MERGE INTO customers AS c USING {source} AS b
ON c.project_name = b.project_name AND c.customer_id = b.customer_id{on}
WHEN MATCHED AND {_B_NEWER} AND {_B_STATUS_NEWER} THEN UPDATE SET {_DATA}, {_STATUS}, {_TIMES}
WHEN MATCHED AND {_B_NEWER} THEN UPDATE SET {_DATA}, {_TIMES}
WHEN MATCHED AND {_B_STATUS_NEWER} THEN UPDATE SET {_STATUS}, {_TIMES}
WHEN MATCHED AND {_B_TIMES_NEWER} THEN UPDATE SET {_TIMES}
WHEN NOT MATCHED THEN INSERT ({_COLUMNS})
    VALUES ({", ".join("b." + column for column in BATCH_COLUMNS)})
"""  # noqa: S608


# How MERGE finds the rows. In general, an index lookup per row (a nested loop), which keeps it
# cheap and locks rows in the batch's key order. The planner is told to: left alone, it scans
# and hashes the whole table once the table has grown large. When each shop's ids in the batch
# are a run of neighbouring ids (a bulk update, an import's creates sent again), one MERGE per
# shop walks the primary key from the run's first id to its last instead (a merge join against
# an index range scan, still in key order): the leaf pages are read once, where each lookup
# descends from the root. The range is only the run's: it holds at most RUN_DENSITY times as
# many ids as the batch has rows there, so a sparse batch, whose range would hold many rows it
# does not touch, is looked up row by row. Every row of the shop lies within its range, so the
# range never makes MERGE take a customer it has for a new one.
MERGE = _merge(f"pg_temp.{BATCH_TABLE}", "")
LOOKUP_PER_ROW = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
MERGE_RUN = _merge(
    f"(SELECT * FROM pg_temp.{BATCH_TABLE} WHERE project_name = $1)",  # noqa: S608
    " AND c.project_name = $1 AND c.customer_id BETWEEN $2 AND $3",
)
# jit off: the range scan's estimate grows with the run, and compiling would cost more than a
# batch's MERGE (which the lookups' plan, estimated far cheaper, never reaches).
WALK_RUNS = (
    "SET LOCAL enable_hashjoin = off; SET LOCAL enable_nestloop = off;"
    " SET LOCAL enable_bitmapscan = off; SET LOCAL jit = off"
)
RUN_DENSITY = 2  # a run's range of ids holds at most this many ids per row of the batch
RUN_SHOPS = 4  # at most this many shops' runs in a batch (the batch table is read once for each)

INSERT_REJECTED = """
INSERT INTO rejected_records (
    project_name, event, reason, record, received_at, request_id, position)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::int[])
ON CONFLICT (request_id, position) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class RejectedFrom:
    """A rejected record with the message it came in."""

    project_name: str
    received_at: int  # microseconds since fold.EPOCH, as every time on the path
    request_id: str
    rejected: Rejected


# SQLSTATEs that mean "try again later", never "this message is bad": connection loss (08),
# deadlock and serialization failures, the server shutting down or starting, resources exhausted.
_TRANSIENT_STATES = {"40P01", "40001", "57P01", "57P02", "57P03", "55P03", "25006"}


def is_data_error(exc: BaseException) -> bool:
    """True when a value in the batch is at fault: retrying the same batch fails again.

    Class 22 is data exceptions (a value out of range, bad text; asyncpg also raises one, with
    SQLSTATE 22000, for a value it cannot encode), 23 integrity violations. Their messages can
    quote the value: log the class and SQLSTATE only.
    """
    if isinstance(exc, UnicodeEncodeError | OverflowError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in {"22", "23"}
    return False


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same batch later can succeed."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    if isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc).lower():
        return True  # "the connection is closed", "connection was closed in the middle of ..."
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state in _TRANSIENT_STATES or state[:2] in {"08", "53", "58"}
    return False


async def write_batch(
    pool: asyncpg.Pool, rows: list[Row], rejected: list[RejectedFrom]
) -> dict[int, int]:
    """Write folded rows and rejected records in one transaction; the rows it changed, by rank.

    The count of changed rows by their version_rank in the batch (0 create, 1 update, 2 delete).
    A row not changed was stale: the table already reflected something as new.

    `pool` comes from open_pool. `rows` must be folded (one per key) and in key order: writing
    keys in one global order keeps concurrent workers from deadlocking (and a deadlock that
    still happens is retried).
    """
    async with pool.acquire() as conn, conn.transaction():
        changed: dict[int, int] = {}
        if rows:
            ranks = {r.version_rank for r in rows}
            if ranks == {0} and await _copy_if_all_new(conn, rows):
                changed = {0: len(rows)}
            else:
                await conn.execute(CREATE_BATCH_TABLE)
                await conn.copy_records_to_table(
                    BATCH_TABLE,
                    schema_name="pg_temp",
                    columns=BATCH_COLUMNS,
                    records=map(astuple, rows),  # a tuple at a time, as asyncpg encodes them
                )
                merged = await _merge_unless_raced(conn, rows) if len(ranks) == 1 else None
                if merged is not None:
                    changed = {ranks.pop(): merged} if merged else {}
                else:
                    changed = dict(await conn.fetch(UPSERT_COUNTING_CHANGES))
        if rejected:
            await conn.execute(
                INSERT_REJECTED,
                [r.project_name for r in rejected],
                [r.rejected.event for r in rejected],
                [r.rejected.reason for r in rejected],
                [r.rejected.record for r in rejected],
                [r.received_at for r in rejected],
                [r.request_id for r in rejected],
                [r.rejected.position for r in rejected],
            )
    return changed


async def _copy_if_all_new(conn: asyncpg.Connection, rows: list[Row]) -> bool:
    """COPY the rows straight into the table; False, having written nothing, when a key exists.

    A batch of creates is usually all new customers (a shop's import), and COPY into the table
    costs Postgres less than going through the batch table and INSERT, which in turn costs less
    than the upsert's speculative insertion. When a key exists (a create sent again, or another
    worker was first), the savepoint undoes the COPY only, and the caller's MERGE or upsert
    decides by event time as always.
    """
    try:
        async with conn.transaction():  # a savepoint
            await conn.copy_records_to_table(
                "customers", columns=BATCH_COLUMNS, records=map(astuple, rows)
            )
    except asyncpg.UniqueViolationError:
        return False
    return True


def _rows_affected(status: str) -> int:
    """The row count of a command's status, as asyncpg returns it ("MERGE 42", "DELETE 0")."""
    return int(status.rsplit(" ", 1)[-1])


def runs(rows: list[Row]) -> list[tuple[str, int, int]] | None:
    """Each shop's first and last id, when the batch is a few shops' runs of neighbouring ids.

    `rows` in key order. None when a shop's ids are spread wider than RUN_DENSITY times its
    rows, or the batch holds more than RUN_SHOPS shops.
    """
    found: list[tuple[str, int, int]] = []
    start = 0
    for end in range(1, len(rows) + 1):
        if end < len(rows) and rows[end].project_name == rows[start].project_name:
            continue
        first, last = rows[start].customer_id, rows[end - 1].customer_id
        if len(found) == RUN_SHOPS or last - first + 1 > RUN_DENSITY * (end - start):
            return None
        found.append((rows[start].project_name, first, last))
        start = end
    return found


async def _merge_unless_raced(conn: asyncpg.Connection, rows: list[Row]) -> int | None:
    """MERGE the batch table into the table: the rows changed; None, having written nothing,
    when another transaction inserted one of the batch's new keys meanwhile."""
    shop_runs = runs(rows)
    try:
        async with conn.transaction():  # a savepoint; its rollback also undoes the SET LOCAL
            if shop_runs is None:
                await conn.execute(LOOKUP_PER_ROW)
                status = await conn.execute(MERGE)
                return _rows_affected(status)
            await conn.execute(WALK_RUNS)
            changed = 0
            for shop, first, last in shop_runs:
                status = await conn.execute(MERGE_RUN, shop, first, last)
                changed += _rows_affected(status)
            return changed
    except asyncpg.UniqueViolationError:
        return None


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("worker") / "migrations"
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.name, item.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations not yet applied; safe when several workers start together."""
    applied_now = []
    async with conn.transaction():
        # Serializes concurrent starters; released at COMMIT. The losers then see the versions
        # the winner applied and skip them.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied_now.append(name)
    return applied_now


async def ensure_database(dsn: str) -> None:
    """Create the database named in the DSN when it does not exist yet (and the role may)."""
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await admin.execute(f"CREATE DATABASE {quoted}")
        log.info("created the database", extra={"database": name})
    except asyncpg.DuplicateDatabaseError:
        pass  # another worker created it first
    finally:
        await admin.close()


# The age in days, not an instant: a time parameter would need a datetime on an ordinary
# connection and an int on the worker's (open_pool), and this runs on both. At most $2 rows a
# statement: each stays short, well within the command timeout, however much has piled up.
PURGE_REJECTED = """
DELETE FROM rejected_records WHERE id IN (
    SELECT id FROM rejected_records WHERE received_at < now() - $1 * interval '1 day' LIMIT $2)
"""
PURGE_CHUNK = 10_000


async def purge_rejected(
    db: asyncpg.Pool | asyncpg.Connection, older_than_days: float, chunk: int = PURGE_CHUNK
) -> int:
    """Delete rejected records received more than so many days ago (they hold personal data).

    In statements of at most `chunk` rows, until none is left.
    """
    purged = 0
    while True:
        deleted = _rows_affected(await db.execute(PURGE_REJECTED, float(older_than_days), chunk))
        purged += deleted
        if deleted < chunk:
            return purged
