"""`python -m admin` (or `upgates-admin`): operator commands; see `--help`."""

from __future__ import annotations

import asyncio
import sys

from admin.commands import build_parser
from common.logs import configure_logging
from common.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    """Run one admin command; its exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"upgates-admin: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    status: int = asyncio.run(args.command(settings, args, print))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
