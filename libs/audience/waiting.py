"""Waiting without swallowing the waiter's own cancellation: for a wake-up or a deadline,
and for a task being stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["stop_task", "wait_woken"]


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


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancels ``task`` and waits for it to end, whatever it ends with.

    Not ``task.cancel()`` then ``await task`` under ``suppress(CancelledError)``: that also
    swallows a cancellation of the caller arriving while it waits, and a service loop
    stopping a child then outlives its service.
    """
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        # The caller is stopping it and wants no outcome; retrieved, it is not reported.
        task.exception()
