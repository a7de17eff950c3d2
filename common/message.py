"""How webhooks travel through RabbitMQ: the receiver packs them, workers and the admin unpack.

- One webhook, one message: the body exactly as received, described by headers (schema.H_*).
  Every message was like this before bundles existed, and dead letters still are.
- A bundle: small webhooks that arrived while the receiver waited for the broker, in one message
  (msgpack, each webhook with its own body and headers). RabbitMQ's work is mostly per message,
  so under load this is what lets it keep up with thousands of small webhooks a second.
- A large body is compressed (zstd, `content_encoding`): a full 5000-record payload shrinks
  from 1.3 MB to a tenth or less, which the broker writes, replicates and delivers.

A message is acknowledged as a whole, after every webhook in it is committed or dead-lettered.
"""

from __future__ import annotations

import time
import uuid

import aio_pika
import msgspec
import zstandard
from aio_pika.abc import AbstractIncomingMessage, HeadersType

from common import schema
from common.settings import Settings

JSON = "application/json"
BUNDLE = "application/vnd.upgates.bundle+msgpack"
ZSTD = "zstd"
# Bodies from this size up are compressed. Below it the broker's cost is per message, not per
# byte, and compressing would only cost the receiver.
COMPRESS_FROM_BYTES = 64 * 1024
# Level 1: fast enough for the receiver's hot path; higher levels shrink little more.
ZSTD_LEVEL = 1
# A decompressed message holds no more than the receiver could have put in it. One webhook: its
# body, at most MAX_BODY_BYTES. A bundle (receiver/publisher.py): bodies each smaller than
# COMPRESS_FROM_BYTES, added while their total is under a MiB, each framed by its shop name
# (which its body holds too), ids and msgpack headers; well under this bound, which
# tests/integration/test_admin_hardening.py checks against the publisher's limits.
BUNDLE_MAX_UNPACKED_BYTES = 4 * 1024 * 1024


def unpacked_limit(max_body_bytes: int) -> int:
    """The most a message may hold decompressed, when the receiver takes bodies this large."""
    return max(max_body_bytes, BUNDLE_MAX_UNPACKED_BYTES)


# For a caller that does not pass its MAX_BODY_BYTES: right under the default only.
DEFAULT_MAX_BODY_BYTES = Settings().max_body_bytes


class Webhook(msgspec.Struct, array_like=True, frozen=True):
    """One webhook as the receiver accepted it: what it was, and its body as sent."""

    event: str
    project_name: str
    records: int
    received_at: int  # milliseconds since the epoch (AMQP floats are 32-bit)
    request_id: str
    body: bytes

    def headers(self) -> HeadersType:
        """The headers of a message that carries this webhook alone."""
        return {
            schema.H_EVENT: self.event,
            schema.H_PROJECT: self.project_name,
            schema.H_RECORDS: self.records,
            schema.H_RECEIVED_AT: self.received_at,
            schema.H_REQUEST_ID: self.request_id,
        }


_encode_bundle = msgspec.msgpack.Encoder().encode
_decode_bundle = msgspec.msgpack.Decoder(list[Webhook]).decode


def pack(webhooks: list[Webhook]) -> aio_pika.Message:
    """One persistent message for one webhook, or a bundle for several; compressed when large."""
    if len(webhooks) == 1:
        webhook = webhooks[0]
        body, content_type, headers = webhook.body, JSON, webhook.headers()
        message_id = webhook.request_id
    else:
        body, content_type = _encode_bundle(webhooks), BUNDLE
        headers = {
            schema.H_BUNDLE: len(webhooks),
            schema.H_RECORDS: sum(w.records for w in webhooks),
            schema.H_RECEIVED_AT: min(w.received_at for w in webhooks),
        }
        message_id = uuid.uuid4().hex
    encoding = None
    if len(body) >= COMPRESS_FROM_BYTES:
        body, encoding = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body), ZSTD
    return aio_pika.Message(
        body,
        content_type=content_type,
        content_encoding=encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,  # not the default: survive a restart
        headers=headers,
        message_id=message_id,
        timestamp=time.time(),
    )


def body_of(
    message: AbstractIncomingMessage, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> bytes:
    """The message body as the receiver packed it (decompressed); ValueError if it cannot be.

    Pass the service's MAX_BODY_BYTES: a body that would unpack to more than the receiver
    could have accepted is refused before any memory is given to it.
    """
    if not message.content_encoding:
        return message.body
    if message.content_encoding != ZSTD:
        raise ValueError(f"unknown content encoding {message.content_encoding!r}")
    limit = unpacked_limit(max_body_bytes)
    try:
        size = zstandard.frame_content_size(message.body)
        if size < 0:
            raise ValueError("compressed body without its size in the zstd frame header")
        if size > limit:
            raise ValueError(
                f"compressed body would unpack to {size} bytes, more than the {limit} "
                "a message can hold"
            )
        return zstandard.ZstdDecompressor().decompress(message.body)
    except zstandard.ZstdError as exc:
        raise ValueError(f"corrupt zstd body: {exc}") from None


def unpack(
    message: AbstractIncomingMessage, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> list[Webhook]:
    """The webhooks a message carries, in the order received; ValueError with the reason when it
    can never be read (a worker dead-letters such a message as it is). Pass the service's
    MAX_BODY_BYTES (see body_of)."""
    body = body_of(message, max_body_bytes)
    if message.content_type == BUNDLE:
        try:
            return _decode_bundle(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"not a bundle of webhooks: {schema.explain(exc, body)}") from None
    headers = message.headers or {}
    event = headers.get(schema.H_EVENT)
    if event not in schema.EVENTS:
        raise ValueError(f"unknown event header {schema.H_EVENT}={event!r}")
    received_at = headers.get(schema.H_RECEIVED_AT)
    project = headers.get(schema.H_PROJECT)
    records = headers.get(schema.H_RECORDS)
    return [
        Webhook(
            str(event),
            str(project) if project is not None else "",
            records if isinstance(records, int) else 0,
            received_at if isinstance(received_at, int) else int(time.time() * 1000),
            str(headers.get(schema.H_REQUEST_ID) or message.message_id or ""),
            body,
        )
    ]


def alone(webhook: Webhook, **headers: str) -> aio_pika.Message:
    """A webhook as a message of its own, uncompressed, with extra headers (a dead letter's
    reason); how a webhook leaves a bundle."""
    return aio_pika.Message(
        webhook.body,
        content_type=JSON,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={**webhook.headers(), **headers},
        message_id=webhook.request_id,
        timestamp=webhook.received_at / 1000,
    )


def copy_of(message: AbstractIncomingMessage, headers: HeadersType) -> aio_pika.Message:
    """A delivery as a new persistent message: the same body and identity, these headers."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        timestamp=message.timestamp,
    )
