"""A webhook watcher stopped while it waits leaves nothing of its own behind."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

from services.export.domain.model import (
    ChangeKind,
    Heartbeat,
    MemberPage,
    MembershipChange,
    WebhookSubscription,
)
from services.export.ports import SystemClock
from services.export.store import ExportStore
from services.export.webhook_worker import WatchManager, WebhookSettings, _Watcher


class _QuietEngine:
    """A change stream that never sends anything."""

    def __init__(self) -> None:
        self.watching = asyncio.Event()

    async def count(self, dataset: str, segment_id: str) -> int:
        return 0

    async def pages(
        self, dataset: str, segment_id: str, *, versions: bool
    ) -> AsyncIterator[MemberPage]:
        return
        yield

    async def watch(
        self,
        dataset: str,
        segment_ids: Sequence[str],
        kind: ChangeKind | None,
        start: str | datetime | None,
        heartbeat_interval: timedelta,
    ) -> AsyncIterator[MembershipChange | Heartbeat]:
        self.watching.set()
        await asyncio.Event().wait()
        yield Heartbeat(resume_token="never", time=datetime.now(UTC))


def _queue_getters() -> list[asyncio.Task[object]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "Queue.get" and not task.done()
    ]


async def test_a_watcher_cancelled_while_waiting_cancels_its_queue_getter() -> None:
    engine = _QuietEngine()
    manager = WatchManager(cast(ExportStore, object()), engine, SystemClock(), WebhookSettings())
    now = datetime.now(UTC)
    subscription = WebhookSubscription(
        dataset="shop",
        subscription_id="hook",
        display_name="",
        url="http://127.0.0.1:9/",
        segment_ids=(),
        kinds=frozenset(),
        secret="s" * 16,
        paused=False,
        max_attempts=3,
        create_time=now,
        update_time=now,
        version=1,
    )
    before = set(_queue_getters())
    task = asyncio.create_task(_Watcher(manager, subscription, None).run())
    await asyncio.wait_for(engine.watching.wait(), 5)
    await asyncio.sleep(0)
    assert set(_queue_getters()) - before, "the watcher should be waiting on its queue"

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    gc.collect()

    assert set(_queue_getters()) - before == set()
