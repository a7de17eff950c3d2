"""What the services need from aiormq, the AMQP client under aio-pika, that aio-pika does not offer.

Each is one function named for what it does, reaching below aio-pika's public interface in one
place; tests/integration/test_amqp_internals.py fails loudly when an upgrade changes what they
rely on.
"""

from __future__ import annotations

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import ConfirmationFrameType


async def wait_unblocked(connection: AbstractConnection) -> None:
    """Return once the connection is open and the broker does not block its publishers.

    RabbitMQ blocks publishing connections during a memory or disk alarm (connection.blocked);
    aio-pika does not say so, but aiormq's connection, its transport, waits for the unblock.
    """
    transport = connection.transport
    if transport is None:
        raise ConnectionError("not connected to the broker")
    await transport.connection.ready()


async def publish_without_drain(
    channel: AbstractChannel,
    exchange: str,
    message: aio_pika.Message,
    routing_key: str,
) -> ConfirmationFrameType | None:
    """Publish (mandatory) and return the broker's confirm, not waiting for the write to drain.

    aio-pika's Exchange.publish waits for each write to drain while it holds the channel's lock,
    so publishes queue up behind one another; aiormq's basic_publish can leave that out
    (wait=False), which its abstract channel does not name.
    """
    underlay = await channel.get_underlay_channel()
    if not isinstance(underlay, aiormq.Channel):
        raise TypeError(f"aio-pika's underlay channel is a {type(underlay).__name__}")
    return await underlay.basic_publish(
        message.body,
        exchange=exchange,
        routing_key=routing_key,
        properties=message.properties,
        mandatory=True,
        wait=False,
    )
