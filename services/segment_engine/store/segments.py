"""Segment definitions, catalog revisions, backfill progress and daily statistics."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.segment_engine.domain.model import Kind, SegmentState, Source
from services.segment_engine.domain.segments import Backfill, SegmentRecord
from services.segment_engine.store.sql import from_micros, micros

__all__ = ["DayStats", "SegmentStore", "bump_catalog", "work_lock_key"]


def work_lock_key(dataset: str, segment_id: str) -> int:
    """The advisory lock held by whoever works on a whole segment (a backfill, a deletion,
    an import), so that one works on it at a time."""
    digest = hashlib.sha256(f"audience.segment_engine.work:{dataset}/{segment_id}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


_COLUMNS = f"""
    s.dataset, s.segment_id, s.kind, s.source, s.display_name, s.description, s.labels,
    s.rule, s.rule_text, s.version, s.revision, s.state, s.backfill_version, s.backfill_done,
    s.backfill_total, {micros("s.backfill_start")} AS backfill_start,
    {micros("s.backfill_end")} AS backfill_end, s.backfill_error,
    {micros("s.create_time")} AS create_time, {micros("s.update_time")} AS update_time,
    (SELECT coalesce(sum(d.joins - d.leaves), 0)::bigint FROM segment_engine.segment_days AS d
     WHERE d.dataset = s.dataset AND d.segment_id = s.segment_id) AS member_count
"""


@dataclass(frozen=True, slots=True)
class DayStats:
    day: int  # days since the epoch
    joins: int
    leaves: int


def _record(r: asyncpg.Record) -> SegmentRecord:
    # The pool decodes jsonb to Python objects.
    labels = r["labels"]
    return SegmentRecord(
        dataset=r["dataset"],
        segment_id=r["segment_id"],
        kind=Kind(r["kind"]),
        source=Source(r["source"]),
        display_name=r["display_name"],
        description=r["description"],
        labels=dict(labels),
        rule=r["rule"],
        rule_text=r["rule_text"],
        version=r["version"],
        revision=r["revision"],
        state=SegmentState(r["state"]),
        backfill=Backfill(
            version=r["backfill_version"],
            done=r["backfill_done"],
            total=r["backfill_total"],
            start_time=r["backfill_start"],
            end_time=r["backfill_end"],
            error=r["backfill_error"],
        ),
        member_count=r["member_count"],
        create_time=r["create_time"],
        update_time=r["update_time"],
    )


async def bump_catalog(conn: asyncpg.Connection, dataset: str) -> None:
    """Marks the dataset's rules changed, in the caller's transaction."""
    await conn.execute(
        "INSERT INTO segment_engine.catalogs AS c (dataset, revision) VALUES ($1, 1)"
        " ON CONFLICT (dataset) DO UPDATE SET revision = c.revision + 1",
        dataset,
    )


class SegmentStore:
    """The ``segments`` table and what hangs off it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert(self, conn: asyncpg.Connection, record: SegmentRecord) -> bool:
        """Inserts a new segment; False when the dataset has one with its id."""
        result = await conn.execute(
            f"""
            INSERT INTO segment_engine.segments (dataset, segment_id, kind, source, display_name,
                                  description,
                                  labels, rule, rule_text, version, revision, state,
                                  backfill_version, backfill_start, create_time, update_time)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, 1, 1, $10, $11,
                    {from_micros("$12::bigint")}, {from_micros("$13::bigint")},
                    {from_micros("$13::bigint")})
            ON CONFLICT (dataset, segment_id) DO NOTHING
            """,
            record.dataset,
            record.segment_id,
            int(record.kind),
            int(record.source),
            record.display_name,
            record.description,
            dict(record.labels),
            record.rule,
            record.rule_text,
            int(record.state),
            record.backfill.version,
            record.backfill.start_time,
            record.create_time,
        )
        return bool(result.endswith(" 1"))

    async def get(
        self,
        dataset: str,
        segment_id: str,
        *,
        conn: asyncpg.Connection | None = None,
        for_update: bool = False,
        include_deleting: bool = False,
    ) -> SegmentRecord | None:
        query = (
            f"SELECT {_COLUMNS} FROM segment_engine.segments AS s"
            " WHERE s.dataset = $1 AND s.segment_id = $2"
        )
        if not include_deleting:
            query += " AND NOT s.deleting"
        if for_update:
            query += " FOR UPDATE OF s"
        record = await (conn or self.pool).fetchrow(query, dataset, segment_id)
        return None if record is None else _record(record)

    async def page(
        self,
        dataset: str,
        *,
        after: str,
        limit: int,
        kind: Kind | None = None,
        state: SegmentState | None = None,
    ) -> list[SegmentRecord]:
        conditions = ["s.dataset = $1", "s.segment_id > $2", "NOT s.deleting"]
        args: list[object] = [dataset, after, limit]
        if kind is not None:
            args.append(int(kind))
            conditions.append(f"s.kind = ${len(args)}")
        if state is not None:
            args.append(int(state))
            conditions.append(f"s.state = ${len(args)}")
        records = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM segment_engine.segments AS s WHERE {' AND '.join(conditions)}"
            " ORDER BY s.segment_id LIMIT $3",
            *args,
        )
        return [_record(r) for r in records]

    async def catalog(self, dataset: str) -> tuple[int, list[SegmentRecord]]:
        """The dataset's live segments and its catalog revision, read in one snapshot."""
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            revision = await conn.fetchval(
                "SELECT revision FROM segment_engine.catalogs WHERE dataset = $1", dataset
            )
            records = await conn.fetch(
                f"SELECT {_COLUMNS} FROM segment_engine.segments AS s"
                " WHERE s.dataset = $1 AND NOT s.deleting",
                dataset,
            )
        return revision or 0, [_record(r) for r in records]

    async def version(self, dataset: str, segment_id: str) -> int | None:
        """A live segment's version; None when it is gone."""
        version = await self.pool.fetchval(
            "SELECT version FROM segment_engine.segments"
            " WHERE dataset = $1 AND segment_id = $2 AND NOT deleting",
            dataset,
            segment_id,
        )
        return None if version is None else int(version)

    async def revision(self, dataset: str) -> int:
        revision = await self.pool.fetchval(
            "SELECT revision FROM segment_engine.catalogs WHERE dataset = $1", dataset
        )
        return int(revision or 0)

    async def save(self, conn: asyncpg.Connection, record: SegmentRecord) -> None:
        """Writes a segment's definition and state (the row must be locked)."""
        await conn.execute(
            f"""
            UPDATE segment_engine.segments
            SET display_name = $3, description = $4, labels = $5::jsonb,
                rule = $6, rule_text = $7, version = $8, revision = $9, state = $10,
                backfill_version = $11, backfill_done = $12, backfill_total = $13,
                backfill_start = {from_micros("$14::bigint")},
                backfill_end = {from_micros("$15::bigint")}, backfill_error = $16,
                update_time = {from_micros("$17::bigint")}
            WHERE dataset = $1 AND segment_id = $2
            """,
            record.dataset,
            record.segment_id,
            record.display_name,
            record.description,
            dict(record.labels),
            record.rule,
            record.rule_text,
            record.version,
            record.revision,
            int(record.state),
            record.backfill.version,
            record.backfill.done,
            record.backfill.total,
            record.backfill.start_time,
            record.backfill.end_time,
            record.backfill.error,
            record.update_time,
        )

    async def progress(
        self, dataset: str, segment_id: str, version: int, done: int, total: int
    ) -> None:
        """Records a running backfill's progress, unless a newer version superseded it."""
        await self.pool.execute(
            """
            UPDATE segment_engine.segments SET backfill_done = $4, backfill_total = $5
            WHERE dataset = $1 AND segment_id = $2 AND backfill_version = $3 AND state = 1
            """,
            dataset,
            segment_id,
            version,
            done,
            total,
        )

    async def finish_backfill(
        self, dataset: str, segment_id: str, version: int, end_time: int, error: str = ""
    ) -> bool:
        """Ends a backfill (failed when ``error``); False when a newer version superseded it."""
        state = SegmentState.FAILED if error else SegmentState.ACTIVE
        result = await self.pool.execute(
            f"""
            UPDATE segment_engine.segments
            SET state = $4, backfill_end = {from_micros("$5::bigint")},
                backfill_error = $6,
                backfill_done = CASE WHEN $6 = '' THEN greatest(backfill_done, backfill_total)
                                     ELSE backfill_done END
            WHERE dataset = $1 AND segment_id = $2 AND backfill_version = $3 AND state = 1
              AND NOT deleting
            """,
            dataset,
            segment_id,
            version,
            int(state),
            end_time,
            error,
        )
        return bool(result.endswith(" 1"))

    async def pending(self) -> list[tuple[str, str, bool]]:
        """Segments with work to do: (dataset, segment id, being deleted)."""
        records = await self.pool.fetch(
            "SELECT dataset, segment_id, deleting FROM segment_engine.segments"
            " WHERE state = 1 OR deleting"
            " ORDER BY update_time"
        )
        return [(r["dataset"], r["segment_id"], r["deleting"]) for r in records]

    async def mark_deleting(self, conn: asyncpg.Connection, dataset: str, segment_id: str) -> None:
        await conn.execute(
            "UPDATE segment_engine.segments SET deleting = true, revision = revision + 1"
            " WHERE dataset = $1 AND segment_id = $2",
            dataset,
            segment_id,
        )
        await bump_catalog(conn, dataset)

    async def remove(self, dataset: str, segment_id: str) -> None:
        """Drops a deleted segment whose members are all gone, with its counters."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM segment_engine.segments"
                " WHERE dataset = $1 AND segment_id = $2 AND deleting",
                dataset,
                segment_id,
            )
            await conn.execute(
                "DELETE FROM segment_engine.segment_days WHERE dataset = $1 AND segment_id = $2",
                dataset,
                segment_id,
            )

    async def days(
        self, dataset: str, segment_id: str, first_day: int
    ) -> tuple[int, list[DayStats]]:
        """The size before ``first_day`` (days since the epoch) and each later day's counts."""
        async with self.pool.acquire() as conn:
            base = await conn.fetchval(
                "SELECT coalesce(sum(joins - leaves), 0)::bigint FROM segment_engine.segment_days"
                " WHERE dataset = $1 AND segment_id = $2 AND day < date '1970-01-01' + $3::int",
                dataset,
                segment_id,
                first_day,
            )
            records = await conn.fetch(
                "SELECT (day - date '1970-01-01') AS day, joins, leaves"
                " FROM segment_engine.segment_days"
                " WHERE dataset = $1 AND segment_id = $2 AND day >= date '1970-01-01' + $3::int"
                " ORDER BY day",
                dataset,
                segment_id,
                first_day,
            )
        return base, [DayStats(r["day"], r["joins"], r["leaves"]) for r in records]

    async def references(self, dataset: str) -> Sequence[tuple[str, Kind, bytes | None]]:
        """Every live segment's id, kind and rule, for reference checks."""
        records = await self.pool.fetch(
            "SELECT segment_id, kind, rule FROM segment_engine.segments"
            " WHERE dataset = $1 AND NOT deleting",
            dataset,
        )
        return [(r["segment_id"], Kind(r["kind"]), r["rule"]) for r in records]
