"""`upgates-admin sync --all --every SECONDS`: every shop of UPGATES_API, round after round.

Each round, per shop: check the webhooks (one of ours that Upgates deactivated is logged at
ERROR, counted, and switched back on; the read then covers the gap since its last success),
then an incremental sync (or the first full one, or the rest of an interrupted one).
A shop whose credentials are refused is not tried again until a restart: five failed logins
an hour block the IP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from datetime import datetime

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from common.metrics import metrics_response
from common.settings import Settings
from shopapi import webhooks
from shopapi.client import ApiError, AuthFailed, Client, Quota, ShopAccess, shop_access
from shopapi.sync import Progress, Summary, sync_shop
from worker.fold import PRAGUE
from worker.store import ensure_database, migrate, open_pool

log = logging.getLogger(__name__)


class SyncMetrics:
    """The sync's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "upgates_api_calls", "REST API calls, by shop and HTTP status", ["shop", "status"],
            registry=r,
        )  # fmt: skip
        self.quota = Gauge(
            "upgates_api_quota_remaining", "Calls left in the shop's quota, by window",
            ["shop", "window"], registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            "upgates_sync_last_success_timestamp_seconds", "When the shop's last sync completed",
            ["shop"], registry=r,
        )  # fmt: skip
        self.webhook_active = Gauge(
            "upgates_webhook_active",
            "1 while our webhook for the event is active; 0 when deactivated or missing",
            ["shop", "event"], registry=r,
        )  # fmt: skip
        self.deactivations = Counter(
            "upgates_webhook_deactivations", "Our webhooks found deactivated by Upgates",
            ["shop", "event"], registry=r,
        )  # fmt: skip
        self.customers = Counter(
            "upgates_sync_customers_read", "Customers read from the API", ["shop"], registry=r
        )
        self.changed = Counter(
            "upgates_sync_rows_changed", "Rows a sync changed", ["shop"], registry=r
        )
        self.tombstones = Counter(
            "upgates_sync_tombstones", "Customers the API no longer has", ["shop"], registry=r
        )
        self.failures = Counter(
            "upgates_sync_failures", "Sync rounds that failed", ["shop"], registry=r
        )

    def on_call(self, shop: str, status: str, quota: Quota) -> None:
        """Count an API call and keep the quota gauges current."""
        self.calls.labels(shop, status).inc()
        if quota.hour_remaining is not None:
            self.quota.labels(shop, "hour").set(quota.hour_remaining)
        if quota.day_remaining is not None:
            self.quota.labels(shop, "day").set(quota.day_remaining)

    def record(self, summary: Summary) -> None:
        """Count what a sync did."""
        self.customers.labels(summary.shop).inc(summary.customers)
        self.changed.labels(summary.shop).inc(summary.changed)
        self.tombstones.labels(summary.shop).inc(summary.tombstones)
        if summary.complete:
            self.last_success.labels(summary.shop).set(time.time())
        elif summary.exit_status not in (0, 75):
            self.failures.labels(summary.shop).inc()


def token_for(settings: Settings, shop: str) -> str:
    """The token the shop's webhooks carry: its SHOP_TOKENS token, else the first
    WEBHOOK_TOKEN."""
    for name, token in settings.shop_tokens:
        if name == shop:
            return token
    if settings.webhook_tokens:
        return settings.webhook_tokens[0]
    raise ApiError(f"no token for shop {shop}: set WEBHOOK_TOKEN or SHOP_TOKENS")


def new_client(
    settings: Settings,
    access: ShopAccess,
    metrics: SyncMetrics | None = None,
    stop: asyncio.Event | None = None,
) -> Client:
    """A client with the configured manners."""
    return Client(
        access,
        concurrency=settings.api_concurrency,
        reserve=settings.api_reserve,
        max_wait=settings.api_max_wait,
        on_call=metrics.on_call if metrics is not None else None,
        stop=stop,
    )


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool for sync_shop, the schema migrated first (as a worker does at start)."""
    try:
        await ensure_database(settings.database_url)
        conn = await asyncpg.connect(settings.database_url, timeout=10)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        pool = await open_pool(
            settings.database_url,
            min_size=1,
            max_size=settings.api_concurrency + 2,
            timeout=10,
            command_timeout=60,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ApiError(f"cannot reach Postgres: {type(exc).__name__}") from None
    try:
        yield pool
    finally:
        await pool.close()


async def check_webhooks(
    client: Client, settings: Settings, metrics: SyncMetrics
) -> datetime | None:
    """Check and repair our webhooks; the last success of any that was failing, if any."""
    shop = client.access.shop
    existing = await webhooks.list_webhooks(client)
    base = settings.public_base_url
    since: datetime | None = None
    for event, name in webhooks.EVENTS.items():
        ours = [w for w in existing if w.event == name and webhooks.is_ours(w.url, base)]
        metrics.webhook_active.labels(shop, event).set(int(any(w.active_yn for w in ours)))
        for webhook in ours:
            succeeded, failed = _time(webhook.last_success_call), _time(webhook.last_error_call)
            failing = not webhook.active_yn or (
                failed is not None and (succeeded is None or succeeded < failed)
            )
            if not webhook.active_yn:
                metrics.deactivations.labels(shop, event).inc()
                log.error(
                    "Upgates deactivated our webhook; switching it back on",
                    extra={
                        "shop": shop,
                        "event": name,
                        "webhook_id": webhook.id,
                        "last_error_status": webhook.last_error_call_status,
                    },
                )
            if failing and succeeded is not None:
                since = succeeded if since is None else min(since, succeeded)
    # Repairs only: a missing webhook may have been removed on purpose (`webhooks remove`).
    token = token_for(settings, shop)
    repairs = [a for a in webhooks.plan(existing, base, token) if a.kind == "update"]
    for line in await webhooks.apply(client, repairs, base, token):
        log.info("webhook repaired", extra={"shop": shop, "change": line})
    for action in repairs:
        metrics.webhook_active.labels(shop, action.event).set(1)
    return since


def _time(text: str | None) -> datetime | None:
    """A time of the API (ISO 8601; without an offset, Prague time), or None."""
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=PRAGUE)


async def sync_round(
    settings: Settings,
    access: ShopAccess,
    pool: asyncpg.Pool,
    metrics: SyncMetrics,
    stop: asyncio.Event,
    *,
    full: bool = False,
    progress: Progress | None = None,
    check: bool = True,
) -> Summary:
    """One shop's round: its webhooks checked (`check`, with PUBLIC_BASE_URL set), then a
    sync."""
    async with new_client(settings, access, metrics, stop) as client:
        since = None
        if check and settings.public_base_url:
            try:
                since = await check_webhooks(client, settings, metrics)
            except AuthFailed as exc:
                summary = Summary(access.shop, stopped=str(exc), exit_status=exc.exit_status)
                metrics.record(summary)
                return summary
            except ApiError as exc:
                log.error(
                    "checking the webhooks failed", extra={"shop": access.shop, "error": str(exc)}
                )
        summary = await sync_shop(
            client,
            pool,
            full=full,
            overlap=settings.sync_overlap,
            since=since,
            concurrency=settings.api_concurrency,
            progress=progress,
        )
    metrics.record(summary)
    return summary


async def run_forever(
    settings: Settings,
    every: float,
    stop: asyncio.Event,
    *,
    full: bool = False,
    on_summary: Callable[[Summary], None] | None = None,
) -> None:
    """Sync every shop, then wait `every` seconds, until `stop` is set."""
    metrics = SyncMetrics()
    runner = await _serve_health(settings, metrics)
    refused: set[str] = set()
    try:
        async with database(settings) as pool:
            if not settings.upgates_api:
                # Idle rather than exit: the compose file runs this service for every install.
                log.warning("UPGATES_API names no shop: nothing to sync")
            elif not settings.public_base_url:
                log.warning("PUBLIC_BASE_URL is not set: the webhooks are not checked")
            while not stop.is_set():
                for shop, _ in settings.upgates_api:
                    if stop.is_set() or shop in refused:
                        continue
                    summary = await sync_round(
                        settings, shop_access(settings, shop), pool, metrics, stop, full=full
                    )
                    _log(summary)
                    if on_summary is not None:
                        on_summary(summary)
                    if summary.exit_status == AuthFailed.exit_status:
                        refused.add(shop)
                full = False  # --full applies to the first round
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=every)
    finally:
        if runner is not None:
            await runner.cleanup()


def _log(summary: Summary) -> None:
    if summary.complete:
        log.info(summary.line(), extra={"shop": summary.shop})
    elif summary.exit_status == 75:
        log.warning(f"{summary.line()}; {summary.stopped}", extra={"shop": summary.shop})
    else:
        log.error(f"sync failed: {summary.stopped}", extra={"shop": summary.shop})


async def _serve_health(settings: Settings, metrics: SyncMetrics) -> web.AppRunner | None:
    if not settings.sync_port:
        return None

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_page(request: web.Request) -> web.Response:
        return metrics_response(metrics.registry)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.sync_host, settings.sync_port).start()
    except OSError:
        log.warning(
            "sync port in use: serving no health endpoint", extra={"port": settings.sync_port}
        )
        await runner.cleanup()
        return None
    return runner
