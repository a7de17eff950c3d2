"""Operator commands: dead letters and rejected records, counts and reasons without emails.

Each command prints plain text for a person; customer data (the records, with their emails) is
printed only with --show-personal-data.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from admin.shop_commands import add_shop_commands
from common.deadletters import DeadLetter, open_dead_letters
from common.message import BUNDLE, body_of, unpack
from common.settings import Settings
from worker.store import purge_rejected

HIDDEN = "<hidden: --show-personal-data>"
Out = Callable[[str], None]


def redact(body: bytes) -> str:
    """The webhook body with every email hidden (or a note when it is not JSON)."""
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return f"<{len(body)} bytes, not JSON>"
    if isinstance(data, dict) and isinstance(data.get("customers"), list):
        for record in data["customers"]:
            if isinstance(record, dict) and "email" in record:
                record["email"] = HIDDEN
    return msgspec.json.encode(data).decode()


def _line(index: int, letter: DeadLetter) -> str:
    received = letter.received_at.isoformat(timespec="seconds") if letter.received_at else "?"
    return (
        f"{index:>4}  {received}  shop={letter.shop}  event={letter.event}  "
        f"records={letter.records}  request_id={letter.request_id}  reason={letter.reason}"
    )


def _selected(args: argparse.Namespace, letters: list[DeadLetter]) -> list[DeadLetter]:
    if getattr(args, "all", False):
        return letters
    chosen = []
    cutoff = _cutoff(args.older_than) if getattr(args, "older_than", None) is not None else None
    for index, letter in enumerate(letters, 1):
        named = index in (args.index or []) or letter.request_id in (args.request_id or [])
        old = cutoff is not None and letter.received_at is not None and letter.received_at < cutoff
        if named or old:
            chosen.append(letter)
    return chosen


@contextlib.asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        yield conn
    finally:
        await conn.close()


def _cutoff(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


async def dead_list(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """List dead letters with their reasons."""
    async with open_dead_letters(settings) as dlq:
        letters = await dlq.scan(args.limit)
        for index, letter in enumerate(letters, 1):
            out(_line(index, letter))
        more = " (limit reached: there may be more)" if len(letters) == args.limit else ""
        out(f"{len(letters)} dead letter(s){more}")
    return 0


async def dead_show(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """One dead letter in full: headers and body (emails hidden unless asked)."""
    async with open_dead_letters(settings) as dlq:
        letters = await dlq.scan(args.index)
        if len(letters) < args.index:
            out(f"no dead letter #{args.index}")
            return 1
        letter = letters[args.index - 1]
        out(_line(args.index, letter))
        for key, value in sorted((letter.message.headers or {}).items()):
            out(f"  header {key}: {value}")
        try:
            if letter.message.content_type == BUNDLE:  # left whole by RabbitMQ (delivery limit)
                webhooks = unpack(letter.message)
                bodies = [
                    (f"  webhook event={w.event} shop={w.project_name} records={w.records} "
                     f"request_id={w.request_id}", w.body)
                    for w in webhooks
                ]  # fmt: skip
            else:
                bodies = [("", body_of(letter.message))]
        except ValueError as exc:
            out(f"  body: <{len(letter.message.body)} bytes, unreadable: {exc}>")
            return 0
        for line, body in bodies:
            if line:
                out(line)
            text = body.decode("utf-8", "replace") if args.show_personal_data else redact(body)
            out(f"  body: {text}")
    return 0


async def dead_replay(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Publish selected dead letters to the customer queue again."""
    async with open_dead_letters(settings) as dlq:
        letters = _selected(args, await dlq.scan(args.limit))
        failed = 0
        for letter in letters:
            try:
                await dlq.replay(letter)
            except ValueError as exc:
                failed += 1
                out(f"skipped request_id={letter.request_id}: {exc}")
        out(f"replayed {len(letters) - failed} dead letter(s)")
    return 1 if failed else 0


async def dead_purge(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Delete selected dead letters for good."""
    async with open_dead_letters(settings) as dlq:
        letters = _selected(args, await dlq.scan(args.limit))
        for letter in letters:
            await dlq.drop(letter)
        out(f"purged {len(letters)} dead letter(s)")
    return 0


async def rejected_list(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Counts of rejected records by shop, event and reason, then the newest ones."""
    async with _database(settings) as conn:
        rows = await conn.fetch(
            "SELECT project_name, event, reason, count(*) AS n, max(received_at) AS newest"
            " FROM rejected_records WHERE ($1::text IS NULL OR project_name = $1)"
            " GROUP BY 1, 2, 3 ORDER BY n DESC",
            args.shop,
        )
        total = sum(r["n"] for r in rows)
        out(f"{total} rejected record(s)")
        for r in rows:
            out(
                f"  {r['n']:>7}  shop={r['project_name']}  event={r['event']}  "
                f"reason={r['reason']}  newest={r['newest'].isoformat(timespec='seconds')}"
            )
        recent = await conn.fetch(
            "SELECT id, project_name, event, reason, received_at FROM rejected_records"
            " WHERE ($1::text IS NULL OR project_name = $1) ORDER BY id DESC LIMIT $2",
            args.shop,
            args.limit,
        )
        if recent:
            out("newest:")
        for r in recent:
            out(
                f"  id={r['id']}  {r['received_at'].isoformat(timespec='seconds')}  "
                f"shop={r['project_name']}  event={r['event']}  reason={r['reason']}"
            )
    return 0


async def rejected_show(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """One rejected record (its data only with --show-personal-data)."""
    async with _database(settings) as conn:
        row = await conn.fetchrow("SELECT * FROM rejected_records WHERE id = $1", args.id)
    if row is None:
        out(f"no rejected record with id {args.id}")
        return 1
    for key in ("id", "project_name", "event", "reason", "received_at", "request_id", "position"):
        out(f"{key}: {row[key]}")
    out(f"record: {row['record'] if args.show_personal_data else HIDDEN}")
    return 0


async def rejected_purge(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Delete rejected records: all, or those older than N days (optionally of one shop)."""
    async with _database(settings) as conn:
        before = datetime.now(UTC) if args.all else _cutoff(args.older_than)
        status = await conn.execute(
            "DELETE FROM rejected_records"
            " WHERE received_at < $1 AND ($2::text IS NULL OR project_name = $2)",
            before,
            args.shop,
        )
    out(f"purged {status.rsplit(' ', 1)[-1]} rejected record(s)")
    return 0


async def retention(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Apply both retention periods now (the workers also do it every RETENTION_INTERVAL)."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        purged = await purge_rejected(pool, settings.rejected_retention_days)
    finally:
        await pool.close()
    out(f"purged {purged} rejected record(s) older than {settings.rejected_retention_days} days")
    args.all, args.index, args.request_id = False, [], []
    args.older_than = settings.dead_letter_retention_days
    return await dead_purge(settings, args, out)


Command = Callable[[Settings, argparse.Namespace, Out], Coroutine[Any, Any, int]]


def build_parser() -> argparse.ArgumentParser:
    """The command line: `upgates-admin dead|rejected|retention ...`."""
    parser = argparse.ArgumentParser(
        prog="upgates-admin",
        description="Inspect, replay and purge dead letters and rejected records. "
        "Connects with AMQP_URL and DATABASE_URL.",
    )
    groups = parser.add_subparsers(dest="group", required=True)

    dead = groups.add_parser("dead", help="the dead-letter queue").add_subparsers(
        dest="action", required=True
    )
    p = dead.add_parser("list", help="list dead letters with reasons (no customer data)")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(command=dead_list)
    p = dead.add_parser("show", help="show one dead letter (#INDEX from list)")
    p.add_argument("index", type=int)
    p.add_argument("--show-personal-data", action="store_true")
    p.set_defaults(command=dead_show)
    for name, command, verb in (
        ("replay", dead_replay, "publish again"),
        ("purge", dead_purge, "delete"),
    ):
        p = dead.add_parser(name, help=f"{verb} dead letters")
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--all", action="store_true")
        which.add_argument("--index", type=int, action="append", help="#INDEX from list")
        which.add_argument("--request-id", action="append")
        which.add_argument("--older-than", type=float, metavar="DAYS")
        p.add_argument("--limit", type=int, default=100_000)
        p.set_defaults(command=command)

    rejected = groups.add_parser("rejected", help="the rejected_records table").add_subparsers(
        dest="action", required=True
    )
    p = rejected.add_parser("list", help="counts by shop, event and reason; the newest records")
    p.add_argument("--shop")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(command=rejected_list)
    p = rejected.add_parser("show", help="show one rejected record by id")
    p.add_argument("id", type=int)
    p.add_argument("--show-personal-data", action="store_true")
    p.set_defaults(command=rejected_show)
    p = rejected.add_parser("purge", help="delete rejected records")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true")
    which.add_argument("--older-than", type=float, metavar="DAYS")
    p.add_argument("--shop")
    p.set_defaults(command=rejected_purge)

    p = groups.add_parser("retention", help="apply the retention periods now")
    p.add_argument("--limit", type=int, default=100_000)
    p.set_defaults(command=retention)

    add_shop_commands(groups)
    return parser
