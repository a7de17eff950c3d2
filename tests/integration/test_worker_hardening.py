"""Worker hardening: several workers on one host, bounded publishes, long Postgres outages that
must not dead-letter anything, and retention that runs soon and in bounded steps. The settings
that refuse values the worker cannot run with are checked in tests/unit/test_worker_settings.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import asyncpg
import msgspec
import pytest

from common import schema
from common.deadletters import H_DEAD_LETTERED_AT
from common.message import Webhook, pack
from common.settings import Settings
from common.topology import DEAD_EXCHANGE, EXCHANGE, QUEUE, ROUTING_KEYS, declare_topology
from tests.support.broker import dead_letters, queue_depth
from tests.support.config import service_settings
from tests.support.load import make_record
from tests.support.processes import (
    alive,
    children_of,
    env_for,
    exit_code,
    free_port,
    kill,
    spawn,
)
from tests.support.servers import PrivatePostgres, PrivateRabbit
from tests.support.services import scraped
from tests.support.waiting import wait_until
from worker import service
from worker.retention import apply_retention
from worker.service import Worker
from worker.store import migrate, purge_rejected

DAY_MS = 86_400_000
SHOP = "hardening-shop"


# --- helpers ----------------------------------------------------------------------------------


def webhook(cid: int) -> Webhook:
    """A create webhook for one customer, as the receiver would have accepted it."""
    body = msgspec.json.encode({"project_name": SHOP, "customers": [make_record("create", cid, 0)]})
    now = int(time.time() * 1000)
    return Webhook("create", SHOP, 1, now, f"{SHOP}-{cid}-{uuid.uuid4().hex[:6]}", body)


async def publish(settings: Settings, messages: list[aio_pika.Message], routing_key: str) -> None:
    """Declare the topology (as the services do) and publish, confirmed."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, settings)
        for message in messages:
            await topology.exchange.publish(message, routing_key, mandatory=True)


async def publish_webhooks(settings: Settings, cids: range) -> None:
    """One message per webhook (a bundle would be split or batched differently)."""
    await publish(settings, [pack([webhook(cid)]) for cid in cids], ROUTING_KEYS["create"])


async def consumers(amqp_url: str) -> int:
    """Consumers of the customer queue right now (0 while it does not exist yet)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(QUEUE, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0
        count = queue.declaration_result.consumer_count
        return int(count or 0)


async def customers(dsn: str, shop: str = SHOP) -> set[int]:
    """The customer ids stored for the shop (empty while the schema is not there)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return set()
    try:
        if not await conn.fetchval("SELECT to_regclass('customers') IS NOT NULL"):
            return set()
        rows = await conn.fetch("SELECT customer_id FROM customers WHERE project_name = $1", shop)
        return {r["customer_id"] for r in rows}
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker in this process, consuming; stopped (and drained) on exit."""
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())

    async def consuming() -> bool:
        if task.done():
            task.result()  # raise what stopped it
        return worker.consuming

    try:
        await wait_until(consuming, timeout=30)
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


class Spawned:
    """`python -m worker` processes in an environment of the test's choosing; killed after."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp_path / f"worker-{len(self.procs)}.log"
        proc = spawn("worker", env=env, log=log)
        self.procs.append((proc, log))
        return proc, log

    def logs(self) -> str:
        return "\n".join(
            f"--- pid {p.pid} rc {p.poll()}\n{log.read_text(errors='replace')[-3000:]}"
            for p, log in self.procs
        )

    def kill_all(self) -> None:
        for proc, _ in self.procs:
            kill(proc)


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[Spawned]:
    started = Spawned(tmp_path)
    yield started
    started.kill_all()


# --- several workers on one host (item 3) -----------------------------------------------------


async def test_two_workers_on_one_host_with_the_default_health_port_both_consume(
    settings: Settings, spawned: Spawned
) -> None:
    # No WORKER_PORT: both want 8081. The second must log it and work on, not die.
    env = env_for(settings)
    del env["WORKER_PORT"], env["WORKER_HOST"]
    first, first_log = spawned.start(env)
    await wait_until(lambda: _consumers_at_least(settings.amqp_url, 1), timeout=30)
    second, second_log = spawned.start(env)
    try:
        await wait_until(lambda: _consumers_at_least(settings.amqp_url, 2), timeout=30)
    except AssertionError as exc:
        raise AssertionError(spawned.logs()) from exc
    warnings = [
        line for line in second_log.read_text().splitlines() if "health port in use" in line
    ]
    assert len(warnings) == 1, spawned.logs()
    assert '"level":"warning"' in warnings[0]
    assert "serving no health endpoint" in warnings[0]

    cids = range(1, 41)
    await publish_webhooks(settings, cids)

    async def all_stored() -> bool:
        return await customers(settings.database_url) == set(cids)

    await wait_until(all_stored, timeout=30)
    assert [first.poll(), second.poll()] == [None, None], spawned.logs()
    # RabbitMQ spreads the messages over both consumers: each wrote some of them.
    for log in (first_log, second_log):
        assert '"msg":"batch committed"' in log.read_text(), spawned.logs()
    for proc in (first, second):
        proc.send_signal(signal.SIGTERM)
    codes = [await exit_code(proc, within=30) for proc in (first, second)]
    assert codes == [0, 0], spawned.logs()


async def _consumers_at_least(amqp_url: str, n: int) -> bool:
    return await consumers(amqp_url) >= n


async def _consuming_gauge(url: str) -> float:
    return await scraped(url, "upgates_worker_consuming")


async def test_worker_processes_consume_side_by_side_and_stop_on_sigterm(
    settings: Settings, spawned: Spawned
) -> None:
    port = free_port()
    env = env_for(settings, WORKER_PROCESSES="2", WORKER_PORT=str(port))
    proc, log = spawned.start(env)
    try:
        await wait_until(lambda: _consumers_at_least(settings.amqp_url, 2), timeout=30)
    except AssertionError as exc:
        raise AssertionError(spawned.logs()) from exc
    children = children_of(proc.pid)
    assert len(children) == 2
    assert await consumers(settings.amqp_url) == 2

    # One port for both, and whichever answers counts both (prometheus multiprocess mode).
    url = f"http://127.0.0.1:{port}"

    async def both_counted() -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            return [await _consuming_gauge(url) for _ in range(6)] == [2.0] * 6
        return False

    await wait_until(both_counted, timeout=20)
    assert "health port in use" not in log.read_text()

    cids = range(1, 31)
    await publish_webhooks(settings, cids)

    async def all_stored() -> bool:
        return await customers(settings.database_url) == set(cids)

    await wait_until(all_stored, timeout=30)
    proc.send_signal(signal.SIGTERM)
    assert await exit_code(proc, within=30) == 0, spawned.logs()
    assert not any(alive(pid) for pid in children)
    assert await consumers(settings.amqp_url) == 0
    assert log.read_text().count('"msg":"worker stopped"') == 2, spawned.logs()


# --- a worker's publishes are bounded (item 7) ------------------------------------------------


@pytest.mark.fault
async def test_a_dead_letter_publish_blocked_by_an_alarm_does_not_hang_the_worker(
    rabbit: PrivateRabbit, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker must dead-letter a message while the broker's memory alarm blocks publishers.
    # The copy cannot be confirmed; the worker gives it up after its deadline, leaves the
    # message unacked, and the good webhooks behind it are written while the alarm lasts.
    settings = service_settings(rabbit.url, database)
    poison = aio_pika.Message(
        b"{}",
        headers={schema.H_EVENT: "no-such-event", schema.H_REQUEST_ID: "poison-1"},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id="poison-1",
    )
    await publish(settings, [poison], ROUTING_KEYS["create"])
    cids = range(1, 6)
    await publish_webhooks(settings, cids)
    await rabbit.memory_alarm(True)
    try:
        assert "memory" in await rabbit.alarms()
        async with running_worker(settings) as worker:
            try:

                async def stored() -> bool:
                    return await customers(database) == set(cids)

                await wait_until(stored, timeout=30)
                assert await dead_letters_count_unblocked(rabbit) == 0
                assert any(
                    "dead letter's copy not confirmed within" in r.getMessage()
                    and r.levelname == "WARNING"
                    for r in caplog.records
                ), [r.getMessage() for r in caplog.records]
            finally:
                await rabbit.memory_alarm(False)

            async def parked() -> list[tuple[dict[str, Any], bytes]]:
                return await dead_letters(rabbit.url)

            letters = await wait_until(parked, timeout=30)
            # The copy given up may still have been stored once the alarm cleared: then the
            # message is there twice (never lost, never anything else).
            assert {h.get(schema.H_REQUEST_ID) for h, _ in letters} == {"poison-1"}

            async def drained() -> bool:
                return await queue_depth(rabbit.url, QUEUE) == 0

            await wait_until(drained, timeout=20)
            assert worker.consuming
    finally:
        await rabbit.memory_alarm(False)


async def dead_letters_count_unblocked(rabbit: PrivateRabbit) -> int:
    """Messages in the dead-letter queue, asked without publishing (a blocked node answers)."""
    out = await rabbit.ctl("list_queues", "-q", "--no-table-headers", "name", "messages")
    counts = dict(line.split() for line in out.splitlines() if line.strip())
    return sum(int(n) for name, n in counts.items() if name.startswith("upgates.customers.dead"))


# --- a long Postgres outage dead-letters nothing (item 9) -------------------------------------


CONSUMER_TIMEOUT_MS = 3000


@pytest.fixture
async def short_consumer_timeout(rabbit: PrivateRabbit) -> AsyncIterator[PrivateRabbit]:
    """The private node closes a channel holding a delivery for 3 s, checked twice a second.

    Both are read by RabbitMQ 3.10 from the application environment (the timeout when a
    channel opens, the check interval at each check); 3.10 has no per-queue timeout.
    """
    await rabbit.ctl(
        "eval", f"application:set_env(rabbit, consumer_timeout, {CONSUMER_TIMEOUT_MS})."
    )
    await rabbit.ctl("eval", "application:set_env(rabbit, channel_tick_interval, 500).")
    try:
        yield rabbit
    finally:
        await rabbit.ctl("eval", "application:set_env(rabbit, consumer_timeout, 1800000).")
        await rabbit.ctl("eval", "application:set_env(rabbit, channel_tick_interval, 60000).")


@pytest.mark.fault
async def test_postgres_down_longer_than_the_consumer_timeout_dead_letters_nothing(
    short_consumer_timeout: PrivateRabbit,
    private_postgres: PrivatePostgres,
    private_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rabbit = short_consumer_timeout
    # Well below the node's consumer timeout, as the default is below RabbitMQ's default.
    monkeypatch.setattr(service, "HOLD_LIMIT", 1.0)
    dsn = private_postgres.dsn(private_database)
    # A prefetch of 2: the deliveries a timeout returns are the next ones delivered, one at a
    # time (redeliveries make the worker cautious), so with few of them each soon meets the
    # limit of 2; the other webhooks wait in the queue.
    settings = service_settings(rabbit.url, dsn, delivery_limit=2, prefetch=2)
    async with running_worker(settings) as worker:
        await publish_webhooks(settings, range(1, 6))

        async def first_stored() -> bool:
            return await customers(dsn) == set(range(1, 6))

        await wait_until(first_stored, timeout=20)

        await private_postgres.stop()
        try:
            await publish_webhooks(settings, range(6, 41))
            # Many consumer timeouts: without care, each returns what the worker holds to the
            # queue and counts a delivery, and the third dead-letters it.
            await asyncio.sleep(CONSUMER_TIMEOUT_MS / 1000 * 10)
        finally:
            await private_postgres.start()

        async def all_stored() -> bool:
            return await customers(dsn) == set(range(1, 41))

        with contextlib.suppress(AssertionError):
            await wait_until(all_stored, timeout=40)
        missing = sorted(set(range(1, 41)) - await customers(dsn))
        parked = [h.get(schema.H_REQUEST_ID) for h, _ in await dead_letters(rabbit.url)]
        assert (missing, parked) == ([], [])
        assert await queue_depth(rabbit.url, QUEUE) == 0
        # The outage was long enough to matter: the worker handed deliveries back.
        handed_back = worker.metrics.registry.get_sample_value("upgates_worker_handed_back_total")
        assert handed_back is not None
        assert handed_back > 0
        assert worker.consuming


# --- retention (item 11) ----------------------------------------------------------------------


async def test_first_retention_run_comes_soon_after_start(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RETENTION_INTERVAL stays at an hour: a worker restarted more often must still purge.
    assert settings.retention_interval == 3600
    monkeypatch.setattr(service, "RETENTION_FIRST_RUN", (0.1, 0.3))
    conn = await asyncpg.connect(settings.database_url)
    try:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO rejected_records (project_name, event, reason, record, received_at,"
            " request_id, position) VALUES"
            " ('s', 'create', 'r', '{}', now() - interval '40 days', 'old', 0),"
            " ('s', 'create', 'r', '{}', now() - interval '1 day', 'new', 0)"
        )
        async with running_worker(settings):

            async def purged() -> bool:
                ids = await conn.fetch("SELECT request_id FROM rejected_records")
                return [r["request_id"] for r in ids] == ["new"]

            await wait_until(purged, timeout=15)
    finally:
        await conn.close()


async def test_rejected_records_are_purged_in_bounded_statements(database: str) -> None:
    conn = await asyncpg.connect(database)
    try:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO rejected_records (project_name, event, reason, record, received_at,"
            " request_id, position)"
            " SELECT 's', 'create', 'r', '{}', now() - interval '40 days', 'old-' || n, 0"
            " FROM generate_series(1, 25000) AS n"
        )
        await conn.execute(
            "INSERT INTO rejected_records (project_name, event, reason, record, received_at,"
            " request_id, position) VALUES ('s', 'create', 'r', '{}', now(), 'new', 0)"
        )
        # Rows removed per DELETE statement, as Postgres saw them.
        await conn.execute(
            """
            CREATE TABLE purge_statements (id serial, deleted bigint);
            CREATE FUNCTION count_purge() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO purge_statements (deleted) SELECT count(*) FROM gone;
                RETURN NULL;
            END $$;
            CREATE TRIGGER count_purge AFTER DELETE ON rejected_records
                REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION count_purge();
            """
        )
        assert await purge_rejected(conn, 30) == 25_000
        statements = await conn.fetch("SELECT deleted FROM purge_statements ORDER BY id")
        assert [r["deleted"] for r in statements] == [10_000, 10_000, 5_000]
        assert await conn.fetchval("SELECT array_agg(request_id) FROM rejected_records") == ["new"]
    finally:
        await conn.close()


async def _reject_into_dead_letters(settings: Settings, message: aio_pika.Message) -> None:
    """Let RabbitMQ itself dead-letter a message (rejected from a queue of this test's), which
    stamps it with an x-death entry of now."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, settings)
        queue = await channel.declare_queue(
            f"test.reject.{uuid.uuid4().hex[:8]}",
            auto_delete=False,
            arguments={"x-dead-letter-exchange": DEAD_EXCHANGE},
        )
        await channel.default_exchange.publish(message, queue.name)
        got = await queue.get(timeout=10)
        assert got is not None
        await got.reject(requeue=False)
        await queue.delete(if_unused=False, if_empty=False)


async def test_dead_letters_age_from_when_they_were_dead_lettered(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "RETENTION_FIRST_RUN", (3600.0, 3600.0))  # only ours runs here
    now_ms = int(time.time() * 1000)
    old_ms = now_ms - 40 * DAY_MS

    def letter(request_id: str, received_ms: int, **headers: Any) -> aio_pika.Message:
        return aio_pika.Message(
            b"{}",
            headers={
                schema.H_EVENT: "create",
                schema.H_RECEIVED_AT: received_ms,
                schema.H_REQUEST_ID: request_id,
                **headers,
            },
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async with running_worker(settings) as worker:
        # Received 40 days ago (delayed in the queue, or replayed) and dead-lettered by the
        # worker today: an unreadable message.
        await publish(
            settings,
            [letter("worker-today", old_ms, **{schema.H_EVENT: "no-such-event"})],
            ROUTING_KEYS["create"],
        )

        async def parked() -> bool:
            return len(await dead_letters(settings.amqp_url)) == 1

        await wait_until(parked, timeout=15)
        # Dead-lettered by RabbitMQ today (x-death), received 40 days ago.
        await _reject_into_dead_letters(settings, letter("broker-today", old_ms))
        # Dead-lettered 40 days ago, by a worker and by RabbitMQ.
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            dead = await channel.get_exchange(DEAD_EXCHANGE)
            death = {
                "count": 1,
                "reason": "delivery_limit",
                "queue": QUEUE,
                "exchange": EXCHANGE,
                "routing-keys": ["customers.create"],
                "time": datetime.now(UTC) - timedelta(days=40),
            }
            for message in (
                letter("worker-long-ago", old_ms - DAY_MS, **{H_DEAD_LETTERED_AT: old_ms}),
                letter("broker-long-ago", old_ms - DAY_MS, **{"x-death": [death]}),
            ):
                await dead.publish(message, routing_key="", mandatory=True)

        parked_now = {
            h.get(schema.H_REQUEST_ID): h for h, _ in await dead_letters(settings.amqp_url)
        }
        assert set(parked_now) == {
            "worker-today",
            "broker-today",
            "worker-long-ago",
            "broker-long-ago",
        }

        assert worker.pool is not None
        retention = replace(settings, dead_letter_retention_days=30)
        assert await apply_retention(retention, worker.pool) == (0, 2)
    left = {h.get(schema.H_REQUEST_ID): h for h, _ in await dead_letters(settings.amqp_url)}
    assert set(left) == {"worker-today", "broker-today"}
    # The worker stamps its dead letters with when: their retention counts from then.
    stamped = left["worker-today"][H_DEAD_LETTERED_AT]
    assert now_ms - 1000 <= stamped <= int(time.time() * 1000)
