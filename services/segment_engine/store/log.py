"""Reads of the membership change log: tailing it for subscribers, positions by time,
memberships as of a past time, and pruning.

A position is a log sequence number of one dataset. Every change at or below the head
(``log_heads.last_seq``) is committed and visible together with the head, so a reader that
reads the head and the changes in one statement (one snapshot) can move its position to
the head without skipping anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.segment_engine.domain.model import ChangeKind, Kind, Membership
from services.segment_engine.store.sql import from_micros, micros

__all__ = ["START_TIME_MARGIN", "ChangeLog", "LogRead", "LogRow", "PastMembership"]

START_TIME_MARGIN = 300_000_000
"""Microseconds: the longest a transaction takes from a change's time to allocating its
position. Positions and times may disagree by up to that, so starting from a time looks
this much further back, and the stream then drops changes older than the time."""

_SCAN = 50_000
"""The most positions one read scans, so a selective filter never scans the whole log."""


@dataclass(frozen=True, slots=True)
class LogRow:
    """A change as read from the log."""

    seq: int
    kind: Kind
    subject_id: str
    segment_id: str
    segment_version: int
    change: ChangeKind
    time: int
    reason: bytes
    trace_parent: str | None = None
    """The W3C traceparent of the evaluation that logged it; None when untraced."""


@dataclass(frozen=True, slots=True)
class LogRead:
    """One read of the log.

    Attributes:
        rows: the changes found, in log order.
        position: where the next read starts: the last row's position when the read was
            cut short by its limit, else as far as the read looked (the head, or the end of
            the scanned range).
        head: the log's head at the read.
        pruned: every change at or below this has been pruned.
        time: when the read happened (the database's clock), microseconds.
    """

    rows: list[LogRow]
    position: int
    head: int
    pruned: int
    time: int


@dataclass(frozen=True, slots=True)
class PastMembership:
    segment_id: str
    membership: Membership | None


class ChangeLog:
    """The change log's reads, and its pruning."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def read(
        self,
        dataset: str,
        after: int,
        *,
        segments: Sequence[str] = (),
        change: ChangeKind | None = None,
        min_time: int | None = None,
        limit: int,
    ) -> LogRead:
        """Reads the changes after position ``after`` that pass the filters."""
        conditions = ["c.dataset = $1", "c.seq > $2", "c.seq <= $3"]
        args: list[object] = [dataset, after, after + _SCAN, limit]
        if segments:
            args.append(list(segments))
            conditions.append(f"c.segment_id = ANY(${len(args)}::text[])")
        if change is not None:
            args.append(int(change))
            conditions.append(f"c.change = ${len(args)}")
        if min_time is not None:
            args.append(min_time)
            conditions.append(f"c.change_time >= {from_micros(f'${len(args)}::bigint')}")
        # One statement, one snapshot: the head read here covers exactly the rows read here.
        query = f"""
            (SELECT c.seq, c.kind, c.subject_id, c.segment_id, c.segment_version, c.change,
                    {micros("c.change_time")} AS time, c.reason, c.trace_parent,
                    NULL::bigint AS head, NULL::bigint AS pruned, NULL::bigint AS now
             FROM segment_engine.changes AS c
             WHERE {" AND ".join(conditions)}
             ORDER BY c.seq
             LIMIT $4)
            UNION ALL
            (SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                    coalesce(h.last_seq, 0), coalesce(h.pruned_seq, 0),
                    {micros("statement_timestamp()")}
             FROM (SELECT 1) AS one LEFT JOIN segment_engine.log_heads AS h ON h.dataset = $1)
        """
        async with self._pool.acquire() as conn:
            records = await conn.fetch(query, *args)
        rows: list[LogRow] = []
        head = pruned = now = 0
        for r in records:
            if r["seq"] is None:
                head, pruned, now = r["head"], r["pruned"], r["now"]
            else:
                rows.append(
                    LogRow(
                        seq=r["seq"],
                        kind=Kind(r["kind"]),
                        subject_id=r["subject_id"],
                        segment_id=r["segment_id"],
                        segment_version=r["segment_version"],
                        change=ChangeKind(r["change"]),
                        time=r["time"],
                        reason=r["reason"],
                        trace_parent=r["trace_parent"],
                    )
                )
        position = rows[-1].seq if len(rows) >= limit else max(after, min(head, after + _SCAN))
        return LogRead(rows, position, head, pruned, now)

    async def head(self, dataset: str) -> tuple[int, int, int]:
        """The dataset's head, pruned position and the database's time (microseconds)."""
        record = await self._pool.fetchrow(
            f"""
            SELECT coalesce(h.last_seq, 0) AS head, coalesce(h.pruned_seq, 0) AS pruned,
                   {micros("statement_timestamp()")} AS now
            FROM (SELECT 1) AS one LEFT JOIN segment_engine.log_heads AS h ON h.dataset = $1
            """,
            dataset,
        )
        assert record is not None
        return record["head"], record["pruned"], record["now"]

    async def position_at(self, dataset: str, time: int) -> int:
        """A position before every change at or after ``time`` (see START_TIME_MARGIN).

        The earliest change in time is not the first in position: a change timed later
        can take its position first. The first position among the changes from ``time``
        belongs to one allocated no later than the earliest of them in time was, so it is
        timed at most a margin after that one: only that stretch of the log is searched.
        """
        since = from_micros("$2::bigint")
        record = await self._pool.fetchrow(
            f"""
            SELECT min(c.seq) AS seq FROM segment_engine.changes AS c
            WHERE c.dataset = $1 AND c.change_time >= {since}
              AND c.change_time <= (
                  SELECT min(e.change_time) FROM segment_engine.changes AS e
                  WHERE e.dataset = $1 AND e.change_time >= {since}
              ) + {START_TIME_MARGIN} * interval '1 microsecond'
            """,
            dataset,
            time - START_TIME_MARGIN,
        )
        if record is None or record["seq"] is None:
            head, _, _ = await self.head(dataset)
            return head
        return max(0, int(record["seq"]) - 1)

    async def memberships_at(
        self, dataset: str, kind: Kind, subject_id: str, time: int
    ) -> list[PastMembership]:
        """How the member's memberships at ``time`` differ from its memberships now: per
        segment whose membership changed after ``time``, the membership it had then."""
        async with self._pool.acquire() as conn:
            after = await conn.fetch(
                f"""
                SELECT DISTINCT ON (segment_id) segment_id, change, segment_version
                FROM segment_engine.changes
                WHERE dataset = $1 AND kind = $2 AND subject_id = $3
                  AND change_time > {from_micros("$4::bigint")}
                ORDER BY segment_id, seq
                """,
                dataset,
                int(kind),
                subject_id,
                time,
            )
            joined = await conn.fetch(
                f"""
                SELECT DISTINCT ON (segment_id) segment_id, segment_version,
                       {micros("change_time")} AS time
                FROM segment_engine.changes
                WHERE dataset = $1 AND kind = $2 AND subject_id = $3 AND change = 1
                  AND change_time <= {from_micros("$4::bigint")}
                ORDER BY segment_id, seq DESC
                """,
                dataset,
                int(kind),
                subject_id,
                time,
            )
        joins = {r["segment_id"]: Membership(r["segment_version"], r["time"]) for r in joined}
        past: list[PastMembership] = []
        for r in after:
            if r["change"] == ChangeKind.JOIN:
                past.append(PastMembership(r["segment_id"], None))
            else:
                # It left after the time, so it was a member then; the join is in the log
                # unless it was pruned (join time then unknown, as 0).
                membership = joins.get(r["segment_id"], Membership(r["segment_version"], 0))
                past.append(PastMembership(r["segment_id"], membership))
        return past

    async def prune(self, older_than: int, *, batch: int = 10_000) -> int:
        """Deletes changes older than ``older_than`` (microseconds); returns how many."""
        deleted = 0
        async with self._pool.acquire() as conn:
            heads = await conn.fetch(
                "SELECT dataset, pruned_seq FROM segment_engine.log_heads ORDER BY dataset"
            )
            for head in heads:
                dataset = head["dataset"]
                horizon = await conn.fetchval(
                    f"""
                    SELECT seq FROM segment_engine.changes
                    WHERE dataset = $1 AND change_time < {from_micros("$2::bigint")}
                    ORDER BY change_time DESC LIMIT 1
                    """,
                    dataset,
                    older_than,
                )
                if horizon is None or horizon <= head["pruned_seq"]:
                    continue
                low = head["pruned_seq"]
                while low < horizon:
                    high = min(low + batch, horizon)
                    async with conn.transaction():
                        # The pruned position moves first: a reader that passes it from now
                        # on is told its position expired rather than handed a hole.
                        await conn.execute(
                            "UPDATE segment_engine.log_heads"
                            " SET pruned_seq = greatest(pruned_seq, $2)"
                            " WHERE dataset = $1",
                            dataset,
                            high,
                        )
                        result = await conn.execute(
                            "DELETE FROM segment_engine.changes"
                            " WHERE dataset = $1 AND seq > $2 AND seq <= $3",
                            dataset,
                            low,
                            high,
                        )
                    deleted += int(result.split()[-1])
                    low = high
        return deleted
