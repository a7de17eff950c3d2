"""Prometheus metrics: each service builds its own registry (tests build several side by side)."""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

# prometheus_client's own switch: set (by `python -m receiver` for its processes) when several
# processes serve one port, each writing its metrics to files there.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# Latency buckets around what matters here: the sender's 1 s timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5)


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """The registry in Prometheus' text format; of all processes sharing the port, when several.

    A scrape reaches any one of the processes, so each answers with the sum over all of them.
    """
    directory = os.environ.get(MULTIPROCESS_DIR)
    if directory:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


REGISTRY = web.AppKey("registry", CollectorRegistry)


async def _metrics(request: web.Request) -> web.Response:
    return metrics_response(request.app[REGISTRY])


def create_metrics_app(registry: CollectorRegistry) -> web.Application:
    """An application serving only GET /metrics: for a port of its own, out of public reach."""
    app = web.Application()
    app[REGISTRY] = registry
    app.router.add_get("/metrics", _metrics)
    return app
