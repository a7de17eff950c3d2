"""Broker faults under load, on a private RabbitMQ node: nothing answered 200 is ever lost.

The receiver and a worker run as processes (through tests/support/proxy.py where the link itself
is the fault). A sender retries every non-200 like Upgates; at the end the customers table must
equal the fold of every event answered 200, and both processes must still be serving. The node
is the tests' own, so restarting it or raising its memory alarm disturbs nobody else's tests.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from common.topology import QUEUE
from tests.support.broker import queue_depth, queued_webhooks
from tests.support.config import service_settings
from tests.support.load import Sender, make_record
from tests.support.oracle import assert_table_matches
from tests.support.processes import Procs, assert_serving, http_status
from tests.support.proxy import Proxy, start_proxy
from tests.support.servers import PrivateRabbit
from tests.support.waiting import wait_until


@pytest.fixture
async def broker(rabbit: PrivateRabbit, proxies: list[Proxy]) -> Proxy:
    """A proxy in front of the private node; the services connect through it."""
    return await start_proxy(proxies, "127.0.0.1", rabbit.port)


def amqp_via(proxy: Proxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


@pytest.mark.fault
async def test_broker_restart_under_load(
    rabbit: PrivateRabbit, broker: Proxy, database: str, procs: Procs
) -> None:
    settings = service_settings(amqp_via(broker), database)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(settings)
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(30)
        await rabbit.stop_app()
        await asyncio.sleep(1.5)  # down: 503s, and the worker reconnects in vain
        await rabbit.start_app()
        await sender.wait_ok(60, timeout=40)
        await sender.stop()
    assert sender.stats.statuses[503] > 0, sender.stats.summary()
    await assert_table_matches(database, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_broker_connection_blackholed_then_back(
    broker: Proxy, database: str, procs: Procs
) -> None:
    # A partition: connections stay open but nothing gets through (both services' publishes,
    # confirms, deliveries, acks and heartbeats vanish). The receiver must keep answering in
    # time (503: its publish deadline), and when the link is back everything resumes.
    settings = service_settings(amqp_via(broker), database)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(settings)
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(30)
        broker.blackhole()
        before = sender.stats.statuses[503]
        await asyncio.sleep(3)
        during = sender.stats.statuses[503] - before
        broker.passthrough()
        await sender.wait_ok(60, timeout=40)
        await sender.stop()
    stats = sender.stats
    assert during > 0, stats.summary()
    # Upgates gives up after 1 s: every answer must come before that, 503s included.
    assert (stats.errors["timeout"], stats.slow_503) == (0, 0), stats.summary()
    assert broker.discarded > 0
    await assert_table_matches(database, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_memory_alarm_gives_fast_503_then_200_again(
    rabbit: PrivateRabbit, broker: Proxy, database: str, procs: Procs
) -> None:
    settings = service_settings(amqp_via(broker), database)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(settings)
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(30)
        await rabbit.memory_alarm(True)
        try:
            assert "memory" in await rabbit.alarms()
            # Probes in a shop of their own: a 503 may still be stored once the alarm clears.
            probes = []
            for n in range(8):
                payload = {
                    "project_name": "probe-shop",
                    "customers": [make_record("create", n + 1, 0)],
                }
                status, took = await sender.post("create", payload)
                probes.append((status, round(took, 3)))
            answered_while_blocked = sender.stats.statuses[503]
            ready_while_blocked = await http_status(f"{receiver.url}/readyz")
        finally:
            await rabbit.memory_alarm(False)
        await wait_until(lambda: _ready(receiver.url), timeout=20)
        await sender.wait_ok(60, timeout=40)
        await sender.stop()
    assert all(status == 503 and took < 1.0 for status, took in probes), probes
    assert answered_while_blocked > 0
    assert ready_while_blocked == 503  # /readyz: 200 only when it can publish
    assert (sender.stats.errors["timeout"], sender.stats.slow_503) == (0, 0), sender.stats.summary()
    await assert_table_matches(database, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_queue_full_is_503_never_loss(
    rabbit: PrivateRabbit, database: str, procs: Procs
) -> None:
    # No worker yet: the queue fills to its limit and RabbitMQ rejects further publishes
    # (reject-publish); the receiver must answer 503 for those, and 200 only for stored ones.
    limit = 15
    settings = service_settings(rabbit.url, database, queue_max_length=limit)
    receiver = await procs.receiver(settings)
    async with Sender(receiver.url) as sender:

        async def rejecting() -> bool:
            return sender.stats.statuses[503] >= 20

        await wait_until(rejecting, timeout=20)
        # Every 200 is in the queue and nothing else is: the 503s were not stored. (A quorum
        # queue checks its limit a little late, so it may take a message or two beyond it.
        # The limit counts messages: a bundle of small webhooks is one.)
        assert limit <= await queue_depth(rabbit.url, QUEUE) <= limit + 4, sender.stats.summary()
        # Looking into the queue takes its messages out for a moment, which makes room for a
        # few more 200s meanwhile: what is in it lies between the 200s before and after.
        accepted = sender.stats.ok
        queued = await queued_webhooks(rabbit.url, QUEUE)
        assert accepted <= queued <= sender.stats.ok, sender.stats.summary()
        worker = await procs.worker(settings)
        await sender.wait_ok(60, timeout=40)
        await sender.stop()
    assert sender.stats.slow_503 == 0, sender.stats.summary()
    await assert_table_matches(database, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_broker_restart_while_the_worker_is_idle(
    rabbit: PrivateRabbit, database: str, procs: Procs
) -> None:
    # A plain restart (no proxy), at a moment when the worker has nothing in hand: it must
    # notice the lost connection by itself, reconnect and consume what comes next.
    settings = service_settings(rabbit.url, database)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(settings)
    async with Sender(receiver.url, shop="before-restart") as before:
        await before.wait_ok(10)
        await before.stop()
    await assert_table_matches(database, before.oracle, shop="before-restart")
    await rabbit.stop_app()
    await rabbit.start_app()
    async with Sender(receiver.url, shop="after-restart") as after:
        await after.wait_ok(20, timeout=20)
        await after.stop()
    await assert_table_matches(database, after.oracle, shop="after-restart", logs=procs.logs())
    await assert_serving(receiver, worker)


@pytest.mark.fault
async def test_sigterm_while_the_broker_is_down_exits_cleanly(
    rabbit: PrivateRabbit, database: str, procs: Procs
) -> None:
    # An operator stops the services during a broker outage: both must still stop cleanly
    # (exit 0, within the grace period), not crash on the dead connection.
    settings = service_settings(rabbit.url, database)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(settings)
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(10)
        await sender.stop()
    await rabbit.stop_app()
    await asyncio.sleep(0.5)
    for proc in (receiver, worker):
        proc.signal(signal.SIGTERM)
    codes = [await proc.wait(settings.shutdown_grace + 5) for proc in (receiver, worker)]
    assert codes == [0, 0], procs.logs()


@pytest.mark.fault
async def test_worker_reconnects_at_once_after_many_link_cuts(
    broker: Proxy, database: str, procs: Procs
) -> None:
    # The reconnect backoff must start anew after each outage: a worker that has been through
    # many short blips still comes back within a moment of the next one.
    settings = service_settings(amqp_via(broker), database)
    worker = await procs.worker(settings)
    recoveries = []
    for _ in range(8):
        broker.cut()
        started = asyncio.get_running_loop().time()
        await wait_until(lambda: _not_ready(worker.url), timeout=10, interval=0.02)
        await wait_until(lambda: _ready(worker.url), timeout=10, interval=0.02)
        recoveries.append(asyncio.get_running_loop().time() - started)
    assert max(recoveries[-3:]) < 2.0, recoveries


async def _ready(url: str) -> bool:
    return await http_status(f"{url}/readyz") == 200


async def _not_ready(url: str) -> bool:
    return await http_status(f"{url}/readyz") != 200
