"""A lean HTTP/1.1 keep-alive client: the load generator shares two cores with everything it
measures, so it does as little as it can (about a tenth of aiohttp's client work per request).

It only ever talks to 127.0.0.1 and each request has a deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

LOCALHOST = "127.0.0.1"


class Closed(ConnectionError):
    """The server closed the connection before answering."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else None])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        waiter.set_result((status, body, b"\r\nconnection: close" in head))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Closed("connection closed before the answer"))


@dataclass
class Connection:
    """One keep-alive connection to the receiver; reconnects when the server closed it."""

    port: int
    token: str
    _protocol: _Protocol | None = field(default=None, repr=False)

    async def post(
        self,
        path: str,
        body: bytes,
        timeout: float,  # noqa: ASYNC109 - a per-request deadline, part of the request
    ) -> tuple[int, bytes]:
        """POST one webhook (token in the query string, as Upgates does); (status, body)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            loop = asyncio.get_running_loop()
            transport, protocol = await loop.create_connection(_Protocol, LOCALHOST, self.port)
            protocol.transport = transport  # uvloop calls connection_made a moment later
            self._protocol = protocol
        assert protocol.transport is not None
        waiter: asyncio.Future[tuple[int, bytes, bool]] = asyncio.get_running_loop().create_future()
        protocol.waiter = waiter
        head = (
            f"POST {path}?token={self.token} HTTP/1.1\r\nHost: {LOCALHOST}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        protocol.transport.writelines((head, body))  # one system call (writev), no copy
        try:
            async with asyncio.timeout(timeout):
                status, answer, close = await waiter
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, answer

    def close(self) -> None:
        """Drop the connection."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


@dataclass
class Sample:
    """One answered (or failed) webhook."""

    started: float
    latency: float
    status: int  # 0: no answer (connection error or our deadline)
    records: int


async def timed_post(
    connection: Connection,
    path: str,
    body: bytes,
    records: int,
    timeout: float,  # noqa: ASYNC109 - a per-request deadline
) -> Sample:
    """POST and measure as the sender sees it: from writing the request to the whole answer."""
    started = time.perf_counter()
    try:
        status, _ = await connection.post(path, body, timeout)
    except (OSError, TimeoutError):
        status = 0
    return Sample(started, time.perf_counter() - started, status, records)
