"""The shop's webhooks: make ours exactly one active webhook per customer event.

"Ours" are the Customers.* webhooks whose URL points under PUBLIC_BASE_URL; any other webhook
of the shop is left alone. `plan` decides (pure), `apply` carries it out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import msgspec

from shopapi import schema
from shopapi.client import ApiError, Client

EVENTS = {"create": "Customers.create", "update": "Customers.update", "delete": "Customers.delete"}
NAME = "upgates-ingest {event}"

_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|key|password|secret|api_key)=)[^&#\s]*")
_USERINFO = re.compile(r"(//[^/:@\s]*:)[^@/\s]*@")


def mask(url: str) -> str:
    """A URL for people: query tokens and the password of its credentials hidden."""
    return _USERINFO.sub(r"\1***@", _SECRET_QUERY.sub(r"\1***", url))


def wanted_url(public_base_url: str, event: str, token: str) -> str:
    """The URL Upgates must call for an event, with the shop's token."""
    return f"{public_base_url.rstrip('/')}/webhooks/customers/{event}?token={quote(token, safe='')}"


def _prefix(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return parts.scheme.lower(), host.lower(), parts.path.rstrip("/")


def is_ours(url: str, public_base_url: str) -> bool:
    """Does this URL point at our receiver (whatever its path, token or credentials)?"""
    scheme, host, path = _prefix(url)
    base_scheme, base_host, base_path = _prefix(public_base_url)
    return (scheme, host) == (base_scheme, base_host) and (
        path == base_path or path.startswith(base_path + "/")
    )


@dataclass(frozen=True, slots=True)
class Action:
    """One change to the shop's webhooks."""

    kind: str  # "create", "update", "delete"
    event: str  # "create", "update", "delete" of customers
    webhook_id: int | None = None
    why: str = ""


def plan(existing: list[schema.Webhook], public_base_url: str, token: str) -> list[Action]:
    """What makes ours exactly one active webhook per event with the right URL; [] if none."""
    actions: list[Action] = []
    ours = [w for w in existing if w.event in EVENTS.values() and is_ours(w.url, public_base_url)]
    for event, name in EVENTS.items():
        url = wanted_url(public_base_url, event, token)
        mine = [w for w in ours if w.event == name]
        if not mine:
            actions.append(Action("create", event, why="missing"))
            continue
        # Keep the one needing least change; the others are duplicates.
        keep = min(mine, key=lambda w: (w.url != url, not w.active_yn, w.id))
        problems = []
        if keep.url != url:
            problems.append("wrong URL or token")
        if not keep.active_yn:
            problems.append("deactivated")
        if problems:
            actions.append(Action("update", event, keep.id, " and ".join(problems)))
        actions.extend(Action("delete", event, w.id, "duplicate") for w in mine if w is not keep)
    return actions


async def list_webhooks(client: Client) -> list[schema.Webhook]:
    """Every webhook of the shop."""
    body = await client.get("/webhooks")
    try:
        return schema.webhooks_decoder.decode(body).webhooks
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise ApiError(f"shop {client.access.shop}: an unreadable list of webhooks") from None


async def apply(
    client: Client, actions: list[Action], public_base_url: str, token: str
) -> list[str]:
    """Carry out the plan; a line per change, for people (tokens masked)."""
    lines = []
    for action in actions:
        url = wanted_url(public_base_url, action.event, token)
        name = EVENTS[action.event]
        if action.kind == "create":
            body = await client.request(
                "POST",
                "/webhooks",
                body={
                    "active_yn": True,
                    "name": NAME.format(event=name),
                    "url": url,
                    "event": name,
                },
            )
            created = schema.webhook_answer_decoder.decode(body).webhook
            lines.append(f"created  #{created.id} {name} -> {mask(url)}")
        elif action.kind == "update":
            await client.request(
                "PUT", "/webhooks", body={"id": action.webhook_id, "active_yn": True, "url": url}
            )
            lines.append(f"repaired #{action.webhook_id} {name} ({action.why}) -> {mask(url)}")
        else:
            await client.request("DELETE", f"/webhooks/{action.webhook_id}")
            lines.append(f"removed  #{action.webhook_id} {name} ({action.why})")
    return lines


async def remove_ours(client: Client, public_base_url: str) -> list[str]:
    """Delete every webhook of ours; a line per webhook removed."""
    lines = []
    for webhook in await list_webhooks(client):
        if webhook.event in EVENTS.values() and is_ours(webhook.url, public_base_url):
            await client.request("DELETE", f"/webhooks/{webhook.id}")
            lines.append(f"removed  #{webhook.id} {webhook.event} {mask(webhook.url)}")
    return lines


def describe(webhook: schema.Webhook) -> str:
    """One line of `webhooks list`."""
    success = _call(webhook.last_success_call, webhook.last_success_call_status)
    failure = _call(webhook.last_error_call, webhook.last_error_call_status)
    state = "active" if webhook.active_yn else "INACTIVE"
    return (
        f"#{webhook.id:<6} {webhook.event:<22} {state:<8} {mask(webhook.url)}  "
        f"last success: {success}  last error: {failure}"
    )


def _call(at: str | None, status: int | None) -> str:
    return f"{at} ({status})" if at else "never"
