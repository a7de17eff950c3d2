"""The design most people write first, for comparison only: upsert, COMMIT, then answer 200.

Same decoding, folding and SQL as the real worker (worker/fold.py, worker/store.py), so the only
difference measured is where the work happens: inside the sender's 1-second window.

`python -m bench.naive` with DATABASE_URL, WEBHOOK_TOKEN, RECEIVER_PORT (127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import msgspec
from aiohttp import web

from common import schema
from worker.fold import decode_payload, fold, micros
from worker.store import RejectedFrom, open_pool, write_batch

POOL = web.AppKey("pool", asyncpg.Pool)
TOKEN = web.AppKey("token", str)


async def receive(request: web.Request) -> web.Response:
    """Decode, fold and upsert the payload, and only then answer."""
    event = request.match_info["event"]
    if event not in schema.EVENTS:
        return web.json_response({"error": "unknown event"}, status=404)
    given = request.query.get("token", "").encode()
    if not hmac.compare_digest(given, request.app[TOKEN].encode()):
        return web.json_response({"error": "missing or wrong token"}, status=401)
    body = await request.read()
    try:
        project, rows, rejected = decode_payload(event, body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return web.json_response({"error": "not an envelope"}, status=422)
    now = micros(datetime.now(UTC))
    request_id = f"naive-{time.time_ns()}"
    await write_batch(
        request.app[POOL],
        fold(rows),
        [RejectedFrom(project, now, request_id, r) for r in rejected],
    )
    return web.json_response({"accepted": len(rows) + len(rejected)})


async def ready(request: web.Request) -> web.Response:
    """Ready once the pool is open."""
    return web.json_response({"status": "ready"})


async def _pool(app: web.Application) -> AsyncIterator[None]:
    # asyncpg's default pool size (10): what a first version would use.
    async with open_pool(os.environ["DATABASE_URL"]) as pool:
        app[POOL] = pool
        yield


def create_app() -> web.Application:
    """The naive receiver."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[TOKEN] = os.environ["WEBHOOK_TOKEN"]
    app.cleanup_ctx.append(_pool)
    app.router.add_post("/webhooks/customers/{event}", receive)
    app.router.add_get("/readyz", ready)
    return app


def main() -> None:
    """Serve on 127.0.0.1:RECEIVER_PORT until SIGTERM."""
    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop  # the same event loop as the receiver when available

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    web.run_app(
        create_app(),
        host="127.0.0.1",
        port=int(os.environ["RECEIVER_PORT"]),
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
