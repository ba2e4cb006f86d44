"""Backpressure: how far behind the ``profile`` group is on ``events``, measured periodically.

Measuring costs a round trip per partition group (more on Redis 6.2, where the unread part
is counted in the server), so calls never measure: they read the figure a background task
refreshes every ``interval``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import NoReturn, Protocol

from redis.exceptions import RedisError

from audience import errors

__all__ = ["BacklogGauge", "BacklogSource", "raise_if_cancelled"]

_log = logging.getLogger(__name__)


class BacklogSource(Protocol):
    async def backlog(self, topic: str, group: str) -> int: ...


class BacklogGauge:
    """The last measured backlog of a topic's consumer group, against a limit.

    Args:
        source: measures the backlog (the bus).
        topic: the topic ingest appends to.
        group: the group whose progress relieves the pressure.
        limit: the most entries the group may have left before calls are refused.
        interval: time between measurements.
    """

    def __init__(
        self,
        source: BacklogSource,
        *,
        topic: str,
        group: str,
        limit: int,
        interval: timedelta,
    ) -> None:
        self._source = source
        self._topic = topic
        self._group = group
        self.limit = limit
        self._interval = interval.total_seconds()
        self.retry_after = max(timedelta(seconds=1), 2 * interval)
        self.value = 0
        """The last measured backlog, in entries; 0 until measured."""

    def check(self) -> None:
        """Raises ``RESOURCE_EXHAUSTED`` with a retry hint when the backlog is over the limit."""
        if self.value > self.limit:
            raise errors.resource_exhausted(
                f"The pipeline is {self.value:,} batches behind (limit {self.limit:,}); "
                "retry later.",
                self.retry_after,
                reason="INGEST_BACKLOG_FULL",
                metadata={"backlog": str(self.value), "limit": str(self.limit)},
            )

    async def measure(self) -> int:
        """Measures the backlog now and keeps the figure."""
        self.value = await self._source.backlog(self._topic, self._group)
        return self.value

    async def run(self) -> NoReturn:
        """Measures every interval until cancelled; a failed measurement keeps the last."""
        while True:
            try:
                await self.measure()
            except (RedisError, OSError, LookupError) as error:
                # LookupError: the group is gone from a partition (a stream deleted by hand);
                # appends keep working, and the gauge recovers once it is declared again.
                _log.warning("measuring the %s backlog failed: %s", self._topic, error)
            raise_if_cancelled()
            await asyncio.sleep(self._interval)


def raise_if_cancelled() -> None:
    """Raises the current task's cancellation if something swallowed it.

    On Python 3.11, redis-py's commands can swallow a cancellation that arrives as they
    complete (CPython gh-86296), and a loop around them would then never stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
