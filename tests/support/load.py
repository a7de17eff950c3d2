"""Webhooks as Upgates sends them, and senders: what a test puts through the receiver.

- ``post``: one webhook, as Upgates posts it; ``customer``/``envelope``/``body_of_size``: a
  receiver test's records and bodies; ``create``/``update``/``delete`` (at ``at(minutes)``): a
  pipeline test's records; ``webhook``: the body of a dead letter in the admin tests.
- ``make_record``/``event_time``: the steady load's records, each (customer, slot) at its own
  time; ``Events``: an endless stream of them; ``Sender``: sends them like Upgates (several at
  once, each retried until it gets a 200) and keeps the oracle of every event answered 200.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import msgspec

from tests.support.config import TOKEN
from tests.support.oracle import Oracle
from tests.support.waiting import wait_until


async def post(
    http: aiohttp.ClientSession,
    base_url: str,
    event: str,
    payload: Any,
    token: str | None = TOKEN,
) -> tuple[int, Any]:
    """POST a webhook as Upgates does (token in the query string); (status, JSON body)."""
    params = {"token": token} if token is not None else {}
    body = payload if isinstance(payload, bytes) else None
    async with http.post(
        f"{base_url}/webhooks/customers/{event}",
        params=params,
        data=body,
        json=None if body is not None else payload,
    ) as response:
        return response.status, await response.json(content_type=None)


# --- a receiver test's records ---------------------------------------------------------------

CANARY = "canary-7f3a@example.cz"  # customer data that must never come back in a response
SHOP = "obchod-u-jany"


def customer(i: int, email: str | None = None) -> dict[str, Any]:
    """One customer record as Upgates sends it (some 230 bytes of JSON)."""
    return {
        "customer_id": 100_000 + i,
        "email": email or f"jana.{i}@example.cz",
        "code": f"ZK{i:06d}",
        "surname": "Nováková",
        "creation_time": "2024-10-30T10:00:00+01:00",
        "last_update_time": "2024-10-30T10:05:00+01:00",
        "active_yn": True,
        "blocked_yn": False,
    }


def envelope(*customers: dict[str, Any], project: str = SHOP) -> dict[str, Any]:
    return {"project_name": project, "customers": list(customers)}


def body_of_size(size: int) -> bytes:
    """A valid envelope of exactly `size` bytes (padded inside a string field)."""
    base = json.dumps(envelope(customer(1, CANARY) | {"note": ""})).encode()
    assert len(base) <= size
    return base.replace(b'"note": ""', b'"note": "' + b"x" * (size - len(base)) + b'"')


# --- a pipeline test's records -----------------------------------------------------------------

T0 = datetime(2024, 10, 30, 9, 0, tzinfo=UTC)


def at(minutes: int) -> str:
    """An Upgates timestamp `minutes` after T0, in the sender's usual +01:00 form."""
    return (T0 + timedelta(minutes=minutes)).astimezone().isoformat()


def create(cid: Any, minutes: int, email: str = "a@example.cz", **extra: Any) -> dict[str, Any]:
    return {
        "customer_id": cid,
        "email": email,
        "code": f"C{cid}",
        "creation_time": at(minutes),
        "active_yn": True,
        "blocked_yn": False,
        **extra,
    }


def update(cid: Any, minutes: int, email: str = "b@example.cz", **extra: Any) -> dict[str, Any]:
    return {
        "customer_id": cid,
        "email": email,
        "code": f"C{cid}",
        "last_update_time": at(minutes),
        **extra,
    }


def delete(cid: Any, minutes: int, **extra: Any) -> dict[str, Any]:
    return {
        "customer_id": cid,
        "email": "gone@example.cz",
        "code": f"C{cid}",
        "deletion_time": at(minutes),
        **extra,
    }


# --- an admin test's dead letters --------------------------------------------------------------

ADMIN_CANARY = "canary-admin-5c1e@example.cz"


def webhook(cid: int, email: str = ADMIN_CANARY) -> bytes:
    """The body of a create webhook for one customer of admin-shop."""
    return msgspec.json.encode(
        {
            "project_name": "admin-shop",
            "customers": [
                {"customer_id": cid, "email": email, "creation_time": "2025-01-02T03:04:05Z"}
            ],
        }
    )


# --- a steady Upgates-like load -----------------------------------------------------------------

LOAD_T0 = datetime(2025, 6, 1, 6, 0, tzinfo=UTC)
PRAGUE_SUMMER = timezone(timedelta(hours=2))
SLOTS = 8  # events per customer; each at its own time, sent in a shuffled order


def event_time(cid: int, slot: int) -> datetime:
    """When a customer's event of that slot happened: every (customer, slot) at its own time."""
    return LOAD_T0 + timedelta(seconds=cid * 1000 + slot * 10)


def make_record(kind: str, cid: int, slot: int) -> dict[str, Any]:
    """One record as Upgates sends it; every (customer, slot) has a distinct event time."""
    when = event_time(cid, slot)
    if kind == "create":
        return {
            "customer_id": cid,
            "email": f"c{cid}.{slot}@example.cz",
            "code": f"K{slot}",
            "creation_time": when.astimezone(PRAGUE_SUMMER).isoformat(),
            "active_yn": slot % 2 == 0,
            "blocked_yn": False,
        }
    if kind == "update":
        return {
            "customer_id": str(cid),  # Upgates sometimes sends numbers as strings
            "email": f"u{cid}.{slot}@example.cz",
            "code": f"U{slot}",
            "last_update_time": when.strftime("%Y-%m-%dT%H:%M:%S+0000"),
        }
    return {
        "customer_id": cid,
        "email": f"d{cid}.{slot}@example.cz",
        "code": f"D{slot}",
        "deletion_time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class Events:
    """An endless stream of webhook payloads over a moving window of customers."""

    def __init__(self, seed: int, records: int, window: int = 40) -> None:
        self.rng = random.Random(seed)
        self.records = records
        self.window = window
        self.next_cid = 1
        self.live: dict[int, list[int]] = {}

    def _customer(self, taken: set[int]) -> int:
        while len(self.live) < self.window:
            slots = list(range(SLOTS))
            self.rng.shuffle(slots)
            self.live[self.next_cid] = slots
            self.next_cid += 1
        choices = [cid for cid in self.live if cid not in taken]
        return self.rng.choice(choices)

    def next(self) -> tuple[str, list[dict[str, Any]]]:
        kind = self.rng.choices(("create", "update", "delete"), (5, 4, 1))[0]
        taken: set[int] = set()
        records = []
        for _ in range(self.records):
            cid = self._customer(taken)
            taken.add(cid)
            slots = self.live[cid]
            records.append(make_record(kind, cid, slots.pop()))
            if not slots:
                del self.live[cid]
        return kind, records


@dataclass
class Stats:
    """What the sender saw."""

    requests: int = 0
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # no answer: refused, reset, timeout
    latencies: list[float] = field(default_factory=list)  # of every answer, in seconds
    slow_503: int = 0  # 503s that took 1 s or more

    def summary(self) -> str:
        worst = max(self.latencies, default=0.0)
        return (
            f"requests={self.requests} ok={self.ok} statuses={dict(self.statuses)} "
            f"errors={dict(self.errors)} slowest_answer={worst:.3f}s slow_503={self.slow_503}"
        )


class Sender:
    """Sends webhooks like Upgates: `concurrency` at once, each retried until it gets a 200.

    Upgates waits 1 s for an answer; no answer in time, a refused connection or any status but
    200/204 means: send it again. Only what was answered 200 goes into the oracle.
    """

    def __init__(
        self,
        url: str,
        shop: str = "steady-shop",
        concurrency: int = 4,
        records: int = 5,
        pause: float = 0.02,
        seed: int = 1,
        timeout: float = 1.0,
        keepalive: bool = True,
    ) -> None:
        self.url = url
        self.shop = shop
        self.concurrency = concurrency
        self.pause = pause
        self.timeout = timeout
        self.keepalive = keepalive
        self.events = Events(seed, records)
        self.oracle = Oracle()
        self.stats = Stats()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Sender:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, force_close=not self.keepalive),
        )
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def stop(self, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Stop taking new payloads; every payload begun is retried until it gets its 200."""
        self._stopping.set()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in done:
            task.result()
        if pending:
            raise AssertionError(
                f"{len(pending)} payloads still not answered 200 after {timeout} s: "
                + self.stats.summary()
            )

    async def post(self, event: str, payload: Any) -> tuple[int | None, float]:
        """One attempt: (status or None when nothing answered, seconds)."""
        assert self._session is not None
        started = time.perf_counter()
        self.stats.requests += 1
        try:
            async with self._session.post(
                f"{self.url}/webhooks/customers/{event}",
                params={"token": TOKEN},
                json=payload,
            ) as response:
                await response.read()
                status: int | None = response.status
        except TimeoutError:
            status = None
            self.stats.errors["timeout"] += 1
        except aiohttp.ClientError as exc:
            status = None
            self.stats.errors[type(exc).__name__] += 1
        took = time.perf_counter() - started
        if status is not None:
            self.stats.statuses[status] += 1
            self.stats.latencies.append(took)
            if status == 503 and took >= 1.0:
                self.stats.slow_503 += 1
        return status, took

    async def send_until_200(self, event: str, records: list[dict[str, Any]]) -> None:
        payload = {"project_name": self.shop, "customers": records}
        while True:
            status, _ = await self.post(event, payload)
            if status in (200, 204):
                self.stats.ok += 1
                self.oracle.accepted(self.shop, event, records)
                return
            await asyncio.sleep(0.05)

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            event, records = self.events.next()
            await self.send_until_200(event, records)
            await asyncio.sleep(self.pause)

    async def wait_ok(self, more: int, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Wait until `more` further payloads have been answered 200."""
        target = self.stats.ok + more

        async def reached() -> bool:
            return self.stats.ok >= target

        try:
            await wait_until(reached, timeout=timeout)
        except AssertionError:
            raise AssertionError(
                f"the sender got no {more} more 200s in {timeout} s: {self.stats.summary()}"
            ) from None
