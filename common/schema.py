"""The wire schema: what Upgates sends, and the headers the receiver puts on each message.

Every Struct and decoder of a webhook body is here, built once. The receiver decodes only the
envelope (records stay raw bytes). The worker reads a body in one pass (`bulk_decoder`), the
common case; a body that pass cannot read, or that holds an unusable record, is read again record
by record (`envelope_decoder`, then `record_decoder` on each), so one bad record is rejected alone
and kept as sent. Both record Structs go through the same checks (worker/fold.py, `to_row`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

import msgspec

EVENTS = ("create", "update", "delete")

# Which timestamp field carries the event time of each event.
TIME_FIELD = {
    "create": "creation_time",
    "update": "last_update_time",
    "delete": "deletion_time",
}

# Message headers set by the receiver and read by the worker.
H_EVENT = "x-event"
H_PROJECT = "x-project-name"
H_RECORDS = "x-record-count"
H_RECEIVED_AT = "x-received-at"  # milliseconds since the epoch (AMQP floats are 32-bit)
H_REQUEST_ID = "x-request-id"
H_ERROR = "x-error"  # set on messages the worker dead-letters itself
H_BUNDLE = "x-bundle"  # on a bundle (common/message.py): how many webhooks it carries

ProjectName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Envelope(msgspec.Struct):
    """The body of every Customers.* webhook, its records kept raw to be decoded one by one."""

    project_name: ProjectName
    customers: list[msgspec.Raw]


class CustomerRecord(msgspec.Struct):
    """One customer decoded on its own (`record_decoder`); lenient types, unknown fields ignored.

    `customer_id` is `int` decoded with strict=False, so "42" is accepted; the booleans take
    true/false, 1/0 and "1"/"0". Timestamps stay text, parsed by the worker: a time msgspec
    cannot read may still be one Python's parser reads, and one neither reads is rejected as an
    unparseable time rather than as a wrong type.
    """

    customer_id: int
    email: str | None = None
    code: str | int | None = None
    creation_time: str | None = None
    last_update_time: str | None = None
    deletion_time: str | None = None
    active_yn: bool | None = None
    blocked_yn: bool | None = None


class BulkCustomerRecord(msgspec.Struct, gc=False):
    """One customer as the one-pass decoder reads it: strict types, times parsed by msgspec.

    Strict, because lax mode would also take numbers as times. The unions hold the lenient forms
    CustomerRecord accepts ("42", 1, "0"), which the worker's checks convert by the same rules.
    gc=False: thousands are alive at once, and a record of scalars can hold no cycle.
    """

    customer_id: int | str
    email: str | None = None
    code: str | int | None = None
    creation_time: datetime | None = None
    last_update_time: datetime | None = None
    deletion_time: datetime | None = None
    active_yn: bool | int | str | None = None
    blocked_yn: bool | int | str | None = None


class BulkEnvelope(msgspec.Struct):
    """The body of a Customers.* webhook with every record decoded in the same pass."""

    project_name: ProjectName
    customers: list[BulkCustomerRecord]


envelope_decoder = msgspec.json.Decoder(Envelope)
record_decoder = msgspec.json.Decoder(CustomerRecord, strict=False)
bulk_decoder = msgspec.json.Decoder(BulkEnvelope)
json_encoder = msgspec.json.Encoder()


_PATH = re.compile(r"at `(\$[^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def explain(exc: Exception, raw: bytes | msgspec.Raw) -> str:
    """Why `data` did not decode, in our own words: library messages change between releases.

    Only the JSON path of the offending value is taken from msgspec's message, when it has one.
    """
    data = bytes(raw)
    try:
        data.decode()
    except UnicodeDecodeError:
        return "text is not valid UTF-8"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    if not isinstance(exc, msgspec.ValidationError):
        if _SURROGATE.search(_SURROGATE_PAIR.sub(b"", data)):
            return "invalid text: a \\u escape of a lone surrogate"
        return "not valid JSON"
    text = str(exc)
    missing = _MISSING.search(text)
    path = _PATH.search(text)
    where = path.group(1) if path else "$"
    if missing:
        return f"missing field {where}.{missing.group(1)}"
    if not path:  # our schemas' roots are all objects
        return "expected a JSON object"
    return f"wrong type or value at {where}"
