"""Purging rejected records and dead letters past their retention, one worker at a time."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime, timedelta

import asyncpg

from common.deadletters import dead_lettered_at, open_dead_letters
from common.settings import Settings
from worker.store import RETENTION_LOCK, purge_rejected

log = logging.getLogger(__name__)

# Dead letters looked at per retention run (each is held unacked until the run ends).
RETENTION_SCAN_LIMIT = 10_000


async def apply_retention(
    settings: Settings, db: asyncpg.Pool | asyncpg.Connection
) -> tuple[int, int]:
    """Purge rejected records and dead letters older than their retention; (rows, letters).

    A dead letter's age counts from when it was dead-lettered: one that failed today keeps its
    full retention for the operator to look at, however long ago its webhook was received.
    """
    now = datetime.now(UTC)
    rows = await purge_rejected(db, settings.rejected_retention_days)
    cutoff = now - timedelta(days=settings.dead_letter_retention_days)
    letters = 0
    async with open_dead_letters(settings) as dlq:
        for letter in await dlq.scan(RETENTION_SCAN_LIMIT):
            died = dead_lettered_at(letter)
            if died is not None and died < cutoff:
                await dlq.drop(letter)
                letters += 1
    if rows or letters:
        log.info("retention applied", extra={"rejected_records": rows, "dead_letters": letters})
    return rows, letters


async def keep_retention(
    settings: Settings, pool: asyncpg.Pool, first_run: tuple[float, float]
) -> None:
    """Apply retention soon after start, then every RETENTION_INTERVAL, one worker at a time."""
    interval = settings.retention_interval
    delay = min(interval, random.uniform(*first_run))  # noqa: S311 - jitter, not a secret
    while True:
        await asyncio.sleep(delay)
        delay = interval
        try:
            # The purge runs on the lock's connection: one connection, whatever it has to
            # delete, and the rest of the pool stays free for the batches.
            async with pool.acquire() as conn:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
                    continue  # another worker is at it
                try:
                    await apply_retention(settings, conn)
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
        except Exception as exc:  # noqa: BLE001 - retention must never stop the worker
            log.warning("retention failed: %s; next try in an interval", type(exc).__name__)
