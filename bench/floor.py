"""The keyed COPY floor: the burst's rows COPY'd by one connection into a table like `customers`.

Same columns, same primary key, same durability (logged, synchronous_commit on), no conflict
handling and no other work: no pipeline writing those rows can be faster. Each phase (creates,
then updates) goes into the empty table in one COPY, because COPY cannot write a key twice.

The rows travel as the worker sends them: times as int8 microseconds (store.times_as_micros).
Sent as datetimes, the same COPY took a fifth longer (asyncpg encodes a datetime slowly), and
the floor was that much too low.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from msgspec.structs import astuple

from bench.data import Payload, rows_of
from worker.store import BATCH_COLUMNS, times_as_micros

TABLE = "bench_floor"


@dataclass(frozen=True, slots=True)
class Floor:
    """Records COPY'd and how long the COPYs took."""

    records: int
    seconds: float

    @property
    def records_per_s(self) -> float:
        """The floor's rate."""
        return self.records / self.seconds if self.seconds else 0.0


async def checkpoint(conn: asyncpg.Connection) -> None:
    """Start each measurement with the same (clean) WAL state, when allowed to."""
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def empty_table(conn: asyncpg.Connection) -> None:
    """TABLE, new and empty: the columns and primary key of `customers`, nothing else."""
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"CREATE TABLE {TABLE} (LIKE customers INCLUDING ALL)")


async def copy_rows(conn: asyncpg.Connection, tuples: list[tuple[Any, ...]]) -> None:
    """COPY rows (as write_batch sends them: astuple of each Row) into TABLE."""
    await conn.copy_records_to_table(TABLE, records=tuples, columns=BATCH_COLUMNS)


async def measure_floor(dsn: str, payloads: list[Payload]) -> Floor:
    """COPY each phase's rows (built outside the timing) into an empty keyed table."""
    conn = await asyncpg.connect(dsn)
    try:
        await times_as_micros(conn)
        await empty_table(conn)
        records = 0
        seconds = 0.0
        for event in ("create", "update"):
            phase = [p for p in payloads if p.event == event]
            tuples = [astuple(row) for row in rows_of(phase)]  # as write_batch sends them
            await conn.execute(f"TRUNCATE {TABLE}")
            await checkpoint(conn)
            started = time.perf_counter()
            await copy_rows(conn, tuples)
            seconds += time.perf_counter() - started
            records += sum(p.records for p in phase)
        await conn.execute(f"DROP TABLE {TABLE}")
    finally:
        await conn.close()
    return Floor(records, seconds)
