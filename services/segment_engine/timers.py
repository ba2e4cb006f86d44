"""The timer loop: re-evaluates subjects when time alone could change their memberships.

Timers are rows (``timers``), written with the memberships by every evaluation of a
time-dependent segment, so they survive restarts. The loop sleeps until the earliest due
timer (or ``interval``, for timers other replicas set, or a wake-up when this replica sets
an earlier one), then claims due subjects that nobody else holds (``SKIP LOCKED`` on their
rows) and evaluates them at the current time with cause ``TIME``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NoReturn

import asyncpg

from audience.db import LOOP_FAILURES
from audience.waiting import wait_woken
from services.segment_engine.processor import Committed, Processor
from services.segment_engine.store.sql import from_micros, micros
from services.segment_engine.store.state import Key

__all__ = ["TimerLoop"]

_log = logging.getLogger(__name__)

_BUSY_PAUSE = 0.005


class TimerLoop:
    """Runs due timers until cancelled.

    Args:
        interval: the longest the loop sleeps, seconds.
        batch: the most subjects per transaction.
        clock: microseconds since the epoch.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        processor: Processor,
        *,
        interval: float,
        batch: int,
        clock: Callable[[], int],
    ) -> None:
        self._pool = pool
        self._processor = processor
        self._interval = interval
        self._batch = batch
        self._clock = clock
        self._wake = asyncio.Event()
        self._planned: int | None = None

    def committed(self, committed: Committed) -> None:
        """Wakes the loop when a commit set a timer earlier than its planned wake-up."""
        due = committed.earliest_timer
        if due is not None and (self._planned is None or due < self._planned):
            self._wake.set()

    async def run(self) -> NoReturn:
        while True:
            try:
                await self._pass()
            except LOOP_FAILURES:
                _log.warning("timer loop: infrastructure failure; retrying", exc_info=True)
                await asyncio.sleep(self._interval)

    async def _pass(self) -> None:
        now = self._clock()
        due = await self._due(now)
        if due:
            await self._processor.run_timers(due)
            if len(due) < self._batch:
                # Whatever stayed due is held by a live transaction: look again shortly.
                await asyncio.sleep(_BUSY_PAUSE)
            return
        self._wake.clear()
        earliest = await self._pool.fetchval(
            f"SELECT {micros('min(due)')} FROM segment_engine.timers"
        )
        now = self._clock()
        limit = now + round(self._interval * 1_000_000)
        self._planned = limit if earliest is None else min(earliest, limit)
        delay = max(0.0, (self._planned - now) / 1_000_000)
        try:
            await wait_woken(self._wake, delay)
        finally:
            self._planned = None

    async def _due(self, now: int) -> list[Key]:
        records = await self._pool.fetch(
            f"""
            SELECT dataset, kind, subject_id FROM segment_engine.timers
            WHERE due <= {from_micros("$1::bigint")}
            GROUP BY dataset, kind, subject_id
            ORDER BY min(due)
            LIMIT $2
            """,
            now,
            self._batch,
        )
        return [(r[0], r[1], r[2]) for r in records]
