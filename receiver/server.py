"""Where the receiver meets the network: the webhook port with its limits, /metrics on its own.

aiohttp's defaults suit a service behind a proxy that keeps limits of its own. This port faces
Upgates and the Internet (only TLS is the proxy's), so a connection must send its first request
head within HEADER_READ_TIMEOUT (slowloris) and an idle kept-alive one is closed after
KEEPALIVE_TIMEOUT (aiohttp's default is an hour). A request aiohttp cannot parse is answered in
our own words: aiohttp's answer and log line quote the raw request line or header, token and all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from common.metrics import create_metrics_app
from common.settings import Settings
from receiver.app import METRICS, create_app, error

log = logging.getLogger(__name__)

# Once the listener is closed, how long a connection accepted just before has to send its
# request before it is closed unanswered (see running).
ACCEPTED_GRACE = 0.25
# Then, how long the requests in flight have to finish their publish and answer.
SHUTDOWN_TIMEOUT = 5.0
BACKLOG = 128  # as aiohttp's TCPSite
END_OF_HEAD = b"\r\n\r\n"  # aiohttp's parser takes no bare LF line ends
ERROR_WORDS = {400: "malformed HTTP request", 500: "internal error", 504: "timed out"}


class Connection(web.RequestHandler):
    """aiohttp's handler of one connection, with a deadline for its first request head and
    error answers of our own.

    The deadline covers the first request: on a kept-alive connection the next head must be
    whole within KEEPALIVE_TIMEOUT of the previous answer (aiohttp closes a connection still
    waiting for a whole request then, however much of one came), so a slow sender there holds
    no more than an idle one does.

    aiohttp offers no public way to plug in either. RequestHandler is exported; this overrides
    only the asyncio protocol methods and handle_error, which aiohttp calls for a request it
    cannot parse or whose handler raised. tests/integration/test_receiver_hardening.py fails if
    that changes.
    """

    __slots__ = ("__deadline", "__head_timeout", "__tail")

    def __init__(self, manager: web.Server, settings: Settings) -> None:
        # No access log: it would print ?token=...; receive_webhook logs a line per request.
        options: dict[str, Any] = {
            "access_log": None,
            "keepalive_timeout": settings.keepalive_timeout,
        }
        super().__init__(manager, loop=asyncio.get_running_loop(), **options)
        self.__head_timeout = settings.header_read_timeout
        self.__deadline: asyncio.TimerHandle | None = None
        self.__tail = b""  # the last bytes so far: the end of the head may span two reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the clock for the first request head."""
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self.__deadline = loop.call_later(self.__head_timeout, self.__head_too_late)

    def data_received(self, data: bytes) -> None:
        """Stop the clock once the first head is whole; aiohttp parses as ever."""
        if self.__deadline is not None:
            if END_OF_HEAD in data or END_OF_HEAD in self.__tail + data[:3]:
                self.__deadline.cancel()
                self.__deadline = None
            else:
                self.__tail = (self.__tail + data)[-3:]
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the clock with the connection."""
        if self.__deadline is not None:
            self.__deadline.cancel()
            self.__deadline = None
        super().connection_lost(exc)

    def __head_too_late(self) -> None:
        self.__deadline = None
        log.debug("closed a connection that sent no whole request head in time")
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON answer in our own words; aiohttp's text quotes the raw request, token and all."""
        if status >= 500:
            log.error("request failed", exc_info=exc, extra={"status": status})
        else:  # the exception's text quotes the request: its kind is enough
            why = type(exc).__name__ if exc is not None else None
            log.info("malformed request", extra={"status": status, "why": why})
        if request.writer.output_size > 0:
            # As aiohttp does: part of an answer is out, no other can follow it.
            raise ConnectionError("an answer had begun; the connection is dropped")
        response = error(status, ERROR_WORDS.get(status, "request refused"))
        response.force_close()
        return response


async def listen(runner: web.AppRunner, settings: Settings) -> asyncio.Server:
    """Accept webhook connections on RECEIVER_HOST:RECEIVER_PORT, each a Connection."""
    server = runner.server
    if server is None:
        raise RuntimeError("set the runner up first")
    loop = asyncio.get_running_loop()
    # reuse_port: RECEIVER_PROCESSES receivers share the port, and a new receiver can start
    # while the old one finishes its requests.
    return await loop.create_server(
        lambda: Connection(server, settings),
        settings.receiver_host,
        settings.receiver_port,
        reuse_port=True,
        backlog=BACKLOG,
    )


@contextlib.asynccontextmanager
async def metrics_served(settings: Settings, registry: CollectorRegistry) -> AsyncIterator[None]:
    """/metrics on RECEIVER_METRICS_HOST:RECEIVER_METRICS_PORT (nothing when the port is 0)."""
    if not settings.receiver_metrics_port:
        yield
        return
    runner = web.AppRunner(create_metrics_app(registry), access_log=None)
    await runner.setup()
    try:
        # reuse_port, as on the webhook port: a new receiver starts while the old one drains.
        site = web.TCPSite(
            runner,
            settings.receiver_metrics_host,
            settings.receiver_metrics_port,
            reuse_port=True,
        )
        await site.start()
        yield
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[web.Application]:
    """The receiver serving until the block ends; then it stops listening and answers what it
    had accepted.

    aiohttp closes every connection with no request read yet as soon as its runner is cleaned
    up, and a connection the kernel handed over a moment before the listener closed, its request
    still in the socket, would be closed unanswered. ACCEPTED_GRACE lets such a request be read.
    """
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        async with metrics_served(settings, app[METRICS].registry):
            listener = await listen(runner, settings)
            try:
                yield app
            finally:
                listener.close()
                await asyncio.sleep(ACCEPTED_GRACE)
    finally:
        await runner.cleanup()  # closes idle connections, waits for the requests in flight
