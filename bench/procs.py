"""Start, watch and stop the processes under test: receivers, workers, the naive receiver.

They are started and stopped by the tests' spawner (tests/support/processes.py); what is measured
of them (CPU seconds, peak memory, the servers' share) is the benchmark's own, here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support import processes

ROOT = processes.ROOT  # the checkout: the processes run from it
free_port = processes.free_port  # the ports bench.run gives the processes
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its descendants (those still running)."""
    return sum(cpu_seconds(member) for member in processes.family(pid))


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _start_time(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def server_cpu(database: str) -> dict[str, dict[int, float]]:
    """CPU seconds so far of the RabbitMQ server and of the Postgres processes serving us.

    Others may use the same servers: for Postgres only the backends of our database and the
    shared writers (WAL writer, checkpointer, background writer) count; for RabbitMQ the oldest
    Erlang VM (rabbitmqctl calls are short-lived Erlang VMs too).
    """
    postgres: dict[int, float] = {}
    beams: list[tuple[int, int]] = []
    shared = ("walwriter", "checkpointer", "background writer", "wal writer")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            comm = (entry / "comm").read_text().strip()
            if comm == "postgres":
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if f" {database} " in cmdline or any(name in cmdline for name in shared):
                    postgres[pid] = cpu_seconds(pid)
            elif comm == "beam.smp":
                beams.append((_start_time(pid), pid))
        except OSError:
            continue
    rabbitmq = {}
    if beams:
        pid = min(beams)[1]
        rabbitmq[pid] = cpu_seconds(pid)
    return {"postgres": postgres, "rabbitmq": rabbitmq}


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two readings (processes started in between count from zero)."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


@dataclass
class Service:
    """One started process, with where it answers /readyz."""

    role: str
    proc: subprocess.Popen[bytes]
    health_port: int
    listeners: int = 1  # processes that must listen on health_port (a supervisor's receivers)
    cpu_start: float = 0.0

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.proc.pid


@dataclass
class Fleet:
    """The processes of one scenario."""

    env: dict[str, str]
    log_dir: Path
    services: list[Service] = field(default_factory=list)

    def start(
        self,
        role: str,
        module: str,
        health_port: int,
        nice: int = 0,
        listeners: int = 1,
        **extra: str,
    ) -> Service:
        """Start `python -m module` with the fleet's environment plus `extra`; `listeners` of its
        processes will listen on health_port."""
        index = sum(1 for s in self.services if s.role == role)
        log = self.log_dir / f"{role}-{index}.log"
        proc = processes.spawn(module, env={**self.env, **extra}, log=log, nice=nice)
        service = Service(role, proc, health_port, listeners)
        self.services.append(service)
        return service

    def of(self, role: str) -> list[Service]:
        """The services of one role."""
        return [s for s in self.services if s.role == role]

    async def wait_ready(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - a deadline
        """Until every service listens and answers /readyz with 200; fail if one exits.

        Receivers share one port (SO_REUSEPORT): the kernel spreads new connections over them,
        so every one of them must listen before the load opens its connections (which then stay
        with the process they reached), and the port must answer 200 many times in a row.
        """
        deadline = time.monotonic() + timeout

        def check_alive() -> None:
            for service in self.services:
                if service.proc.poll() is not None:
                    index = self.of(service.role).index(service)
                    log = (self.log_dir / f"{service.role}-{index}.log").read_text(errors="replace")
                    tail = "\n".join(log.splitlines()[-15:])
                    raise RuntimeError(
                        f"{service.role} exited with {service.proc.returncode}:\n{tail}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready in {timeout} s; see {self.log_dir}")

        for service in self.services:
            while (
                sum(
                    processes.listening(pid, service.health_port)
                    for pid in processes.family(service.pid)
                )
                < service.listeners
            ):
                check_alive()
                await asyncio.sleep(0.05)
        ports: dict[int, int] = {}
        for service in self.services:
            ports[service.health_port] = ports.get(service.health_port, 0) + service.listeners
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for port, sharing in ports.items():
                needed = 1 if sharing == 1 else 10 * sharing
                in_a_row = 0
                while in_a_row < needed:
                    check_alive()
                    ok = False
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                            ok = response.status == 200
                    in_a_row = in_a_row + 1 if ok else 0
                    if not ok:
                        await asyncio.sleep(0.05)
        for service in self.services:
            service.cpu_start = tree_cpu_seconds(service.pid)

    def cpu(self, role: str) -> float:
        """CPU seconds the services of a role (and their processes) used since they were ready."""
        return sum(tree_cpu_seconds(s.pid) - s.cpu_start for s in self.of(role))

    def peak_rss(self, role: str) -> float:
        """The largest VmHWM among the services of a role, in MiB."""
        return max((peak_rss_mb(s.pid) for s in self.of(role)), default=0.0)

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM everything (workers finish their batch), then SIGKILL what is left."""
        await processes.stop(*(service.proc for service in self.services), grace=grace)
        self.services.clear()


async def worker_records(http: aiohttp.ClientSession, ports: list[int]) -> int | None:
    """Records the workers have committed so far, from their /metrics; None if not exposed.

    A worker counts a batch's records after its COMMIT, so this never runs ahead of the table.
    """
    total = 0.0
    found = False
    for port in ports:
        try:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
        except (aiohttp.ClientError, OSError):
            return None
        for line in text.splitlines():
            if line.startswith("upgates_worker_records_total{"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return int(total) if found else None


async def receiver_means(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """Mean seconds the receiver spent per request and waiting for the broker's confirms.

    From its Prometheus histograms (the sum over its processes when RECEIVER_PROCESSES > 1).
    """
    try:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    except (aiohttp.ClientError, OSError):
        return {}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("upgates_receiver_request_seconds", "upgates_receiver_publish_seconds"):
            if line.startswith((f"{name}_sum", f"{name}_count")):
                key = line.split("{", 1)[0].split(" ", 1)[0]
                sums[key] = sums.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    means = {}
    for name, label in (
        ("upgates_receiver_request_seconds", "request_ms"),
        ("upgates_receiver_publish_seconds", "publish_ms"),
    ):
        count = sums.get(f"{name}_count", 0.0)
        if count:
            means[label] = round(sums[f"{name}_sum"] / count * 1000, 1)
    return means
