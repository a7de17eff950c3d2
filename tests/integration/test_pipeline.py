"""End to end: a real receiver, a real worker, RabbitMQ and Postgres; the rows a user would see."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import msgspec
import pytest

from common.settings import Settings
from common.topology import DEAD_QUEUE, EXCHANGE
from tests.support.database import connect_migrated, count_at_least
from tests.support.load import T0, at, create, delete, post, update
from tests.support.processes import exit_code
from tests.support.waiting import wait_until
from worker.pipeline import SPLIT_FROM_RECORDS
from worker.service import Worker

SHOP = "my-shop"


class Shop:
    """Sends webhooks like Upgates and reads the resulting rows."""

    def __init__(self, http: aiohttp.ClientSession, url: str, db: asyncpg.Connection) -> None:
        self.http, self.url, self.db = http, url, db

    async def send(self, event: str, *records: dict[str, Any], shop: str = SHOP) -> None:
        status, body = await post(
            self.http, self.url, event, {"project_name": shop, "customers": list(records)}
        )
        assert status == 200, body
        assert body["accepted"] == len(records)

    async def row(self, cid: int, shop: str = SHOP) -> asyncpg.Record:
        return await self.db.fetchrow(
            "SELECT * FROM customers WHERE project_name = $1 AND customer_id = $2", shop, cid
        )


@pytest.fixture
async def shop(http: aiohttp.ClientSession, receiver_url: str, db: asyncpg.Connection) -> Shop:
    return Shop(http, receiver_url, db)


# --- lenient input --------------------------------------------------------------------------


async def test_lenient_forms_are_all_accepted(shop: Shop) -> None:
    await shop.send(
        "create",
        {
            "customer_id": "7",
            "email": "s@example.cz",
            "code": None,
            "creation_time": "2024-02-29T14:24:49+01:00",
            "active_yn": "1",
            "blocked_yn": "0",
        },
        {
            "customer_id": 8,
            "email": "t@example.cz",
            "code": 123,
            "creation_time": "2024-02-29T14:24:49+0100",
            "active_yn": 1,
            "blocked_yn": 0,
        },
        {
            "customer_id": 9,
            "email": "u@example.cz",
            "code": "C9",
            "creation_time": "2024-02-29T13:24:49Z",
            "active_yn": True,
            "blocked_yn": False,
            "brand_new_attribute": {"nested": [1, 2]},
        },
        # No offset: Europe/Prague local time (summer time here: +02:00).
        {
            "customer_id": 10,
            "email": "v@example.cz",
            "code": "C10",
            "creation_time": "2024-07-01T14:00:00",
            "active_yn": False,
            "blocked_yn": True,
        },
    )
    rows = await wait_until(lambda: _rows(shop.db, 4))
    by_id = {r["customer_id"]: r for r in rows}
    winter = datetime(2024, 2, 29, 13, 24, 49, tzinfo=UTC)
    assert [by_id[i]["created_at"] for i in (7, 8, 9)] == [winter] * 3
    assert by_id[10]["created_at"] == datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
    assert by_id[7]["code"] is None
    assert by_id[8]["code"] == "123"
    assert [(by_id[i]["active_yn"], by_id[i]["blocked_yn"]) for i in (7, 8, 9, 10)] == [
        (True, False),
        (True, False),
        (True, False),
        (False, True),
    ]
    assert await shop.db.fetchval("SELECT count(*) FROM rejected_records") == 0


async def _rows(db: asyncpg.Connection, n: int) -> list[asyncpg.Record] | None:
    rows = await db.fetch("SELECT * FROM customers ORDER BY project_name, customer_id")
    return rows if len(rows) >= n else None


async def test_unusable_records_are_kept_with_reasons_and_the_rest_applied(shop: Shop) -> None:
    await shop.send(
        "update",
        update(1, 10),
        {"email": "no-id@example.cz", "last_update_time": at(1)},
        update("abc", 1),
        update(2**63, 1),
        {"customer_id": 3, "email": "x@example.cz"},
        update(4, 1) | {"last_update_time": "yesterday"},
        update(5, 1, email="nul\u0000@example.cz"),
        update(6, 11),
    )
    rejected = await wait_until(lambda: _rejected(shop.db, 6))
    assert [r["event"] for r in rejected] == ["update"] * 6
    reasons = [r["reason"] for r in rejected]
    assert "customer_id" in reasons[0]  # missing
    assert "customer_id" in reasons[1]  # not a number
    assert "bigint" in reasons[2]
    assert "missing last_update_time" in reasons[3]
    assert "unparseable last_update_time" in reasons[4]
    assert "cannot store" in reasons[5]
    assert all(r["project_name"] == SHOP and r["received_at"] for r in rejected)
    assert '"abc"' in rejected[1]["record"]
    ids = [r["customer_id"] for r in await shop.db.fetch("SELECT customer_id FROM customers")]
    assert sorted(ids) == [1, 6]


async def _rejected(db: asyncpg.Connection, n: int) -> list[asyncpg.Record] | None:
    rows = await db.fetch("SELECT * FROM rejected_records ORDER BY position")
    return rows if len(rows) >= n else None


# --- the event-time fold ------------------------------------------------------------------


async def test_newer_update_applies_and_older_is_ignored(shop: Shop) -> None:
    await shop.send("create", create(1, 0))
    await shop.send("update", update(1, 10, email="new@example.cz"))
    await shop.send("update", update(1, 5, email="old@example.cz"))
    await wait_until(lambda: _row_where(shop, 1, "updated_at", T0 + timedelta(minutes=10)))
    await asyncio.sleep(0.3)
    row = await shop.row(1)
    assert row["email"] == "new@example.cz"
    assert row["created_at"] == T0
    assert row["updated_at"] == T0 + timedelta(minutes=10)
    assert row["deleted_at"] is None


async def _row_where(shop: Shop, cid: int, column: str, value: Any) -> asyncpg.Record | None:
    row = await shop.row(cid)
    return row if row is not None and row[column] == value else None


async def test_delete_erases_and_a_late_older_update_does_not_bring_it_back(shop: Shop) -> None:
    await shop.send("create", create(1, 0))
    await shop.send("delete", delete(1, 20))
    await wait_until(lambda: _row_where(shop, 1, "deleted_at", T0 + timedelta(minutes=20)))
    await shop.send("update", update(1, 10, email="zombie@example.cz"))
    await shop.send("create", create(1, 0, email="zombie@example.cz"))
    await asyncio.sleep(0.5)
    row = await shop.row(1)
    assert row["email"] is None
    assert row["deleted_at"] == T0 + timedelta(minutes=20)
    assert row["created_at"] == T0
    # The late update happened before the delete: in time order it was applied, so it counts.
    assert row["updated_at"] == T0 + timedelta(minutes=10)


async def test_equal_times_delete_beats_update_beats_create(shop: Shop) -> None:
    await shop.send("delete", delete(1, 5))
    await shop.send("update", update(1, 5, email="u@example.cz"))
    await shop.send("create", create(1, 5, email="c@example.cz"))
    await shop.send("create", create(2, 5, email="c@example.cz"))
    await shop.send("update", update(2, 5, email="u@example.cz"))
    await wait_until(lambda: _row_where(shop, 2, "email", "u@example.cz"))
    await asyncio.sleep(0.3)
    assert (await shop.row(1))["email"] is None
    assert (await shop.row(1))["deleted_at"] == T0 + timedelta(minutes=5)
    assert (await shop.row(2))["email"] == "u@example.cz"


async def test_late_create_fills_created_at_and_keeps_newer_data(shop: Shop) -> None:
    await shop.send("update", update(1, 30, email="newest@example.cz"))
    await wait_until(lambda: shop.row(1))
    assert (await shop.row(1))["created_at"] is None
    await shop.send("create", create(1, 0, email="first@example.cz"))
    row = await wait_until(lambda: _row_where(shop, 1, "created_at", T0))
    assert row["email"] == "newest@example.cz"
    assert row["updated_at"] == T0 + timedelta(minutes=30)
    # active_yn/blocked_yn only come with the create: nothing newer said otherwise.
    assert (row["active_yn"], row["blocked_yn"]) == (True, False)


async def test_same_customer_twice_in_one_payload_newest_wins(shop: Shop) -> None:
    await shop.send(
        "update",
        update(1, 9, email="late@example.cz"),
        update(1, 3, email="early@example.cz"),
        update(1, 9, email="late@example.cz"),
    )
    row = await wait_until(lambda: shop.row(1))
    assert row["email"] == "late@example.cz"
    assert row["updated_at"] == T0 + timedelta(minutes=9)


async def test_duplicate_deliveries_change_nothing(shop: Shop) -> None:
    payload = [create(i, i) for i in range(1, 51)]
    for _ in range(3):
        await shop.send("create", *payload)
    await shop.send("update", *[update(i, 100) for i in range(1, 51)])
    await shop.send("create", *payload)
    await wait_until(lambda: _rows(shop.db, 50))
    await asyncio.sleep(0.5)
    rows = await shop.db.fetch("SELECT * FROM customers ORDER BY customer_id")
    assert len(rows) == 50
    assert {r["email"] for r in rows} == {"b@example.cz"}
    assert [r["created_at"] for r in rows] == [T0 + timedelta(minutes=i) for i in range(1, 51)]


async def test_two_shops_with_the_same_ids_stay_apart(shop: Shop) -> None:
    await shop.send("create", create(1, 0, email="one@example.cz"), shop="shop-one")
    await shop.send("create", create(1, 0, email="two@example.cz"), shop="shop-two")
    await shop.send("delete", delete(1, 5), shop="shop-two")
    row_two = await wait_until(lambda: _deleted(shop, "shop-two"))
    assert row_two["email"] is None
    assert (await shop.row(1, "shop-one"))["email"] == "one@example.cz"


async def _deleted(shop: Shop, name: str) -> asyncpg.Record | None:
    row = await shop.row(1, name)
    return row if row is not None and row["deleted_at"] is not None else None


async def test_a_full_5000_record_payload_lands_whole(shop: Shop) -> None:
    records = [create(i, i % 600, email=f"customer{i}@example.cz") for i in range(1, 5001)]
    await shop.send("create", *records)
    await wait_until(lambda: _count(shop.db, 5000))
    assert await shop.db.fetchval("SELECT count(DISTINCT email) FROM customers") == 5000


async def _count(db: asyncpg.Connection, n: int) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM customers") == n)


@pytest.mark.parametrize(
    ("size", "transactions"), [(SPLIT_FROM_RECORDS, 2), (SPLIT_FROM_RECORDS - 1, 1)]
)
async def test_a_batch_of_many_creates_and_updates_is_written_one_event_at_a_time(
    http: aiohttp.ClientSession,
    receiver_url: str,
    settings: Settings,
    size: int,
    transactions: int,
) -> None:
    shop = Shop(http, receiver_url, db=None)  # type: ignore[arg-type] # sends only
    # A long wait for more messages, so that the two webhooks below make one batch.
    worker = Worker(replace(settings, batch_max_wait=1.0))
    task = asyncio.create_task(worker.run())

    def sample(name: str, **labels: str) -> float:
        return worker.metrics.registry.get_sample_value(name, labels) or 0.0

    def batches() -> float:
        return sample("upgates_worker_batch_messages_count")

    async def accepted(records: int) -> bool:
        counts = [
            sample("upgates_worker_records_total", event=event, outcome="accepted")
            for event in ("create", "update")
        ]
        return sum(counts) == records

    try:
        # A worker takes its first delivery alone (it may be one that crashed a worker).
        await shop.send("create", create(0, 0))
        await wait_until(lambda: accepted(1))
        ids = range(1, size + 1)
        await shop.send("update", *(update(i, 10, email="new@example.cz") for i in ids))
        await shop.send("create", *(create(i, 0) for i in ids))
        await wait_until(lambda: accepted(1 + 2 * size))

        db = await connect_migrated(settings)
        try:
            rows = await db.fetch(
                "SELECT email, created_at, updated_at FROM customers WHERE customer_id > 0"
            )
        finally:
            await db.close()
        assert len(rows) == size
        assert {tuple(r) for r in rows} == {("new@example.cz", T0, T0 + timedelta(minutes=10))}
        # Many records of each event: a transaction each, the updates' first (they came first),
        # and the creates' then only fill in the creation time of the customers it inserted.
        assert batches() == 1 + transactions
        changed_creates = size if transactions == 2 else 0  # else folded into the updates' rows
        assert sample("upgates_worker_rows_total", event="create", outcome="changed") == (
            1 + changed_creates
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


# --- messages that can never be applied ------------------------------------------------------


async def test_a_poison_message_is_dead_lettered_and_the_rest_flow(
    shop: Shop, settings: Settings
) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EXCHANGE)
        await exchange.publish(
            aio_pika.Message(b'{"not": "an envelope"}', headers={"x-event": "create"}),
            routing_key="customers.create",
        )
        await exchange.publish(
            aio_pika.Message(
                b'{"project_name": "x", "customers": []}', headers={"x-event": "merge"}
            ),
            routing_key="customers.create",
        )
        await shop.send("create", create(1, 0))
        await wait_until(lambda: shop.row(1))
        dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
        errors = []
        for _ in range(2):
            message = await wait_until(lambda: dead.get(no_ack=True, fail=False))
            errors.append(message.headers["x-error"])
    assert any("not an Upgates customers envelope" in e for e in errors)
    assert any("unknown event" in e for e in errors)


# --- several workers, shutdown ------------------------------------------------------------------


async def test_several_workers_start_together_on_an_empty_database(settings: Settings) -> None:
    workers = [Worker(settings) for _ in range(4)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    await wait_until(lambda: _all_consuming(workers, tasks))
    for w in workers:
        w.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 1
        assert await conn.fetchval("SELECT count(*) FROM customers") == 0
    finally:
        await conn.close()


async def _all_consuming(workers: list[Worker], tasks: list[asyncio.Task[None]]) -> bool:
    for task in tasks:
        if task.done():
            task.result()
    return all(w.consuming for w in workers)


async def test_sigterm_finishes_the_batch_in_hand(
    settings: Settings, receiver_url: str, http: aiohttp.ClientSession, spawn: Any
) -> None:
    proc: subprocess.Popen[bytes] = spawn("worker")
    conn = await wait_until(lambda: connect_migrated(settings))
    try:
        for i in range(20):
            status, _ = await post(
                http,
                receiver_url,
                "create",
                {"project_name": SHOP, "customers": [create(i * 500 + j, 0) for j in range(500)]},
            )
            assert status == 200
        await wait_until(lambda: count_at_least(conn, 1))
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, within=30) == 0
        # What the worker had received is committed (not bounced back); a new worker does the rest.
        other = Worker(replace(settings))
        task = asyncio.create_task(other.run())
        await wait_until(lambda: _count(conn, 10_000), timeout=60)
        other.stop()
        await asyncio.wait_for(task, 20)
    finally:
        await conn.close()


async def test_a_record_that_is_not_utf8_is_rejected_and_its_neighbours_applied(
    shop: Shop,
) -> None:
    # windows-1250 bytes: in a field we keep (the record is rejected), and in a field we ignore
    # (it does not matter).
    in_email = {"customer_id": 2, "email": "nováková@example.cz", "creation_time": at(0)}
    in_unknown = {
        "customer_id": 3,
        "email": "c@example.cz",
        "surname": "Nováková",
        "creation_time": at(0),
    }
    body = b'{"project_name": "%s", "customers": [%s, %s, %s]}' % (
        SHOP.encode(),
        msgspec.json.encode(create(1, 0, email="ok@example.cz")),
        msgspec.json.encode(in_email).decode().encode("cp1250"),
        msgspec.json.encode(in_unknown).decode().encode("cp1250"),
    )
    status, answer = await post(shop.http, shop.url, "create", body)
    assert (status, answer["accepted"]) == (200, 3)
    rejected = await wait_until(lambda: _rejected(shop.db, 1))
    assert rejected[0]["reason"] == "invalid record: text is not valid UTF-8"
    assert "nov\ufffdkov\ufffd@example.cz" in rejected[0]["record"]
    await wait_until(lambda: _rows(shop.db, 2))
    assert (await shop.row(1))["email"] == "ok@example.cz"
    assert await shop.row(2) is None
    assert (await shop.row(3))["email"] == "c@example.cz"


async def test_worker_metrics_count_changed_and_stale_rows_by_event(
    shop: Shop, worker: Worker
) -> None:
    await shop.send("update", update(1, 10, email="new@example.cz"))
    await wait_until(lambda: shop.row(1))
    await shop.send("update", update(1, 5, email="old@example.cz"))
    await shop.send("create", create(2, 0), {"customer_id": "x"})

    def sample(name: str, **labels: str) -> float:
        return worker.metrics.registry.get_sample_value(name, labels) or 0.0

    async def counted() -> bool:
        return sample("upgates_worker_rows_total", event="update", outcome="stale") == 1

    await wait_until(counted)
    await wait_until(lambda: _count(shop.db, 2))
    assert sample("upgates_worker_rows_total", event="update", outcome="changed") == 1
    assert sample("upgates_worker_rows_total", event="create", outcome="changed") == 1
    assert sample("upgates_worker_records_total", event="create", outcome="rejected") == 1
    assert sample("upgates_worker_records_total", event="update", outcome="accepted") == 2
