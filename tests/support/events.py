"""Customer events as the property tests describe them, and the hypothesis strategies drawing them.

An `Event` is what the oracle reads (tests/support/oracle.py); its record, as Upgates could send
it, is what the fold and the SQL get.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from tests.support.oracle import RANKS, TIME_FIELD
from worker.fold import Row, record_to_row

# Each event time is one of a few seconds (so ties happen), written in one of several notations
# for the same instant: the fold must compare instants, not text.
SECONDS = 4
NOTATIONS = (
    "2024-01-15T10:00:0{s}+01:00",
    "2024-01-15T09:00:0{s}Z",
    "2024-01-15T10:00:0{s}+0100",
    "2024-01-15 10:00:0{s}",  # naive: Prague, +01:00 in January
    "2024-01-15T10:00:0{s}.000+01:00",
)
BOOLEANS = {True: (True, 1, "1"), False: (False, 0, "0")}


@dataclass(frozen=True)
class Event:
    """One customer event as the test describes it (the oracle reads this, not the Row)."""

    project: str
    event: str
    customer_id: int
    second: int
    email: str | None
    code: str | int | None
    active_yn: bool | None
    blocked_yn: bool | None
    notation: int = 0  # how the time is written
    lenient: int = 0  # how customer_id and the flags are written
    noise_second: int | None = None  # another event's time field, which must be ignored

    @property
    def time(self) -> datetime:
        return datetime(2024, 1, 15, 9, 0, self.second, tzinfo=UTC)

    def to_raw(self) -> bytes:
        """The record as Upgates could send it, in one of the accepted spellings."""
        record: dict[str, Any] = {
            "customer_id": str(self.customer_id) if self.lenient % 2 else self.customer_id,
            TIME_FIELD[self.event]: NOTATIONS[self.notation].format(s=self.second),
            "firstname": "ignored",
        }
        if self.noise_second is not None:
            other = next(f for e, f in TIME_FIELD.items() if e != self.event)
            record[other] = NOTATIONS[0].format(s=self.noise_second)
        if self.email is not None or self.lenient % 3 == 0:
            record["email"] = self.email
        if self.code is not None or self.lenient % 3 == 0:
            record["code"] = self.code
        for name in ("active_yn", "blocked_yn"):
            value = getattr(self, name)
            if value is not None:
                record[name] = BOOLEANS[value][self.lenient % 3]
        return json.dumps(record).encode()

    def to_row(self) -> Row:
        result = record_to_row(self.project, self.event, self.to_raw())
        assert isinstance(result, Row), result
        return result


def events_strategy(
    emails: tuple[str | None, ...] = (None, "a@x.cz", "B@x.cz", "é@x.cz"),
    codes: tuple[str | int | None, ...] = (None, "K1", "k1", 7),
    max_id: int = 3,
    seconds: int = SECONDS,
    max_size: int = 12,
) -> st.SearchStrategy[list[Event]]:
    """Events on few customers of 2 shops, few seconds, tiny data domains: ties and repeats."""
    flags = st.sampled_from((None, True, False))
    event = st.builds(
        Event,
        project=st.sampled_from(("shop-a", "shop-b")),
        event=st.sampled_from(tuple(RANKS)),
        customer_id=st.integers(1, max_id),
        second=st.integers(0, seconds - 1),
        email=st.sampled_from(emails),
        code=st.sampled_from(codes),
        active_yn=flags,
        blocked_yn=flags,
        notation=st.integers(0, len(NOTATIONS) - 1),
        lenient=st.integers(0, 5),
        noise_second=st.none() | st.integers(0, seconds - 1),
    )
    return st.lists(event, min_size=1, max_size=max_size)


@st.composite
def delivered(
    draw: st.DrawFn, events: st.SearchStrategy[list[Event]]
) -> tuple[list[Event], list[Event]]:
    """(the distinct events, the same events shuffled, some of them delivered again)."""
    distinct = draw(events)
    repeats = draw(st.lists(st.sampled_from(distinct), max_size=len(distinct)))
    return distinct, draw(st.permutations(distinct + repeats))
