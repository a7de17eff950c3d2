"""The Upgates stand-in behaves as the API v2 documentation says (tests/support/upgates.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import aiohttp
import pytest
from yarl import URL

from tests.support.upgates import EVENTS, PRAGUE, UpgatesStandIn


@pytest.fixture
async def api():
    standin = UpgatesStandIn()
    await standin.start()
    yield standin
    await standin.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http, url, **kwargs):
    async with http.get(url, allow_redirects=False, **kwargs) as response:
        return response.status, response.headers, await response.json()


async def test_credentials_and_blocking_after_five_failed_logins(api, http):
    status, _, body = await get(http, f"{api.url_without_credentials}/customers")
    assert status == 401
    assert body == {
        "messages": [{"object": "", "property": "", "message": "Unauthorized", "level": "error"}]
    }
    wrong = {"Authorization": aiohttp.encode_basic_auth(api.login, "wrong")}
    for _ in range(4):
        status, _, _ = await get(http, f"{api.url_without_credentials}/customers", headers=wrong)
        assert status == 401
    assert api.failed_logins == 5
    status, _, body = await get(http, f"{api.base_url}/customers")
    assert status == 403
    assert body["messages"][0]["level"] == "error"
    assert [c.status for c in api.calls] == [401] * 5 + [403]
    assert api.hour_remaining == api.hour_limit  # refused logins cost nothing


async def test_pages_of_100_in_id_order_with_api_shape(api, http):
    api.add_many(250, start_id=11)
    seen = []
    for page in (1, 2, 3):
        status, headers, body = await get(http, f"{api.base_url}/customers?page={page}")
        assert status == 200
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        assert body["current_page"] == page
        assert body["number_of_pages"] == 3
        assert body["number_of_items"] == 250
        assert body["current_page_items"] == len(body["customers"]) == (100 if page < 3 else 50)
        seen += [c["customer_id"] for c in body["customers"]]
    assert seen == list(range(11, 261))
    assert headers["X-Rate-Limit-Hour-Remaining"] == str(api.hour_limit - 3)
    assert headers["X-Rate-Limit-Total-Remaining"] == str(api.hour_limit - 3 + api.day_limit)

    status, _, body = await get(http, f"{api.base_url}/customers?page=4")
    assert (status, body["customers"], body["number_of_pages"]) == (200, [], 3)

    customer = api.customers[11]
    assert "email" not in customer
    assert "active_yn" not in customer
    assert customer["login"] == {
        "active_yn": True,
        "blocked_yn": False,
        "email": customer["login"]["email"],
    }
    assert customer["pricelist"] == "Základní"
    assert customer["addresses"]["billing"]["country_id"] == "CZ"
    assert datetime.fromisoformat(customer["creation_time"]).utcoffset() in (
        timedelta(hours=1),
        timedelta(hours=2),
    )
    _, _, body = await get(http, f"{api.base_url}/customers")  # page defaults to 1
    assert body["current_page"] == 1
    assert body["customers"][0] == customer


async def test_empty_shop_has_zero_pages(api, http):
    status, _, body = await get(http, f"{api.base_url}/customers")
    assert status == 200
    assert body == {
        "current_page": 1,
        "current_page_items": 0,
        "number_of_pages": 0,
        "number_of_items": 0,
        "customers": [],
    }


async def test_time_filters_are_inclusive_and_need_an_encoded_plus(api, http):
    base = datetime(2024, 2, 29, 14, 24, 49, tzinfo=PRAGUE)
    api.add_customer(1, created=base - timedelta(seconds=1))
    api.add_customer(2, created=base)
    api.update_customer(1, at=base + timedelta(hours=1), email="new@example.cz")
    assert api.customers[2]["creation_time"] == "2024-02-29T14:24:49+01:00"

    url = f"{api.base_url}/customers"
    _, _, body = await get(http, url, params={"creation_time_from": "2024-02-29T14:24:49+01:00"})
    assert [c["customer_id"] for c in body["customers"]] == [2]
    assert api.calls[-1].query == {"creation_time_from": "2024-02-29T14:24:49+01:00"}
    _, _, body = await get(http, url, params={"last_update_time_from": "2024-02-29T13:24:50Z"})
    assert [c["customer_id"] for c in body["customers"]] == [1]
    assert body["customers"][0]["login"]["email"] == "new@example.cz"

    raw = URL(f"{url}?last_update_time_from=2024-02-29T14:24:49+01:00", encoded=True)
    status, _, body = await get(http, raw)
    assert status == 400
    assert body["messages"][0]["property"] == "last_update_time_from"
    status, _, _ = await get(http, url, params={"creation_time_from": "yesterday"})
    assert status == 400


async def test_other_filters(api, http):
    api.add_customer(1, email="a@example.cz", code="A")
    api.add_customer(2, email="b@example.cz", active=False)
    api.add_customer(3, email="c@example.cz", blocked=True)
    url = f"{api.base_url}/customers"

    async def ids(**params):
        status, _, body = await get(http, url, params=params)
        assert status == 200, body
        return [c["customer_id"] for c in body["customers"]]

    assert await ids(ids="3;1") == [1, 3]
    assert await ids(customer_id="2") == [2]
    assert await ids(code="A") == [1]
    assert await ids(email="c@example.cz") == [3]
    assert await ids(active_yn="0") == [2]
    assert await ids(blocked_yn="true") == [3]
    for bad in ({"active_yn": "maybe"}, {"ids": "1;x"}, {"page": "0"}, {"customer_id": "one"}):
        status, _, body = await get(http, url, params=bad)
        assert status == 400, bad
        assert body["messages"], bad


async def test_before_page_sees_deletions_mid_scan(api, http):
    api.add_many(150)

    async def delete_first_on_page_2(page):
        if page == 2:
            api.delete_customer(1)

    api.before_page = delete_first_on_page_2
    _, _, first = await get(http, f"{api.base_url}/customers?page=1")
    _, _, second = await get(http, f"{api.base_url}/customers?page=2")
    assert first["customers"][-1]["customer_id"] == 100
    assert second["customers"][0]["customer_id"] == 102  # 101 slid onto page 1
    assert second["number_of_items"] == 149


async def test_quota_hour_then_day_then_429_until_next_hour(http):
    api = UpgatesStandIn(hour_limit=2, day_limit=1)
    await api.start()
    try:
        remaining = []
        for _ in range(3):
            status, headers, _ = await get(http, f"{api.base_url}/customers")
            assert status == 200
            remaining.append(
                (headers["X-Rate-Limit-Hour-Remaining"], headers["X-Rate-Limit-Day-Remaining"])
            )
        assert remaining == [("1", "1"), ("0", "1"), ("0", "0")]
        status, headers, body = await get(http, f"{api.base_url}/webhooks")
        assert status == 429
        assert body["messages"]
        assert headers["X-Rate-Limit-Total-Remaining"] == "0"
        retry_at = parsedate_to_datetime(headers["Retry-After"])
        assert headers["Retry-After"].endswith(" GMT")
        now = datetime.now(UTC)
        assert retry_at == now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        api.reset_quota()
        assert (await get(http, f"{api.base_url}/webhooks"))[0] == 200
        assert (api.hour_remaining, api.day_remaining) == (1, 1)  # the 429 cost nothing
    finally:
        await api.close()


async def test_a_fourth_concurrent_request_gets_429(http):
    api = UpgatesStandIn(latency=0.3)
    await api.start()
    try:
        results = await asyncio.gather(*(get(http, f"{api.base_url}/customers") for _ in range(5)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200, 200, 200, 429, 429]
        for status, headers, _ in results:
            if status == 429:
                retry = parsedate_to_datetime(headers["Retry-After"])
                assert (
                    datetime.now(UTC) - timedelta(seconds=1)
                    < retry
                    <= datetime.now(UTC) + timedelta(seconds=2)
                )
        assert api.max_concurrent_seen == 3
        assert api.hour_remaining == api.hour_limit - 3
    finally:
        await api.close()


async def test_injected_answers(api, http):
    url = f"{api.base_url}/customers"
    api.inject(500, times=2)
    assert [(await get(http, url))[0] for _ in range(3)] == [500, 500, 200]
    assert api.hour_remaining == api.hour_limit - 3

    when = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    api.inject(429, retry_after=when)
    status, headers, _ = await get(http, url)
    assert (status, headers["Retry-After"]) == (429, "Tue, 01 Jan 2030 12:00:00 GMT")
    assert api.hour_remaining == api.hour_limit - 3

    api.inject(301, location="http://elsewhere.example/api/v2/customers", body={"api_url": "x"})
    status, headers, body = await get(http, url)
    assert (status, headers["Location"], body) == (
        301,
        "http://elsewhere.example/api/v2/customers",
        {"api_url": "x"},
    )


async def test_moved_shop_answers_301_with_location(api, http):
    api.moved_to = "http://new.example/api/v2"
    status, headers, body = await get(http, f"{api.base_url}/customers?page=2")
    assert status == 301
    assert headers["Location"] == "http://new.example/api/v2/customers?page=2"
    assert body["api_url"] == "http://new.example/api/v2"


async def test_unknown_path_and_method(api, http):
    status, _, body = await get(http, f"{api.base_url}/nothing-here")
    assert status == 404
    assert body["messages"]
    async with http.post(f"{api.base_url}/customers/x") as response:
        assert response.status == 404
    async with http.patch(f"{api.base_url}/webhooks") as response:
        assert response.status == 405
        assert (await response.json())["messages"]
    assert api.hour_remaining == api.hour_limit - 3


async def test_webhook_lifecycle(api, http):
    url = f"{api.base_url}/webhooks"
    _, _, body = await get(http, f"{url}/events")
    assert {"name": "Customers.create", "allowed_yn": True} in body["events"]
    assert len(body["events"]) == len(EVENTS) == 36

    hook = {"name": "ingest", "url": "https://u:p@example.cz/hook?x=1", "event": "Customers.update"}
    async with http.post(url, json=hook) as response:
        assert response.status == 200
        created = (await response.json())["webhook"]
    assert created == {"id": 1, "active_yn": True, **hook}
    for bad in ({**hook, "url": "/relative"}, {**hook, "event": "Customers.merge"}, {"name": "x"}):
        async with http.post(url, json=bad) as response:
            assert response.status == 400
            assert (await response.json())["messages"]
    async with http.post(url, data=b"{not json") as response:
        assert response.status == 400

    api.add_webhook("Customers.delete", "https://example.cz/d")
    api.record_delivery(1, 200)
    api.record_delivery(2, 202)
    api.deactivate(2)
    _, _, body = await get(http, url)
    first, second = body["webhooks"]
    assert first["last_success_call_status"] == 200
    assert first["last_error_call"] is None
    assert second["last_error_call_status"] == 202
    assert second["active_yn"] is False
    _, _, body = await get(http, f"{url}/2")
    assert body["webhooks"] == [second]
    assert (await get(http, f"{url}/99"))[0] == 404

    async with http.put(url, json={"id": 1, "active_yn": False, "name": "renamed"}) as response:
        assert response.status == 200
        assert (await response.json())["webhook"]["name"] == "renamed"
    assert api.webhooks[1]["active_yn"] is False
    async with http.put(url, json={"id": 42, "name": "x"}) as response:
        assert response.status == 400

    async with http.delete(f"{url}/1") as response:
        assert await response.json() == {"webhooks": [{"id": "1", "deleted": True, "messages": []}]}
    async with http.delete(url, params={"ids": "2;7"}) as response:
        body = await response.json()
    assert [(w["id"], w["deleted"], bool(w["messages"])) for w in body["webhooks"]] == [
        ("2", True, False),
        ("7", False, True),
    ]
    assert api.webhooks == {}
    # POST with X-HTTP-Method-Override: DELETE is a DELETE
    api.add_webhook("Customers.create", "https://example.cz/c")
    async with http.post(f"{url}/3", headers={"X-HTTP-Method-Override": "DELETE"}) as response:
        assert (await response.json())["webhooks"][0]["deleted"] is True
