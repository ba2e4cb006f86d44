"""The ingest schema in PostgreSQL: failed events (see migrations/)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

__all__ = ["FailedEventRow", "FailedEventStore", "NewFailure"]


@dataclass(frozen=True, slots=True)
class NewFailure:
    """A failure reported on the bus.

    Attributes:
        attempt: the ``IngestedEvent.replay_count`` of the delivery that failed.
    """

    dataset: str
    event_id: str
    event: bytes
    stage: str
    reason: str
    message: str
    fail_time: datetime
    attempt: int


@dataclass(frozen=True, slots=True)
class FailedEventRow:
    """A stored failed event."""

    id: int
    dataset: str
    event_id: str
    event: bytes
    stage: str
    reason: str
    message: str
    fail_time: datetime
    replay_count: int
    replay_time: datetime | None


_COLUMNS = (
    "id, dataset, event_id, event, stage, reason, message, fail_time, replay_count, replay_time"
)

_RECORD = """
INSERT INTO ingest.failed_events AS f (
    dataset, event_id, event, stage, reason, message, fail_time, last_fail_time, attempt,
    replay_count)
SELECT d, e, ev, s, r, m, t, t, a, a
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::text[],
            $7::timestamptz[], $8::int[]) AS u(d, e, ev, s, r, m, t, a)
ON CONFLICT (dataset, event_id) DO UPDATE SET
    stage = EXCLUDED.stage,
    reason = EXCLUDED.reason,
    message = EXCLUDED.message,
    last_fail_time = EXCLUDED.last_fail_time,
    attempt = EXCLUDED.attempt
WHERE f.attempt < EXCLUDED.attempt
"""

Publish = Callable[[Sequence[FailedEventRow]], Awaitable[None]]


def _row(record: asyncpg.Record) -> FailedEventRow:
    return FailedEventRow(
        id=record["id"],
        dataset=record["dataset"],
        event_id=record["event_id"],
        event=bytes(record["event"]),
        stage=record["stage"],
        reason=record["reason"],
        message=record["message"],
        fail_time=record["fail_time"],
        replay_count=record["replay_count"],
        replay_time=record["replay_time"],
    )


class FailedEventStore:
    """The ``ingest.failed_events`` table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, failures: Sequence[NewFailure]) -> None:
        """Stores failures; idempotent: a failure reported again changes nothing.

        A failure of a later delivery of an event (a replay, so a higher ``attempt``)
        replaces the stored reason and makes the event await a replay again.
        """
        latest: dict[tuple[str, str], NewFailure] = {}
        for failure in failures:
            key = (failure.dataset, failure.event_id)
            # One statement cannot update a row twice: keep each event's latest failure.
            if key not in latest or latest[key].attempt < failure.attempt:
                latest[key] = failure
        if not latest:
            return
        rows = list(latest.values())
        await self._pool.execute(
            _RECORD,
            [f.dataset for f in rows],
            [f.event_id for f in rows],
            [f.event for f in rows],
            [f.stage for f in rows],
            [f.reason for f in rows],
            [f.message for f in rows],
            [f.fail_time for f in rows],
            [f.attempt for f in rows],
        )

    async def page(
        self, dataset: str, *, reason: str | None, before_id: int | None, limit: int
    ) -> list[FailedEventRow]:
        """Returns up to ``limit`` failed events of a dataset, newest first."""
        records = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM ingest.failed_events"
            " WHERE dataset = $1 AND ($2::text IS NULL OR reason = $2)"
            " AND ($3::bigint IS NULL OR id < $3)"
            " ORDER BY id DESC LIMIT $4",
            dataset,
            reason,
            before_id,
            limit,
        )
        return [_row(record) for record in records]

    async def missing(self, dataset: str, ids: Sequence[int]) -> list[int]:
        """Returns which of ``ids`` are not failed events of the dataset."""
        found = await self._pool.fetch(
            "SELECT id FROM ingest.failed_events WHERE dataset = $1 AND id = ANY($2::bigint[])",
            dataset,
            list(ids),
        )
        present = {record["id"] for record in found}
        return [i for i in ids if i not in present]

    async def replay(
        self,
        dataset: str,
        publish: Publish,
        *,
        ids: Sequence[int] | None = None,
        reason: str | None = None,
        chunk: int = 500,
    ) -> int:
        """Publishes failed events again and counts them as replayed; returns how many.

        With ``ids``, those events (replayed before or not). Without, every event of the
        dataset (with ``reason``, when given) awaiting a replay, ``chunk`` at a time. Each
        chunk is locked while it is published, so concurrent replays do not publish an
        event twice; an event is counted as replayed only after ``publish`` returned, so
        one that fails to publish is never marked (at least once).
        """
        total = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                if ids is not None:
                    records = await conn.fetch(
                        f"SELECT {_COLUMNS} FROM ingest.failed_events"
                        " WHERE dataset = $1 AND id = ANY($2::bigint[]) ORDER BY id FOR UPDATE",
                        dataset,
                        list(ids),
                    )
                else:
                    records = await conn.fetch(
                        f"SELECT {_COLUMNS} FROM ingest.failed_events"
                        " WHERE dataset = $1 AND ($2::text IS NULL OR reason = $2)"
                        " AND replay_count <= attempt"
                        " ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
                        dataset,
                        reason,
                        chunk,
                    )
                if not records:
                    return total
                rows = [_row(record) for record in records]
                await publish(rows)
                await conn.execute(
                    "UPDATE ingest.failed_events"
                    " SET replay_count = replay_count + 1, replay_time = now()"
                    " WHERE id = ANY($1::bigint[])",
                    [row.id for row in rows],
                )
            total += len(rows)
            if ids is not None:
                return total
