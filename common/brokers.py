"""Where RabbitMQ is: AMQP_URL may name several nodes of one cluster, comma-separated.

Every service connects through `connect`, which tries the nodes in turn and returns the first
connection that opens: a node that is down costs one failed connect, not the service. Each
node's URL keeps its own host and port; credentials, vhost and options are the same for all.
"""

from __future__ import annotations

import logging

import aio_pika
from aio_pika.abc import AbstractConnection

log = logging.getLogger(__name__)

# Seconds between heartbeats: a broker that stops answering (a dead link, not a closed one) is
# noticed within a few of these instead of aio-pika's default of a minute or more.
HEARTBEAT = 5
CONNECT_TIMEOUT = 5.0


def node_urls(amqp_url: str) -> list[str]:
    """The URL of each node, with a short heartbeat unless the URL sets one."""
    urls = [part.strip() for part in amqp_url.split(",") if part.strip()]
    return [
        url if "heartbeat=" in url else f"{url}{'&' if '?' in url else '?'}heartbeat={HEARTBEAT}"
        for url in urls
    ]


class Nodes:
    """The nodes of AMQP_URL, tried in turn: after a node failed, the next one comes first."""

    def __init__(self, amqp_url: str) -> None:
        self.urls = node_urls(amqp_url)
        if not self.urls:
            raise ValueError("AMQP_URL names no broker")
        self._next = 0

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> AbstractConnection:  # noqa: ASYNC109 - aio-pika's own connect timeout
        """A connection to the first node that accepts one; the last node's error if none."""
        error: BaseException | None = None
        for offset in range(len(self.urls)):
            index = (self._next + offset) % len(self.urls)
            try:
                connection = await aio_pika.connect(self.urls[index], timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - any failure: try the next node
                error = exc
                log.warning(
                    "broker node unreachable",
                    extra={"node": index + 1, "error": type(exc).__name__},
                )
                continue
            # A service that loses this node starts with the next one: a node that comes back
            # late is not hammered first.
            self._next = (index + 1) % len(self.urls)
            return connection
        assert error is not None
        raise error
