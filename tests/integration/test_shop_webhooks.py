"""`upgates-admin webhooks register|list|remove` and the sync service's webhook check."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from admin.shop_commands import webhooks_list, webhooks_register, webhooks_remove
from common.settings import Settings
from shopapi import webhooks
from shopapi.schema import Webhook
from tests.support.config import TOKEN
from tests.support.processes import env_for, exit_code, free_port, kill, spawn
from tests.support.upgates import PRAGUE, UpgatesStandIn
from tests.support.waiting import wait_until

SHOP = "my-shop"
PUBLIC = "https://ingest.example.com"


@pytest.fixture
async def api() -> AsyncIterator[UpgatesStandIn]:
    standin = UpgatesStandIn()
    await standin.start()
    yield standin
    await standin.close()


@pytest.fixture
def shop_settings(settings: Settings, api: UpgatesStandIn) -> Settings:
    assert settings.webhook_tokens == (TOKEN,)
    return replace(settings, upgates_api=((SHOP, api.base_url),), sync_port=0)


async def run(command: Any, settings: Settings, **options: Any) -> tuple[int, list[str]]:
    lines: list[str] = []
    status = await command(settings, argparse.Namespace(shop=SHOP, **options), lines.append)
    return status, lines


def ours(api: UpgatesStandIn) -> dict[str, tuple[str, bool]]:
    return {w["event"]: (w["url"], w["active_yn"]) for w in api.webhooks.values()}


def url(event: str, token: str = TOKEN) -> str:
    return f"{PUBLIC}/webhooks/customers/{event}?token={token}"


async def test_register_creates_one_active_webhook_per_event_and_a_second_run_changes_nothing(
    shop_settings: Settings, api: UpgatesStandIn
) -> None:
    status, lines = await run(webhooks_register, shop_settings, url=PUBLIC)

    assert status == 0
    assert ours(api) == {
        "Customers.create": (url("create"), True),
        "Customers.update": (url("update"), True),
        "Customers.delete": (url("delete"), True),
    }
    assert lines == [
        f"created  #1 Customers.create -> {PUBLIC}/webhooks/customers/create?token=***",
        f"created  #2 Customers.update -> {PUBLIC}/webhooks/customers/update?token=***",
        f"created  #3 Customers.delete -> {PUBLIC}/webhooks/customers/delete?token=***",
        f"{SHOP}: 3 change(s); its 3 customer webhooks point at {PUBLIC}",
    ]
    calls = len(api.calls)

    status, lines = await run(webhooks_register, shop_settings, url=PUBLIC)

    assert status == 0
    assert lines == [f"{SHOP}: 0 change(s); its 3 customer webhooks point at {PUBLIC}"]
    assert len(api.calls) == calls + 1  # one look, no change
    assert len(api.webhooks) == 3


async def test_register_repairs_ours_and_leaves_other_webhooks_alone(
    shop_settings: Settings, api: UpgatesStandIn
) -> None:
    old_token = api.add_webhook("Customers.create", url("create", "old-token"))
    off = api.add_webhook("Customers.update", url("update"), active=False)
    twin_a = api.add_webhook("Customers.delete", url("delete"))
    twin_b = api.add_webhook("Customers.delete", f"{PUBLIC}/webhooks/customers/delete")
    elsewhere = api.add_webhook("Customers.create", "https://crm.example.org/hook?token=theirs")
    orders = api.add_webhook("Orders.create", f"{PUBLIC}/webhooks/orders")

    status, lines = await run(webhooks_register, shop_settings, url=PUBLIC)

    assert status == 0
    assert lines == [
        f"repaired #{old_token['id']} Customers.create (wrong URL or token) -> "
        f"{PUBLIC}/webhooks/customers/create?token=***",
        f"repaired #{off['id']} Customers.update (deactivated) -> "
        f"{PUBLIC}/webhooks/customers/update?token=***",
        f"removed  #{twin_b['id']} Customers.delete (duplicate)",
        f"{SHOP}: 3 change(s); its 3 customer webhooks point at {PUBLIC}",
    ]
    assert api.webhooks[old_token["id"]]["url"] == url("create")
    assert api.webhooks[off["id"]]["active_yn"] is True
    assert twin_a["id"] in api.webhooks
    assert twin_b["id"] not in api.webhooks
    # Not ours: another host, another entity.
    assert api.webhooks[elsewhere["id"]]["url"] == "https://crm.example.org/hook?token=theirs"
    assert orders["id"] in api.webhooks
    assert TOKEN not in "\n".join(lines)


async def test_register_uses_the_shops_own_token(
    shop_settings: Settings, api: UpgatesStandIn
) -> None:
    bound = replace(shop_settings, shop_tokens=((SHOP, "shop-secret"),))

    assert (await run(webhooks_register, bound, url=PUBLIC))[0] == 0

    assert {u for u, _ in ours(api).values()} == {
        url(event, "shop-secret") for event in ("create", "update", "delete")
    }


async def test_list_shows_every_webhook_with_tokens_masked(
    shop_settings: Settings, api: UpgatesStandIn
) -> None:
    hook = api.add_webhook("Customers.create", url("create"))
    api.record_delivery(hook["id"], 200, datetime(2025, 1, 2, 3, 4, 5, tzinfo=PRAGUE))
    api.record_delivery(hook["id"], 503, datetime(2025, 1, 2, 3, 9, 5, tzinfo=PRAGUE))
    other = api.add_webhook("Orders.update", "https://user:pw@erp.example.org/x", active=False)

    status, lines = await run(webhooks_list, shop_settings)

    assert status == 0
    assert lines == [
        f"#{hook['id']:<6} {'Customers.create':<22} {'active':<8} "
        f"{PUBLIC}/webhooks/customers/create?token=***  "
        "last success: 2025-01-02T03:04:05+01:00 (200)  "
        "last error: 2025-01-02T03:09:05+01:00 (503)",
        f"#{other['id']:<6} {'Orders.update':<22} {'INACTIVE':<8} "
        "https://user:***@erp.example.org/x  last success: never  last error: never",
        f"{SHOP}: 2 webhook(s)",
    ]


async def test_remove_removes_only_ours_and_is_idempotent(
    shop_settings: Settings, api: UpgatesStandIn
) -> None:
    await run(webhooks_register, shop_settings, url=PUBLIC)
    elsewhere = api.add_webhook("Customers.create", "https://crm.example.org/hook")

    status, lines = await run(webhooks_remove, shop_settings, url=PUBLIC)

    assert status == 0
    assert len(lines) == 4
    assert lines[-1] == f"{SHOP}: removed 3 webhook(s) pointing at {PUBLIC}"
    assert list(api.webhooks) == [elsewhere["id"]]

    status, lines = await run(webhooks_remove, shop_settings, url=PUBLIC)

    assert status == 0
    assert lines == [f"{SHOP}: removed 0 webhook(s) pointing at {PUBLIC}"]
    assert list(api.webhooks) == [elsewhere["id"]]


def test_ours_are_recognised_by_scheme_host_and_path_whatever_the_credentials() -> None:
    assert webhooks.is_ours("https://ingest.example.com/webhooks/customers/create?token=x", PUBLIC)
    assert webhooks.is_ours("https://u:p@ingest.example.com/webhooks/customers/x", PUBLIC)
    assert webhooks.is_ours("https://INGEST.example.com/webhooks/customers/x", PUBLIC)
    assert not webhooks.is_ours("http://ingest.example.com/webhooks/customers/x", PUBLIC)
    assert not webhooks.is_ours("https://ingest.example.com.evil/webhooks/customers", PUBLIC)
    assert not webhooks.is_ours("https://ingest.example.com/a", f"{PUBLIC}/b")
    assert webhooks.is_ours("https://ingest.example.com/b/webhooks/customers/x", f"{PUBLIC}/b")


def test_the_plan_keeps_the_best_of_duplicates() -> None:
    existing = [
        Webhook(9, "Customers.create", url("create"), active_yn=False),
        Webhook(4, "Customers.create", url("create", "old")),
        Webhook(7, "Customers.create", url("create")),
    ]
    actions = webhooks.plan(existing, PUBLIC, TOKEN)

    assert [(a.kind, a.event, a.webhook_id) for a in actions] == [
        ("delete", "create", 9),
        ("delete", "create", 4),
        ("create", "update", None),
        ("create", "delete", None),
    ]


async def test_the_sync_service_switches_a_deactivated_webhook_back_on_and_stops_on_sigterm(
    shop_settings: Settings, api: UpgatesStandIn, tmp_path: Path
) -> None:
    api.add_many(120)
    created = datetime.now(PRAGUE) - timedelta(days=1)
    hooks = {
        event: api.add_webhook(f"Customers.{event}", url(event))
        for event in ("create", "update", "delete")
    }
    api.record_delivery(hooks["update"]["id"], 200, created)
    api.record_delivery(hooks["update"]["id"], 500, created + timedelta(hours=1))
    api.deactivate(hooks["update"]["id"])
    port = free_port()
    log = tmp_path / "sync.log"
    env = env_for(
        shop_settings,
        UPGATES_API=f"{SHOP}={api.base_url}",
        PUBLIC_BASE_URL=PUBLIC,
        SYNC_HOST="127.0.0.1",
        SYNC_PORT=str(port),
    )
    proc = spawn("admin", "sync", "--all", "--every", "3600", env=env, log=log)
    try:
        await wait_until(lambda: _logged(log, "full sync complete"), timeout=30)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            metrics = await response.text()
        proc.send_signal(signal.SIGTERM)
        status = await exit_code(proc, within=20)
    finally:
        kill(proc)

    assert status == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    deactivated = [r for r in records if r["msg"].startswith("Upgates deactivated our webhook")]
    assert [(r["level"], r["event"], r["webhook_id"]) for r in deactivated] == [
        ("error", "Customers.update", hooks["update"]["id"])
    ]
    assert api.webhooks[hooks["update"]["id"]]["active_yn"] is True
    assert f'upgates_webhook_deactivations_total{{event="update",shop="{SHOP}"}} 1.0' in metrics
    assert f'upgates_webhook_active{{event="update",shop="{SHOP}"}} 1.0' in metrics
    assert f'upgates_api_calls_total{{shop="{SHOP}",status="200"}}' in metrics
    assert f'upgates_api_quota_remaining{{shop="{SHOP}",window="hour"}}' in metrics
    assert f'upgates_sync_last_success_timestamp_seconds{{shop="{SHOP}"}}' in metrics
    assert "API-KEY" not in log.read_text()
    assert TOKEN not in log.read_text()


async def _logged(path: Path, text: str) -> bool:
    return text in await asyncio.to_thread(path.read_text)


async def test_a_round_after_a_webhook_failed_reads_back_to_its_last_success(
    shop_settings: Settings, api: UpgatesStandIn
) -> None:
    from shopapi.client import shop_access
    from shopapi.service import SyncMetrics, database, sync_round

    api.add_many(50)
    configured = replace(shop_settings, public_base_url=PUBLIC)
    hooks = [api.add_webhook(f"Customers.{e}", url(e)) for e in ("create", "update", "delete")]
    stop = asyncio.Event()
    async with database(configured) as pool:
        access = shop_access(configured, SHOP)
        first = await sync_round(configured, access, pool, SyncMetrics(), stop)
        assert first.complete
        last_success = datetime.now(PRAGUE).replace(microsecond=0) - timedelta(hours=5)
        api.record_delivery(hooks[1]["id"], 200, last_success)
        api.record_delivery(hooks[1]["id"], 504, last_success + timedelta(minutes=5))
        api.calls.clear()

        second = await sync_round(configured, access, pool, SyncMetrics(), stop)

    assert second.complete
    assert second.kind == "incremental"
    [page] = [c.query for c in api.calls if c.path.endswith("/customers")]
    since = datetime.fromisoformat(page["last_update_time_from"])
    assert since == last_success - timedelta(seconds=configured.sync_overlap)
