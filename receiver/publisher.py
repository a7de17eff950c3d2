"""The receiver's link to RabbitMQ: one connection kept up in the background, confirmed publishes.

The receiver must start and answer (503) while the broker is down, so connecting is a background
loop, not a start-up step; a request never waits for a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, HeadersType

from common.settings import Settings
from common.topology import amqp_url_with_heartbeat, declare_topology, until_closed

log = logging.getLogger(__name__)


class NotStored(Exception):
    """The broker did not confirm the message as stored; the sender must retry."""


class Publisher:
    """Publishes webhook bodies persistently, mandatory and confirmed, within a deadline."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """True while a confirmed channel with the declared topology is open."""
        return self._channel is not None and not self._channel.is_closed

    async def can_publish(self) -> bool:
        """Connected, and the broker is not blocking publishers (a memory or disk alarm)."""
        connection = self._connection
        if not self.ready or connection is None or connection.transport is None:
            return False
        try:
            # aiormq's ready() waits until the connection is open and not blocked.
            await asyncio.wait_for(connection.transport.connection.ready(), 0.05)
        except TimeoutError:
            return False
        return True

    async def start(self) -> None:
        """Start connecting in the background."""
        self._task = asyncio.create_task(self._keep_connected(), name="amqp-publisher")

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def publish(
        self, body: bytes, routing_key: str, headers: HeadersType, message_id: str
    ) -> None:
        """Return once RabbitMQ has confirmed the message as stored; raise NotStored otherwise."""
        exchange, channel = self._exchange, self._channel
        if exchange is None or channel is None or channel.is_closed:
            raise NotStored("not connected to the broker")
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,  # not the default: survive a restart
            headers=headers,
            message_id=message_id,
            timestamp=time.time(),
        )
        try:
            # mandatory + on_return_raises: an unroutable message raises instead of being
            # "confirmed" and dropped. The deadline covers a blocked broker (memory/disk alarm).
            await asyncio.wait_for(
                exchange.publish(message, routing_key, mandatory=True),
                self._settings.publish_timeout,
            )
        except TimeoutError:
            raise NotStored("the broker did not confirm in time") from None
        except aiormq.exceptions.PublishError:
            raise NotStored("the broker could not route the message") from None
        except aiormq.exceptions.DeliveryError:
            raise NotStored("the broker refused the message (queue full?)") from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise NotStored(f"lost the broker: {type(exc).__name__}") from None

    async def _keep_connected(self) -> None:
        backoff = 0.1
        while True:
            connection: AbstractConnection | None = None
            try:
                connection = await aio_pika.connect(
                    amqp_url_with_heartbeat(self._settings.amqp_url), timeout=5
                )
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                topology = await declare_topology(channel, self._settings)
                self._connection = connection
                self._channel, self._exchange = channel, topology.exchange
                log.info("connected to the broker")
                backoff = 0.1
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
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
