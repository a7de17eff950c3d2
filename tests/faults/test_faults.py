"""Faults of a worker: SIGKILL and SIGTERM mid-batch, and a message that kills it every time.

Nothing answered 200 is lost: the customers table ends equal to the fold of every event answered
200, with no duplicates. For exact timing, tests/support/proxy.py sits between the worker and
Postgres and holds the worker's traffic at one point of its transaction while the test kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import msgspec
import pytest

from common.message import Webhook, pack
from common.settings import Settings
from common.topology import BUNDLE_ROUTING_KEY, EXCHANGE
from tests.support.broker import dead_letters
from tests.support.database import connect_migrated, count_at_least
from tests.support.load import Sender, make_record, post
from tests.support.oracle import Oracle, assert_table_matches
from tests.support.processes import Proc, Procs, assert_serving
from tests.support.proxy import Proxy, port_of, start_proxy, with_port
from tests.support.waiting import wait_until

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
SHOP = "kill-shop"


def expected_rows(events: list[tuple[str, dict[str, Any]]]) -> dict[int, tuple[Any, ...]]:
    """The oracle's rows of the shop: (email, created_at, deleted_at) by customer."""
    oracle = Oracle()
    for event, record in events:
        oracle.accepted(SHOP, event, [record])
    columns = ("email", "created_at", "deleted_at")
    return {cid: row for (_, cid), row in oracle.expected(columns).items()}


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


# Where the proxy between the worker and Postgres stops the worker's transaction for the kill:
# (direction, bytes that chunk holds, the state Postgres must show for the worker's session).
PHASES = {
    # BEGIN written by the worker, not yet received by Postgres: nothing begun.
    "before": ("up", b"BEGIN", "idle"),
    # The upsert executed, COMMIT not yet received: an open transaction.
    "during": ("up", b"COMMIT", "idle in transaction"),
    # Postgres committed; its CommandComplete "COMMIT" has not reached the worker, which
    # therefore has not acked: RabbitMQ delivers the batch again.
    "after": ("down", b"COMMIT\x00", "idle"),
}


async def worker_sessions(dsn: str) -> list[str]:
    """The states of the other sessions on the test database (the worker's pool)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT state FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return sorted(r["state"] for r in rows)


async def worker_behind_proxy(settings: Settings, proxies: list[Proxy]) -> tuple[Proxy, Settings]:
    pg = await start_proxy(proxies, "127.0.0.1", port_of(settings.database_url))
    return pg, replace(settings, database_url=with_port(settings.database_url, pg.port))


@pytest.mark.fault
@pytest.mark.parametrize("phase", PHASES)
async def test_sigkill_worker_at_a_point_of_its_transaction(
    phase: str, settings: Settings, procs: Procs, proxies: list[Proxy]
) -> None:
    pg, through_proxy = await worker_behind_proxy(settings, proxies)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(through_proxy)
    direction, marker, state = PHASES[phase]
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(20)
        pg.hold_when(lambda d, data: d == direction and marker in data)
        await asyncio.wait_for(pg.held.wait(), 10)
        sessions = await worker_sessions(settings.database_url)
        worker.popen.kill()  # SIGKILL: no chance to finish, ack or close anything
        await worker.wait()
        pg.cut()  # Postgres sees the dead worker's connections go
        pg.release()
        assert state in sessions, sessions
        if phase != "during":
            assert "idle in transaction" not in sessions, sessions
        worker = await procs.worker(through_proxy)
        await sender.wait_ok(40)
        await sender.stop()
    await assert_table_matches(settings.database_url, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_sigterm_worker_mid_transaction_finishes_its_batch(
    settings: Settings, procs: Procs, proxies: list[Proxy]
) -> None:
    # SIGTERM while a batch is inside its transaction: the worker commits it, acks it, finishes
    # what it was already sent, and exits 0 within the grace period; a new worker takes the rest.
    pg, through_proxy = await worker_behind_proxy(settings, proxies)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(through_proxy)
    async with Sender(receiver.url, concurrency=6) as sender:
        await sender.wait_ok(20)
        pg.hold_when(lambda d, data: d == "up" and b"COMMIT" in data)
        await asyncio.wait_for(pg.held.wait(), 10)
        worker.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # the signal lands while the transaction is open
        pg.release()
        code = await worker.wait(settings.shutdown_grace + 5)
        assert code == 0, worker.output()[-3000:]
        assert "worker stopped" in worker.output()
        worker = await procs.worker(through_proxy)
        await sender.wait_ok(40)
        await sender.stop()
    await assert_table_matches(settings.database_url, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


async def kill_at_each_write(
    pg: Proxy,
    procs: Procs,
    worker: Proc,
    settings: Settings,
    marker: bytes,
    max_kills: int,
) -> tuple[Proc, int]:
    """SIGKILL the worker whenever it starts writing `marker` (as an out-of-memory kill would),
    until the dead-letter queue holds a message; (the worker running now, the kills).

    The worker reaches Postgres through `pg`; `settings` are the worker's, through it.
    """

    def written(direction: str, data: bytes) -> bool:
        return direction == "up" and marker in data

    kills = 0
    deadline = asyncio.get_running_loop().time() + 90
    pg.hold_when(written)
    while not await dead_letters(settings.amqp_url):
        assert asyncio.get_running_loop().time() < deadline, f"not dead-lettered ({kills} kills)"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pg.held.wait(), 1)
        if not pg.held.is_set():
            continue
        kills += 1
        assert kills <= max_kills, "the killer keeps coming back past the delivery limit"
        worker.popen.kill()
        await worker.wait()
        pg.cut()
        pg.release()
        pg.hold_when(written)
        worker = await procs.worker(settings)
    return worker, kills


@pytest.mark.fault
async def test_message_that_kills_its_worker_every_time_is_dead_lettered(
    settings: Settings, procs: Procs, proxies: list[Proxy]
) -> None:
    # A message that crashes any worker that takes it (here: the worker is SIGKILLed whenever
    # it starts writing the poison's batch, as an out-of-memory kill would) must end in the
    # dead-letter queue once the delivery limit is reached, with RabbitMQ's reason, and the
    # steady traffic around it must all land.
    limit = 2
    settings = replace(settings, delivery_limit=limit)
    pg, through_proxy = await worker_behind_proxy(settings, proxies)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(through_proxy)

    async with Sender(receiver.url) as sender:
        await sender.wait_ok(20)
        poison = {"project_name": "poison-shop", "customers": [make_record("create", 1, 0)]}
        status, _ = await sender.post("create", poison)
        assert status == 200
        # Its first delivery, then one per allowed redelivery; one more when it came bundled
        # with the steady traffic (the bundle's delivery, before it was split).
        worker, kills = await kill_at_each_write(
            pg, procs, worker, through_proxy, b"poison-shop", max_kills=limit + 2
        )
        assert kills >= limit + 1
        parked = await dead_letters(settings.amqp_url)
        await sender.wait_ok(40)
        await sender.stop()
    assert not pg.held.is_set(), "the poison was delivered again after the limit"
    shops = [headers.get("x-project-name") for headers, _ in parked]
    # Messages that only shared a worker with the poison were answered 200: they must land.
    await assert_table_matches(
        settings.database_url,
        sender.oracle,
        timeout=5,
        logs=f"dead-lettered messages by shop: {shops}",
    )
    assert shops == ["poison-shop"], f"dead-lettered: {shops}"
    headers, body = parked[0]
    assert "delivery_limit" in str(headers.get("x-death")), headers
    assert msgspec.json.decode(body) == poison
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_a_worker_killer_in_a_bundle_is_dead_lettered_alone(
    settings: Settings, procs: Procs, proxies: list[Proxy]
) -> None:
    # Small webhooks travel in bundles. One of a bundle's webhooks kills any worker that writes
    # it: the redelivered bundle is split into one message per webhook, so the killer alone
    # meets the delivery limit and its bundle-mates, answered 200 with it, land.
    limit = 2
    settings = replace(settings, delivery_limit=limit)
    pg, through_proxy = await worker_behind_proxy(settings, proxies)
    worker = await procs.worker(through_proxy)
    now = int(datetime.now(UTC).timestamp() * 1000)

    def webhook(shop: str, cid: int) -> Webhook:
        body = msgspec.json.encode(
            {"project_name": shop, "customers": [make_record("create", cid, 0)]}
        )
        return Webhook("create", shop, 1, now, f"{shop}-{cid}", body)

    innocents = [webhook("bundle-shop", cid) for cid in (1, 2, 3)]
    killer = webhook("poison-shop", 9)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE)
        bundle = pack([innocents[0], killer, *innocents[1:]])
        await exchange.publish(bundle, BUNDLE_ROUTING_KEY, mandatory=True)
    worker, kills = await kill_at_each_write(
        pg, procs, worker, through_proxy, b"poison-shop", max_kills=limit + 2
    )

    [(headers, body)] = await dead_letters(settings.amqp_url)
    assert headers.get("x-request-id") == "poison-shop-9", headers
    assert "delivery_limit" in str(headers.get("x-death")), headers
    assert body == killer.body
    conn = await connect_migrated(settings)
    assert conn is not None
    try:
        await wait_until(lambda: count_at_least(conn, 3), timeout=15)
        rows = await conn.fetch("SELECT project_name, customer_id FROM customers ORDER BY 1, 2")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("bundle-shop", 1), ("bundle-shop", 2), ("bundle-shop", 3)]
    # First the bundle, then the killer alone at each of its deliveries.
    assert kills == 1 + limit + 1, kills
