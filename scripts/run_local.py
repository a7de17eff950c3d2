#!/usr/bin/env python3
"""Run the receiver and N workers against local services, with prefixed logs; Ctrl-C stops all.

    python scripts/run_local.py --workers 2

Settings come from the environment like for each service (WEBHOOK_TOKEN is needed; AMQP_URL and
DATABASE_URL default to local servers). Worker i gets WORKER_PORT = --worker-port + i.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from typing import IO

COLORS = ("\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m")
RESET = "\033[0m"


def pump(name: str, color: str, stream: IO[bytes], lock: threading.Lock) -> None:
    """Copy a child's output line by line, each line prefixed with the child's name."""
    tty = sys.stdout.isatty()
    prefix = f"{color}{name:<9}|{RESET} " if tty else f"{name:<9}| "
    for raw in iter(stream.readline, b""):
        with lock:
            sys.stdout.write(prefix + raw.decode("utf-8", "replace"))
            sys.stdout.flush()


def main() -> int:
    """Start everything, wait for a signal or a child's exit, stop everything."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-port", type=int, default=8081, help="first worker's port")
    args = parser.parse_args()

    lock = threading.Lock()
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    plan = [("receiver", "receiver", {})] + [
        (f"worker-{i + 1}", "worker", {"WORKER_PORT": str(args.worker_port + i)})
        for i in range(args.workers)
    ]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for index, (name, module, extra) in enumerate(plan):
        env = {**os.environ, **extra}
        proc = subprocess.Popen(  # noqa: S603 - our own modules, with this interpreter
            [sys.executable, "-m", module],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
        )
        assert proc.stdout is not None
        threading.Thread(
            target=pump, args=(name, COLORS[index % len(COLORS)], proc.stdout, lock), daemon=True
        ).start()
        children.append((name, proc))

    while not stop.wait(0.2):
        if any(proc.poll() is not None for _, proc in children):
            break  # one died (say, no WEBHOOK_TOKEN): stop the rest
    for _, proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # graceful: workers commit their batch first
    status = 0
    for name, proc in children:
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0:
            print(f"{name} exited with {code}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
