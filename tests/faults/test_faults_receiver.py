"""The receiver under stress and bad input: SIGTERM mid-burst, slow bodies, bursts, fuzzed bodies.

Promises: every 200 is stored (and lands), every answer comes in well under Upgates' 1 s, and
anything answered 4xx publishes nothing. The README's status table is the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aio_pika
import aiohttp
import hypothesis
import msgspec
import pytest
from aio_pika.abc import AbstractQueue
from aiohttp import web
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from common.settings import Settings
from common.topology import QUEUE
from receiver.app import create_app
from tests.support.broker import queued_webhooks
from tests.support.config import AMQP_BASE, TOKEN, service_settings
from tests.support.load import Sender, make_record
from tests.support.oracle import assert_table_matches
from tests.support.processes import Procs, assert_serving, http_status
from tests.support.proxy import Proxy, port_of, start_proxy, with_port
from tests.support.waiting import wait_until

NO_DATABASE = "postgresql://postgres@127.0.0.1:1/unused"  # these receivers never need one


@contextlib.asynccontextmanager
async def running_receiver(settings: Settings) -> AsyncIterator[str]:
    """A receiver in this process, ready (connected to the broker); its base URL."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.receiver_host, settings.receiver_port).start()
    url = f"http://{settings.receiver_host}:{settings.receiver_port}"
    try:

        async def ready() -> bool:
            return await http_status(f"{url}/readyz") == 200

        await wait_until(ready)
        yield url
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def the_queue(amqp_url: str) -> AsyncIterator[AbstractQueue]:
    """The customer events queue (as declared by the receiver), to look into."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        yield await channel.declare_queue(QUEUE, passive=True)


async def depth(queue: AbstractQueue) -> int:
    """Messages ready in the queue now."""
    count = (await queue.declare()).message_count
    assert count is not None
    return count


def envelope(*records: dict[str, Any], shop: str = "fuzz-shop") -> bytes:
    return msgspec.json.encode({"project_name": shop, "customers": list(records)})


# --- SIGTERM ---------------------------------------------------------------------------------


@pytest.mark.fault
async def test_sigterm_receiver_mid_burst_every_200_lands(
    settings: Settings, procs: Procs, proxies: list[Proxy]
) -> None:
    # Publishes are slowed (a proxy delays the broker link) so that many requests are in flight
    # when SIGTERM arrives. The old receiver must finish them (a 200 only once confirmed) and
    # exit 0; a new one takes over on the same port; every 200 lands.
    broker = await start_proxy(proxies, "127.0.0.1", port_of(settings.amqp_url))
    slow = replace(settings, amqp_url=with_port(settings.amqp_url, broker.port))
    old = await procs.receiver(slow)
    worker = await procs.worker(settings)
    broker.slow(0.1)
    async with Sender(old.url, concurrency=10, pause=0.0, keepalive=False) as sender:
        await sender.wait_ok(30)
        old.signal(signal.SIGTERM)
        new = procs.start("receiver", slow)  # same port (SO_REUSEPORT)
        code = await old.wait(10)
        await procs.ready(new)
        await sender.wait_ok(40)
        await sender.stop()
    assert code == 0, old.output()[-3000:]
    await assert_table_matches(settings.database_url, sender.oracle, logs=procs.logs())
    await assert_serving(new, worker)
    stats = sender.stats
    # A request the old receiver had accepted must be answered, not cut off. (A connection per
    # request: with keep-alive, a request sent as the server closes an idle connection is cut
    # off before the server reads it, a race of HTTP/1.1 itself, harmless since it is retried.)
    assert stats.errors["ServerDisconnectedError"] == 0, stats.summary()


# --- slow bodies and bursts -------------------------------------------------------------------


async def trickle_request(port: int, body: bytes, every: float, chunked: bool) -> bytes:
    """Send the head, then the body a byte at a time; the status line of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    writer.write(
        f"POST /webhooks/customers/create?token={TOKEN} HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: application/json\r\n{length}\r\n\r\n".encode()
    )

    async def trickle() -> None:
        with contextlib.suppress(OSError):
            for byte in body:
                data = bytes([byte])
                writer.write(b"1\r\n" + data + b"\r\n" if chunked else data)
                await writer.drain()
                await asyncio.sleep(every)

    sending = asyncio.create_task(trickle())
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_slowly_trickling_body_is_cut_off_by_the_read_timeout(
    vhost: str, chunked: bool
) -> None:
    config = service_settings(f"{AMQP_BASE}/{vhost}", NO_DATABASE, body_read_timeout=0.5)
    body = envelope(make_record("create", 1, 0))  # ~150 bytes at 20 per second: ~8 s
    async with running_receiver(config), the_queue(config.amqp_url) as queue:
        started = time.perf_counter()
        status_line = await trickle_request(config.receiver_port, body, 0.05, chunked)
        took = time.perf_counter() - started
        assert status_line.split(b" ")[1:2] == [b"408"], status_line
        assert took < config.body_read_timeout + 0.5
        assert await depth(queue) == 0


async def test_too_many_requests_at_once_get_a_fast_503(vhost: str, proxies: list[Proxy]) -> None:
    # Publishes take ~0.2 s (a delayed broker link); 40 arrive at once with room for 4: the
    # rest must get an immediate 503 with Retry-After, not wait in a queue past the sender's
    # 1 s. Every 200 is in the queue, and nothing else.
    broker = await start_proxy(proxies, "127.0.0.1", port_of(AMQP_BASE + "/"))
    config = service_settings(
        f"amqp://guest:guest@127.0.0.1:{broker.port}/{vhost}", NO_DATABASE, max_in_flight=4
    )
    async with (
        running_receiver(config) as url,
        the_queue(f"{AMQP_BASE}/{vhost}"),  # declared by the receiver
        aiohttp.ClientSession() as http,
    ):
        broker.slow(0.1)

        async def one(n: int) -> tuple[int, float, str | None]:
            started = time.perf_counter()
            async with http.post(
                f"{url}/webhooks/customers/create",
                params={"token": TOKEN},
                data=envelope(make_record("create", n, 0)),
            ) as response:
                await response.read()
                took = time.perf_counter() - started
                return response.status, took, response.headers.get("Retry-After")

        answers = await asyncio.gather(*(one(n) for n in range(1, 41)))
        statuses = sorted({status for status, _, _ in answers})
        ok = sum(1 for status, _, _ in answers if status == 200)
        refused = [(took, retry) for status, took, retry in answers if status == 503]
        assert statuses == [200, 503], answers
        assert ok >= config.max_in_flight
        assert all(retry is not None for _, retry in refused)
        assert max(took for took, _ in refused) < 0.25, refused
        assert max(took for _, took, _ in answers) < 1.0, answers
        assert await queued_webhooks(f"{AMQP_BASE}/{vhost}", QUEUE) == ok
        broker.passthrough()
        async with http.post(
            f"{url}/webhooks/customers/create",
            params={"token": TOKEN},
            data=envelope(make_record("create", 99, 0)),
        ) as response:
            assert response.status == 200  # the slots were given back


# --- fuzzed bodies ----------------------------------------------------------------------------

LIMIT = 1024  # MAX_BODY_BYTES for the fuzz (its minimum): the 413 path is reachable
MARKER = "leak-me@example.cz"  # customer data that must never come back in an error body
SURROGATE = "<lone-surrogate>"  # becomes the JSON escape \\ud800 in the body

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.just(MARKER),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
records = st.fixed_dictionaries(
    {
        "customer_id": st.integers(-(2**64), 2**64) | st.text(max_size=6),
        "email": st.just(MARKER),
        "creation_time": st.just("2025-01-01T10:00:00+01:00") | st.text(max_size=10),
    }
)
envelopes = st.fixed_dictionaries(
    {
        "project_name": st.one_of(
            st.text(min_size=1, max_size=20),
            st.text(min_size=1, max_size=20),
            st.text(max_size=20),
            st.just("shop\u0000"),
            st.just(SURROGATE),
        ),
        "customers": st.lists(records | json_values, max_size=4),
    }
)


def encode(value: Any) -> bytes:
    # A lone surrogate cannot be encoded, only written as the escape a sender may put in JSON.
    return msgspec.json.encode(value).replace(SURROGATE.encode(), b"\\ud800")


# Envelopes (mostly valid) weigh the most: they are the ones that get published.
BODY_KINDS = ("bytes", "truncated", "wrong types", "json", "oversized", *["envelope"] * 4)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(BODY_KINDS))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "envelope":
        return encode(draw(envelopes))
    if kind == "truncated":
        whole = encode(draw(envelopes))
        return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    if kind == "wrong types":
        return encode({"project_name": draw(json_values), "customers": draw(json_values)})
    if kind == "json":
        return encode(draw(json_values))
    padding = "x" * draw(st.integers(LIMIT, 3 * LIMIT))
    return encode({"project_name": "p", "customers": [{"email": MARKER}], "pad": padding})


def is_envelope(body: bytes) -> bool:
    """What the contract calls an envelope (its checks, not the receiver's code)."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return False
    if not isinstance(value, dict):
        return False
    project, customers = value.get("project_name"), value.get("customers")
    return (
        isinstance(project, str)
        and 0 < len(project) <= 200
        and project.isprintable()
        and isinstance(customers, list)
    )


@pytest.fixture
async def fuzz_target(vhost: str) -> AsyncIterator[tuple[str, AbstractQueue, Settings]]:
    config = service_settings(f"{AMQP_BASE}/{vhost}", NO_DATABASE, max_body_bytes=LIMIT)
    async with running_receiver(config) as url, the_queue(config.amqp_url) as queue:
        yield url, queue, config


@hypothesis.settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=bodies(),
    token=st.sampled_from([TOKEN, TOKEN, TOKEN, "wrong", None]),
    chunked=st.booleans(),
    event=st.sampled_from(["create", "update", "delete"]),
)
async def test_fuzzed_bodies_get_documented_statuses_and_4xx_publishes_nothing(
    fuzz_target: tuple[str, AbstractQueue, Settings],
    body: bytes,
    token: str | None,
    chunked: bool,
    event: str,
) -> None:
    url, queue, _ = fuzz_target

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    params = {"token": token} if token is not None else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/webhooks/customers/{event}",
            params=params,
            data=stream() if chunked else body,
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        status, text = response.status, await response.text()
    published = await queue.get(no_ack=True, fail=False)
    left = await depth(queue)

    hypothesis.event(f"status {status}")
    assert status in {200, 400, 401, 413, 422}, (status, text)
    answer = msgspec.json.decode(text)
    assert isinstance(answer, dict)
    if token != TOKEN:
        assert status == 401
    elif len(body) > LIMIT:
        assert status == 413, (status, text)
    elif status == 200:
        customers = msgspec.json.decode(body)["customers"]
        assert answer["accepted"] == len(customers)
        if customers:  # published, once, byte for byte
            assert published is not None
            assert published.body == body
        else:
            assert published is None
    else:
        assert "error" in answer, text
        assert MARKER not in text  # error bodies never echo customer data
    if is_envelope(body) and token == TOKEN and len(body) <= LIMIT:
        assert status == 200, (status, text, body)
    if status != 200:
        assert published is None, (status, text)
    assert left == 0
