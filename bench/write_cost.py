"""What Postgres spends writing a burst, phase by phase: the worker's write_batch against the floor.

    python -m bench.write_cost [--pg-url URL] [--rounds 3] [--shops 4 --blocks 25]

In a database of its own (dropped at the end), one connection writes the burst's creates, then
its updates, through `store.write_batch` in batches of two full payloads (10,000 rows, the
default BATCH_MAX_RECORDS), then the same updates again: nothing is left to change, so that
phase costs what getting the rows into the batch table and finding each one costs, without
writing a new version of any. Then each phase is COPY'd into an empty keyed table, as the floor
is (bench/floor.py). Each phase starts after a CHECKPOINT. Reported: CPU seconds of the Postgres
processes serving the database and of its WAL writer, checkpointer and background writer, as
bench.run counts them, read from /proc (the server must run on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from urllib.parse import urlsplit

import asyncpg
from msgspec.structs import astuple

from bench import floor, procs
from bench.data import Payload, burst_payloads, rows_of
from bench.run import migrated_database
from worker.fold import Row, fold
from worker.store import open_pool, times_as_micros, write_batch

PAYLOADS_PER_BATCH = 2  # 10,000 records: BATCH_MAX_RECORDS


async def _postgres_cpu(database: str, work: Awaitable[object]) -> float:
    before = procs.server_cpu(database)["postgres"]
    await work
    return procs.cpu_used(before, procs.server_cpu(database)["postgres"])


async def _write_all(pool: asyncpg.Pool, batches: list[list[Row]]) -> None:
    for rows in batches:
        await write_batch(pool, rows, [])


async def measure(dsn: str, payloads: list[Payload], rounds: int) -> list[dict[str, float]]:
    """Postgres' CPU seconds per phase, one dict per round."""
    database = urlsplit(dsn).path.lstrip("/")
    phases = {event: [p for p in payloads if p.event == event] for event in ("create", "update")}
    batches = {
        event: [
            fold(rows_of(group[i : i + PAYLOADS_PER_BATCH]))
            for i in range(0, len(group), PAYLOADS_PER_BATCH)
        ]
        for event, group in phases.items()
    }
    tuples = {event: [astuple(row) for row in rows_of(group)] for event, group in phases.items()}
    pool = await open_pool(dsn, min_size=1, max_size=1)
    conn = await asyncpg.connect(dsn)
    try:
        await times_as_micros(conn)
        results = []
        for _ in range(rounds):
            cost: dict[str, float] = {}
            await conn.execute("TRUNCATE customers")
            for label, event in (("creates", "create"), ("updates", "update"), ("again", "update")):
                await floor.checkpoint(conn)
                cost[label] = await _postgres_cpu(database, _write_all(pool, batches[event]))
            for label, event in (("floor creates", "create"), ("floor updates", "update")):
                await floor.empty_table(conn)
                await floor.checkpoint(conn)
                copy = floor.copy_rows(conn, tuples[event])
                cost[label] = await _postgres_cpu(database, copy)
            await conn.execute(f"DROP TABLE {floor.TABLE}")
            results.append(cost)
            print(
                f"creates {cost['creates']:.2f} s (floor {cost['floor creates']:.2f}), "
                f"updates {cost['updates']:.2f} s (floor {cost['floor updates']:.2f}), "
                f"the same updates again {cost['again']:.2f} s",
                flush=True,
            )
        return results
    finally:
        await conn.close()
        await pool.close()


async def main(argv: Sequence[str] | None = None) -> None:
    """Make a database, measure, drop it."""
    parser = argparse.ArgumentParser(prog="python -m bench.write_cost", description=__doc__)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shops", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=25, help="payloads of 5000 per shop")
    args = parser.parse_args(argv)
    name = f"bench_cost_{uuid.uuid4().hex[:10]}"
    try:
        dsn = await migrated_database(args.pg_url, name)
        await measure(dsn, burst_payloads(args.shops, args.blocks), args.rounds)
    finally:
        admin = await asyncpg.connect(args.pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
