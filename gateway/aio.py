"""Small asyncio helpers the gateway's long-running loops share."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True when it was set.

    ``asyncio.wait_for(event.wait(), timeout)`` on Python 3.11 may swallow a cancellation that
    arrives just as the event is set (python/cpython#86296, fixed in 3.12): a loop built on it then
    keeps running after its task was cancelled, and whoever awaits that task hangs. The timeout
    context manager keeps the cancellation.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
