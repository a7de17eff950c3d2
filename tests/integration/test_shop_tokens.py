"""Per-shop tokens: a shop's URL cannot write another shop's customers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest

from common.settings import Settings
from tests.support.config import TOKEN
from tests.support.load import post
from tests.support.services import serve


@pytest.fixture
async def shop_receiver(settings: Settings) -> AsyncIterator[str]:
    settings = replace(settings, shop_tokens=(("shop-a", "token-a"), ("shop-b", "token-b")))
    async with serve(settings) as url:
        yield url


def body(shop: str) -> dict[str, object]:
    return {
        "project_name": shop,
        "customers": [{"customer_id": 1, "creation_time": "2025-01-01T00:00:00Z"}],
    }


async def test_a_shop_token_writes_its_own_shop_only(
    shop_receiver: str, http: aiohttp.ClientSession
) -> None:
    assert (await post(http, shop_receiver, "create", body("shop-a"), "token-a"))[0] == 200
    status, answer = await post(http, shop_receiver, "create", body("shop-b"), "token-a")
    assert status == 403
    assert answer == {"error": "this token is for another shop"}
    assert (await post(http, shop_receiver, "create", body("shop-b"), "token-b"))[0] == 200
    assert (await post(http, shop_receiver, "create", body("shop-c"), "token-x"))[0] == 401


async def test_the_shared_token_still_writes_any_shop(
    shop_receiver: str, http: aiohttp.ClientSession
) -> None:
    for shop in ("shop-a", "shop-b", "shop-c"):
        assert (await post(http, shop_receiver, "create", body(shop), TOKEN))[0] == 200
