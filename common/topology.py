"""The RabbitMQ topology, declared identically by the receiver and the workers.

RabbitMQ refuses a redeclaration whose arguments differ (PRECONDITION_FAILED), so both services
build the queue arguments here and nowhere else.

The dead-letter queue is a classic queue, not a quorum queue: operators and the retention run
browse it by taking messages and returning them unacknowledged, which a quorum queue counts as a
delivery (3.x, and 4.x before 4.3), and RabbitMQ 4.x gives every quorum queue a delivery limit of
20 by default: each dead letter would be dropped after some twenty looks. A classic queue has no
delivery limit at all (nor replicas: the dead letters live on one node). A queue's type cannot
change, so its name changed with it; retire_old_dead_queue moves the letters of the quorum queue
of earlier versions over.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from pamqp.commands import Basic
from pamqp.common import FieldTable

from common.settings import Settings

EXCHANGE = "upgates.webhooks"
QUEUE = "upgates.customers"
DEAD_EXCHANGE = "upgates.dead"
DEAD_QUEUE = "upgates.customers.dead.v2"
# The quorum dead-letter queue of earlier versions, emptied into DEAD_QUEUE and left unbound.
OLD_DEAD_QUEUE = "upgates.customers.dead"
# Classic: returning a message unacknowledged never uses it up (see the module docstring).
# Declared explicitly: a vhost's default queue type may be quorum (RabbitMQ 4.x).
DEAD_QUEUE_ARGUMENTS: FieldTable = {"x-queue-type": "classic"}
ROUTING_KEYS = {event: f"customers.{event}" for event in ("create", "update", "delete")}
BUNDLE_ROUTING_KEY = "customers.bundle"  # several webhooks, maybe of several events

# Seconds between heartbeats: a broker that stops answering (a dead link, not a closed one) is
# noticed within a few of these instead of aio-pika's default of a minute or more.
HEARTBEAT = 5


def amqp_url_with_heartbeat(url: str) -> str:
    """The URL with a short heartbeat, unless the operator chose one."""
    if "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={HEARTBEAT}"


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
    await retire_old_dead_queue(channel, drain=False)
    queue = await channel.declare_queue(QUEUE, durable=True, arguments=queue_arguments(settings))
    await queue.bind(exchange, routing_key="customers.*")
    return Topology(exchange, queue, dead_exchange, dead_queue)


async def retire_old_dead_queue(channel: AbstractChannel, *, drain: bool) -> int:
    """Unbind the dead-letter queue of earlier versions, if there is one; with drain, also move
    its messages into DEAD_QUEUE. The number of messages moved.

    Every service unbinds it when it declares the topology, so that no new dead letter lands
    there; draining is left to whoever opens the dead letters (the admin command, the workers'
    retention run), so that no service's start waits on it. A message is acknowledged only
    after DEAD_QUEUE confirmed its copy: a crash in between leaves a duplicate, never a loss.
    The empty queue stays for the operator to delete: a process of an earlier version may
    still bind it and dead-letter into it, and a quorum queue cannot be deleted only if empty.
    """
    # A passive declare of a missing queue closes its channel (NOT_FOUND), so ask on a channel
    # of its own; aiormq's channel names its connection in its public interface.
    underlay = await channel.get_underlay_channel()
    probe = await underlay.connection.channel(publisher_confirms=True)
    try:
        try:
            await probe.queue_declare(OLD_DEAD_QUEUE, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0  # a new installation, or retired already
        await probe.queue_unbind(OLD_DEAD_QUEUE, DEAD_EXCHANGE, routing_key="")
        moved = 0
        while drain:
            got = await probe.basic_get(OLD_DEAD_QUEUE, no_ack=False)
            if got.delivery_tag is None:  # basic.get-empty
                break
            confirm = await probe.basic_publish(
                got.body,
                routing_key=DEAD_QUEUE,
                properties=got.header.properties,
                mandatory=True,
            )
            if not isinstance(confirm, Basic.Ack):
                raise RuntimeError(f"{DEAD_QUEUE} did not confirm a moved dead letter")
            await probe.basic_ack(got.delivery_tag)
            moved += 1
        return moved
    finally:
        if not probe.is_closed:
            await probe.close()


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
