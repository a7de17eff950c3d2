"""Fixtures: every test gets its own RabbitMQ vhost and Postgres database, removed afterwards.

The services are the real local ones (see .ci/run); nothing here is mocked. A fixture connects
to a server only when a test asks for it: tests/unit runs with no server at all. The helpers
the fixtures are made of, and the tests' other helpers, are in tests/support.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

# Before the imports below: the helpers' asserts get pytest's messages (and no warning).
pytest.register_assert_rewrite("tests.support")

from common.settings import Settings  # noqa: E402
from tests.support import processes  # noqa: E402
from tests.support.config import AMQP_BASE, PG_ADMIN, TOKEN  # noqa: E402
from tests.support.processes import Procs, env_for, free_port  # noqa: E402
from tests.support.proxy import Proxy  # noqa: E402
from tests.support.servers import (  # noqa: E402
    RABBIT_BIN,
    PrivateCluster,
    PrivatePostgres,
    PrivateRabbit,
    pg_bin,
    private_dir,
    rabbitmqctl,
)
from tests.support.services import consuming, serve  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402
from worker.service import Worker  # noqa: E402

# --- the shared local servers ---------------------------------------------------------------


@pytest.fixture
async def vhost() -> AsyncIterator[str]:
    """A fresh RabbitMQ vhost (the topology is declared in it by the code under test)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    await rabbitmqctl("add_vhost", name)
    await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    await rabbitmqctl("delete_vhost", name)


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


# --- the services in this process, and as processes -----------------------------------------


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
    await wait_until(lambda: consuming(instance, task))
    yield instance
    instance.stop()
    await asyncio.wait_for(task, 30)


@pytest.fixture
async def db(settings: Settings, worker: Worker) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, once the worker has migrated it."""
    conn = await asyncpg.connect(settings.database_url)
    yield conn
    await conn.close()


@pytest.fixture
def spawn(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `python -m receiver` or `python -m worker` as a real process; killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(module: str, **extra: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{module}-{len(procs)}.log"
        proc = processes.spawn(module, env=env_for(settings, **extra), log=log)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        processes.kill(proc)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Spawned receivers and workers, killed after the test."""
    spawned = Procs(tmp_path)
    yield spawned
    spawned.kill_all()


@pytest.fixture
async def proxies() -> AsyncIterator[list[Proxy]]:
    """Append started proxies here (or use `start_proxy`); they are closed after the test."""
    started: list[Proxy] = []
    yield started
    for proxy in started:
        await proxy.close()


# --- private servers, for the tests that stop, restart or alarm one ------------------------


@pytest.fixture(scope="session")
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A private RabbitMQ node for the whole session."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.skip(f"no RabbitMQ server in {RABBIT_BIN} (set TEST_RABBITMQ_BIN)")
    base = private_dir("upgates-rabbit-")
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


@pytest.fixture(scope="session")
def private_cluster() -> Iterator[PrivateCluster]:
    """A three-node cluster for the whole session (it takes a while to form)."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.skip(f"no RabbitMQ server in {RABBIT_BIN}")
    base = private_dir("upgates-cluster-")
    cluster = PrivateCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private Postgres cluster for the whole session."""
    if not (pg_bin() / "initdb").exists():
        pytest.skip("no Postgres server binaries (set TEST_PG_BIN)")
    base = private_dir("upgates-pg-")
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
