"""What a worker counts, served on its /metrics."""

from __future__ import annotations

from collections import Counter as Tally
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common import schema
from common.metrics import LATENCY_BUCKETS

if TYPE_CHECKING:
    from worker.pipeline import Committed


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

    def count_committed(self, committed: Committed, lag: float) -> None:
        """Count a committed transaction: its records, rows, size, time and lag."""
        # Rows count under the event of their newest record in the batch (store.write_batch
        # counts the changed ones so); the rest were stale.
        written = Tally(r.version_rank for r in committed.rows)
        changed = committed.changed
        for rank, event in enumerate(schema.EVENTS):
            self.rows.labels(event, "changed").inc(changed.get(rank, 0))
            self.rows.labels(event, "stale").inc(max(0, written[rank] - changed.get(rank, 0)))
        accepted: Tally[str] = Tally()
        rejected: Tally[str] = Tally()
        for item in committed.decoded:
            accepted[item.webhook.event] += len(item.rows)
            rejected[item.webhook.event] += len(item.rejected)
        for event in schema.EVENTS:
            self.records.labels(event, "accepted").inc(accepted[event])
            self.records.labels(event, "rejected").inc(rejected[event])
        self.batch_messages.observe(len(committed.decoded))
        self.batch_seconds.observe(committed.took)
        self.lag_seconds.observe(lag)
