"""The fold against the real database: batches written by store.write_batch end in the oracle table.

Each hypothesis example delivers the events (shuffled, some repeated) in random consecutive
batches, one write_batch per batch as a worker does; whatever the split, the customers table must
be the time-ordered replay of the events (tests/support/oracle.py).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import astuple

from tests.support.config import PG_ADMIN
from tests.support.events import Event, delivered, events_strategy
from tests.support.oracle import oracle
from worker import store
from worker.fold import FIRST_US, LAST_US, Row, as_datetime, decode_payload, fold, micros
from worker.store import RejectedFrom, migrate, open_pool, write_batch

KINDS = ("create", "update", "delete")
COLUMNS = (
    "project_name, customer_id, email, code, active_yn, blocked_yn, "
    "created_at, updated_at, deleted_at"
)


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database; a pool of two connections to it."""
    conn = await asyncpg.connect(database)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    async with open_pool(database, min_size=2, max_size=2) as created:
        yield created


@pytest.fixture
async def czech_pool() -> AsyncIterator[asyncpg.Pool]:
    """A migrated database whose default collation is Czech (ICU), as a Czech shop's may be."""
    name = f"test_cs_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(
            f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"
            " LOCALE_PROVIDER icu ICU_LOCALE 'cs-CZ' LOCALE 'C.UTF-8'"
        )
    finally:
        await admin.close()
    dsn = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    async with open_pool(dsn, min_size=1, max_size=2) as created:
        yield created
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


TIMES = ("created_at", "updated_at", "deleted_at")


async def table(pool: asyncpg.Pool) -> dict[tuple[str, int], dict[str, Any]]:
    """The customers table, its times as datetimes (the pool gives them as fold's ints)."""
    rows = await pool.fetch(f"SELECT {COLUMNS} FROM customers")  # noqa: S608
    found = {}
    for r in rows:
        row = dict(r)
        for column in TIMES:
            if row[column] is not None:
                row[column] = as_datetime(row[column])
        found[(r["project_name"], r["customer_id"])] = row
    return found


async def write_in_batches(pool: asyncpg.Pool, batches: list[list[Event]]) -> None:
    for batch in batches:
        await write_batch(pool, fold([event.to_row() for event in batch]), [])


@st.composite
def split(draw: st.DrawFn, events: list[Event]) -> list[list[Event]]:
    """The events cut into random consecutive, non-empty batches."""
    cuts = sorted(draw(st.sets(st.integers(1, len(events) - 1))) if len(events) > 1 else set())
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in pairwise(bounds)]


@pytest.fixture(params=["runs", "lookups"])
def merge_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """How a batch of one event finds its rows: these tests' few ids always make runs, so
    "lookups" allows no shop a run, as a batch of sparse ids would have it."""
    if request.param == "lookups":
        monkeypatch.setattr(store, "RUN_SHOPS", 0)


@pytest.mark.usefixtures("merge_by")
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=delivered(events_strategy(max_size=16)), data=st.data())
async def test_batches_end_in_the_time_ordered_replay(
    pool: asyncpg.Pool, case: tuple[list[Event], list[Event]], data: st.DataObject
) -> None:
    distinct, arrivals = case
    batches = data.draw(split(arrivals), label="batches")
    await pool.execute("TRUNCATE customers")
    await write_in_batches(pool, batches)
    assert await table(pool) == oracle(distinct)


def worker_events(worker: int) -> list[Event]:
    """One worker's batch: events of 300 customers in two shops, most also in the other batch.

    Each batch has three events per key at seeded random seconds and of random kinds, so per key
    either batch may hold the newest event, the newest create or the newest update; both also
    hold one shared event. Customers above 250 are in batch 0 only.
    """
    events = []
    for cid in range(1, 301):
        if cid > 250 and worker == 1:
            continue
        rnd = random.Random(f"{worker}-{cid}")
        seconds = rnd.sample((0, 1, 2, 4, 5, 6), 3)
        for second, kind in [*((s, rnd.choice(KINDS)) for s in seconds), (3, KINDS[cid % 3])]:
            # Same key, second and kind: the same event (no same-second ties between batches).
            active = (cid + second + len(kind)) % 3 == 0
            for project in ("shop-a", "shop-b"):
                email = f"{cid}-{second}-{kind}@x.cz"
                events.append(Event(project, kind, cid, second, email, f"K{second}", active, None))
    return events


async def test_concurrent_batches_over_the_same_keys(pool: asyncpg.Pool) -> None:
    # Two workers writing overlapping customers at once (both batches in key order, as folded),
    # each newer on some keys, older on others: the table ends as the replay of all events.
    first, second = worker_events(0), worker_events(1)
    expected = oracle(first + second)
    for _ in range(3):  # both orders of arrival, and a repeat onto existing rows
        await asyncio.gather(write_in_batches(pool, [first]), write_in_batches(pool, [second]))
        assert await table(pool) == expected
        await asyncio.gather(write_in_batches(pool, [second]), write_in_batches(pool, [first]))
        assert await table(pool) == expected
        await pool.execute("TRUNCATE customers")
    # Serially, each order: the older batch arriving last changes nothing.
    for order in ((first, second), (second, first)):
        await write_in_batches(pool, list(order))
        assert await table(pool) == expected
        await pool.execute("TRUNCATE customers")


def updates_of(worker: int) -> list[Event]:
    """One worker's batch of updates only: 300 customers in two shops, at seeded seconds, so
    either batch may be the newer for a key; customers above 250 are in batch 0 only."""
    events = []
    for cid in range(1, 301):
        if cid > 250 and worker == 1:
            continue
        second = random.Random(f"{worker}-{cid}").randrange(1, 7)
        active = None if cid % 4 == 0 else (cid + worker) % 2 == 0  # some carry no status
        for project in ("shop-a", "shop-b"):
            email = f"{cid}-{worker}-{second}@x.cz"
            events.append(Event(project, "update", cid, second, email, f"W{worker}", active, None))
    return events


@pytest.mark.usefixtures("merge_by")
async def test_concurrent_batches_of_one_event_over_the_same_keys(pool: asyncpg.Pool) -> None:
    # A batch of one event is MERGEd, not upserted. Two workers updating overlapping customers
    # at once, each newer on some keys, half of the customers not in the table yet (both insert
    # them: one meets the other's new keys and falls back to the upsert): the table ends as the
    # replay of all events, whichever comes first.
    existing = [
        Event(project, "create", cid, 0, f"{cid}@x.cz", "C", True, False)
        for cid in range(1, 151)
        for project in ("shop-a", "shop-b")
    ]
    first, second = updates_of(0), updates_of(1)
    expected = oracle(existing + first + second)
    for order in ((first, second), (second, first), (first, second)):
        await pool.execute("TRUNCATE customers")
        await write_in_batches(pool, [existing])
        await asyncio.gather(*(write_in_batches(pool, [batch]) for batch in order))
        assert await table(pool) == expected


@pytest.mark.usefixtures("merge_by")
async def test_a_key_inserted_while_a_batch_of_updates_is_merged(database: str) -> None:
    # MERGE inserts a customer it does not find, and cannot settle one that another transaction
    # inserts meanwhile (a unique violation): the batch is then upserted instead, by event time,
    # and reported as such. Without that, the whole batch would be dead-lettered as bad data.
    conn = await asyncpg.connect(database)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    older = Event("shop-a", "create", 2, 1, "old@x.cz", "C", True, False)
    newer = [Event("shop-a", "update", cid, 5, f"{cid}@x.cz", "U", None, None) for cid in (1, 2)]
    async with (
        open_pool(database, min_size=1, max_size=1) as other,
        open_pool(database, min_size=1, max_size=1) as pool,
    ):
        async with other.acquire() as first, first.transaction():
            await first.execute(store.CREATE_BATCH_TABLE)
            await first.copy_records_to_table(
                store.BATCH_TABLE,
                schema_name="pg_temp",
                columns=store.BATCH_COLUMNS,
                records=[astuple(older.to_row())],
            )
            await first.execute(store.UPSERT)  # customer 2, not committed yet
            merging = asyncio.create_task(write_batch(pool, fold([e.to_row() for e in newer]), []))
            await asyncio.sleep(0.5)  # the MERGE waits for the other insert's outcome
            assert not merging.done()
        assert await merging == {1: 2}
        assert await table(pool) == oracle([older, *newer])


def test_runs_are_each_shops_first_and_last_id_when_dense_enough() -> None:
    def rows(*keys: tuple[str, int]) -> list[Row]:
        return [Event(p, "update", cid, 1, "a@x.cz", "K", None, None).to_row() for p, cid in keys]

    assert store.runs(rows(("a", 5), ("a", 6), ("a", 8), ("b", 1))) == [("a", 5, 8), ("b", 1, 1)]
    assert store.runs(rows(("a", 1), ("a", 4))) == [("a", 1, 4)]  # 4 ids for 2 rows: dense enough
    assert store.runs(rows(("a", 1), ("a", 5))) is None  # 5 ids for 2 rows: looked up
    assert store.runs(rows(("a", 1), ("b", 1), ("c", 1), ("d", 1))) is not None
    assert store.runs(rows(("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1))) is None


async def test_a_run_of_updates_changes_only_its_customers(pool: asyncpg.Pool) -> None:
    # A bulk update over a run of ids is merged by walking that range of the key: customers in
    # the range but not in the batch, the same ids in another shop, and a newer row already
    # there stay as they are; ids past the table's end are inserted.
    existing = [
        Event(project, "create", cid, 0, f"{cid}@x.cz", "C", True, False)
        for project in ("shop-a", "shop-b")
        for cid in range(1, 41)
    ]
    newer = Event("shop-a", "update", 24, 5, "newer@x.cz", "N", True, False)
    bulk = [
        Event("shop-a", "update", cid, 3, f"{cid}@y.cz", "U", False, True)
        for cid in range(20, 45, 2)
    ]
    rows = fold([event.to_row() for event in bulk])
    assert store.runs(rows) == [("shop-a", 20, 44)]
    await write_in_batches(pool, [existing, [newer]])
    assert await write_batch(pool, rows, []) == {1: len(bulk) - 1}  # not 24: its row is newer
    assert await table(pool) == oracle([*existing, newer, *bulk])


async def test_rejected_records_are_stored_with_the_rows(pool: asyncpg.Pool) -> None:
    # One batch holds rows and rejected records: both land, and a redelivery adds nothing twice.
    body = (
        b'{"project_name": "shop-a", "customers": ['
        b'{"customer_id": 1, "last_update_time": "2024-01-15T10:00:00+01:00", "email": "a@x.cz"},'
        b'{"customer_id": "x", "last_update_time": "2024-01-15T10:00:00+01:00"},'
        b'{"customer_id": 2, "last_update_time": "2024-01-15T10:00:00+01:00", "email": "\\u0000"}'
        b"]}"
    )
    project, rows, rejected = decode_payload("update", body)
    received = datetime(2024, 1, 15, 9, 0, 1, tzinfo=UTC)
    batch = [RejectedFrom(project, micros(received), "req-1", r) for r in rejected]
    for _ in range(2):
        await write_batch(pool, fold(rows), batch)
    assert [(k, v["email"]) for k, v in (await table(pool)).items()] == [(("shop-a", 1), "a@x.cz")]
    stored = await pool.fetch(
        "SELECT project_name, event, reason, record, received_at, position"
        " FROM rejected_records ORDER BY position"
    )
    assert [(r["project_name"], r["event"], r["position"]) for r in stored] == [
        ("shop-a", "update", 1),
        ("shop-a", "update", 2),
    ]
    assert "customer_id" in stored[0]["reason"]
    assert "NUL" in stored[1]["reason"]
    assert stored[1]["record"] == rejected[1].record
    assert all(as_datetime(r["received_at"]) == received for r in stored)


async def test_same_second_tiebreak_follows_code_points_under_any_collation(
    czech_pool: asyncpg.Pool,
) -> None:
    # Same second, same event, different email: the database must pick the event Python's fold
    # picks (code-point order), not the one the database's collation would sort last. In Czech,
    # "ch" sorts after "h" and case comes second; in code points, "ch" < "h" and "Z" < "a".
    for emails in (("ch@x.cz", "h@x.cz"), ("Zoe@x.cz", "adam@x.cz")):
        events = [Event("shop-a", "update", 1, 0, email, None, None, None) for email in emails]
        for order in (events, events[::-1]):
            await czech_pool.execute("TRUNCATE customers")
            await write_in_batches(czech_pool, [[order[0]], [order[1]]])
            assert await table(czech_pool) == oracle(events)
            assert (await table(czech_pool))[("shop-a", 1)]["email"] == max(emails)


@pytest.mark.parametrize(
    ("one", "other"),
    [(("a@x.cz", None), ("a@x.cz", "")), ((None, "K"), ("", "K"))],
    ids=["code", "email"],
)
async def test_null_and_empty_text_in_the_same_second_any_order(
    pool: asyncpg.Pool, one: tuple[str | None, str | None], other: tuple[str | None, str | None]
) -> None:
    # Two updates of one customer in the same second, differing only in null vs "": the contract
    # promises the same table for any order of arrival.
    a = Event("shop-a", "update", 1, 0, one[0], one[1], None, None)
    b = Event("shop-a", "update", 1, 0, other[0], other[1], None, None)
    await write_in_batches(pool, [[a], [b]])
    a_then_b = await table(pool)
    await pool.execute("TRUNCATE customers")
    await write_in_batches(pool, [[b], [a]])
    assert await table(pool) == a_then_b


async def test_a_batch_of_creates_is_inserted_or_else_folded(pool: asyncpg.Pool) -> None:
    # A batch of creates is first COPY'd straight into the table (new customers, an import). A
    # key that exists makes that fail and leaves nothing behind: the upsert then decides by
    # event time.
    def creates(cids: range, second: int) -> list[Event]:
        return [
            Event("shop-a", "create", cid, second, f"c{cid}@x.cz", "C", True, False) for cid in cids
        ]

    new = creates(range(1, 6), 1)
    assert await write_batch(pool, fold([e.to_row() for e in new]), []) == {0: 5}
    newer_update = Event("shop-a", "update", 7, 3, "u7@x.cz", "U", None, None)
    await write_in_batches(pool, [[newer_update]])
    late = creates(range(6, 9), 2)  # customer 7 exists, with a newer update
    # All three change the table (7 gains its creation time) and count as creates, the event
    # of their row in the batch.
    assert await write_batch(pool, fold([e.to_row() for e in late]), []) == {0: 3}
    assert await table(pool) == oracle([*new, newer_update, *late])
    # Sent again: every key exists and nothing is newer; nothing changes.
    assert await write_batch(pool, fold([e.to_row() for e in late]), []) == {}
    assert await table(pool) == oracle([*new, newer_update, *late])


async def test_concurrent_batches_of_creates_over_the_same_keys(pool: asyncpg.Pool) -> None:
    # Two workers insert the same new customers at once: one waits for the other, finds the keys
    # taken, and folds its creates into the rows instead.
    first = [
        Event("shop-a", "create", cid, 1, f"a{cid}@x.cz", "A", True, None) for cid in range(1, 301)
    ]
    second = [
        Event("shop-a", "create", cid, 2, f"b{cid}@x.cz", "B", False, None) for cid in range(1, 301)
    ]
    await asyncio.gather(write_in_batches(pool, [first]), write_in_batches(pool, [second]))
    assert await table(pool) == oracle(first + second)


async def test_times_travel_as_microseconds_both_ways(pool: asyncpg.Pool) -> None:
    # The worker's connections exchange a time as the int8 Postgres stores, microseconds since
    # 2000-01-01 UTC (how fold.Row holds it): exact both ways, at both ends of the range.
    for value in (FIRST_US, -1, 0, 1, 758_626_200_123_456, LAST_US):
        assert await pool.fetchval("SELECT $1::timestamptz", value) == value
        text = as_datetime(value).isoformat()
        assert await pool.fetchval("SELECT $1::timestamptz = $2::text::timestamptz", value, text)
    assert await pool.fetchval("SELECT $1::timestamptz = '2000-01-01 00:00:00+00'", 0)
