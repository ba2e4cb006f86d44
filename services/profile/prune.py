"""Sweeping expired buckets of profiles that no event touches any more.

A unit drops the expired buckets of the profiles it changes, so an active profile keeps
only what its windows can read. A profile that falls silent keeps its last buckets until
this sweep drops those past their aggregate's retention, once per interval: each profile
row says when its first bucket expires (``aggregates_expire``, indexed), so the sweep reads
only the profiles due, a page per transaction. It leaves sequences alone and publishes
nothing: no window reads an expired bucket, so no rule's answer changes, and a unit that
later works from a cached state still holding the bucket drops it then (the state's
``expire`` has passed too).
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
        page_size: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.interval = interval
        self.page_size = page_size
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
        """Drops every expired bucket now; returns how many."""
        now = int(self._clock() * 1_000_000)
        expiring = {
            dataset: dict(retentions)
            for dataset, retentions in (await self.registry.expiring()).items()
        }
        dropped = 0
        while True:
            profiles, buckets = await self.registry.sweep_expired(expiring, now, self.page_size)
            dropped += buckets
            if profiles < self.page_size:
                break
        if dropped:
            _log.info("dropped %d expired buckets", dropped)
        return dropped
