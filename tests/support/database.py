"""What the tables hold, read on a connection of the test's own."""

from __future__ import annotations

import asyncpg

from common.settings import Settings


async def connect_migrated(settings: Settings) -> asyncpg.Connection | None:
    """A connection to the test database once a worker has created the schema, else None."""
    try:
        conn = await asyncpg.connect(settings.database_url)
    except (OSError, asyncpg.PostgresError):
        return None
    if await conn.fetchval("SELECT to_regclass('customers') IS NOT NULL"):
        return conn
    await conn.close()
    return None


async def count_at_least(db: asyncpg.Connection, n: int) -> bool:
    """Whether the customers table has at least n rows."""
    return bool(await db.fetchval("SELECT count(*) FROM customers") >= n)
