"""The receiver's door against a hostile Internet: raw sockets to a real `python -m receiver`.

Secrets never reach its log or its answers, deeply nested JSON is an ordinary 400, a connection
cannot hold the receiver by sending slowly, too many body bytes at once get a fast 503, a
request is refused before its body wherever the head suffices, and /metrics is served on a port
of its own only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from common.logs import REDACTED, JsonFormatter, RedactSecrets
from common.settings import Settings
from common.topology import QUEUE
from receiver.app import METRICS
from receiver.limits import BodyBudget
from receiver.server import Connection, running
from tests.support.config import TOKEN
from tests.support.processes import ROOT, env_for, free_port, listening, spawn, stop
from tests.support.waiting import wait_until

SHOP = "obchod-u-jany"
CANARY = "canary-51ab@example.cz"  # customer data: never in an answer


@pytest.fixture
def database() -> str:
    """The receiver never touches Postgres: these tests need no database of their own."""
    return "postgresql://postgres@127.0.0.1:5432/not-used-by-the-receiver"


# --- a receiver process and raw HTTP ---------------------------------------------------------


@dataclass
class Receiver:
    """A running `python -m receiver` and where its log goes."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    host: str
    port: int
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]


@contextlib.asynccontextmanager
async def receiver(settings: Settings, tmp_path: Path, **env: str) -> AsyncIterator[Receiver]:
    """`python -m receiver` with these settings and variables, ready; stopped (SIGTERM) after."""
    metrics_port = free_port()
    variables = {"RECEIVER_METRICS_PORT": str(metrics_port), **env}
    log_path = tmp_path / f"receiver-{settings.receiver_port}.log"
    proc = spawn("receiver", env=env_for(settings, **variables), log=log_path)
    running_receiver = Receiver(
        proc,
        log_path,
        settings.receiver_host,
        settings.receiver_port,
        int(variables["RECEIVER_METRICS_PORT"]),
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert proc.poll() is None, running_receiver.log()
                try:
                    async with http.get(f"{running_receiver.url}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(ready, timeout=30)
        yield running_receiver
    finally:
        await stop(proc, grace=15)


@dataclass
class Answer:
    """One HTTP response as it came over the socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """The next response on the connection (an interim 100 Continue counts as one)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    status = int(status_line.split(" ")[1])
    length = 0 if status == 100 else int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return Answer(status, headers, body)


@contextlib.asynccontextmanager
async def connection(
    host: str, port: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def send(host: str, port: int, raw: bytes) -> Answer:
    """Send these bytes on a fresh connection; the answer."""
    async with connection(host, port) as (reader, writer):
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(read_answer(reader), 5)


async def closed_after(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the receiver closes the connection (it must send nothing first)."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(1000), within)
    assert data == b"", data
    return time.monotonic() - started


def head(path: str, *lines: str) -> bytes:
    """A request head, ended."""
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: receiver", *lines]) + "\r\n\r\n").encode()


def envelope_bytes(size: int = 0, shop: str = SHOP) -> bytes:
    """A valid one-record envelope, padded to `size` bytes when given."""
    record: dict[str, Any] = {"customer_id": 1, "email": CANARY, "note": ""}
    raw = json.dumps({"project_name": shop, "customers": [record]}).encode()
    if size:
        raw = raw.replace(b'"note": ""', b'"note": "' + b"x" * (size - len(raw)) + b'"')
        assert len(raw) == size
    return raw


async def post(
    url: str, body: bytes, token: str = TOKEN
) -> tuple[int, dict[str, str], bytes, float]:
    """POST a webhook (token in the query); status, headers, body and the seconds it took."""
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/webhooks/customers/create",
            params={"token": token},
            data=io.BytesIO(body),  # aiohttp warns of large bytes objects
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response,
    ):
        text = await response.read()
        return response.status, dict(response.headers), text, time.monotonic() - started


async def queued(settings: Settings) -> list[bytes]:
    """Bodies of the messages now in the customers queue (taken out)."""
    connection_ = await aio_pika.connect(settings.amqp_url)
    async with connection_:
        channel = await connection_.channel()
        queue = await channel.get_queue(QUEUE)
        bodies = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        return bodies


async def metric(port: int, name: str, **labels: str) -> float:
    """The value of one sample on the receiver's /metrics port (0 when absent)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


# --- 1. secrets stay out of logs and answers -------------------------------------------------

WEBHOOK = "/webhooks/customers/create"
UNKNOWN_SECRET = "not-configured-s3cret-77"  # no configured token: the patterns must catch it


def _basic(password: str) -> str:
    return base64.b64encode(f"upgates:{password}".encode()).decode()


# Requests aiohttp's parser refuses, each quoting a secret in the offending line.
UNPARSEABLE: dict[str, tuple[bytes, list[str]]] = {
    # name: (raw request, secrets that must appear nowhere)
    "raw non-ASCII byte in the query": (
        f"POST {WEBHOOK}?token={TOKEN}&x=".encode()
        + b"\xc4\x8d HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}",
        [TOKEN],
    ),
    "bad byte after an unknown token": (
        f"POST {WEBHOOK}?token={UNKNOWN_SECRET}".encode()
        + b"\xc4 HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}",
        [UNKNOWN_SECRET],
    ),
    "bad byte in Basic credentials": (
        f"POST {WEBHOOK} HTTP/1.1\r\nHost: r\r\nAuthorization: Basic {_basic(TOKEN)}".encode()
        + b"\x01\r\nContent-Length: 2\r\n\r\n{}",
        [TOKEN, _basic(TOKEN)],
    ),
    "bad byte inside Basic credentials": (
        f"POST {WEBHOOK} HTTP/1.1\r\nHost: r\r\nAuthorization: Basic ".encode()
        + _basic(UNKNOWN_SECRET)[:8].encode()
        + b"\x01"
        + _basic(UNKNOWN_SECRET)[8:].encode()
        + b"\r\nContent-Length: 2\r\n\r\n{}",
        [_basic(UNKNOWN_SECRET)[:8], _basic(UNKNOWN_SECRET)[8:]],
    ),
    "bad byte after a Bearer token": (
        f"POST {WEBHOOK} HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {UNKNOWN_SECRET}".encode()
        + b"\x7f\r\nContent-Length: 2\r\n\r\n{}",
        [UNKNOWN_SECRET],
    ),
}


async def test_unparseable_requests_are_answered_and_logged_without_their_secrets(
    settings: Settings, tmp_path: Path
) -> None:
    async with receiver(settings, tmp_path) as door:
        answers = {
            name: await send(door.host, door.port, raw) for name, (raw, _) in UNPARSEABLE.items()
        }
    log = door.log()
    for name, (_, secrets) in UNPARSEABLE.items():
        answer = answers[name]
        assert answer.status == 400, (name, answer)
        assert answer.json() == {"error": "malformed HTTP request"}, name
        for secret in secrets:
            assert secret.encode() not in answer.body, name
            assert secret not in log, f"{name}: {secret!r} in the log:\n{log}"
    # Each is still logged, in our words: the kind of error, never the request's text.
    malformed = [r for r in door.records() if r["msg"] == "malformed request"]
    assert len(malformed) == len(UNPARSEABLE), log
    assert all(r["status"] == 400 and r["why"] and "exc" not in r for r in malformed)
    assert not [r for r in door.records() if r["level"] == "error"], log


def _logged(redact: RedactSecrets, *args: Any, **kwargs: Any) -> str:
    """What a JSON handler with the filter prints for logger.error(*args, **kwargs)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(redact)
    logger = logging.Logger("a-library")  # not registered: the test's logging stays untouched
    logger.addHandler(handler)
    logger.error(*args, **kwargs)
    [line] = lines
    return line


REDACTED_PLACES = {
    # name: (text holding the secret "hunter2-xyz", the part that must stay)
    "query token": ("POST /x?token=hunter2-xyz&y=1 HTTP/1.1", "token="),
    "query token, escaped bad byte inside": ("b'/x?token=hunt\\xc4er2-xyz HTTP/1.1'", "token="),
    "other token parameter": ("GET /?access_token=hunter2-xyz", "access_token="),
    "Authorization header": ("b'Authorization: Basic aHVudGVyMi14eXo=\\x01'", "Authorization: "),
    "Basic credentials alone": ("Invalid HTTP header: b'Basic aHVudGVy\\x01Mi14eXo='", "Basic "),
    "Bearer credentials": ("header Bearer hunter2-xyz.abc", "Bearer "),
    "URL password": ("cannot reach amqp://shop:hunter2-xyz@broker:5672/vh", "amqp://shop:"),
    "configured token alone": ("the value was hunter2-xyz, says the library", "the value was "),
}


@pytest.mark.parametrize("place", list(REDACTED_PLACES))
def test_the_log_filter_redacts_message_arguments_and_exception_text(place: str) -> None:
    text, kept = REDACTED_PLACES[place]
    redact = RedactSecrets(["hunter2-xyz"])
    secret_parts = ["hunter2-xyz", "aHVudGVyMi14eXo", "aHVudGVy", "Mi14eXo", "hunt", "er2-xyz"]
    try:
        raise ValueError(f"400, message:\n  {text}")
    except ValueError as exc:
        error = exc
    outputs = [
        _logged(redact, text),
        _logged(redact, "Error handling request: %s", text),
        _logged(redact, "Error handling request", exc_info=error),
        _logged(redact, "%s", text, stack_info=True),
    ]
    for line in outputs:
        entry = json.loads(line)
        shown = entry["msg"] + entry.get("exc", "")
        assert not [part for part in secret_parts if part in shown], line
    assert kept in json.loads(outputs[0])["msg"]
    assert REDACTED in json.loads(outputs[0])["msg"]
    assert REDACTED in json.loads(outputs[2])["exc"]


def test_the_log_filter_leaves_ordinary_text_alone() -> None:
    redact = RedactSecrets(["hunter2-xyz"])
    for text in (
        "webhook",
        "a basic check of amqp://broker:5672/vhost found 3 tokens",
        "cannot reach the broker: ConnectionError [Errno 111] Connect call failed",
        "token: none given",
    ):
        assert redact.redact(text) == text


def test_configure_logging_redacts_whatever_library_logs() -> None:
    # In a process of its own: configure_logging changes the whole process's logging.
    script = """if True:
        import logging
        from common.logs import configure_logging
        from common.settings import Settings
        configure_logging(Settings(webhook_tokens=("tok-a1b2c3",), log_format="json"))
        try:
            raise RuntimeError("quoted: b'POST /x?token=tok-a1b2c3 HTTP/1.1'")
        except RuntimeError:
            logging.getLogger("aiohttp.server").exception("Error handling %s", "tok-a1b2c3")
        logging.getLogger("aiormq").warning("url amqp://u:pw-9f8e@h/ tok-a1b2c3")
    """
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=30, check=True
    )
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 2, done
    assert "tok-a1b2c3" not in done.stdout.decode()
    assert "pw-9f8e" not in done.stdout.decode()
    assert all(REDACTED in line for line in lines)
    assert "RuntimeError" in json.loads(lines[0])["exc"]  # the traceback itself is kept


# --- 2. deeply nested JSON -------------------------------------------------------------------

DEPTH = 5000  # far past msgspec's recursion limit (Python's, about 1000)

NESTED = {
    "objects, the whole body": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    "arrays in an envelope field": (
        b'{"project_name": "x", "extra": ' + b"[" * DEPTH + b"]" * DEPTH + b', "customers": []}'
    ),
    "arrays in one record": (
        f'{{"project_name": "{SHOP}", "customers": [{{"customer_id": 1, "x": '.encode()
        + b"[" * DEPTH
        + b"]" * DEPTH
        + b"}]}"
    ),
}


async def test_deeply_nested_json_is_a_400_with_its_log_line_and_count(
    settings: Settings, tmp_path: Path
) -> None:
    async with receiver(settings, tmp_path) as door:
        for name, body in NESTED.items():
            status, headers, text, _ = await post(door.url, body)
            assert status == 400, (name, text[:300])
            assert headers["Content-Type"].startswith("application/json"), name
            assert json.loads(text) == {
                "error": "malformed JSON",
                "detail": "JSON nested too deeply",
            }, name
        counted = await metric(
            door.metrics_port, "upgates_receiver_requests_total", event="create", status="400"
        )
    assert counted == len(NESTED)
    lines = [r for r in door.records() if r["msg"] == "webhook"]
    assert [(r["status"], r["why"]) for r in lines] == [(400, "JSON nested too deeply")] * 3
    assert "Traceback" not in door.log()
    assert await queued(settings) == []


async def test_a_record_nested_within_the_limit_passes_the_receiver(
    settings: Settings, receiver_url: str
) -> None:
    # Its record is the worker's to judge (it rejects what it cannot decode); the door takes it.
    body = (
        f'{{"project_name": "{SHOP}", "customers": [{{"customer_id": 1, "x": '.encode()
        + b"[" * 300
        + b"]" * 300
        + b"}]}"
    )
    status, _, text, _ = await post(receiver_url, body)
    assert status == 200, text
    assert await queued(settings) == [body]


# --- 8. resource limits at the door ----------------------------------------------------------


async def test_a_connection_that_sends_its_head_too_slowly_is_closed(
    settings: Settings, tmp_path: Path
) -> None:
    async with receiver(settings, tmp_path, HEADER_READ_TIMEOUT="0.5") as door:
        # Half a head, then nothing.
        async with connection(door.host, door.port) as (reader, writer):
            writer.write(f"POST {WEBHOOK}?token={TOKEN} HTTP/1.1\r\nHost: r\r\n".encode())
            await writer.drain()
            assert 0.4 < await closed_after(reader, within=3) < 1.5
        # Nothing at all.
        async with connection(door.host, door.port) as (reader, _):
            assert 0.4 < await closed_after(reader, within=3) < 1.5
        # A byte at a time, past the deadline: sending something does not extend it.
        async with connection(door.host, door.port) as (reader, writer):
            started = time.monotonic()
            with contextlib.suppress(ConnectionError):
                for byte in f"POST {WEBHOOK}?token={TOKEN} HTTP/1.1\r\n".encode():
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    if reader.at_eof() or time.monotonic() - started > 3:
                        break
            await closed_after(reader, within=3)
            assert time.monotonic() - started < 1.5


async def test_a_head_that_comes_in_pieces_within_the_timeout_is_answered(
    settings: Settings, tmp_path: Path
) -> None:
    body = envelope_bytes()
    raw = head(f"{WEBHOOK}?token={TOKEN}", f"Content-Length: {len(body)}")
    async with (
        receiver(settings, tmp_path, HEADER_READ_TIMEOUT="1", BODY_READ_TIMEOUT="3") as door,
        connection(door.host, door.port) as (reader, writer),
    ):
        # The end of the head split across reads, too.
        for piece in (raw[:20], raw[20:-3], raw[-3:-1], raw[-1:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.15)
        await asyncio.sleep(1)  # past the head deadline: it no longer applies
        writer.write(body)
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 5)
        assert answer.status == 200, answer
        # The same connection carries a second request; its head has no first-head deadline.
        writer.write(raw + body)
        await writer.drain()
        assert (await asyncio.wait_for(read_answer(reader), 5)).status == 200


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    settings: Settings, tmp_path: Path
) -> None:
    body = envelope_bytes()
    raw = head(f"{WEBHOOK}?token={TOKEN}", f"Content-Length: {len(body)}") + body
    async with (
        receiver(settings, tmp_path, KEEPALIVE_TIMEOUT="1") as door,
        connection(door.host, door.port) as (reader, writer),
    ):
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 5)
        assert answer.status == 200
        assert answer.headers.get("connection", "").lower() != "close"
        assert 0.8 < await closed_after(reader, within=5) < 2.5


async def _hold_body_bytes(
    host: str, port: int, size: int, sent: int, chunked: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A webhook announcing a `size`-byte body (or chunked) of which only `sent` bytes come."""
    body = envelope_bytes(size)
    reader, writer = await asyncio.open_connection(host, port)
    if chunked:
        writer.write(head(f"{WEBHOOK}?token={TOKEN}", "Transfer-Encoding: chunked"))
        writer.write(f"{sent:x}\r\n".encode() + body[:sent] + b"\r\n")
    else:
        writer.write(head(f"{WEBHOOK}?token={TOKEN}", f"Content-Length: {size}") + body[:sent])
    await writer.drain()
    return reader, writer


async def _finish_body(writer: asyncio.StreamWriter, size: int, sent: int, chunked: bool) -> None:
    rest = envelope_bytes(size)[sent:]
    writer.write(f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n" if chunked else rest)
    await writer.drain()


def _assert_fast_503(status: int, headers: dict[str, str], text: bytes, took: float) -> None:
    assert status == 503, text
    assert int(headers["Retry-After"]) > 0
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(text)["detail"] == "too many body bytes in flight"
    assert took < 0.9  # the contract's "well under 1 s"; it never waits for the body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_bodies_beyond_the_byte_budget_get_a_fast_503(
    chunked: bool, settings: Settings, tmp_path: Path
) -> None:
    mib = 1024 * 1024
    limits = {
        "MAX_BODY_BYTES": str(2 * mib),
        "MAX_BODY_BYTES_IN_FLIGHT": str(3 * mib),
        "BODY_READ_TIMEOUT": "5",
    }
    # Chunked bodies hold the body limit (2 MiB) each; announced ones what they announce.
    size = 2 * mib if chunked else mib
    holders_count = 1 if chunked else 3
    async with receiver(settings, tmp_path, **limits) as door:
        holders = [
            await _hold_body_bytes(door.host, door.port, size, 1000, chunked)
            for _ in range(holders_count)
        ]
        try:
            await asyncio.sleep(0.3)  # their heads are read: their bytes are reserved
            # Over the budget: refused at once, before its body is read.
            _assert_fast_503(*await post(door.url, envelope_bytes(mib + mib // 2)))
            # Once the held bodies complete and are answered, their bytes are free again.
            for _, writer in holders:
                await _finish_body(writer, size, 1000, chunked)
            for reader, _ in holders:
                assert (await asyncio.wait_for(read_answer(reader), 5)).status == 200
        finally:
            for _, writer in holders:
                writer.close()
        status, _, text, _ = await post(door.url, envelope_bytes(mib + mib // 2))
        assert status == 200, text
    assert len(await queued(settings)) == holders_count + 1


def test_the_byte_budget_admits_what_fits_and_one_oversized_body_alone() -> None:
    budget = BodyBudget(100)
    assert budget.reserve(60)
    assert budget.reserve(40)
    assert not budget.reserve(1)
    budget.release(40)
    assert not budget.reserve(41)
    assert budget.reserve(0)
    assert budget.reserve(40)
    budget.release(40)
    budget.release(60)
    assert budget.held == 0
    assert budget.reserve(500)  # alone: larger than the budget, still served
    assert not budget.reserve(1)
    budget.release(500)
    assert budget.held == 0


HUGE = 100 * 1024 * 1024  # announced, never sent


@pytest.mark.parametrize("expect", [True, False], ids=["expect-100-continue", "plain"])
async def test_a_wrong_token_is_refused_before_the_body_is_sent(
    expect: bool, settings: Settings, tmp_path: Path
) -> None:
    lines = [f"Content-Length: {HUGE}", *(["Expect: 100-continue"] if expect else [])]
    async with receiver(settings, tmp_path) as door:
        for path in (f"{WEBHOOK}?token=wrong-token", WEBHOOK, "/webhooks/customers/nope"):
            started = time.monotonic()
            answer = await send(door.host, door.port, head(path, *lines))
            assert answer.status in (401, 404), (path, answer)  # never 100 Continue
            assert time.monotonic() - started < 0.9
        # Over the body limit: 413, again without inviting the body.
        answer = await send(door.host, door.port, head(f"{WEBHOOK}?token={TOKEN}", *lines))
        assert answer.status == 413, answer
    assert await queued(settings) == []


async def test_a_right_token_is_invited_to_send_its_body(
    settings: Settings, tmp_path: Path
) -> None:
    body = envelope_bytes()
    shop_token = "shop-token-for-another-shop"
    lines = [f"Content-Length: {len(body)}", "Expect: 100-continue"]
    async with receiver(settings, tmp_path, SHOP_TOKENS=f"another-shop={shop_token}") as door:
        for token, final in ((TOKEN, 200), (shop_token, 403)):
            async with connection(door.host, door.port) as (reader, writer):
                writer.write(head(f"{WEBHOOK}?token={token}", *lines))
                await writer.drain()
                interim = await asyncio.wait_for(read_answer(reader), 5)
                assert interim.status == 100, interim
                writer.write(body)
                await writer.drain()
                answer = await asyncio.wait_for(read_answer(reader), 5)
                # A shop token is judged only once the body names the shop.
                assert answer.status == final, answer
        # An expectation we do not know: 417, not 100.
        answer = await send(
            door.host, door.port, head(f"{WEBHOOK}?token={TOKEN}", "Expect: 200-ok", *lines[:1])
        )
        assert answer.status == 417, answer
    assert await queued(settings) == [body]


# --- 14. /metrics on its own port ------------------------------------------------------------


async def test_metrics_are_served_on_their_own_port_and_not_on_the_webhook_port(
    settings: Settings, tmp_path: Path
) -> None:
    async with receiver(settings, tmp_path) as door, aiohttp.ClientSession() as http:
        assert (await post(door.url, envelope_bytes()))[0] == 200
        async with http.get(f"{door.url}/metrics") as response:
            assert response.status == 404
            assert (await response.json())["error"]
        counted = await metric(
            door.metrics_port, "upgates_receiver_requests_total", event="create", status="200"
        )
        assert counted == 1
        assert listening(door.proc.pid, door.metrics_port)
        # Only /metrics there: not the webhooks.
        async with http.post(
            f"http://127.0.0.1:{door.metrics_port}{WEBHOOK}",
            params={"token": TOKEN},
            data=envelope_bytes(),
        ) as response:
            assert response.status in (404, 405)


# --- in-process: every outcome is a JSON answer with its line and count ------------------


async def test_an_unexpected_failure_is_a_json_500_logged_and_counted(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import receiver.app

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(receiver.app, "_read_and_publish", broken)
    caplog.set_level(logging.INFO, logger="receiver.app")
    local = replace(settings, receiver_port=free_port(), receiver_metrics_port=0)
    async with running(local) as app:
        status, headers, text, _ = await post(
            f"http://{local.receiver_host}:{local.receiver_port}", envelope_bytes()
        )
        registry = app[METRICS].registry
        count = registry.get_sample_value(
            "upgates_receiver_requests_total", {"event": "create", "status": "500"}
        )
    assert status == 500
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(text) == {"error": "internal error"}
    assert count == 1
    [line] = [r for r in caplog.records if r.getMessage() == "webhook"]
    assert line.status == 500  # type: ignore[attr-defined]


async def test_a_sender_hanging_up_mid_body_is_logged_and_counted_as_499(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="receiver.app")
    local = replace(settings, receiver_port=free_port(), receiver_metrics_port=0)
    async with running(local) as app:
        async with connection(local.receiver_host, local.receiver_port) as (_, writer):
            writer.write(head(f"{WEBHOOK}?token={TOKEN}", "Content-Length: 1000") + b'{"pro')
            await writer.drain()
            await asyncio.sleep(0.2)  # in the handler, reading the body

        async def counted() -> float | None:
            return app[METRICS].registry.get_sample_value(
                "upgates_receiver_requests_total", {"event": "create", "status": "499"}
            )

        await wait_until(counted, timeout=5)
    lines = [r for r in caplog.records if r.getMessage() == "webhook"]
    assert [r.status for r in lines] == [499]  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_aiohttp_still_has_the_seams_connection_plugs_into() -> None:
    """Connection subclasses aiohttp's RequestHandler: if these change, it must be revisited."""
    assert issubclass(Connection, web.RequestHandler)
    parameters = inspect.signature(web.RequestHandler.__init__).parameters
    assert {"manager", "loop", "keepalive_timeout", "access_log"} <= set(parameters)
    assert list(inspect.signature(web.RequestHandler.handle_error).parameters) == [
        "self",
        "request",
        "status",
        "exc",
        "message",
    ]
    for method in ("connection_made", "data_received", "connection_lost", "force_close"):
        assert callable(getattr(web.RequestHandler, method)), method
