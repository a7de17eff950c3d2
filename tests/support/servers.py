"""Private servers for the tests that stop, restart or alarm one, and the shared node's CLI.

Other people run tests against the shared RabbitMQ and Postgres at the same time, so the tests
that stop, restart or alarm a server start their own (tests/conftest.py's fixtures, session-scoped,
in a temporary directory, on free ports), and so does scripts/soak.py:

- ``PrivateRabbit``: a RabbitMQ node of its own; ``PrivateCluster``: three of them in a cluster.
- ``PrivatePostgres``: a Postgres cluster of its own.
- ``rabbitmqctl``: the shared local node's command line; ``run``: any command, without blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika

from common.topology import DEAD_EXCHANGE, DEAD_QUEUE, EXCHANGE, QUEUE
from tests.support.processes import free_port

RABBIT_BIN = Path(os.environ.get("TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def pg_bin() -> Path:
    """Where Postgres's server programs are (initdb, pg_ctl): TEST_PG_BIN, else the newest."""
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


async def rabbitmqctl(*args: str) -> None:
    """`rabbitmqctl ARGS...` against the shared local node (vhosts, policies)."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode()[-500:]}")


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


def private_dir(prefix: str) -> Path:
    """A new directory for a private server's files."""
    # In /tmp, world-traversable: pytest's own tmp dirs are 0700 and Postgres runs as `postgres`.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


# --- a private Postgres cluster -------------------------------------------------------------


class PrivatePostgres:
    """A Postgres cluster of the tests' own: `pg_ctl -m immediate` touches nobody else."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.bin = pg_bin()
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


# --- a private three-node RabbitMQ cluster --------------------------------------------------


class PrivateCluster:
    """Three RabbitMQ nodes in one cluster, for the cluster fault tests and the soak.

    Three `PrivateRabbit` nodes with one Erlang cookie; the second and third join the first. Each
    node listens on its own AMQP port; `url` names all three, comma-separated, as an operator
    writes AMQP_URL for a cluster.
    """

    def __init__(self, base: Path, size: int = 3) -> None:
        cookie = secrets.token_hex(16)
        self.nodes: list[PrivateRabbit] = []
        for i in range(size):
            home = base / f"node{i + 1}"
            home.mkdir()
            cookie_file = home / ".erlang.cookie"
            cookie_file.write_text(cookie)
            cookie_file.chmod(0o400)
            self.nodes.append(PrivateRabbit(home))

    @property
    def url(self) -> str:
        """AMQP_URL naming every node."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.ctl_sync("stop_app")
            node.ctl_sync("join_cluster", first.node)
            node.ctl_sync("start_app")
            node.ctl_sync("await_startup")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def kill(self, node: PrivateRabbit) -> None:
        """kill -9 the node's whole process group (beam and its helpers)."""
        assert node.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait()

    def restart(self, node: PrivateRabbit) -> None:
        """Start a node that was killed or stopped; it rejoins the cluster by itself."""
        node.start()

    async def leader(self, queue: str, vhost: str = "/") -> PrivateRabbit:
        """The node that leads a quorum queue."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            out = await node.ctl("list_queues", "-p", vhost, "name", "leader", "--no-table-headers")
            for line in out.splitlines():
                name, _, leader = line.partition("\t")
                if name == queue:
                    return next(n for n in self.nodes if n.node == leader.strip())
        raise RuntimeError(f"no leader found for {queue}")
