"""The pipeline a batch of messages goes through: unpack → decode → fold → write.

It commits what can be applied, dead-letters what never can, and tells the consumer, message by
message, when it may ack (worker/service.py acks). It never acks anything itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import asyncpg
import msgspec
from aio_pika.abc import AbstractIncomingMessage

from common import schema
from common.backoff import backoff
from common.message import Webhook, unpack
from common.topology import Topology
from worker.deadletter import dead_letter
from worker.fold import Row, decode_payload, fold, micros_from_unix_ms
from worker.metrics import WorkerMetrics
from worker.store import RejectedFrom, is_data_error, is_transient, write_batch

log = logging.getLogger(__name__)

# A part of a batch this large has a fast path of its own (see by_event).
SPLIT_FROM_RECORDS = 1000


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
    at = micros_from_unix_ms(webhook.received_at)
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


def by_event(decoded: list[Decoded]) -> list[list[Decoded]]:
    """The batch in one transaction, or in one per event when every event's part is large.

    A batch of one event has the fast paths (new customers COPY'd into the table, updates
    merged), while one mixing events is upserted, which costs Postgres more per row. So a
    burst's batch that caught the last creates and the first updates is written as two
    transactions, in the order of their first webhooks; small mixed batches (everyday bundles)
    stay one. Which transaction comes first does not matter: event time decides in the SQL.
    """
    parts: dict[str, list[Decoded]] = {}
    for item in decoded:
        parts.setdefault(item.webhook.event, []).append(item)
    if len(parts) > 1 and all(
        sum(len(item.rows) for item in part) >= SPLIT_FROM_RECORDS for part in parts.values()
    ):
        return list(parts.values())
    return [decoded] if decoded else []


@dataclass(frozen=True, slots=True)
class Committed:
    """A transaction of the batch, committed."""

    decoded: list[Decoded]
    rows: list[Row]  # folded
    changed: dict[int, int]  # the rows that changed the table, by the rank of their newest event
    took: float  # seconds, from decoding to COMMIT


@dataclass(frozen=True, slots=True)
class Verdict:
    """A message the pipeline is through with, and whether RabbitMQ may forget it."""

    message: AbstractIncomingMessage
    # Every webhook in it committed or dead-lettered; False when a dead letter's copy was not
    # confirmed in time: the message must come again.
    done: bool


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Unpack, decode, fold and write batches, for one broker session of the consumer."""

    pool: asyncpg.Pool
    topology: Topology  # where dead letters go
    metrics: WorkerMetrics
    retry_max_backoff: float
    # Called with each wait between retries of a write before it is taken: raises when the
    # consumer cannot wait that long (its connection is gone, or it must let go of the batch).
    may_wait: Callable[[float], None]

    async def apply(
        self, batch: list[AbstractIncomingMessage]
    ) -> AsyncGenerator[Committed | Verdict, None]:
        """Yield each transaction as it commits and each message's verdict as soon as it is known.

        The consumer counts and logs the one, acks or returns the other. An unreadable message
        is judged at once, before the writes that may stall: held on, it would be handed back
        and dead-lettered a second time.
        """
        started = time.perf_counter()
        decoded: list[Decoded] = []
        readable: list[AbstractIncomingMessage] = []
        # Messages whose dead-letter copy was not confirmed in time: not done, but returned,
        # so that they come again rather than wait for the consumer timeout.
        unsettled: set[int] = set()
        for message in batch:
            try:
                webhooks = unpack(message)
            except Exception as exc:  # noqa: BLE001 - whatever it is, this message is unreadable
                reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
                reason = f"unreadable message: {reason}"
                parked = await dead_letter(self.topology, self.metrics, message, None, reason)
                yield Verdict(message, done=parked)
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
                if not await dead_letter(self.topology, self.metrics, message, webhook, reason):
                    unsettled.add(id(message))
        for part in by_event(decoded):
            try:
                rows, changed = await self._commit(part)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                # A value fails every time: find its webhook by writing each alone.
                log.warning(
                    "batch failed (%s); writing its webhooks one by one", type(exc).__name__
                )
                for item in part:
                    started = time.perf_counter()
                    try:
                        rows, changed = await self._commit([item])
                    except Exception as error:
                        if not is_data_error(error):
                            raise
                        sqlstate = getattr(error, "sqlstate", None) or ""
                        reason = f"write failed: {type(error).__name__} {sqlstate}".strip()
                        parked = await dead_letter(
                            self.topology, self.metrics, item.message, item.webhook, reason
                        )
                        if not parked:
                            unsettled.add(id(item.message))
                    else:
                        yield Committed([item], rows, changed, time.perf_counter() - started)
            else:
                yield Committed(part, rows, changed, time.perf_counter() - started)
            started = time.perf_counter()
        for message in readable:
            yield Verdict(message, done=id(message) not in unsettled)

    async def _commit(self, decoded: list[Decoded]) -> tuple[list[Row], dict[int, int]]:
        """Fold and write the batch; (the folded rows, how many changed the table, by rank).

        Every failure but a data error is retried with backoff: a Postgres restart, a deadlock,
        but also a dropped table or a revoked permission, which an operator can fix while the
        messages wait, for as long as may_wait lets it. Only a data error (a value this batch
        holds) is raised as it is, for apply to find and dead-letter the message that holds it.
        """
        rows = fold([row for item in decoded for row in item.rows])
        rejected = [r for item in decoded for r in item.rejected]
        delays = backoff(0.1, self.retry_max_backoff)
        while True:
            try:
                return rows, await write_batch(self.pool, rows, rejected)
            except Exception as exc:
                if is_data_error(exc):
                    raise
                delay = next(delays)
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
            self.may_wait(delay)
            await asyncio.sleep(delay)
