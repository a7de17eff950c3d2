"""Full payloads in a burst take turns (receiver/limits.py's Turns): pure asyncio, no services."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest

from common.runtime import new_event_loop
from receiver.limits import Turns


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, new_event_loop])
def test_turns_go_every_other_loop_iteration_in_the_order_asked(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Full payloads arriving together are checked and compressed one at a time, first come
    first served, with an iteration without a turn between any two, in which the confirms and
    answers of the requests before them move on (on asyncio's loop and on uvloop)."""

    async def scenario() -> tuple[list[tuple[str, int]], int]:
        loop = asyncio.get_running_loop()
        iteration = [0]

        def tick() -> None:  # runs once in every iteration
            iteration[0] += 1
            loop.call_soon(tick)

        loop.call_soon(tick)
        await asyncio.sleep(0)
        turns, got = Turns(), []

        async def request(name: str) -> None:
            await turns.take()
            got.append((name, iteration[0]))

        tasks = [asyncio.create_task(request(name)) for name in "ABCD"]
        await asyncio.sleep(0)  # all four now wait for, or hold, a turn
        tasks[2].cancel()  # C's request is gone: it must not hold up D
        async with asyncio.timeout(5):  # a turn left taken would hang D
            await asyncio.gather(*tasks, return_exceptions=True)
        before = iteration[0]
        await turns.take()  # no one waits: at once, in this very iteration
        return got, iteration[0] - before

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        got, waited = runner.run(scenario())
    assert [name for name, _ in got] == ["A", "B", "D"]
    iterations = [at for _, at in got]
    assert iterations == sorted(iterations)  # in the order asked
    assert all(b - a >= 2 for a, b in itertools.pairwise(iterations))  # one iteration between
    assert waited == 0


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, new_event_loop])
def test_a_turn_given_to_a_request_cancelled_before_it_resumed_goes_to_the_next(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A request whose turn came in the very iteration it was cancelled (a deadline, a closed
    connection) passes the turn on: the ones after it are not left waiting for ever."""

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        turns, got = Turns(), []
        tasks: list[asyncio.Task[None]] = []

        async def request(name: str) -> None:
            await turns.take()
            got.append(name)
            if name == "A":
                # Runs in the next iteration, after the turn is given to B and before B resumes.
                loop.call_soon(tasks[1].cancel)

        tasks.extend(asyncio.create_task(request(name)) for name in "ABC")
        async with asyncio.timeout(5):  # a turn left with B would hang C
            await asyncio.gather(*tasks, return_exceptions=True)
        assert tasks[1].cancelled()
        return got

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(scenario()) == ["A", "C"]
