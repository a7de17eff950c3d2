"""`python -m receiver`: read settings, configure logging, serve until SIGTERM/SIGINT.

With RECEIVER_PROCESSES above 1 this process only supervises (common/supervisor.py): it starts
that many receivers on the same port (SO_REUSEPORT: the kernel spreads connections over them),
passes signals on, and stops them all together. The first of them serves /metrics, for all of
them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from common.logs import configure_logging
from common.runtime import keep_freed_memory, new_event_loop, warm_heap
from common.settings import Settings, SettingsError, load_settings, require_token
from common.supervisor import die_with, supervise, supervised_by
from receiver.server import running

log = logging.getLogger("receiver")

METRICS_PORT_VARIABLE = "RECEIVER_METRICS_PORT"


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; then stop listening and answer what was accepted."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings):
        log.info(
            "receiver listening",
            extra={
                "host": settings.receiver_host,
                "port": settings.receiver_port,
                "metrics_port": settings.receiver_metrics_port or None,
            },
        )
        await stop.wait()


def metrics_on_the_first(index: int) -> dict[str, str]:
    """Only the first receiver serves /metrics: the others would only contend for its port."""
    return {} if index == 0 else {METRICS_PORT_VARIABLE: "0"}


def main() -> None:
    """Run the receiver (or several, supervised)."""
    try:
        settings = load_settings()
        require_token(settings)
    except SettingsError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    supervisor = supervised_by("receiver")
    if supervisor is None and settings.receiver_processes > 1:
        raise SystemExit(
            supervise("receiver", settings.receiver_processes, env_for=metrics_on_the_first)
        )
    if supervisor is not None:
        die_with(supervisor)
    keep_freed_memory()
    warm_heap()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(settings))


if __name__ == "__main__":
    main()
