"""Several processes of one service behind one port: start them, pass signals on, stop together.

With RECEIVER_PROCESSES or WORKER_PROCESSES above 1, `python -m receiver`/`worker` only
supervises: it starts that many copies of itself, each binding the shared port with SO_REUSEPORT
and writing its metrics to a common directory (prometheus_client's multiprocess mode), passes
SIGTERM/SIGINT on, and when one of them dies, stops the others and exits non-zero for the
orchestrator to restart the lot.
"""

from __future__ import annotations

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
from collections.abc import Callable, Mapping
from types import FrameType

from common.metrics import MULTIPROCESS_DIR

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _marker(module: str) -> str:
    """The variable through which a supervisor tells its processes its process id."""
    return f"UPGATES_{module.upper()}_SUPERVISED"


def supervised_by(module: str) -> int | None:
    """The supervisor's process id when this process was started by one, else None."""
    value = os.environ.get(_marker(module))
    return int(value) if value else None


def supervise(
    module: str,
    processes: int,
    env_for: Callable[[int], Mapping[str, str]] = lambda index: {},
) -> int:
    """Run `python -m module` `processes` times until a signal stops them; the exit status.

    `env_for(index)` gives variables of the index-th process's own (from 0), over the rest.
    """
    # Each process writes its metrics to files here; any of them answers /metrics with the sum.
    metrics_dir = tempfile.mkdtemp(prefix=f"upgates-{module}-metrics-")
    env = {**os.environ, _marker(module): str(os.getpid()), MULTIPROCESS_DIR: metrics_dir}
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def pass_on(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Before the first child: a signal must never leave processes running without us.
    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    try:
        for index in range(processes):
            # S603: `module` is one of our own packages, named by our entry point.
            command = [sys.executable, "-m", module]
            children.append(subprocess.Popen(command, env={**env, **env_for(index)}))  # noqa: S603
        if stopping:  # a signal came while they were starting
            pass_on(signal.SIGTERM, None)
        log.info("%s processes started", module, extra={"processes": len(children)})
        pid, status = os.wait()  # the first to exit; a signal interrupts, then it waits on
        first = os.waitstatus_to_exitcode(status)
        if not stopping:
            log.error("a %s process exited; stopping the others", module, extra={"code": first})
            pass_on(signal.SIGTERM, None)
        codes = [first if child.pid == pid else child.wait() for child in children]
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    # A process still starting when the signal came dies of it: that too is a clean stop.
    clean = {0, -signal.SIGTERM, -signal.SIGINT}
    return 0 if stopping and all(code in clean for code in codes) else 1


def die_with(supervisor: int) -> None:
    """Get SIGTERM when the supervisor dies, however it dies (Linux): none outlives it."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before that took effect
        raise SystemExit(1)
