"""The worker's consumer: connect, consume, collect batches, hand them to the pipeline, ack.

A message is acknowledged only once what it carries is safe elsewhere (see `settle`): until
then a crash, a lost connection or a Postgres outage only means RabbitMQ delivers it again, and
the fold makes the repeat harmless. What happens to a batch in between is worker/pipeline.py;
dead-lettering and splitting, worker/deadletter.py; retention, worker/retention.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from common import schema
from common.backoff import backoff
from common.brokers import Nodes
from common.message import BUNDLE, copy_of, unpack
from common.settings import Settings
from common.topology import Topology, declare_topology, until_closed
from worker.deadletter import split
from worker.metrics import WorkerMetrics
from worker.pipeline import Committed, Pipeline
from worker.publishing import PUBLISH_DEADLINE, PublishTimedOut, publish
from worker.retention import keep_retention
from worker.store import ensure_database, migrate, open_pool

log = logging.getLogger(__name__)

# How long the worker keeps retrying a batch it cannot write before handing back everything it
# holds (see Worker._hand_back). RabbitMQ closes the channel of a consumer holding a delivery
# longer than its consumer_timeout (30 minutes by default, checked once a minute), and every
# delivery returned so counts toward the delivery limit: a long outage would dead-letter good
# webhooks. Well below any sensible consumer timeout, well above a Postgres restart.
HOLD_LIMIT = 30.0

# Seconds from start to the first retention run, drawn at random: soon, so that workers restarted
# more often than RETENTION_INTERVAL still purge, and spread, so that a fleet started together
# does not queue up for the lock.
RETENTION_FIRST_RUN = (10.0, 60.0)


class ConnectionLost(Exception):
    """The broker connection closed: the messages in hand will be delivered again."""


class Abandoned(Exception):
    """Shutting down and the batch could not be committed within the grace period."""


class Stalled(Exception):
    """The batch could not be written for HOLD_LIMIT: hand back what is held, wait for Postgres."""


async def settle(message: AbstractIncomingMessage, *, done: bool) -> None:
    """Ack a message that is done with; return one that is not, to come again.

    The ack rule: a message is acked only after the COMMIT of every webhook it carries, or once
    RabbitMQ has confirmed a copy of it elsewhere (a dead letter, a split bundle's webhooks, a
    delivery handed back); the ack is what lets RabbitMQ forget it. One ack per message, never
    multiple=True: that would also ack any delivery a bug left out of the batch, and an ack is
    only a frame written, not a round trip. A return counts toward the delivery limit.
    """
    try:
        if done:
            await message.ack()
        else:
            await message.nack(requeue=True)
    except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
        # Committed but not acked: RabbitMQ redelivers, and the fold makes that a no-op.
        raise ConnectionLost from exc


class Subscription:
    """The worker's consumer, cautious (prefetch 1) or normal (WORKER_PREFETCH).

    It keeps every delivery it was given until acknowledged, with when it came: what the worker
    holds, for RabbitMQ's consumer timeout, and what it hands back (Worker._hand_back).
    """

    def __init__(
        self,
        topology: Topology,
        channel: AbstractChannel,
        inbox: asyncio.Queue[AbstractIncomingMessage],
        prefetch: int,
    ) -> None:
        self.topology, self.channel, self._inbox = topology, channel, inbox
        self._prefetch = prefetch
        self._tag: str | None = None
        self._cautious: bool | None = None
        self._held: list[tuple[float, AbstractIncomingMessage]] = []

    @property
    def prefetch(self) -> int:
        """How many unacked deliveries RabbitMQ sends us at most, in the current mode."""
        return 1 if self._cautious else self._prefetch

    async def start(self, *, cautious: bool) -> None:
        """Consume with the prefetch of the mode; a no-op when already in that mode.

        RabbitMQ applies a new prefetch only to consumers started after it (and quorum queues
        have no channel-wide prefetch), so changing it means cancelling and consuming again.
        Deliveries already made stay ours, unacked, in the inbox.
        """
        if cautious == self._cautious:
            return
        await self.stop()
        # The prefetch bounds what RabbitMQ pushes ahead of our acks: memory follows it, not
        # the backlog. It holds several batches of full payloads, so the next is in hand during
        # a COMMIT; a batch of small webhooks may take all of it (see Settings.prefetch).
        self._cautious = cautious
        await self.channel.set_qos(prefetch_count=self.prefetch)
        self._tag = await self.topology.queue.consume(self._deliver)

    async def stop(self) -> None:
        """No new deliveries (nothing to cancel on a channel that is already gone)."""
        if self._tag is not None and not self.channel.is_closed:
            # Bounded like a publish: a connection the broker blocks answers nothing. A consumer
            # not cancelled in time may still deliver; what comes is handed back or processed.
            with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, TimeoutError):
                await self.topology.queue.cancel(self._tag, timeout=PUBLISH_DEADLINE)
        self._tag = None
        self._cautious = None  # the next start() consumes again, whichever its mode

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self._held = [(at, m) for at, m in self._held if not m.processed]
        self._held.append((time.monotonic(), message))
        await self._inbox.put(message)

    def held_for(self) -> float:
        """Seconds the oldest delivery not yet acknowledged (or rejected) has been held."""
        oldest = min((at for at, m in self._held if not m.processed), default=time.monotonic())
        return time.monotonic() - oldest

    def held(self) -> list[AbstractIncomingMessage]:
        """Every delivery not yet acknowledged (or rejected), in delivery order."""
        self._held = [(at, m) for at, m in self._held if not m.processed]
        return [m for _, m in self._held]


@dataclass
class Worker:
    """One worker process: `run()` until `stop()`."""

    settings: Settings
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    pool: asyncpg.Pool | None = None
    consuming: bool = False
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _sessions: int = 0  # broker sessions that reached "consuming"
    _stop_deadline: float = 0.0

    def stop(self) -> None:
        """Stop taking messages; the batch in hand is committed and acked, then run() returns."""
        if not self._stopping.is_set():
            log.info("stopping: finishing the batch in hand")
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace
            self._stopping.set()

    async def run(self) -> None:
        """Connect to Postgres (migrating the schema) and RabbitMQ, consume until stopped."""
        retention: asyncio.Task[None] | None = None
        try:
            self.pool = await self._open_database()
            if self.pool is None:  # stopped before Postgres answered
                return
            retention = asyncio.create_task(
                keep_retention(self.settings, self.pool, RETENTION_FIRST_RUN), name="retention"
            )
            nodes = Nodes(self.settings.amqp_url)
            delays = backoff(0.1, 5.0)
            while not self._stopping.is_set():
                sessions = self._sessions
                try:
                    await self._consume(nodes)
                except (
                    ConnectionLost,
                    aiormq.exceptions.AMQPError,
                    aiormq.exceptions.ChannelInvalidStateError,
                    OSError,
                ) as exc:
                    reason = f"{type(exc).__name__} {exc}".strip()
                    log.warning("broker connection lost: %s; reconnecting", reason)
                except Abandoned:
                    log.warning("shutdown grace over: what the worker held goes back to the queue")
                    break
                if self._sessions != sessions:
                    delays = backoff(0.1, 5.0)  # it had been consuming: a new outage starts anew
                if not self._stopping.is_set():
                    await self._sleep(next(delays))
        finally:
            if retention is not None:
                retention.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await retention
            if self.pool is not None:
                await self.pool.close()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _open_database(self) -> asyncpg.Pool | None:
        """Wait for Postgres, migrate the schema, open the pool; None if stopped first."""
        delays = backoff(0.2, 5.0)
        while not self._stopping.is_set():
            try:
                await ensure_database(self.settings.database_url)
                conn = await asyncpg.connect(self.settings.database_url, timeout=10)
                try:
                    applied = await migrate(conn)
                finally:
                    await conn.close()
                if applied:
                    log.info("schema migrated", extra={"applied": applied})
                return await open_pool(
                    self.settings.database_url,
                    min_size=1,
                    max_size=self.settings.db_pool_size,
                    timeout=10,
                    # A hung statement (dead link, not a closed one) becomes a retryable timeout.
                    command_timeout=60,
                )
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # InterfaceError: the connection dropped mid-way (Postgres restarting).
                log.warning("cannot reach Postgres: %s; retrying", type(exc).__name__)
                await self._sleep(next(delays))
        return None

    async def _consume(self, nodes: Nodes) -> None:
        """One broker session: consume and apply batches until stopped or the link drops."""
        assert self.pool is not None
        connection = await nodes.connect()
        try:
            # Confirms (and returns raised) on this channel are for the messages the worker
            # publishes: dead-letter copies, the webhooks of a split bundle, handed-back ones.
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            topology = await declare_topology(channel, self.settings)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            # Cautious first: a message redelivered to us may be one that crashed a worker.
            subscription = Subscription(topology, channel, inbox, self.settings.prefetch)
            await subscription.start(cautious=True)
            pipeline = Pipeline(
                self.pool,
                topology,
                self.metrics,
                self.settings.retry_max_backoff,
                may_wait=functools.partial(self._may_wait, subscription),
            )
            self._sessions += 1
            self._set_consuming(True)
            log.info("consuming", extra={"queue": topology.queue.name})
            # The channel closes when the link drops; aio-pika resolves connection.closed() only
            # on an explicit close, so wait for either.
            closed: asyncio.Future[Any] = asyncio.ensure_future(until_closed(connection, channel))
            try:
                while not self._stopping.is_set():
                    try:
                        batch = await self._collect(inbox, closed, subscription.prefetch)
                        if batch:
                            await self._fresh_then_suspects(batch, subscription, pipeline)
                    except Stalled:
                        self._set_consuming(False)
                        await self._wait_for_postgres(subscription, closed)
                        if not self._stopping.is_set():
                            await subscription.start(cautious=True)
                            self._set_consuming(True)
                # No new deliveries; what RabbitMQ already sent is finished, not bounced back.
                await subscription.stop()
                while not inbox.empty() and not channel.is_closed:
                    await self._apply(self._take(inbox, []), pipeline)
            except Abandoned:
                # Returned by the channel's close instead, they would count toward the limit.
                with contextlib.suppress(
                    ConnectionLost,
                    aiormq.exceptions.AMQPError,
                    aiormq.exceptions.ChannelInvalidStateError,
                ):
                    await self._hand_back(subscription)
                raise
            finally:
                closed.cancel()
                self._set_consuming(False)
        finally:
            with contextlib.suppress(Exception):
                # Bounded: on a connection the broker has blocked, the close would wait for
                # the alarm to clear.
                await asyncio.wait_for(connection.close(), PUBLISH_DEADLINE)

    def _set_consuming(self, value: bool) -> None:
        self.consuming = value
        self.metrics.consuming.set(int(value))

    # --- collect --------------------------------------------------------------------------------

    def _take(
        self, inbox: asyncio.Queue[AbstractIncomingMessage], batch: list[AbstractIncomingMessage]
    ) -> list[AbstractIncomingMessage]:
        """Add what is already waiting to the batch, in delivery order, up to the batch size.

        A message handed back meanwhile (Worker._hand_back) is settled: it is skipped.
        """
        records = sum(_record_count(m) for m in batch)
        while records < self.settings.batch_max_records and not inbox.empty():
            message = inbox.get_nowait()
            if not message.processed:
                batch.append(message)
                records += _record_count(message)
        return batch

    async def _collect(
        self,
        inbox: asyncio.Queue[AbstractIncomingMessage],
        closed: asyncio.Future[Any],
        prefetch: int,
    ) -> list[AbstractIncomingMessage]:
        """Wait for a first message, then gather more for at most batch_max_wait.

        It stops early at BATCH_MAX_RECORDS, or when it holds all the prefetch lets RabbitMQ
        send: nothing more can arrive before this batch is acked. The batch keeps delivery
        order, so the log and the ack order follow the queue.
        """
        batch: list[AbstractIncomingMessage] = []
        if inbox.empty():
            getter = asyncio.ensure_future(inbox.get())
            stopping = asyncio.ensure_future(self._stopping.wait())
            waiters: list[asyncio.Future[Any]] = [getter, stopping, closed]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not getter.done():
                getter.cancel()
                if closed.done():
                    raise ConnectionLost
                return []
            batch.append(getter.result())
        self._take(inbox, batch)
        records = sum(_record_count(m) for m in batch)
        deadline = time.monotonic() + self.settings.batch_max_wait
        while (
            records < self.settings.batch_max_records
            and len(batch) < prefetch
            and not self._stopping.is_set()
        ):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = await asyncio.wait_for(inbox.get(), remaining)
            except TimeoutError:
                break
            batch.append(message)
            records += _record_count(message)
        return [m for m in batch if not m.processed]

    # --- apply, then ack ------------------------------------------------------------------------

    async def _fresh_then_suspects(
        self, batch: list[AbstractIncomingMessage], subscription: Subscription, pipeline: Pipeline
    ) -> None:
        """Apply first-time deliveries together; redelivered ones one per transaction.

        A redelivered message may be one that crashed a worker (killed it, not raised): it must
        not take its batch-mates down again and again until the delivery limit dead-letters
        them all with it. So while redeliveries come, the prefetch is 1 and each is alone; the
        first first-time delivery restores the normal prefetch.
        """
        fresh = [m for m in batch if not m.redelivered]
        suspects = [m for m in batch if m.redelivered]
        await subscription.start(cautious=bool(suspects))
        if fresh:
            await self._apply(fresh, pipeline)
        for message in suspects:
            if message.content_type == BUNDLE:
                await self._split(message, pipeline)
            else:
                await self._apply([message], pipeline)

    async def _apply(self, batch: list[AbstractIncomingMessage], pipeline: Pipeline) -> None:
        """Run the batch through the pipeline: log each commit, settle each message as judged."""
        async with contextlib.aclosing(pipeline.apply(batch)) as steps:
            async for step in steps:
                if isinstance(step, Committed):
                    self._committed(step)
                else:
                    await settle(step.message, done=step.done)

    async def _split(self, message: AbstractIncomingMessage, pipeline: Pipeline) -> None:
        """Put a redelivered bundle's webhooks back in the queue one per message, then ack it.

        Whichever of them crashed a worker then meets the delivery limit alone, and the others
        are applied. A crash in the middle only means the bundle is split again: duplicates,
        which the fold ignores. When the queue refuses them (it is full), the bundle is applied
        as it is instead: the queue must drain, and this is what drains it.
        """
        try:
            webhooks = unpack(message)
        except ValueError:
            await self._apply([message], pipeline)  # dead-letters it, with the reason
            return
        try:
            await split(pipeline.topology, self.metrics, message, webhooks)
        except aiormq.exceptions.DeliveryError as exc:
            log.warning("cannot split a redelivered bundle (%s): applying it whole", exc)
            await self._apply([message], pipeline)
            return
        except PublishTimedOut:
            # To be split again; what was published is a duplicate then.
            await settle(message, done=False)
            return
        log.info("redelivered bundle split", extra={"webhooks": len(webhooks)})
        await settle(message, done=True)

    def _may_wait(self, subscription: Subscription, delay: float) -> None:
        """Raise unless the batch in hand may wait `delay` seconds more to be written."""
        if subscription.channel.is_closed:
            # RabbitMQ will deliver these again (to us after reconnecting, or to another
            # worker); retrying here would only write them twice.
            raise ConnectionLost
        if self._stopping.is_set():
            if time.monotonic() + delay > self._stop_deadline:
                raise Abandoned
        elif subscription.held_for() + delay > HOLD_LIMIT:
            # The messages wait in the queue, not in this worker (see _hand_back).
            raise Stalled

    def _committed(self, committed: Committed) -> None:
        """Count a committed transaction and log its one line."""
        decoded = committed.decoded
        lag = time.time() - min(item.received_at for item in decoded)
        self.metrics.count_committed(committed, lag)
        rejected = sum(len(item.rejected) for item in decoded)
        log.info(
            "batch committed",
            extra={
                "webhooks": len(decoded),
                "messages": len({id(item.message) for item in decoded}),
                "records": sum(len(item.rows) for item in decoded) + rejected,
                "rows": len(committed.rows),
                "changed": sum(committed.changed.values()),
                "rejected": rejected,
                "shops": sorted({item.project for item in decoded})[:10],
                "request_ids": [item.webhook.request_id for item in decoded][:20],
                "took_ms": round(committed.took * 1000, 1),
                "lag_ms": round(lag * 1000, 1),
            },
        )

    # --- a Postgres outage ----------------------------------------------------------------------

    async def _wait_for_postgres(
        self, subscription: Subscription, closed: asyncio.Future[Any]
    ) -> None:
        """Hand back what the worker holds, then consume nothing until Postgres answers.

        Deliveries still arriving meanwhile (sent before the consumer was cancelled) are
        handed back too: held, they would run into the consumer timeout.
        """
        delays = backoff(0.1, self.settings.retry_max_backoff)
        while not self._stopping.is_set():
            if closed.done():
                raise ConnectionLost
            await self._hand_back(subscription)
            if await self._postgres_answers():
                log.info("Postgres answers again; consuming")
                return
            await self._sleep(next(delays))

    async def _postgres_answers(self) -> bool:
        assert self.pool is not None
        try:
            async with asyncio.timeout(5):
                await self.pool.fetchval("SELECT 1")
        except Exception:  # noqa: BLE001 - whatever it is, Postgres cannot take the batch yet
            return False
        return True

    async def _hand_back(self, subscription: Subscription) -> None:
        """Stop consuming, and put every delivery held back in the queue as a new message.

        A nack, or the channel closing, would return the delivery instead; but RabbitMQ 3.10
        counts every return of a quorum queue's message toward the delivery limit, so an outage
        longer than a few consumer timeouts would dead-letter good webhooks. A copy starts
        from zero. It is confirmed before the original is acked: a crash in between leaves a
        duplicate, which the fold ignores. A copy not confirmed in time (the broker blocks us)
        leaves its original held, handed back on a later try or delivered again.
        """
        await subscription.stop()
        handed = 0
        for message in subscription.held():
            try:
                await publish(
                    subscription.topology.exchange,
                    requeued(message),
                    message.routing_key or "",
                    "a message handed back",
                )
            except PublishTimedOut:
                break
            except aiormq.exceptions.DeliveryError as exc:
                log.warning("cannot hand a message back (%s); it stays held", exc)
                continue
            await settle(message, done=True)
            handed += 1
        if handed:
            self.metrics.handed_back.inc(handed)
            log.warning(
                "Postgres unavailable: deliveries handed back to the queue; consuming again "
                "once it answers",
                extra={"messages": handed},
            )


def requeued(message: AbstractIncomingMessage) -> aio_pika.Message:
    """A delivery as a new message for the same queue: the same body, headers and identity."""
    headers = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}
    return copy_of(message, headers)


def _record_count(message: AbstractIncomingMessage) -> int:
    count = (message.headers or {}).get(schema.H_RECORDS)
    return count if isinstance(count, int) and count > 0 else 1
