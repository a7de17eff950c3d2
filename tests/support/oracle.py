"""The one oracle of the fold: what the customers table must hold after a set of delivered events.

Written from the docs' rules (contract.md, "State in Postgres"), independently of worker/fold.py
and of the SQL: the table is the replay of the events in time order, each one overwriting its
customer's row. The newest event gives the email (none after a delete) and the code, and the
tombstone's time; the newest event that carries a status gives the status; created_at and
updated_at are the newest creation and update times. At equal times a delete beats an update
beats a create.

``oracle(events)`` replays the property tests' events literally, in time order. ``Oracle`` takes
events in any order, as delivered (``accepted``: the records of a webhook answered 200): per
customer it keeps, column by column, what the newest event setting that column set, which is
what the replay leaves, and it grows with the customers, not with the events.
``assert_table_matches`` waits until a database's table is exactly the oracle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from worker.fold import fingerprint

if TYPE_CHECKING:
    from tests.support.events import Event

RANKS = {"create": 0, "update": 1, "delete": 2}
TIME_FIELD = {"create": "creation_time", "update": "last_update_time", "delete": "deletion_time"}
COLUMNS = ("email", "code", "active_yn", "blocked_yn", "created_at", "updated_at", "deleted_at")

Key = tuple[str, int]  # (project_name, customer_id)
Version = tuple[datetime, int, bytes]  # an event's place in the replay


def carried(kind: str, email: str | None, code: str | int | None) -> tuple[str | None, str | None]:
    """The email and code an event leaves on its row: a delete erases the email; code is text."""
    return (None if kind == "delete" else email), (str(code) if isinstance(code, int) else code)


def version(
    kind: str,
    when: datetime,
    email: str | None,
    code: str | int | None,
    active: bool | None,
    blocked: bool | None,
) -> Version:
    """The order of the replay: time, then delete > update > create.

    Two different events of the same kind in the same second have no natural order; the
    project settles them by their values as JSON text (`fingerprint`), and the replay must use
    the same arbitrary choice to be comparable. Everything else here is independent of fold.py.
    """
    return (when, RANKS[kind], fingerprint(*carried(kind, email, code), active, blocked))


@dataclass(slots=True)
class _Customer:
    """One customer's row as the replay leaves it so far, and the versions that set it."""

    version: Version  # of the newest event: email, code, deleted_at
    email: str | None
    code: str | None
    deleted_at: datetime | None
    status_version: Version | None = None  # of the newest event carrying a status
    active_yn: bool | None = None
    blocked_yn: bool | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Oracle:
    """The table after replaying, in time order, every event given to `apply` or `accepted`."""

    def __init__(self) -> None:
        self.customers: dict[Key, _Customer] = {}

    def apply(
        self,
        project: str,
        kind: str,
        customer_id: int,
        when: datetime,
        email: str | None,
        code: str | int | None,
        active_yn: bool | None,
        blocked_yn: bool | None,
    ) -> None:
        """One event: what its record carries (None where it carries nothing)."""
        at = version(kind, when, email, code, active_yn, blocked_yn)
        email, text = carried(kind, email, code)
        deleted_at = when if kind == "delete" else None
        row = self.customers.get((project, customer_id))
        if row is None:
            row = self.customers[(project, customer_id)] = _Customer(at, email, text, deleted_at)
        elif at >= row.version:  # equal versions carry equal values
            row.version, row.email, row.code, row.deleted_at = at, email, text, deleted_at
        if (active_yn is not None or blocked_yn is not None) and (
            row.status_version is None or at >= row.status_version
        ):
            row.status_version, row.active_yn, row.blocked_yn = at, active_yn, blocked_yn
        if kind == "create":
            row.created_at = max(t for t in (row.created_at, when) if t is not None)
        if kind == "update":
            row.updated_at = max(t for t in (row.updated_at, when) if t is not None)

    def accepted(self, project: str, kind: str, records: Iterable[dict[str, Any]]) -> None:
        """The records of one webhook answered 200, as they were sent (times with an offset)."""
        for record in records:
            when = datetime.strptime(record[TIME_FIELD[kind]], "%Y-%m-%dT%H:%M:%S%z")
            self.apply(
                project,
                kind,
                int(record["customer_id"]),
                when.astimezone(UTC),
                record.get("email"),
                record.get("code"),
                record.get("active_yn"),
                record.get("blocked_yn"),
            )

    def table(self) -> dict[Key, dict[str, Any]]:
        """Every row as the table shows it, by (project_name, customer_id)."""
        return {
            key: {"project_name": key[0], "customer_id": key[1]}
            | {column: getattr(row, column) for column in COLUMNS}
            for key, row in self.customers.items()
        }

    def expected(self, columns: Sequence[str] = COLUMNS) -> dict[Key, tuple[Any, ...]]:
        """Every row's values of `columns`, by (project_name, customer_id)."""
        return {
            key: tuple(getattr(row, column) for column in columns)
            for key, row in self.customers.items()
        }


def oracle(events: Iterable[Event]) -> dict[Key, dict[str, Any]]:
    """The table after replaying the events in time order, one by one, literally."""

    def order(event: Event) -> Version:
        return version(
            event.event, event.time, event.email, event.code, event.active_yn, event.blocked_yn
        )

    replay = Oracle()
    for event in sorted(events, key=order):
        replay.apply(
            event.project,
            event.event,
            event.customer_id,
            event.time,
            event.email,
            event.code,
            event.active_yn,
            event.blocked_yn,
        )
    return replay.table()


# --- a real table against the oracle --------------------------------------------------------

CHECKED = ("email", "code", "active_yn", "created_at", "updated_at", "deleted_at")
Row = tuple[Any, ...]  # the CHECKED columns of one customer


async def table_of(conn: asyncpg.Connection, shop: str) -> dict[int, Row]:
    """The shop's rows, by customer_id: the CHECKED columns."""
    rows = await conn.fetch(
        "SELECT customer_id, email, code, active_yn, created_at, updated_at, deleted_at"
        " FROM customers WHERE project_name = $1",
        shop,
    )
    return {r["customer_id"]: tuple(r.values())[1:] for r in rows}


async def assert_table_matches(
    database_url: str,
    oracle: Oracle,
    shop: str = "steady-shop",
    timeout: float = 15,  # noqa: ASYNC109
    logs: str = "",
) -> None:
    """The customers table becomes exactly the oracle: nothing missing, wrong, extra or twice."""
    want = {cid: row for (project, cid), row in oracle.expected(CHECKED).items() if project == shop}
    assert want, "the sender got no 200 at all"
    conn: asyncpg.Connection | None = None
    got: dict[int, Row] = {}
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(database_url, timeout=5)
                got = await table_of(conn, shop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn = None
            if got == want or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        assert conn is not None, "cannot read the database"
        duplicates = await conn.fetchval(
            "SELECT count(*) - count(DISTINCT (project_name, customer_id)) FROM customers"
        )
        rejected = await conn.fetchval("SELECT count(*) FROM rejected_records")
    finally:
        if conn is not None:
            await conn.close()
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(cid for cid in set(want) & set(got) if want[cid] != got[cid])
    detail = [(cid, want[cid], got[cid]) for cid in wrong[:3]]
    assert (missing, extra, wrong, duplicates, rejected) == ([], [], [], 0, 0), (
        f"table != oracle of the 200s: {len(missing)} missing {missing[:10]}, "
        f"{len(extra)} extra {extra[:10]}, {len(wrong)} wrong {detail}, "
        f"{duplicates} duplicates, {rejected} rejected records (of {len(want)} customers)"
        + (f"\n{logs}" if logs else "")
    )
