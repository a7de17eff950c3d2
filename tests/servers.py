"""Private servers, spawned services and a steady Upgates-like load for the fault tests.

Other people run tests against the shared RabbitMQ and Postgres at the same time, so the tests
that stop, restart or alarm a server start their own: a private RabbitMQ node and a private
Postgres cluster (session-scoped, in a temporary directory, on free ports). Test modules load this
file with ``pytest_plugins = ["tests.servers"]``.

- ``PrivateRabbit``/``private_rabbit``/``rabbit``: a RabbitMQ node of its own (the topology is
  deleted before and after each test; the node is running and without alarm at both ends).
- ``PrivatePostgres``/``private_postgres``/``private_database``: a Postgres cluster of its own and
  a fresh database in it per test.
- ``Procs``/``procs``: ``python -m receiver``/``python -m worker`` as real processes, configured
  from a Settings object through the environment, waited on until ready, killed at the end.
- ``Sender``: sends webhooks the way Upgates does (several at once, each retried until it gets a
  200) and keeps the ``Oracle``: the fold of every event answered 200.
- ``assert_table_matches``: the customers table must become exactly the oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest

from common import settings as settings_module
from common.message import unpack
from common.settings import Settings
from common.topology import DEAD_EXCHANGE, DEAD_QUEUE, EXCHANGE, QUEUE
from tests.conftest import ROOT, TOKEN, free_port, wait_until
from tests.proxy import Proxy

RABBIT_BIN = Path(os.environ.get("TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def _pg_bin() -> Path:
    if "TEST_PG_BIN" in os.environ:
        return Path(os.environ["TEST_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else Path("/usr/lib/postgresql/15/bin")


async def run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:  # noqa: ASYNC109
    """Run a command without blocking the event loop (the load keeps going); its output."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {out.decode()[-2000:]}")
    return out.decode()


# --- a private RabbitMQ node ----------------------------------------------------------------


class PrivateRabbit:
    """A RabbitMQ node of the tests' own: stop_app/start_app and alarms touch nobody else."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.node = f"upgates-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        (base / "enabled_plugins").write_text("")  # no management plugin: faster start
        (base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (it names the node)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "vm_memory_high_watermark.relative = 0.4\n"
            "disk_free_limit.absolute = 1MB\n"
        )
        self.env = {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie lives here, shared by server and CLI
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The AMQP URL of the default vhost, straight to the node (no proxy)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl_sync(self, *args: str) -> str:
        done = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.decode()[-2000:]}")
        return done.stdout.decode()

    async def ctl(self, *args: str) -> str:
        return await run(
            str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args, env=self.env, timeout=60
        )

    def start(self) -> None:
        with (self.base / "server.out").open("wb") as out:
            self.process = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while True:
            try:
                # Fails at once while the node has not registered with epmd yet.
                self.ctl_sync("await_startup", "--timeout", "60")
                return
            except RuntimeError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "private RabbitMQ did not start:\n"
                        + (self.base / "server.out").read_text()[-3000:]
                    ) from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl_sync("stop")
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    async def stop_app(self) -> None:
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.ctl("await_startup")

    async def memory_alarm(self, on: bool) -> None:
        """Watermark 0 raises the memory alarm (publishers blocked); 0.4 clears it."""
        await self.ctl("set_vm_memory_high_watermark", "0" if on else "0.4")

    async def alarms(self) -> str:
        return await self.ctl("eval", "rabbit_alarm:get_alarms().")

    async def ensure_usable(self) -> None:
        """Running, no alarm, and none of the project's topology left from an earlier test."""
        status = await self.ctl("eval", "rabbit:is_running().")
        if "true" not in status:
            await self.start_app()
        await self.memory_alarm(False)
        connection = await aio_pika.connect(self.url, timeout=10)
        async with connection:
            channel = await connection.channel()
            for queue in (QUEUE, DEAD_QUEUE):
                await channel.queue_delete(queue)
            for exchange in (EXCHANGE, DEAD_EXCHANGE):
                await channel.exchange_delete(exchange)


def _private_dir(prefix: str) -> Path:
    # In /tmp, world-traversable: pytest's own tmp dirs are 0700 and Postgres runs as `postgres`.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A private RabbitMQ node for the whole session."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.skip(f"no RabbitMQ server in {RABBIT_BIN} (set TEST_RABBITMQ_BIN)")
    base = _private_dir("upgates-rabbit-")
    node = PrivateRabbit(base)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def rabbit(private_rabbit: PrivateRabbit) -> AsyncIterator[PrivateRabbit]:
    """The private node, running and clean for this test, and left so for the next."""
    await private_rabbit.ensure_usable()
    yield private_rabbit
    await private_rabbit.ensure_usable()


# --- a private Postgres cluster -------------------------------------------------------------


class PrivatePostgres:
    """A Postgres cluster of the tests' own: `pg_ctl -m immediate` touches nobody else."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.bin = _pg_bin()
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.port = free_port()
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
            shutil.chown(base, "postgres")

    def dsn(self, database: str = "postgres", port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{database}"

    def _pg_ctl(self, *args: str) -> list[str]:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=on"
        return [
            *self.as_postgres,
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            *args,
        ]

    def init(self) -> None:
        subprocess.run(
            [
                *self.as_postgres,
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(self._pg_ctl("start"), check=True, capture_output=True, timeout=120)

    def stop_sync(self) -> None:
        subprocess.run(self._pg_ctl("-m", "immediate", "stop"), capture_output=True, timeout=60)

    async def stop(self) -> None:
        """Stop at once, like a crash: no checkpoint, clients cut off (`-m immediate`)."""
        await run(*self._pg_ctl("-m", "immediate", "stop"))

    async def start(self) -> None:
        await run(*self._pg_ctl("start"))

    async def running(self) -> bool:
        try:
            await run(*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.data), "status")
        except RuntimeError:
            return False
        return True


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private Postgres cluster for the whole session."""
    if not (_pg_bin() / "initdb").exists():
        pytest.skip("no Postgres server binaries (set TEST_PG_BIN)")
    base = _private_dir("upgates-pg-")
    cluster = PrivatePostgres(base)
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.stop_sync()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def private_database(private_postgres: PrivatePostgres) -> AsyncIterator[str]:
    """A fresh database in the private cluster (which is running at both ends); its name."""
    if not await private_postgres.running():
        await private_postgres.start()
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(private_postgres.dsn())
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield name
    if not await private_postgres.running():
        await private_postgres.start()
    admin = await asyncpg.connect(private_postgres.dsn())
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


# --- proxies --------------------------------------------------------------------------------


@pytest.fixture
async def proxies() -> AsyncIterator[list[Proxy]]:
    """Append started proxies here (or use `start_proxy`); they are closed after the test."""
    started: list[Proxy] = []
    yield started
    for proxy in started:
        await proxy.close()


async def start_proxy(proxies: list[Proxy], host: str, port: int) -> Proxy:
    proxy = await Proxy(host, port).start()
    proxies.append(proxy)
    return proxy


def with_port(url: str, port: int) -> str:
    """The URL (amqp:// or postgresql://, host 127.0.0.1 or localhost) on another port."""
    scheme, rest = url.split("://", 1)
    userinfo, _, hostpath = rest.rpartition("@")
    hostport, slash, path = hostpath.partition("/")
    host = hostport.rsplit(":", 1)[0]
    return f"{scheme}://{userinfo + '@' if userinfo else ''}{host}:{port}{slash}{path}"


def port_of(url: str) -> int:
    hostpath = url.split("://", 1)[1].rpartition("@")[2]
    return int(hostpath.partition("/")[0].rsplit(":", 1)[1])


# --- the services as processes --------------------------------------------------------------


def env_from(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives `python -m receiver`/`worker` exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
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
        return await asyncio.wait_for(asyncio.to_thread(self.popen.wait), timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


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
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", module],
                env=env_from(settings, **extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        proc = Proc(module, popen, log, port)
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
            with contextlib.suppress(ProcessLookupError):
                proc.popen.kill()
            proc.popen.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Spawned receivers and workers, killed after the test."""
    spawned = Procs(tmp_path)
    yield spawned
    spawned.kill_all()


def service_settings(amqp_url: str, database_url: str, **changes: Any) -> Settings:
    """Settings for a test's services: a free receiver port and quick retries."""
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "database_url": database_url,
        "webhook_tokens": (TOKEN,),
        "receiver_host": "127.0.0.1",
        "receiver_port": free_port(),
        "worker_host": "127.0.0.1",
        "worker_port": 0,
        "receiver_metrics_port": 0,
        "batch_max_wait": 0.02,
        "retry_max_backoff": 0.5,
        "shutdown_grace": 5.0,
    }
    values.update(changes)
    return Settings(**values)


# --- the load and its oracle ----------------------------------------------------------------

T0 = datetime(2025, 6, 1, 6, 0, tzinfo=UTC)
PRAGUE_SUMMER = timezone(timedelta(hours=2))
TIME_FIELD = {"create": "creation_time", "update": "last_update_time", "delete": "deletion_time"}
SLOTS = 8  # events per customer; each at its own time, sent in a shuffled order


def event_time(cid: int, slot: int) -> datetime:
    return T0 + timedelta(seconds=cid * 1000 + slot * 10)


def make_record(kind: str, cid: int, slot: int) -> dict[str, Any]:
    """One record as Upgates sends it; every (customer, slot) has a distinct event time."""
    when = event_time(cid, slot)
    if kind == "create":
        return {
            "customer_id": cid,
            "email": f"c{cid}.{slot}@example.cz",
            "code": f"K{slot}",
            "creation_time": when.astimezone(PRAGUE_SUMMER).isoformat(),
            "active_yn": slot % 2 == 0,
            "blocked_yn": False,
        }
    if kind == "update":
        return {
            "customer_id": str(cid),  # Upgates sometimes sends numbers as strings
            "email": f"u{cid}.{slot}@example.cz",
            "code": f"U{slot}",
            "last_update_time": when.strftime("%Y-%m-%dT%H:%M:%S+0000"),
        }
    return {
        "customer_id": cid,
        "email": f"d{cid}.{slot}@example.cz",
        "code": f"D{slot}",
        "deletion_time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


Row = tuple[Any, ...]  # email, code, active_yn, created_at, updated_at, deleted_at


class Oracle:
    """The fold of every event answered 200, computed independently of the worker's code."""

    def __init__(self) -> None:
        self.events: dict[int, list[tuple[datetime, str, dict[str, Any]]]] = {}

    def accepted(self, kind: str, records: list[dict[str, Any]]) -> None:
        for record in records:
            when = datetime.strptime(record[TIME_FIELD[kind]], "%Y-%m-%dT%H:%M:%S%z")
            self.events.setdefault(int(record["customer_id"]), []).append(
                (when.astimezone(UTC), kind, record)
            )

    def expected(self) -> dict[int, Row]:
        table: dict[int, Row] = {}
        for cid, events in self.events.items():
            when, kind, record = max(events, key=lambda e: e[0])  # distinct times: no ties
            creates = [e for e in events if e[1] == "create"]
            updates = [e for e in events if e[1] == "update"]
            table[cid] = (
                None if kind == "delete" else record["email"],
                record["code"],
                max(creates, key=lambda e: e[0])[2]["active_yn"] if creates else None,
                max(e[0] for e in creates) if creates else None,
                max(e[0] for e in updates) if updates else None,
                when if kind == "delete" else None,
            )
        return table


class Events:
    """An endless stream of webhook payloads over a moving window of customers."""

    def __init__(self, seed: int, records: int, window: int = 40) -> None:
        self.rng = random.Random(seed)
        self.records = records
        self.window = window
        self.next_cid = 1
        self.live: dict[int, list[int]] = {}

    def _customer(self, taken: set[int]) -> int:
        while len(self.live) < self.window:
            slots = list(range(SLOTS))
            self.rng.shuffle(slots)
            self.live[self.next_cid] = slots
            self.next_cid += 1
        choices = [cid for cid in self.live if cid not in taken]
        return self.rng.choice(choices)

    def next(self) -> tuple[str, list[dict[str, Any]]]:
        kind = self.rng.choices(("create", "update", "delete"), (5, 4, 1))[0]
        taken: set[int] = set()
        records = []
        for _ in range(self.records):
            cid = self._customer(taken)
            taken.add(cid)
            slots = self.live[cid]
            records.append(make_record(kind, cid, slots.pop()))
            if not slots:
                del self.live[cid]
        return kind, records


@dataclass
class Stats:
    """What the sender saw."""

    requests: int = 0
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # no answer: refused, reset, timeout
    latencies: list[float] = field(default_factory=list)  # of every answer, in seconds
    slow_503: int = 0  # 503s that took 1 s or more

    def summary(self) -> str:
        worst = max(self.latencies, default=0.0)
        return (
            f"requests={self.requests} ok={self.ok} statuses={dict(self.statuses)} "
            f"errors={dict(self.errors)} slowest_answer={worst:.3f}s slow_503={self.slow_503}"
        )


class Sender:
    """Sends webhooks like Upgates: `concurrency` at once, each retried until it gets a 200.

    Upgates waits 1 s for an answer; no answer in time, a refused connection or any status but
    200/204 means: send it again. Only what was answered 200 goes into the oracle.
    """

    def __init__(
        self,
        url: str,
        shop: str = "steady-shop",
        concurrency: int = 4,
        records: int = 5,
        pause: float = 0.02,
        seed: int = 1,
        timeout: float = 1.0,
        keepalive: bool = True,
    ) -> None:
        self.url = url
        self.shop = shop
        self.concurrency = concurrency
        self.pause = pause
        self.timeout = timeout
        self.keepalive = keepalive
        self.events = Events(seed, records)
        self.oracle = Oracle()
        self.stats = Stats()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Sender:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, force_close=not self.keepalive),
        )
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def stop(self, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Stop taking new payloads; every payload begun is retried until it gets its 200."""
        self._stopping.set()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in done:
            task.result()
        if pending:
            raise AssertionError(
                f"{len(pending)} payloads still not answered 200 after {timeout} s: "
                + self.stats.summary()
            )

    async def post(self, event: str, payload: Any) -> tuple[int | None, float]:
        """One attempt: (status or None when nothing answered, seconds)."""
        assert self._session is not None
        started = time.perf_counter()
        self.stats.requests += 1
        try:
            async with self._session.post(
                f"{self.url}/webhooks/customers/{event}",
                params={"token": TOKEN},
                json=payload,
            ) as response:
                await response.read()
                status: int | None = response.status
        except TimeoutError:
            status = None
            self.stats.errors["timeout"] += 1
        except aiohttp.ClientError as exc:
            status = None
            self.stats.errors[type(exc).__name__] += 1
        took = time.perf_counter() - started
        if status is not None:
            self.stats.statuses[status] += 1
            self.stats.latencies.append(took)
            if status == 503 and took >= 1.0:
                self.stats.slow_503 += 1
        return status, took

    async def send_until_200(self, event: str, records: list[dict[str, Any]]) -> None:
        payload = {"project_name": self.shop, "customers": records}
        while True:
            status, _ = await self.post(event, payload)
            if status in (200, 204):
                self.stats.ok += 1
                self.oracle.accepted(event, records)
                return
            await asyncio.sleep(0.05)

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            event, records = self.events.next()
            await self.send_until_200(event, records)
            await asyncio.sleep(self.pause)

    async def wait_ok(self, more: int, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Wait until `more` further payloads have been answered 200."""
        target = self.stats.ok + more

        async def reached() -> bool:
            return self.stats.ok >= target

        try:
            await wait_until(reached, timeout=timeout)
        except AssertionError:
            raise AssertionError(
                f"the sender got no {more} more 200s in {timeout} s: {self.stats.summary()}"
            ) from None


async def table_of(conn: asyncpg.Connection, shop: str) -> dict[int, Row]:
    rows = await conn.fetch(
        "SELECT customer_id, email, code, active_yn, created_at, updated_at, deleted_at"
        " FROM customers WHERE project_name = $1",
        shop,
    )
    return {r["customer_id"]: tuple(r.values())[1:] for r in rows}


async def assert_table_matches(
    database_url: str,
    oracle: Oracle,
    shop: str = "steady-shop",
    timeout: float = 15,  # noqa: ASYNC109
    logs: str = "",
) -> None:
    """The customers table becomes exactly the oracle: nothing missing, wrong, extra or twice."""
    want = oracle.expected()
    assert want, "the sender got no 200 at all"
    conn: asyncpg.Connection | None = None
    got: dict[int, Row] = {}
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(database_url, timeout=5)
                got = await table_of(conn, shop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn = None
            if got == want or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        assert conn is not None, "cannot read the database"
        duplicates = await conn.fetchval(
            "SELECT count(*) - count(DISTINCT (project_name, customer_id)) FROM customers"
        )
        rejected = await conn.fetchval("SELECT count(*) FROM rejected_records")
    finally:
        if conn is not None:
            await conn.close()
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(cid for cid in set(want) & set(got) if want[cid] != got[cid])
    detail = [(cid, want[cid], got[cid]) for cid in wrong[:3]]
    assert (missing, extra, wrong, duplicates, rejected) == ([], [], [], 0, 0), (
        f"table != oracle of the 200s: {len(missing)} missing {missing[:10]}, "
        f"{len(extra)} extra {extra[:10]}, {len(wrong)} wrong {detail}, "
        f"{duplicates} duplicates, {rejected} rejected records (of {len(want)} customers)"
        + (f"\n{logs}" if logs else "")
    )


async def assert_serving(*services: Proc) -> None:
    """Every process is alive and ready."""
    for proc in services:
        assert proc.alive(), f"{proc.module} exited:\n{proc.output()[-3000:]}"
        assert await http_status(f"{proc.url}/readyz", timeout=3) == 200, (
            f"{proc.module} is not ready:\n{proc.output()[-3000:]}"
        )


async def queue_depth(amqp_url: str, queue: str) -> int:
    """Messages in a queue right now (ready ones; unacked deliveries are not counted)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def queued_webhooks(amqp_url: str, queue: str) -> int:
    """Webhooks in a queue right now (a bundle counts its webhooks); all stay in the queue."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = 0
        while (message := await declared.get(no_ack=False, fail=False)) is not None:
            count += len(unpack(message))
        # Closing the channel without acking puts them all back.
    return count


async def dead_letters(amqp_url: str) -> list[tuple[dict[str, Any], bytes]]:
    """Peek at the dead-letter queue: (headers, body) of each message; all stay in the queue."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        found = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            found.append((dict(message.headers or {}), message.body))
        # Closing the channel without acking puts them all back.
    return found
