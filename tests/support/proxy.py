"""A small asyncio TCP proxy for fault tests, in the spirit of toxiproxy (not installable here).

Put it between the code under test and RabbitMQ or Postgres, then switch it while traffic flows:

- ``pass``: forward bytes both ways;
- ``delay``: forward every chunk ``seconds`` late (order kept, chunks pipelined);
- ``blackhole``: accept connections, read and discard everything, never forward. A real TCP
  stream never loses bytes in the middle: a connection that lost bytes in the blackhole is reset
  (RST) when the blackhole ends, as a partition that outlived the peers' TCP would leave it.
  Connections made during the blackhole never reach the server;
- ``reset``: close every connection with RST (SO_LINGER 0), current ones at once, new ones on
  accept.

``cut()`` resets all current connections without changing the mode. ``hold_when(predicate)``
stops one direction of the first connection whose next chunk matches, until ``release()``: a
test uses it to act at an exact point of a protocol (for example, after Postgres committed but
before the worker heard about it).

``start_proxy`` starts one into the ``proxies`` fixture's list (closed after the test);
``with_port`` and ``port_of`` point a server's URL at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Literal

Mode = Literal["pass", "delay", "blackhole", "reset"]
# "up": client -> server; "down": server -> client.
Direction = Literal["up", "down"]
Predicate = Callable[[Direction, bytes], bool]
CHUNK = 65536


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST instead of FIN: SO_LINGER on with a zero timeout, then abort."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    """Listens on 127.0.0.1:<port> and forwards to upstream_host:upstream_port."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.bytes = {"up": 0, "down": 0}  # forwarded
        self.discarded = 0
        self.connections = 0  # accepted in total
        self.held = asyncio.Event()
        self._release = asyncio.Event()
        self._hold: Predicate | None = None
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        links = list(self._links)
        if self._server is not None:
            self._server.close()
        self.cut()
        self._release.set()
        if links:
            await asyncio.wait(
                [asyncio.create_task(link.finished.wait()) for link in links], timeout=5
            )
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Proxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def active(self) -> int:
        """Connections currently open."""
        return len(self._links)

    def set_mode(self, mode: Mode, delay: float = 0.0) -> None:
        """Switch the mode; applies to the chunks read from now on, on every connection."""
        leaving_blackhole = self.mode == "blackhole" and mode != "blackhole"
        self.mode, self.delay = mode, delay
        if mode == "reset":
            self.cut()
        elif leaving_blackhole:
            for link in list(self._links):
                if link.tainted:
                    link.reset()

    def passthrough(self) -> None:
        self.set_mode("pass")

    def slow(self, seconds: float) -> None:
        self.set_mode("delay", seconds)

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def reset(self) -> None:
        self.set_mode("reset")

    def cut(self) -> None:
        """Reset (RST) every connection open now; the mode stays."""
        for link in list(self._links):
            link.reset()

    def hold_when(self, predicate: Predicate) -> None:
        """Stop the first direction whose next chunk matches, until release(); sets `held`."""
        self.held.clear()
        self._release.clear()
        self._hold = predicate

    def release(self) -> None:
        """Let held bytes go (connections reset meanwhile stay reset)."""
        self._hold = None
        self._release.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(self, reader, writer)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)

    async def _gate(self, direction: Direction, data: bytes) -> None:
        """Called before each chunk is written on; waits while a hold is on this chunk."""
        hold = self._hold
        if hold is not None and hold(direction, data):
            self._hold = None
            self.held.set()
            await self._release.wait()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(
        self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client = (reader, writer)
        self.server: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.tainted = False  # lost bytes to a blackhole: the stream cannot go on
        self.tasks: list[asyncio.Task[None]] = []
        self.finished = asyncio.Event()

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client[1], *([self.server[1]] if self.server else [])]

    def reset(self) -> None:
        for writer in self.writers():
            _reset(writer)
        for task in self.tasks:
            task.cancel()

    def close(self) -> None:
        """A normal close (FIN) of both sides, after what is buffered."""
        for writer in self.writers():
            writer.close()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def run(self) -> None:
        proxy = self.proxy
        reader, writer = self.client
        try:
            if proxy.mode == "reset":
                self.reset()
                return
            if proxy.mode == "blackhole":
                self.tainted = True
                self.tasks.append(asyncio.create_task(self._discard(reader)))
            else:
                try:
                    self.server = await asyncio.wait_for(
                        asyncio.open_connection(*proxy.upstream), 5
                    )
                except (OSError, TimeoutError):
                    self.reset()  # the client sees a reset, as from a refused connection
                    return
                self.tasks.append(asyncio.create_task(self._pump(reader, self.server[1], "up")))
                self.tasks.append(asyncio.create_task(self._pump(self.server[0], writer, "down")))
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            for task in self.tasks:
                task.cancel()
            for stream in self.writers():
                if not stream.transport.is_closing():
                    stream.transport.abort()
            self.finished.set()

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                self.proxy.discarded += len(data)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction
    ) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer, direction))
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    break
                if not data:
                    break
                if proxy.mode == "blackhole":
                    self.tainted = True
                    proxy.discarded += len(data)
                    continue
                if proxy.mode == "reset":
                    self.reset()
                    return
                due = loop.time() + (proxy.delay if proxy.mode == "delay" else 0.0)
                queue.put_nowait((due, data))
            queue.put_nowait(None)
            await sender  # what was read before the end still goes out
        finally:
            sender.cancel()
        # One side closed: close the other (neither protocol here uses half-closed streams).
        self.close()

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            await self.proxy._gate(direction, data)
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                return
            self.proxy.bytes[direction] += len(data)


async def start_proxy(proxies: list[Proxy], host: str, port: int) -> Proxy:
    """A started proxy to host:port, added to `proxies` (the fixture's list, closed after)."""
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
    """The port of an amqp:// or postgresql:// URL."""
    hostpath = url.split("://", 1)[1].rpartition("@")[2]
    return int(hostpath.partition("/")[0].rsplit(":", 1)[1])
