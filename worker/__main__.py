"""`python -m worker`: read settings, configure logging, consume until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from common.logs import configure_logging
from common.runtime import keep_freed_memory, new_event_loop
from common.settings import Settings, SettingsError, load_settings
from worker.health import create_health_app
from worker.service import Worker

log = logging.getLogger("worker")


async def serve(settings: Settings) -> None:
    """Run one worker (and its health endpoint) until a signal asks it to stop."""
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    runner: web.AppRunner | None = None
    if settings.worker_port:
        runner = web.AppRunner(create_health_app(worker), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.worker_host, settings.worker_port).start()
    try:
        await worker.run()
    finally:
        if runner is not None:
            await runner.cleanup()
    log.info("worker stopped")


def main() -> None:
    """Run a worker."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    keep_freed_memory()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(settings))


if __name__ == "__main__":
    main()
