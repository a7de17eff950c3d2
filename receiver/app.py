"""The HTTP receiver: check the token and the envelope, publish the raw body, answer 200.

Upgates waits 1 second and may count a timed-out call as delivered, so nothing here waits on
anything slower than the broker's confirm, and that wait has a deadline (PUBLISH_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import nullcontext
from typing import Any

import msgspec
from aiohttp import hdrs, web

from common import schema
from common.message import COMPRESS_FROM_BYTES, Webhook
from common.settings import Settings
from receiver.limits import BodyBudget, Turns
from receiver.metrics import ReceiverMetrics
from receiver.publisher import NotStored, Publisher

log = logging.getLogger(__name__)


SETTINGS = web.AppKey("settings", Settings)
PUBLISHER = web.AppKey("publisher", Publisher)
METRICS = web.AppKey("metrics", ReceiverMetrics)
IN_FLIGHT = web.AppKey("in_flight", list[int])  # one mutable counter
BUDGET = web.AppKey("budget", BodyBudget)
TURNS = web.AppKey("turns", Turns)


class ErrorResponse(web.Response):
    """A JSON error body, and what went wrong in a few words for the request's log line."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None) -> None:
        super().__init__(
            body=schema.json_encoder.encode(body),
            status=status,
            headers=headers,
            content_type="application/json",
        )
        self.why = str(body.get("detail") or body["error"])


def error(
    status: int, message: str, detail: str | None = None, headers: dict[str, str] | None = None
) -> ErrorResponse:
    """A JSON error body; `detail` comes from our own checks or msgspec, never from the payload."""
    body: dict[str, Any] = {"error": message}
    if detail:
        body["detail"] = detail
    return ErrorResponse(status, body, headers)


def token_of(request: web.Request) -> str | None:
    """The token from `?token=` or from the password of HTTP Basic auth."""
    token = request.query.get("token")
    if token is not None:
        return token
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, _, password = decoded.partition(":")
    return password


# What a token grants: any shop, one shop, or nothing.
ANY_SHOP = ""


def authorize(settings: Settings, token: str | None) -> str | None:
    """ANY_SHOP for a shared token, the shop's name for a shop token, None for no match.

    Every configured token is compared, in constant time, whatever matched first: the time taken
    says nothing about which token, or how much of one, was right.
    """
    if not settings.webhook_tokens and not settings.shop_tokens:
        return ANY_SHOP if settings.allow_no_token else None
    given = (token or "").encode()
    granted: str | None = None
    for candidate in settings.webhook_tokens:
        if hmac.compare_digest(given, candidate.encode()):
            granted = ANY_SHOP
    for shop, candidate in settings.shop_tokens:
        if hmac.compare_digest(given, candidate.encode()) and granted is None:
            granted = shop
    return granted if token is not None else None


async def receive_webhook(request: web.Request) -> web.Response:
    """POST /webhooks/customers/{event}: the whole hot path, from request to confirmed publish."""
    started = time.perf_counter()
    event = request.match_info["event"]
    if event not in schema.EVENTS:
        return error(404, "unknown event", f"use one of: {', '.join(schema.EVENTS)}")
    app = request.app
    metrics = app[METRICS]
    try:
        response, project, records = await _handle(request, event)
    except ConnectionError:
        # The sender hung up mid-request: no one reads an answer, but it gets a line and a count
        # (499, as nginx calls it) like every other outcome.
        response, project, records = error(499, "the sender closed the connection"), None, 0
    except Exception:
        log.exception("webhook failed")
        response, project, records = error(500, "internal error"), None, 0
    took = time.perf_counter() - started
    metrics.requests.labels(event, str(response.status)).inc()
    metrics.request_seconds.labels(event).observe(took)
    log.info(
        "webhook",
        extra={
            "event": event,
            "shop": project,
            "records": records,
            "status": response.status,
            "took_ms": round(took * 1000, 1),
            "request_id": response.headers.get("X-Request-Id"),
            "why": response.why if isinstance(response, ErrorResponse) else None,
        },
    )
    return response


async def _handle(request: web.Request, event: str) -> tuple[web.Response, str | None, int]:
    """Everything that can refuse a request before its body is read, then the body.

    Only a shop token's 403 has to wait for the body: SHOP_TOKENS binds a token to one
    project_name, which only the body carries. A token that is no one's is refused here.
    """
    app = request.app
    settings = app[SETTINGS]
    granted = authorize(settings, token_of(request))
    if granted is None:
        return (
            error(
                401,
                "missing or wrong token",
                headers={"WWW-Authenticate": 'Basic realm="upgates-ingest"'},
            ),
            None,
            0,
        )
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        return error(413, "body too large", f"limit is {settings.max_body_bytes} bytes"), None, 0

    in_flight = app[IN_FLIGHT]
    if in_flight[0] >= settings.max_in_flight:
        # Queueing past the sender's timeout would turn into silent loss; a 503 is retried.
        return _unavailable(settings, "too many requests at once"), None, 0
    size = _body_size_to_reserve(request, settings)
    budget = app[BUDGET]
    if not budget.reserve(size):
        return _unavailable(settings, "too many body bytes in flight"), None, 0
    in_flight[0] += 1
    try:
        await _invite_body(request)
        return await _read_and_publish(request, settings, event, granted)
    finally:
        in_flight[0] -= 1
        budget.release(size)


def _body_size_to_reserve(request: web.Request, settings: Settings) -> int:
    if request.content_length is not None:
        return request.content_length
    # Chunked: no size announced, so the most it may be.
    return settings.max_body_bytes if request.body_exists else 0


async def defer_continue(request: web.Request) -> web.StreamResponse | None:
    """The route's Expect handler: no `100 Continue` yet; the request is checked first.

    aiohttp's own sends it before the handler runs, so that a client waiting for it sends a
    body that a wrong token, a size over the limit or a full receiver then has us read for
    nothing. _invite_body sends it once those checks have passed.
    """
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version >= (1, 1) and expect.lower() != "100-continue":
        return error(417, "unsupported Expect header", "only 100-continue is understood")
    return None


async def _invite_body(request: web.Request) -> None:
    if request.version >= (1, 1) and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # As aiohttp's own Expect handler does: the response proper has not begun.
        request.writer.output_size = 0


async def _read_and_publish(
    request: web.Request, settings: Settings, event: str, granted: str
) -> tuple[web.Response, str | None, int]:
    # A small body comes whole with the headers: nothing to wait for, so no timer to set and
    # cancel, which is a noticeable share of the receiver's work on everyday webhooks.
    arrived = request.content.is_eof()
    try:
        async with nullcontext() if arrived else asyncio.timeout(settings.body_read_timeout):
            body = await _read_body(request, settings.max_body_bytes)
    except TimeoutError:
        return error(408, "body not received in time"), None, 0
    except web.HTTPRequestEntityTooLarge:
        return error(413, "body too large", f"limit is {settings.max_body_bytes} bytes"), None, 0

    if len(body) >= COMPRESS_FROM_BYTES:
        # Its turn covers the check below and the compression in Publisher._send: nothing
        # between them waits.
        await request.app[TURNS].take()
    try:
        envelope = schema.envelope_decoder.decode(body)
    except msgspec.ValidationError as exc:
        detail = schema.explain(exc, body)
        return error(422, "not an Upgates customers envelope", detail), None, 0
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return error(400, "malformed JSON", schema.explain(exc, body)), None, 0
    project = envelope.project_name
    if granted not in (ANY_SHOP, project):
        return error(403, "this token is for another shop"), None, 0
    if "\x00" in project or not _encodable(project):
        return error(422, "project_name cannot be stored", "NUL byte or invalid text"), None, 0

    records = len(envelope.customers)
    if records == 0:
        return web.json_response({"accepted": 0}), project, 0

    request_id = os.urandom(16).hex()  # as random as uuid4().hex, and cheaper
    webhook = Webhook(event, project, records, int(time.time() * 1000), request_id, body)
    metrics = request.app[METRICS]
    publish_started = time.perf_counter()
    try:
        await request.app[PUBLISHER].publish(webhook)
    except NotStored as exc:
        return _unavailable(settings, str(exc)), project, records
    finally:
        metrics.publish_seconds.observe(time.perf_counter() - publish_started)
    metrics.records.labels(event).inc(records)
    metrics.bytes.inc(len(body))
    return (
        web.Response(
            body=schema.json_encoder.encode({"accepted": records, "request_id": request_id}),
            content_type="application/json",
            headers={"X-Request-Id": request_id},
        ),
        project,
        records,
    )


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, copied once: `request.read()` grows a bytearray and copies it again, a large
    share of the receiver's memory traffic on a full payload.

    Not `iter_chunks()`, which would spare `iter_any()`'s join of the pieces that came in since
    the last read: aiohttp gives every request without a body one shared stream, which reports
    its end only once, and the next empty POST looped forever without yielding the loop
    (aio-libs/aiohttp#11397)."""
    chunks = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:  # chunked: no Content-Length to judge by before reading
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates from "\ud800" escapes
        return False
    return True


def _unavailable(settings: Settings, why: str) -> web.Response:
    return error(
        503, "not stored, retry later", why, {"Retry-After": str(settings.retry_after_seconds)}
    )


async def healthz(request: web.Request) -> web.Response:
    """Alive while the process runs."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready only while a publish could be confirmed."""
    if await request.app[PUBLISHER].can_publish():
        return web.json_response({"status": "ready"})
    reason = "broker blocks publishers" if request.app[PUBLISHER].ready else "no broker connection"
    return web.json_response({"status": "not ready", "reason": reason}, status=503)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (unknown path, wrong method) as JSON like ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}  # 405 needs it
        return error(exc.status, exc.reason, headers=kept or None)


async def _publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start()
    yield
    await publisher.close()
    log.info("receiver stopped")


def create_app(settings: Settings) -> web.Application:
    """The receiver application; the publisher connects in the background once it starts."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])
    app[SETTINGS] = settings
    app[PUBLISHER] = Publisher(settings)
    app[METRICS] = ReceiverMetrics()
    app[IN_FLIGHT] = [0]
    app[BUDGET] = BodyBudget(settings.max_body_bytes_in_flight)
    app[TURNS] = Turns()
    app.cleanup_ctx.append(_publisher_ctx)
    app.router.add_post(
        "/webhooks/customers/{event}", receive_webhook, expect_handler=defer_continue
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # /metrics is not here: the Internet reaches this port (receiver/server.py serves it).
    return app
