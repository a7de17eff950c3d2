"""A stand-in for the Upgates REST API v2: an aiohttp app on 127.0.0.1, over real HTTP.

Written from /work/shared/docs/upgates.md ("The REST API v2") and Upgates' API blueprint (status
codes, rate limiting, paging, customers, webhooks). Tests of the project's API client start one,
fill it with customers and webhooks, and point the client at ``base_url``.

Faithful to the documentation in:

- the base path ``/api/v2``, HTTP Basic ``login:key``, JSON in UTF-8, ``Content-Type:
  application/json``; errors as ``{"messages": [{"object", "property", "message", "level"}]}``;
- 401 for missing or wrong credentials, and 403 for every request after 5 failed logins;
- at most ``max_concurrent`` (3) requests at once, the next one gets 429;
- hour and day quotas, each call taken from the hour allowance first, then from the day's; 429
  with ``Retry-After`` as an HTTP date in GMT when both are spent; the ``X-Rate-Limit-*`` headers;
- ``GET /customers``: pages of 100 from ``page=1`` (the default), the paging fields, the filters
  of the blueprint, a customer as the API (not the webhook) shows it: email and flags in ``login``;
- ``/webhooks``: list, one, create, change, delete (by path id or ``?ids=1;2``), events;
- ``X-HTTP-Method-Override`` (the blueprint allows it: a POST with ``DELETE`` is a DELETE);
- a moved shop: 301 with ``Location`` (and the older docs' ``{"api_url": ...}`` in the body).

Assumed where the documentation is silent:

- Customers come in ``customer_id`` order (the docs promise no order). A page is computed from the
  shop as it is when the page is asked for, so customers deleted or added mid-scan shift the pages
  (``before_page`` lets a test change the shop at exactly that moment).
- ``number_of_pages`` is ``ceil(number_of_items / 100)``: 0 when nothing matches. A page past the
  end answers 200 with an empty ``customers`` list and the real counts.
- ``*_time_from`` filters are inclusive (``>=``). A value without an offset is Prague local time.
  A space inside the time part (an unencoded ``+`` of the offset, decoded as a space) is a 400, as
  is any value that is not ISO 8601. String filters (``code``, ``email``, ...) match exactly.
  Unknown query parameters are ignored. ``page`` must be an integer >= 1, else 400.
- Order of checks for each request: moved (301) -> blocked (403) -> credentials (401) ->
  concurrency (429) -> ``latency`` -> injected answer -> quota (429) -> routing (404/405) ->
  handler. Only requests past the concurrency check count as in flight.
- Cost: every answer after the credentials check costs one call (400, 404, 405 and injected
  answers too), except 429s, which cost nothing. 301/401/403 cost nothing.
- Quotas do not refill with the clock (a test must not depend on the wall clock's hour);
  ``reset_quota()`` (or ``new_hour()``) stands for the next hour/day.
- Every answer, 301/401/403 included, carries the ``X-Rate-Limit-*`` headers.
- The 429 of the concurrency limit says ``Retry-After`` = now + 1 s (rounded up to a second).
- Failed logins never expire (the real window is a floating hour) and a good login does not
  reset the count.
- Webhooks: ``POST``/``PUT`` answer the five fields the blueprint lists (``id, active_yn, name,
  url, event``); ``GET`` shows all ten. ``PUT`` of an unknown id is a 400 with messages; ``GET
  /webhooks/{id}`` of an unknown id is a 404. Only the customer list and webhooks are
  implemented: any other method on ``/customers`` is a 405, any other path a 404.
- A delivery counts as a success only with 200 or 204 (the docs: "anything else, 202 included,
  is a failure"); see ``record_delivery``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import math
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import EllipsisType
from typing import Any
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

from aiohttp import web

PRAGUE = ZoneInfo("Europe/Prague")
BASE_PATH = "/api/v2"
PAGE_SIZE = 100
MAX_FAILED_LOGINS = 5
SUCCESS_STATUSES = frozenset({200, 204})
EVENT_ENTITIES = (
    "Customers",
    "Orders",
    "Products",
    "OrderStatuses",
    "Labels",
    "Categories",
    "Shipments",
    "Payments",
    "Pricelists",
    "Languages",
    "Invoices",
    "Availabilities",
)
EVENTS = tuple(
    f"{entity}.{action}" for entity in EVENT_ENTITIES for action in ("create", "update", "delete")
)
NEWSLETTER_ACCEPT = frozenset({"notset", "no", "yes", "excluded"})

_FIRSTNAMES = ("Jan", "Petra", "Tomáš", "Lucie", "Jiří", "Eva", "Martin", "Jana", "Pavel", "Věra")
_SURNAMES = ("Novák", "Svobodová", "Dvořák", "Černá", "Procházka", "Kučerová", "Veselý", "Horáková")
_CITIES = (("Praha", "110 00"), ("Brno", "602 00"), ("Ostrava", "702 00"), ("Plzeň", "301 00"))
_STREETS = ("Dlouhá", "Krátká", "Nádražní", "Školní", "Zahradní", "Polní")

# Exact-match filters of GET /customers: query parameter -> where the value lives in a customer.
_EXACT_FILTERS: dict[str, tuple[str, ...]] = {
    "code": ("code",),
    "email": ("login", "email"),
    "language": ("language",),
    "pricelist": ("pricelist",),
    "phone": ("communication", "phone"),
    "company_name": ("company", "name"),
    "company_number": ("company", "company_number"),
    "company_vat_number": ("company", "vat_number"),
}
_BOOL_FILTERS: dict[str, tuple[str, ...]] = {
    "active_yn": ("login", "active_yn"),
    "blocked_yn": ("login", "blocked_yn"),
}
_BOOLS = {"1": True, "true": True, "0": False, "false": False}

Handler = Callable[[web.Request, re.Match[str]], Awaitable[web.Response]]


@dataclass(frozen=True)
class Call:
    """One answered request: the HTTP method, the path, the decoded query and the status."""

    method: str
    path: str
    query: dict[str, str]
    status: int


@dataclass(frozen=True)
class _Injection:
    status: int
    retry_after: datetime | None
    location: str | None
    body: dict[str, Any] | None


class _ApiError(Exception):
    """Raised by handlers; answered as ``{"messages": [...]}`` with the status."""

    def __init__(
        self, status: int, message: str, *, obj: str = "", prop: str = "", allow: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.obj = obj
        self.prop = prop
        self.allow = allow


def prague_time(dt: datetime) -> str:
    """``dt`` as the API writes it: Prague local time, seconds, offset with a colon."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=PRAGUE)
    return dt.astimezone(PRAGUE).replace(microsecond=0).isoformat()


def http_date(dt: datetime) -> str:
    """``dt`` as an HTTP date in GMT (a naive ``dt`` is taken as UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return format_datetime(dt.astimezone(UTC), usegmt=True)


def _messages(message: str, *, obj: str = "", prop: str = "") -> dict[str, Any]:
    return {"messages": [{"object": obj, "property": prop, "message": message, "level": "error"}]}


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    data = None if status in (204, 304) else json.dumps(body, ensure_ascii=False).encode()
    return web.Response(
        status=status,
        body=data,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def _dig(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = obj
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _parse_time(name: str, raw: str) -> datetime:
    # An unencoded "+" of the offset arrives as a space: "2024-02-29T14:24:49 01:00".
    if " " in raw[11:]:
        raise _ApiError(
            400, f"Invalid date in {name}: {raw!r} (URL-encode the + as %2B)", prop=name
        )
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise _ApiError(400, f"Invalid date in {name}: {raw!r}", prop=name) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=PRAGUE)


def _parse_int(name: str, raw: str, *, minimum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _ApiError(400, f"Invalid integer in {name}: {raw!r}", prop=name) from None
    if minimum is not None and value < minimum:
        raise _ApiError(400, f"{name} must be at least {minimum}", prop=name)
    return value


def _parse_ids(name: str, raw: str) -> list[int]:
    ids = [_parse_int(name, part.strip()) for part in raw.split(";") if part.strip()]
    if not ids:
        raise _ApiError(400, f"No id in {name}", prop=name)
    return ids


def _parse_bool(name: str, raw: Any, *, obj: str = "") -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.lower() in _BOOLS:
        return _BOOLS[raw.lower()]
    raise _ApiError(400, f"Invalid bool in {name}: {raw!r}", obj=obj, prop=name)


def _ceil_second(dt: datetime) -> datetime:
    return dt.replace(microsecond=0) + timedelta(seconds=1) if dt.microsecond else dt


class UpgatesStandIn:
    """The Upgates REST API v2 of one shop, for tests (see the module docstring)."""

    def __init__(
        self,
        *,
        login: str = "api-login",
        key: str = "API-KEY",
        hour_limit: int = 10_000,
        day_limit: int = 100_000,
        latency: float = 0.0,
        max_concurrent: int = 3,
    ) -> None:
        self.login = login
        self.key = key
        self.hour_limit = hour_limit
        self.day_limit = day_limit
        self.hour_remaining = hour_limit
        self.day_remaining = day_limit
        self.latency = latency
        self.max_concurrent = max_concurrent
        self.customers: dict[int, dict[str, Any]] = {}
        self.webhooks: dict[int, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.max_concurrent_seen = 0
        self.in_flight = 0
        self.failed_logins = 0
        self.moved_to: str | None = None
        self.before_page: Callable[[int], Awaitable[None] | None] | None = None
        self.admin_base = "https://standin-shop.admin.s10.upgates.com/manager"
        self._injections: deque[_Injection] = deque()
        self._next_webhook_id = 1
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = [
            (re.compile(r"/customers"), {"GET": self._list_customers}),
            (re.compile(r"/webhooks/events"), {"GET": self._webhook_events}),
            (
                re.compile(r"/webhooks"),
                {
                    "GET": self._list_webhooks,
                    "POST": self._create_webhook,
                    "PUT": self._update_webhook,
                    "DELETE": self._delete_webhooks,
                },
            ),
            (
                re.compile(r"/webhooks/(?P<id>\d+)"),
                {"GET": self._list_webhooks, "DELETE": self._delete_webhooks},
            ),
        ]

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> str:
        """Serve on a free port of 127.0.0.1; the API base with credentials (``base_url``)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the stand-in is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://LOGIN:KEY@127.0.0.1:PORT/api/v2`` (login and key URL-quoted)."""
        credentials = f"{quote(self.login, safe='')}:{quote(self.key, safe='')}"
        return f"http://{credentials}@127.0.0.1:{self.port}{BASE_PATH}"

    @property
    def url_without_credentials(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE_PATH}"

    # --- test controls --------------------------------------------------------------------------

    def inject(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: datetime | None = None,
        location: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        """The next ``times`` requests past the credentials and concurrency checks answer
        ``status`` instead. A 429 carries ``Retry-After`` (``retry_after``, default now + 1 s)
        and costs nothing; ``location`` becomes the ``Location`` header (for a 301); ``body``
        replaces the default ``{"messages": [...]}``."""
        self._injections.extend([_Injection(status, retry_after, location, body)] * times)

    def reset_quota(self) -> None:
        """Full hour and day allowances again."""
        self.hour_remaining = self.hour_limit
        self.day_remaining = self.day_limit

    def new_hour(self) -> None:
        """A new calendar hour: the hour allowance is full again, the day's stays as it is."""
        self.hour_remaining = self.hour_limit

    # --- customers ------------------------------------------------------------------------------

    def add_customer(
        self,
        customer_id: int | None = None,
        *,
        email: str | None = None,
        code: str | None = None,
        active: bool = True,
        blocked: bool = False,
        created: datetime | None = None,
        updated: datetime | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Add a customer as the API shows it; the stored dict. The id defaults to max + 1, the
        email to ``customer{id}@example.cz``, ``created`` to now and ``updated`` to ``created``;
        ``extra`` replaces top-level fields (e.g. ``type="company", company={...}``)."""
        if customer_id is None:
            customer_id = max(self.customers, default=0) + 1
        if customer_id in self.customers:
            raise ValueError(f"customer {customer_id} exists")
        created = created or datetime.now(PRAGUE)
        n = customer_id
        city, zip_code = _CITIES[n % len(_CITIES)]
        customer: dict[str, Any] = {
            "customer_id": customer_id,
            "type": "customer",
            "code": code,
            "language": "cs",
            "degree": None,
            "firstname": _FIRSTNAMES[n % len(_FIRSTNAMES)],
            "surname": _SURNAMES[(n // len(_FIRSTNAMES)) % len(_SURNAMES)],
            "nickname": None,
            "newsletter_yn": False,
            "newsletter_accept": "notset",
            "pricelist": "Základní",
            "base_turnover": 0.0,
            "turnover": "0",
            "turnover_currency": "CZK",
            "company": None,
            "communication": {
                "phone": f"+420 {600 + n % 400} {n // 1000 % 1000:03d} {n % 1000:03d}",
                "fax": None,
                "im": None,
                "salutation": None,
                "declension": None,
            },
            "login": {
                "active_yn": active,
                "blocked_yn": blocked,
                "email": email if email is not None else f"customer{customer_id}@example.cz",
            },
            "groups": {},
            "note": None,
            "addresses": {
                "billing": {
                    "street": f"{_STREETS[n % len(_STREETS)]} {n % 200 + 1}",
                    "city": city,
                    "state": None,
                    "zip_code": zip_code,
                    "country_id": "CZ",
                },
                "postal": [],
            },
            "metas": [],
            "creation_time": prague_time(created),
            "last_update_time": prague_time(updated or created),
            "admin_url": f"{self.admin_base}/customers/edit/{customer_id}",
        }
        customer.update(extra)
        self.customers[customer_id] = customer
        return customer

    def update_customer(
        self,
        customer_id: int,
        *,
        at: datetime | None = None,
        email: str | EllipsisType = ...,
        code: str | EllipsisType | None = ...,
        active: bool | EllipsisType = ...,
        blocked: bool | EllipsisType = ...,
        **extra: Any,
    ) -> dict[str, Any]:
        """Change the given fields (``...`` = unchanged; ``extra`` replaces top-level fields);
        ``last_update_time`` becomes ``at`` or now. The stored dict."""
        customer = self.customers[customer_id]
        if not isinstance(email, EllipsisType):
            customer["login"]["email"] = email
        if not isinstance(code, EllipsisType):
            customer["code"] = code
        if not isinstance(active, EllipsisType):
            customer["login"]["active_yn"] = active
        if not isinstance(blocked, EllipsisType):
            customer["login"]["blocked_yn"] = blocked
        customer.update(extra)
        customer["last_update_time"] = prague_time(at or datetime.now(PRAGUE))
        return customer

    def delete_customer(self, customer_id: int) -> None:
        del self.customers[customer_id]

    def add_many(self, n: int, *, start_id: int = 1, created: datetime | None = None) -> None:
        """``n`` customers with ids ``start_id``.., codes ``C{id}``, fake but deterministic data."""
        for customer_id in range(start_id, start_id + n):
            self.add_customer(customer_id, code=f"C{customer_id}", created=created)

    # --- webhooks -------------------------------------------------------------------------------

    def add_webhook(
        self, event: str, url: str, *, active: bool = True, name: str = "other"
    ) -> dict[str, Any]:
        """Register a webhook as if through the API (no call counted); the stored dict."""
        webhook = {
            "id": self._next_webhook_id,
            "active_yn": active,
            "name": name,
            "url": url,
            "event": event,
            "last_success_call": None,
            "last_success_call_status": None,
            "last_error_call": None,
            "last_error_call_status": None,
            "creation_time": prague_time(datetime.now(PRAGUE)),
        }
        self.webhooks[self._next_webhook_id] = webhook
        self._next_webhook_id += 1
        return webhook

    def record_delivery(self, webhook_id: int, status: int, at: datetime | None = None) -> None:
        """Note a delivery: a success with 200/204, an error with anything else."""
        webhook = self.webhooks[webhook_id]
        kind = "success" if status in SUCCESS_STATUSES else "error"
        webhook[f"last_{kind}_call"] = prague_time(at or datetime.now(PRAGUE))
        webhook[f"last_{kind}_call_status"] = status

    def deactivate(self, webhook_id: int) -> None:
        """What Upgates does after 12 h of failures or when the user loses its rights."""
        self.webhooks[webhook_id]["active_yn"] = False

    # --- the request pipeline -------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        response = await self._answer(request)
        response.headers.update(self._rate_headers())
        self.calls.append(Call(request.method, request.path, dict(request.query), response.status))
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        if self.moved_to is not None:
            return self._moved(request)
        if self.failed_logins >= MAX_FAILED_LOGINS:
            return _json(403, _messages("Too many failed login attempts, access blocked"))
        if not self._authorized(request):
            self.failed_logins += 1
            return _json(401, _messages("Unauthorized"))
        if self.in_flight >= self.max_concurrent:
            return self._too_many(datetime.now(UTC) + timedelta(seconds=1), "Too many requests")
        self.in_flight += 1
        self.max_concurrent_seen = max(self.max_concurrent_seen, self.in_flight)
        try:
            await asyncio.sleep(self.latency)
            if self._injections:
                return self._injected(self._injections.popleft())
            if self.hour_remaining <= 0 and self.day_remaining <= 0:
                next_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
                return self._too_many(next_hour + timedelta(hours=1), "Rate limit exceeded")
            self._spend()
            try:
                return await self._route(request)
            except _ApiError as error:
                headers = {"Allow": error.allow} if error.allow else None
                body = _messages(error.message, obj=error.obj, prop=error.prop)
                return _json(error.status, body, headers)
        finally:
            self.in_flight -= 1

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        login, sep, key = decoded.partition(":")
        return bool(sep) and login == self.login and key == self.key

    def _moved(self, request: web.Request) -> web.Response:
        assert self.moved_to is not None
        rest = request.raw_path
        if rest.startswith(BASE_PATH):
            rest = rest[len(BASE_PATH) :]
        body = {"api_url": self.moved_to, **_messages("The shop has moved")}
        return _json(301, body, {"Location": self.moved_to + rest})

    def _spend(self) -> None:
        if self.hour_remaining > 0:
            self.hour_remaining -= 1
        elif self.day_remaining > 0:
            self.day_remaining -= 1

    def _too_many(self, retry_after: datetime, message: str) -> web.Response:
        headers = {"Retry-After": http_date(_ceil_second(retry_after))}
        return _json(429, _messages(message), headers)

    def _injected(self, injection: _Injection) -> web.Response:
        if injection.status == 429:
            retry_after = injection.retry_after or datetime.now(UTC) + timedelta(seconds=1)
            response = self._too_many(retry_after, "Too many requests")
            if injection.body is not None:
                response.body = json.dumps(injection.body, ensure_ascii=False).encode()
            return response
        self._spend()
        headers = {"Location": injection.location} if injection.location else None
        body = (
            injection.body if injection.body is not None else _messages(f"HTTP {injection.status}")
        )
        return _json(injection.status, body, headers)

    def _rate_headers(self) -> dict[str, str]:
        return {
            "X-Rate-Limit-Hour": str(self.hour_limit),
            "X-Rate-Limit-Day": str(self.day_limit),
            "X-Rate-Limit-Hour-Remaining": str(self.hour_remaining),
            "X-Rate-Limit-Day-Remaining": str(self.day_remaining),
            "X-Rate-Limit-Total-Remaining": str(self.hour_remaining + self.day_remaining),
        }

    async def _route(self, request: web.Request) -> web.Response:
        path = request.path
        if not path.startswith(BASE_PATH + "/"):
            raise _ApiError(404, f"Unknown endpoint {path}")
        method = request.headers.get("X-HTTP-Method-Override", request.method).upper()
        for pattern, handlers in self._routes:
            match = pattern.fullmatch(path[len(BASE_PATH) :])
            if match is None:
                continue
            if method not in handlers:
                raise _ApiError(405, f"Method {method} not allowed", allow=", ".join(handlers))
            return await handlers[method](request, match)
        raise _ApiError(404, f"Unknown endpoint {path}")

    # --- GET /customers -------------------------------------------------------------------------

    async def _list_customers(self, request: web.Request, _: re.Match[str]) -> web.Response:
        query = request.query
        page = _parse_int("page", query["page"], minimum=1) if "page" in query else 1
        keep = self._customer_filters(query)
        if self.before_page is not None:
            pending = self.before_page(page)
            if inspect.isawaitable(pending):
                await pending
        matching = [c for _, c in sorted(self.customers.items()) if all(t(c) for t in keep)]
        items = matching[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        return _json(
            200,
            {
                "current_page": page,
                "current_page_items": len(items),
                "number_of_pages": math.ceil(len(matching) / PAGE_SIZE),
                "number_of_items": len(matching),
                "customers": items,
            },
        )

    def _customer_filters(self, query: Mapping[str, str]) -> list[Callable[[dict[str, Any]], bool]]:
        tests: list[Callable[[dict[str, Any]], bool]] = []
        for name in ("creation_time_from", "last_update_time_from"):
            if name in query:
                since = _parse_time(name, query[name])
                field = name.removesuffix("_from")
                tests.append(lambda c, f=field, s=since: datetime.fromisoformat(c[f]) >= s)
        if "ids" in query:
            ids = set(_parse_ids("ids", query["ids"]))
            tests.append(lambda c: c["customer_id"] in ids)
        if "customer_id" in query:
            wanted = _parse_int("customer_id", query["customer_id"])
            tests.append(lambda c: c["customer_id"] == wanted)
        if "newsletter_accept" in query and query["newsletter_accept"] not in NEWSLETTER_ACCEPT:
            raise _ApiError(400, "Invalid newsletter_accept", prop="newsletter_accept")
        for name, path in {**_EXACT_FILTERS, "newsletter_accept": ("newsletter_accept",)}.items():
            if name in query:
                tests.append(lambda c, p=path, v=query[name]: _dig(c, p) == v)
        for name, path in _BOOL_FILTERS.items():
            if name in query:
                flag = _parse_bool(name, query[name])
                tests.append(lambda c, p=path, v=flag: _dig(c, p) is v)
        return tests

    # --- /webhooks ------------------------------------------------------------------------------

    async def _webhook_events(self, request: web.Request, _: re.Match[str]) -> web.Response:
        return _json(200, {"events": [{"name": name, "allowed_yn": True} for name in EVENTS]})

    async def _list_webhooks(self, request: web.Request, match: re.Match[str]) -> web.Response:
        if match.groupdict().get("id") is None:
            return _json(200, {"webhooks": list(self.webhooks.values())})
        webhook = self.webhooks.get(int(match["id"]))
        if webhook is None:
            raise _ApiError(404, f"Webhook {match['id']} not found", obj="webhook", prop="id")
        return _json(200, {"webhooks": [webhook]})

    async def _create_webhook(self, request: web.Request, _: re.Match[str]) -> web.Response:
        body = await self._read_object(request)
        for name in ("name", "url", "event"):
            if name not in body:
                raise _ApiError(400, f"{name} is required", obj="webhook", prop=name)
        fields = self._webhook_fields(body)
        webhook = self.add_webhook(
            fields["event"],
            fields["url"],
            active=fields.get("active_yn", True),
            name=fields["name"],
        )
        return _json(200, {"webhook": self._short(webhook)})

    async def _update_webhook(self, request: web.Request, _: re.Match[str]) -> web.Response:
        body = await self._read_object(request)
        if "id" not in body:
            raise _ApiError(400, "id is required", obj="webhook", prop="id")
        raw_id = body["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, int | str):
            raise _ApiError(400, f"Invalid id: {raw_id!r}", obj="webhook", prop="id")
        webhook_id = _parse_int("id", str(raw_id))
        if webhook_id not in self.webhooks:
            raise _ApiError(400, f"Webhook {webhook_id} not found", obj="webhook", prop="id")
        fields = self._webhook_fields(body)
        self.webhooks[webhook_id].update(fields)
        return _json(200, {"webhook": self._short(self.webhooks[webhook_id])})

    async def _delete_webhooks(self, request: web.Request, match: re.Match[str]) -> web.Response:
        raw_ids: list[str] = []
        if match.groupdict().get("id") is not None:
            raw_ids.append(match["id"])
        if "ids" in request.query:
            raw_ids += [part.strip() for part in request.query["ids"].split(";") if part.strip()]
        if not raw_ids:
            raise _ApiError(400, "A webhook id is required (path or ids)", obj="webhook", prop="id")
        results = []
        for raw in raw_ids:
            webhook_id = int(raw) if raw.isdigit() else None
            deleted = webhook_id is not None and self.webhooks.pop(webhook_id, None) is not None
            messages = (
                []
                if deleted
                else _messages(f"Webhook {raw} not found", obj="webhook", prop="id")["messages"]
            )
            results.append({"id": raw, "deleted": deleted, "messages": messages})
        return _json(200, {"webhooks": results})

    @staticmethod
    async def _read_object(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise _ApiError(400, "The request body is not UTF-8") from None
        except json.JSONDecodeError:
            raise _ApiError(400, "Invalid JSON") from None
        if not isinstance(body, dict):
            raise _ApiError(400, "A JSON object is required")
        return body

    @staticmethod
    def _webhook_fields(body: Mapping[str, Any]) -> dict[str, Any]:
        """The writable fields present in ``body``, validated."""
        fields: dict[str, Any] = {}
        if "active_yn" in body:
            fields["active_yn"] = _parse_bool("active_yn", body["active_yn"], obj="webhook")
        if "name" in body:
            if not isinstance(body["name"], str) or not body["name"]:
                raise _ApiError(400, "name must be a non-empty string", obj="webhook", prop="name")
            fields["name"] = body["name"]
        if "url" in body:
            url = body["url"]
            try:
                parts = urlsplit(url) if isinstance(url, str) else None
            except ValueError:  # e.g. "http://[::1"
                parts = None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise _ApiError(400, f"Invalid absolute URL: {url!r}", obj="webhook", prop="url")
            fields["url"] = url
        if "event" in body:
            if body["event"] not in EVENTS:
                raise _ApiError(
                    400, f"Unknown event: {body['event']!r}", obj="webhook", prop="event"
                )
            fields["event"] = body["event"]
        return fields

    @staticmethod
    def _short(webhook: Mapping[str, Any]) -> dict[str, Any]:
        return {key: webhook[key] for key in ("id", "active_yn", "name", "url", "event")}
