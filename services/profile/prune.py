"""Sweeping expired buckets of profiles that no event touches any more.

A unit drops the expired buckets of every aggregate it changes, so an active profile keeps
only what its windows can read. A profile that falls silent keeps its last buckets until
this sweep deletes those past their aggregate's retention, once per interval, one dataset
per statement. It takes no profile lock and leaves sequences alone: no window reads an
expired bucket, so no rule's answer changes, and a unit that later drops the same bucket
from a cached state deletes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from services.profile.consumer import is_infrastructure
from services.profile.store import Registry

__all__ = ["Pruner"]

_log = logging.getLogger(__name__)


class Pruner:
    """Deletes expired buckets every ``interval`` seconds."""

    def __init__(
        self,
        registry: Registry,
        *,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.interval = interval
        self._clock = clock

    async def run(self) -> None:
        """Sweeps until cancelled, waiting out infrastructure failures."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception as error:
                if not is_infrastructure(error):
                    raise
                _log.warning("bucket sweep: %s: %s; retrying", type(error).__name__, error)

    async def sweep(self) -> int:
        """Deletes every expired bucket now; returns how many."""
        now = int(self._clock() * 1_000_000)
        deleted = 0
        for dataset, expiring in (await self.registry.expiring()).items():
            count = await self.registry.delete_expired(dataset, expiring, now)
            if count:
                _log.info("deleted %d expired buckets of dataset %s", count, dataset)
            deleted += count
        return deleted
