"""What the receiver counts, served on its own /metrics port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from common.metrics import LATENCY_BUCKETS


class ReceiverMetrics:
    """What the receiver counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "upgates_receiver_requests",
            "Webhook requests answered, by event and HTTP status.",
            ["event", "status"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "upgates_receiver_publish_seconds",
            "Time from publish to the broker's confirm (or failure).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "upgates_receiver_request_seconds",
            "Time to answer a webhook, by event.",
            ["event"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.records = Counter(
            "upgates_receiver_records",
            "Customer records accepted (answered 200), by event.",
            ["event"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "upgates_receiver_received_bytes",
            "Body bytes of accepted webhooks.",
            registry=self.registry,
        )
