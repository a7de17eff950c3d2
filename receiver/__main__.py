"""`python -m receiver`: read settings, configure logging, serve until SIGTERM/SIGINT.

With RECEIVER_PROCESSES above 1 this process only supervises: it starts that many receivers on
the same port (SO_REUSEPORT: the kernel spreads connections over them), passes signals on, and
when one of them dies, stops the others and exits non-zero for the orchestrator to restart. The
first of them serves /metrics, for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from types import FrameType

from common.logs import configure_logging
from common.metrics import MULTIPROCESS_DIR
from common.runtime import keep_freed_memory, new_event_loop, warm_heap
from common.settings import Settings, SettingsError, load_settings, require_token
from receiver.server import running

log = logging.getLogger("receiver")

# Set by the supervisor for the receivers it starts: its process id.
SUPERVISED = "UPGATES_RECEIVER_SUPERVISED"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
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


def main() -> None:
    """Run the receiver (or several, supervised)."""
    try:
        settings = load_settings()
        require_token(settings)
    except SettingsError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    supervisor = os.environ.get(SUPERVISED)
    if supervisor is None and settings.receiver_processes > 1:
        raise SystemExit(supervise(settings))
    if supervisor is not None:
        die_with(int(supervisor))
    keep_freed_memory()
    warm_heap()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(settings))


def supervise(settings: Settings) -> int:
    """Run RECEIVER_PROCESSES receivers until a signal stops them; the exit status."""
    # Each receiver writes its metrics to files here; the first answers /metrics with the sum
    # (the others would only contend for its port).
    metrics_dir = tempfile.mkdtemp(prefix="upgates-receiver-metrics-")
    env = {**os.environ, SUPERVISED: str(os.getpid()), MULTIPROCESS_DIR: metrics_dir}
    without_metrics = {**env, METRICS_PORT_VARIABLE: "0"}
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
        for number in range(settings.receiver_processes):
            child_env = env if number == 0 else without_metrics
            children.append(subprocess.Popen([sys.executable, "-m", "receiver"], env=child_env))
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
    # A receiver still starting when the signal came dies of it: that too is a clean stop.
    clean = {0, -signal.SIGTERM, -signal.SIGINT}
    return 0 if stopping and all(code in clean for code in codes) else 1


def die_with(supervisor: int) -> None:
    """Get SIGTERM when the supervisor dies, however it dies (Linux): no receiver outlives it."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before that took effect
        raise SystemExit(1)


if __name__ == "__main__":
    main()
