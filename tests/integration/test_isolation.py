"""A message that fails for a reason of its own is dead-lettered alone; a systemic failure waits."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg

from common.settings import Settings
from tests.support.broker import take_dead_letters
from tests.support.load import post
from tests.support.waiting import wait_until
from worker.service import Worker


def payload(*ids: int, code: str = "C") -> dict[str, object]:
    return {
        "project_name": "iso-shop",
        "customers": [
            {"customer_id": i, "code": code, "creation_time": "2025-02-02T10:00:00+01:00"}
            for i in ids
        ],
    }


async def test_a_value_the_database_refuses_dead_letters_only_its_message(
    settings: Settings,
    receiver_url: str,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
    worker: Worker,
) -> None:
    # A rule the records cannot know about: the database refuses this code (SQLSTATE 23514).
    await db.execute(
        "ALTER TABLE customers ADD CONSTRAINT no_poison CHECK (code IS DISTINCT FROM 'POISON')"
    )
    # At once, so that they usually share a batch: the good ones must not fail with it.
    bodies = (payload(1, 2), payload(3, code="POISON"), payload(4, 5))
    answers = await asyncio.gather(*(post(http, receiver_url, "create", b) for b in bodies))
    assert [status for status, _ in answers] == [200, 200, 200]
    await wait_until(lambda: db.fetchval("SELECT count(*) = 4 FROM customers"))
    letters = await wait_until(lambda: take_dead_letters(settings))
    assert len(letters) == 1
    assert letters[0].headers["x-error"] == "write failed: CheckViolationError 23514"
    assert b"POISON" in letters[0].body
    assert sorted(await db.fetchval("SELECT array_agg(customer_id) FROM customers")) == [1, 2, 4, 5]


async def test_a_systemic_failure_is_retried_not_dead_lettered(
    settings: Settings,
    receiver_url: str,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
    worker: Worker,
) -> None:
    await db.execute("ALTER TABLE customers RENAME TO customers_elsewhere")
    for i in range(3):
        assert (await post(http, receiver_url, "create", payload(i)))[0] == 200
    await wait_until(lambda: _retried(worker, 3))
    assert await take_dead_letters(settings) == []
    # The operator fixes it; the waiting messages go through.
    await db.execute("ALTER TABLE customers_elsewhere RENAME TO customers")
    await wait_until(lambda: db.fetchval("SELECT count(*) = 3 FROM customers"))
    assert await take_dead_letters(settings) == []


async def _retried(worker: Worker, n: int) -> bool:
    retries = worker.metrics.registry.get_sample_value("upgates_worker_retries_total") or 0
    await asyncio.sleep(0)
    return retries >= n
