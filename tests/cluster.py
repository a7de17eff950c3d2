"""A private three-node RabbitMQ cluster on this machine, for the cluster fault tests and soak.

Three `PrivateRabbit` nodes (tests/servers.py) with one Erlang cookie; the second and third join
the first. Each node listens on its own AMQP port; `url` names all three, comma-separated, as an
operator writes AMQP_URL for a cluster.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import RABBIT_BIN, PrivateRabbit, _private_dir


class PrivateCluster:
    """Three RabbitMQ nodes in one cluster."""

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


@pytest.fixture(scope="session")
def private_cluster() -> Iterator[PrivateCluster]:
    """A three-node cluster for the whole session (it takes a while to form)."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.skip(f"no RabbitMQ server in {RABBIT_BIN}")
    base = _private_dir("upgates-cluster-")
    cluster = PrivateCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
