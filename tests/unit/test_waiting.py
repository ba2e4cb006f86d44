"""wait_woken and stop_task: the waiter's own cancellation is never swallowed."""

from __future__ import annotations

import asyncio

import pytest

from audience.waiting import stop_task, wait_woken


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


async def test_stopping_a_task_ends_it_and_keeps_the_callers_cancellation() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await release.wait()
            raise ValueError("ended badly")

    child = asyncio.create_task(slow_to_stop())
    stopper = asyncio.create_task(stop_task(child))
    await asyncio.sleep(0.01)
    # Cancelled while the child is still ending: suppress(CancelledError) around `await
    # child` swallowed this too.
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, 5)
    release.set()
    await stop_task(child)
    assert child.done()
