"""Reading, replaying and purging the dead-letter queue (used by the admin command and workers).

Looking never uses a letter up. A scan takes messages without acknowledging them; on close,
each letter neither replayed nor dropped is published back to the queue as a copy (confirmed)
and only then acknowledged. Returning it unacknowledged instead would count as a delivery, and
RabbitMQ 4.x drops a quorum queue's message after 20 deliveries by default: some twenty looks
(`dead list`, the hourly retention run) would lose every dead letter. A crash between the copy
and the ack leaves a duplicate, which replaying makes harmless.

Operators name a dead letter by its id (DeadLetter.id), never by its place in a listing: the
place changes whenever another letter arrives, is replayed, purged or looked at.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from common import schema
from common.brokers import Nodes
from common.message import BUNDLE, copy_of
from common.settings import Settings
from common.topology import (
    BUNDLE_ROUTING_KEY,
    EXCHANGE,
    ROUTING_KEYS,
    declare_topology,
)

# Set by a worker on a message it dead-letters: when, in milliseconds since the epoch.
H_DEAD_LETTERED_AT = "x-dead-lettered-at"

# Headers that describe a death, not the webhook: dropped when a message is replayed.
_DEATH_HEADERS = (
    schema.H_ERROR,
    H_DEAD_LETTERED_AT,
    "x-original-routing-key",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What an operator needs to know about one dead-lettered message, without its data."""

    message: AbstractIncomingMessage
    reason: str
    event: str | None
    shop: str | None
    records: int | None
    request_id: str | None
    received_at: datetime | None
    routing_key: str | None

    @property
    def id(self) -> str | None:
        """What names this letter for good: the webhook's request id, or the message id (a
        bundle's); None for a message that has neither."""
        return self.request_id or self.message.message_id or None


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    """Read a dead letter's headers: why, which shop and event, when received."""
    headers: dict[str, Any] = dict(message.headers or {})
    deaths = headers.get("x-death")
    death: dict[str, Any] = deaths[0] if isinstance(deaths, list) and deaths else {}
    reason = headers.get(schema.H_ERROR)
    if reason is None and death:
        # Dead-lettered by RabbitMQ: delivery_limit (it kept failing), rejected, expired, maxlen.
        reason = f"rabbitmq: {death.get('reason')} after {death.get('count', '?')} death(s)"
    received_ms = headers.get(schema.H_RECEIVED_AT)
    received = (
        datetime.fromtimestamp(received_ms / 1000, UTC)
        if isinstance(received_ms, int)
        else message.timestamp
    )
    routing_key = headers.get("x-original-routing-key")
    if not routing_key and death.get("routing-keys"):
        routing_key = death["routing-keys"][0]
    event = headers.get(schema.H_EVENT)
    if not routing_key and event in ROUTING_KEYS:
        routing_key = ROUTING_KEYS[event]
    if message.content_type == BUNDLE:  # several webhooks, of any shops and events
        event = f"bundle of {headers.get(schema.H_BUNDLE, '?')}"
        routing_key = routing_key or BUNDLE_ROUTING_KEY
    records = headers.get(schema.H_RECORDS)
    return DeadLetter(
        message=message,
        reason=str(reason or "unknown"),
        event=str(event) if event is not None else None,
        shop=str(headers[schema.H_PROJECT]) if schema.H_PROJECT in headers else None,
        records=records if isinstance(records, int) else None,
        request_id=str(headers[schema.H_REQUEST_ID]) if schema.H_REQUEST_ID in headers else None,
        received_at=received,
        routing_key=str(routing_key) if routing_key else None,
    )


def dead_lettered_at(letter: DeadLetter) -> datetime | None:
    """When the message was dead-lettered, what its retention counts from (its latest death).

    Our header when a worker dead-lettered it, RabbitMQ's x-death `time` when the broker did;
    when received, for a letter that carries neither (dead-lettered by an older worker).
    """
    headers: dict[str, Any] = dict(letter.message.headers or {})
    deaths: list[datetime] = []
    at = headers.get(H_DEAD_LETTERED_AT)
    if isinstance(at, int):
        deaths.append(datetime.fromtimestamp(at / 1000, UTC))
    for death in headers.get("x-death") or ():
        when = death.get("time") if isinstance(death, dict) else None
        if isinstance(when, datetime):
            deaths.append(when if when.tzinfo else when.replace(tzinfo=UTC))
    return max(deaths, default=letter.received_at)


class DeadLetterQueue:
    """A session on the dead-letter queue; what it took and did not remove is put back on close."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        self._channel = channel
        self._queue = queue
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._held: dict[int, DeadLetter] = {}  # taken and not yet removed, by identity

    async def scan(self, limit: int) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first, held unacknowledged until close."""
        found = []
        for _ in range(limit):
            message = await self._queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = describe(message)
            self._held[id(letter)] = letter
            found.append(letter)
        return found

    async def replay(self, letter: DeadLetter) -> None:
        """Publish the message again to the customer queue (confirmed), then drop the copy.

        Safe to repeat: the fold ignores what the table already reflects.
        """
        if letter.routing_key is None:
            raise ValueError("cannot tell which event this message was; not replayed")
        if self._exchange is None:
            self._exchange = await self._channel.get_exchange(EXCHANGE)
        headers = {
            k: v for k, v in (letter.message.headers or {}).items() if k not in _DEATH_HEADERS
        }
        await self._exchange.publish(
            copy_of(letter.message, headers),
            routing_key=letter.routing_key,
            mandatory=True,
        )
        await self.drop(letter)

    async def drop(self, letter: DeadLetter) -> None:
        """Remove a dead letter for good."""
        await letter.message.ack()
        self._held.pop(id(letter), None)

    async def put_back(self) -> None:
        """Put every letter taken and not removed back, as a confirmed copy, then ack it."""
        for letter in list(self._held.values()):
            message = letter.message
            headers = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}
            await self._channel.default_exchange.publish(
                copy_of(message, headers),
                routing_key=self._queue.name,
                mandatory=True,
            )
            await self.drop(letter)


@contextlib.asynccontextmanager
async def open_dead_letters(settings: Settings) -> AsyncIterator[DeadLetterQueue]:
    """A DeadLetterQueue on its own connection, closed (returning unacked messages) on exit."""
    connection = await Nodes(settings.amqp_url).connect(timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = await declare_topology(channel, settings)
        letters = DeadLetterQueue(channel, topology.dead_queue)
        try:
            yield letters
        finally:
            # On an error too; what cannot be put back (the link is gone) returns unacked.
            with contextlib.suppress(Exception):
                await letters.put_back()
