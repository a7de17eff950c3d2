"""The worker's own publishes: confirmed, routed, and given up after PUBLISH_DEADLINE."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractExchange

log = logging.getLogger(__name__)

# Every publish the worker makes (a dead letter's copy, a split bundle's webhooks, a delivery
# handed back) is given up after this. A broker alarm blocks the consumer's connection, acks
# included, and a publish on it would wait for the alarm to clear; a confirm normally takes
# milliseconds, and the message not acknowledged meanwhile is only delivered again.
PUBLISH_DEADLINE = 5.0


class PublishTimedOut(Exception):
    """A publish of the worker's was not confirmed within PUBLISH_DEADLINE."""


async def publish(
    exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, what: str
) -> None:
    """Publish, confirmed and routed, within PUBLISH_DEADLINE; PublishTimedOut if not."""
    try:
        async with asyncio.timeout(PUBLISH_DEADLINE):
            await exchange.publish(message, routing_key, mandatory=True)
    except TimeoutError:
        log.warning(
            "%s not confirmed within %.0f s (is the broker blocking publishers?): "
            "its delivery is not acknowledged and will come again",
            what,
            PUBLISH_DEADLINE,
        )
        raise PublishTimedOut from None
