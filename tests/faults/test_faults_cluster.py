"""A three-node RabbitMQ cluster under load: lose the queue's leader, get it back, stop another.

The services are given every node in AMQP_URL; the queue is a quorum queue replicated on all
three. A sender retries every non-200 like Upgates. In the end the table must equal the fold of
every event answered 200 (nothing lost), and no answer may have taken 1 s or more.
"""

from __future__ import annotations

import asyncio

import pytest

from common.topology import QUEUE
from tests.support.config import service_settings
from tests.support.load import Sender
from tests.support.oracle import assert_table_matches
from tests.support.processes import Procs, assert_serving
from tests.support.servers import PrivateCluster


async def members(cluster: PrivateCluster) -> str:
    node = next(n for n in cluster.nodes if n.process is not None and n.process.poll() is None)
    return await node.ctl("list_queues", "name", "members", "--no-table-headers")


@pytest.mark.fault
async def test_the_cluster_rides_a_killed_leader_its_return_and_another_node_stopping(
    private_cluster: PrivateCluster, database: str, procs: Procs
) -> None:
    cluster = private_cluster
    settings = service_settings(cluster.url, database)
    receiver = await procs.receiver(settings)
    worker = await procs.worker(settings)
    replicas = await members(cluster)
    assert all(node.node in replicas for node in cluster.nodes), replicas
    async with Sender(receiver.url) as sender:
        await sender.wait_ok(30)

        leader = await cluster.leader(QUEUE)
        cluster.kill(leader)  # kill -9: its connections drop, the queue elects a new leader
        await sender.wait_ok(60, timeout=60)
        assert (await cluster.leader(QUEUE)) is not leader

        await asyncio.to_thread(cluster.restart, leader)
        await sender.wait_ok(60, timeout=60)

        other = next(n for n in cluster.nodes if n is not leader)
        await other.stop_app()  # a graceful stop, as for maintenance
        try:
            await sender.wait_ok(60, timeout=60)
            await sender.stop()
        finally:
            await other.start_app()

    stats = sender.stats
    assert stats.ok > 0, stats.summary()
    # Upgates gives up after 1 s: every answer came before that, 503s included.
    assert max(stats.latencies) < 1.0, stats.summary()
    assert stats.errors["timeout"] == 0, stats.summary()
    await assert_table_matches(database, sender.oracle, logs=procs.logs())
    await assert_serving(receiver, worker)
