"""Body bytes in flight, and turns for the heavy steps: what keeps a receiver quick in a burst."""

from __future__ import annotations

import asyncio
from collections import deque


class Turns:
    """One turn every other event-loop iteration, in the order asked: for the receiver's heavy
    steps.

    Checking and compressing a full payload holds the loop for milliseconds. When a burst brings
    dozens of bodies at once, each ready one would run in the same iteration, while the broker's
    confirms, the answers and the next bodies' bytes waited, and each new request took CPU from
    the ones that came before it. Taken in turns, a burst's bodies are dealt with in the order
    they arrived, and the loop polls for I/O between any two.

    Between two turns, one iteration goes without: a request's way from its publish to its
    answer takes several iterations (its frames written, the confirm read, the tasks it wakes),
    and each of them would otherwise wait out a turn as well.
    """

    def __init__(self) -> None:
        self._taken = False
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def take(self) -> None:
        """Return in an iteration no other turn has (at once, when none is taken or awaited)."""
        loop = asyncio.get_running_loop()
        if not self._taken:
            self._taken = True
        else:
            future = loop.create_future()
            self._waiting.append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # given the turn, then cancelled
                    loop.call_soon(self._pass)
                raise
        loop.call_soon(self._pass)  # the turn ends with this iteration

    def _pass(self) -> None:
        # Runs in the iteration after a turn's, with only the light callbacks (confirms, answers,
        # bodies' bytes); the next waiter resumes in the iteration after this one.
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():  # done: its request was cancelled while waiting
                future.set_result(None)
                return
        self._taken = False


class BodyBudget:
    """Body bytes the requests in flight may hold together (MAX_BODY_BYTES_IN_FLIGHT).

    A request reserves its body's size before reading it, so that a burst of large bodies gets
    fast 503s instead of the receiver's memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> bool:
        """Hold `size` bytes if they fit; False if not."""
        # A body larger than the whole budget still goes in alone: refusing it for ever would
        # only make its sender retry for ever.
        if self.held and self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        """Give back what reserve() held."""
        self.held -= size
