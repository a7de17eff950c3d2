"""Decode a webhook body into events, and fold events into one row per customer.

Pure logic, no I/O. The fold is the time-ordered replay of the events, computed as a join:
every column is a function of the *set* of events seen, so any order and any number of repeats
give the same row. `store.UPSERT` applies the same join between a folded row and the table.

- The row's data (email, code, deleted_at) comes from the newest event by
  (time, rank, fingerprint): rank orders equal times as create < update < delete; the
  fingerprint (the event's values as JSON text, compared byte by byte) only settles two
  different events of the same kind in the same second, which Upgates' second-resolution
  timestamps allow. The status is ordered by (time, rank, its own values first in that text),
  an order that agrees with the data's, so a row never mixes two such events.
- A delete erases the email and leaves a tombstone (deleted_at); an older event never undoes it.
- active_yn/blocked_yn come from the newest event that carries them (creates do; updates may).
- created_at is the newest creation_time seen, updated_at the newest last_update_time seen:
  in the time-ordered replay every create and update is applied, whatever lost afterwards.

Every time on the path from decode to write is one integer: microseconds since 2000-01-01 UTC
(EPOCH), which is how Postgres stores a timestamptz. It compares and hashes faster than a
datetime, and travels to Postgres as that int8 itself (store.open_pool), which asyncpg encodes
far more cheaply. Other forms are converted at the edges only: a record's time as it is checked
(`to_row`), the receiver's millisecond stamp as a message is read (`micros_from_unix_ms`), and
datetimes for people and tests (`micros`, `as_datetime`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import msgspec

from common import schema

PRAGUE = ZoneInfo("Europe/Prague")
_encode = msgspec.json.Encoder().encode
RANK = {"create": 0, "update": 1, "delete": 2}
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
# Postgres' epoch: it stores a timestamptz as int8 microseconds since this instant.
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
# The instants a datetime can hold in UTC: a time outside them is rejected, as before it was kept.
FIRST_US = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // MICROSECOND
LAST_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // MICROSECOND
# The Unix epoch, 1970-01-01 UTC, in microseconds since EPOCH.
UNIX_EPOCH_US = (datetime(1970, 1, 1, tzinfo=UTC) - EPOCH) // MICROSECOND
# EPOCH in each fixed UTC offset seen so far (a few: Upgates sends +01:00 and +02:00).
_EPOCHS: dict[timezone, datetime] = {}


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that cannot be applied; it goes to rejected_records with the reason."""

    event: str
    reason: str
    record: str
    position: int  # index in the payload: with the request id, makes a redelivery harmless


class Row(msgspec.Struct, gc=False):
    """The folded state of one customer: the table's columns plus the versions that order them.

    A msgspec Struct: one is built for every record, and a Struct is much cheaper to build than a
    dataclass. gc=False keeps the cyclic garbage collector from walking the thousands alive at
    once (its fields are scalars, it can hold no cycle).
    """

    project_name: str
    customer_id: int
    email: str | None
    code: str | None
    deleted_at: int | None  # every time: microseconds since EPOCH (2000-01-01 UTC)
    version_at: int
    version_rank: int
    version_fp: bytes
    active_yn: bool | None
    blocked_yn: bool | None
    status_at: int | None
    status_rank: int | None
    status_fp: bytes | None
    created_at: int | None
    updated_at: int | None

    def version(self) -> tuple[int, int, bytes]:
        """What decides which event's data the row shows."""
        return (self.version_at, self.version_rank, self.version_fp)

    def status_version(self) -> tuple[int, int, bytes] | None:
        """What decides which event's active_yn/blocked_yn the row shows; None: no event yet."""
        if self.status_at is None or self.status_rank is None or self.status_fp is None:
            return None
        return (self.status_at, self.status_rank, self.status_fp)

    def merge(self, other: Row) -> None:
        """Join another state of the same customer into this one (commutative, idempotent)."""
        if other.version() > self.version():
            self.email, self.code, self.deleted_at = other.email, other.code, other.deleted_at
            self.version_at, self.version_rank = other.version_at, other.version_rank
            self.version_fp = other.version_fp
        theirs, ours = other.status_version(), self.status_version()
        if theirs is not None and (ours is None or theirs > ours):
            self.active_yn, self.blocked_yn = other.active_yn, other.blocked_yn
            self.status_at, self.status_rank = other.status_at, other.status_rank
            self.status_fp = other.status_fp
        self.created_at = _newest(self.created_at, other.created_at)
        self.updated_at = _newest(self.updated_at, other.updated_at)


def fingerprint(
    email: str | None, code: str | None, active: bool | None, blocked: bool | None
) -> bytes:
    """An event's values as JSON text: the deterministic tiebreak between same-second events.

    Compared as bytes in Python and as bytea in Postgres (both memcmp), so both sides agree.
    The text itself, not a hash of it: two different events never tie, and hashing every
    record would cost the workers dearly in a burst. It holds nothing the row does not show:
    the email is the row's own, and a delete's fingerprint is made without it.
    """
    return _encode((active, blocked, email, code))


def status_fingerprint(active: bool | None, blocked: bool | None) -> bytes:
    """The tiebreak of the status: the start of `fingerprint`, so both order events alike.

    Each of true, false and null begins with its own letter, so two events whose status differs
    compare the same way by either. The status may come from an older event than the data (one
    that carried it), so its tiebreak must not hold that event's email: a tombstone keeps none.
    """
    return _encode((active, blocked))


def _newest(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def parse_time(text: str) -> int:
    """ISO 8601 with `+01:00`, `+0100` or `Z`; without an offset, Europe/Prague local time.

    Microseconds since EPOCH. msgspec's parser first (the one the one-pass decoder uses, so both
    ways of decoding a payload read a time alike), then Python's, which takes more forms.
    """
    try:
        parsed = msgspec.convert(text, datetime)
    except msgspec.ValidationError:
        parsed = datetime.fromisoformat(text.strip())
    return micros(parsed)


def micros(at: datetime) -> int:
    """A datetime as microseconds since EPOCH; naive means Europe/Prague local time.

    Raises ValueError outside the years 1-9999 in UTC.
    """
    zone = at.tzinfo
    if type(zone) is timezone:  # a fixed offset, as every parsed offset is
        # EPOCH in the time's own zone object: the subtraction then skips both UTC offsets,
        # which is cheaper than computing the value from the fields, and runs for every record.
        epoch = _EPOCHS.get(zone)
        if epoch is None:
            epoch = EPOCH.astimezone(zone)
            if len(_EPOCHS) < 1000:
                _EPOCHS[zone] = epoch
    else:
        if zone is None:
            at = at.replace(tzinfo=PRAGUE)
        epoch = EPOCH
    delta = at - epoch
    # From the difference's parts: cheaper than `delta // MICROSECOND`, which converts both
    # timedeltas to microseconds with Python ints.
    value: int = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if not FIRST_US <= value <= LAST_US:
        raise ValueError("outside the years 1-9999 in UTC")
    return value


def as_datetime(value: int) -> datetime:
    """Microseconds since EPOCH as a UTC datetime (for people and tests)."""
    return EPOCH + value * MICROSECOND


def micros_from_unix_ms(ms: int) -> int:
    """Milliseconds since 1970 (the receiver's x-received-at) as microseconds since EPOCH."""
    return ms * 1000 + UNIX_EPOCH_US


def _storable(text: str | None) -> bool:
    if text is None or text.isascii():
        return "\x00" not in (text or "")
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
        return False
    return "\x00" not in text


class Unusable(Exception):
    """A decoded record that cannot be applied; the message is the reason, for the operator."""


def to_row(
    project: str,
    field: str,
    rank: int,
    record: schema.CustomerRecord | schema.BulkCustomerRecord,
    nul_free: bool = False,
) -> Row:
    """A record of either decoder as a row: the one set of checks.

    Raises Unusable with the reason when the record cannot be used, and msgspec.ValidationError
    for a lenient form that does not convert (as record_decoder would have). `field` and `rank`
    are the event's time field and rank (schema.TIME_FIELD, RANK): looked up once per payload by
    the caller, as this runs for every record. `nul_free`: the caller knows no text of the
    record holds a NUL, so the text needs no looking at.
    """
    customer_id, active, blocked = record.customer_id, record.active_yn, record.blocked_yn
    # The lenient forms the one-pass decoder leaves as sent ("42", 1, "0"), converted with
    # record_decoder's rules (strict=False), so both ways of decoding accept the same.
    if type(customer_id) is not int:
        customer_id = msgspec.convert(customer_id, int, strict=False)
    if active is not None and type(active) is not bool:
        active = msgspec.convert(active, bool, strict=False)
    if blocked is not None and type(blocked) is not bool:
        blocked = msgspec.convert(blocked, bool, strict=False)
    time = getattr(record, field)
    try:
        at = None if time is None else parse_time(time) if type(time) is str else micros(time)
    except (ValueError, OverflowError):  # OverflowError: year 1 minus an offset, and such
        raise Unusable(f"unparseable {field}") from None
    if not BIGINT_MIN <= customer_id <= BIGINT_MAX:
        raise Unusable("customer_id is outside the bigint range")
    if at is None:
        raise Unusable(f"missing {field}")
    email, code = record.email, record.code
    if isinstance(code, int):
        code = str(code)
    if not nul_free and (not _storable(email) or not _storable(code)):
        raise Unusable("email or code holds text Postgres cannot store (NUL byte or invalid text)")
    if rank == 2:
        email = None  # a delete erases personal data
    fp = fingerprint(email, code, active, blocked)
    # Positional arguments: this runs for every record, and keywords cost more.
    if active is not None or blocked is not None:  # the event carries the status
        return Row(
            project, customer_id, email, code, at if rank == 2 else None,
            at, rank, fp, active, blocked, at, rank, status_fingerprint(active, blocked),
            at if rank == 0 else None, at if rank == 1 else None,
        )  # fmt: skip
    return Row(
        project, customer_id, email, code, at if rank == 2 else None,
        at, rank, fp, active, blocked, None, None, None,
        at if rank == 0 else None, at if rank == 1 else None,
    )  # fmt: skip


def record_to_row(project: str, event: str, raw: bytes, position: int = 0) -> Row | Rejected:
    """One raw record of a payload as a row, or the reason it cannot be used."""
    try:
        record = schema.record_decoder.decode(raw)
        return to_row(project, schema.TIME_FIELD[event], RANK[event], record)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        reason = f"invalid record: {schema.explain(exc, raw)}"
    except Unusable as exc:
        reason = str(exc)
    return Rejected(event, reason, _as_text(raw), position)


def _as_text(raw: bytes) -> str:
    # Kept for the operator as sent; NUL cannot be stored in a text column.
    return bytes(raw).decode("utf-8", "replace").replace("\x00", "\\u0000")


def decode_payload(event: str, body: bytes) -> tuple[str, list[Row], list[Rejected]]:
    """A webhook body as (project_name, usable rows, rejected records).

    Raises msgspec.DecodeError/ValidationError when the body is not an envelope at all: such a
    message did not come through the receiver, and is dead-lettered as a whole.

    The whole body is decoded in one pass first (schema.bulk_decoder); only when that fails, or
    a record is unusable, is it decoded record by record, so that a rejected record is kept as
    it was sent. Both ways go through the same checks (to_row).
    """
    field, rank = schema.TIME_FIELD[event], RANK[event]
    try:
        bulk = schema.bulk_decoder.decode(body)
        # Decoded JSON text holds a NUL only where the body has the escape \u0000 (a raw NUL is
        # malformed JSON), and msgspec refuses a lone surrogate's escape anywhere in a body: then
        # no record's text needs looking at. A body without any backslash is settled by memchr,
        # far cheaper than searching for the whole escape.
        nul_free = b"\\" not in body or b"\\u0000" not in body
        project = bulk.project_name
        return project, [to_row(project, field, rank, r, nul_free) for r in bulk.customers], []
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, Unusable):
        pass  # some record does not decode or cannot be used: each is decided on its own
    envelope = schema.envelope_decoder.decode(body)
    rows: list[Row] = []
    rejected: list[Rejected] = []
    for position, raw in enumerate(envelope.customers):
        result = record_to_row(envelope.project_name, event, raw, position)
        if isinstance(result, Row):
            rows.append(result)
        else:
            rejected.append(result)
    return envelope.project_name, rows, rejected


def fold(rows: list[Row]) -> list[Row]:
    """One row per (project_name, customer_id), in key order (the order the batch is written in).

    A row that needs no merging is returned as given; one that does is copied first, so the
    caller's rows never change.
    """
    # Keyed by shop, then by customer id: a batch's rows come a payload (one shop) at a time,
    # so the shop's dict is looked up once per run of rows, and an int key hashes and sorts
    # faster than a (name, id) tuple, and leaves no tuple for the garbage collector to track.
    shops: dict[str, dict[int, Row]] = {}
    name: str | None = None
    folded: dict[int, Row] = {}
    copied: set[tuple[str, int]] = set()
    for row in rows:
        if row.project_name != name:
            name = row.project_name
            folded = shops.setdefault(name, {})
        current = folded.get(row.customer_id)
        if current is None:
            folded[row.customer_id] = row
            continue
        key = (name, row.customer_id)
        if key not in copied:
            current = folded[row.customer_id] = msgspec.structs.replace(current)
            copied.add(key)
        current.merge(row)
    result: list[Row] = []
    for name in sorted(shops):  # code point order: UTF-8 byte order, as COLLATE "C" sorts
        folded = shops[name]
        result.extend(map(folded.__getitem__, sorted(folded)))
    return result
