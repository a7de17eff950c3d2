"""Bundles and compression, from the receiver's publisher to the worker and the admin command.

- The publisher puts small webhooks that arrive together (or while two bundles await their
  confirm) into one message, a bundle; a webhook alone keeps the single-message format.
- A body of COMPRESS_FROM_BYTES or more travels zstd-compressed and reads back byte for byte.
- The worker applies a bundle webhook by webhook: one that is not an envelope is dead-lettered
  alone and the rest land; a redelivered bundle is split into single messages first.
- `upgates-admin dead show` prints each webhook of a dead bundle with emails hidden, and
  `dead replay` keeps a compressed dead letter compressed.

Real RabbitMQ and Postgres, as everywhere; what is checked is what sits in the queues and tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from admin.commands import HIDDEN
from common import schema
from common.message import (
    BUNDLE,
    COMPRESS_FROM_BYTES,
    JSON,
    ZSTD,
    Webhook,
    body_of,
    pack,
    unpack,
)
from common.settings import Settings
from common.topology import BUNDLE_ROUTING_KEY, QUEUE, Topology, declare_topology
from receiver.publisher import BUNDLES_IN_FLIGHT, Publisher
from tests.support.broker import amqp, dead_count, published, take_dead_letters
from tests.support.load import body_of_size, create, customer, delete, envelope, post, update
from tests.support.services import admin, consuming
from tests.support.waiting import wait_until
from worker.service import Worker

EVENTS = ("create", "update", "delete")
CANARY = "canary-bundle-3e9b@example.cz"  # an email that must not be printed unless asked


def now_ms() -> int:
    return int(time.time() * 1000)


def webhook(event: str, payload: dict[str, Any] | bytes, received_at: int | None = None) -> Webhook:
    """A webhook as the receiver accepts it; a dict payload is sent as slightly unusual JSON
    (non-ASCII kept, CRLF at the end) so that "byte for byte" means something."""
    if isinstance(payload, bytes):
        body, shop, records = payload, "", 0
    else:
        body = json.dumps(payload, ensure_ascii=False).encode() + b"\r\n"
        shop, records = payload["project_name"], len(payload["customers"])
    at = now_ms() if received_at is None else received_at
    return Webhook(event, shop, records, at, uuid.uuid4().hex, body)


def shop_payload(shop: str, *records: dict[str, Any]) -> dict[str, Any]:
    return {"project_name": shop, "customers": list(records)}


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[Publisher]:
    """The receiver's publisher on its own, connected (it declares the topology)."""
    instance = Publisher(settings)
    await instance.start()

    async def ready() -> bool:
        return instance.ready

    try:
        await wait_until(ready)
        yield instance
    finally:
        await instance.close()


@contextlib.asynccontextmanager
async def broker(settings: Settings) -> AsyncIterator[Topology]:
    """The topology on a confirmed channel of our own: publish the way the services do."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        yield await declare_topology(channel, settings)


def headers_sent(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The message's headers without the one a quorum queue adds on delivery."""
    return {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}


async def depth(settings: Settings) -> int:
    """Messages ready in the customers queue (one delivered and not acked is not counted)."""
    async with amqp(settings) as channel:
        queue = await channel.declare_queue(QUEUE, passive=True)
        return queue.declaration_result.message_count or 0


async def peek(settings: Settings) -> list[AbstractIncomingMessage]:
    """Every message in the customers queue, delivered to us and not acked: RabbitMQ puts them
    back when our channel closes, marked redelivered (as after a worker crashed on them)."""
    async with amqp(settings) as channel:
        queue = await channel.get_queue(QUEUE)
        messages = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            messages.append(message)
        return messages


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A worker started only now (the `worker` fixture starts at once) and a database
    connection; on exit the worker is stopped and its broker connection closed, so that a
    delivery it left unacked is back in the queue and counted."""
    instance = Worker(settings)
    task = asyncio.create_task(instance.run())
    try:
        await wait_until(lambda: consuming(instance, task))
        conn = await asyncpg.connect(settings.database_url)  # migrated: the worker consumes
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        instance.stop()
        await asyncio.wait_for(task, 30)


Table = dict[tuple[str, int], tuple[str | None, bool]]  # (shop, id) -> (email, deleted)


async def table(db: asyncpg.Connection) -> Table:
    rows = await db.fetch(
        "SELECT project_name, customer_id, email, deleted_at IS NOT NULL FROM customers"
    )
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


async def table_becomes(db: asyncpg.Connection, expected: Table) -> None:
    async def check() -> bool:
        return await table(db) == expected

    with contextlib.suppress(AssertionError):
        await wait_until(check, timeout=10)
    assert await table(db) == expected  # again, for pytest's diff when it never got there


# --- the publisher: what goes into one message ------------------------------------------------


async def test_webhooks_published_together_are_one_bundle(
    publisher: Publisher, settings: Settings
) -> None:
    start = now_ms()
    webhooks = [
        webhook(
            EVENTS[i % 3],
            envelope(*(customer(10 * i + j) for j in range(i % 4 + 1)), project=f"shop-{i % 3}"),
            received_at=start - 60_000 if i == 6 else start + i,  # the oldest in the middle
        )
        for i in range(10)
    ]
    # Deterministic: gather starts every publish in the same loop iteration, and the flush
    # that the first one schedules (call_soon) runs only after all ten have joined the queue.
    await asyncio.gather(*(publisher.publish(w) for w in webhooks))

    [message] = await published(settings)
    assert message.content_type == BUNDLE
    assert not message.content_encoding
    assert message.routing_key == BUNDLE_ROUTING_KEY
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert headers_sent(message) == {
        schema.H_BUNDLE: 10,
        schema.H_RECORDS: sum(w.records for w in webhooks),
        schema.H_RECEIVED_AT: start - 60_000,
    }
    got = unpack(message)
    assert [w.body for w in got] == [w.body for w in webhooks]
    assert got == webhooks  # in order, every field


async def test_a_webhook_alone_keeps_the_single_message_format(
    publisher: Publisher, settings: Settings
) -> None:
    sent = webhook("update", envelope(customer(1), customer(2)))
    await publisher.publish(sent)

    [message] = await published(settings)
    assert message.body == sent.body
    assert message.content_type == JSON
    assert not message.content_encoding
    assert message.routing_key == "customers.update"
    assert message.message_id == sent.request_id
    assert headers_sent(message) == {
        schema.H_EVENT: "update",
        schema.H_PROJECT: sent.project_name,
        schema.H_RECORDS: 2,
        schema.H_RECEIVED_AT: sent.received_at,
        schema.H_REQUEST_ID: sent.request_id,
    }
    assert unpack(message) == [sent]


async def loop_iterations(n: int = 3) -> None:
    """Let the event loop go round n times (enough for a scheduled flush to have run)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_webhooks_arriving_while_bundles_await_confirms_wait_as_one(
    publisher: Publisher, settings: Settings
) -> None:
    sent = [webhook("create", envelope(customer(i))) for i in range(BUNDLES_IN_FLIGHT + 9)]
    alone, rest = sent[:BUNDLES_IN_FLIGHT], sent[BUNDLES_IN_FLIGHT:]
    tasks = []
    for item in alone:  # out at once, each alone, awaiting its confirm
        tasks.append(asyncio.create_task(publisher.publish(item)))
        await loop_iterations()
    for item in rest:  # each in a loop iteration of its own: only the limit makes them wait
        tasks.append(asyncio.create_task(publisher.publish(item)))
        await loop_iterations()
    # The premise: a quorum queue confirms after a disk write, far slower than these few
    # loop iterations. Were it not so, the test could not tell anything.
    assert not any(task.done() for task in tasks[:BUNDLES_IN_FLIGHT])
    await asyncio.gather(*tasks)

    messages = await published(settings)
    assert [unpack(m) for m in messages] == [[item] for item in alone] + [rest]
    assert [m.content_type for m in messages] == [JSON] * BUNDLES_IN_FLIGHT + [BUNDLE]


# --- through a real receiver ------------------------------------------------------------------


async def test_concurrent_posts_each_arrive_once_byte_for_byte(
    settings: Settings, receiver_url: str, http: aiohttp.ClientSession
) -> None:
    sent = [
        webhook(EVENTS[i % 3], envelope(customer(i), project=f"shop-{i % 4}")) for i in range(40)
    ]
    answers = await asyncio.gather(*(post(http, receiver_url, w.event, w.body) for w in sent))
    assert [status for status, _ in answers] == [200] * 40
    ids = [body["request_id"] for _, body in answers]
    assert len(set(ids)) == 40

    messages = await published(settings)
    arrived = [w for message in messages for w in unpack(message)]
    assert sorted(w.request_id for w in arrived) == sorted(ids)  # every one, once
    assert {w.request_id: (w.event, w.project_name, w.records, w.body) for w in arrived} == {
        rid: (w.event, w.project_name, w.records, w.body) for rid, w in zip(ids, sent, strict=True)
    }
    # How many shared a message depends on how the server happened to read the requests; only
    # the publisher-level test pins bundling down. Here: never more messages than webhooks.
    assert len(messages) <= 40


# --- compression ------------------------------------------------------------------------------


async def test_a_large_webhook_goes_alone_compressed_beside_a_bundle(
    publisher: Publisher, settings: Settings
) -> None:
    big = webhook("update", envelope(*(customer(i) for i in range(5000))))
    assert 900_000 < len(big.body) < 1_500_000  # a full Upgates payload
    small = [webhook("create", envelope(customer(i))) for i in (1, 2)]
    # Together, the large one between the small ones: they are bundled, it never is. (First in
    # line it would end up alone even if bundled: a bundle stops growing at BUNDLE_MAX_BYTES.)
    await asyncio.gather(
        publisher.publish(small[0]), publisher.publish(big), publisher.publish(small[1])
    )

    messages = {m.content_type: m for m in await published(settings)}
    assert set(messages) == {JSON, BUNDLE}
    single, bundle = messages[JSON], messages[BUNDLE]
    assert single.content_encoding == ZSTD
    assert len(single.body) < len(big.body) / 3
    assert body_of(single) == big.body
    assert unpack(single) == [big]
    assert single.headers[schema.H_RECORDS] == 5000
    assert single.routing_key == "customers.update"
    assert not bundle.content_encoding
    assert unpack(bundle) == small


async def test_a_bundle_of_64_kib_or_more_is_compressed(
    publisher: Publisher, settings: Settings
) -> None:
    # Each about 8 KiB, well under the limit alone; together over it.
    webhooks = [
        webhook("create", envelope(*(customer(40 * i + j) for j in range(35)))) for i in range(10)
    ]
    assert all(len(w.body) < COMPRESS_FROM_BYTES for w in webhooks)
    assert sum(len(w.body) for w in webhooks) > COMPRESS_FROM_BYTES
    await asyncio.gather(*(publisher.publish(w) for w in webhooks))

    [message] = await published(settings)
    assert message.content_type == BUNDLE
    assert message.content_encoding == ZSTD
    assert len(message.body) < COMPRESS_FROM_BYTES
    assert unpack(message) == webhooks


@pytest.mark.parametrize(
    ("size", "encoding"),
    [(COMPRESS_FROM_BYTES - 1, None), (COMPRESS_FROM_BYTES, ZSTD)],
    ids=["just-under", "at-the-limit"],
)
async def test_compression_starts_at_compress_from_bytes(
    size: int, encoding: str | None, publisher: Publisher, settings: Settings
) -> None:
    sent = webhook("create", body_of_size(size))
    await publisher.publish(sent)
    [message] = await published(settings)
    assert (message.content_encoding or None) == encoding
    assert message.content_type == JSON
    assert body_of(message) == sent.body


# --- the worker -------------------------------------------------------------------------------


async def test_a_bundle_lands_and_only_its_unreadable_webhook_is_dead_lettered(
    settings: Settings,
) -> None:
    good = [
        webhook("create", shop_payload("shop-a", create(1, 0, "a1@x.cz"), create(2, 0, "a2@x.cz"))),
        webhook("update", shop_payload("shop-b", update(1, 5, "b1@x.cz"))),
        webhook("delete", shop_payload("shop-a", delete(2, 10))),
    ]
    # A valid bundle entry whose body is JSON but not an Upgates envelope.
    poison = webhook("create", b'{"not": "an envelope"}')
    async with broker(settings) as topology:
        bundle = pack([good[0], poison, good[1], good[2]])
        await topology.exchange.publish(bundle, BUNDLE_ROUTING_KEY, mandatory=True)

    async with running_worker(settings) as db:
        await table_becomes(
            db,
            {
                ("shop-a", 1): ("a1@x.cz", False),
                ("shop-a", 2): (None, True),
                ("shop-b", 1): ("b1@x.cz", False),
            },
        )
    # The worker is stopped: were the bundle unacked, it would be back in the queue now.
    assert await depth(settings) == 0
    [letter] = await take_dead_letters(settings)
    assert letter.content_type == JSON  # a message of its own, not the bundle
    assert letter.body == poison.body
    assert letter.message_id == poison.request_id
    assert letter.headers[schema.H_REQUEST_ID] == poison.request_id
    assert letter.headers[schema.H_EVENT] == "create"
    assert letter.headers["x-original-routing-key"] == "customers.create"
    assert "not an Upgates customers envelope" in str(letter.headers[schema.H_ERROR])
    assert schema.H_BUNDLE not in letter.headers


async def test_a_redelivered_bundle_is_split_and_every_webhook_lands(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    webhooks = [
        webhook("create", shop_payload("shop-a", create(1, 0, "a1@x.cz"))),
        webhook("create", shop_payload("shop-b", create(1, 0, "b1@x.cz"))),
        webhook("update", shop_payload("shop-a", update(1, 5, "a1-new@x.cz"))),
    ]
    async with broker(settings) as topology:
        await topology.exchange.publish(pack(webhooks), BUNDLE_ROUTING_KEY, mandatory=True)
    [taken] = await peek(settings)  # delivered, never acked, put back
    assert not taken.redelivered
    [again] = await peek(settings)
    assert again.redelivered
    assert again.content_type == BUNDLE

    caplog.set_level(logging.INFO, logger="worker.service")
    async with running_worker(settings) as db:
        await table_becomes(
            db, {("shop-a", 1): ("a1-new@x.cz", False), ("shop-b", 1): ("b1@x.cz", False)}
        )
    assert await depth(settings) == 0
    assert await take_dead_letters(settings) == []
    # The rows alone cannot tell a split from the bundle applied whole; the worker's log can:
    # the split is logged with its count, and each committed batch had as many messages as
    # webhooks (applied whole, the three would have come in one message).
    logged = [vars(r) for r in caplog.records if r.name == "worker.service"]
    batches = [e for e in logged if "messages" in e and "webhooks" in e]
    splits = [e for e in logged if "split" in e["msg"] and "webhooks" in e and e not in batches]
    assert [e["webhooks"] for e in splits] == [3]
    assert sum(b["webhooks"] for b in batches) == 3
    assert all(b["messages"] == b["webhooks"] for b in batches)


# --- the admin command ------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
async def test_a_dead_bundle_is_shown_webhook_by_webhook_without_emails(
    compressed: bool, settings: Settings
) -> None:
    # A bundle RabbitMQ dead-lettered whole (delivery limit) sits in the queue as it was.
    many = 400 if compressed else 1
    webhooks = [
        webhook(
            "create", envelope(customer(1, CANARY), *(customer(i) for i in range(2, many + 1)))
        ),
        webhook("update", envelope(customer(500), customer(501), project="other-shop")),
    ]
    message = pack(webhooks)
    assert (message.content_encoding == ZSTD) is compressed
    async with broker(settings) as topology:
        await topology.dead_exchange.publish(message, routing_key="", mandatory=True)

    status, shown = await admin(settings, "dead", "show", "1")
    assert status == 0
    for w in webhooks:
        line = (
            f"  webhook event={w.event} shop={w.project_name} records={w.records} "
            f"request_id={w.request_id}"
        )
        assert line in shown.splitlines()
    assert shown.count("  body: ") == 2
    assert "@example.cz" not in shown  # no email at all, CANARY included
    assert "Nováková" not in shown  # nor any other field that says who
    assert shown.count(HIDDEN) == 2 * (many + 2)  # each record's email and surname

    status, personal = await admin(settings, "dead", "show", "1", "--show-personal-data")
    assert status == 0
    assert CANARY in personal
    assert await dead_count(settings) == 1  # looking removes nothing


async def test_a_compressed_dead_letter_is_replayed_compressed_and_lands(
    settings: Settings,
) -> None:
    records = [create(i, i % 600, email=f"replay{i}@x.cz") for i in range(1, 1001)]
    big = webhook("create", shop_payload("replay-shop", *records))
    letter = pack([big])
    assert letter.content_encoding == ZSTD
    letter.headers.update(
        {schema.H_ERROR: "write failed: test", "x-original-routing-key": "customers.create"}
    )
    async with broker(settings) as topology:
        await topology.dead_exchange.publish(letter, routing_key="", mandatory=True)

    assert await admin(settings, "dead", "replay", "--request-id", big.request_id) == (
        0,
        "replayed 1 dead letter(s)",
    )
    assert await dead_count(settings) == 0
    [replayed] = await peek(settings)
    assert replayed.content_encoding == ZSTD
    assert replayed.content_type == JSON
    assert len(replayed.body) < len(big.body)
    assert body_of(replayed) == big.body
    assert replayed.routing_key == "customers.create"
    assert replayed.headers[schema.H_REQUEST_ID] == big.request_id
    assert schema.H_ERROR not in replayed.headers

    # peek put it back; the worker takes it (redelivered: in a batch of its own) and applies it.
    async with running_worker(settings) as db:
        expected = {("replay-shop", i): (f"replay{i}@x.cz", False) for i in range(1, 1001)}
        await table_becomes(db, expected)
    assert await dead_count(settings) == 0
