"""Decoding records and folding events (worker/fold.py): pure logic, no services.

The property tests compare `fold` with the oracle (tests/support/oracle.py): the literal
time-ordered replay of the events the docs describe (contract.md, "State in Postgres").
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from common import schema
from tests.support.events import Event, delivered, events_strategy
from tests.support.oracle import RANKS, oracle
from worker.fold import (
    EPOCH,
    PRAGUE,
    Rejected,
    Row,
    as_datetime,
    decode_payload,
    fingerprint,
    fold,
    micros,
    micros_from_unix_ms,
    parse_time,
    record_to_row,
    status_fingerprint,
)

SHOP = "shop-a"


def raw(**fields: Any) -> bytes:
    """A record as Upgates would send it (JSON bytes)."""
    return json.dumps(fields).encode()


def make_row(project: str, event: str, **fields: Any) -> Row:
    """A record that must decode; its row."""
    result = record_to_row(project, event, raw(**fields))
    assert isinstance(result, Row), result
    return result


def reject(event: str, record: bytes) -> Rejected:
    """A record that must be rejected; the rejection."""
    result = record_to_row(SHOP, event, record, position=3)
    assert isinstance(result, Rejected), result
    assert result.event == event
    assert result.position == 3
    assert "\x00" not in result.record  # the record text must fit a Postgres text column
    return result


def when(value: int | None) -> datetime | None:
    """A row's time (microseconds since the epoch) as the datetime the table shows."""
    return None if value is None else as_datetime(value)


def view(row: Row) -> dict[str, Any]:
    """What the customers table shows for a folded row."""
    return {
        "project_name": row.project_name,
        "customer_id": row.customer_id,
        "email": row.email,
        "code": row.code,
        "active_yn": row.active_yn,
        "blocked_yn": row.blocked_yn,
        "created_at": when(row.created_at),
        "updated_at": when(row.updated_at),
        "deleted_at": when(row.deleted_at),
    }


def at(minute: int, second: int = 0) -> datetime:
    """2024-01-15 10:mm:ss Prague time (winter, +01:00), as the UTC instant the row holds."""
    return datetime(2024, 1, 15, 9, minute, second, tzinfo=UTC)


def stamp(minute: int, second: int = 0) -> str:
    return f"2024-01-15T10:{minute:02d}:{second:02d}+01:00"


def create(cid: int, minute: int, project: str = SHOP, **fields: Any) -> Row:
    return make_row(project, "create", customer_id=cid, creation_time=stamp(minute), **fields)


def update(cid: int, minute: int, project: str = SHOP, **fields: Any) -> Row:
    return make_row(project, "update", customer_id=cid, last_update_time=stamp(minute), **fields)


def delete(cid: int, minute: int, project: str = SHOP, **fields: Any) -> Row:
    return make_row(project, "delete", customer_id=cid, deletion_time=stamp(minute), **fields)


def folded_one(rows: list[Row]) -> dict[str, Any]:
    """Fold events of one customer; the one row, as the table shows it."""
    result = fold(rows)
    assert len(result) == 1
    return view(result[0])


# --- parse_time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-15T10:00:00+01:00", datetime(2024, 1, 15, 9, 0, tzinfo=UTC)),
        ("2024-01-15T10:00:00+0100", datetime(2024, 1, 15, 9, 0, tzinfo=UTC)),
        ("2024-01-15T10:00:00-0230", datetime(2024, 1, 15, 12, 30, tzinfo=UTC)),
        ("2024-01-15T10:00:00Z", datetime(2024, 1, 15, 10, 0, tzinfo=UTC)),
        ("2024-01-15T10:00:00.25+01:00", datetime(2024, 1, 15, 9, 0, 0, 250000, tzinfo=UTC)),
        ("2024-01-15T10:00:00.123456Z", datetime(2024, 1, 15, 10, 0, 0, 123456, tzinfo=UTC)),
        # No offset: Europe/Prague local time, +01:00 in winter and +02:00 in summer.
        ("2024-01-15T10:00:00", datetime(2024, 1, 15, 9, 0, tzinfo=UTC)),
        ("2024-07-15T10:00:00", datetime(2024, 7, 15, 8, 0, tzinfo=UTC)),
        ("2024-07-15T10:00:00.5", datetime(2024, 7, 15, 8, 0, 0, 500000, tzinfo=UTC)),
        # A space instead of the T, as many systems write it.
        ("2024-01-15 10:00:00+01:00", datetime(2024, 1, 15, 9, 0, tzinfo=UTC)),
        ("2024-07-15 10:00:00", datetime(2024, 7, 15, 8, 0, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text) == micros(expected)
    assert as_datetime(parse_time(text)) == expected


def test_micros_is_exact_to_the_microsecond_at_both_ends_of_the_range() -> None:
    for instant in (
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 1, 15, 9, 0, 0, 123457, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ):
        assert as_datetime(micros(instant)) == instant


@pytest.mark.parametrize("ms", [0, -1, 1_705_309_200_123])
def test_the_receivers_millisecond_stamp_in_microseconds(ms: int) -> None:
    expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert as_datetime(micros_from_unix_ms(ms)) == expected


def test_fingerprints_stay_the_values_already_stored() -> None:
    # Stored rows keep the fingerprints of the events they show, and a same-second event is
    # compared with them: other bytes for the same values would flip tiebreaks.
    assert fingerprint("jana@example.cz", "C00000042", True, False) == (
        b'[true,false,"jana@example.cz","C00000042"]'
    )
    assert fingerprint(None, None, None, None) == b"[null,null,null,null]"
    assert status_fingerprint(True, None) == b"[true,null]"


FLAGS = (None, True, False)


@given(
    st.sampled_from(FLAGS), st.sampled_from(FLAGS), st.sampled_from(FLAGS),
    st.sampled_from(FLAGS), st.text(), st.none() | st.text(), st.none() | st.text(),
)  # fmt: skip
def test_status_tiebreak_orders_events_as_the_data_tiebreak_does(
    active_a: bool | None,
    blocked_a: bool | None,
    active_b: bool | None,
    blocked_b: bool | None,
    email: str,
    code_a: str | None,
    code_b: str | None,
) -> None:
    # Two same-second events whose status differs: the one whose status wins must also be the
    # one whose data wins, or the row would mix them.
    status_a = status_fingerprint(active_a, blocked_a)
    status_b = status_fingerprint(active_b, blocked_b)
    if (active_a, blocked_a) == (active_b, blocked_b):
        assert status_a == status_b
        return
    data_a = fingerprint(email, code_a, active_a, blocked_a)
    data_b = fingerprint(email + "x", code_b, active_b, blocked_b)
    assert (status_a < status_b) == (data_a < data_b)


def test_a_tombstone_keeps_no_email_in_its_tiebreaks() -> None:
    # The status comes from the create (the delete carries none); the delete erased the email.
    events = [create(1, 1, email="jan@example.cz", active_yn=True), delete(1, 2, code="C1")]
    assert folded_one(events)["email"] is None
    (folded,) = fold(events)
    assert folded.status_at is not None
    assert all(b"jan@" not in bytes(value) for value in (folded.version_fp, folded.status_fp))


@given(
    st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31)),
    st.none()
    | st.timedeltas(
        min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)
    ),
)
@example(datetime(2024, 10, 27, 2, 30), None)  # the hour Prague lives twice
@example(datetime(2024, 3, 31, 2, 30), None)  # the hour Prague skips
@example(datetime(2024, 10, 1, 10, 0, 0, 123456), timedelta(hours=1))
def test_micros_from_the_fields_is_the_same_as_from_subtraction(
    local: datetime, offset: timedelta | None
) -> None:
    # micros reads a fixed-offset time from its fields (the fast way); naive is Prague time.
    at = local if offset is None else local.replace(tzinfo=timezone(offset))
    expected = (at.replace(tzinfo=PRAGUE) if offset is None else at) - EPOCH
    assert micros(at) == expected // timedelta(microseconds=1)


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "yesterday at noon", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z",
     "2024-01-15T25:00:00+01:00", "2024-01-15T10:00:00+01:00 and more", "1705309200"],
)  # fmt: skip
def test_parse_time_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_time(text)


# --- record_to_row: lenient in what it accepts ---------------------------------------------------


@pytest.mark.parametrize("customer_id", [42, "42"])
def test_customer_id_as_int_or_numeric_string(customer_id: int | str) -> None:
    row = make_row(SHOP, "create", customer_id=customer_id, creation_time=stamp(0))
    assert row.customer_id == 42


def test_customer_id_at_the_bigint_limits_is_accepted() -> None:
    for cid in (2**63 - 1, -(2**63)):
        assert (
            make_row(SHOP, "update", customer_id=cid, last_update_time=stamp(0)).customer_id == cid
        )


@pytest.mark.parametrize(("code", "expected"), [(None, None), ("C-7", "C-7"), (123, "123")])
def test_code_null_string_or_int(code: object, expected: str | None) -> None:
    row = make_row(SHOP, "create", customer_id=1, creation_time=stamp(0), code=code)
    assert row.code == expected


def test_code_absent_is_null() -> None:
    assert create(1, 0).code is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("1", True), ("0", False)],
)
def test_status_flags_lenient(given: object, expected: bool) -> None:
    row = make_row(
        SHOP, "create", customer_id=1, creation_time=stamp(0), active_yn=given, blocked_yn=given
    )
    assert row.active_yn is expected
    assert row.blocked_yn is expected


def test_unknown_fields_are_ignored() -> None:
    row = make_row(
        SHOP,
        "update",
        customer_id=5,
        last_update_time=stamp(1),
        email="jan@example.cz",
        firstname="Jan",
        addresses=[{"street": "Dlouhá 1", "nested": {"deep": None}}],
        some_flag=True,
    )
    assert (row.customer_id, row.email) == (5, "jan@example.cz")


def test_delete_erases_email_and_sets_deleted_at() -> None:
    row = delete(7, 3, email="jan@example.cz", code="C7")
    assert row.email is None
    assert when(row.deleted_at) == at(3)


def test_create_and_update_set_their_own_time_only() -> None:
    # An update record often carries the customer's creation_time too: only the event's own
    # field counts (created_at comes from the create).
    row = view(update(1, 5, creation_time=stamp(1)))
    assert (row["created_at"], row["updated_at"], row["deleted_at"]) == (None, at(5), None)
    row = view(create(1, 1, last_update_time=stamp(5)))
    assert (row["created_at"], row["updated_at"], row["deleted_at"]) == (at(1), None, None)


# --- record_to_row: rejections --------------------------------------------------------------------

GOOD_TIME = b'"creation_time": "2024-01-15T10:00:00+01:00"'


@pytest.mark.parametrize(
    ("event", "record", "named"),
    [
        ("create", b"{" + GOOD_TIME + b', "email": "a@b.cz"}', "customer_id"),
        ("create", b'{"customer_id": "abc", ' + GOOD_TIME + b"}", "customer_id"),
        ("create", b'{"customer_id": "4x2", ' + GOOD_TIME + b"}", "customer_id"),
        ("create", b'{"customer_id": null, ' + GOOD_TIME + b"}", "customer_id"),
        ("create", b'{"customer_id": 9223372036854775808, ' + GOOD_TIME + b"}", "customer_id"),
        ("create", b'{"customer_id": "9223372036854775808", ' + GOOD_TIME + b"}", "customer_id"),
        ("create", b'{"customer_id": -9223372036854775809, ' + GOOD_TIME + b"}", "customer_id"),
        ("create", b'{"customer_id": 99999999999999999999999, ' + GOOD_TIME + b"}", "customer_id"),
        ("create", b'{"customer_id": 1, "email": "a@b.cz"}', "creation_time"),
        ("update", b'{"customer_id": 1, ' + GOOD_TIME + b"}", "last_update_time"),
        ("delete", b'{"customer_id": 1, ' + GOOD_TIME + b"}", "deletion_time"),
        ("update", b'{"customer_id": 1, "last_update_time": null}', "last_update_time"),
        ("create", b'{"customer_id": 1, "creation_time": "not a time"}', "creation_time"),
        (
            "update",
            b'{"customer_id": 1, "last_update_time": "2024-02-30 10:00"}',
            "last_update_time",
        ),
        ("delete", b'{"customer_id": 1, "deletion_time": ""}', "deletion_time"),
        ("create", b'{"customer_id": 1, "active_yn": "maybe", ' + GOOD_TIME + b"}", "active_yn"),
        ("create", b"5", "object"),
        ("create", b'"a string"', "object"),
        ("create", b"[1, 2]", "object"),
        ("create", b"null", "object"),
    ],
)
def test_rejection_names_the_problem(event: str, record: bytes, named: str) -> None:
    rejected = reject(event, record)
    assert named in rejected.reason
    assert rejected.record == record.decode()  # kept as sent, for the operator


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b'{"customer_id": "x", ' + GOOD_TIME + b"}", "wrong type or value at $.customer_id"),
        (b'{"customer_id": 1, "email": 5, ' + GOOD_TIME + b"}", "wrong type or value at $.email"),
        (b'{"email": "a@b.cz", ' + GOOD_TIME + b"}", "missing field $.customer_id"),
        (b'{"customer_id": 1, "email": "\xc4"}', "text is not valid UTF-8"),
        (b'{"customer_id": 1, ', "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
    ],
)
def test_rejection_reason_is_our_own_text(record: bytes, reason: str) -> None:
    # Whatever msgspec's release says, the operator reads the same reason.
    assert reject("create", record).reason == f"invalid record: {reason}"


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00+01:00",  # before datetime.min once moved to UTC
        "0001-01-01T00:00:00",  # the same, naive (Prague's historic offset is +00:57:44)
        "9999-12-31T23:59:59-01:00",  # after datetime.max once moved to UTC
    ],
)
def test_timestamp_outside_the_datetime_range_is_rejected_not_raised(text: str) -> None:
    # Must be a rejected record like any other unusable timestamp: an exception here escapes
    # decode_payload and fails the whole message (every worker that takes it), not one record.
    record = json.dumps({"customer_id": 1, "creation_time": text}).encode()
    assert "creation_time" in reject("create", record).reason


@pytest.mark.parametrize("field", ["email", "code"])
def test_nul_byte_is_rejected(field: str) -> None:
    record = b'{"customer_id": 1, "' + field.encode() + b'": "a\\u0000b", ' + GOOD_TIME + b"}"
    rejected = reject("create", record)
    assert "NUL" in rejected.reason


def test_raw_nul_byte_in_record_is_rejected_and_not_kept_raw() -> None:
    record = b'{"customer_id": 1, "email": "a\x00b", ' + GOOD_TIME + b"}"
    rejected = reject("create", record)  # reject() checks the text holds no NUL character
    assert "\\u0000" in rejected.record


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udfff", b"x\\ud800y"])
def test_lone_surrogate_in_email_is_rejected(escape: bytes) -> None:
    record = b'{"customer_id": 1, "email": "' + escape + b'", ' + GOOD_TIME + b"}"
    rejected = reject("create", record)
    assert "surrogate" in rejected.reason or "invalid text" in rejected.reason
    rejected.record.encode()  # storable: no lone surrogate in the kept text


def test_valid_surrogate_pair_is_accepted() -> None:
    record = b'{"customer_id": 1, "email": "\\ud83d\\ude00@b.cz", ' + GOOD_TIME + b"}"
    row = record_to_row(SHOP, "create", record)
    assert isinstance(row, Row)
    assert row.email == "\U0001f600@b.cz"


def test_invalid_utf8_bytes_are_rejected_and_kept_readable() -> None:
    record = b'{"customer_id": 1, "email": "\xff\xfe", ' + GOOD_TIME + b"}"
    rejected = reject("create", record)
    rejected.record.encode()


# --- decode_payload -------------------------------------------------------------------------------


def test_decode_payload_splits_good_and_bad_records() -> None:
    records = [
        raw(customer_id=1, last_update_time=stamp(0), email="a@b.cz"),
        raw(customer_id="x", last_update_time=stamp(0)),
        raw(customer_id=2, last_update_time=stamp(1)),
        raw(customer_id=3),
        raw(customer_id=4, last_update_time=stamp(2), email="a\x00b"),
        b"5",
        raw(customer_id=2**63, last_update_time=stamp(0)),
        raw(customer_id="6", last_update_time=stamp(3), unknown={"a": 1}),
    ]
    body = b'{"project_name": "shop-x", "extra": 1, "customers": [' + b", ".join(records) + b"]}"
    project, rows, rejected = decode_payload("update", body)
    assert project == "shop-x"
    assert [(r.project_name, r.customer_id) for r in rows] == [
        ("shop-x", 1),
        ("shop-x", 2),
        ("shop-x", 6),
    ]
    assert [r.position for r in rejected] == [1, 3, 4, 5, 6]
    assert all(r.event == "update" for r in rejected)
    assert "last_update_time" in rejected[1].reason
    assert [r.record for r in rejected] == [records[i].decode() for i in (1, 3, 4, 5, 6)]


@pytest.mark.parametrize("field", ["email", "code"])
def test_decode_payload_rejects_a_nul_when_it_is_the_only_fault(field: str) -> None:
    # Every other record is valid, so the one-pass decode succeeds: the NUL must still be found.
    records = [raw(customer_id=cid, last_update_time=stamp(0), email="a@b.cz") for cid in (1, 2)]
    records.insert(1, raw(customer_id=9, last_update_time=stamp(0), **{field: "a\x00b"}))
    body = b'{"project_name": "p", "customers": [' + b", ".join(records) + b"]}"
    _, rows, rejected = decode_payload("update", body)
    assert [r.customer_id for r in rows] == [1, 2]
    assert [(r.position, r.reason[:25]) for r in rejected] == [(1, "email or code holds text ")]


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\uDFFF", b"\\ud800\\u0041"])
def test_decode_payload_never_yields_a_lone_surrogate(escape: bytes) -> None:
    # The fast path does not look for one: msgspec refuses the escape in the whole body (so the
    # receiver answers 400 and never publishes such a body), and no row can hold it.
    record = raw(customer_id=9, last_update_time=stamp(0), email="X").replace(b"X", escape)
    body = b'{"project_name": "p", "customers": [' + record + b"]}"
    with pytest.raises(msgspec.DecodeError):
        decode_payload("update", body)


def test_decode_payload_keeps_a_backslash_u0000_that_is_text() -> None:
    # The JSON escape of a backslash followed by "u0000": six characters of text, no NUL.
    record = raw(customer_id=1, last_update_time=stamp(0), email="a\\u0000b@c.cz")
    assert b"\\\\u0000" in record
    body = b'{"project_name": "p", "customers": [' + record + b"]}"
    _, rows, rejected = decode_payload("update", body)
    assert rejected == []
    assert rows[0].email == "a\\u0000b@c.cz"


def test_decode_payload_empty_customers() -> None:
    assert decode_payload("create", b'{"project_name": "p", "customers": []}') == ("p", [], [])


# --- fold: the rules on hand-written cases --------------------------------------------------------


def test_newer_update_wins_whatever_the_order() -> None:
    old = update(1, 1, email="old@b.cz", code="A", active_yn=True)
    new = update(1, 2, email="new@b.cz", code="B", active_yn=False)
    for events in ([old, new], [new, old], [new, old, new, old]):
        row = folded_one(events)
        assert (row["email"], row["code"], row["active_yn"]) == ("new@b.cz", "B", False)
        assert row["updated_at"] == at(2)


def test_equal_time_delete_beats_update_beats_create() -> None:
    c = create(1, 5, email="c@b.cz", code="C", active_yn=True, blocked_yn=False)
    u = update(1, 5, email="u@b.cz", code="U", active_yn=False, blocked_yn=True)
    d = delete(1, 5, email="d@b.cz", code="D")
    for events in ([c, u], [u, c]):
        row = folded_one(events)
        assert (row["email"], row["code"], row["active_yn"], row["blocked_yn"]) == (
            "u@b.cz",
            "U",
            False,
            True,
        )
        assert (row["created_at"], row["updated_at"], row["deleted_at"]) == (at(5), at(5), None)
    for events in ([c, u, d], [d, u, c], [u, d, c]):
        row = folded_one(events)
        assert (row["email"], row["code"], row["deleted_at"]) == (None, "D", at(5))
        assert (row["created_at"], row["updated_at"]) == (at(5), at(5))


def test_delete_is_not_undone_by_an_older_update_arriving_later() -> None:
    row = folded_one([create(1, 0, email="a@b.cz"), delete(1, 5), update(1, 3, email="x@b.cz")])
    assert row["email"] is None
    assert row["deleted_at"] == at(5)
    assert (row["created_at"], row["updated_at"]) == (at(0), at(3))


def test_a_newer_update_after_a_delete_wins() -> None:
    # The newest event wins, whatever it is: a customer updated after the delete is shown again.
    row = folded_one([delete(1, 5), update(1, 6, email="back@b.cz")])
    assert (row["email"], row["deleted_at"], row["updated_at"]) == ("back@b.cz", None, at(6))


def test_late_create_fills_created_at_without_changing_email() -> None:
    row = folded_one([update(1, 4, email="new@b.cz", code="N"), create(1, 1, email="old@b.cz")])
    assert (row["email"], row["code"]) == ("new@b.cz", "N")
    assert (row["created_at"], row["updated_at"]) == (at(1), at(4))


def test_status_comes_from_the_newest_event_carrying_it() -> None:
    c = create(1, 1, email="a@b.cz", active_yn=True, blocked_yn=False)
    u = update(1, 2, email="b@b.cz")  # no status fields: leaves the create's status
    for events in ([c, u], [u, c]):
        row = folded_one(events)
        assert (row["email"], row["active_yn"], row["blocked_yn"]) == ("b@b.cz", True, False)


def test_same_customer_twice_in_one_list_newest_wins() -> None:
    rows = [update(1, 3, email="three@b.cz"), update(1, 9, email="nine@b.cz"), update(1, 3)]
    row = folded_one(rows)
    assert (row["email"], row["updated_at"]) == ("nine@b.cz", at(9))


def test_two_shops_with_the_same_customer_id_stay_separate() -> None:
    result = fold([
        update(1, 1, project="shop-b", email="b@b.cz"),
        update(1, 2, project="shop-a", email="a@b.cz"),
        delete(1, 3, project="shop-b"),
    ])  # fmt: skip
    assert [(r.project_name, r.customer_id, r.email, when(r.deleted_at)) for r in result] == [
        ("shop-a", 1, "a@b.cz", None),
        ("shop-b", 1, None, at(3)),
    ]


def test_output_in_key_order_one_row_per_key() -> None:
    rows = [
        update(30, 1, project="shop-b"),
        update(2, 1, project="shop-b"),
        update(10, 1, project="shop-a"),
        update(2, 2, project="shop-b"),
        update(-5, 1, project="shop-b"),
        update(10, 0, project="shop-a"),
        update(100, 1, project="shop-a"),
    ]
    keys = [(r.project_name, r.customer_id) for r in fold(rows)]
    assert keys == [
        ("shop-a", 10),
        ("shop-a", 100),
        ("shop-b", -5),
        ("shop-b", 2),
        ("shop-b", 30),
    ]


def test_fold_does_not_change_the_callers_rows() -> None:
    first, second = update(1, 1, email="a@b.cz"), update(1, 2, email="b@b.cz")
    before = view(first)
    fold([first, second])
    assert view(first) == before


def test_fold_of_nothing() -> None:
    assert fold([]) == []


def test_same_second_same_event_order_does_not_matter_for_null_vs_empty_text() -> None:
    # Two updates in the same second that differ only in code null vs "" (or email null vs ""):
    # the contract promises the same table for any order.
    a = update(1, 1, email="a@b.cz", code=None)
    b = update(1, 1, email="a@b.cz", code="")
    assert folded_one([a, b]) == folded_one([b, a])
    a = update(1, 1, email=None, code="X")
    b = update(1, 1, email="", code="X")
    assert folded_one([a, b]) == folded_one([b, a])


def test_same_second_same_event_row_is_one_events_state() -> None:
    # Two updates in the same second: the row shows one of them, never email from one and
    # status from the other (the fold is a time-ordered replay, so the row is a replay's result).
    a = update(1, 1, email="a@b.cz", active_yn=True)
    b = update(1, 1, email="b@b.cz", active_yn=False)
    row = folded_one([a, b])
    assert (row["email"], row["active_yn"]) in {("a@b.cz", True), ("b@b.cz", False)}


# --- fold: property against the oracle ----------------------------------------------------------


def table_of(rows: list[Row]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r.project_name, r.customer_id): view(r) for r in rows}


A_TRUE = Event(SHOP, "update", 1, 0, "a@x.cz", None, True, None)
B_FALSE = Event(SHOP, "update", 1, 0, "b@x.cz", None, False, None)


@given(delivered(events_strategy()))
@example(([A_TRUE, B_FALSE], [A_TRUE, B_FALSE]))
def test_fold_equals_the_time_ordered_replay(
    case: tuple[list[Event], list[Event]],
) -> None:
    distinct, arrivals = case
    result = fold([event.to_row() for event in arrivals])
    keys = [(r.project_name, r.customer_id) for r in result]
    assert keys == sorted(set(keys))  # one row per key, in key order
    assert table_of(result) == oracle(distinct)


@given(
    delivered(
        events_strategy(
            emails=(None, "", "a@x.cz"), codes=(None, "", "k"), max_id=1, seconds=2, max_size=8
        )
    ),
    st.randoms(use_true_random=False),
)
def test_fold_is_the_same_for_any_order(
    case: tuple[list[Event], list[Event]], rnd: random.Random
) -> None:
    # Includes "" next to null, which the replay order cannot tell apart.
    _, arrivals = case
    rows = [event.to_row() for event in arrivals]
    other = rows[:]
    rnd.shuffle(other)
    assert table_of(fold(rows)) == table_of(fold(other))


# --- decode_payload: the one-pass path reads exactly like the record-by-record one ---------------


def test_both_record_structs_have_the_same_fields() -> None:
    # One set of checks (fold.to_row) reads the records of both decoders by these names.
    assert schema.BulkCustomerRecord.__struct_fields__ == schema.CustomerRecord.__struct_fields__


@given(events_strategy(max_size=8), st.sampled_from(tuple(RANKS)))
def test_one_pass_decode_equals_record_by_record(events: list[Event], kind: str) -> None:
    # The same records, every spelling the strategy writes, as one payload of one event kind.
    records = [replace(event, event=kind).to_raw() for event in events]
    body = b'{"project_name": "shop-a", "customers": [' + b", ".join(records) + b"]}"
    project, rows, rejected = decode_payload(kind, body)
    one_by_one = [record_to_row("shop-a", kind, record, i) for i, record in enumerate(records)]
    assert project == "shop-a"
    assert rows == [r for r in one_by_one if isinstance(r, Row)]
    assert rejected == [r for r in one_by_one if isinstance(r, Rejected)]


@pytest.mark.parametrize(
    "value",
    [b"1705309200", b'"1705309200"', b"1705309200.5", b"true"],
)
def test_a_number_is_not_a_time_in_either_path(value: bytes) -> None:
    # msgspec's lenient mode would read a number as a Unix time; neither path may.
    good = raw(customer_id=1, creation_time=stamp(0))
    bad = b'{"customer_id": 2, "creation_time": ' + value + b"}"
    for records in ([bad], [good, bad]):
        body = b'{"project_name": "p", "customers": [' + b", ".join(records) + b"]}"
        _, rows, rejected = decode_payload("create", body)
        assert [r.customer_id for r in rows] == [1] * (len(records) - 1)
        assert [r.position for r in rejected] == [len(records) - 1]
        assert "creation_time" in rejected[0].reason


def test_lenient_values_on_the_one_pass_path() -> None:
    body = (
        b'{"project_name": "p", "customers": ['
        b'{"customer_id": "42", "creation_time": "2024-01-15T10:00:00+0100", "active_yn": "1",'
        b' "blocked_yn": 0, "code": 7},'
        b'{"customer_id": 43, "creation_time": "2024-01-15 10:00:00", "active_yn": 1,'
        b' "blocked_yn": "0", "code": null}]}'
    )
    _, rows, rejected = decode_payload("create", body)
    assert rejected == []
    assert [(r.customer_id, r.code, r.active_yn, r.blocked_yn) for r in rows] == [
        (42, "7", True, False),
        (43, None, True, False),
    ]
    assert [when(r.created_at) for r in rows] == [at(0), at(0)]
