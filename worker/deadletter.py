"""Dead-lettering what can never be applied, and splitting a redelivered bundle into its webhooks.

Every copy published here is confirmed before the caller acks the original: a crash in between
leaves a duplicate (in the dead-letter queue, or in the queue for the fold to ignore), never a
loss.
"""

from __future__ import annotations

import logging
import time

from aio_pika.abc import AbstractIncomingMessage

from common import schema
from common.deadletters import H_DEAD_LETTERED_AT
from common.message import BUNDLE, Webhook, alone, copy_of
from common.topology import ROUTING_KEYS, Topology
from worker.metrics import WorkerMetrics
from worker.publishing import PublishTimedOut, publish

log = logging.getLogger(__name__)


async def dead_letter(
    topology: Topology,
    metrics: WorkerMetrics,
    message: AbstractIncomingMessage,
    webhook: Webhook | None,
    reason: str,
) -> bool:
    """Park what can never be applied in the dead-letter queue, with the reason and when.

    The message as it came; for a webhook of a bundle, that webhook in a message of its own
    (mandatory: never an unrouted copy). False when the copy was not confirmed in time: the
    caller must not ack the original.
    """
    if webhook is None or message.content_type != BUNDLE:
        headers = {
            **(message.headers or {}),
            schema.H_ERROR: reason[:1000],
            "x-original-routing-key": message.routing_key or "",
        }
        copy = copy_of(message, headers)
    else:
        original = ROUTING_KEYS.get(webhook.event, message.routing_key or "")
        copy = alone(webhook, **{schema.H_ERROR: reason[:1000]})
        copy.headers["x-original-routing-key"] = original
    # Its retention counts from now, not from when the webhook was received.
    copy.headers[H_DEAD_LETTERED_AT] = int(time.time() * 1000)
    try:
        await publish(topology.dead_exchange, copy, "", "a dead letter's copy")
    except PublishTimedOut:
        return False
    metrics.dead_letters.inc()
    log.error(
        "message dead-lettered",
        extra={
            "reason": reason[:200],
            "shop": (copy.headers or {}).get(schema.H_PROJECT),
            "request_id": (copy.headers or {}).get(schema.H_REQUEST_ID),
        },
    )
    return True


async def split(
    topology: Topology,
    metrics: WorkerMetrics,
    message: AbstractIncomingMessage,
    webhooks: list[Webhook],
) -> None:
    """Put a bundle's webhooks back in the queue one per message (unknown events dead-lettered).

    Whichever of them crashed a worker then meets the delivery limit alone, and the others are
    applied. Raises PublishTimedOut when a copy was not confirmed in time, and aiormq's
    DeliveryError when the queue refused one (it is full).
    """
    for webhook in webhooks:
        if webhook.event in ROUTING_KEYS:
            routing_key = ROUTING_KEYS[webhook.event]
            await publish(topology.exchange, alone(webhook), routing_key, "a split webhook")
        elif not await dead_letter(
            topology, metrics, message, webhook, f"unknown event {webhook.event!r}"
        ):
            raise PublishTimedOut
