"""A worker's own small HTTP endpoint: /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import errno
import logging

from aiohttp import web

from common.metrics import metrics_response
from common.settings import Settings
from worker.service import Worker

log = logging.getLogger(__name__)

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


async def start_health(worker: Worker, settings: Settings, *, shared: bool) -> web.AppRunner | None:
    """Serve the health endpoint; None when it is off, or its port is taken.

    A busy port is no reason to stop consuming: on a host running several workers, the first
    serves the port and the others only work. Processes of one supervisor share it instead
    (SO_REUSEPORT), each answering /metrics with the sum over all of them.
    """
    if not settings.worker_port:
        return None
    runner = web.AppRunner(create_health_app(worker), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.worker_host, settings.worker_port, reuse_port=shared)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning(
            "health port in use: %s:%d; serving no health endpoint",
            settings.worker_host,
            settings.worker_port,
        )
        return None
    return runner
