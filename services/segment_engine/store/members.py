"""Membership reads: a member's segments, a segment's members (by page, or all of them from
one snapshot), and a subject's stored state for explanations. Plain reads outside any lock:
they see the last committed state."""

from __future__ import annotations

import array
import asyncio
import contextlib
import operator
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import repeat

import asyncpg

from services.segment_engine.domain.model import Kind, Membership
from services.segment_engine.store.sql import micros

__all__ = ["MemberChunk", "MemberListing", "MemberStore", "SegmentSnapshot", "StoredSubject"]

_POSTGRES_EPOCH = 946_684_800_000_000
"""2000-01-01, PostgreSQL's epoch, in microseconds since the Unix epoch."""

# The segment, its size (as SegmentStore counts it) and the log head, in the statement that
# takes the snapshot. Every membership change commits with the head that numbers it
# (docs/adr/0003), so the snapshot holds exactly the changes at or below this head.
_SNAPSHOT = f"""
SELECT s.kind, s.version,
       (SELECT coalesce(sum(d.joins - d.leaves), 0)::bigint FROM segment_engine.segment_days AS d
        WHERE d.dataset = s.dataset AND d.segment_id = s.segment_id) AS member_count,
       coalesce((SELECT h.last_seq FROM segment_engine.log_heads AS h
                 WHERE h.dataset = s.dataset), 0) AS head,
       {micros("statement_timestamp()")} AS now
FROM segment_engine.segments AS s
WHERE s.dataset = $1 AND s.segment_id = $2 AND NOT s.deleting
"""

# A chunk as one row of columns: asyncpg decodes an array in one call, where a row per
# member costs a Record each. The aggregates take the rows in the subquery's order, as
# PostgreSQL's documentation of aggregates says a sorted subquery does when the outer
# level does nothing else. Join times travel in timestamptz's binary form (int64
# microseconds since 2000-01-01, big-endian), one bytea for the chunk: converting them to
# Unix microseconds in SQL (extract's numeric) costs the server more than the rest of the
# read.
_CHUNK = """
SELECT array_agg(subject_id), string_agg(timestamptz_send(join_time), ''){versions}
FROM (SELECT subject_id, join_time, version FROM segment_engine.memberships
      WHERE dataset = $1 AND segment_id = $2 AND subject_id > $3
      ORDER BY subject_id LIMIT $4) AS chunk
"""
_CHUNK_IDS = _CHUNK.format(versions="")
_CHUNK_VERSIONS = _CHUNK.format(versions=", array_agg(version)")


@dataclass(frozen=True, slots=True)
class StoredSubject:
    """What an explanation reads of a subject."""

    view: bytes | None
    view_time: int | None
    memberships: dict[str, Membership]
    rollup_counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class SegmentSnapshot:
    """A segment as one snapshot of the store sees it.

    Attributes:
        member_count: the segment's size, from its daily join and leave counters.
        position: the change log's head: the snapshot holds every change at or below it
            and none above.
        time: the database's clock when the snapshot was taken, microseconds.
    """

    kind: Kind
    version: int
    member_count: int
    position: int
    time: int


@dataclass(frozen=True, slots=True)
class MemberChunk:
    """Consecutive members of a segment, column by column, by id.

    Attributes:
        join_times: microseconds since the Unix epoch.
        versions: the segment version each joined under; None when not asked for.
    """

    ids: list[str]
    join_times: list[int]
    versions: list[int] | None


class MemberListing:
    """A segment's members read from one snapshot (see :meth:`MemberStore.listing`)."""

    def __init__(
        self, conn: asyncpg.Connection, dataset: str, segment_id: str, snapshot: SegmentSnapshot
    ) -> None:
        self.snapshot = snapshot
        self._conn = conn
        self._dataset = dataset
        self._segment_id = segment_id
        self._ahead: asyncio.Task[asyncpg.Record | None] | None = None

    def _read(self, query: str, after: str, size: int) -> asyncio.Task[asyncpg.Record | None]:
        return asyncio.ensure_future(
            self._conn.fetchrow(query, self._dataset, self._segment_id, after, size)
        )

    async def chunks(self, size: int, *, versions: bool) -> AsyncIterator[MemberChunk]:
        """Every member, ``size`` at a time. The next chunk is read while the caller handles
        the one it was given."""
        query = _CHUNK_VERSIONS if versions else _CHUNK_IDS
        self._ahead = self._read(query, "", size)
        while self._ahead is not None:
            record = await self._ahead
            self._ahead = None
            # An aggregate over no rows is NULL: the segment ended on the previous chunk.
            if record is None or record[0] is None:
                return
            ids: list[str] = record[0]
            if len(ids) == size:
                self._ahead = self._read(query, ids[-1], size)
            times = array.array("q", record[1])
            if sys.byteorder == "little":
                times.byteswap()
            yield MemberChunk(
                ids,
                list(map(operator.add, times, repeat(_POSTGRES_EPOCH))),
                record[2] if versions else None,
            )

    async def close(self) -> None:
        """Stops a read ahead that nobody will take, so that the connection can be reused."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.cancel()
            # Whatever it ended with (its rows, an error, the cancellation) is not wanted.
            await asyncio.gather(ahead, return_exceptions=True)


class MemberStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # A listing holds a connection for as long as its reader takes; a quarter of the
        # pool at most, so that bulk readers never starve the evaluation path of
        # connections. Further listings wait their turn.
        self._listings = asyncio.Semaphore(max(1, pool.get_max_size() // 4))

    async def of_member(
        self, dataset: str, kind: Kind, subject_id: str, *, after: str = "", limit: int = 1000
    ) -> list[tuple[str, Membership]]:
        """The member's memberships by segment id, after ``after``."""
        records = await self.pool.fetch(
            f"""
            SELECT segment_id, version, {micros("join_time")} AS join_time
            FROM segment_engine.memberships
            WHERE dataset = $1 AND kind = $2 AND subject_id = $3 AND segment_id > $4
            ORDER BY segment_id LIMIT $5
            """,
            dataset,
            int(kind),
            subject_id,
            after,
            limit,
        )
        return [(r[0], Membership(r[1], r[2])) for r in records]

    async def check(self, dataset: str, segment_id: str, subject_id: str) -> Membership | None:
        record = await self.pool.fetchrow(
            f"""
            SELECT version, {micros("join_time")} AS join_time FROM segment_engine.memberships
            WHERE dataset = $1 AND segment_id = $2 AND subject_id = $3
            """,
            dataset,
            segment_id,
            subject_id,
        )
        return None if record is None else Membership(record[0], record[1])

    async def members(
        self, dataset: str, segment_id: str, *, after: str, limit: int
    ) -> list[tuple[str, int, int]]:
        """A page of a segment's members: (subject id, version, join time), by id."""
        records = await self.pool.fetch(
            f"""
            SELECT subject_id, version, {micros("join_time")} FROM segment_engine.memberships
            WHERE dataset = $1 AND segment_id = $2 AND subject_id > $3
            ORDER BY subject_id LIMIT $4
            """,
            dataset,
            segment_id,
            after,
            limit,
        )
        return [(r[0], r[1], r[2]) for r in records]

    @contextlib.asynccontextmanager
    async def listing(self, dataset: str, segment_id: str) -> AsyncIterator[MemberListing | None]:
        """The segment's members as of one snapshot, which stays open until the context
        ends; None when the segment does not exist or is being deleted."""
        async with (
            self._listings,
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(_SNAPSHOT, dataset, segment_id)
            if row is None:
                yield None
                return
            listing = MemberListing(
                conn,
                dataset,
                segment_id,
                SegmentSnapshot(
                    kind=Kind(row["kind"]),
                    version=row["version"],
                    member_count=row["member_count"],
                    position=row["head"],
                    time=row["now"],
                ),
            )
            try:
                yield listing
            finally:
                await listing.close()

    async def member_ids(
        self, dataset: str, segment_id: str, *, after: str, limit: int
    ) -> list[str]:
        records = await self.pool.fetch(
            "SELECT subject_id FROM segment_engine.memberships"
            " WHERE dataset = $1 AND segment_id = $2"
            " AND subject_id > $3 ORDER BY subject_id LIMIT $4",
            dataset,
            segment_id,
            after,
            limit,
        )
        return [r[0] for r in records]

    async def subject_ids(self, dataset: str, kind: Kind, *, after: str, limit: int) -> list[str]:
        """A page of the ids of subjects with a stored view, by id."""
        records = await self.pool.fetch(
            "SELECT subject_id FROM segment_engine.subjects WHERE dataset = $1 AND kind = $2"
            " AND subject_id > $3 AND view IS NOT NULL ORDER BY subject_id LIMIT $4",
            dataset,
            int(kind),
            after,
            limit,
        )
        return [r[0] for r in records]

    async def subject(self, dataset: str, kind: Kind, subject_id: str) -> StoredSubject | None:
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(
                f"SELECT view, {micros('view_time')} AS view_time, erased"
                " FROM segment_engine.subjects"
                " WHERE dataset = $1 AND kind = $2 AND subject_id = $3",
                dataset,
                int(kind),
                subject_id,
            )
            if row is None or row["erased"]:
                return None
            memberships = await conn.fetch(
                f"SELECT segment_id, version, {micros('join_time')} FROM segment_engine.memberships"
                " WHERE dataset = $1 AND kind = $2 AND subject_id = $3",
                dataset,
                int(kind),
                subject_id,
            )
            counts = await conn.fetch(
                "SELECT rollup_key, count FROM segment_engine.rollup_counts WHERE dataset = $1"
                " AND account_id = $2",
                dataset,
                subject_id,
            )
        return StoredSubject(
            view=row["view"],
            view_time=row["view_time"],
            memberships={r[0]: Membership(r[1], r[2]) for r in memberships},
            rollup_counts={r[0]: r[1] for r in counts} if kind is Kind.ACCOUNT else {},
        )
