"""Backfill: newly registered aggregates filled from every profile's event history.

Registration stores the aggregates, moves the dataset's catalogue version and queues a
backfill, all in one transaction, before any profile is touched. A backfill then walks the
dataset's profiles in id order, a page per transaction: it locks the page's rows, recomputes
the aggregates from each profile's history, writes those that differ, raises the profile's
sequence and publishes a change with key ``aggregates``, recorded in the outbox by the page's
transaction (a page is never read again, so the relay makes a lost publish good).

Live units read the catalogue after taking their row locks, so a profile the backfill has
passed is maintained by the live path, and a profile it has not reached yet is recomputed
from a history that includes what the live path applied meanwhile: no event is missed or
counted twice. Small pages and a pause between them keep the live path's share of the
database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from audience.rules.facts import FACT_SOURCES
from audience.v1 import event_pb2
from audience.waiting import wait_woken
from services.profile.applier import Published, subject_key
from services.profile.codec import USER, encode_change, profile_view
from services.profile.consumer import Publisher, is_infrastructure
from services.profile.domain.aggregates import AggregateIndex, earliest_expiry
from services.profile.domain.apply import Settings
from services.profile.domain.backfill import needs_visits, recompute
from services.profile.domain.model import ChangeType
from services.profile.outbox import Outbox, Pending
from services.profile.store import ProfileStore, Registry

__all__ = ["Backfiller"]

_log = logging.getLogger(__name__)


class Backfiller:
    """Runs queued backfills, one page of profiles per transaction."""

    def __init__(
        self,
        store: ProfileStore,
        registry: Registry,
        publisher: Publisher,
        settings: Settings,
        *,
        page_size: int,
        pause: float,
        idle: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.registry = registry
        self.outbox = Outbox(store, publisher, clock=clock)
        self.settings = settings
        self.page_size = page_size
        self.pause = pause
        self.idle = idle
        self._clock = clock
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Looks for work now: a backfill was queued in this process. (One queued by
        another replica is found within ``idle``.)"""
        self._wake.set()

    async def run(self) -> None:
        """Backfills until cancelled, waiting out infrastructure failures."""
        while True:
            self._wake.clear()
            try:
                busy = await self.step()
            except Exception as error:
                if not is_infrastructure(error):
                    raise
                _log.warning("backfill: %s: %s; retrying", type(error).__name__, error)
                busy = False
            if busy:
                await asyncio.sleep(self.pause)
            else:
                await wait_woken(self._wake, self.idle)

    async def step(self) -> bool:
        """Backfills one page; returns whether there was anything to do."""
        now = int(self._clock() * 1_000_000)
        published: list[Published] = []
        async with self.store.pool.acquire() as conn, conn.transaction():
            backfill = await self.registry.claim(conn)
            if backfill is None:
                return False
            dataset = backfill.dataset
            index = AggregateIndex(
                await self.registry.backfill_specs(conn, dataset, backfill.aggregate_ids)
            )
            page = await self.registry.lock_page(conn, dataset, backfill.cursor, self.page_size)
            if not page:
                await self.registry.finish(conn, backfill)
                _log.info(
                    "backfilled %d aggregates of dataset %s", len(backfill.aggregate_ids), dataset
                )
                return True
            names = (
                None
                if needs_visits(index)
                else sorted({FACT_SOURCES.get(name, name) for name in index.names()})
            )
            ids = [profile_id for profile_id, _ in page]
            history = await self.registry.history(conn, dataset, ids, names)
            states = await self.store.load_profiles(conn, [(dataset, pid) for pid in ids])
            changed = []
            for profile_id in ids:
                state = states[(dataset, profile_id)]
                fresh = recompute(
                    profile_id,
                    (event_pb2.Event.FromString(data) for data in history.get(profile_id, ())),
                    index,
                    self.settings,
                    now,
                )
                moved = False
                for aggregate_id in index.matchers:
                    old = state.aggregates.get(aggregate_id)
                    new = fresh.get(aggregate_id)
                    before = old.buckets if old is not None else {}
                    after = new.buckets if new is not None else {}
                    if before == after:
                        continue
                    moved = True
                    if new is not None and new.buckets:
                        state.aggregates[aggregate_id] = new
                    else:
                        state.aggregates.pop(aggregate_id, None)
                if moved:
                    expire = earliest_expiry(fresh, index)
                    if expire is not None:
                        state.expires_by(expire)
                    state.sequence += 1
                    changed.append(state)
            await self.store.write_profiles(conn, changed)
            await self.registry.advance(conn, dataset, ids[-1], len(ids))
            # The page is never read again: a lost publish is the outbox's to make good.
            recorded = await self.outbox.record(
                conn,
                [
                    Pending(dataset, USER, state.profile_id, state.sequence, ChangeType.UPDATED)
                    for state in changed
                ],
            )
        # Dated after the commit, as the applier dates its changes (the segment engine's
        # backfills compare the date with the instant their query began).
        committed = int(self._clock() * 1_000_000)
        for state in changed:
            change = encode_change(
                dataset=dataset,
                kind=USER,
                subject_id=state.profile_id,
                sequence=state.sequence,
                change_type=ChangeType.UPDATED,
                event_ids=(),
                keys=("aggregates",),
                view=profile_view(state),
                change_time=committed,
            )
            published.append(Published(subject_key(dataset, USER, state.profile_id), change))
        await self.outbox.publish(published, recorded)
        return True
