"""The receiver's link to RabbitMQ: one connection kept up in the background, confirmed publishes.

The receiver must start and answer (503) while the broker is down, so connecting is a background
loop, not a start-up step; a request never waits for a connection.

Small webhooks are bundled (common/message.py): while a bundle waits for its confirm, the ones
that arrive meanwhile gather into the next, like a database's group commit. At low load every
webhook goes alone and at once; under load a bundle carries as many as came in one round trip,
and the broker, whose work is mostly per message, keeps up. Each request still gets its answer
only after the confirm of the message that holds its webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from common.amqp_internals import publish_without_drain, wait_unblocked
from common.backoff import backoff
from common.brokers import Nodes
from common.message import COMPRESS_FROM_BYTES, Webhook, pack
from common.settings import Settings
from common.topology import (
    BUNDLE_ROUTING_KEY,
    ROUTING_KEYS,
    declare_topology,
    until_closed,
)

log = logging.getLogger(__name__)

# Bodies from this size up go alone (and compressed): bundling them saves the broker nothing.
BUNDLE_BELOW_BYTES = COMPRESS_FROM_BYTES
# Bundles published and not yet confirmed. One: the next gathers while it is stored; two only
# made twice as many smaller bundles, costing RabbitMQ more CPU and answering no faster.
BUNDLES_IN_FLIGHT = 1
# Limits of one bundle: a few hundred small webhooks is already one message instead of hundreds.
BUNDLE_MAX_WEBHOOKS = 256
BUNDLE_MAX_BYTES = 1024 * 1024
# Messages written to the broker and not yet confirmed, at most. A publish is not held until its
# bytes are on the wire, as aio-pika's would be: its channel would stay locked meanwhile, and in
# a burst every confirm would wait behind the writes queued before it. The window bounds what
# waits in memory while the broker blocks publishers instead: a publish beyond it waits for a
# place, and gives up at PUBLISH_TIMEOUT.
PUBLISH_WINDOW = 64


class NotStored(Exception):
    """The broker did not confirm the message as stored; the sender must retry."""


class Publisher:
    """Publishes webhooks persistently, mandatory and confirmed, within a deadline."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._nodes = Nodes(settings.amqp_url)  # one node, or any node of a cluster
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None
        # Small webhooks waiting for a bundle, each with the future its request awaits.
        self._waiting: deque[tuple[Webhook, asyncio.Future[None]]] = deque()
        self._flush_scheduled = False
        self._bundles: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Future[Any]] = set()
        self._window = asyncio.Semaphore(PUBLISH_WINDOW)
        self._unconfirmed: set[asyncio.Task[Any]] = set()

    @property
    def ready(self) -> bool:
        """True while a confirmed channel with the declared topology is open."""
        return self._channel is not None and not self._channel.is_closed

    async def can_publish(self) -> bool:
        """Connected, and the broker is not blocking publishers (a memory or disk alarm)."""
        connection = self._connection
        if not self.ready or connection is None:
            return False
        try:
            await asyncio.wait_for(wait_unblocked(connection), 0.05)
        except (TimeoutError, ConnectionError):
            return False
        return True

    async def start(self) -> None:
        """Start connecting in the background."""
        self._task = asyncio.create_task(self._keep_connected(), name="amqp-publisher")

    async def close(self) -> None:
        """Stop reconnecting and close the connection (after the bundles being sent)."""
        while self._bundles:
            await asyncio.wait(self._bundles)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Publishes their requests gave up on end with the connection.
        await asyncio.gather(*self._unconfirmed, return_exceptions=True)

    async def publish(self, webhook: Webhook) -> None:
        """Return once RabbitMQ has confirmed the webhook as stored; raise NotStored otherwise.

        Never later than PUBLISH_TIMEOUT, whatever the broker does (a blocked broker, a memory
        or disk alarm, a reconnect): the sender must get its answer within its 1 s.
        """
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                if len(webhook.body) >= BUNDLE_BELOW_BYTES:
                    await self._send([webhook])
                else:
                    await self._bundled(webhook)
        except TimeoutError:
            raise NotStored("the broker did not confirm in time") from None

    def _bundled(self, webhook: Webhook) -> asyncio.Future[None]:
        """Wait for a place in a bundle; resolved by the bundle's confirm."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((webhook, future))
        if not self._flush_scheduled:
            # Next loop iteration: every request read in this one joins the same bundle.
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Start bundles from the waiting webhooks while fewer than BUNDLES_IN_FLIGHT are out."""
        self._flush_scheduled = False
        while self._waiting and len(self._bundles) < BUNDLES_IN_FLIGHT:
            bundle: list[tuple[Webhook, asyncio.Future[None]]] = []
            size = 0
            while self._waiting and len(bundle) < BUNDLE_MAX_WEBHOOKS and size < BUNDLE_MAX_BYTES:
                webhook, future = self._waiting.popleft()
                if not future.done():  # done: its request gave up (503) before it was sent
                    bundle.append((webhook, future))
                    size += len(webhook.body)
            if bundle:
                task = asyncio.create_task(self._send_bundle(bundle))
                self._bundles.add(task)
                task.add_done_callback(self._bundle_done)

    def _bundle_done(self, task: asyncio.Task[None]) -> None:
        self._bundles.discard(task)
        self._flush()

    async def _send_bundle(self, bundle: list[tuple[Webhook, asyncio.Future[None]]]) -> None:
        outcome: NotStored | None = None
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                await self._send([webhook for webhook, _ in bundle])
        except TimeoutError:
            outcome = NotStored("the broker did not confirm in time")
        except NotStored as exc:
            outcome = exc
        except Exception as exc:
            log.exception("publishing a bundle failed")
            outcome = NotStored(f"publishing failed: {type(exc).__name__}")
        for _, future in bundle:
            if not future.done():
                if outcome is None:
                    future.set_result(None)
                else:
                    future.set_exception(NotStored(str(outcome)))

    async def _send(self, webhooks: list[Webhook]) -> None:
        """Publish one message holding these webhooks and wait for the broker's confirm."""
        exchange, channel = self._exchange, self._channel
        if exchange is None or channel is None or channel.is_closed:
            raise NotStored("not connected to the broker")
        # Compressed right here, not in a thread: zstd is quick on a full payload, and a
        # thread's result would wait for the GIL behind the loop's work under a burst.
        message = pack(webhooks)
        routing_key = ROUTING_KEYS[webhooks[0].event] if len(webhooks) == 1 else BUNDLE_ROUTING_KEY
        try:
            # mandatory + on_return_raises: an unroutable message raises instead of being
            # "confirmed" and dropped. The caller's deadline covers a blocked broker.
            await asyncio.shield(await self._publish(channel, exchange, message, routing_key))
        except aiormq.exceptions.PublishError:
            raise NotStored("the broker could not route the message") from None
        except aiormq.exceptions.DeliveryError:
            if not (self._settings.queue_max_length or self._settings.queue_max_bytes):
                # No limit that could refuse it: the channel lost the queue (its leader moved
                # to another node of a cluster). A new channel, maybe on another node, finds it.
                self._reopen(channel)
            raise NotStored("the broker refused the message (queue full?)") from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise NotStored(f"lost the broker: {type(exc).__name__}") from None

    def _reopen(self, channel: AbstractChannel) -> None:
        """Close the channel; the connection loop then connects again (to the next node)."""
        if channel is self._channel and not channel.is_closed:
            log.warning("the broker refused a message with no queue limit set; reconnecting")
            self._channel = self._exchange = None  # publishes get a fast 503 meanwhile
            task: asyncio.Future[Any] = asyncio.ensure_future(channel.close())
            self._closing.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._closing.discard)

    async def _publish(
        self,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        message: aio_pika.Message,
        routing_key: str,
    ) -> asyncio.Task[Any]:
        """Write the message within the window; the future of its confirm.

        The window's place is held until the broker confirms, refuses or the channel closes,
        even when the request waiting for it gives up (the caller awaits it shielded): what the
        broker has not answered stays counted.
        """
        await self._window.acquire()
        # No waiting for the bytes to be written out: the window bounds them.
        confirm = asyncio.create_task(
            publish_without_drain(channel, exchange.name, message, routing_key)
        )
        self._unconfirmed.add(confirm)
        confirm.add_done_callback(self._confirmed)
        return confirm

    def _confirmed(self, confirm: asyncio.Task[Any]) -> None:
        self._unconfirmed.discard(confirm)
        self._window.release()
        if not confirm.cancelled():
            confirm.exception()  # retrieved here too: its request may have given up on it

    async def _keep_connected(self) -> None:
        delays = backoff(0.1, 5.0)
        while True:
            connection: AbstractConnection | None = None
            try:
                connection = await self._nodes.connect()
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                topology = await declare_topology(channel, self._settings)
                self._connection = connection
                self._channel, self._exchange = channel, topology.exchange
                log.info("connected to the broker")
                delays = backoff(0.1, 5.0)  # a new outage starts from the shortest delay
                await until_closed(connection, channel)
                log.warning("lost the broker connection; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to connect means: try again
                # aiormq's messages name the host, never the password (it censors URLs).
                log.warning("cannot reach the broker: %s %s; retrying", type(exc).__name__, exc)
            finally:
                self._connection = self._channel = self._exchange = None
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(connection.close())
            await asyncio.sleep(next(delays))
