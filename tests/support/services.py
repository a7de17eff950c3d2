"""The project's programs inside the test's own process, and their metrics read from outside.

- ``serve``: a real receiver on a port of its own; ``consuming``: whether a worker started as a
  task consumes yet; ``admin``: the operator command.
- ``scraped``: a metric summed over a service's /metrics, read as a scraper reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from admin.commands import build_parser
from common.settings import Settings
from receiver.app import create_app
from tests.support.waiting import wait_until
from worker.service import Worker


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


async def consuming(worker: Worker, task: asyncio.Task[None]) -> bool:
    """Whether the worker running as `task` consumes; what stopped the task, if it stopped."""
    if task.done():
        task.result()  # raise what stopped it
    return worker.consuming


async def admin(settings: Settings, *argv: str) -> tuple[int, str]:
    """Run `upgates-admin ARGV...` against the test's settings; (exit status, output)."""
    lines: list[str] = []
    args = build_parser().parse_args(list(argv))
    status = await args.command(settings, args, lines.append)
    return status, "\n".join(lines)


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
