"""`python -m worker`: read settings, configure logging, consume until SIGTERM/SIGINT.

With WORKER_PROCESSES above 1 this process only supervises (common/supervisor.py): it starts
that many workers sharing one health port, passes signals on, and stops them all together.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from common.logs import configure_logging
from common.runtime import keep_freed_memory, new_event_loop
from common.settings import Settings, SettingsError, load_settings
from common.supervisor import die_with, supervise, supervised_by
from worker.health import start_health
from worker.service import Worker

log = logging.getLogger("worker")


async def serve(settings: Settings, *, shared_port: bool = False) -> None:
    """Run one worker (and its health endpoint) until a signal asks it to stop."""
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    runner = await start_health(worker, settings, shared=shared_port)
    try:
        await worker.run()
    finally:
        if runner is not None:
            await runner.cleanup()
    log.info("worker stopped")


def main() -> None:
    """Run a worker (or several, supervised)."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    supervisor = supervised_by("worker")
    if supervisor is None and settings.worker_processes > 1:
        raise SystemExit(supervise("worker", settings.worker_processes))
    if supervisor is not None:
        die_with(supervisor)
    keep_freed_memory()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(settings, shared_port=supervisor is not None))


if __name__ == "__main__":
    main()
