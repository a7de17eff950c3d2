"""A worker's own small HTTP endpoint: /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from common.metrics import metrics_response
from worker.service import Worker

WORKER = web.AppKey("worker", Worker)


async def healthz(request: web.Request) -> web.Response:
    """Alive while the process runs."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while consuming from the queue and Postgres answers."""
    worker = request.app[WORKER]
    if not worker.consuming or worker.pool is None:
        return web.json_response({"status": "not ready", "reason": "not consuming"}, status=503)
    try:
        async with asyncio.timeout(1):
            await worker.pool.fetchval("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        reason = f"postgres: {type(exc).__name__}"
        return web.json_response({"status": "not ready", "reason": reason}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text."""
    return metrics_response(request.app[WORKER].metrics.registry)


def create_health_app(worker: Worker) -> web.Application:
    """The endpoint's application."""
    app = web.Application()
    app[WORKER] = worker
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
