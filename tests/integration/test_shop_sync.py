"""`upgates-admin sync`: the table made equal to the shop's REST API (the stand-in, over HTTP).

The sync writes through the worker's own decoder, fold and transaction, so these tests read the
table the way a user would and compare it with what the API shows.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from admin.shop_commands import sync
from common.settings import Settings
from tests.support.load import post
from tests.support.processes import ROOT, env_for
from tests.support.upgates import PRAGUE, UpgatesStandIn
from tests.support.waiting import wait_until
from worker.service import Worker

SHOP = "my-shop"


@pytest.fixture
async def api() -> AsyncIterator[UpgatesStandIn]:
    """A stand-in for the shop's API, with a little latency so requests overlap."""
    standin = UpgatesStandIn(latency=0.005)
    await standin.start()
    yield standin
    await standin.close()


@pytest.fixture
def shop_settings(settings: Settings, api: UpgatesStandIn) -> Settings:
    return replace(settings, upgates_api=((SHOP, api.base_url),), sync_port=0)


def args(shop: str | None = SHOP, *, full: bool = False, every: float | None = None) -> Any:
    return argparse.Namespace(shop=shop, all=shop is None, full=full, every=every)


async def run_sync(
    settings: Settings, shop: str = SHOP, *, full: bool = False
) -> tuple[int, list[str]]:
    """Run `upgates-admin sync SHOP [--full]` in this process: (exit status, lines printed)."""
    lines: list[str] = []
    status = await sync(settings, args(shop, full=full), lines.append)
    return status, lines


@pytest.fixture
async def table(shop_settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Read the customers table (migrated by the first sync) as {customer_id: row}."""
    conns: list[asyncpg.Connection] = []

    async def read(shop: str = SHOP) -> dict[int, asyncpg.Record]:
        if not conns:
            conns.append(await asyncpg.connect(shop_settings.database_url))
        rows = await conns[0].fetch(
            "SELECT * FROM customers WHERE project_name = $1 ORDER BY customer_id", shop
        )
        return {r["customer_id"]: r for r in rows}

    yield read
    for conn in conns:
        await conn.close()


def as_api_shows(customer: dict[str, Any]) -> tuple[Any, ...]:
    login = customer["login"]
    return (
        login["email"],
        customer["code"],
        login["active_yn"],
        login["blocked_yn"],
        datetime.fromisoformat(customer["creation_time"]),
        datetime.fromisoformat(customer["last_update_time"]),
        None,
    )


def as_stored(row: asyncpg.Record) -> tuple[Any, ...]:
    return (
        row["email"],
        row["code"],
        row["active_yn"],
        row["blocked_yn"],
        row["created_at"],
        row["updated_at"],
        row["deleted_at"],
    )


def page_calls(api: UpgatesStandIn) -> list[dict[str, str]]:
    return [c.query for c in api.calls if c.path.endswith("/customers")]


async def test_initial_import_stores_every_customer_as_the_api_shows_it(
    shop_settings: Settings, api: UpgatesStandIn, table: Callable[..., Any]
) -> None:
    api.add_many(2_345, created=datetime(2024, 2, 29, 14, 24, 49, tzinfo=PRAGUE))
    api.update_customer(7, email="changed@example.cz", active=False, blocked=True)
    api.update_customer(8, code=None)

    status, lines = await run_sync(shop_settings)

    assert status == 0
    rows = await table()
    assert len(rows) == 2_345
    assert {cid: as_stored(r) for cid, r in rows.items()} == {
        cid: as_api_shows(c) for cid, c in api.customers.items()
    }
    assert lines == [
        f"{SHOP}: full sync complete: 24/24 pages, 2345 customers read, 2345 rows changed, "
        "0 tombstones, 24 API calls, quota left 9976/10000 this hour, 100000/100000 today"
    ]
    assert sorted(int(q["page"]) for q in page_calls(api)) == list(range(1, 25))
    assert api.max_concurrent_seen == 3  # the limit, and used


async def test_a_second_sync_is_incremental_and_finds_changes_in_a_few_calls(
    shop_settings: Settings, api: UpgatesStandIn, table: Callable[..., Any]
) -> None:
    long_ago = datetime.now(PRAGUE) - timedelta(days=30)
    api.add_many(3_000, created=long_ago)
    assert (await run_sync(shop_settings))[0] == 0
    api.calls.clear()
    api.update_customer(10, email="new-10@example.cz")
    api.update_customer(2_999, blocked=True)
    added = api.add_customer(code="NEW")

    status, lines = await run_sync(shop_settings)

    assert status == 0
    assert lines[0].startswith(f"{SHOP}: incremental sync complete: 1/1 pages, 3 customers read,")
    assert " 3 rows changed," in lines[0]
    assert len(api.calls) == 1
    since = datetime.fromisoformat(page_calls(api)[0]["last_update_time_from"])
    # From before the last sync began (the overlap), not from the beginning of time.
    assert timedelta(0) < datetime.now(UTC) - since < timedelta(minutes=10)
    rows = await table()
    assert rows[10]["email"] == "new-10@example.cz"
    assert rows[2_999]["blocked_yn"] is True
    assert as_stored(rows[added["customer_id"]]) == as_api_shows(added)


async def test_a_full_sync_tombstones_the_customers_the_shop_no_longer_has(
    shop_settings: Settings, api: UpgatesStandIn, table: Callable[..., Any]
) -> None:
    api.add_many(450)
    assert (await run_sync(shop_settings))[0] == 0
    for gone in (1, 200, 450):
        api.delete_customer(gone)

    status, lines = await run_sync(shop_settings, full=True)

    assert status == 0
    assert " 3 tombstones," in lines[0]
    rows = await table()
    assert len(rows) == 450  # a tombstone stays, so a late update cannot revive the customer
    for gone in (1, 200, 450):
        assert rows[gone]["deleted_at"] is not None
        assert rows[gone]["email"] is None  # personal data erased
    assert [cid for cid, r in rows.items() if r["deleted_at"] is None] == sorted(api.customers)
    # The absences were confirmed by asking for exactly those ids.
    assert {"ids": "1;200;450", "page": "1"} in page_calls(api)


async def test_a_customer_deleted_mid_scan_does_not_tombstone_its_shifted_neighbour(
    shop_settings: Settings, api: UpgatesStandIn, table: Callable[..., Any]
) -> None:
    api.add_many(500)
    assert (await run_sync(shop_settings))[0] == 0
    one_at_a_time = replace(shop_settings, api_concurrency=1)

    def delete_150_when_page_3_is_asked(page: int) -> None:
        if page == 3 and 150 in api.customers:
            api.delete_customer(150)  # 201 moves to page 2, which the scan has read already

    api.before_page = delete_150_when_page_3_is_asked
    status, lines = await run_sync(one_at_a_time, full=True)

    assert status == 0
    assert " 0 tombstones," in lines[0]  # 150 was read before it went; 201 was missed...
    assert {"ids": "201", "page": "1"} in page_calls(api)  # ... and found again by its id
    rows = await table()
    assert rows[201]["deleted_at"] is None
    assert rows[201]["email"] == "customer201@example.cz"

    status, lines = await run_sync(one_at_a_time, full=True)  # the next scan sees 150 gone

    assert " 1 tombstones," in lines[0]
    rows = await table()
    assert rows[150]["deleted_at"] is not None
    assert [cid for cid, r in rows.items() if r["deleted_at"] is None] == sorted(api.customers)


async def test_a_customer_that_arrives_by_webhook_during_a_scan_is_never_tombstoned(
    shop_settings: Settings,
    api: UpgatesStandIn,
    table: Callable[..., Any],
    receiver_url: str,
    worker: Worker,
    http: aiohttp.ClientSession,
) -> None:
    api.add_many(300)
    now = datetime.now(PRAGUE).isoformat(timespec="seconds")

    async def webhook_during_the_scan(page: int) -> None:
        if page == 2:
            # The shop's API lags behind its webhooks: customer 9000 is not listed yet.
            record = {"customer_id": 9000, "email": "fresh@example.cz", "creation_time": now}
            payload = {"project_name": SHOP, "customers": [record]}
            assert (await post(http, receiver_url, "create", payload))[0] == 200
            await wait_until(lambda: _has(table, 9000))

    api.before_page = webhook_during_the_scan
    status, lines = await run_sync(replace(shop_settings, api_concurrency=1))

    assert status == 0
    assert " 0 tombstones," in lines[0]
    rows = await table()
    assert rows[9000]["deleted_at"] is None
    assert rows[9000]["email"] == "fresh@example.cz"


async def _has(table: Callable[..., Any], customer_id: int) -> bool:
    return customer_id in await table()


async def test_an_interrupted_full_sync_resumes_where_it_stopped(
    shop_settings: Settings, api: UpgatesStandIn, table: Callable[..., Any]
) -> None:
    api.add_many(2_000)
    # Hour 100, day 100, a reserve of 20 each: 5 calls usable, the reserve left untouched.
    api.hour_limit, api.day_limit = 100, 100
    api.hour_remaining, api.day_remaining = 25, 20
    with_reserve = replace(shop_settings, api_concurrency=1)

    status, lines = await run_sync(with_reserve)

    assert status == 75
    assert lines == [
        f"{SHOP}: full sync stopped: 5/20 pages, 500 customers read, 500 rows changed, "
        "0 tombstones, 5 API calls, quota left 20/100 this hour, 20/100 today"
    ]
    assert len(await table()) == 500
    api.reset_quota()
    api.calls.clear()

    status, lines = await run_sync(with_reserve)

    assert status == 0
    assert [int(q["page"]) for q in page_calls(api)] == list(range(6, 21))
    assert lines[0].startswith(f"{SHOP}: full sync complete: 20/20 pages, 1500 customers read")
    rows = await table()
    assert len(rows) == 2_000
    assert all(r["deleted_at"] is None for r in rows.values())  # the first run's pages counted


async def test_a_429_pauses_every_request_until_its_retry_after(
    shop_settings: Settings, api: UpgatesStandIn, table: Callable[..., Any]
) -> None:
    api.add_many(1_000)
    retry_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    asked: list[float] = []
    api.before_page = lambda page: asked.append(time.time())
    api.inject(429, retry_after=retry_at)

    status, _ = await run_sync(shop_settings)

    assert status == 0
    assert len(await table()) == 1_000
    statuses = [c.status for c in api.calls]
    assert statuses.count(429) == 1
    # Once refused, nothing was asked before the time the API named.
    assert all(at >= retry_at.timestamp() - 0.05 for at in asked[1:])


async def test_a_sync_racing_live_webhooks_ends_in_the_same_table_as_either_order(
    settings: Settings,
    receiver_url: str,
    worker: Worker,
    http: aiohttp.ClientSession,
) -> None:
    # The same shop history in three shops: webhooks first, the sync first, both at once.
    base = datetime(2025, 3, 1, 10, 0, tzinfo=PRAGUE)
    shops = ["webhooks-first", "sync-first", "together"]
    apis = {shop: UpgatesStandIn(latency=0.002) for shop in shops}
    for standin in apis.values():
        await standin.start()
        standin.add_many(300, created=base)
        for cid in range(1, 301, 3):  # the API shows a later update than any webhook
            standin.update_customer(cid, at=base + timedelta(hours=2), email=f"api{cid}@x.cz")
        for cid in range(2, 301, 3):  # ... or an older state than a webhook brings
            standin.update_customer(cid, at=base + timedelta(minutes=30), active=False)
        standin.delete_customer(300)  # deleted: a delete webhook says when
    try:
        configured = replace(
            settings,
            upgates_api=tuple((shop, apis[shop].base_url) for shop in shops),
            sync_port=0,
        )

        def webhooks(shop: str) -> list[tuple[str, dict[str, Any]]]:
            def at(delta: timedelta) -> str:
                return (base + delta).isoformat()

            creates = [
                {"customer_id": cid, "email": f"customer{cid}@example.cz", "code": f"C{cid}",
                 "creation_time": at(timedelta(0)), "active_yn": True, "blocked_yn": False}
                for cid in range(1, 301)
            ]  # fmt: skip
            updates = [
                {"customer_id": cid, "email": f"hook{cid}@x.cz", "code": f"C{cid}",
                 "last_update_time": at(timedelta(hours=1))}
                for cid in range(1, 301)
            ]  # fmt: skip
            deletes = [{"customer_id": 300, "deletion_time": at(timedelta(hours=3))}]
            return [
                (event, {"project_name": shop, "customers": records})
                for event, records in (("create", creates), ("update", updates),
                                       ("delete", deletes))
            ]  # fmt: skip

        async def send(shop: str) -> None:
            for event, payload in webhooks(shop):
                assert (await post(http, receiver_url, event, payload))[0] == 200

        async def applied(shop: str) -> bool:
            row = await db.fetchrow(
                "SELECT deleted_at FROM customers WHERE project_name = $1 AND customer_id = 300",
                shop,
            )
            return row is not None and row["deleted_at"] is not None

        db = await asyncpg.connect(settings.database_url)
        try:
            await send("webhooks-first")
            await wait_until(lambda: applied("webhooks-first"))
            assert (await run_sync(configured, "webhooks-first"))[0] == 0

            assert (await run_sync(configured, "sync-first"))[0] == 0
            await send("sync-first")
            await wait_until(lambda: applied("sync-first"))

            status, _ = (await asyncio.gather(run_sync(configured, "together"), send("together")))[
                0
            ]
            assert status == 0
            await wait_until(lambda: applied("together"))

            tables = {}
            for shop in shops:
                rows = await db.fetch(
                    "SELECT customer_id, email, code, active_yn, blocked_yn, created_at,"
                    " updated_at, deleted_at FROM customers WHERE project_name = $1"
                    " ORDER BY customer_id",
                    shop,
                )
                tables[shop] = [tuple(r) for r in rows]
        finally:
            await db.close()
        assert tables["webhooks-first"] == tables["sync-first"] == tables["together"]
        by_id = {row[0]: row for row in tables["together"]}
        assert by_id[1][1] == "api1@x.cz"  # the API's later state won
        assert by_id[2][1] == "hook2@x.cz"  # the webhook's later data won...
        assert by_id[2][3] is False  # ... and the API's status, the newest that carried one
        assert by_id[300][1] is None  # the delete holds
        assert by_id[300][7] is not None
    finally:
        for standin in apis.values():
            await standin.close()


def run_admin(settings: Settings, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m admin ARGV` as a user runs it."""
    environment = env_for(
        settings,
        UPGATES_API=",".join(f"{shop}={url}" for shop, url in settings.upgates_api),
        SYNC_PORT="0",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "admin", *argv],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_wrong_credentials_end_the_sync_with_one_line_and_no_retry(
    shop_settings: Settings, api: UpgatesStandIn
) -> None:
    api.add_many(10)
    wrong = api.base_url.replace(":API-KEY@", ":WRONG-KEY@")

    result = await asyncio.to_thread(
        run_admin, replace(shop_settings, upgates_api=((SHOP, wrong),)), "sync", SHOP
    )

    assert result.returncode == 77
    assert result.stdout == ""
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"upgates-admin: the API of shop {SHOP} (http://api-login:***@")
    assert "refused its login and key (401)" in errors[0]
    assert "WRONG-KEY" not in result.stderr
    assert api.failed_logins == 1  # never retried: five an hour block the IP


async def test_an_unknown_shop_is_refused_with_one_line(shop_settings: Settings) -> None:
    result = await asyncio.to_thread(run_admin, shop_settings, "sync", "other-shop")

    assert result.returncode == 2
    assert result.stderr == (
        "upgates-admin: shop 'other-shop' is not in UPGATES_API (configured: my-shop)\n"
    )


async def test_an_unreachable_api_ends_with_one_line(shop_settings: Settings) -> None:
    closed = UpgatesStandIn()
    await closed.start()
    url = closed.base_url
    await closed.close()  # nothing listens there any more

    result = await asyncio.to_thread(
        run_admin, replace(shop_settings, upgates_api=((SHOP, url),)), "sync", SHOP
    )

    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert errors == [
        f"upgates-admin: shop {SHOP}: GET /customers: the API of shop {SHOP} at "
        f"{closed.url_without_credentials} did not answer (ClientConnectorError) after 5 attempts"
    ]


async def test_a_moved_shop_is_followed_and_the_operator_told(
    shop_settings: Settings, api: UpgatesStandIn, table: Callable[..., Any]
) -> None:
    old = UpgatesStandIn()
    await old.start()
    old.moved_to = api.url_without_credentials
    api.add_many(150)
    try:
        result = await asyncio.to_thread(
            run_admin, replace(shop_settings, upgates_api=((SHOP, old.base_url),)), "sync", SHOP
        )
    finally:
        await old.close()

    assert result.returncode == 0, result.stderr
    assert "full sync complete: 2/2 pages, 150 customers read" in result.stdout
    assert "the shop's API has moved: update its URL in UPGATES_API" in result.stdout
    assert api.url_without_credentials in result.stdout
    assert "API-KEY" not in result.stdout + result.stderr
    assert len(await table()) == 150


async def test_sigint_stops_a_sync_that_the_next_run_resumes(
    shop_settings: Settings, api: UpgatesStandIn, table: Callable[..., Any], tmp_path: Path
) -> None:
    api.add_many(3_000)
    api.latency = 0.2  # about 10 s for the whole scan
    configured = replace(shop_settings, api_concurrency=1)
    env = env_for(
        configured, UPGATES_API=f"{SHOP}={api.base_url}", SYNC_PORT="0", LOG_FORMAT="text"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "admin", "sync", SHOP,
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    await wait_until(lambda: _pages_read(api, 5), timeout=30)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)

    assert proc.returncode == 75, err.decode()
    assert "full sync stopped:" in out.decode()
    assert "stopped on request" in err.decode()
    assert "Traceback" not in err.decode()
    stored = len(await table())
    assert 500 <= stored < 3_000
    api.latency = 0.0
    api.calls.clear()

    status, lines = await run_sync(configured)

    assert status == 0
    assert int(page_calls(api)[0]["page"]) > 5  # resumed, not started over
    assert len(await table()) == 3_000
    assert lines[0].startswith(f"{SHOP}: full sync complete: 30/30 pages")


async def _pages_read(api: UpgatesStandIn, n: int) -> bool:
    return len(page_calls(api)) >= n


def test_the_progress_line_shows_pages_customers_and_quota(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from admin.shop_commands import TerminalProgress
    from shopapi.sync import Summary

    progress = TerminalProgress()
    progress(Summary(SHOP, "full", 3, 100, 300, quota="5/10 this hour, 90/100 today"))
    progress.close()

    assert capsys.readouterr().err == (
        f"\r{SHOP}: full sync, page 3/100, 300 customers, quota left 5/10 this hour, "
        "90/100 today\x1b[K\n"
    )
