"""Membership reads: a member's segments, a segment's members, and a subject's stored state
for explanations. Plain reads outside any lock: they see the last committed state."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from services.segment_engine.domain.model import Kind, Membership
from services.segment_engine.store.sql import micros

__all__ = ["MemberStore", "StoredSubject"]


@dataclass(frozen=True, slots=True)
class StoredSubject:
    """What an explanation reads of a subject."""

    view: bytes | None
    view_time: int | None
    memberships: dict[str, Membership]
    rollup_counts: dict[str, int]


class MemberStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

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
