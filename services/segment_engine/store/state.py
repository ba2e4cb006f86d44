"""Subjects, memberships, timers and roll-up counts, and the write of one evaluation batch
(memberships, views, timers, counts, daily counters and the change log) in the caller's
transaction.

Lock order, which every writer keeps so that writers never deadlock: subject rows sorted by
(dataset, kind, id) — users before accounts —, then daily counter rows, then log heads by
dataset. A log head is the last lock taken and is held only for the insert of the log rows
and the commit.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from services.segment_engine.domain.model import Change, ChangeKind, Kind, Membership
from services.segment_engine.store.sql import from_micros, micros

__all__ = [
    "NOTIFY_CHANNEL",
    "Key",
    "LoggedRange",
    "StateStore",
    "Stored",
    "SubjectRow",
    "SubjectWrite",
    "WriteBatch",
    "notify_payload",
    "parse_notify_payload",
]

Key = tuple[str, int, str]
"""A subject: (dataset, kind, subject id)."""

NOTIFY_CHANNEL = "segment_engine_changes"
"""Postgres NOTIFY channel on which each commit that logged changes names its datasets."""

_DAY = 86_400_000_000
# NOTIFY payloads must stay under 8000 bytes.
_NOTIFY_BUDGET = 7_000
# Log rows from this many on are copied (binary COPY) rather than inserted.
_COPY_FROM = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Every row a batch writes but the log's, in one statement: each part is empty when there
# is nothing of its kind. Data-modifying parts run whether referenced or not; the NOTIFY
# part is referenced so that it runs. The rows of the subjects, memberships, timers and
# counts are the locked subjects' own; the day counters are shared and are taken in key
# order, so writers wait on each other there but never deadlock.
_WRITE = f"""
WITH
subjects_written AS (
    UPDATE segment_engine.subjects AS s SET
        sequence = u.sequence, view = u.view, view_time = {from_micros("u.view_time")},
        account_id = u.account_id, rollups = u.rollups, erased = u.erased,
        revision = s.revision + 1
    FROM unnest($1::segment_engine.subject_write[]) AS u
    WHERE s.dataset = u.dataset AND s.kind = u.kind AND s.subject_id = u.subject_id
    RETURNING 1
),
memberships_left AS (
    DELETE FROM segment_engine.memberships AS m
    USING unnest($2::segment_engine.membership_key[]) AS d
    WHERE m.dataset = d.dataset AND m.segment_id = d.segment_id
      AND m.subject_id = d.subject_id
    RETURNING 1
),
memberships_joined AS (
    INSERT INTO segment_engine.memberships
        (dataset, segment_id, subject_id, kind, version, join_time)
    SELECT j.dataset, j.segment_id, j.subject_id, j.kind, j.version,
           {from_micros("j.join_time")}
    FROM unnest($3::segment_engine.membership_row[]) AS j
    ON CONFLICT (dataset, segment_id, subject_id) DO UPDATE
    SET version = EXCLUDED.version, join_time = EXCLUDED.join_time
    RETURNING 1
),
timers_gone AS (
    DELETE FROM segment_engine.timers AS t
    USING unnest($4::segment_engine.timer_key[]) AS d
    WHERE t.dataset = d.dataset AND t.kind = d.kind AND t.subject_id = d.subject_id
      AND t.target = d.target
    RETURNING 1
),
timers_set AS (
    INSERT INTO segment_engine.timers (dataset, kind, subject_id, target, due)
    SELECT t.dataset, t.kind, t.subject_id, t.target, {from_micros("t.due")}
    FROM unnest($5::segment_engine.timer_row[]) AS t
    ON CONFLICT (dataset, kind, subject_id, target) DO UPDATE SET due = EXCLUDED.due
    RETURNING 1
),
counts_moved AS (
    INSERT INTO segment_engine.rollup_counts AS c (dataset, account_id, rollup_key, count)
    SELECT * FROM unnest($6::text[], $7::text[], $8::text[], $9::bigint[])
    ON CONFLICT (dataset, account_id, rollup_key) DO UPDATE SET count = c.count + EXCLUDED.count
    RETURNING 1
),
days_counted AS (
    INSERT INTO segment_engine.segment_days AS d (dataset, segment_id, day, joins, leaves)
    SELECT u.dataset, u.segment_id, date '1970-01-01' + u.day, u.joins, u.leaves
    FROM unnest($10::text[], $11::text[], $12::int[], $13::bigint[], $14::bigint[])
         AS u(dataset, segment_id, day, joins, leaves)
    ON CONFLICT (dataset, segment_id, day) DO UPDATE
    SET joins = d.joins + EXCLUDED.joins, leaves = d.leaves + EXCLUDED.leaves
    RETURNING 1
),
notified AS (
    SELECT pg_notify(n.channel, n.payload)
    FROM unnest($15::text[], $16::text[]) AS n(channel, payload)
)
SELECT (SELECT count(*) FROM notified)
"""

# The log head's row lock, held to the commit, orders allocation with commit. The
# parameter ``bulk`` (0 or 1) raises the dataset's bulk generation.
_HEAD_TEMPLATE = """
INSERT INTO segment_engine.log_heads AS h (dataset, last_seq, bulk_generation)
VALUES ($1, $2, ${bulk})
ON CONFLICT (dataset) DO UPDATE
SET last_seq = h.last_seq + EXCLUDED.last_seq,
    bulk_generation = h.bulk_generation + EXCLUDED.bulk_generation
RETURNING last_seq
"""
_HEAD = _HEAD_TEMPLATE.format(bulk=3)

_HEAD_AND_LOG = f"""
WITH head AS ({_HEAD_TEMPLATE.format(bulk=5)}),
logged AS (
    INSERT INTO segment_engine.changes (dataset, seq, kind, subject_id, segment_id,
                                        segment_version, change, change_time, reason,
                                        trace_parent)
    SELECT $1, head.last_seq - $2 + c.n, c.kind, c.subject_id, c.segment_id,
           c.segment_version, c.change, {from_micros("c.change_time")}, c.reason, $4
    FROM head, unnest($3::segment_engine.change_row[])
               WITH ORDINALITY AS c(kind, subject_id, segment_id, segment_version, change,
                                    change_time, reason, n)
    RETURNING 1
)
SELECT head.last_seq FROM head WHERE (SELECT count(*) FROM logged) >= 0
"""


@dataclass(slots=True)
class SubjectRow:
    """A subject's stored state, read under its row lock."""

    dataset: str
    kind: Kind
    subject_id: str
    sequence: int
    view: bytes | None
    view_time: int | None
    account_id: str | None
    rollups: list[str]
    erased: bool
    # Raised by every write of the subject's state (the migration 0003 says why).
    revision: int

    @property
    def key(self) -> Key:
        return (self.dataset, int(self.kind), self.subject_id)


@dataclass(frozen=True, slots=True)
class SubjectWrite:
    """A subject's new stored state (its revision is raised with it)."""

    key: Key
    sequence: int
    view: bytes | None
    view_time: int | None
    account_id: str | None
    rollups: Sequence[str]
    erased: bool = False


@dataclass(frozen=True, slots=True)
class LoggedRange:
    """The log positions a transaction's changes of one dataset took, in order."""

    dataset: str
    first: int
    last: int

    @property
    def positions(self) -> range:
        return range(self.first, self.last + 1)


@dataclass(slots=True)
class Stored:
    """What :meth:`StateStore.read` found."""

    memberships: dict[Key, dict[str, Membership]]
    timers: dict[Key, dict[str, int]]
    # (dataset, account id) → roll-up key → count.
    counts: dict[tuple[str, str], dict[str, int]]
    revisions: dict[str, int] = field(default_factory=dict)
    # Dataset → its bulk generation (see the migration 0003).
    generations: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class WriteBatch:
    """Everything one transaction writes after evaluating a set of subjects."""

    subjects: list[SubjectWrite] = field(default_factory=list)
    # Joins, leaves and timers are rows of the types the write takes (migration 0004).
    # (dataset, segment id, subject id, kind, version, join time): a membership_row
    joins: list[tuple[str, str, str, int, int, int]] = field(default_factory=list)
    # Joins known to be new rows (checked under the subject's lock): copied in bulk.
    fresh_joins: list[tuple[str, str, str, int, int, int]] = field(default_factory=list)
    # (dataset, segment id, subject id): a membership_key
    leaves: list[tuple[str, str, str]] = field(default_factory=list)
    # (dataset, kind, subject id, target, due): a timer_row
    timers_set: list[tuple[str, int, str, str, int]] = field(default_factory=list)
    # (dataset, kind, subject id, target): a timer_key
    timers_deleted: list[tuple[str, int, str, str]] = field(default_factory=list)
    # (dataset, account id, roll-up key) → delta
    rollup_deltas: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # (dataset, change, serialized ChangeReason), in the order to log them.
    changes: list[tuple[str, Change, bytes]] = field(default_factory=list)
    # The W3C traceparent of the evaluation, logged with each change; None untraced.
    trace_parent: str | None = None
    # Datasets with memberships written on the bulk path (their subjects not loaded):
    # their bulk generation is raised.
    bulk_datasets: set[str] = field(default_factory=set)

    def membership_diff(
        self,
        dataset: str,
        kind: Kind,
        subject_id: str,
        before: Mapping[str, Membership],
        after: Mapping[str, Membership],
    ) -> None:
        for segment_id in before.keys() - after.keys():
            self.leaves.append((dataset, segment_id, subject_id))
        for segment_id, membership in after.items():
            if before.get(segment_id) != membership:
                self.joins.append(
                    (
                        dataset,
                        segment_id,
                        subject_id,
                        int(kind),
                        membership.version,
                        membership.join_time,
                    )
                )

    def timer_diff(
        self,
        dataset: str,
        kind: Kind,
        subject_id: str,
        before: Mapping[str, int],
        after: Mapping[str, int],
    ) -> None:
        for target in before.keys() - after.keys():
            self.timers_deleted.append((dataset, int(kind), subject_id, target))
        for target, due in after.items():
            if before.get(target) != due:
                self.timers_set.append((dataset, int(kind), subject_id, target, due))

    def add_rollup_deltas(self, dataset: str, deltas: Mapping[tuple[str, str], int]) -> None:
        for (account_id, key), delta in deltas.items():
            slot = (dataset, account_id, key)
            total = self.rollup_deltas.get(slot, 0) + delta
            if total:
                self.rollup_deltas[slot] = total
            else:
                self.rollup_deltas.pop(slot, None)


_SUBJECT_COLUMNS = (
    "s.dataset, s.kind, s.subject_id, s.sequence, s.view, "
    f"{micros('s.view_time')} AS view_time, s.account_id, s.rollups, s.erased, s.revision"
)

_LOCK = f"""
SELECT {_SUBJECT_COLUMNS}
FROM segment_engine.subjects AS s
JOIN unnest($1::segment_engine.subject_key[]) AS k
  ON s.dataset = k.dataset AND s.kind = k.kind AND s.subject_id = k.subject_id
ORDER BY s.dataset, s.kind, s.subject_id
FOR UPDATE OF s
"""

_LOCK_SKIP = _LOCK.replace("FOR UPDATE OF s", "FOR UPDATE OF s SKIP LOCKED")

_CREATE = """
INSERT INTO segment_engine.subjects (dataset, kind, subject_id)
SELECT * FROM unnest($1::segment_engine.subject_key[])
ON CONFLICT DO NOTHING
"""


def _row(record: asyncpg.Record) -> SubjectRow:
    return SubjectRow(
        dataset=record["dataset"],
        kind=Kind(record["kind"]),
        subject_id=record["subject_id"],
        sequence=record["sequence"],
        view=record["view"],
        view_time=record["view_time"],
        account_id=record["account_id"],
        rollups=list(record["rollups"]),
        erased=record["erased"],
        revision=record["revision"],
    )


class StateStore:
    """Reads and writes subjects' evaluation state inside the caller's transaction.

    Args:
        origin: names this process in its commit notifications, so it can tell its own.
    """

    def __init__(self, origin: str) -> None:
        self.origin = origin

    async def lock(self, conn: asyncpg.Connection, keys: Iterable[Key]) -> dict[Key, SubjectRow]:
        """Locks the subjects (creating empty rows for unknown ones) in key order."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        found = {row.key: row for row in map(_row, await conn.fetch(_LOCK, wanted))}
        missing = [key for key in wanted if key not in found]
        if missing:
            # Created rows are locked by the insert; a racing creator waits on the unique
            # index until this transaction ends, then finds the row.
            await conn.execute(_CREATE, missing)
            for record in await conn.fetch(_LOCK, missing):
                row = _row(record)
                found[row.key] = row
        return found

    async def try_lock(
        self, conn: asyncpg.Connection, keys: Iterable[Key]
    ) -> dict[Key, SubjectRow]:
        """Locks the subjects that no one else holds and that exist; skips the others."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        records = await conn.fetch(_LOCK_SKIP, wanted)
        return {row.key: row for row in map(_row, records)}

    async def lock_light(
        self, conn: asyncpg.Connection, dataset: str, kind: Kind, subject_ids: Sequence[str]
    ) -> dict[str, int | None]:
        """Locks subjects of one dataset and kind (creating unknown ones) without reading
        their views; returns each one's view time (None when it has no view)."""
        wanted = sorted(set(subject_ids))
        found = await self._lock_light(conn, dataset, kind, wanted)
        missing = [subject_id for subject_id in wanted if subject_id not in found]
        if missing:
            await conn.execute(
                _CREATE, [(dataset, int(kind), subject_id) for subject_id in missing]
            )
            found.update(await self._lock_light(conn, dataset, kind, missing))
        return found

    async def _lock_light(
        self, conn: asyncpg.Connection, dataset: str, kind: Kind, subject_ids: list[str]
    ) -> dict[str, int | None]:
        records = await conn.fetch(
            f"""
            SELECT s.subject_id, CASE WHEN s.view IS NULL OR s.erased THEN NULL
                                      ELSE {micros("s.view_time")} END AS view_time
            FROM segment_engine.subjects AS s
            WHERE s.dataset = $1 AND s.kind = $2 AND s.subject_id = ANY($3::text[])
            ORDER BY s.subject_id
            FOR UPDATE OF s
            """,
            dataset,
            int(kind),
            subject_ids,
        )
        return {r[0]: r[1] for r in records}

    async def members_among(
        self, conn: asyncpg.Connection, dataset: str, segment_id: str, subject_ids: Sequence[str]
    ) -> dict[str, Membership]:
        """Which of the subjects are members of the segment."""
        records = await conn.fetch(
            f"""
            SELECT subject_id, version, {micros("join_time")} AS join_time
            FROM segment_engine.memberships
            WHERE dataset = $1 AND segment_id = $2 AND subject_id = ANY($3::text[])
            """,
            dataset,
            segment_id,
            list(subject_ids),
        )
        return {r[0]: Membership(r[1], r[2]) for r in records}

    async def read(
        self,
        conn: asyncpg.Connection,
        keys: Sequence[Key],
        datasets: Iterable[str] = (),
    ) -> Stored:
        """Reads, in one round trip, the subjects' memberships and timers, the roll-up
        counts of those that are accounts, and the catalog revisions and bulk generations
        of ``datasets``. Call it after locking the subjects: it then sees what their last
        writers committed."""
        stored = Stored(
            memberships={key: {} for key in keys},
            timers={key: {} for key in keys},
            counts={(key[0], key[2]): {} for key in keys if key[1] == Kind.ACCOUNT},
        )
        names = sorted(set(datasets))
        if not keys and not names:
            return stored
        accounts = [key for key in keys if key[1] == Kind.ACCOUNT]
        records = await conn.fetch(
            f"""
            SELECT 0 AS part, m.dataset, m.kind, m.subject_id, m.segment_id AS name,
                   m.version AS number, {micros("m.join_time")} AS moment
            FROM segment_engine.memberships AS m
            JOIN unnest($1::segment_engine.subject_key[]) AS k
              ON m.dataset = k.dataset AND m.kind = k.kind AND m.subject_id = k.subject_id
            UNION ALL
            SELECT 1, t.dataset, t.kind, t.subject_id, t.target, NULL, {micros("t.due")}
            FROM segment_engine.timers AS t
            JOIN unnest($1::segment_engine.subject_key[]) AS k
              ON t.dataset = k.dataset AND t.kind = k.kind AND t.subject_id = k.subject_id
            UNION ALL
            SELECT 2, c.dataset, NULL, c.account_id, c.rollup_key, c.count, NULL
            FROM segment_engine.rollup_counts AS c
            JOIN unnest($2::text[], $3::text[]) AS a(dataset, account_id)
              ON c.dataset = a.dataset AND c.account_id = a.account_id
            UNION ALL
            SELECT 3, c.dataset, NULL, NULL, NULL, c.revision, NULL
            FROM segment_engine.catalogs AS c WHERE c.dataset = ANY($4::text[])
            UNION ALL
            SELECT 4, h.dataset, NULL, NULL, NULL, h.bulk_generation, NULL
            FROM segment_engine.log_heads AS h WHERE h.dataset = ANY($4::text[])
            """,
            keys,
            [key[0] for key in accounts],
            [key[2] for key in accounts],
            names,
        )
        revisions = dict.fromkeys(names, 0)
        generations = dict.fromkeys(names, 0)
        for r in records:
            part = r[0]
            if part == 0:
                stored.memberships[(r[1], r[2], r[3])][r[4]] = Membership(r[5], r[6])
            elif part == 1:
                stored.timers[(r[1], r[2], r[3])][r[4]] = r[6]
            elif part == 2:
                stored.counts[(r[1], r[3])][r[4]] = r[5]
            elif part == 3:
                revisions[r[1]] = r[5]
            else:
                generations[r[1]] = r[5]
        stored.revisions.update(revisions)
        stored.generations.update(generations)
        return stored

    async def catalog_revisions(
        self, conn: asyncpg.Connection, datasets: Iterable[str]
    ) -> dict[str, int]:
        names = sorted(set(datasets))
        records = await conn.fetch(
            "SELECT dataset, revision FROM segment_engine.catalogs WHERE dataset = ANY($1::text[])",
            names,
        )
        found = {r["dataset"]: r["revision"] for r in records}
        return {dataset: found.get(dataset, 0) for dataset in names}

    async def write(self, conn: asyncpg.Connection, batch: WriteBatch) -> list[LoggedRange]:
        """Writes a batch in the caller's transaction; returns the log positions its
        changes took. The subjects must be locked by this transaction.

        Two statements (three with a bulk copy): every row but the log's, with the commit
        notifications and the written subjects' revisions, in one; the log head (with the
        dataset's bulk generation) and the log rows in the other, last, so the head's lock
        is held only from there to the commit.
        """
        by_dataset: defaultdict[str, list[tuple[Change, bytes]]] = defaultdict(list)
        for dataset, change, reason in batch.changes:
            by_dataset[dataset].append((change, reason))
        if batch.fresh_joins:
            await conn.copy_records_to_table(
                "memberships",
                schema_name="segment_engine",
                columns=["dataset", "segment_id", "subject_id", "kind", "version", "join_time"],
                records=[
                    (dataset, segment_id, subject_id, kind, version, _moment(join_time))
                    for dataset, segment_id, subject_id, kind, version, join_time in (
                        batch.fresh_joins
                    )
                ],
            )
        if (
            batch.subjects
            or batch.leaves
            or batch.joins
            or batch.timers_deleted
            or batch.timers_set
            or batch.rollup_deltas
            or by_dataset
        ):
            await conn.execute(_WRITE, *self._write_arguments(batch, by_dataset))
        logged: list[LoggedRange] = []
        for dataset in sorted(by_dataset):
            entries = by_dataset[dataset]
            bulk = int(dataset in batch.bulk_datasets)
            if len(entries) >= _COPY_FROM:
                last = await conn.fetchval(_HEAD, dataset, len(entries), bulk)
                await self._copy_log(
                    conn, dataset, last - len(entries) + 1, entries, batch.trace_parent
                )
            else:
                last = await conn.fetchval(
                    _HEAD_AND_LOG,
                    dataset,
                    len(entries),
                    [
                        (
                            int(c.kind),
                            c.subject_id,
                            c.segment_id,
                            c.segment_version,
                            int(c.change),
                            c.time,
                            reason,
                        )
                        for c, reason in entries
                    ],
                    batch.trace_parent,
                    bulk,
                )
            logged.append(LoggedRange(dataset, last - len(entries) + 1, last))
        return logged

    def _write_arguments(
        self, batch: WriteBatch, by_dataset: Mapping[str, Sequence[tuple[Change, bytes]]]
    ) -> list[object]:
        writes = sorted(batch.subjects, key=lambda w: w.key)
        counters: defaultdict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0])
        for dataset, change, _ in batch.changes:
            slot = counters[(dataset, change.segment_id, change.time // _DAY)]
            slot[0 if change.change is ChangeKind.JOIN else 1] += 1
        days = sorted(counters.items())
        rollups = sorted(batch.rollup_deltas.items())
        notes = [
            notify_payload(self.origin, dataset, ((c.kind, c.subject_id) for c, _ in entries))
            for dataset, entries in sorted(by_dataset.items())
        ]
        return [
            [
                (*w.key, w.sequence, w.view, w.view_time, w.account_id, w.rollups, w.erased)
                for w in writes
            ],
            batch.leaves,
            batch.joins,
            batch.timers_deleted,
            batch.timers_set,
            [slot[0] for slot, _ in rollups],
            [slot[1] for slot, _ in rollups],
            [slot[2] for slot, _ in rollups],
            [delta for _, delta in rollups],
            [slot[0] for slot, _ in days],
            [slot[1] for slot, _ in days],
            [slot[2] for slot, _ in days],
            [counts[0] for _, counts in days],
            [counts[1] for _, counts in days],
            [NOTIFY_CHANNEL] * len(notes),
            notes,
        ]

    async def _copy_log(
        self,
        conn: asyncpg.Connection,
        dataset: str,
        first: int,
        entries: Sequence[tuple[Change, bytes]],
        trace_parent: str | None,
    ) -> None:
        await conn.copy_records_to_table(
            "changes",
            schema_name="segment_engine",
            columns=[
                "dataset",
                "seq",
                "kind",
                "subject_id",
                "segment_id",
                "segment_version",
                "change",
                "change_time",
                "reason",
                "trace_parent",
            ],
            records=[
                (
                    dataset,
                    first + index,
                    int(c.kind),
                    c.subject_id,
                    c.segment_id,
                    c.segment_version,
                    int(c.change),
                    _moment(c.time),
                    reason,
                    trace_parent,
                )
                for index, (c, reason) in enumerate(entries)
            ],
        )


@functools.lru_cache(maxsize=4096)
def _moment(micros: int) -> datetime:
    # Rows of one transaction share their instant: converted once.
    return _EPOCH + timedelta(microseconds=micros)


def notify_payload(origin: str, dataset: str, members: Iterable[tuple[int, str]]) -> str:
    """The NOTIFY payload of a commit: the writing process's origin, the dataset, then
    ``kind:id`` per member whose memberships changed, one a line (``*`` instead of the
    members when they do not fit)."""
    lines = [origin, dataset]
    seen: set[tuple[int, str]] = set()
    size = len(origin) + len(dataset) + 1
    for member in members:
        if member in seen:
            continue
        seen.add(member)
        line = f"{int(member[0])}:{member[1]}"
        size += len(line.encode()) + 1
        if size > _NOTIFY_BUDGET:
            return f"{origin}\n{dataset}\n*"
        lines.append(line)
    return "\n".join(lines)


def parse_notify_payload(payload: str) -> tuple[str, str, list[tuple[int, str]] | None]:
    """The origin, dataset and members of a payload; None for the members when they did
    not fit."""
    origin, _, payload = payload.partition("\n")
    dataset, _, rest = payload.partition("\n")
    if rest == "*":
        return origin, dataset, None
    members: list[tuple[int, str]] = []
    for line in rest.split("\n") if rest else ():
        kind, _, subject_id = line.partition(":")
        members.append((int(kind), subject_id))
    return origin, dataset, members
