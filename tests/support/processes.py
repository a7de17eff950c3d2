"""The project's processes, as the tests, the soak and the benchmark start, watch and stop them.

- ``spawn``: the one way to start ``python -m receiver|worker|admin|...`` (or a script of the
  checkout) in a given environment, its output in a log file; ``stop`` (SIGTERM, then SIGKILL),
  ``kill`` and ``exit_code`` end it and wait for it.
- ``children_of``, ``family``, ``alive`` and ``listening`` read a process's state from /proc;
  ``http_status`` asks one of its endpoints.
- ``Procs``/``Proc``: receivers and workers configured from a Settings object, waited on until
  ready; ``assert_serving`` checks that they still are.
- ``free_port``/``free_port_run``: ports to give them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from common import settings as settings_module
from common.settings import Settings
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the processes run from here

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on right now, and not handed out before in this process."""
    # A port given to a process that has not bound it yet is free to the kernel, not to us.
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def free_port_run(count: int, avoid: int) -> int:
    """The first of `count` consecutive free TCP ports, none of them `avoid`.

    The next port up from a free one may be taken (say, by another test's process): bind all of
    them at once to be sure, as a process numbering its workers' ports from one needs.
    """
    for _ in range(100):
        first = free_port()
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("127.0.0.1", first + offset))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        if avoid not in range(first, first + count):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


# --- the environment of a spawned service ---------------------------------------------------


def _inherited() -> dict[str, str]:
    # pytest's and coverage's variables would tell the child it runs under them.
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes `python -m receiver`/`worker` use these settings (the ones a
    test changes; the rest stay the services' defaults)."""
    env = _inherited()
    env.update(
        AMQP_URL=settings.amqp_url,
        DATABASE_URL=settings.database_url,
        WEBHOOK_TOKEN=",".join(settings.webhook_tokens),
        RECEIVER_HOST=settings.receiver_host,
        RECEIVER_PORT=str(settings.receiver_port),
        WORKER_HOST=settings.worker_host,
        WORKER_PORT=str(settings.worker_port),
        BATCH_MAX_WAIT=str(settings.batch_max_wait),
        RETRY_MAX_BACKOFF=str(settings.retry_max_backoff),
        RECEIVER_METRICS_PORT=str(settings.receiver_metrics_port),
        LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def env_from(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives `python -m receiver`/`worker` exactly these settings."""
    env = _inherited()
    for name, attribute in settings_module._ENV.items():
        value = getattr(settings, attribute)
        if isinstance(value, bool):
            env[name] = "true" if value else "false"
        elif isinstance(value, tuple):  # of strings, or of (shop, value) pairs
            env[name] = ",".join(v if isinstance(v, str) else "=".join(v) for v in value)
        else:
            env[name] = str(value)
    env["LOG_FORMAT"] = "json"
    env.update(extra)
    return env


# --- starting and ending a process ----------------------------------------------------------


def spawn(
    target: str,
    *args: str,
    env: Mapping[str, str],
    log: Path,
    nice: int = 0,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `python -m TARGET ARGS...` (`python TARGET ARGS...` when TARGET is a .py script)
    from the checkout, with exactly `env`; its output and errors appended to `log`.

    `nice` lowers its priority; `new_session` keeps a Ctrl-C at the terminal from reaching it.
    """
    command = [sys.executable, target] if target.endswith(".py") else [sys.executable, "-m", target]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    with log.open("ab") as out:  # appended: a process started again keeps its earlier lines
        return subprocess.Popen(
            [*command, *args],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=new_session,
        )


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process if it still runs, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


async def stop(*procs: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM every process (a service finishes what it holds, then exits), and SIGKILL those
    still running `grace` seconds later; all of them reaped."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            await asyncio.to_thread(proc.wait, max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


async def exit_code(proc: subprocess.Popen[bytes], within: float) -> int | None:
    """The process's exit code once it has exited; None if it still runs after `within` s."""
    deadline = time.monotonic() + within
    # Polling: a child's exit is no event to wait on without a thread or a SIGCHLD watcher.
    while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return proc.poll()


# --- what /proc and the endpoints tell about a process --------------------------------------


def children_of(pid: int) -> list[int]:
    """The process's children (of any of its threads); none once it is gone."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def family(pid: int) -> list[int]:
    """The process and its descendants (a supervisor, its receivers or workers)."""
    found = [pid]
    for member in found:
        found.extend(children_of(member))
    return found


def alive(pid: int) -> bool:
    """Whether the process exists and is no zombie (exited, not reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return "zombie" not in state


def listening(pid: int, port: int) -> bool:
    """Whether the process holds a socket listening on 127.0.0.1:port (several receivers may)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link[8:-1] in inodes for link in links if link.startswith("socket:["))


async def http_status(url: str, timeout: float = 1.0) -> int | None:  # noqa: ASYNC109
    """GET url; the status, or None when nothing answered in time."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as response,
        ):
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


# --- the services, configured from Settings -------------------------------------------------


@dataclass
class Proc:
    """A spawned service."""

    module: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int  # the receiver's HTTP port, or the worker's health port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:  # noqa: ASYNC109
        """Its exit code; TimeoutError if it still runs after `timeout` seconds."""
        code = await exit_code(self.popen, timeout)
        if code is None:
            raise TimeoutError(f"{self.module} still running after {timeout} s")
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Procs:
    """Spawns the services; every process is killed at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proc] = []

    def start(self, module: str, settings: Settings, **extra: str) -> Proc:
        port = settings.receiver_port if module == "receiver" else free_port()
        if module == "worker":
            extra.setdefault("WORKER_PORT", str(port))
            extra.setdefault("WORKER_HOST", "127.0.0.1")
        log = self.tmp_path / f"{module}-{len(self.started)}.log"
        proc = Proc(module, spawn(module, env=env_from(settings, **extra), log=log), log, port)
        self.started.append(proc)
        return proc

    async def ready(self, proc: Proc, timeout: float = 30) -> Proc:  # noqa: ASYNC109
        async def check() -> bool:
            if not proc.alive():
                raise AssertionError(f"{proc.module} exited:\n{proc.output()[-3000:]}")
            return await http_status(f"{proc.url}/readyz") == 200

        await wait_until(check, timeout=timeout, interval=0.1)
        return proc

    async def receiver(self, settings: Settings, **extra: str) -> Proc:
        return await self.ready(self.start("receiver", settings, **extra))

    async def worker(self, settings: Settings, **extra: str) -> Proc:
        return await self.ready(self.start("worker", settings, **extra))

    def logs(self) -> str:
        """Every process's log, for an assertion message."""
        return "\n".join(
            f"--- {p.module} pid {p.popen.pid} rc {p.popen.poll()}\n{p.output()[-4000:]}"
            for p in self.started
        )

    def kill_all(self) -> None:
        for proc in self.started:
            kill(proc.popen)


async def assert_serving(*services: Proc) -> None:
    """Every process is alive and ready."""
    for proc in services:
        assert proc.alive(), f"{proc.module} exited:\n{proc.output()[-3000:]}"
        assert await http_status(f"{proc.url}/readyz", timeout=3) == 200, (
            f"{proc.module} is not ready:\n{proc.output()[-3000:]}"
        )
