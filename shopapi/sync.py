"""Make the table equal to a shop's REST API, under the same event-time rules as webhooks.

Each page of customers becomes the webhook bodies that would have carried the same state
(schema.customers_as_webhooks) and goes through the worker's own decoder, fold and write:
one write path, so a sync is idempotent and safe beside live webhooks, in any order.

- Incremental (the default once a shop had a full scan): the customers changed since the last
  sync began, less SYNC_OVERLAP for clock skew and whole-second times.
- Full (the first sync of a shop, or --full): every page. Then each of the shop's live rows
  that no page showed is a candidate tombstone, and its absence is confirmed with the API
  (`ids=`) first: a customer deleted mid-scan shifts its neighbours to pages already read.
  Rows written after the scan began (by a webhook) are never candidates.
- Where a scan stands is stored after every page (sync_state), so a run stopped by the quota
  reserve, a 429, a signal or a crash resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from common.backoff import backoff
from shopapi import schema
from shopapi.client import ApiError, Client
from worker.fold import PRAGUE, Row, as_datetime, decode_payload, fold, micros
from worker.store import RejectedFrom, is_transient, write_batch

log = logging.getLogger(__name__)

SYNC_LOCK = 0x7379  # pg_advisory_lock(SYNC_LOCK, hashtext(shop)): one sync per shop at a time
CONFIRM_IDS = 100  # ids per confirming request: one page of answers
WRITE_ATTEMPTS = 8


@dataclass(slots=True)
class Summary:
    """What a sync did; `line()` is the one-line summary printed at its end."""

    shop: str
    kind: str = "incremental"
    pages: int = 0
    pages_total: int = 0
    customers: int = 0
    changed: int = 0
    tombstones: int = 0
    calls: int = 0
    quota: str = ""
    stopped: str | None = None  # why it stopped early, if it did
    exit_status: int = 0
    complete: bool = False

    def line(self) -> str:
        """One line for the operator."""
        state = "complete" if self.complete else "stopped"
        return (
            f"{self.shop}: {self.kind} sync {state}: {self.pages}/{self.pages_total} pages, "
            f"{self.customers} customers read, {self.changed} rows changed, "
            f"{self.tombstones} tombstones, {self.calls} API calls, quota left {self.quota}"
        )


Progress = Callable[[Summary], None]

LOAD_STATE = "SELECT * FROM sync_state WHERE project_name = $1"
NOW = "SELECT now()"
START_SCAN = """
INSERT INTO sync_state (project_name, scan_kind, scan_started_at, scan_from, scan_next_page)
VALUES ($1, $2, $3, $4, 1)
ON CONFLICT (project_name) DO UPDATE SET scan_kind = $2, scan_started_at = $3, scan_from = $4,
    scan_next_page = 1
"""
SAVE_POSITION = "UPDATE sync_state SET scan_next_page = $2 WHERE project_name = $1"
FINISH_SCAN = """
UPDATE sync_state SET scan_kind = NULL, scan_started_at = NULL, scan_from = NULL,
    scan_next_page = NULL, last_success_at = now(),
    watermark = CASE WHEN $3 THEN scan_started_at ELSE watermark END,
    last_full_scan_at = CASE WHEN $2 = 'full' THEN scan_started_at ELSE last_full_scan_at END
WHERE project_name = $1
"""
FORGET_SEEN = "DELETE FROM sync_seen WHERE project_name = $1"
REMEMBER_SEEN = """
INSERT INTO sync_seen (project_name, customer_id) SELECT $1, unnest($2::bigint[])
ON CONFLICT DO NOTHING
"""
# The shop's live rows no page showed, that nothing wrote since the scan began.
TOMBSTONE_CANDIDATES = """
SELECT c.customer_id, c.version_at FROM customers c
WHERE c.project_name = $1 AND c.deleted_at IS NULL AND c.ingested_at < $2
  AND NOT EXISTS (SELECT 1 FROM sync_seen s
                  WHERE s.project_name = c.project_name AND s.customer_id = c.customer_id)
ORDER BY c.customer_id
"""


async def sync_shop(
    client: Client,
    pool: asyncpg.Pool,
    *,
    full: bool = False,
    overlap: float = 300.0,
    since: datetime | None = None,
    concurrency: int = 3,
    progress: Progress | None = None,
) -> Summary:
    """Sync one shop; the summary says how far it got (never raises ApiError).

    `pool` comes from worker.store.open_pool. `since`: read changes from no later than this
    (the last success of a webhook that then failed). The run stops early, its position
    stored, when the client pauses (quota reserve, a long Retry-After, a stop request).
    """
    shop = client.access.shop
    summary = Summary(shop)
    async with pool.acquire() as conn:
        locked = await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", SYNC_LOCK, shop
        )
        if not locked:
            summary.stopped = f"a sync of shop {shop} is already running"
            summary.exit_status = 1
            return summary
        try:
            run = _Run(client, pool, summary, concurrency, progress)
            try:
                await run.run(full, overlap, since)
            except ApiError as exc:
                summary.stopped, summary.exit_status = str(exc), exc.exit_status
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", SYNC_LOCK, shop)
    summary.calls, summary.quota = client.calls, str(client.quota)
    return summary


def _api_time(micros: int) -> str:
    """A time as the API writes them: Prague local time with its offset, whole seconds."""
    return as_datetime(micros).astimezone(PRAGUE).isoformat(timespec="seconds")


@dataclass(slots=True)
class _Run:
    client: Client
    pool: asyncpg.Pool
    summary: Summary
    concurrency: int
    progress: Progress | None
    started_at: int = 0  # micros, the database's clock
    next_page: int = 1
    done: set[int] = field(default_factory=set)
    counts: set[int] = field(default_factory=set)  # number_of_items as each page stated it

    @property
    def shop(self) -> str:
        return self.client.access.shop

    async def run(self, full: bool, overlap: float, since: datetime | None) -> None:
        state = await self.pool.fetchrow(LOAD_STATE, self.shop)
        params: dict[str, str] = {}
        if (
            state is not None
            and state["scan_kind"]
            and not (full and state["scan_kind"] == "incremental")
        ):
            kind, self.started_at = state["scan_kind"], state["scan_started_at"]
            self.next_page = state["scan_next_page"]
            if kind == "incremental":
                params["last_update_time_from"] = _api_time(state["scan_from"])
            log.info(
                "resuming the sync", extra={"shop": self.shop, "kind": kind, "page": self.next_page}
            )
        else:
            kind = (
                "full"
                if full or state is None or state["last_full_scan_at"] is None
                else "incremental"
            )
            self.started_at = await self.pool.fetchval(NOW)
            scan_from = None
            if kind == "incremental":
                scan_from = state["watermark"] if state is not None else None
                if scan_from is None:
                    scan_from = self.started_at
                if since is not None:
                    scan_from = min(scan_from, micros(since))
                scan_from -= int(overlap * 1_000_000)
                params["last_update_time_from"] = _api_time(scan_from)
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(FORGET_SEEN, self.shop)
                await conn.execute(START_SCAN, self.shop, kind, self.started_at, scan_from)
        self.summary.kind = kind
        await self._read_pages(kind, params)
        if kind == "full":
            await self._confirm_absences()
        complete_window = len(self.counts) <= 1
        if not complete_window:
            # Pages shifted under the scan: keep the watermark, so the next run reads it again.
            log.warning(
                "customers changed during the scan; the next sync reads the window again",
                extra={"shop": self.shop},
            )
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(FINISH_SCAN, self.shop, kind, kind == "full" or complete_window)
            await conn.execute(FORGET_SEEN, self.shop)
        self.summary.complete = True
        self._report()

    async def _read_pages(self, kind: str, params: dict[str, str]) -> None:
        start = self.next_page
        first = await self._fetch(start, params)  # alone: learns the page count
        total = max(first.number_of_pages, start)
        self.summary.pages_total = total
        self.summary.pages = start - 1  # pages before it were stored by an earlier run
        await self._store(first.customers, kind, start)
        pages = iter(range(start + 1, total + 1))
        failures: list[ApiError] = []

        async def reader() -> None:
            for page in pages:  # one iterator shared by the readers: each page read once
                if failures:
                    return
                try:
                    answer = await self._fetch(page, params)
                    await self._store(answer.customers, kind, page)
                except ApiError as exc:
                    failures.append(exc)
                    return

        await asyncio.gather(*(reader() for _ in range(self.concurrency)))
        if failures:
            raise failures[0]

    async def _fetch(self, page: int, params: dict[str, str]) -> schema.CustomersPage:
        body = await self.client.get("/customers", {**params, "page": str(page)})
        try:
            answer = schema.page_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ApiError(
                f"shop {self.shop}: an unreadable page of customers ({exc.__class__.__name__})"
            ) from None
        if "ids" not in params:
            self.counts.add(answer.number_of_items)
        return answer

    async def _store(
        self, customers: list[schema.Customer], kind: str | None, page: int | None
    ) -> None:
        """Write a page's customers; then remember them (full scans) and the position."""
        tag = f"{self.started_at}-{page if page is not None else self.summary.customers}"
        bodies = schema.customers_as_webhooks(self.shop, customers)
        rows, rejected = _decode(self.shop, bodies, tag)
        changed = await _write(self.pool, fold(rows), rejected)  # not `+= await`: pages race
        self.summary.changed += changed
        self.summary.customers += len(customers)
        if page is None:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            if kind == "full":
                await conn.execute(REMEMBER_SEEN, self.shop, sorted({r.customer_id for r in rows}))
            self.done.add(page)
            while self.next_page in self.done:
                self.next_page += 1
            await conn.execute(SAVE_POSITION, self.shop, self.next_page)
        self.summary.pages += 1
        self._report()

    async def _confirm_absences(self) -> None:
        """Tombstone the candidates the API confirms it no longer has."""
        candidates = await self.pool.fetch(TOMBSTONE_CANDIDATES, self.shop, self.started_at)
        for start in range(0, len(candidates), CONFIRM_IDS):
            chunk = candidates[start : start + CONFIRM_IDS]
            ids = ";".join(str(c["customer_id"]) for c in chunk)
            answer = await self._fetch(1, {"ids": ids})
            # Still there: on a page that shifted while the scan ran. Stored as read now.
            await self._store(answer.customers, kind=None, page=None)
            present = {str(c.customer_id) for c in answer.customers}
            now = await self.pool.fetchval(NOW)
            gone = [
                # After the row's own time, so the delete wins even over a clock running ahead.
                (c["customer_id"], as_datetime(max(now, c["version_at"] + 1_000_000)).isoformat())
                for c in chunk
                if str(c["customer_id"]) not in present
            ]
            if gone:
                body = {"delete": schema.deletes_as_webhook(self.shop, gone)}
                rows, rejected = _decode(self.shop, body, f"{self.started_at}-confirm-{start}")
                await _write(self.pool, fold(rows), rejected)
                self.summary.tombstones += len(gone)
                log.info(
                    "tombstoned customers the shop no longer has",
                    extra={"shop": self.shop, "customers": len(gone)},
                )

    def _report(self) -> None:
        self.summary.calls, self.summary.quota = self.client.calls, str(self.client.quota)
        if self.progress is not None:
            self.progress(self.summary)


def _decode(shop: str, bodies: dict[str, bytes], tag: str) -> tuple[list[Row], list[RejectedFrom]]:
    """The rows of webhook bodies, and their rejected records, exactly as a worker decodes them."""
    rows: list[Row] = []
    rejected: list[RejectedFrom] = []
    now = micros(datetime.now(UTC))
    for event, body in bodies.items():
        _, event_rows, event_rejected = decode_payload(event, body)
        rows.extend(event_rows)
        request_id = f"sync-{shop}-{tag}-{event}"
        rejected.extend(RejectedFrom(shop, now, request_id, r) for r in event_rejected)
    return rows, rejected


async def _write(pool: asyncpg.Pool, rows: list[Row], rejected: list[RejectedFrom]) -> int:
    """write_batch with the worker's retry rule: transient failures are retried."""
    delays = backoff(0.2, 5.0)
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            changed: dict[Any, int] = await write_batch(pool, rows, rejected)
            return sum(changed.values())
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            if not is_transient(exc) or attempt == WRITE_ATTEMPTS:
                raise ApiError(f"writing to Postgres failed: {type(exc).__name__}") from None
            await asyncio.sleep(next(delays))
    raise AssertionError("unreachable")
