"""Postgres faults under load, on a private cluster: nothing answered 200 is ever lost.

The receiver and a worker run as processes (the broker is the shared one, in a vhost of the
test's own). Postgres restarts with `-m immediate` (a crash), or the worker's link to it goes
dark; the worker must retry until it is back, ack only after COMMIT, and the customers table
must end equal to the fold of every event answered 200.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import msgspec
import pytest

from common import schema
from common.settings import Settings
from common.topology import EXCHANGE, ROUTING_KEYS
from tests.support.broker import dead_letters
from tests.support.config import AMQP_BASE, service_settings
from tests.support.load import Sender, make_record
from tests.support.oracle import assert_table_matches
from tests.support.processes import Proc, Procs, assert_serving
from tests.support.proxy import Proxy, start_proxy
from tests.support.servers import PrivatePostgres
from tests.support.waiting import wait_until


@pytest.fixture
def private_settings(
    vhost: str, private_postgres: PrivatePostgres, private_database: str
) -> Settings:
    return service_settings(f"{AMQP_BASE}/{vhost}", private_postgres.dsn(private_database))


@pytest.mark.fault
async def test_postgres_crash_restart_under_load(
    private_postgres: PrivatePostgres, private_settings: Settings, procs: Procs
) -> None:
    settings = private_settings
    receiver = await procs.receiver(settings)
    worker = await procs.worker(settings)
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(30)
        await private_postgres.stop()  # -m immediate: every session cut, no checkpoint
        before = sender.stats.ok
        await asyncio.sleep(1.5)
        await private_postgres.start()
        await sender.wait_ok(60, timeout=40)
        await sender.stop()
    assert sender.stats.ok > before  # the receiver kept taking webhooks meanwhile
    await assert_table_matches(settings.database_url, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_postgres_link_blackholed_longer_than_a_batch(
    private_postgres: PrivatePostgres,
    private_settings: Settings,
    procs: Procs,
    proxies: list[Proxy],
) -> None:
    # The worker's Postgres connections stall (statements and COMMITs vanish, nothing answers)
    # for far longer than a batch takes; then the link is back (the stalled connections reset,
    # as after a partition). Nothing may be acked that did not commit.
    settings = private_settings
    pg, receiver, worker = await _start_with_worker_behind_proxy(
        private_postgres, settings, procs, proxies
    )
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(30)
        pg.blackhole()
        await asyncio.sleep(3)
        pg.passthrough()
        await sender.wait_ok(60, timeout=40)
        await sender.stop()
    assert pg.discarded > 0
    await assert_table_matches(settings.database_url, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_message_failing_its_write_alone_is_dead_lettered(
    settings: Settings, procs: Procs
) -> None:
    # The receiver refuses a project_name Postgres cannot store (422), but a message can reach
    # the queue another way (an older receiver, an operator's replay). Its write fails every
    # time, for a reason of its own: it must be dead-lettered with the reason, and the messages
    # batched with it must land.
    receiver = await procs.receiver(settings)
    worker = await procs.worker(settings)
    body = msgspec.json.encode(
        {"project_name": "bad\u0000shop", "customers": [make_record("create", 1, 0)]}
    )
    request_id = uuid.uuid4().hex
    async with Sender(receiver.url, concurrency=6) as sender:
        await sender.wait_ok(20)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(EXCHANGE)
            await exchange.publish(
                aio_pika.Message(
                    body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=request_id,
                    headers={
                        schema.H_EVENT: "create",
                        schema.H_PROJECT: "bad-shop",
                        schema.H_RECORDS: 1,
                        schema.H_REQUEST_ID: request_id,
                    },
                ),
                ROUTING_KEYS["create"],
            )

        async def dead() -> list[tuple[dict[str, object], bytes]]:
            return await dead_letters(settings.amqp_url)

        parked = await wait_until(dead, timeout=15)
        await sender.wait_ok(30)
        await sender.stop()
    assert [h.get(schema.H_REQUEST_ID) for h, _ in parked] == [request_id], parked
    headers, dead_body = parked[0]
    assert dead_body == body
    reason = str(headers.get(schema.H_ERROR))
    assert reason.startswith("write failed"), headers
    assert "bad" not in reason  # the reason names the error, not the data
    await assert_table_matches(settings.database_url, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_postgres_connections_reset_under_load(
    private_postgres: PrivatePostgres,
    private_settings: Settings,
    procs: Procs,
    proxies: list[Proxy],
) -> None:
    # Every connection between the worker and Postgres is reset (RST), and so is every new one
    # for a while, as a firewall or a failing load balancer would do; then the link is back.
    settings = private_settings
    pg, receiver, worker = await _start_with_worker_behind_proxy(
        private_postgres, settings, procs, proxies
    )
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(30)
        connections = pg.connections
        pg.reset()
        await asyncio.sleep(1.5)
        pg.passthrough()
        await sender.wait_ok(60, timeout=40)
        await sender.stop()
    assert pg.connections > connections  # the worker tried again meanwhile
    await assert_table_matches(settings.database_url, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


async def _start_with_worker_behind_proxy(
    private_postgres: PrivatePostgres, settings: Settings, procs: Procs, proxies: list[Proxy]
) -> tuple[Proxy, Proc, Proc]:
    """A receiver, and a worker whose Postgres connections go through a proxy; (proxy, both)."""
    pg = await start_proxy(proxies, "127.0.0.1", private_postgres.port)
    through_proxy = service_settings(
        settings.amqp_url,
        private_postgres.dsn(settings.database_url.rsplit("/", 1)[1], port=pg.port),
        receiver_port=settings.receiver_port,
    )
    return pg, await procs.receiver(settings), await procs.worker(through_proxy)
