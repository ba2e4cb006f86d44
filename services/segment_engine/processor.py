"""Applies what changes memberships, one transaction per batch: profile changes from the bus,
due timers, and memberships decided elsewhere (backfills, imports, deletions).

A transaction locks the subjects it touches (users, then accounts), reads their stored
state, checks that the compiled catalogs are at the revision the database holds, runs the
pure evaluation (``domain.evaluation``) and writes memberships, views, timers, roll-up
counts, daily counters and the change log together. A transaction that loses a deadlock is
run again from the start.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from opentelemetry import metrics, trace

from audience.bus.v1 import profile_change_pb2
from audience.cache import StateCache
from audience.rules import LazyView, micros_from_timestamp
from audience.telemetry import inject
from services.segment_engine.catalogs import Catalogs
from services.segment_engine.domain.catalog import Catalog, segment_dependency
from services.segment_engine.domain.evaluation import (
    Before,
    Outcome,
    Subject,
    apply_forced,
    erase,
    evaluate_change,
    evaluate_timers,
    recount_rollups,
    refresh_timer,
    rollup_keys,
)
from services.segment_engine.domain.model import (
    Cause,
    Change,
    ChangeKind,
    Kind,
    Membership,
    Reason,
    segment_name,
)
from services.segment_engine.rules import view_from_bytes
from services.segment_engine.store.sql import DEADLOCK_RETRIES, transaction
from services.segment_engine.store.state import (
    Key,
    LoggedRange,
    StateStore,
    SubjectRow,
    SubjectWrite,
    WriteBatch,
)

__all__ = ["Committed", "Processor"]

_log = logging.getLogger(__name__)

_UPDATED = profile_change_pb2.PROFILE_CHANGE_TYPE_UPDATED
_ERASED = profile_change_pb2.PROFILE_CHANGE_TYPE_ERASED
_MERGED = profile_change_pb2.PROFILE_CHANGE_TYPE_MERGED

ProfileChange = profile_change_pb2.ProfileChange

# Seconds: a transaction of one subject takes milliseconds, a backfill's chunk seconds.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_CHANGE_ATTRIBUTES = {
    (kind, cause): {
        "audience.membership.change": kind.name.lower(),
        "audience.cause": cause.name.lower(),
    }
    for kind in ChangeKind
    for cause in Cause
}


@dataclass(frozen=True)
class Committed:
    """What a committed transaction changed.

    Attributes:
        logged: the log positions the changes took, per dataset.
        members: the subjects whose memberships changed.
        earliest_timer: the earliest timer set, microseconds; None when none was set.
    """

    logged: list[LoggedRange] = field(default_factory=list)
    members: set[Key] = field(default_factory=set)
    earliest_timer: int | None = None


CommitHook = Callable[[Committed], None]


@dataclass(frozen=True, slots=True)
class _Kept:
    """A subject's memberships, timers and roll-up counts as a committed transaction left
    them, kept for the next transaction that locks the subject at the same revision."""

    sequence: int
    """The subject row's revision (not its profile sequence): what the cache checks."""
    generation: int
    """The dataset's bulk generation when the unit that kept this locked the subject."""
    memberships: dict[str, Membership]
    timers: dict[str, int]
    counts: dict[str, int]


def _kept_size(kept: _Kept) -> int:
    # Weighed with tracemalloc, the cache's own slot and the key included; segment ids
    # and timer targets are the catalog's strings, shared.
    return 600 + 120 * len(kept.memberships) + 80 * (len(kept.timers) + len(kept.counts))


@dataclass(slots=True)
class _Loaded:
    """A locked subject: its row as stored, and its domain state as evaluation changes it."""

    row: SubjectRow
    subject: Subject
    memberships: dict[str, Membership]
    timers: dict[str, int]
    counts: dict[str, int]
    initial: tuple[Any, ...]
    generation: int
    parsed: Any = None

    def current_view(self) -> Any:
        """The stored view, parsed once."""
        if self.parsed is None:
            self.parsed = view_from_bytes(self.row.view, self.row.subject_id)
        return self.parsed

    def state(self) -> tuple[Any, ...]:
        row = self.row
        return (
            row.sequence,
            row.view,
            row.view_time,
            row.erased,
            self.subject.account_id,
            frozenset(self.subject.rollups),
        )


@dataclass(slots=True)
class _AccountTrigger:
    keys: set[str] = field(default_factory=set)
    cause: Cause = Cause.EVENT
    event_ids: list[str] = field(default_factory=list)


class _Unit:
    """One transaction's work."""

    def __init__(self, processor: Processor, conn: asyncpg.Connection, now: int) -> None:
        self.processor = processor
        self.conn = conn
        self.now = now
        self.loaded: dict[Key, _Loaded] = {}
        self.catalogs: dict[str, Catalog] = {}
        self.changes: list[tuple[str, Change]] = []
        self.deltas: defaultdict[str, dict[tuple[str, str], int]] = defaultdict(dict)
        self.triggers: dict[tuple[str, str], _AccountTrigger] = {}
        # Membership rows changed outside a loaded subject (the bulk path of forced changes).
        self.bulk = WriteBatch()
        self.bulk_members: set[Key] = set()
        self._plain_reasons: dict[Cause, Reason] = {}
        # What the subjects hold once this unit commits, for the processor's cache.
        self.kept: list[tuple[Key, _Kept]] = []

    async def load(self, keys: Iterable[Key], *, skip_locked: bool = False) -> list[Key]:
        """Locks and reads subjects not loaded yet; returns those now loaded, in order."""
        state = self.processor.state
        wanted = [key for key in dict.fromkeys(keys) if key not in self.loaded]
        if not wanted:
            return []
        if skip_locked:
            rows = await state.try_lock(self.conn, wanted)
        else:
            rows = await state.lock(self.conn, wanted)
        found = [key for key in wanted if key in rows]
        if not found:
            return []
        cache = self.processor.cache
        kept = {key: cache.take(key, rows[key].revision) for key in found}
        datasets = {key[0] for key in found}
        unknown = datasets - self.catalogs.keys()
        missed = [key for key in found if kept[key] is None]
        stored = await state.read(self.conn, missed, datasets)
        generations = stored.generations
        stale = [
            key
            for key, copy in kept.items()
            if copy is not None and copy.generation != generations[key[0]]
        ]
        if stale:
            # Memberships were written on the bulk path since: maybe these subjects'.
            again = await state.read(self.conn, stale)
            stored.memberships.update(again.memberships)
            stored.timers.update(again.timers)
            stored.counts.update(again.counts)
            kept.update(dict.fromkeys(stale))
        for dataset in sorted(unknown):
            self.catalogs[dataset] = await self.processor.catalogs.get(
                dataset, stored.revisions[dataset]
            )
        for key in found:
            row = rows[key]
            earlier = kept[key] or _Kept(
                row.revision,
                generations[row.dataset],
                stored.memberships[key],
                stored.timers[key],
                stored.counts.get((row.dataset, row.subject_id), {}),
            )
            subject = Subject(
                dataset=row.dataset,
                kind=row.kind,
                subject_id=row.subject_id,
                view=None,
                account_id=row.account_id if row.kind is Kind.USER else None,
                memberships=dict(earlier.memberships),
                rollups=set(row.rollups),
                rollup_counts=dict(earlier.counts),
                timers=dict(earlier.timers),
            )
            loaded = _Loaded(
                row=row,
                subject=subject,
                memberships=earlier.memberships,
                timers=earlier.timers,
                counts=earlier.counts,
                initial=(),
                generation=generations[row.dataset],
            )
            loaded.initial = loaded.state()
            self.loaded[key] = loaded
        return found

    async def catalogs_of(self, datasets: set[str]) -> None:
        missing = datasets - self.catalogs.keys()
        if not missing:
            return
        revisions = await self.processor.state.catalog_revisions(self.conn, missing)
        for dataset, revision in revisions.items():
            self.catalogs[dataset] = await self.processor.catalogs.get(dataset, revision)

    def collect(
        self, dataset: str, outcome: Outcome, cause: Cause, event_ids: Sequence[str]
    ) -> None:
        self.changes.extend((dataset, change) for change in outcome.changes)
        if not outcome.rollup_deltas:
            return
        deltas = self.deltas[dataset]
        for slot, delta in outcome.rollup_deltas.items():
            deltas[slot] = deltas.get(slot, 0) + delta
            account_id, key = slot
            trigger = self.triggers.get((dataset, account_id))
            if trigger is None:
                trigger = self.triggers[(dataset, account_id)] = _AccountTrigger(cause=cause)
            trigger.keys.add(key)
            trigger.event_ids.extend(event_ids)

    def profile_change(self, key: Key, change: ProfileChange) -> None:
        loaded = self.loaded[key]
        row = loaded.row
        if change.sequence <= row.sequence:
            return
        catalog = self.catalogs[row.dataset]
        subject = loaded.subject
        event_ids = tuple(change.event_ids)
        change_time = (
            micros_from_timestamp(change.change_time)
            if change.HasField("change_time")
            else self.now
        )
        if change.type in (_ERASED, _MERGED):
            cause = Cause.ERASURE if change.type == _ERASED else Cause.MERGE
            subject.view = None
            outcome = erase(catalog, subject, now=self.now, cause=cause)
            row.view = None
            row.erased = True
            loaded.parsed = None
        else:
            cause = Cause.EVENT
            fresh = row.erased or row.view is None
            missed = row.sequence > 0 and change.sequence != row.sequence + 1
            # The profile service republishes a subject's view at the same sequence, with
            # no events and no keys, when a redelivered unit changed nothing (ADR 9). One
            # that reaches here has a sequence not seen yet: the publish it repeats was lost
            # with the keys it carried, so no key can narrow the evaluation.
            republished = not change.event_ids and not change.changed_keys
            before = Before(
                None if fresh else loaded.current_view,
                self.now,
                frozenset(subject.segment_names()),
                dict(subject.rollup_counts),
                subject.account_id,
            )
            view = change.view
            subject.view = LazyView(view, row.subject_id)
            if row.kind is Kind.USER:
                subject.account_id = view.account_id or None
            outcome = evaluate_change(
                catalog,
                subject,
                now=self.now,
                cause=cause,
                event_ids=event_ids,
                keys=None if fresh or missed or republished else change.changed_keys,
                before=before,
            )
            row.view = view.SerializeToString()
            row.erased = False
            loaded.parsed = subject.view
        row.sequence = change.sequence
        row.view_time = change_time
        self.collect(row.dataset, outcome, cause, event_ids)

    def timers(self, key: Key) -> None:
        loaded = self.loaded[key]
        due = {target: at for target, at in loaded.subject.timers.items() if at <= self.now}
        if not due:
            return
        subject = loaded.subject
        subject.view = loaded.current_view()
        catalog = self.catalogs[loaded.row.dataset]
        outcome = evaluate_timers(catalog, subject, now=self.now, due=due)
        self.collect(loaded.row.dataset, outcome, Cause.TIME, ())

    def force(
        self,
        key: Key,
        segment_id: str,
        member: bool,
        version: int,
        cause: Cause,
        recheck_after: int | None,
    ) -> None:
        loaded = self.loaded[key]
        subject = loaded.subject
        catalog = self.catalogs[loaded.row.dataset]
        view_time = loaded.row.view_time
        recheck = recheck_after is not None and view_time is not None and view_time > recheck_after
        # Parsing a view is the cost of a forced change: only when something evaluates.
        name = segment_name(loaded.row.dataset, segment_id)
        needed = (
            recheck
            or catalog.dependents(segment_id)
            or catalog.affected_rollups([segment_dependency(name)])
        )
        subject.view = loaded.current_view() if needed else None
        if recheck:
            # Changed after the backfill's query: the stored view is newer than its answer.
            segment = catalog.segments.get(segment_id)
            if segment is None or segment.rule is None:
                return
            member = segment.rule.matches(
                subject.view, self.now, subject.segment_names(), subject.rollup_counts
            )
        if member == (segment_id in subject.memberships):
            return
        outcome = apply_forced(
            catalog, subject, now=self.now, cause=cause, forced={segment_id: (member, version)}
        )
        self.collect(loaded.row.dataset, outcome, cause, ())

    def bulk_force(
        self,
        dataset: str,
        kind: Kind,
        subject_id: str,
        segment_id: str,
        version: int,
        member: bool,
        cause: Cause,
    ) -> None:
        """Records a forced change that nothing else depends on, without loading the subject
        (its row is locked by this transaction)."""
        if member:
            self.bulk.fresh_joins.append(
                (dataset, segment_id, subject_id, int(kind), version, self.now)
            )
        else:
            self.bulk.leaves.append((dataset, segment_id, subject_id))
        self.bulk_members.add((dataset, int(kind), subject_id))
        reason = self._plain_reasons.get(cause)
        if reason is None:
            reason = self._plain_reasons[cause] = Reason(cause)
        self.changes.append(
            (
                dataset,
                Change(
                    kind,
                    subject_id,
                    segment_id,
                    version,
                    ChangeKind.JOIN if member else ChangeKind.LEAVE,
                    self.now,
                    reason,
                ),
            )
        )

    def refresh_timer(self, key: Key, segment_id: str) -> None:
        loaded = self.loaded[key]
        if loaded.row.view is None:
            return
        loaded.subject.view = loaded.current_view()
        refresh_timer(self.catalogs[loaded.row.dataset], loaded.subject, segment_id, now=self.now)

    def recount(self, key: Key, rollups: Sequence[str]) -> None:
        loaded = self.loaded[key]
        if loaded.row.view is None or loaded.row.erased:
            return
        loaded.subject.view = loaded.current_view()
        outcome = recount_rollups(
            self.catalogs[loaded.row.dataset], loaded.subject, rollups, now=self.now
        )
        self.collect(loaded.row.dataset, outcome, Cause.BACKFILL, ())

    async def settle_accounts(
        self,
        own: Mapping[Key, Sequence[ProfileChange]] | None = None,
        due: Sequence[Key] = (),
    ) -> None:
        """Loads the accounts this unit affects and evaluates them: their own changes,
        their due timers, and the roll-up counts that users of theirs changed."""
        if due:
            await self.load(due, skip_locked=True)
        own = own or {}
        triggered = [(dataset, int(Kind.ACCOUNT), account) for dataset, account in self.triggers]
        await self.load([*own, *triggered])
        for (dataset, account_id), delta in self._account_deltas().items():
            counts = self.loaded[(dataset, int(Kind.ACCOUNT), account_id)].subject.rollup_counts
            for rollup, change_of_count in delta.items():
                counts[rollup] = counts.get(rollup, 0) + change_of_count
        for key, changes in own.items():
            for change in changes:
                self.profile_change(key, change)
        for key in due:
            if key in self.loaded:
                self.timers(key)
        for (dataset, account_id), trigger in sorted(self.triggers.items()):
            loaded = self.loaded[(dataset, int(Kind.ACCOUNT), account_id)]
            subject = loaded.subject
            subject.view = loaded.current_view()
            outcome = evaluate_change(
                self.catalogs[dataset],
                subject,
                now=self.now,
                cause=trigger.cause,
                event_ids=tuple(dict.fromkeys(trigger.event_ids)),
                keys=rollup_keys(trigger.keys),
                before=Before(
                    subject.view,
                    self.now,
                    frozenset(subject.segment_names()),
                    loaded.counts,
                ),
            )
            self.changes.extend((dataset, change) for change in outcome.changes)

    def _account_deltas(self) -> dict[tuple[str, str], dict[str, int]]:
        found: defaultdict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        for dataset, deltas in self.deltas.items():
            for (account_id, key), delta in deltas.items():
                found[(dataset, account_id)][key] = delta
        return found

    async def write(self) -> Committed:
        batch = WriteBatch(trace_parent=inject().get("traceparent"))
        members: set[Key] = set()
        for key, loaded in self.loaded.items():
            row, subject = loaded.row, loaded.subject
            moved = subject.memberships != loaded.memberships
            if moved:
                members.add(key)
                batch.membership_diff(
                    row.dataset, row.kind, row.subject_id, loaded.memberships, subject.memberships
                )
            if subject.timers != loaded.timers:
                moved = True
                batch.timer_diff(
                    row.dataset, row.kind, row.subject_id, loaded.timers, subject.timers
                )
            revision = row.revision
            if moved or subject.rollup_counts != loaded.counts or loaded.state() != loaded.initial:
                revision += 1
                batch.subjects.append(
                    SubjectWrite(
                        key=key,
                        sequence=row.sequence,
                        view=row.view,
                        view_time=row.view_time,
                        account_id=subject.account_id,
                        rollups=sorted(subject.rollups),
                        erased=row.erased,
                    )
                )
            # A unit that wrote on the bulk path raises its dataset's generation past the
            # one kept here: what it keeps is read again, whatever the bulk path changed.
            self.kept.append(
                (
                    key,
                    _Kept(
                        revision,
                        loaded.generation,
                        subject.memberships,
                        subject.timers,
                        subject.rollup_counts,
                    ),
                )
            )
        for dataset, deltas in self.deltas.items():
            batch.add_rollup_deltas(dataset, deltas)
        batch.fresh_joins.extend(self.bulk.fresh_joins)
        batch.leaves.extend(self.bulk.leaves)
        batch.bulk_datasets = {key[0] for key in self.bulk_members}
        members |= self.bulk_members
        encode = self.processor.encode_reason
        # Reason objects are shared by many changes (a backfill's thousands of joins share
        # one): each is encoded once. The memo holds the reasons, so their ids stay theirs.
        encoded: dict[tuple[str, int], tuple[Reason, bytes]] = {}
        changes = []
        for dataset, change in self.changes:
            reason = change.reason
            known = encoded.get((dataset, id(reason)))
            if known is None:
                known = encoded[(dataset, id(reason))] = (reason, encode(dataset, reason))
            changes.append((dataset, change, known[1]))
        batch.changes = changes
        logged = await self.processor.state.write(self.conn, batch)
        earliest = min((timer[4] for timer in batch.timers_set), default=None)
        return Committed(logged, members, earliest)


class Processor:
    """Runs evaluations in transactions.

    Args:
        pool: the PostgreSQL pool.
        state: the subject-state store.
        catalogs: compiled catalogs.
        clock: the current time, microseconds since the epoch.
        encode_reason: a reason as the bytes the log keeps.
        on_commit: called after every commit (wake subscribers, drop cached answers).
        tracer: each transaction runs in a span of it (``segment_engine evaluate``), whose
            trace context the change log keeps with the changes; no-op by default.
        meter: records how long transactions take and counts the changes they log;
            no-op by default.
        cache_bytes: about how much memory the subjects' memberships, timers and roll-up
            counts may take between transactions (0 reads them every time).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        state: StateStore,
        catalogs: Catalogs,
        *,
        clock: Callable[[], int],
        encode_reason: Callable[[str, Reason], bytes],
        on_commit: Sequence[CommitHook] = (),
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.pool = pool
        self.cache: StateCache[Key, _Kept] = StateCache(cache_bytes, _kept_size)
        self.state = state
        self.catalogs = catalogs
        self.clock = clock
        self.encode_reason = encode_reason
        self.on_commit = list(on_commit)
        self._tracer = tracer or trace.NoOpTracer()
        meter = meter or metrics.NoOpMeter(__name__)
        self._duration = meter.create_histogram(
            "audience.segment_engine.evaluation.duration",
            unit="s",
            description="Time an evaluation transaction takes, deadlock retries included.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._changes = meter.create_counter(
            "audience.segment_engine.membership.changes",
            unit="{change}",
            description="Membership changes logged, by change (join, leave) and cause.",
        )

    async def _run(self, operation: str, work: Callable[[_Unit], Awaitable[None]]) -> Committed:
        started = time.perf_counter()
        attributes = {"audience.evaluation.operation": operation}
        with self._tracer.start_as_current_span("segment_engine evaluate", attributes=attributes):
            for attempt in range(1, DEADLOCK_RETRIES + 1):
                try:
                    async with self.pool.acquire() as conn, transaction(conn):
                        unit = _Unit(self, conn, self.clock())
                        await work(unit)
                        committed = await unit.write()
                except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                    if attempt == DEADLOCK_RETRIES:
                        raise
                    _log.info("evaluation transaction lost a deadlock; running it again")
                    continue
                for key, kept in unit.kept:
                    self.cache.put(key, kept)
                self._duration.record(time.perf_counter() - started, attributes)
                self._count_changes(unit.changes)
                for hook in self.on_commit:
                    hook(committed)
                return committed
        raise AssertionError("unreachable")

    def _count_changes(self, changes: Sequence[tuple[str, Change]]) -> None:
        counted = Counter((change.change, change.reason.cause) for _, change in changes)
        for (kind, cause), count in counted.items():
            self._changes.add(count, _CHANGE_ATTRIBUTES[kind, cause])

    async def apply_changes(self, changes: Iterable[ProfileChange]) -> Committed:
        """Applies profile changes from the bus, each subject's in sequence order."""
        grouped: dict[Key, list[ProfileChange]] = {}
        for change in changes:
            if change.type not in (_UPDATED, _ERASED, _MERGED) or change.kind not in (1, 2):
                _log.warning(
                    "ignoring profile change of %s/%s with type %d and kind %d",
                    change.dataset,
                    change.profile_id,
                    change.type,
                    change.kind,
                )
                continue
            key = (change.dataset, change.kind, change.profile_id)
            grouped.setdefault(key, []).append(change)
        for group in grouped.values():
            group.sort(key=lambda c: c.sequence)
        users = [key for key in grouped if key[1] == Kind.USER]
        accounts = {key: grouped[key] for key in grouped if key[1] == Kind.ACCOUNT}

        async def work(unit: _Unit) -> None:
            await unit.load(users)
            for key in users:
                for change in grouped[key]:
                    unit.profile_change(key, change)
            await unit.settle_accounts(own=accounts)

        return await self._run("profile_changes", work)

    async def run_timers(self, keys: Sequence[Key]) -> Committed:
        """Re-evaluates the due targets of subjects that no one else holds right now."""
        users = [key for key in keys if key[1] == Kind.USER]
        accounts = [key for key in keys if key[1] == Kind.ACCOUNT]

        async def work(unit: _Unit) -> None:
            for key in await unit.load(users, skip_locked=True):
                unit.timers(key)
            await unit.settle_accounts(due=accounts)

        return await self._run("timers", work)

    async def force(
        self,
        dataset: str,
        kind: Kind,
        segment_id: str,
        version: int,
        cause: Cause,
        decisions: Mapping[str, bool],
        *,
        recheck_after: int | None = None,
    ) -> Committed:
        """Sets memberships of one segment decided elsewhere, with their cascades.

        Args:
            decisions: subject id → whether it is a member.
            recheck_after: for a backfill, the instant its query evaluated at: a subject
                whose stored view is newer is evaluated from that view instead.
        """
        ids = sorted(decisions)

        async def work(unit: _Unit) -> None:
            view_times = await self.state.lock_light(unit.conn, dataset, kind, ids)
            await unit.catalogs_of({dataset})
            catalog = unit.catalogs[dataset]
            segment = catalog.segments.get(segment_id)
            if segment is not None and segment.version != version:
                # Edited since these decisions were made: the new version's backfill decides.
                return
            name = segment_name(dataset, segment_id)
            if catalog.dependents(segment_id) or catalog.affected_rollups(
                [segment_dependency(name)]
            ):
                evaluated = ids
            else:
                # Nothing refers to the segment: a change is a membership row and a log row.
                current = await self.state.members_among(unit.conn, dataset, segment_id, ids)
                evaluated = []
                for subject_id in ids:
                    view_time = view_times.get(subject_id)
                    if (
                        recheck_after is not None
                        and view_time is not None
                        and view_time > recheck_after
                    ):
                        evaluated.append(subject_id)
                    elif decisions[subject_id] != (subject_id in current):
                        unit.bulk_force(
                            dataset,
                            kind,
                            subject_id,
                            segment_id,
                            version,
                            decisions[subject_id],
                            cause,
                        )
            keys = [(dataset, int(kind), subject_id) for subject_id in evaluated]
            await unit.load(keys)
            for key in keys:
                unit.force(key, segment_id, decisions[key[2]], version, cause, recheck_after)
            if kind is Kind.USER:
                await unit.settle_accounts()

        return await self._run("forced", work)

    async def ensure_timers(
        self, dataset: str, kind: Kind, segment_id: str, subject_ids: Sequence[str]
    ) -> Committed:
        """Sets the subjects' timers for a time-dependent segment (after its backfill)."""
        keys = [(dataset, int(kind), subject_id) for subject_id in sorted(subject_ids)]

        async def work(unit: _Unit) -> None:
            for key in await unit.load(keys):
                unit.refresh_timer(key, segment_id)

        return await self._run("set_timers", work)

    async def recount_rollups(
        self, dataset: str, user_ids: Sequence[str], rollups: Sequence[str]
    ) -> Committed:
        """Evaluates users' contributions to roll-ups (when an account segment adds them)."""
        keys = [(dataset, int(Kind.USER), user_id) for user_id in sorted(user_ids)]

        async def work(unit: _Unit) -> None:
            for key in await unit.load(keys):
                unit.recount(key, rollups)
            await unit.settle_accounts()

        return await self._run("recount_rollups", work)
