"""Realistic Upgates traffic: full 5000-record payloads for bursts, small ones for everyday use.

Records look like what Upgates sends for Customers.* (the fields the pipeline reads plus a few it
ignores), about 270 bytes each, so a full 5000-record payload is about 1.3 MB.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import msgspec

from worker.fold import Row, decode_payload, fold

PRAGUE_WINTER = timezone(timedelta(hours=1))
T0 = datetime(2024, 10, 1, 8, 0, tzinfo=UTC)
FIRST = ("Jana", "Petr", "Eva", "Tomáš", "Lucie", "Martin", "Kateřina", "Jan", "Tereza", "Pavel")
ASCII = {"Tomáš": "tomas", "Kateřina": "katerina"}
LAST = ("Nováková", "Svoboda", "Dvořáková", "Černý", "Procházková", "Kučera", "Veselá", "Horák")
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Payload:
    """One webhook ready to send: its event, body, and which customers it carries."""

    event: str
    body: bytes
    records: int
    shop: str
    block: int  # bursts: the block of 5000 customers it covers


def _stamp(at: datetime) -> str:
    return at.astimezone(PRAGUE_WINTER).isoformat()


def record(customer_id: int, event: str, version: int = 0) -> dict[str, object]:
    """One customer record as Upgates sends it; `version` makes later updates differ."""
    first = FIRST[customer_id % len(FIRST)]
    last = LAST[customer_id % len(LAST)]
    created = T0 + timedelta(seconds=customer_id % 2_000_000)
    updated = created + timedelta(days=1 + version)
    login = ASCII.get(first, first.lower())
    item: dict[str, object] = {
        "customer_id": customer_id,
        "email": f"{login}.{customer_id}.{version}@example.cz",
        "code": f"C{customer_id:08d}",
        "firstname": first,
        "surname": last,
        "phone": f"+420 6{customer_id % 100:02d} {customer_id % 1000:03d} {version % 1000:03d}",
        "active_yn": True,
        "blocked_yn": version % 7 == 6,
        "creation_time": _stamp(created),
        "last_update_time": _stamp(updated if event == "update" else created),
    }
    if event == "delete":
        item["deletion_time"] = _stamp(updated)
    return item


def envelope(shop: str, records: list[dict[str, object]]) -> bytes:
    """A webhook body."""
    return _encode({"project_name": shop, "customers": records})


def burst_payloads(shops: int, blocks: int, per_payload: int = 5000) -> list[Payload]:
    """Creates of every block of every shop, then updates of the same customers.

    Shops are interleaved, as several shops importing at once would be.
    """
    payloads = []
    for event in ("create", "update"):
        for block in range(blocks):
            for s in range(shops):
                shop = f"bench-shop-{s}"
                first = block * per_payload + 1
                version = 0 if event == "create" else 1
                items = [record(cid, event, version) for cid in range(first, first + per_payload)]
                payloads.append(Payload(event, envelope(shop, items), per_payload, shop, block))
    return payloads


def rows_of(payloads: list[Payload]) -> list[Row]:
    """The rows the pipeline writes for these payloads (decoded and folded by its own code)."""
    rows: list[Row] = []
    for payload in payloads:
        _, decoded, rejected = decode_payload(payload.event, payload.body)
        assert not rejected
        rows.extend(decoded)
    return fold(rows)


class EverydaySender:
    """One shop's everyday stream: 1-10 records per webhook, mostly new customers, some updates.

    Each sender owns its id range, so what the table must end up with is known exactly. A
    webhook is sent again until it is accepted, so an update only ever follows accepted creates.
    The stream is written ahead (`prepare`), keeping the load generator's own work small while
    it measures.
    """

    def __init__(self, index: int, seed: int) -> None:
        self.shop = f"bench-everyday-{index % 8}"
        self.base = (index // 8 + 1) * 10_000_000
        self.rng = random.Random(seed * 1000 + index)
        self.next_id = self.base
        self.created: list[int] = []
        self.versions: dict[int, int] = {}
        self.ready: list[tuple[str, bytes, list[int]]] = []

    def prepare(self, count: int) -> None:
        """Write the next `count` webhooks ahead."""
        self.ready.extend(self._generate() for _ in range(count))
        self.ready.reverse()

    def next_payload(self) -> tuple[str, bytes, list[int]]:
        """(event, body, customer ids) of the next webhook."""
        return self.ready.pop() if self.ready else self._generate()

    def _generate(self) -> tuple[str, bytes, list[int]]:
        count = self.rng.randint(1, 10)
        if len(self.created) > 20 and self.rng.random() < 0.3:
            ids = sorted(set(self.rng.sample(self.created, count)))
            items = []
            for cid in ids:
                version = self.versions.get(cid, 0) + 1
                self.versions[cid] = version
                items.append(record(cid, "update", version))
            return "update", envelope(self.shop, items), ids
        ids = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        self.created.extend(ids)
        return "create", envelope(self.shop, [record(cid, "create") for cid in ids]), ids
