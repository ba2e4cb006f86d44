"""``run_to_end``: a consumer's step, once begun, finishes before the cancellation lands."""

from __future__ import annotations

import asyncio

import pytest

from audience.streams import run_to_end


async def test_a_cancelled_caller_waits_for_the_step_then_is_cancelled() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def step() -> None:
        started.set()
        await release.wait()
        finished.append("acknowledged")

    caller = asyncio.create_task(run_to_end(step()))
    await started.wait()
    caller.cancel()
    await asyncio.sleep(0.01)
    assert not caller.done()
    release.set()

    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished == ["acknowledged"]


async def test_the_step_s_result_and_errors_reach_the_caller() -> None:
    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise LookupError("no group")

    assert await run_to_end(answer()) == 42
    with pytest.raises(LookupError, match="no group"):
        await run_to_end(fail())
