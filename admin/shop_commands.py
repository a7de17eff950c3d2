"""Commands that talk to the shops' REST API: `webhooks register|list|remove` and `sync`.

Exit statuses: 0 done; 1 failed (API unreachable, an unexpected answer, Postgres down);
2 a usage or configuration error (an unknown shop); 75 stopped early on purpose (the quota
reserve, a long Retry-After, a signal), to resume next time; 77 the API refused the
credentials (never retried).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

from common.settings import Settings
from shopapi import webhooks
from shopapi.client import ApiError, shop_access
from shopapi.service import (
    SyncMetrics,
    database,
    new_client,
    run_forever,
    sync_round,
    token_for,
)
from shopapi.sync import Summary

Out = Callable[[str], None]


def _fail(exc: ApiError) -> int:
    print(f"upgates-admin: {exc}", file=sys.stderr)
    return exc.exit_status


def _public_url(settings: Settings, args: argparse.Namespace) -> str:
    url: str = args.url or settings.public_base_url
    if not url:
        raise ApiError("give --url PUBLIC_BASE_URL (or set PUBLIC_BASE_URL)")
    return url


async def webhooks_register(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Make the shop's webhooks exactly one active one of ours per customer event."""
    try:
        access = shop_access(settings, args.shop)
        base, token = _public_url(settings, args), token_for(settings, args.shop)
        async with new_client(settings, access) as client:
            actions = webhooks.plan(await webhooks.list_webhooks(client), base, token)
            lines = await webhooks.apply(client, actions, base, token)
    except ApiError as exc:
        return _fail(exc)
    for line in lines:
        out(line)
    out(f"{args.shop}: {len(lines)} change(s); its 3 customer webhooks point at {base}")
    return 0


async def webhooks_list(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Every webhook of the shop, tokens masked."""
    try:
        async with new_client(settings, shop_access(settings, args.shop)) as client:
            found = await webhooks.list_webhooks(client)
    except ApiError as exc:
        return _fail(exc)
    for webhook in found:
        out(webhooks.describe(webhook))
    out(f"{args.shop}: {len(found)} webhook(s)")
    return 0


async def webhooks_remove(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Delete the shop's webhooks that point at us."""
    try:
        base = _public_url(settings, args)
        async with new_client(settings, shop_access(settings, args.shop)) as client:
            lines = await webhooks.remove_ours(client, base)
    except ApiError as exc:
        return _fail(exc)
    for line in lines:
        out(line)
    out(f"{args.shop}: removed {len(lines)} webhook(s) pointing at {base}")
    return 0


class TerminalProgress:
    """Progress on one line of stderr, redrawn after each page; only on a terminal."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, summary: Summary) -> None:
        total = summary.pages_total or "?"
        sys.stderr.write(
            f"\r{summary.shop}: {summary.kind} sync, page {summary.pages}/{total}, "
            f"{summary.customers} customers, quota left {summary.quota}\x1b[K"
        )
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        """End the progress line."""
        if self.shown:
            sys.stderr.write("\n")


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def sync(settings: Settings, args: argparse.Namespace, out: Out) -> int:
    """Read shops' customers from the API into the table."""
    stop = asyncio.Event()
    _stop_on_signals(stop)
    if args.all:
        if args.every is not None:
            if not args.every > 0:
                print("upgates-admin: --every must be above 0 seconds", file=sys.stderr)
                return 2
            await run_forever(settings, args.every, stop, full=args.full)
            return 0
        if not settings.upgates_api:
            print("upgates-admin: UPGATES_API names no shop", file=sys.stderr)
            return 2
        shops = [shop for shop, _ in settings.upgates_api]
    elif args.shop:
        shops = [args.shop]
    else:
        print("upgates-admin: name a SHOP, or give --all", file=sys.stderr)
        return 2
    worst = 0
    try:
        accesses = [shop_access(settings, shop) for shop in shops]
    except ApiError as exc:
        _fail(exc)
        return 2
    try:
        async with database(settings) as pool:
            for access in accesses:
                progress = TerminalProgress() if sys.stderr.isatty() else None
                try:
                    summary = await sync_round(
                        settings, access, pool, SyncMetrics(), stop, full=args.full,
                        progress=progress, check=False,
                    )  # fmt: skip
                finally:
                    if progress is not None:
                        progress.close()
                if summary.pages or summary.complete:
                    out(summary.line())
                if summary.stopped:
                    print(f"upgates-admin: {summary.stopped}", file=sys.stderr)
                worst = max(worst, summary.exit_status)
    except ApiError as exc:
        return _fail(exc)
    return worst


def add_shop_commands(groups: Any) -> None:
    """Add the `webhooks` and `sync` command groups to the parser's subparsers."""
    hooks = groups.add_parser(
        "webhooks", help="the shop's webhooks, through its REST API (UPGATES_API)"
    ).add_subparsers(dest="action", required=True)
    p = hooks.add_parser("register", help="exactly one active webhook of ours per customer event")
    p.add_argument("shop", metavar="SHOP", help="the shop's project_name, as in UPGATES_API")
    p.add_argument("--url", metavar="PUBLIC_BASE_URL", help="where Upgates reaches the receiver")
    p.set_defaults(command=webhooks_register)
    p = hooks.add_parser("list", help="every webhook of the shop, tokens masked")
    p.add_argument("shop", metavar="SHOP")
    p.set_defaults(command=webhooks_list)
    p = hooks.add_parser("remove", help="remove the webhooks that point at us")
    p.add_argument("shop", metavar="SHOP")
    p.add_argument("--url", metavar="PUBLIC_BASE_URL")
    p.set_defaults(command=webhooks_remove)

    p = groups.add_parser(
        "sync",
        help="read customers from the shop's REST API into the table",
        description="Incremental by default; the first sync of a shop, and --full, read every "
        "page and tombstone the customers the shop no longer has. An interrupted sync resumes.",
    )
    p.add_argument("shop", metavar="SHOP", nargs="?")
    p.add_argument("--all", action="store_true", help="every shop in UPGATES_API")
    p.add_argument("--full", action="store_true", help="read every page (and find deletions)")
    p.add_argument(
        "--every", type=float, metavar="SECONDS", help="with --all: run as a service, forever"
    )
    p.set_defaults(command=sync)
