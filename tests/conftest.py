"""Fixtures: every test gets its own RabbitMQ vhost and Postgres database, removed afterwards.

The services are the real local ones (see .ci/run); nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from common.settings import Settings
from receiver.app import create_app
from worker.service import Worker

PG_ADMIN = os.environ.get("TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
TOKEN = "test-token-not-secret"
ROOT = Path(__file__).resolve().parent.parent


async def _rabbitmqctl(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode()[-500:]}")


@pytest.fixture
async def vhost() -> AsyncIterator[str]:
    """A fresh RabbitMQ vhost (the topology is declared in it by the code under test)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    await _rabbitmqctl("add_vhost", name)
    await _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    await _rabbitmqctl("delete_vhost", name)


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh, empty Postgres database; its DSN."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture
def settings(vhost: str, database: str) -> Settings:
    """Settings for one isolated test run."""
    return Settings(
        amqp_url=f"{AMQP_BASE}/{vhost}",
        database_url=database,
        webhook_tokens=(TOKEN,),
        receiver_host="127.0.0.1",
        receiver_port=free_port(),
        worker_host="127.0.0.1",
        worker_port=0,
        receiver_metrics_port=0,
        batch_max_wait=0.01,
        retry_max_backoff=0.5,
        shutdown_grace=5.0,
    )


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
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


async def wait_until(
    check: Callable[[], Awaitable[Any]],
    timeout: float = 20.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    interval: float = 0.05,
) -> Any:
    """Poll `check` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {result!r})")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def serve(settings: Settings, *, ready: bool = True) -> AsyncIterator[str]:
    """A real receiver in this process on its own port; waits for /readyz 200 unless told not."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.receiver_host, settings.receiver_port).start()
        url = f"http://{settings.receiver_host}:{settings.receiver_port}"
        if ready:
            async with aiohttp.ClientSession() as session:

                async def is_ready() -> bool:
                    async with session.get(f"{url}/readyz") as response:
                        return response.status == 200

                await wait_until(is_ready)
        yield url
    finally:
        await asyncio.wait_for(runner.cleanup(), 10)


@pytest.fixture
async def receiver_url(settings: Settings) -> AsyncIterator[str]:
    """A real receiver connected to the test vhost, ready to publish."""
    async with serve(settings) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker running in this process; stopped (and drained) at the end of the test."""
    instance = Worker(settings)
    task = asyncio.create_task(instance.run())
    await wait_until(lambda: _consuming(instance, task))
    yield instance
    instance.stop()
    await asyncio.wait_for(task, 30)


async def _consuming(worker: Worker, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # raise what stopped it
    return worker.consuming


@pytest.fixture
async def db(settings: Settings, worker: Worker) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, once the worker has migrated it."""
    conn = await asyncpg.connect(settings.database_url)
    yield conn
    await conn.close()


async def post(
    http: aiohttp.ClientSession,
    base_url: str,
    event: str,
    payload: Any,
    token: str | None = TOKEN,
) -> tuple[int, Any]:
    """POST a webhook as Upgates does (token in the query string); (status, JSON body)."""
    params = {"token": token} if token is not None else {}
    body = payload if isinstance(payload, bytes) else None
    async with http.post(
        f"{base_url}/webhooks/customers/{event}",
        params=params,
        data=body,
        json=None if body is not None else payload,
    ) as response:
        return response.status, await response.json(content_type=None)


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes `python -m receiver`/`worker` use these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
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


@pytest.fixture
def spawn(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `python -m receiver` or `python -m worker` as a real process; killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(module: str, **extra: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{module}-{len(procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module],
                env=env_for(settings, **extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


async def connect_migrated(settings: Settings) -> asyncpg.Connection | None:
    """A connection to the test database once a worker has created the schema, else None."""
    try:
        conn = await asyncpg.connect(settings.database_url)
    except (OSError, asyncpg.PostgresError):
        return None
    if await conn.fetchval("SELECT to_regclass('customers') IS NOT NULL"):
        return conn
    await conn.close()
    return None


async def count_at_least(db: asyncpg.Connection, n: int) -> bool:
    """Whether the customers table has at least n rows."""
    return bool(await db.fetchval("SELECT count(*) FROM customers") >= n)


async def scraped(url: str, metric: str) -> float:
    """The sum of a metric's samples on `url`/metrics, read on a new connection each time, as a
    scraper reads it (with several processes on one port, each may reach another)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh,
        fresh.get(f"{url}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric
    )
