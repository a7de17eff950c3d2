"""A client for one shop's REST API that keeps Upgates' limits as its own.

- At most `concurrency` requests at once (Upgates allows 3 per access group).
- A 429 pauses every request of the client until its Retry-After (an HTTP date), then the same
  requests go on; one further away than `max_wait` ends the run, to resume next time.
- A share of the hourly and daily quota is left for the shop's other integrations: once the
  `X-Rate-Limit-*-Remaining` headers reach the reserve, no further request is made.
- 401 and 403 are never retried: five failed logins an hour block the IP.
- A 301 (the shop moved) is followed, and the operator told to update the URL.
- Connection errors and 5xx are retried a few times with backoff.

The key travels only in the Authorization header; logs and errors show `ShopAccess.masked`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp
import msgspec
from yarl import URL

from common.backoff import backoff
from common.settings import Settings
from shopapi import schema

log = logging.getLogger(__name__)

# Upgates documents no limit on an answer's time; a page of 100 customers is small.
REQUEST_TIMEOUT = 60.0
ATTEMPTS = 5  # for connection errors and 5xx; each attempt is a call of the quota
MAX_REDIRECTS = 3


class ApiError(Exception):
    """The API could not be used; the message is one line for the operator, without secrets."""

    exit_status = 1


class AuthFailed(ApiError):
    """401/403: wrong login or key, missing rights, or an IP blocked. Never retried."""

    exit_status = 77  # EX_NOPERM


class Paused(ApiError):
    """The run stopped early on purpose (quota reserve, a long Retry-After, a stop request);
    what was read is stored, and the next run resumes."""

    exit_status = 75  # EX_TEMPFAIL: try again later


@dataclass(frozen=True, slots=True)
class ShopAccess:
    """One shop's API: its base URL without credentials, and the login and key."""

    shop: str
    base: str
    login: str
    key: str

    @property
    def masked(self) -> str:
        """The base URL with the login, for people: the key never shows."""
        parts = urlsplit(self.base)
        return urlunsplit(parts._replace(netloc=f"{self.login}:***@{parts.netloc}"))


def shop_access(settings: Settings, shop: str) -> ShopAccess:
    """The shop's API access from UPGATES_API; ApiError naming the shop when it is not there."""
    urls = dict(settings.upgates_api)
    if shop not in urls:
        known = ", ".join(sorted(urls)) or "none"
        raise ApiError(f"shop {shop!r} is not in UPGATES_API (configured: {known})")
    parts = urlsplit(urls[shop])
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    base = urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
    return ShopAccess(shop, base, unquote(parts.username or ""), unquote(parts.password or ""))


@dataclass(slots=True)
class Quota:
    """The shop's quota as the last answer stated it (None until an answer did)."""

    hour_limit: int | None = None
    day_limit: int | None = None
    hour_remaining: int | None = None
    day_remaining: int | None = None

    def update(self, headers: Mapping[str, str]) -> None:
        """Take the X-Rate-Limit-* headers of an answer."""
        for name, attribute in (
            ("X-Rate-Limit-Hour", "hour_limit"),
            ("X-Rate-Limit-Day", "day_limit"),
            ("X-Rate-Limit-Hour-Remaining", "hour_remaining"),
            ("X-Rate-Limit-Day-Remaining", "day_remaining"),
        ):
            value = headers.get(name)
            if value is not None and value.strip().lstrip("-").isdigit():
                setattr(self, attribute, int(value))

    def usable(self, reserve: float) -> int | None:
        """Calls we may still make, leaving `reserve` of each limit; None while unknown.

        Upgates takes a call from the hourly allowance first, then from the daily one.
        """
        if self.hour_remaining is None and self.day_remaining is None:
            return None
        usable = 0
        for remaining, limit in (
            (self.hour_remaining, self.hour_limit),
            (self.day_remaining, self.day_limit),
        ):
            if remaining is not None:
                kept = int(-(-(limit or 0) * reserve // 1))  # ceil: the reserve is never short
                usable += max(0, remaining - kept)
        return usable

    def __str__(self) -> str:
        def part(remaining: int | None, limit: int | None, unit: str) -> str:
            return f"{remaining if remaining is not None else '?'}/{limit or '?'} {unit}"

        return (
            f"{part(self.hour_remaining, self.hour_limit, 'this hour')}, "
            f"{part(self.day_remaining, self.day_limit, 'today')}"
        )


# What the client reports per answer: (shop, status as text) and the quota after it.
OnCall = Callable[[str, str, Quota], None]


def _retry_after(value: str | None) -> float | None:
    """Seconds until a Retry-After: an HTTP date in Upgates' answers, seconds elsewhere."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return at.timestamp() - time.time()


class Client:
    """Requests to one shop's API within its limits; use as `async with Client(...) as api`."""

    def __init__(
        self,
        access: ShopAccess,
        *,
        concurrency: int = 3,
        reserve: float = 0.2,
        max_wait: float = 300.0,
        on_call: OnCall | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.access = access
        self.quota = Quota()
        self.calls = 0
        self.moved_to: str | None = None
        self._base = access.base
        self._slots = asyncio.Semaphore(concurrency)
        self._reserve = reserve
        self._max_wait = max_wait
        self._on_call = on_call
        self._stop = stop or asyncio.Event()
        self._paused_until = 0.0
        self._in_flight = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            headers={
                "Accept": "application/json",
                "Authorization": aiohttp.encode_basic_auth(self.access.login, self.access.key),
            },
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> bytes:
        """GET a path under the API base; the answer's body."""
        return await self.request("GET", path, params=params)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> bytes:
        """One call within the limits; the body of its 200 answer, or ApiError."""
        async with self._slots:
            delays = backoff(1.0, 16.0)
            redirects = 0
            for attempt in range(1, ATTEMPTS + 1):
                await self._wait_for_turn()
                self._in_flight += 1
                try:
                    status, headers, data = await self._send(method, path, params, body)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = f"{type(exc).__name__}"
                    status = 0
                else:
                    problem = ""
                finally:
                    self._in_flight -= 1
                if status == 200:
                    return data
                if status == 429:
                    self._pause(_retry_after(headers.get("Retry-After")))
                    continue  # a 429 is not an attempt: the same request waits its turn
                if status in (301, 302, 307, 308) and redirects < MAX_REDIRECTS:
                    redirects += 1
                    self._moved(headers.get("Location"), data)
                    continue
                if status in (401, 403):
                    raise AuthFailed(self._refused(status))
                if status and status < 500:
                    raise ApiError(f"{self._where(method, path)}: {status} {_messages(data)}")
                problem = problem or f"HTTP {status}"
                if attempt == ATTEMPTS:
                    break
                delay = next(delays)
                log.warning(
                    "API call failed, retrying",
                    extra={"shop": self.access.shop, "problem": problem, "retry_in": delay},
                )
                await asyncio.sleep(delay)
            raise ApiError(
                f"{self._where(method, path)}: the API of shop {self.access.shop} at "
                f"{self._base} did not answer ({problem}) after {ATTEMPTS} attempts"
            )

    async def _send(
        self, method: str, path: str, params: Mapping[str, str] | None, body: Any
    ) -> tuple[int, Mapping[str, str], bytes]:
        assert self._session is not None, "use the client as `async with`"
        url = self._base + path
        if params:
            # Encoded here, `+` of a time offset included, and passed on as they are.
            query = "&".join(f"{quote(k)}={quote(str(v), safe=';')}" for k, v in params.items())
            url = f"{url}?{query}"
        data = None if body is None else msgspec.json.encode(body)
        async with self._session.request(
            method,
            URL(url, encoded=True),
            data=data,
            headers={"Content-Type": "application/json"} if data is not None else None,
            allow_redirects=False,  # a redirect would send the credentials on unchecked
        ) as response:
            payload = await response.read()
            self.calls += 1
            self.quota.update(response.headers)
            if self._on_call is not None:
                self._on_call(self.access.shop, str(response.status), self.quota)
            return response.status, response.headers, payload

    async def _wait_for_turn(self) -> None:
        """Wait out a 429's pause; refuse to start a call past the reserve or after a stop."""
        while True:
            if self._stop.is_set():
                raise Paused(f"shop {self.access.shop}: stopped on request")
            wait = self._paused_until - time.monotonic()
            if wait <= 0:
                break
            if wait > self._max_wait:
                raise Paused(
                    f"shop {self.access.shop}: the API asks to wait {wait:.0f} s "
                    f"(over UPGATES_API_MAX_WAIT); the next run resumes"
                )
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait([stop], timeout=wait)
            finally:
                stop.cancel()
        usable = self.quota.usable(self._reserve)
        if usable is not None and usable - self._in_flight <= 0:
            raise Paused(
                f"shop {self.access.shop}: the quota reached its reserve "
                f"({self.quota}); the next run resumes"
            )

    def _pause(self, seconds: float | None) -> None:
        # No usable Retry-After: a short pause, as for the limit of 3 at once.
        until = time.monotonic() + max(1.0, seconds if seconds is not None else 1.0)
        if until > self._paused_until:
            self._paused_until = until
            log.warning(
                "API rate limit: pausing every request",
                extra={"shop": self.access.shop, "seconds": round(until - time.monotonic(), 1)},
            )

    def _moved(self, location: str | None, data: bytes) -> None:
        """Follow a 301 to the shop's new API address; the operator must update UPGATES_API."""
        target = location
        if not target:
            try:
                target = msgspec.json.decode(data).get("api_url")
            except (msgspec.DecodeError, AttributeError):
                target = None
        if not target:
            raise ApiError(f"shop {self.access.shop}: the API answered 301 without a new address")
        parts = urlsplit(target)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ApiError(f"shop {self.access.shop}: the API moved to an unusable address")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        path = parts.path.rstrip("/")
        marker = path.find("/api/v2")
        base_path = path[: marker + len("/api/v2")] if marker >= 0 else path
        self._base = urlunsplit((parts.scheme, netloc, base_path, "", ""))
        self.moved_to = self._base
        log.warning(
            "the shop's API has moved: update its URL in UPGATES_API",
            extra={"shop": self.access.shop, "new_base": self._base},
        )

    def _refused(self, status: int) -> str:
        if status == 401:
            return (
                f"the API of shop {self.access.shop} ({self.access.masked}) refused its login "
                "and key (401): check UPGATES_API. Not retried: 5 failed logins an hour "
                "block this IP"
            )
        return (
            f"the API of shop {self.access.shop} ({self.access.masked}) answered 403: the API "
            "user is inactive or lacks the right, or this IP is blocked after failed logins"
        )

    def _where(self, method: str, path: str) -> str:
        return f"shop {self.access.shop}: {method} {path}"


def _messages(data: bytes) -> str:
    """The `message` texts of an error body (Upgates' own words), shortened."""
    try:
        body = schema.error_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "(no readable error body)"
    texts = [m.message for m in body.messages if m.message]
    return "; ".join(texts)[:300] or "(no message)"
