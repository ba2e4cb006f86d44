"""Waiting for a wake-up, a deadline or a cancellation, whichever comes first."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["wait_woken"]


async def wait_woken(event: asyncio.Event, seconds: float) -> bool:
    """Waits until ``event`` is set or ``seconds`` pass; returns whether it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives as the
    event is set (CPython gh-86296, fixed in 3.12), and a service loop waiting this way
    then outlives its service. ``asyncio.timeout`` tells its own expiry from a cancellation.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
