"""Background work on whole segments: backfills of new rule versions, and the removal of
deleted segments' members.

A backfill evaluates a segment version over every existing profile through the profile
service's rule query, at one instant T0, and merges the answer (ids in increasing order)
with the current members, in chunks: joins for matches that are not members, leaves for
members that no longer match, all with cause ``BACKFILL``. A subject whose stored view
changed after T0 is evaluated from that view instead (the query's answer is older than
what the engine knows). Each chunk is its own short transaction and the worker yields
between chunks, so real-time evaluation is never held up for long. A backfill in progress
when the process stops runs again from the start when it (or another replica) starts.

One replica works on a segment at a time: the worker holds a session advisory lock on a
dedicated connection while it works, which PostgreSQL releases if the process dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

import asyncpg
import grpc

from audience.db import LOOP_FAILURES, session_lock
from audience.errors import AudienceError
from audience.waiting import wait_woken
from services.segment_engine.catalogs import Catalogs
from services.segment_engine.domain.model import Cause, Kind, SegmentState
from services.segment_engine.processor import Processor
from services.segment_engine.profile_client import ProfileQueries, QueryChunk
from services.segment_engine.references import referenced_segments, rule_references
from services.segment_engine.rules import CompiledSegmentRule
from services.segment_engine.store.members import MemberStore
from services.segment_engine.store.segments import SegmentStore, work_lock_key

__all__ = ["Backfiller"]

_log = logging.getLogger(__name__)

# A backfill that fails for a passing reason is tried this many times, backing off.
_ATTEMPTS = 6
_RETRY_BASE = 0.5
_RETRY_MAX = 60.0
_READ_AHEAD = 4
_MERGES = 2
# Seconds between progress reports (and checks that the version is still current).
_PROGRESS_EVERY = 0.25


def _due(reported: float) -> bool:
    return time.monotonic() - reported >= _PROGRESS_EVERY


async def _next_chunk(
    chunks: asyncio.Queue[QueryChunk | None], reader: asyncio.Task[None]
) -> QueryChunk | None:
    """The next chunk read, or None at the end; raises what the reader raised."""
    getting = asyncio.ensure_future(chunks.get())
    await asyncio.wait({getting, reader}, return_when=asyncio.FIRST_COMPLETED)
    if getting.done():
        return getting.result()
    getting.cancel()
    reader.result()
    # The reader ended cleanly: its final None is in the queue.
    return await chunks.get()


class _SupersededError(Exception):
    """A newer version of the segment (or its deletion) replaced the one being backfilled."""


class Backfiller:
    """Runs backfills and deletions until cancelled.

    Args:
        chunk: profiles per transaction.
        poll: seconds between looks for work when nothing woke the worker.
        aggregate_wait: seconds to wait for new aggregates to become ready.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        segments: SegmentStore,
        members: MemberStore,
        catalogs: Catalogs,
        processor: Processor,
        profiles: ProfileQueries,
        *,
        chunk: int,
        poll: float,
        aggregate_wait: float,
        clock: Callable[[], int],
    ) -> None:
        self._pool = pool
        self._segments = segments
        self._members = members
        self._catalogs = catalogs
        self._processor = processor
        self._profiles = profiles
        self._chunk = chunk
        self._poll = poll
        self._aggregate_wait = aggregate_wait
        self._clock = clock
        self._wake = asyncio.Event()
        # Backfills that failed for a reason that may pass (the profile service down).
        self._attempts: dict[tuple[str, str, int], int] = {}
        self._not_before: dict[tuple[str, str], float] = {}

    def wake(self) -> None:
        """Looks for work now (a segment was created, edited or deleted here)."""
        self._not_before.clear()
        self._wake.set()

    async def run(self) -> NoReturn:
        while True:
            self._wake.clear()
            try:
                busy = await self.run_once()
            except LOOP_FAILURES:
                _log.warning("backfill worker: infrastructure failure; retrying", exc_info=True)
                busy = False
            if not busy:
                await wait_woken(self._wake, self._poll)

    async def run_once(self) -> bool:
        """Works on the first pending segment no other replica holds; False when none."""
        for dataset, segment_id, deleting in await self._segments.pending():
            if self._not_before.get((dataset, segment_id), 0.0) > time.monotonic():
                continue
            async with session_lock(
                self._pool, work_lock_key(dataset, segment_id), wait=False
            ) as held:
                if not held:
                    continue
                if deleting:
                    await self._delete(dataset, segment_id)
                else:
                    await self._backfill(dataset, segment_id)
            return True
        return False

    async def _delete(self, dataset: str, segment_id: str) -> None:
        record = await self._segments.get(dataset, segment_id, include_deleting=True)
        if record is None:
            return
        while True:
            ids = await self._members.member_ids(dataset, segment_id, after="", limit=self._chunk)
            if not ids:
                break
            await self._processor.force(
                dataset,
                record.kind,
                segment_id,
                record.version,
                Cause.SEGMENT_CHANGED,
                dict.fromkeys(ids, False),
            )
            await asyncio.sleep(0)
        await self._segments.remove(dataset, segment_id)
        _log.info("segment %s/%s deleted", dataset, segment_id)

    async def _backfill(self, dataset: str, segment_id: str) -> None:
        record = await self._segments.get(dataset, segment_id)
        if record is None or record.state is not SegmentState.BACKFILLING:
            return
        version = record.version
        catalog = await self._catalogs.current(dataset)
        segment = catalog.segments.get(segment_id)
        if segment is None or segment.version != version or segment.rule is None:
            return
        rule = segment.rule
        assert isinstance(rule, CompiledSegmentRule)
        _log.info("backfilling segment %s/%s version %d", dataset, segment_id, version)
        try:
            if rule.aggregates:
                ids = await self._profiles.register_aggregates(dataset, rule.aggregates)
                await self._profiles.wait_ready(dataset, ids, self._aggregate_wait)
            if rule.rollups:
                await self._recount(dataset, [rollup.key for rollup in rule.rollups])
            await self._merge(dataset, segment_id, record.kind, version, rule)
            if rule.time_dependent:
                await self._timers(dataset, segment_id, record.kind, version)
        except _SupersededError:
            _log.info("backfill of %s/%s version %d superseded", dataset, segment_id, version)
            return
        except AudienceError as error:
            attempt = self._attempts.get((dataset, segment_id, version), 0) + 1
            if error.code == grpc.StatusCode.UNAVAILABLE and attempt < _ATTEMPTS:
                delay = min(_RETRY_BASE * 2**attempt, _RETRY_MAX)
                _log.warning(
                    "backfill of %s/%s version %d failed (%s); retrying in %.0f s",
                    dataset,
                    segment_id,
                    version,
                    error.message,
                    delay,
                )
                self._attempts[(dataset, segment_id, version)] = attempt
                self._not_before[(dataset, segment_id)] = time.monotonic() + delay
                return
            _log.warning("backfill of %s/%s failed: %s", dataset, segment_id, error.message)
            self._attempts.pop((dataset, segment_id, version), None)
            await self._segments.finish_backfill(
                dataset, segment_id, version, self._clock(), error.message or error.reason
            )
            return
        self._attempts.pop((dataset, segment_id, version), None)
        await self._segments.finish_backfill(dataset, segment_id, version, self._clock())
        _log.info("segment %s/%s version %d backfilled", dataset, segment_id, version)

    async def _check(self, dataset: str, segment_id: str, version: int) -> None:
        if await self._segments.version(dataset, segment_id) != version:
            raise _SupersededError

    async def _merge(
        self, dataset: str, segment_id: str, kind: Kind, version: int, rule: CompiledSegmentRule
    ) -> None:
        catalog = await self._catalogs.current(dataset)
        referenced = await referenced_segments(catalog, self._members, rule_references(rule))
        started = self._clock()
        cursor = ""
        done = 0
        # The query streams on while chunks already read are merged (a few ahead at most).
        chunks: asyncio.Queue[QueryChunk | None] = asyncio.Queue(maxsize=_READ_AHEAD)

        async def read() -> None:
            async for chunk in self._profiles.query(
                dataset,
                kind,
                rule.rule,
                referenced,
                evaluation_time=started,
                chunk_size=self._chunk,
            ):
                await chunks.put(chunk)
            await chunks.put(None)

        reader = asyncio.create_task(read())
        pending: list[str] = []
        scanned = total = 0
        reported = 0.0
        # Merges of disjoint id ranges run side by side; they meet only at the commit.
        merging: dict[asyncio.Task[None], int] = {}

        async def settle(limit: int) -> None:
            nonlocal done
            while len(merging) > limit:
                finished, _ = await asyncio.wait(merging, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    done = max(done, merging.pop(task))
                    task.result()

        try:
            while True:
                chunk = await _next_chunk(chunks, reader)
                if chunk is not None:
                    pending.extend(chunk.ids)
                    scanned = max(scanned, chunk.scanned)
                    total = chunk.total
                    if not pending and not merging:
                        done = scanned
                    if len(pending) < self._chunk and not _due(reported):
                        continue
                if pending and (len(pending) >= self._chunk or chunk is None):
                    await settle(_MERGES - 1)
                    task = asyncio.create_task(
                        self._apply_range(
                            dataset,
                            segment_id,
                            kind,
                            version,
                            started,
                            cursor,
                            pending[-1],
                            pending,
                        )
                    )
                    merging[task] = scanned
                    cursor = pending[-1]
                    pending = []
                if _due(reported) or chunk is None:
                    await self._check(dataset, segment_id, version)
                    await self._segments.progress(dataset, segment_id, version, done, total)
                    reported = time.monotonic()
                if chunk is None:
                    break
            await settle(0)
        finally:
            reader.cancel()
            for task in merging:
                task.cancel()
            await asyncio.gather(reader, *merging, return_exceptions=True)
        await self._apply_range(dataset, segment_id, kind, version, started, cursor, None, [])
        await self._segments.progress(dataset, segment_id, version, scanned, total)

    async def _apply_range(
        self,
        dataset: str,
        segment_id: str,
        kind: Kind,
        version: int,
        started: int,
        low: str,
        high: str | None,
        matched: Sequence[str],
    ) -> None:
        """Merges the matches with the members in ``(low, high]`` (to the end when None)."""
        members: list[str] = []
        after = low
        while True:
            page = await self._members.member_ids(
                dataset, segment_id, after=after, limit=self._chunk
            )
            in_range = [m for m in page if high is None or m <= high]
            members.extend(in_range)
            if len(page) < self._chunk or len(in_range) < len(page):
                break
            after = page[-1]
        wanted = set(matched)
        current = set(members)
        decisions = dict.fromkeys(sorted(wanted - current), True)
        decisions.update(dict.fromkeys(sorted(current - wanted), False))
        items = sorted(decisions.items())
        for start in range(0, len(items), self._chunk):
            await self._processor.force(
                dataset,
                kind,
                segment_id,
                version,
                Cause.BACKFILL,
                dict(items[start : start + self._chunk]),
                recheck_after=started,
            )
            await asyncio.sleep(0)

    async def _recount(self, dataset: str, rollups: Sequence[str]) -> None:
        after = ""
        while True:
            ids = await self._members.subject_ids(
                dataset, Kind.USER, after=after, limit=self._chunk
            )
            if not ids:
                return
            await self._processor.recount_rollups(dataset, ids, rollups)
            after = ids[-1]
            await asyncio.sleep(0)

    async def _timers(self, dataset: str, segment_id: str, kind: Kind, version: int) -> None:
        after = ""
        while True:
            ids = await self._members.subject_ids(dataset, kind, after=after, limit=self._chunk)
            if not ids:
                return
            await self._check(dataset, segment_id, version)
            await self._processor.ensure_timers(dataset, kind, segment_id, ids)
            after = ids[-1]
            await asyncio.sleep(0)
