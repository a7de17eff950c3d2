"""Soak: the whole pipeline under a steady Upgates-like load while faults are injected in a loop.

    python -m scripts.soak                       # 5 minutes, 3 workers, every fault
    python -m scripts.soak --minutes 30 --workers 4 --faults kill,pg-restart,broker-blackhole
    python -m scripts.soak --quick               # ~30 s, three faults (test_soak_smoke.py)

Run it from the checkout, in the project's virtual environment (`pip install -e '.[test]'`): it
uses the tests' support package (tests/support: the private servers, the proxy, the spawner, the
load's records, the oracle of the fold). It starts a PRIVATE RabbitMQ node and a PRIVATE Postgres
cluster (temporary directories, free ports on 127.0.0.1; the shared local servers are never
touched), a receiver and N workers as processes (`python -m receiver` / `python -m worker`), and
TCP proxies between the services and the servers.

A sender behaves like Upgates: creates, updates and deletes of a bounded set of customers in a few
shops, 1..N records per payload, several payloads at once, every payload retried until it is
answered 200 (Upgates waits 1 s and retries anything else). The oracle is the fold, by event time,
of every record answered 200, computed independently of the worker's code (tests/support/oracle.py).
The bounded customers' rows show only their newest events, so each payload also carries one
"tracer" record: a customer of its own, seen once, whose row proves that the payload was applied
(--no-tracers: none).

Faults (each logged with a timestamp), one after the other with the load running throughout:

    kill              SIGKILL a worker (wherever it is in its batch), start it again
    term              SIGTERM a worker (graceful stop), start it again
    broker-restart    rabbitmqctl stop_app, a pause, start_app
    broker-blackhole  the broker link of the receiver, the workers or both goes dark for seconds
    pg-restart        pg_ctl stop -m immediate (a crash), a pause, start
    pg-blackhole      the workers' Postgres link goes dark for longer than a batch
    memory-alarm      rabbitmqctl set_vm_memory_high_watermark 0, a pause, restore
    receiver-restart  SIGTERM the receiver, start it again

With --cluster the broker is a PRIVATE three-node RabbitMQ cluster instead (the services get
every node in AMQP_URL, straight, no proxy), and the broker faults are the cluster's own:

    leader-kill       kill -9 the node that leads the queue, a pause, start it again
    node-stop         stop_app a node that does not lead the queue, a pause, start_app

and, only when asked for by name, a check of the soak itself:

    selfcheck-purge   stall the workers, then purge the queue: stored messages are destroyed, and
                      the run must end with LOST above 0 and exit 1

At the end the load stops (each payload begun still gets its 200), the queue drains (bounded), and
a summary compares the customers table with the oracle. It ends with "LOST: N"; the exit code is 0
only when nothing is lost, wrong, extra, duplicated, dead-lettered or left unanswered, and every
process is still serving. The logs of every process stay in the run directory it prints when
something failed (or always, with --keep-logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from common.settings import Settings
from common.topology import DEAD_QUEUE, QUEUE
from tests.support.config import TOKEN, service_settings
from tests.support.load import make_record
from tests.support.oracle import COLUMNS, Oracle
from tests.support.processes import env_from, exit_code, free_port, http_status, kill, spawn
from tests.support.proxy import Proxy
from tests.support.servers import (
    RABBIT_BIN,
    PrivateCluster,
    PrivatePostgres,
    PrivateRabbit,
    private_dir,
)

FAULTS = (
    "kill",
    "term",
    "broker-restart",
    "broker-blackhole",
    "pg-restart",
    "pg-blackhole",
    "memory-alarm",
    "receiver-restart",
)
# Not a fault the pipeline should survive: it throws messages away, to show that the soak notices.
SELF_CHECK = "selfcheck-purge"
QUICK_FAULTS = ("kill", "pg-restart", "broker-blackhole")
CLUSTER_FAULTS = ("leader-kill", "node-stop", "kill", "term", "pg-restart", "receiver-restart")
QUICK_CLUSTER_FAULTS = ("leader-kill", "node-stop", "kill")
SHOPS = ("soak-shop-a", "soak-shop-b", "soak-shop-c")
# Event times: slot n of a customer is (n * STRIDE + offset) mod PRIME, a permutation of
# range(PRIME): every event of a customer has its own time (no ties for the oracle to settle), and
# arrival order says nothing about event-time order.
PRIME = 999_983
READY_TIMEOUT = 60.0  # a (re)started process must be ready within this
RECOVERY_TIMEOUT = 60.0  # after a fault, the sender must get 200s again within this
SENDER_TIMEOUT = 1.0  # Upgates waits 1 s for an answer
RETRY_PAUSE = 0.1  # Upgates retries after 5 minutes; the soak compresses that

_started = time.monotonic()


def say(message: str) -> None:
    """One timestamped line of the soak's own log, on stdout."""
    now = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{now} +{time.monotonic() - _started:7.1f}s  {message}", flush=True)


# --- the load -------------------------------------------------------------------------------


@dataclass
class LoadStats:
    """What the sender saw."""

    payloads: int = 0  # begun
    records: int = 0  # in the payloads begun
    requests: int = 0  # HTTP attempts
    ok: int = 0  # payloads answered 200
    ok_records: int = 0
    statuses: Counter[int] = field(default_factory=Counter)  # of every attempt answered
    errors: Counter[str] = field(default_factory=Counter)  # attempts not answered
    slowest: float = 0.0
    slow_503: int = 0  # 503s that took 1 s or more (Upgates had given up)
    unresolved: int = 0  # payloads still without a 200 when the sender gave up on them
    unresolved_records: int = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.ok, self.statuses[503], sum(self.errors.values())


class Load:
    """`concurrency` Upgates-like senders over `shops` x `customers`, until stop()."""

    def __init__(
        self,
        url: str,
        rng: random.Random,
        shops: tuple[str, ...],
        customers: int,
        max_records: int,
        concurrency: int,
        pause: float,
        tracers: bool = True,
    ) -> None:
        self.url = url
        self.rng = rng
        self.shops = shops
        self.customers = customers
        self.max_records = max_records
        self.concurrency = concurrency
        self.pause = pause
        self.tracers = tracers
        self._tracer_ids: dict[str, int] = dict.fromkeys(shops, customers)
        # Tracer row -> the request id its 200 carried, and when (to find it in the logs).
        self.acknowledged: dict[tuple[str, int], tuple[str, float]] = {}
        self.oracle = Oracle()
        self.stats = LoadStats()
        self._next_slot: dict[tuple[str, int], int] = {}
        self._stride = rng.randrange(1, PRIME)
        self._offset = rng.randrange(PRIME)
        self._stopping = asyncio.Event()
        self._give_up = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def _payload(self) -> tuple[str, str, list[tuple[int, dict[str, Any]]]]:
        rng = self.rng
        shop = rng.choice(self.shops)
        kind = rng.choices(("create", "update", "delete"), (5, 4, 1))[0]
        events = []
        count = rng.randint(1, self.max_records)
        if self.tracers:
            # A customer of its own, above the bounded ones, with this one event: its row proves
            # that this payload was applied. (The bounded customers' rows show only the newest
            # events; a lost payload whose events were all superseded would leave no trace.)
            self._tracer_ids[shop] += 1
            cid = self._tracer_ids[shop]
            events.append((cid, make_record(kind, cid, 0)))
            count -= 1
        for _ in range(count):
            cid = rng.randint(1, self.customers)
            n = self._next_slot.get((shop, cid), 0)
            if n >= PRIME:  # never in practice: a million events for one customer
                continue
            self._next_slot[(shop, cid)] = n + 1
            slot = (n * self._stride + self._offset) % PRIME
            events.append((cid, make_record(kind, cid, slot)))
        rng.shuffle(events)
        return shop, kind, events

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=SENDER_TIMEOUT),
            connector=aiohttp.TCPConnector(limit=0),
        )
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline for the retries
        """No new payloads; each one begun is retried until its 200, for up to `timeout` s."""
        self._stopping.set()
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        if pending:
            self._give_up.set()  # they stop at their next failed attempt (within ~1 s)
            _, pending = await asyncio.wait(pending, timeout=SENDER_TIMEOUT + 2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a bug in the soak itself

    async def close(self) -> None:
        """Cancel whatever still runs (an interrupted soak) and close the HTTP session."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            shop, kind, events = self._payload()
            if events:
                await self._deliver(shop, kind, events)
            await asyncio.sleep(self.pause)

    async def _deliver(
        self, shop: str, kind: str, events: list[tuple[int, dict[str, Any]]]
    ) -> None:
        stats = self.stats
        stats.payloads += 1
        stats.records += len(events)
        records = [record for _, record in events]
        body = {"project_name": shop, "customers": records}
        try:
            while True:
                status, request_id = await self._post(kind, body)
                if status in (200, 204):
                    stats.ok += 1
                    stats.ok_records += len(events)
                    self.oracle.accepted(shop, kind, records)
                    if self.tracers:
                        tracer = max(cid for cid, _ in events)  # above every bounded one
                        self.acknowledged[(shop, tracer)] = (request_id, time.time())
                    return
                if self._give_up.is_set():
                    break
                await asyncio.sleep(RETRY_PAUSE * (1 + self.rng.random()))
        except asyncio.CancelledError:
            stats.unresolved += 1
            stats.unresolved_records += len(events)
            raise
        stats.unresolved += 1
        stats.unresolved_records += len(events)

    async def _post(self, kind: str, body: dict[str, Any]) -> tuple[int | None, str]:
        """One attempt: (the status, or None when nothing answered; the 200's request id)."""
        assert self._session is not None
        stats = self.stats
        stats.requests += 1
        started = time.perf_counter()
        try:
            async with self._session.post(
                f"{self.url}/webhooks/customers/{kind}", params={"token": TOKEN}, json=body
            ) as response:
                await response.read()
                status = response.status
                request_id = response.headers.get("X-Request-Id", "")
        except TimeoutError:
            stats.errors["timeout"] += 1
            return None, ""
        except aiohttp.ClientError as exc:
            stats.errors[type(exc).__name__] += 1
            return None, ""
        took = time.perf_counter() - started
        stats.statuses[status] += 1
        stats.slowest = max(stats.slowest, took)
        if status == 503 and took >= 1.0:
            stats.slow_503 += 1
        return status, request_id


# --- the services ---------------------------------------------------------------------------


class Service:
    """`python -m receiver` or `python -m worker` as a process of its own session (Ctrl-C reaches
    the soak only, which stops every child itself)."""

    def __init__(self, name: str, module: str, settings: Settings, logdir: Path) -> None:
        self.name, self.module, self.settings, self.logdir = name, module, settings, logdir
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self.expected_down = False  # set while a fault has stopped it on purpose

    @property
    def log(self) -> Path:
        return self.logdir / f"{self.name}.{self.starts}.log"

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else 0

    def start(self) -> None:
        self.starts += 1
        extra = {}
        if self.module == "worker":
            self.port = free_port()  # the health endpoint, for /readyz
            extra = {"WORKER_PORT": str(self.port), "WORKER_HOST": "127.0.0.1"}
        else:
            self.port = self.settings.receiver_port
        env = env_from(self.settings, **extra)
        self.popen = spawn(self.module, env=env, log=self.log, new_session=True)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def send(self, signum: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signum)

    async def wait_exit(self, timeout: float) -> int | None:  # noqa: ASYNC109 - a deadline
        """The exit code, or None when it did not exit within `timeout` seconds."""
        return await exit_code(self.popen, timeout) if self.popen else None

    async def ready(self, timeout: float = READY_TIMEOUT) -> bool:  # noqa: ASYNC109 - a deadline
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            if await http_status(f"http://127.0.0.1:{self.port}/readyz") == 200:
                return True
            await asyncio.sleep(0.1)
        return False

    def kill(self) -> None:
        if self.popen is not None:
            kill(self.popen)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    | {line}" for line in text[-lines:])


# --- the soak -------------------------------------------------------------------------------


@dataclass
class Options:
    minutes: float
    workers: int
    faults: tuple[str, ...]
    quick: bool
    seed: int
    concurrency: int
    max_records: int
    customers: int
    shops: int
    keep_logs: bool
    max_faults: int
    tracers: bool
    receiver_processes: int = 1
    cluster: bool = False


class Soak:
    """Servers, proxies, services and load for one run; `cleanup()` removes all of it."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.rng = random.Random(options.seed)  # noqa: S311 - shapes the load, not a secret
        self.rundir = Path(tempfile.mkdtemp(prefix="upgates-soak-"))
        self.rabbit: PrivateRabbit | None = None  # with --cluster: a node that is up
        self.cluster: PrivateCluster | None = None
        self.postgres: PrivatePostgres | None = None
        self.proxies: dict[str, Proxy] = {}
        self.receiver: Service | None = None
        self.workers: list[Service] = []
        self.load: Load | None = None
        self.faults: list[tuple[str, str]] = []  # (fault, detail)
        self.problems: list[str] = []  # things that went wrong besides the table
        self.unexpected_exits = 0
        self.not_recovered = 0
        self.database_url = ""

    # -- servers (synchronous: before the event loop, undone by cleanup) --

    def start_servers(self) -> None:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            raise SystemExit(f"soak: no RabbitMQ server in {RABBIT_BIN} (set TEST_RABBITMQ_BIN)")
        say(f"run directory {self.rundir}")
        self.postgres = PrivatePostgres(private_dir("upgates-soak-pg-"))
        if self.options.cluster:
            self.cluster = PrivateCluster(private_dir("upgates-soak-cluster-"))
            self.rabbit = self.cluster.nodes[0]
            say(f"starting a private three-node RabbitMQ cluster: {self.cluster.url}")
            self.cluster.start()
        else:
            self.rabbit = PrivateRabbit(private_dir("upgates-soak-rabbit-"))
            say(f"starting a private RabbitMQ node {self.rabbit.node} on :{self.rabbit.port}")
            self.rabbit.start()
        say(f"starting a private Postgres cluster on 127.0.0.1:{self.postgres.port}")
        self.postgres.init()

    def cleanup(self, failed: bool) -> None:
        """Stop everything this run started; keep the logs when something failed."""
        for service in [*self.workers, *([self.receiver] if self.receiver else [])]:
            service.kill()
        keep = failed or self.options.keep_logs
        if self.cluster is not None:
            with contextlib.suppress(OSError):
                self.cluster.stop()
            base = self.cluster.nodes[0].base.parent
            if keep:
                for i, node in enumerate(self.cluster.nodes, 1):
                    with contextlib.suppress(OSError):
                        shutil.copytree(node.base / "log", self.rundir / f"rabbitmq-{i}-log")
            shutil.rmtree(base, ignore_errors=True)
        elif self.rabbit is not None:
            with contextlib.suppress(OSError):  # the Erlang VM, then its directory
                self.rabbit.stop()
            if keep:
                with contextlib.suppress(OSError):
                    shutil.copytree(self.rabbit.base / "log", self.rundir / "rabbitmq-log")
            shutil.rmtree(self.rabbit.base, ignore_errors=True)
        if self.postgres is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.postgres.stop_sync()
            if keep:
                with contextlib.suppress(OSError):
                    shutil.copy(self.postgres.log, self.rundir / "postgres.log")
            shutil.rmtree(self.postgres.base, ignore_errors=True)
        if keep:
            say(f"logs kept in {self.rundir}")
        else:
            shutil.rmtree(self.rundir, ignore_errors=True)

    # -- the run --

    async def run(self) -> int:
        options = self.options
        try:
            await self._setup()
            assert self.load is not None
            await self.load.start()
            warmup = 3.0 if options.quick else 5.0
            say(f"load running ({options.concurrency} senders, 1..{options.max_records} records)")
            await self._pause(warmup)
            await self._fault_loop()
            await self._pause(2.0 if options.quick else 5.0)
            say("stopping the load: every payload begun is retried until it is answered 200")
            await self.load.stop(timeout=60.0)
            await self._drain(timeout=60.0 if options.quick else 180.0)
            return await self._summary()
        finally:
            if self.load is not None:
                await self.load.close()
            # The services first: closing the proxies under them would only fill their logs.
            for service in [*self.workers, *([self.receiver] if self.receiver else [])]:
                service.kill()
            for proxy in self.proxies.values():
                with contextlib.suppress(Exception):
                    await proxy.close()

    async def _setup(self) -> None:
        options = self.options
        assert self.rabbit is not None
        assert self.postgres is not None
        admin = await asyncpg.connect(self.postgres.dsn(), timeout=10)
        try:
            await admin.execute('CREATE DATABASE "soak"')
        finally:
            await admin.close()
        self.database_url = self.postgres.dsn("soak")
        links = [("postgres-workers", self.postgres.port)]
        if self.cluster is None:
            links += [("amqp-receiver", self.rabbit.port), ("amqp-workers", self.rabbit.port)]
        for name, port in links:
            self.proxies[name] = await Proxy("127.0.0.1", port).start()
        amqp = "amqp://guest:guest@127.0.0.1:{}/"
        if self.cluster is not None:
            receiver_amqp = workers_amqp = self.cluster.url
        else:
            receiver_amqp = amqp.format(self.proxies["amqp-receiver"].port)
            workers_amqp = amqp.format(self.proxies["amqp-workers"].port)
        receiver_settings = service_settings(
            receiver_amqp,
            self.database_url,
            receiver_processes=options.receiver_processes,
        )
        worker_settings = service_settings(
            workers_amqp,
            self.postgres.dsn("soak", port=self.proxies["postgres-workers"].port),
            receiver_port=receiver_settings.receiver_port,
        )
        logdir = self.rundir
        self.receiver = Service("receiver", "receiver", receiver_settings, logdir)
        self.workers = [
            Service(f"worker-{i + 1}", "worker", worker_settings, logdir)
            for i in range(options.workers)
        ]
        for service in [self.receiver, *self.workers]:
            service.start()
        for service in [self.receiver, *self.workers]:
            if not await service.ready():
                raise RuntimeError(f"{service.name} did not become ready:\n{service.tail(40)}")
        say(
            f"receiver on :{receiver_settings.receiver_port} (pid {self.receiver.pid}), "
            + ", ".join(f"{w.name} pid {w.pid}" for w in self.workers)
            + "; proxies: "
            + ", ".join(f"{name} :{p.port}" for name, p in self.proxies.items())
        )
        self.load = Load(
            f"http://127.0.0.1:{receiver_settings.receiver_port}",
            self.rng,
            SHOPS[: options.shops],
            options.customers,
            options.max_records,
            options.concurrency,
            pause=0.01,
            tracers=options.tracers,
        )

    async def _pause(self, seconds: float) -> None:
        """Sleep while watching the processes: one that died by itself is reported, restarted."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(0.25, left))
            await self._watch()

    async def _watch(self) -> None:
        for service in [*([self.receiver] if self.receiver else []), *self.workers]:
            if service.expected_down or service.alive():
                continue
            self.unexpected_exits += 1
            message = (
                f"{service.name} (pid {service.pid}) exited by itself: rc {service.returncode()}"
            )
            self.problems.append(message)
            say(f"UNEXPECTED: {message}; its log ends:\n{service.tail()}")
            service.start()
            if not await service.ready():
                self.problems.append(f"{service.name} did not come back after its exit")

    async def _fault_loop(self) -> None:
        options = self.options
        if options.quick:
            plan = list(options.faults[:3])
            deadline = math.inf
        else:
            plan = []
            deadline = time.monotonic() + options.minutes * 60
        injected = 0
        while injected < options.max_faults and time.monotonic() < deadline:
            if not plan:
                if options.quick:
                    break
                plan = list(options.faults)
                self.rng.shuffle(plan)  # every round injects each fault once, in a new order
            fault = plan.pop(0)
            await self._inject(fault)
            injected += 1
            await self._pause(2.0 if options.quick else self.rng.uniform(2.0, 6.0))

    async def _inject(self, fault: str) -> None:
        assert self.load is not None
        before = self.load.stats.snapshot()
        action: Callable[[], Awaitable[str]] = getattr(self, "_fault_" + fault.replace("-", "_"))
        say(f"FAULT {fault}: begin")
        started = time.monotonic()
        detail = await action()
        took = time.monotonic() - started
        self.faults.append((fault, detail))
        recovered = await self._recovered()
        ok, s503, errors = (a - b for a, b in zip(self.load.stats.snapshot(), before, strict=True))
        counts = f"200s {ok}, 503s {s503}, no answer {errors}"
        if recovered is None:
            self.not_recovered += 1
            say(
                f"FAULT {fault}: {detail} ({took:.1f} s); NOT RECOVERED: no 200s and ready "
                f"processes within {RECOVERY_TIMEOUT:.0f} s ({counts})"
            )
        else:
            say(
                f"FAULT {fault}: {detail} ({took:.1f} s); recovered {recovered:.1f} s after it "
                f"(since the fault began: {counts})"
            )

    async def _recovered(self) -> float | None:
        """Seconds until every process is ready and new payloads get their 200 again."""
        assert self.load is not None
        started = time.monotonic()
        services = [*([self.receiver] if self.receiver else []), *self.workers]
        target = self.load.stats.ok + 3
        while time.monotonic() < started + RECOVERY_TIMEOUT:
            await self._watch()
            if self.load.stats.ok >= target:
                ready = [await http_status(f"http://127.0.0.1:{s.port}/readyz") for s in services]
                if all(status == 200 for status in ready):
                    return time.monotonic() - started
            await asyncio.sleep(0.05)
        return None

    def _hold(self, short: tuple[float, float], long: tuple[float, float]) -> float:
        return self.rng.uniform(*(short if self.options.quick else long))

    async def _restart(self, service: Service, signum: int) -> str:
        old = service.pid
        service.expected_down = True
        try:
            service.send(signum)
            grace = service.settings.shutdown_grace + 10 if signum == signal.SIGTERM else 10
            code = await service.wait_exit(grace)
            if code is None:
                self.problems.append(
                    f"{service.name} (pid {old}) did not exit within {grace:.0f} s of "
                    f"{signal.Signals(signum).name}"
                )
                say(f"UNEXPECTED: {self.problems[-1]}; killing it")
                service.kill()
                code = service.returncode()
            elif signum == signal.SIGTERM and code != 0:
                self.problems.append(f"{service.name} (pid {old}) exited {code} after SIGTERM")
                say(f"UNEXPECTED: {self.problems[-1]}; its log ends:\n{service.tail()}")
            await asyncio.sleep(self._hold((0.2, 0.5), (0.2, 1.5)))
            service.start()
            ready = await service.ready()
        finally:
            service.expected_down = False
        if not ready:
            self.problems.append(f"{service.name} (pid {service.pid}) not ready after its restart")
            say(f"UNEXPECTED: {self.problems[-1]}:\n{service.tail()}")
        return f"{service.name} pid {old} exited {code}, restarted as pid {service.pid}"

    async def _fault_kill(self) -> str:
        return await self._restart(self.rng.choice(self.workers), signal.SIGKILL)

    async def _fault_term(self) -> str:
        return await self._restart(self.rng.choice(self.workers), signal.SIGTERM)

    async def _fault_receiver_restart(self) -> str:
        assert self.receiver is not None
        return await self._restart(self.receiver, signal.SIGTERM)

    async def _fault_broker_restart(self) -> str:
        assert self.rabbit is not None
        await self.rabbit.stop_app()
        down = self._hold((1.0, 1.5), (1.0, 4.0))
        say(f"  broker stopped (stop_app), down for {down:.1f} s")
        await asyncio.sleep(down)
        await self.rabbit.start_app()
        return f"private RabbitMQ stop_app, {down:.1f} s, start_app"

    async def _fault_broker_blackhole(self) -> str:
        target = self.rng.choice(("receiver", "workers", "receiver and the workers"))
        names = {
            "receiver": ["amqp-receiver"],
            "workers": ["amqp-workers"],
            "receiver and the workers": ["amqp-receiver", "amqp-workers"],
        }[target]
        dark = self._hold((2.0, 3.0), (2.0, 8.0))
        try:
            for name in names:
                self.proxies[name].blackhole()
            say(f"  broker link of the {target} blackholed for {dark:.1f} s")
            await asyncio.sleep(dark)
        finally:
            for name in names:
                self.proxies[name].passthrough()
        return f"broker link of the {target} blackholed {dark:.1f} s"

    async def _fault_pg_restart(self) -> str:
        assert self.postgres is not None
        await self.postgres.stop()
        down = self._hold((1.0, 1.5), (1.0, 4.0))
        say(f"  Postgres stopped (-m immediate), down for {down:.1f} s")
        await asyncio.sleep(down)
        await self.postgres.start()
        return f"private Postgres stop -m immediate, {down:.1f} s, start"

    async def _fault_pg_blackhole(self) -> str:
        proxy = self.proxies["postgres-workers"]
        dark = self._hold((2.0, 3.0), (2.0, 8.0))
        try:
            proxy.blackhole()
            say(f"  the workers' Postgres link blackholed for {dark:.1f} s")
            await asyncio.sleep(dark)
        finally:
            proxy.passthrough()
        return f"workers' Postgres link blackholed {dark:.1f} s"

    async def _fault_memory_alarm(self) -> str:
        assert self.rabbit is not None
        on = self._hold((1.5, 2.0), (2.0, 6.0))
        try:
            await self.rabbit.memory_alarm(True)
            say(f"  memory alarm on (watermark 0) for {on:.1f} s")
            await asyncio.sleep(on)
        finally:
            await self.rabbit.memory_alarm(False)
        return f"memory alarm {on:.1f} s"

    async def _fault_leader_kill(self) -> str:
        assert self.cluster is not None
        leader = await self.cluster.leader(QUEUE)
        self.cluster.kill(leader)
        self.rabbit = next(n for n in self.cluster.nodes if n is not leader)
        down = self._hold((2.0, 3.0), (2.0, 8.0))
        say(f"  killed the queue's leader {leader.node} (kill -9), down for {down:.1f} s")
        await asyncio.sleep(down)
        await asyncio.to_thread(self.cluster.restart, leader)
        return f"kill -9 of the leader {leader.node}, {down:.1f} s, started again"

    async def _fault_node_stop(self) -> str:
        assert self.cluster is not None
        leader = await self.cluster.leader(QUEUE)
        node = self.rng.choice([n for n in self.cluster.nodes if n is not leader])
        self.rabbit = leader
        down = self._hold((2.0, 3.0), (2.0, 8.0))
        await node.stop_app()
        try:
            say(f"  stopped {node.node} (stop_app, not the leader) for {down:.1f} s")
            await asyncio.sleep(down)
        finally:
            await node.start_app()
        return f"stop_app of {node.node}, {down:.1f} s, start_app"

    async def _fault_selfcheck_purge(self) -> str:
        assert self.rabbit is not None
        proxy = self.proxies["postgres-workers"]
        try:
            proxy.blackhole()  # the workers stall with their prefetch; the rest waits, ready
            await asyncio.sleep(2.0)
            out = await self.rabbit.ctl("purge_queue", QUEUE)
        finally:
            proxy.passthrough()
        return f"SELF-CHECK: purged the queue ({out.strip().splitlines()[-1]})"

    # -- the end --

    async def _queue_counts(self) -> dict[str, int]:
        """Messages (ready + unacknowledged) per queue on the private node."""
        assert self.rabbit is not None
        out = await self.rabbit.ctl("list_queues", "-q", "--no-table-headers", "name", "messages")
        counts = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
        return counts

    async def _drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline
        """Wait until the queue is empty (every message committed and acked), bounded."""
        say("waiting for the queue to drain")
        deadline = time.monotonic() + timeout
        left = -1
        while time.monotonic() < deadline:
            await self._watch()
            try:
                left = (await self._queue_counts()).get(QUEUE, -1)
            except (RuntimeError, TimeoutError) as exc:
                say(f"  cannot count the queue: {exc}")
                left = -1
            if left == 0:
                say("queue drained")
                return
            await asyncio.sleep(0.5)
        self.problems.append(f"the queue did not drain within {timeout:.0f} s ({left} messages)")
        say(f"UNEXPECTED: {self.problems[-1]}")

    async def _table(self) -> tuple[dict[tuple[str, int], tuple[Any, ...]], int, int, int]:
        """(rows by key, duplicate keys, rejected records, rows of shops the soak never sent)."""
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            columns = ", ".join(COLUMNS)
            rows = await conn.fetch(f"SELECT project_name, customer_id, {columns} FROM customers")  # noqa: S608 - constant column list
            duplicates = await conn.fetchval(
                "SELECT count(*) - count(DISTINCT (project_name, customer_id)) FROM customers"
            )
            rejected = await conn.fetchval("SELECT count(*) FROM rejected_records")
        finally:
            await conn.close()
        shops = set(SHOPS[: self.options.shops])
        table = {
            (r["project_name"], r["customer_id"]): tuple(r.values())[2:]
            for r in rows
            if r["project_name"] in shops
        }
        return table, duplicates, rejected, len(rows) - len(table)

    async def _compare(self) -> dict[str, Any]:
        """The table against the oracle; polled briefly (the last COMMITs may be in flight)."""
        assert self.load is not None
        want = self.load.oracle.expected()
        deadline = time.monotonic() + 10
        while True:
            got, duplicates, rejected, foreign = await self._table()
            if got == want or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(key for key in set(want) & set(got) if want[key] != got[key])
        return {
            "want": want,
            "got": got,
            "missing": missing,
            "extra": extra,
            "wrong": wrong,
            "duplicates": duplicates,
            "rejected": rejected,
            "foreign": foreign,
        }

    def _worker_logs(self) -> tuple[int, Counter[str]]:
        """(records committed, including redeliveries; warning/error messages by text)."""
        committed = 0
        notable: Counter[str] = Counter()
        for path in sorted(self.rundir.glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    if line.strip():
                        notable[f"{path.name.split('.')[0]}: (not JSON) {line[:100]}"] += 1
                    continue
                if entry.get("msg") == "batch committed":
                    committed += int(entry.get("records", 0))
                if entry.get("level") in ("warning", "error", "critical"):
                    key = f"{entry.get('level')} {entry.get('logger')}: {entry.get('msg')}"
                    if entry.get("error"):
                        key += f" ({entry['error']})"
                    notable[key] += 1
        return committed, notable

    async def _summary(self) -> int:
        assert self.load is not None
        stats = self.load.stats
        result = await self._compare()
        queues = await self._queue_counts()
        services = [*([self.receiver] if self.receiver else []), *self.workers]
        for service in services:
            if not await service.ready(timeout=10):
                self.problems.append(f"{service.name} is not serving at the end")
        committed, notable = self._worker_logs()
        dead = queues.get(DEAD_QUEUE, 0)
        missing, wrong, extra = result["missing"], result["wrong"], result["extra"]
        want, got = result["want"], result["got"]
        lost = len(missing) + len(wrong)
        bounded = self.options.customers

        def tracers(keys: list[tuple[str, int]]) -> str:
            return f"{sum(cid > bounded for _, cid in keys)} of them tracer rows"

        other = {s: n for s, n in sorted(stats.statuses.items()) if s not in (200, 204, 503)}
        fault_counts = Counter(name for name, _ in self.faults)
        print()
        print(
            f"=== soak summary: {time.monotonic() - _started:.0f} s, {self.options.workers} "
            f"workers, {len(self.faults)} faults, seed {self.options.seed} ==="
        )
        lines = [
            ("faults injected", ", ".join(f"{k} x{n}" for k, n in fault_counts.items()) or "none"),
            (
                "webhooks sent",
                f"{stats.requests} requests for {stats.payloads} payloads "
                f"({stats.records} records)",
            ),
            ("answered 200", f"{stats.statuses[200] + stats.statuses[204]}"),
            ("answered 503", f"{stats.statuses[503]} (of them slower than 1 s: {stats.slow_503})"),
            ("answered other", f"{sum(other.values())} {other if other else ''}".rstrip()),
            ("no answer", f"{sum(stats.errors.values())} {dict(stats.errors) or ''}".rstrip()),
            ("slowest answer", f"{stats.slowest:.3f} s"),
            (
                "payloads acknowledged",
                f"{stats.ok} answered 200 ({stats.ok_records} records acknowledged)",
            ),
            (
                "payloads unresolved",
                f"{stats.unresolved} ({stats.unresolved_records} records never answered 200)",
            ),
            ("records committed", f"{committed} by the workers (redeliveries included)"),
            ("queue left", f"{queues.get(QUEUE, '?')} messages"),
            ("dead-lettered", str(dead)),
            ("rejected records", str(result["rejected"])),
            (
                "rows expected",
                f"{len(want)} (oracle of everything answered 200"
                + (f"; {tracers(list(want))})" if self.options.tracers else ")"),
            ),
            ("rows stored", f"{len(got)} (+{result['foreign']} of other shops)"),
            ("missing", f"{len(missing)}" + (f" ({tracers(missing)})" if missing else "")),
            ("wrong", f"{len(wrong)}" + (f" ({tracers(wrong)})" if wrong else "")),
            ("extra", f"{len(extra)}" + (f" ({tracers(extra)})" if extra else "")),
            ("duplicates", str(result["duplicates"])),
            ("unexpected exits", str(self.unexpected_exits)),
            ("slow recoveries", f"{self.not_recovered} (no 200s within {RECOVERY_TIMEOUT:.0f} s)"),
        ]
        for label, value in lines:
            print(f"{label + ':':<24}{value}")
        for key in missing[:10]:
            print(f"  missing {key}: want {want[key]}")
            if key in self.load.acknowledged:
                request_id, at = self.load.acknowledged[key]
                when = datetime.fromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]
                print(f"    its payload: request_id {request_id}, answered 200 at {when}")
        for key in wrong[:5]:
            print(f"  wrong {key}:\n    want {want[key]}\n    got  {got[key]}")
        for key in extra[:5]:
            print(f"  extra {key}: got {got[key]}")
        if notable:
            print("warnings and errors in the services' logs:")
            for text, count in notable.most_common(15):
                print(f"  {count:6} x {text}")
        if stats.unresolved:
            self.problems.append(f"{stats.unresolved} payloads never answered 200")
        if dead:
            self.problems.append(f"{dead} messages dead-lettered")
        if result["rejected"]:
            self.problems.append(f"{result['rejected']} rejected records (the load sends none)")
        if extra or result["duplicates"] or result["foreign"]:
            self.problems.append("rows the oracle does not explain (extra, duplicate, other shop)")
        for problem in self.problems:
            print(f"PROBLEM: {problem}")
        print(f"LOST: {lost}", flush=True)
        return 0 if lost == 0 and not self.problems else 1


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="faults: "
        + ", ".join((*FAULTS, SELF_CHECK))
        + "; with --cluster: "
        + ", ".join(CLUSTER_FAULTS),
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="fault loop length (5)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (3; quick 2)")
    parser.add_argument("--faults", default="all", help="all, or a comma-separated list")
    parser.add_argument("--quick", action="store_true", help="~30 s with three faults")
    parser.add_argument("--seed", type=int, default=None, help="for a reproducible run")
    parser.add_argument("--concurrency", type=int, default=None, help="senders (8; quick 4)")
    parser.add_argument("--max-records", type=int, default=None, help="per payload (50; quick 20)")
    parser.add_argument("--customers", type=int, default=None, help="per shop (300; quick 50)")
    parser.add_argument("--shops", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--max-faults", type=int, default=10_000, help="stop the loop after these")
    parser.add_argument("--keep-logs", action="store_true", help="keep the run directory")
    parser.add_argument(
        "--no-tracers", action="store_true", help="no tracer customer in each payload"
    )
    parser.add_argument(
        "--receiver-processes", type=int, default=1, help="RECEIVER_PROCESSES of the receiver (1)"
    )
    parser.add_argument(
        "--cluster", action="store_true", help="a private three-node RabbitMQ cluster"
    )
    args = parser.parse_args(argv)
    known = CLUSTER_FAULTS if args.cluster else (*FAULTS, SELF_CHECK)
    if args.faults == "all":
        if args.cluster:
            faults = QUICK_CLUSTER_FAULTS if args.quick else CLUSTER_FAULTS
        else:
            faults = QUICK_FAULTS if args.quick else FAULTS
    else:
        faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
        unknown = [f for f in faults if f not in known]
        if unknown or not faults:
            parser.error(f"unknown faults {unknown}; choose from {', '.join(known)}")
    quick = args.quick

    def pick(value: int | None, full: int, short: int) -> int:
        chosen = value if value is not None else (short if quick else full)
        if chosen < 1:
            parser.error("counts must be at least 1")
        return chosen

    return Options(
        minutes=args.minutes,
        workers=pick(args.workers, 3, 2),
        faults=faults,
        quick=quick,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(10**6),
        concurrency=pick(args.concurrency, 8, 4),
        max_records=pick(args.max_records, 50, 20),
        customers=pick(args.customers, 300, 50),
        shops=args.shops,
        keep_logs=args.keep_logs,
        max_faults=args.max_faults,
        tracers=not args.no_tracers,
        receiver_processes=pick(args.receiver_processes, 1, 1),
        cluster=args.cluster,
    )


async def _run_until_signal(soak: Soak) -> int:
    """The run, cancelled by SIGTERM as asyncio.run cancels it on Ctrl-C."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await soak.run()


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    say(
        f"soak: {'quick' if options.quick else f'{options.minutes:g} min'}, "
        f"{options.workers} workers, faults {','.join(options.faults)}, seed {options.seed}"
    )
    soak = Soak(options)
    code = 2
    try:
        soak.start_servers()
        code = asyncio.run(_run_until_signal(soak))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted: stopping everything")
        code = 130
    except Exception as exc:  # noqa: BLE001 - report, clean up, exit non-zero
        traceback.print_exc()
        say(f"soak failed: {type(exc).__name__}: {exc}")
        code = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        soak.cleanup(failed=code != 0)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
