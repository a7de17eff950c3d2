"""The RabbitMQ topology, declared identically by the receiver and the workers.

RabbitMQ refuses a redeclaration whose arguments differ (PRECONDITION_FAILED), so both services
build the queue arguments here and nowhere else.

The dead-letter queue is a quorum queue like the main one: a dead letter is a webhook that was
answered 200, so it is replicated too. Nobody consumes it; browsing it never returns a message
unacknowledged (a quorum queue counts that as a delivery, and RabbitMQ 4.x drops a message after
20 of them by default): see common/deadletters.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from common.settings import Settings

EXCHANGE = "upgates.webhooks"
QUEUE = "upgates.customers"
DEAD_EXCHANGE = "upgates.dead"
DEAD_QUEUE = "upgates.customers.dead"
DEAD_QUEUE_ARGUMENTS: FieldTable = {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
ROUTING_KEYS = {event: f"customers.{event}" for event in ("create", "update", "delete")}
BUNDLE_ROUTING_KEY = "customers.bundle"  # several webhooks, maybe of several events


@dataclass(frozen=True, slots=True)
class Topology:
    """The declared objects a service works with."""

    exchange: AbstractExchange
    queue: AbstractQueue
    dead_exchange: AbstractExchange
    dead_queue: AbstractQueue


def queue_arguments(settings: Settings) -> FieldTable:
    """Arguments of the customer events queue."""
    arguments: FieldTable = {
        # Quorum: replicated, fsynced before the publisher confirm; the basis of "200 means stored".
        "x-queue-type": "quorum",
        # Replicas on three nodes of a cluster (a majority survives one node's loss); a single
        # node or a smaller cluster holds it on every node it has.
        "x-quorum-initial-group-size": 3,
        # RabbitMQ 3.10 has no default limit: a message that always crashes its worker would loop.
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
        # at-least-once dead-lettering keeps the message until the dead-letter queue confirms it;
        # it requires reject-publish overflow.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if settings.queue_max_length:
        arguments["x-max-length"] = settings.queue_max_length
    if settings.queue_max_bytes:
        arguments["x-max-length-bytes"] = settings.queue_max_bytes
    return arguments


async def declare_topology(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare (idempotently) the exchanges, queues and bindings; both services call this."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead_exchange = await channel.declare_exchange(
        DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_queue = await channel.declare_queue(
        DEAD_QUEUE, durable=True, arguments=DEAD_QUEUE_ARGUMENTS
    )
    await dead_queue.bind(dead_exchange, routing_key="")
    queue = await channel.declare_queue(QUEUE, durable=True, arguments=queue_arguments(settings))
    await queue.bind(exchange, routing_key="customers.*")
    return Topology(exchange, queue, dead_exchange, dead_queue)


async def until_closed(connection: AbstractConnection, channel: AbstractChannel) -> None:
    """Return when the connection or the channel closes, whichever first.

    A dropped link closes the channel; aio-pika resolves connection.closed() only on an
    explicit close(), so waiting on the connection alone would wait forever.
    """
    waiters = [asyncio.ensure_future(connection.closed()), asyncio.ensure_future(channel.closed())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
