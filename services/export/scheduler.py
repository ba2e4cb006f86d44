"""The scheduler: starts a job for each schedule that is due.

A schedule's next run is always computed from the present, so runs missed while the
service was down (or a schedule was paused) make one run on start, not one per missed slot.
Replicas may all run the loop: a due schedule is locked with ``SKIP LOCKED`` while its job
is created, so it runs once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from services.export.domain.cron import next_run
from services.export.domain.jobs import new_job, scheduled_job_id
from services.export.domain.model import ExportJob, Schedule
from services.export.ports import Clock
from services.export.store import ExportStore

__all__ = ["Scheduler"]

_log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        store: ExportStore,
        clock: Clock,
        *,
        interval: timedelta = timedelta(seconds=1),
        on_jobs: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self._on_jobs = on_jobs

    def _job(self, schedule: Schedule) -> ExportJob:
        now = self._clock.now()
        return new_job(
            schedule.dataset,
            scheduled_job_id(schedule.schedule_id, now),
            schedule.job_template,
            schedule_id=schedule.schedule_id,
            time_zone=schedule.time_zone,
            now=now,
        )

    async def tick(self) -> list[ExportJob]:
        """Starts the jobs of the schedules due now; returns them."""
        now = self._clock.now()
        jobs = await self._store.run_due_schedules(
            now, self._job, lambda schedule: next_run(schedule.cron, schedule.time_zone, now)
        )
        for job in jobs:
            _log.info("Schedule %s/%s started job %s", job.dataset, job.schedule_id, job.job_id)
        if jobs:
            self._on_jobs()
        return jobs

    async def run_now(self, dataset: str, schedule_id: str, name: str) -> ExportJob:
        job = await self._store.run_schedule_now(
            dataset, schedule_id, name, self._job, self._clock.now()
        )
        self._on_jobs()
        return job

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                _log.exception("The scheduler's tick failed; trying again")
            await asyncio.sleep(self._interval.total_seconds())
