"""``wait_event`` keeps a cancellation that arrives as the event is set (``asyncio.wait_for`` on
Python 3.11 may swallow it, and a loop built on it then never stops)."""

from __future__ import annotations

import asyncio

from gateway.aio import wait_event


async def test_a_cancellation_arriving_as_the_event_is_set_stops_the_loop():
    for _ in range(50):
        event = asyncio.Event()
        turns = 0

        async def loop(event: asyncio.Event) -> None:
            nonlocal turns
            while turns < 1_000:  # bounded: a swallowed cancellation runs into this
                turns += 1
                event.clear()
                await wait_event(event, 10.0)
                event.set()  # the next turn's wait finishes at once

        task = asyncio.create_task(loop(event))
        await asyncio.sleep(0)
        event.set()
        await asyncio.sleep(0)
        task.cancel()  # the event was just set: the same turn as its waiter waking
        done, _ = await asyncio.wait([task], timeout=2.0)
        assert done and task.cancelled(), f"the loop kept running ({turns} turns)"


async def test_timeout_and_set():
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True
