"""Faults: a worker killed with SIGKILL mid-batch loses nothing that was answered 200."""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from common.settings import Settings
from tests.conftest import connect_migrated, count_at_least, post, wait_until

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
SHOP = "kill-shop"


def expected_rows(events: list[tuple[str, dict[str, Any]]]) -> dict[int, tuple[Any, ...]]:
    """An independent oracle: every customer's events have distinct times, so the newest wins."""
    newest: dict[int, tuple[datetime, str, dict[str, Any]]] = {}
    created: dict[int, datetime] = {}
    for event, record in events:
        cid = record["customer_id"]
        when = datetime.fromisoformat(record[f"{_TIME[event]}"])
        if event == "create":
            created[cid] = when
        if cid not in newest or when > newest[cid][0]:
            newest[cid] = (when, event, record)
    return {
        cid: (
            None if event == "delete" else record["email"],
            created.get(cid),
            when if event == "delete" else None,
        )
        for cid, (when, event, record) in newest.items()
    }


_TIME = {"create": "creation_time", "update": "last_update_time", "delete": "deletion_time"}


def make_events(customers: int, rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    for cid in range(1, customers + 1):
        t = T0 + timedelta(seconds=cid)
        events.append(
            (
                "create",
                {
                    "customer_id": cid,
                    "email": f"c{cid}@example.cz",
                    "code": None,
                    "creation_time": t.isoformat(),
                },
            )
        )
        if rng.random() < 0.6:
            events.append(
                (
                    "update",
                    {
                        "customer_id": cid,
                        "email": f"u{cid}@example.cz",
                        "code": "X",
                        "last_update_time": (t + timedelta(hours=1)).isoformat(),
                    },
                )
            )
        if rng.random() < 0.2:
            events.append(
                (
                    "delete",
                    {
                        "customer_id": cid,
                        "email": f"u{cid}@example.cz",
                        "code": "X",
                        "deletion_time": (t + timedelta(hours=2)).isoformat(),
                    },
                )
            )
    rng.shuffle(events)  # arrival order is not event order
    return events


@pytest.mark.fault
async def test_sigkill_mid_batch_then_restart_loses_nothing(
    settings: Settings, receiver_url: str, http: aiohttp.ClientSession, spawn: Any
) -> None:
    rng = random.Random(7)
    events = make_events(12_000, rng)
    worker = spawn("worker", WORKER_PREFETCH="8", BATCH_MAX_RECORDS="2000")
    conn = await wait_until(lambda: connect_migrated(settings))
    try:
        sender = asyncio.create_task(_send_all(http, receiver_url, events, per_request=600))
        kills = 0
        for threshold in (1, 4_000, 8_000):
            await wait_until(lambda t=threshold: count_at_least(conn, t), timeout=60)
            worker.kill()  # SIGKILL: no chance to finish, ack or close anything
            await asyncio.to_thread(worker.wait)
            kills += 1
            worker = spawn("worker", WORKER_PREFETCH="8", BATCH_MAX_RECORDS="2000")
        await sender
        want = expected_rows(events)

        async def stored() -> dict[int, tuple[Any, ...]]:
            rows = await conn.fetch(
                "SELECT customer_id, email, created_at, deleted_at FROM customers"
                " WHERE project_name = $1",
                SHOP,
            )
            return {r["customer_id"]: (r["email"], r["created_at"], r["deleted_at"]) for r in rows}

        with contextlib.suppress(AssertionError):
            await wait_until(lambda: _equal(stored(), want), timeout=60, interval=0.5)
        got = await stored()
        missing = sorted(set(want) - set(got))
        wrong = sorted(cid for cid in want if cid in got and got[cid] != want[cid])
        assert (missing[:5], wrong[:5], len(got)) == ([], [], len(want))
        assert kills == 3
        assert await conn.fetchval("SELECT count(*) FROM customers") == len(want)
    finally:
        await conn.close()


async def _equal(got: Any, want: dict[int, tuple[Any, ...]]) -> bool:
    return bool(await got == want)


async def _send_all(
    http: aiohttp.ClientSession,
    url: str,
    events: list[tuple[str, dict[str, Any]]],
    per_request: int,
) -> None:
    """Send like Upgates: one event per request, and retry anything that is not 200."""
    by_event: dict[str, list[dict[str, Any]]] = {"create": [], "update": [], "delete": []}
    for event, record in events:
        by_event[event].append(record)
    requests = [
        (event, records[start : start + per_request])
        for event, records in by_event.items()
        for start in range(0, len(records), per_request)
    ]
    random.Random(11).shuffle(requests)  # updates and deletes may come before their create
    for event, chunk in requests:
        payload = {"project_name": SHOP, "customers": chunk}
        while (await post(http, url, event, payload))[0] != 200:  # noqa: ASYNC110 - a sender's retry
            await asyncio.sleep(0.1)
