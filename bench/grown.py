"""The grown table: `customers` filled with other shops' rows before a burst.

A pipeline serving several shops holds millions of customers within a year; a burst for one
shop then writes into a large table and a deep index. The rows are made by Postgres itself
(generate_series), in the shape the workers write: a few million take a minute, not an hour
through the pipeline. VACUUM ANALYZE afterwards stands for the autovacuum a live table has had.
"""

from __future__ import annotations

import time

import asyncpg

from bench.floor import checkpoint

SHOPS = 20  # the other shops' rows, spread over this many project names

# Each row as a worker would have written it for an update seen after its create: the
# fingerprints are the JSON text of the values (worker/fold.py).
FILL = """
INSERT INTO customers (
    project_name, customer_id, email, code, active_yn, blocked_yn, created_at, updated_at,
    deleted_at, version_at, version_rank, version_fp, status_at, status_rank, status_fp)
SELECT 'grown-shop-' || (i % $2), i / $2 + 1,
       'customer' || i || '@example.cz', 'C' || i, true, false,
       t - interval '30 days', t, NULL, t, 1,
       convert_to('[true,false,"customer' || i || '@example.cz","C' || i || '"]', 'UTF8'),
       t, 1, convert_to('[true,false]', 'UTF8')
FROM generate_series(0, $1 - 1) AS i,
     LATERAL (SELECT timestamptz '2025-01-01 00:00+00' + (i % 86400) * interval '1 second') AS s(t)
"""


async def grow(dsn: str, rows: int) -> float:
    """Fill the (empty) customers table with `rows` rows of other shops; the seconds it took."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(FILL, rows, SHOPS, timeout=3600)
        await conn.execute("VACUUM ANALYZE customers", timeout=3600)
        await checkpoint(conn)
    finally:
        await conn.close()
    return time.perf_counter() - started
