"""Membership reads: a member's segments (the hot read, cached), membership checks, a
segment's members for bulk readers, counts, memberships at a past time, explanations."""

from __future__ import annotations

import base64
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from audience.errors import FieldViolation, invalid_argument, not_found, out_of_range
from services.segment_engine.catalogs import Catalogs
from services.segment_engine.domain.model import Kind, Membership, segment_name
from services.segment_engine.domain.segments import SegmentRecord
from services.segment_engine.rules import CompiledSegmentRule, view_from_bytes
from services.segment_engine.store.log import ChangeLog
from services.segment_engine.store.members import MemberListing, MemberStore
from services.segment_engine.store.segments import SegmentStore
from services.segment_engine.store.state import Key

__all__ = [
    "Explanation",
    "MemberPage",
    "MembershipCache",
    "Memberships",
    "decode_page_token",
    "page_token",
]

_SEGMENT_TYPE = "audience.dev/Segment"
_BULK_INVALIDATION = 1_000


def page_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode()


def decode_page_token(token: str, field: str = "page_token") -> str:
    try:
        last = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        last = None
    # The token holds an id, and no id holds NUL (which PostgreSQL cannot compare either).
    if last is None or "\x00" in last:
        raise invalid_argument(
            f"{field} is not a token this service gave.",
            FieldViolation(field, "must be a next_page_token from a previous call."),
            reason="INVALID_PAGE_TOKEN",
        )
    return last


@dataclass(slots=True)
class MemberPage:
    """A page of a member's memberships, by segment id.

    Attributes:
        renders: a cached page's memo for its presentations (the gRPC response), dropped
            with the page when a commit changes the member; empty on an uncached page.
    """

    items: tuple[tuple[str, Membership], ...]
    more: bool
    renders: dict[str, Any] = field(default_factory=dict)


class MembershipCache:
    """A member's memberships, cached until a commit changes them.

    A read records :meth:`epoch` before it queries and offers its answer with that epoch;
    the answer is kept only if the member was not invalidated since, so a read racing a
    commit never caches what the commit replaced.
    """

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[Key, tuple[float, MemberPage]] = OrderedDict()
        self._epoch = 0
        self._dirty: dict[Key, int] = {}
        self._cleared = 0

    def epoch(self) -> int:
        return self._epoch

    def get(self, key: Key) -> MemberPage | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Key, value: MemberPage, epoch: int) -> None:
        if self._size <= 0 or self._cleared > epoch or self._dirty.get(key, -1) > epoch:
            return
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def invalidate(self, keys: Collection[Key]) -> None:
        if len(keys) > _BULK_INVALIDATION:
            # A bulk change (a backfill, an import): dropping everything is cheaper.
            self.clear()
            return
        self._epoch += 1
        for key in keys:
            self._entries.pop(key, None)
            self._dirty[key] = self._epoch
        if len(self._dirty) > max(self._size, 10_000):
            self.clear()

    def clear(self) -> None:
        self._epoch += 1
        self._cleared = self._epoch
        self._entries.clear()
        self._dirty.clear()

    def foreign_commit(self, dataset: str, members: list[tuple[int, str]] | None) -> None:
        """Drops what another process's commit changed (everything when it did not say)."""
        if members is None:
            self.clear()
        else:
            self.invalidate([(dataset, kind, subject_id) for kind, subject_id in members])


@dataclass(frozen=True)
class Explanation:
    """A segment's rule explained for one member.

    Attributes:
        explanation: the rules package's ``RuleExplanation`` (None for an imported segment).
    """

    rule_result: bool
    is_member: bool
    explanation: Any
    evaluation_time: int
    segment_version: int


class Memberships:
    """The membership reads of the MembershipService."""

    def __init__(
        self,
        members: MemberStore,
        segments: SegmentStore,
        log: ChangeLog,
        catalogs: Catalogs,
        cache: MembershipCache,
        *,
        retention: int,
        clock: Callable[[], int],
    ) -> None:
        self._members = members
        self._segments = segments
        self._log = log
        self._catalogs = catalogs
        self._cache = cache
        self._retention = retention
        self._clock = clock

    async def of_member(
        self, dataset: str, kind: Kind, subject_id: str, *, page_size: int, after: str
    ) -> MemberPage:
        """A page of the member's memberships by segment id."""
        key = (dataset, int(kind), subject_id)
        if not after:
            cached = self._cache.get(key)
            if cached is not None:
                if len(cached.items) <= page_size:
                    return cached
                return MemberPage(cached.items[:page_size], True)
        epoch = self._cache.epoch()
        rows = await self._members.of_member(
            dataset, kind, subject_id, after=after, limit=page_size + 1
        )
        page = MemberPage(tuple(rows[:page_size]), len(rows) > page_size)
        if not after and not page.more:
            self._cache.put(key, page, epoch)
        return page

    async def at(
        self, dataset: str, kind: Kind, subject_id: str, read_time: int
    ) -> list[tuple[str, Membership]]:
        """The member's memberships at a past time, from the change log."""
        if read_time < self._clock() - self._retention:
            raise out_of_range(
                "read_time is older than the change log's retention.",
                FieldViolation("read_time", "must be within the change log's retention."),
                reason="READ_TIME_EXPIRED",
            )
        now = dict(await self._members.of_member(dataset, kind, subject_id, limit=100_000))
        for past in await self._log.memberships_at(dataset, kind, subject_id, read_time):
            if past.membership is None:
                now.pop(past.segment_id, None)
            else:
                now[past.segment_id] = past.membership
        return sorted(now.items())

    async def check(
        self, dataset: str, segment_id: str, kind: Kind, subject_id: str
    ) -> Membership | None:
        await self._segment(dataset, segment_id, kind)
        return await self._members.check(dataset, segment_id, subject_id)

    async def members(
        self, dataset: str, segment_id: str, *, page_size: int, after: str
    ) -> tuple[Kind, list[tuple[str, int, int]], bool]:
        record = await self._segment(dataset, segment_id)
        rows = await self._members.members(dataset, segment_id, after=after, limit=page_size + 1)
        return record.kind, rows[:page_size], len(rows) > page_size

    @contextlib.asynccontextmanager
    async def listing(self, dataset: str, segment_id: str) -> AsyncIterator[MemberListing]:
        """Every member of the segment, read from one snapshot held until the context ends.

        Raises:
            AudienceError: ``NOT_FOUND`` when the segment does not exist or was deleted.
        """
        async with self._members.listing(dataset, segment_id) as listing:
            if listing is None:
                raise not_found(_SEGMENT_TYPE, segment_name(dataset, segment_id))
            yield listing

    async def count(self, dataset: str, segment_id: str) -> int:
        return (await self._segment(dataset, segment_id)).member_count

    async def explain(
        self, dataset: str, segment_id: str, kind: Kind, subject_id: str
    ) -> Explanation:
        record = await self._segment(dataset, segment_id, kind)
        now = self._clock()
        stored = await self._members.subject(dataset, kind, subject_id)
        membership = stored.memberships.get(segment_id) if stored is not None else None
        catalog = await self._catalogs.get(dataset)
        segment = catalog.segments.get(segment_id)
        if segment is None or segment.version != record.version:
            catalog = await self._catalogs.current(dataset)
            segment = catalog.segments.get(segment_id)
        rule = segment.rule if segment is not None else None
        if not isinstance(rule, CompiledSegmentRule):
            return Explanation(
                rule_result=membership is not None,
                is_member=membership is not None,
                explanation=None,
                evaluation_time=now,
                segment_version=record.version,
            )
        view = view_from_bytes(stored.view if stored else None, subject_id)
        names = {
            segment_name(dataset, member_of) for member_of in (stored.memberships if stored else {})
        }
        counts = stored.rollup_counts if stored else {}
        return Explanation(
            rule_result=rule.matches(view, now, names, counts),
            is_member=membership is not None,
            explanation=rule.explain(view, now, names, counts),
            evaluation_time=now,
            segment_version=record.version,
        )

    async def _segment(
        self, dataset: str, segment_id: str, kind: Kind | None = None
    ) -> SegmentRecord:
        record = await self._segments.get(dataset, segment_id)
        if record is None:
            raise not_found(_SEGMENT_TYPE, segment_name(dataset, segment_id))
        if kind is not None and record.kind is not kind:
            raise invalid_argument(
                "The member's kind does not match the segment's.",
                FieldViolation(
                    "member",
                    "a user segment's members are profiles, an account segment's accounts.",
                ),
                reason="MEMBER_KIND_MISMATCH",
            )
        return record
