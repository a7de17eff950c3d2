"""The worker: consume, batch across messages, decode and fold, commit, then ack.

A message is acknowledged only after the transaction that holds its records has committed: the
ack is what lets RabbitMQ forget it. Until then a crash, a lost connection or a Postgres outage
only means RabbitMQ delivers it again, and the fold makes the repeat harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiormq
import asyncpg
import msgspec
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common import schema
from common.deadletters import H_DEAD_LETTERED_AT, dead_lettered_at, open_dead_letters
from common.message import BUNDLE, Webhook, alone, unpack
from common.metrics import LATENCY_BUCKETS
from common.settings import Settings
from common.topology import (
    ROUTING_KEYS,
    Topology,
    amqp_url_with_heartbeat,
    declare_topology,
    until_closed,
)
from worker.fold import Row, decode_payload, fold
from worker.store import (
    RETENTION_LOCK,
    RejectedFrom,
    ensure_database,
    is_data_error,
    is_transient,
    migrate,
    open_pool,
    purge_rejected,
    write_batch,
)

log = logging.getLogger(__name__)

# Dead letters looked at per retention run (each is held unacked until the run ends).
RETENTION_SCAN_LIMIT = 10_000
# Seconds from start to the first retention run, drawn at random: soon, so that workers restarted
# more often than RETENTION_INTERVAL still purge, and spread, so that a fleet started together
# does not queue up for the lock.
RETENTION_FIRST_RUN = (10.0, 60.0)

# Every publish the worker makes (a split bundle's webhooks, a dead letter's copy, a message
# handed back) is given up after this. A broker alarm blocks the consumer's connection, acks
# included, and a publish on it would wait for the alarm to clear; a confirm normally takes
# milliseconds, and the message not acknowledged meanwhile is only delivered again.
PUBLISH_DEADLINE = 5.0

# How long the worker keeps retrying a batch it cannot write before handing back everything it
# holds (see Worker._hand_back). RabbitMQ closes the channel of a consumer holding a delivery
# longer than its consumer_timeout (30 minutes by default, checked once a minute), and every
# delivery returned so counts toward the delivery limit: a long outage would dead-letter good
# webhooks. Well below any sensible consumer timeout, well above a Postgres restart.
HOLD_LIMIT = 30.0


class ConnectionLost(Exception):
    """The broker connection closed: the messages in hand will be delivered again."""


class Abandoned(Exception):
    """Shutting down and the batch could not be committed within the grace period."""


class Stalled(Exception):
    """The batch could not be written for HOLD_LIMIT: hand back what is held, wait for Postgres."""


class PublishTimedOut(Exception):
    """A publish of the worker's was not confirmed within PUBLISH_DEADLINE."""


class WorkerMetrics:
    """What a worker counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "upgates_worker_records",
            "Customer records decoded, by event and outcome (accepted or rejected).",
            ["event", "outcome"],
            registry=r,
        )
        self.rows = Counter(
            "upgates_worker_rows",
            "Folded rows written, by the event of their newest record and by outcome: changed "
            "the table, or stale (it already reflected something as new or newer).",
            ["event", "outcome"],
            registry=r,
        )
        self.batch_messages = Histogram(
            "upgates_worker_batch_messages",
            "Webhooks per committed batch (a bundle message carries several).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "upgates_worker_batch_seconds",
            "Time to decode, fold and commit a batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag_seconds = Histogram(
            "upgates_worker_lag_seconds",
            "From the receiver accepting the oldest message of a batch to its COMMIT.",
            buckets=(*LATENCY_BUCKETS, 5, 10, 30, 60, 300, 1800),
            registry=r,
        )
        self.retries = Counter(
            "upgates_worker_retries", "Batch writes retried after a transient error.", registry=r
        )
        self.dead_letters = Counter(
            "upgates_worker_dead_letters",
            "Messages the worker dead-lettered itself (undecodable or failing alone).",
            registry=r,
        )
        self.consuming = Gauge(
            "upgates_worker_consuming",
            "1 while the worker consumes from the queue (the processes consuming, when several "
            "share the port).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.handed_back = Counter(
            "upgates_worker_handed_back",
            "Deliveries put back in the queue as new messages while Postgres could not be written.",
            registry=r,
        )


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


@dataclass(slots=True)
class Decoded:
    """One webhook's records, ready to fold, and the message it came in."""

    message: AbstractIncomingMessage
    webhook: Webhook
    project: str
    rows: list[Row]
    rejected: list[RejectedFrom]

    @property
    def received_at(self) -> float:
        """When the receiver accepted the webhook, in seconds since the epoch."""
        return self.webhook.received_at / 1000


def decode_webhook(message: AbstractIncomingMessage, webhook: Webhook) -> Decoded:
    """Decode one webhook; raise ValueError with a reason when it can never be applied."""
    if webhook.event not in schema.EVENTS:
        raise ValueError(f"unknown event {webhook.event!r}")
    try:
        project, rows, rejected = decode_payload(webhook.event, webhook.body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as e:
        reason = schema.explain(e, webhook.body)
        raise ValueError(f"not an Upgates customers envelope: {reason}") from None
    at = datetime.fromtimestamp(webhook.received_at / 1000, UTC)
    request_id = webhook.request_id
    if not request_id:  # not from our receiver; the body identifies it for deduplication
        request_id = hashlib.sha256(webhook.body).hexdigest()
    return Decoded(
        message,
        webhook,
        project,
        rows,
        [RejectedFrom(project, at, request_id, r) for r in rejected],
    )


# A part of a batch this large has a fast path of its own (see by_event).
SPLIT_FROM_RECORDS = 1000


def by_event(decoded: list[Decoded]) -> list[list[Decoded]]:
    """The batch in one transaction, or in one per event when every event's part is large.

    A batch of one event has the fast paths (new customers COPY'd into the table, updates
    merged), while one mixing events is upserted, which costs Postgres about twice as much per
    row. So a burst's batch that caught the last creates and the first updates is written as two
    transactions, in the order of their first webhooks; small mixed batches (everyday bundles)
    stay one. Which transaction comes first does not matter: event time decides in the SQL.
    At 64 in flight a burst made 16 mixed batches where at 16 it made 2: split, Postgres' CPU
    per burst at 64 fell to that at 16 (medians 2.58 against 2.82 s before; 2.54 and 2.55 at
    16), seven alternating pairs of `bench.run --only burst-16 burst-64`.
    """
    parts: dict[str, list[Decoded]] = {}
    for item in decoded:
        parts.setdefault(item.webhook.event, []).append(item)
    if len(parts) > 1 and all(
        sum(len(item.rows) for item in part) >= SPLIT_FROM_RECORDS for part in parts.values()
    ):
        return list(parts.values())
    return [decoded] if decoded else []


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
            await self._open_database()
            retention = asyncio.create_task(self._keep_retention(), name="retention")
            backoff = 0.1
            while not self._stopping.is_set():
                sessions = self._sessions
                try:
                    await self._consume()
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
                    backoff = 0.1  # it had been consuming: a new outage starts the backoff anew
                if not self._stopping.is_set():
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            if retention is not None:
                retention.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await retention
            if self.pool is not None:
                await self.pool.close()

    async def _keep_retention(self) -> None:
        """Soon after start, then every RETENTION_INTERVAL, one worker (whichever holds the
        lock) purges old data."""
        interval = self.settings.retention_interval
        delay = min(interval, random.uniform(*RETENTION_FIRST_RUN))  # noqa: S311 - jitter, not a secret
        while True:
            await asyncio.sleep(delay)
            delay = interval
            try:
                assert self.pool is not None
                # The purge runs on the lock's connection: one connection, whatever it has to
                # delete, and the rest of the pool stays free for the batches.
                async with self.pool.acquire() as conn:
                    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
                        continue  # another worker is at it
                    try:
                        await apply_retention(self.settings, conn)
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
            except Exception as exc:  # noqa: BLE001 - retention must never stop the worker
                log.warning("retention failed: %s; next try in an interval", type(exc).__name__)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _open_database(self) -> None:
        backoff = 0.2
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
                self.pool = await open_pool(
                    self.settings.database_url,
                    min_size=1,
                    max_size=self.settings.db_pool_size,
                    timeout=10,
                    # A hung statement (dead link, not a closed one) becomes a retryable timeout.
                    command_timeout=60,
                )
                return
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # InterfaceError: the connection dropped mid-way (Postgres restarting).
                log.warning("cannot reach Postgres: %s; retrying", type(exc).__name__)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _consume(self) -> None:
        url = amqp_url_with_heartbeat(self.settings.amqp_url)
        connection = await aio_pika.connect(url, timeout=5)
        try:
            # Confirms (and returns raised) on this channel are for the messages the worker
            # publishes: dead-letter copies, the webhooks of a split bundle, handed-back ones.
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            topology = await declare_topology(channel, self.settings)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            # Cautious first: a message redelivered to us may be one that crashed a worker.
            subscription = Subscription(topology, channel, inbox, self.settings.prefetch)
            await subscription.start(cautious=True)
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
                            await self._process_fresh_then_suspects(batch, subscription)
                    except Stalled:
                        self._set_consuming(False)
                        await self._wait_for_postgres(subscription, closed)
                        if not self._stopping.is_set():
                            await subscription.start(cautious=True)
                            self._set_consuming(True)
                # No new deliveries; what RabbitMQ already sent is finished, not bounced back.
                await subscription.stop()
                while not inbox.empty() and not channel.is_closed:
                    await self._process(self._take(inbox, []), subscription)
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

    async def _wait_for_postgres(
        self, subscription: Subscription, closed: asyncio.Future[Any]
    ) -> None:
        """Hand back what the worker holds, then consume nothing until Postgres answers.

        Deliveries still arriving meanwhile (sent before the consumer was cancelled) are
        handed back too: held, they would run into the consumer timeout.
        """
        delay = 0.1
        while not self._stopping.is_set():
            if closed.done():
                raise ConnectionLost
            await self._hand_back(subscription)
            if await self._postgres_answers():
                log.info("Postgres answers again; consuming")
                return
            await self._sleep(delay)
            delay = min(delay * 2, self.settings.retry_max_backoff)

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
                await self._publish(
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
            await _ack(message)
            handed += 1
        if handed:
            self.metrics.handed_back.inc(handed)
            log.warning(
                "Postgres unavailable: deliveries handed back to the queue; consuming again "
                "once it answers",
                extra={"messages": handed},
            )

    async def _publish(
        self, exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, what: str
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

    async def _process_fresh_then_suspects(
        self, batch: list[AbstractIncomingMessage], subscription: Subscription
    ) -> None:
        """Commit first-time deliveries together; redelivered ones one per transaction.

        A redelivered message may be one that crashed a worker (killed it, not raised): it must
        not take its batch-mates down again and again until the delivery limit dead-letters
        them all with it. So while redeliveries come, the prefetch is 1 and each is alone; the
        first first-time delivery restores the normal prefetch.
        """
        fresh = [m for m in batch if not m.redelivered]
        suspects = [m for m in batch if m.redelivered]
        await subscription.start(cautious=bool(suspects))
        if fresh:
            await self._process(fresh, subscription)
        for message in suspects:
            if message.content_type == BUNDLE:
                await self._split(message, subscription)
            else:
                await self._process([message], subscription)

    async def _split(self, message: AbstractIncomingMessage, subscription: Subscription) -> None:
        """Put a redelivered bundle's webhooks back in the queue one per message, then ack it.

        Whichever of them crashed a worker then meets the delivery limit alone, and the others
        are applied. A crash in the middle only means the bundle is split again: duplicates,
        which the fold ignores. When the queue refuses them (it is full), the bundle is applied
        as it is instead: the queue must drain, and this is what drains it.
        """
        try:
            webhooks = unpack(message)
        except ValueError:
            await self._process([message], subscription)  # dead-letters it, with the reason
            return
        topology = subscription.topology
        try:
            for webhook in webhooks:
                if webhook.event in ROUTING_KEYS:
                    routing_key = ROUTING_KEYS[webhook.event]
                    await self._publish(
                        topology.exchange, alone(webhook), routing_key, "a split webhook"
                    )
                elif not await self._dead_letter(
                    message, webhook, f"unknown event {webhook.event!r}", topology
                ):
                    raise PublishTimedOut
        except aiormq.exceptions.DeliveryError as exc:
            log.warning("cannot split a redelivered bundle (%s): applying it whole", exc)
            await self._process([message], subscription)
            return
        except PublishTimedOut:
            await _requeue(message)  # to be split again; what was published is a duplicate then
            return
        log.info("redelivered bundle split", extra={"webhooks": len(webhooks)})
        await _ack(message)

    def _set_consuming(self, value: bool) -> None:
        self.consuming = value
        self.metrics.consuming.set(int(value))

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

    async def _process(
        self, batch: list[AbstractIncomingMessage], subscription: Subscription
    ) -> None:
        """Decode, commit, then ack; what can never be applied is dead-lettered on the way."""
        started = time.perf_counter()
        topology = subscription.topology
        decoded: list[Decoded] = []
        readable: list[AbstractIncomingMessage] = []
        # Messages whose dead-letter copy was not confirmed in time: not acked, but returned,
        # so that they come again rather than wait for the consumer timeout.
        unsettled: set[int] = set()
        for message in batch:
            try:
                webhooks = unpack(message)
            except Exception as exc:  # noqa: BLE001 - whatever it is, this message is unreadable
                reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
                reason = f"unreadable message: {reason}"
                if await self._dead_letter(message, None, reason, topology):
                    await _ack(message)
                else:
                    await _requeue(message)
                continue
            readable.append(message)
            for webhook in webhooks:
                try:
                    decoded.append(decode_webhook(message, webhook))
                    continue
                except ValueError as exc:
                    reason = str(exc)
                except Exception as exc:
                    log.exception("cannot decode a webhook")
                    reason = f"undecodable: {type(exc).__name__}"
                if not await self._dead_letter(message, webhook, reason, topology):
                    unsettled.add(id(message))
        for part in by_event(decoded):
            try:
                rows, changed = await self._commit(part, subscription)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                # A value fails every time: find its webhook by writing each alone.
                log.warning(
                    "batch failed (%s); writing its webhooks one by one", type(exc).__name__
                )
                for item in part:
                    if not await self._commit_alone(item, subscription):
                        unsettled.add(id(item.message))
            else:
                self._record(part, rows, changed, time.perf_counter() - started)
            started = time.perf_counter()
        # Every webhook in these messages is committed or dead-lettered: RabbitMQ may forget
        # them. One ack per message, not one multiple=True ack: that would also ack any delivery
        # a bug left out of the batch, and an ack is only a frame written, not a round trip.
        for message in readable:
            if id(message) in unsettled:
                await _requeue(message)
            else:
                await _ack(message)

    async def _commit_alone(self, item: Decoded, subscription: Subscription) -> bool:
        """Write one webhook, or dead-letter it when its data fails; False if that copy was
        not confirmed in time (its message must not be acked)."""
        started = time.perf_counter()
        try:
            rows, changed = await self._commit([item], subscription)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            sqlstate = getattr(exc, "sqlstate", None) or ""
            reason = f"write failed: {type(exc).__name__} {sqlstate}".strip()
            return await self._dead_letter(
                item.message, item.webhook, reason, subscription.topology
            )
        self._record([item], rows, changed, time.perf_counter() - started)
        return True

    async def _commit(
        self, decoded: list[Decoded], subscription: Subscription
    ) -> tuple[list[Row], dict[int, int]]:
        """Fold and write the batch; (the folded rows, how many changed the table, by rank).

        Every failure but a data error is retried with backoff: a Postgres restart, a deadlock,
        but also a dropped table or a revoked permission, which an operator can fix while the
        messages wait. Past HOLD_LIMIT it raises Stalled: the messages wait in the queue, not
        in this worker (see _hand_back). Only a data error (a value this batch holds) is raised
        as it is, for _process to find and dead-letter the message that holds it.
        """
        rows = fold([row for item in decoded for row in item.rows])
        rejected = [r for item in decoded for r in item.rejected]
        assert self.pool is not None
        delay = 0.1
        while True:
            try:
                return rows, await write_batch(self.pool, rows, rejected)
            except Exception as exc:
                if is_data_error(exc):
                    raise
                self.metrics.retries.inc()
                log.log(
                    logging.WARNING if is_transient(exc) else logging.ERROR,
                    "batch write failed, retrying",
                    extra={
                        "error": type(exc).__name__,
                        "sqlstate": getattr(exc, "sqlstate", None),
                        "retry_in": delay,
                    },
                )
            if subscription.channel.is_closed:
                # RabbitMQ will deliver these again (to us after reconnecting, or to another
                # worker); retrying here would only write them twice.
                raise ConnectionLost
            if self._stopping.is_set():
                if time.monotonic() + delay > self._stop_deadline:
                    raise Abandoned
            elif subscription.held_for() + delay > HOLD_LIMIT:
                raise Stalled
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.retry_max_backoff)

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        webhook: Webhook | None,
        reason: str,
        topology: Topology,
    ) -> bool:
        """Park what can never be applied in the dead-letter queue, with the reason and when.

        The message as it came; for a webhook of a bundle, that webhook in a message of its own.
        The copy is confirmed before the caller acks the original: a crash in between leaves a
        duplicate in the dead-letter queue, never a loss (mandatory: never an unrouted copy).
        False when the copy was not confirmed in time: the caller must not ack the original.
        """
        if webhook is None or message.content_type != BUNDLE:
            headers = {
                **(message.headers or {}),
                schema.H_ERROR: reason[:1000],
                "x-original-routing-key": message.routing_key or "",
            }
            copy = aio_pika.Message(
                message.body,
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                timestamp=message.timestamp,
            )
        else:
            original = ROUTING_KEYS.get(webhook.event, message.routing_key or "")
            copy = alone(webhook, **{schema.H_ERROR: reason[:1000]})
            copy.headers["x-original-routing-key"] = original
        # Its retention counts from now, not from when the webhook was received.
        copy.headers[H_DEAD_LETTERED_AT] = int(time.time() * 1000)
        try:
            await self._publish(topology.dead_exchange, copy, "", "a dead letter's copy")
        except PublishTimedOut:
            return False
        self.metrics.dead_letters.inc()
        log.error(
            "message dead-lettered",
            extra={
                "reason": reason[:200],
                "shop": (copy.headers or {}).get(schema.H_PROJECT),
                "request_id": (copy.headers or {}).get(schema.H_REQUEST_ID),
            },
        )
        return True

    def _record(
        self, decoded: list[Decoded], rows: list[Row], changed: dict[int, int], took: float
    ) -> None:
        metrics = self.metrics
        # Rows count under the event of their newest record in the batch (store.write_batch
        # counts the changed ones so); the rest were stale.
        written = Tally(r.version_rank for r in rows)
        for rank, event in enumerate(schema.EVENTS):
            metrics.rows.labels(event, "changed").inc(changed.get(rank, 0))
            metrics.rows.labels(event, "stale").inc(max(0, written[rank] - changed.get(rank, 0)))
        accepted: Tally[str] = Tally()
        refused: Tally[str] = Tally()
        for item in decoded:
            accepted[item.webhook.event] += len(item.rows)
            refused[item.webhook.event] += len(item.rejected)
        for event in schema.EVENTS:
            metrics.records.labels(event, "accepted").inc(accepted[event])
            metrics.records.labels(event, "rejected").inc(refused[event])
        rejected = refused.total()
        records = accepted.total() + rejected
        metrics.batch_messages.observe(len(decoded))
        metrics.batch_seconds.observe(took)
        lag = time.time() - min(item.received_at for item in decoded)
        metrics.lag_seconds.observe(lag)
        log.info(
            "batch committed",
            extra={
                "webhooks": len(decoded),
                "messages": len({id(item.message) for item in decoded}),
                "records": records,
                "rows": len(rows),
                "changed": sum(changed.values()),
                "rejected": rejected,
                "shops": sorted({item.project for item in decoded})[:10],
                "request_ids": [item.webhook.request_id for item in decoded][:20],
                "took_ms": round(took * 1000, 1),
                "lag_ms": round(lag * 1000, 1),
            },
        )


async def apply_retention(
    settings: Settings, db: asyncpg.Pool | asyncpg.Connection
) -> tuple[int, int]:
    """Purge rejected records and dead letters older than their retention; (rows, letters).

    A dead letter's age counts from when it was dead-lettered: one that failed today keeps its
    full retention for the operator to look at, however long ago its webhook was received.
    """
    now = datetime.now(UTC)
    rows = await purge_rejected(db, settings.rejected_retention_days)
    cutoff = now - timedelta(days=settings.dead_letter_retention_days)
    letters = 0
    async with open_dead_letters(settings) as dlq:
        for letter in await dlq.scan(RETENTION_SCAN_LIMIT):
            died = dead_lettered_at(letter)
            if died is not None and died < cutoff:
                await dlq.drop(letter)
                letters += 1
    if rows or letters:
        log.info("retention applied", extra={"rejected_records": rows, "dead_letters": letters})
    return rows, letters


def requeued(message: AbstractIncomingMessage) -> aio_pika.Message:
    """A delivery as a new message for the same queue: the same body, headers and identity."""
    headers = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        timestamp=message.timestamp,
    )


def _record_count(message: AbstractIncomingMessage) -> int:
    count = (message.headers or {}).get(schema.H_RECORDS)
    return count if isinstance(count, int) and count > 0 else 1


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack()
    except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
        # Committed but not acked: RabbitMQ redelivers, and the fold makes that a no-op.
        raise ConnectionLost from exc


async def _requeue(message: AbstractIncomingMessage) -> None:
    """Return a delivery to the queue, to come again (it counts toward the delivery limit)."""
    try:
        await message.nack(requeue=True)
    except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
        raise ConnectionLost from exc
