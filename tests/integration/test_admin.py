"""The operator command: dead letters and rejected records, without printing emails by default."""

from __future__ import annotations

from dataclasses import replace

import aiohttp
import asyncpg

from common import schema
from common.settings import Settings
from tests.support.broker import dead_count, dead_letter
from tests.support.load import ADMIN_CANARY as CANARY
from tests.support.load import post, webhook
from tests.support.services import admin
from tests.support.waiting import wait_until
from worker.retention import apply_retention
from worker.service import Worker


async def test_dead_letters_are_listed_without_emails_and_replayed_safely(
    settings: Settings, worker: Worker, db: asyncpg.Connection
) -> None:
    await dead_letter(settings, webhook(1), **{schema.H_REQUEST_ID: "req-one"})
    await dead_letter(settings, webhook(2), **{schema.H_REQUEST_ID: "req-two"})
    await wait_until(lambda: _dead_at_least(settings, 2))

    status, listing = await admin(settings, "dead", "list")
    assert status == 0
    assert "2 dead letter(s)" in listing
    assert "req-one" in listing
    assert "write failed: test" in listing
    assert CANARY not in listing

    status, shown = await admin(settings, "dead", "show", "1")
    assert status == 0
    assert CANARY not in shown
    assert "hidden" in shown
    _, shown = await admin(settings, "dead", "show", "1", "--show-personal-data")
    assert CANARY in shown
    assert await dead_count(settings) == 2  # looking removes nothing

    status, out = await admin(settings, "dead", "replay", "--request-id", "req-one")
    assert (status, out) == (0, "replayed 1 dead letter(s)")
    row = await wait_until(lambda: db.fetchrow("SELECT * FROM customers WHERE customer_id = 1"))
    assert row["email"] == CANARY
    assert await dead_count(settings) == 1

    # Replaying the same webhook again is harmless: the fold already reflects it.
    await dead_letter(settings, webhook(1), **{schema.H_REQUEST_ID: "req-one"})
    await wait_until(lambda: _dead_at_least(settings, 2))
    status, _ = await admin(settings, "dead", "replay", "--all")
    assert status == 0
    await wait_until(lambda: db.fetchval("SELECT count(*) = 2 FROM customers"))
    assert await db.fetchval("SELECT count(*) FROM customers WHERE customer_id = 1") == 1
    assert await dead_count(settings) == 0


async def _dead_at_least(settings: Settings, n: int) -> bool:
    return await dead_count(settings) >= n


async def test_dead_letters_are_purged_by_age(settings: Settings, worker: Worker) -> None:
    await dead_letter(settings, webhook(1), age_days=40)
    await dead_letter(settings, webhook(2), age_days=1)
    await wait_until(lambda: _dead_at_least(settings, 2))
    status, out = await admin(settings, "dead", "purge", "--older-than", "30", "--yes")
    assert (status, out) == (0, "purged 1 dead letter(s)")
    assert await dead_count(settings) == 1


async def test_rejected_records_are_summarised_hidden_and_purged(
    settings: Settings, receiver_url: str, http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    payload = {
        "project_name": "admin-shop",
        "customers": [{"customer_id": "nope", "email": CANARY, "creation_time": "2025-01-01"}],
    }
    assert (await post(http, receiver_url, "create", payload))[0] == 200
    await wait_until(lambda: db.fetchval("SELECT count(*) FROM rejected_records"))

    status, listing = await admin(settings, "rejected", "list")
    assert status == 0
    assert "1 rejected record(s)" in listing
    assert "customer_id" in listing  # the reason
    assert CANARY not in listing
    record_id = await db.fetchval("SELECT id FROM rejected_records")
    _, shown = await admin(settings, "rejected", "show", str(record_id))
    assert CANARY not in shown
    _, shown = await admin(settings, "rejected", "show", str(record_id), "--show-personal-data")
    assert CANARY in shown

    assert await admin(settings, "rejected", "purge", "--older-than", "1") == (
        0,
        "purged 0 rejected record(s)",
    )
    assert await admin(settings, "rejected", "purge", "--all", "--yes") == (
        0,
        "purged 1 rejected record(s)",
    )


async def test_retention_purges_old_personal_data_only(
    settings: Settings, worker: Worker, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO rejected_records (project_name, event, reason, record, received_at,"
        " request_id, position) VALUES"
        " ('s', 'create', 'r', '{}', now() - interval '40 days', 'old', 0),"
        " ('s', 'create', 'r', '{}', now() - interval '1 day', 'new', 0)"
    )
    await dead_letter(settings, webhook(1), age_days=40)
    await dead_letter(settings, webhook(2), age_days=1)
    await wait_until(lambda: _dead_at_least(settings, 2))
    assert worker.pool is not None
    purged = await apply_retention(replace(settings, rejected_retention_days=30), worker.pool)
    assert purged == (1, 1)
    assert await db.fetchval("SELECT request_id FROM rejected_records") == "new"
    assert await dead_count(settings) == 1
