"""wait_woken: a wake-up, a deadline, and a cancellation that arrives with the wake-up."""

from __future__ import annotations

import asyncio

import pytest

from audience.waiting import wait_woken


async def test_it_returns_whether_the_event_was_set_before_the_deadline() -> None:
    event = asyncio.Event()
    assert await wait_woken(event, 0.01) is False
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_woken(event, 60) is True


async def test_a_loop_around_it_stops_when_cancelled_as_it_is_woken() -> None:
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            event.clear()
            await wait_woken(event, 60)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    # Python 3.11's wait_for returned the event's result here, and the loop went on.
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
