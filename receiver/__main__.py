"""`python -m receiver`: read settings, configure logging, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from common.logs import configure_logging
from common.runtime import keep_freed_memory, new_event_loop
from common.settings import SettingsError, load_settings, require_token
from receiver.app import create_app

log = logging.getLogger("receiver")


def main() -> None:
    """Run the receiver."""
    try:
        settings = load_settings()
        require_token(settings)
    except SettingsError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    keep_freed_memory()
    log.info(
        "receiver listening", extra={"host": settings.receiver_host, "port": settings.receiver_port}
    )
    # run_app turns SIGTERM/SIGINT into a graceful shutdown: the listener closes and in-flight
    # requests get up to shutdown_timeout to finish their publish and answer.
    web.run_app(
        create_app(settings),
        host=settings.receiver_host,
        port=settings.receiver_port,
        access_log=None,  # the access log would print ?token=...; we log one line per request
        print=None,
        shutdown_timeout=5,
        reuse_port=True,
        loop=new_event_loop(),
    )


if __name__ == "__main__":
    main()
