"""Operator commands: dead letters and rejected records, counts and reasons without emails.

Each command prints plain text for a person. Customer data is printed only with
--show-personal-data: `dead show` otherwise prints the few fields that say which record it is
and when (SHOWN_FIELDS), and only the names of the others. A command that deletes asks first
(y/N on a terminal, --yes anywhere else) and shows what it would delete with --dry-run.
Exit statuses: 0 done; 1 failed, not found or not confirmed; 2 a deletion refused for want of
--yes (no terminal to ask on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
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
# The fields of a customer record `dead show` prints without --show-personal-data: which record
# it is and when, never who (names, emails, phones, addresses and whatever else Upgates sends).
SHOWN_FIELDS = frozenset(
    {
        "customer_id",
        "code",
        "creation_time",
        "last_update_time",
        "deletion_time",
        "active_yn",
        "blocked_yn",
    }
)
Out = Callable[[str], None]


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _redact_record(record: object) -> object:
    if not isinstance(record, dict):
        return HIDDEN
    return {
        key: value if key in SHOWN_FIELDS and _scalar(value) else HIDDEN
        for key, value in record.items()
    }


def redact(body: bytes) -> str:
    """The webhook body with only SHOWN_FIELDS' values; every other field by its name only."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return f"<{len(body)} bytes, not JSON>"
    if not isinstance(data, dict):
        return f"<{len(body)} bytes of JSON, not a webhook: {HIDDEN}>"
    shown: dict[str, object] = {}
    for key, value in data.items():
        if key == "customers" and isinstance(value, list):
            shown[key] = [_redact_record(record) for record in value]
        elif key == "project_name" and _scalar(value):  # the shop, printed by `dead list` too
            shown[key] = value
        else:
            shown[key] = HIDDEN
    return msgspec.json.encode(shown).decode()


def _line(letter: DeadLetter) -> str:
    received = letter.received_at.isoformat(timespec="seconds") if letter.received_at else "?"
    return (
        f"id={letter.id}  {received}  shop={letter.shop}  event={letter.event}  "
        f"records={letter.records}  reason={letter.reason}"
    )


def _names(letter: DeadLetter) -> set[str]:
    """Every id an operator may know this letter by (`dead list` prints the first of these)."""
    return {name for name in (letter.request_id, letter.message.message_id) if name}


def _selected(
    args: argparse.Namespace, letters: list[DeadLetter], out: Out
) -> tuple[list[DeadLetter], bool]:
    """The letters the command names, and whether every id it names was found (said if not)."""
    if getattr(args, "all", False):
        return letters, True
    wanted = set(getattr(args, "ids", None) or [])
    found: set[str] = set()
    chosen = []
    cutoff = _cutoff(args.older_than) if getattr(args, "older_than", None) is not None else None
    for letter in letters:
        named = wanted & _names(letter)
        found |= named
        old = cutoff is not None and letter.received_at is not None and letter.received_at < cutoff
        if named or old:
            chosen.append(letter)
    for name in sorted(wanted - found):
        out(f"no dead letter with id {name}")
    return chosen, wanted <= found


async def _refused(args: argparse.Namespace, out: Out, listing: list[str], question: str) -> int:
    """0 once the operator agreed to a deletion (--yes, or y on a terminal); else an exit status."""
    if args.yes:
        return 0
    if not sys.stdin.isatty():
        out("nothing deleted: confirm with --yes, or run on a terminal to be asked")
        return 2
    for line in listing:
        out(line)
    try:
        # In a thread: the event loop keeps the broker connection's heartbeats going meanwhile.
        answer = await asyncio.to_thread(input, f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in {"y", "yes"}:
        return 0
    out("nothing deleted")
    return 1


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
    """List dead letters with their ids and reasons."""
    async with open_dead_letters(settings) as dlq:
        letters = await dlq.scan(args.limit)
        for letter in letters:
            out(_line(letter))
        more = " (limit reached: there may be more)" if len(letters) == args.limit else ""
        out(f"{len(letters)} dead letter(s){more}")
    return 0


async def dead_show(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """One dead letter in full: headers and body (personal data hidden unless asked)."""
    async with open_dead_letters(settings) as dlq:
        letters = await dlq.scan(args.limit)
        matches = [letter for letter in letters if args.id in _names(letter)]
        if not matches and args.id.isdigit() and 1 <= int(args.id) <= len(letters):
            # Read-only, so a place in the listing will do; the id printed says which it was.
            matches = [letters[int(args.id) - 1]]
        if not matches:
            out(f"no dead letter with id {args.id}")
            return 1
        letter = matches[0]
        out(_line(letter))
        if len(matches) > 1:
            out(f"  ({len(matches)} dead letters have this id; this is the first)")
        for key, value in sorted((letter.message.headers or {}).items()):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            out(f"  header {key}: {text}")
        try:
            if letter.message.content_type == BUNDLE:  # left whole by RabbitMQ (delivery limit)
                webhooks = unpack(letter.message, settings.max_body_bytes)
                bodies = [
                    (f"  webhook event={w.event} shop={w.project_name} records={w.records} "
                     f"request_id={w.request_id}", w.body)
                    for w in webhooks
                ]  # fmt: skip
            else:
                bodies = [("", body_of(letter.message, settings.max_body_bytes))]
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
    """Publish selected dead letters to the customer queue again (harmless to repeat)."""
    async with open_dead_letters(settings) as dlq:
        letters, all_found = _selected(args, await dlq.scan(args.limit), out)
        if args.dry_run:
            for letter in letters:
                out(_line(letter))
            out(f"would replay {len(letters)} dead letter(s)")
            return 0 if all_found else 1
        failed = 0
        for letter in letters:
            try:
                await dlq.replay(letter)
            except ValueError as exc:
                failed += 1
                out(f"skipped id={letter.id}: {exc}")
        out(f"replayed {len(letters) - failed} dead letter(s)")
    return 0 if all_found and not failed else 1


async def dead_purge(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Delete selected dead letters for good, once confirmed."""
    async with open_dead_letters(settings) as dlq:
        letters, all_found = _selected(args, await dlq.scan(args.limit), out)
        listing = [_line(letter) for letter in letters]
        if args.dry_run:
            for line in listing:
                out(line)
            out(f"would purge {len(letters)} dead letter(s)")
            return 0 if all_found else 1
        if letters:
            question = f"Delete these {len(letters)} dead letter(s) for good?"
            if status := await _refused(args, out, listing, question):
                return status
        for letter in letters:
            await dlq.drop(letter)
        out(f"purged {len(letters)} dead letter(s)")
    return 0 if all_found else 1


# What a purge of rejected records selects, counted then deleted: received before $1, of shop
# $2 (NULL: of every shop).
COUNT_REJECTED_SELECTED = (
    "SELECT project_name, event, reason, count(*) AS n FROM rejected_records"
    " WHERE received_at < $1 AND ($2::text IS NULL OR project_name = $2)"
    " GROUP BY 1, 2, 3 ORDER BY n DESC"
)
DELETE_REJECTED_SELECTED = (
    "DELETE FROM rejected_records"
    " WHERE received_at < $1 AND ($2::text IS NULL OR project_name = $2)"
)


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
    """Delete rejected records, all or those older than N days (of one shop), once confirmed."""
    async with _database(settings) as conn:
        # One instant for the count shown and the delete: what arrives meanwhile stays.
        before = datetime.now(UTC) if args.all else _cutoff(args.older_than)
        groups = await conn.fetch(COUNT_REJECTED_SELECTED, before, args.shop)
        count = sum(r["n"] for r in groups)
        listing = [
            f"  {r['n']:>7}  shop={r['project_name']}  event={r['event']}  reason={r['reason']}"
            for r in groups
        ]
        if args.dry_run:
            for line in listing:
                out(line)
            out(f"would purge {count} rejected record(s)")
            return 0
        if count:
            question = f"Delete these {count} rejected record(s) for good?"
            if status := await _refused(args, out, listing, question):
                return status
        status = await conn.execute(DELETE_REJECTED_SELECTED, before, args.shop)
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
    # The configured periods are the confirmation: the workers apply them unasked.
    args.all, args.ids, args.dry_run, args.yes = False, [], False, True
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
    p = dead.add_parser("list", help="list dead letters with ids and reasons (no customer data)")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(command=dead_list)
    p = dead.add_parser("show", help="show one dead letter, personal data hidden")
    p.add_argument("id", metavar="ID", help="its id from `dead list` (or N: the Nth listed now)")
    p.add_argument(
        "--show-personal-data", action="store_true", help="every field, names and emails too"
    )
    p.add_argument("--limit", type=int, default=100_000, help="dead letters to look through")
    p.set_defaults(command=dead_show)
    for name, command, verb, done in (
        ("replay", dead_replay, "publish again", "published again"),
        ("purge", dead_purge, "delete for good", "deleted"),
    ):
        p = dead.add_parser(name, help=f"{verb} dead letters")
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--all", action="store_true")
        which.add_argument(
            "--id",
            "--request-id",
            dest="ids",
            action="append",
            metavar="ID",
            help="an id from `dead list` (repeatable)",
        )
        which.add_argument("--older-than", type=float, metavar="DAYS")
        p.add_argument("--limit", type=int, default=100_000)
        p.add_argument("--dry-run", action="store_true", help=f"list what would be {done}; no more")
        if command is dead_purge:
            p.add_argument("--yes", action="store_true", help="delete without asking")
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
    p = rejected.add_parser("purge", help="delete rejected records for good")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true")
    which.add_argument("--older-than", type=float, metavar="DAYS")
    p.add_argument("--shop")
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted; no more")
    p.add_argument("--yes", action="store_true", help="delete without asking")
    p.set_defaults(command=rejected_purge)

    p = groups.add_parser("retention", help="apply the retention periods now")
    p.add_argument("--limit", type=int, default=100_000)
    p.set_defaults(command=retention)

    add_shop_commands(groups)
    return parser
