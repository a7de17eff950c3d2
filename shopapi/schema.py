"""What the REST API answers, as far as we read it (unknown fields are ignored).

A customer in the API differs from the webhook's record: email and the two flags sit under
`login`. `customers_as_webhooks` turns a page into the bodies of the webhooks that would have
carried the same state, so that a sync goes through the worker's decoder and fold unchanged.
"""

from __future__ import annotations

import msgspec


class Login(msgspec.Struct):
    """The customer's login: where the API keeps email and the flags."""

    email: str | None = None
    active_yn: bool | int | str | None = None
    blocked_yn: bool | int | str | None = None


class Customer(msgspec.Struct):
    """One customer as GET /customers lists it; only what the table keeps."""

    customer_id: int | str
    code: str | int | None = None
    login: Login | None = None
    creation_time: str | None = None
    last_update_time: str | None = None


class CustomersPage(msgspec.Struct):
    """One page of GET /customers (100 customers at most)."""

    current_page: int = 1
    number_of_pages: int = 0
    number_of_items: int = 0
    customers: list[Customer] = []


class Webhook(msgspec.Struct):
    """One webhook as GET /webhooks lists it."""

    id: int
    event: str
    url: str
    active_yn: bool = True
    name: str | None = None
    last_success_call: str | None = None
    last_success_call_status: int | None = None
    last_error_call: str | None = None
    last_error_call_status: int | None = None


class Webhooks(msgspec.Struct):
    """The answer of GET /webhooks."""

    webhooks: list[Webhook] = []


class WebhookAnswer(msgspec.Struct):
    """The answer of POST and PUT /webhooks."""

    webhook: Webhook


class Message(msgspec.Struct):
    """One entry of an error body's `messages`."""

    message: str | None = None
    property: str | None = None


class ErrorBody(msgspec.Struct):
    """An error answer: `{"messages": [...]}`."""

    messages: list[Message] = []


_encode = msgspec.json.Encoder().encode


def customers_as_webhooks(shop: str, customers: list[Customer]) -> dict[str, bytes]:
    """The webhook bodies, by event, that carry these customers' state.

    A customer as the API shows it is its state as of `last_update_time`: an update at that
    time. Its `creation_time` becomes a create with the same values, which sets `created_at`
    and, being older (or of a lower rank at the same time), never shows over the update.
    """
    creates: list[dict[str, object]] = []
    updates: list[dict[str, object]] = []
    for customer in customers:
        login = customer.login or Login()
        values = {
            "customer_id": customer.customer_id,
            "email": login.email,
            "code": customer.code,
            "active_yn": login.active_yn,
            "blocked_yn": login.blocked_yn,
        }
        if customer.creation_time is not None:
            creates.append({**values, "creation_time": customer.creation_time})
        if customer.last_update_time is not None or customer.creation_time is None:
            # Without either time the update is rejected like any record without its time.
            updates.append({**values, "last_update_time": customer.last_update_time})
    bodies = {}
    for event, records in (("create", creates), ("update", updates)):
        if records:
            bodies[event] = _encode({"project_name": shop, "customers": records})
    return bodies


def deletes_as_webhook(shop: str, deleted: list[tuple[int, str]]) -> bytes:
    """The body of a delete webhook for (customer_id, deletion_time) pairs."""
    records = [{"customer_id": cid, "deletion_time": at} for cid, at in deleted]
    return _encode({"project_name": shop, "customers": records})


page_decoder = msgspec.json.Decoder(CustomersPage)
webhooks_decoder = msgspec.json.Decoder(Webhooks)
webhook_answer_decoder = msgspec.json.Decoder(WebhookAnswer)
error_decoder = msgspec.json.Decoder(ErrorBody)
