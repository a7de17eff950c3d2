"""`python -m receiver`: read settings, configure logging, serve until SIGTERM/SIGINT.

With RECEIVER_PROCESSES above 1 this process only supervises: it starts that many receivers on
the same port (SO_REUSEPORT: the kernel spreads connections over them), passes signals on, and
when one of them dies, stops the others and exits non-zero for the orchestrator to restart.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from types import FrameType

from aiohttp import web

from common.logs import configure_logging
from common.metrics import MULTIPROCESS_DIR
from common.runtime import keep_freed_memory, new_event_loop
from common.settings import Settings, SettingsError, load_settings, require_token
from receiver.app import create_app

log = logging.getLogger("receiver")

# Set by the supervisor for the receivers it starts.
SUPERVISED = "UPGATES_RECEIVER_SUPERVISED"


def main() -> None:
    """Run the receiver (or several, supervised)."""
    try:
        settings = load_settings()
        require_token(settings)
    except SettingsError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    if settings.receiver_processes > 1 and SUPERVISED not in os.environ:
        raise SystemExit(supervise(settings))
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


def supervise(settings: Settings) -> int:
    """Run RECEIVER_PROCESSES receivers until a signal stops them; the exit status."""
    # Each receiver writes its metrics to files here; any of them answers /metrics with the sum.
    metrics_dir = tempfile.mkdtemp(prefix="upgates-receiver-metrics-")
    env = {**os.environ, SUPERVISED: "1", MULTIPROCESS_DIR: metrics_dir}
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def pass_on(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Before the first child: a signal must never leave receivers running without us.
    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    try:
        for _ in range(settings.receiver_processes):
            children.append(subprocess.Popen([sys.executable, "-m", "receiver"], env=env))
        if stopping:  # a signal came while they were starting
            pass_on(signal.SIGTERM, None)
        log.info("receiver processes started", extra={"processes": len(children)})
        pid, status = os.wait()  # the first to exit; a signal interrupts, then it waits on
        first = os.waitstatus_to_exitcode(status)
        if not stopping:
            log.error("a receiver process exited; stopping the others", extra={"code": first})
            pass_on(signal.SIGTERM, None)
        codes = [first if child.pid == pid else child.wait() for child in children]
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if stopping and not any(codes) else 1


if __name__ == "__main__":
    main()
