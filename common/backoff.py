"""The one retry policy: exponential backoff with jitter, each caller with its own limits."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff(first: float, maximum: float, factor: float = 2.0) -> Iterator[float]:
    """Endless delays: first, first*factor, ... capped at maximum, each jittered by up to a
    quarter, so that many clients that failed together do not retry together."""
    delay = first
    while True:
        yield delay * (1 - random.random() / 4)  # noqa: S311 - jitter, not cryptography
        delay = min(delay * factor, maximum)
