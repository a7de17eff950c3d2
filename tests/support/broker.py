"""What the queues hold: read (or taken) on a connection of the test's own, as no service does."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from common import schema
from common.message import unpack
from common.settings import Settings
from common.topology import DEAD_EXCHANGE, DEAD_QUEUE, QUEUE

DAY_MS = 86_400_000


@contextlib.asynccontextmanager
async def amqp(settings: Settings) -> AsyncIterator[AbstractChannel]:
    """A channel of our own in the test vhost."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def published(settings: Settings) -> list[AbstractIncomingMessage]:
    """Every message now in the customers queue (taken out of it)."""
    async with amqp(settings) as channel:
        queue = await channel.get_queue(QUEUE)  # passive: the receiver declared it
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages


async def queue_depth(amqp_url: str, queue: str) -> int:
    """Messages in a queue right now (ready ones; unacked deliveries are not counted)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def queued_webhooks(amqp_url: str, queue: str) -> int:
    """Webhooks in a queue right now (a bundle counts its webhooks); all stay in the queue."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = 0
        while (message := await declared.get(no_ack=False, fail=False)) is not None:
            count += len(unpack(message))
        # Closing the channel without acking puts them all back.
    return count


async def dead_letters(amqp_url: str) -> list[tuple[dict[str, Any], bytes]]:
    """Peek at the dead-letter queue: (headers, body) of each message; all stay in the queue."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        found = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            found.append((dict(message.headers or {}), message.body))
        # Closing the channel without acking puts them all back.
    return found


async def take_dead_letters(settings: Settings) -> list[AbstractIncomingMessage]:
    """Every message now in the dead-letter queue (taken out of it)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        return found


async def dead_letter(settings: Settings, body: bytes, age_days: float = 0, **headers: Any) -> None:
    """Put a message in the dead-letter queue the way the worker does."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(DEAD_EXCHANGE)
        all_headers: dict[str, Any] = {
            schema.H_EVENT: "create",
            schema.H_PROJECT: "admin-shop",
            schema.H_RECORDS: 1,
            schema.H_RECEIVED_AT: int(time.time() * 1000 - age_days * DAY_MS),
            schema.H_REQUEST_ID: f"req-{time.monotonic_ns()}",
            schema.H_ERROR: "write failed: test",
            "x-original-routing-key": "customers.create",
        }
        all_headers.update(headers)
        await exchange.publish(aio_pika.Message(body, headers=all_headers), routing_key="")


async def dead_count(settings: Settings) -> int:
    """Messages in the dead-letter queue right now."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        count: int = queue.declaration_result.message_count or 0
        return count
