"""Commands that talk to the shops' REST API: `webhooks register|list|remove` and `sync`."""

from __future__ import annotations

import argparse
from typing import Any


def add_shop_commands(groups: Any) -> None:
    """Add the `webhooks` and `sync` command groups to the parser's subparsers."""
    del groups  # filled in by the REST API work


__all__ = ["add_shop_commands", "argparse"]
