"""common/amqp_internals.py against a real broker: these fail when an aio-pika or aiormq upgrade
changes what the functions there rely on, before the services quietly misbehave."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import aiormq
import pytest
from pamqp.commands import Basic

from common.amqp_internals import publish_without_drain, wait_unblocked
from common.settings import Settings
from tests.support.servers import PrivateRabbit
from tests.support.waiting import wait_until


async def test_wait_unblocked_returns_at_once_on_an_open_connection(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await asyncio.wait_for(wait_unblocked(connection), 1)


async def test_wait_unblocked_refuses_a_closed_connection(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    await connection.close()
    with pytest.raises(ConnectionError):
        await wait_unblocked(connection)


@pytest.mark.fault
async def test_wait_unblocked_waits_while_the_broker_blocks_publishers(
    rabbit: PrivateRabbit,
) -> None:
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"test.blocked.{uuid.uuid4().hex[:8]}")
        await rabbit.memory_alarm(True)
        try:
            # RabbitMQ blocks a connection (and says so) once it publishes during the alarm.
            publishing = asyncio.ensure_future(
                channel.default_exchange.publish(aio_pika.Message(b"x"), queue.name)
            )

            async def blocked() -> bool:
                try:
                    await asyncio.wait_for(wait_unblocked(connection), 0.1)
                except TimeoutError:
                    return True
                return False

            await wait_until(blocked, timeout=10)
        finally:
            await rabbit.memory_alarm(False)
        await asyncio.wait_for(wait_unblocked(connection), 10)
        await asyncio.wait_for(publishing, 10)
        await queue.delete(if_unused=False, if_empty=False)


async def test_publish_without_drain_delivers_and_returns_the_confirm(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(exclusive=True)
        message = aio_pika.Message(
            b"body", headers={"x-test": "yes"}, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        confirm = await publish_without_drain(channel, "", message, queue.name)
        assert isinstance(confirm, Basic.Ack)
        got = await queue.get(timeout=5)
        assert got is not None
        assert (got.body, got.headers, got.delivery_mode) == (
            b"body",
            {"x-test": "yes"},
            aio_pika.DeliveryMode.PERSISTENT,
        )
        await got.ack()


async def test_publish_without_drain_raises_on_an_unroutable_message(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        message = aio_pika.Message(b"body")
        with pytest.raises(aiormq.exceptions.PublishError):
            await publish_without_drain(channel, "", message, f"no.such.queue.{uuid.uuid4()}")
