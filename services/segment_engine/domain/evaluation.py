"""Evaluation of one subject: which memberships change, why, in dependency order.

Every entry point takes a :class:`Subject` loaded under the subject's row lock, changes it
in place (memberships, roll-up contributions, timers) and returns the :class:`Outcome`: the
joins and leaves to record, and for a user the changes of its roll-up contributions to
apply to its account's counts.

Order: segments are evaluated by topological rank, so a segment is evaluated after every
segment it refers to; when a membership changes, the segments that refer to it are queued
(cause ``DEPENDENCY`` unless the change itself affected them too). Roll-ups are evaluated
last, since a user rule may refer to user segments.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.segment_engine.domain.catalog import (
    Catalog,
    CompiledRule,
    ThresholdFamily,
    rollup_dependency,
    segment_dependency,
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

__all__ = [
    "MIN_TIMER_DELAY",
    "ROLLUP_TIMER_PREFIX",
    "Before",
    "Outcome",
    "Subject",
    "apply_forced",
    "erase",
    "evaluate_change",
    "evaluate_timers",
    "recount_rollups",
    "refresh_timer",
    "rollup_keys",
]

MIN_TIMER_DELAY = 100_000
"""Microseconds. A timer is never due sooner than this after the evaluation that set it, so
a rule that keeps answering "now" cannot make the timer loop spin."""

ROLLUP_TIMER_PREFIX = "@"
"""Timer targets are segment ids, or this prefix and a roll-up key (no segment id has it)."""


@dataclass(slots=True)
class Subject:
    """A user or account as evaluation sees it; mutated by evaluation.

    Attributes:
        view: the rules package's evaluation view (an empty one for a subject never seen).
        memberships: segment id → membership.
        rollups: for a user, the keys of the roll-ups whose user rule it satisfies.
        rollup_counts: for an account, per roll-up key, how many of its users satisfy it.
        timers: target → due instant (microseconds): when time alone could change the
            answer of a time-dependent segment (or roll-up) for this subject.
    """

    dataset: str
    kind: Kind
    subject_id: str
    view: Any
    account_id: str | None = None
    memberships: dict[str, Membership] = field(default_factory=dict)
    rollups: set[str] = field(default_factory=set)
    rollup_counts: dict[str, int] = field(default_factory=dict)
    timers: dict[str, int] = field(default_factory=dict)

    def segment_names(self) -> set[str]:
        return {segment_name(self.dataset, segment_id) for segment_id in self.memberships}


class Before:
    """The state an evaluation compares against to find the clauses that flipped.

    Args:
        view: the view before, or a function returning it (called at most once, and only
            if some membership changes); None for a subject seen for the first time, for
            which every true clause flipped.
        now: the instant the state held at.
        names: the names of the segments the subject was in.
        rollup_counts: an account's roll-up counts.
        account_id: a user's account (its roll-up contributions counted there).
    """

    __slots__ = ("_load", "_view", "account_id", "names", "now", "rollup_counts")

    def __init__(
        self,
        view: Any,
        now: int,
        names: frozenset[str],
        rollup_counts: Mapping[str, int],
        account_id: str | None = None,
    ) -> None:
        self._load: Callable[[], Any] | None = view if callable(view) else None
        self._view = None if callable(view) else view
        self.now = now
        self.names = names
        self.rollup_counts = rollup_counts
        self.account_id = account_id

    @property
    def view(self) -> Any:
        if self._load is not None:
            self._view = self._load()
            self._load = None
        return self._view


@dataclass(slots=True)
class Outcome:
    """The joins and leaves of one evaluation, and for a user the changes to its
    accounts' roll-up counts, ``(account_id, rollup key) → delta``."""

    changes: list[Change] = field(default_factory=list)
    rollup_deltas: dict[tuple[str, str], int] = field(default_factory=dict)

    def extend(self, other: Outcome) -> None:
        self.changes.extend(other.changes)
        for key, delta in other.rollup_deltas.items():
            total = self.rollup_deltas.get(key, 0) + delta
            if total:
                self.rollup_deltas[key] = total
            else:
                self.rollup_deltas.pop(key, None)


class _Run:
    def __init__(
        self,
        catalog: Catalog,
        subject: Subject,
        now: int,
        cause: Cause,
        event_ids: tuple[str, ...],
        before: Before,
    ) -> None:
        self.catalog = catalog
        self.subject = subject
        self.now = now
        self.cause = cause
        self.event_ids = event_ids
        self.before = before
        self.names = subject.segment_names()
        self.outcome = Outcome()
        self._heap: list[tuple[int, str]] = []
        # Threshold families the trigger queued whole: decided before the heap.
        self._families: list[ThresholdFamily] = []
        # Segment id → the segment whose change queued it; "" when the trigger did.
        self._via: dict[str, str] = {}
        self._changed: list[str] = []
        self._old_account = before.account_id
        self._old_rollups = frozenset(subject.rollups)

    # Segments.

    def queue(self, segment_ids: Iterable[str], via: str = "") -> None:
        rank = self.catalog.rank
        known = self._via
        if not self._heap and not via:
            # The trigger's segments: sorted once (a sorted list is a heap), no pushes.
            trigger = set(segment_ids)
            for family in self.catalog.families:
                if family.members <= trigger:
                    trigger -= family.members
                    self._families.append(family)
            fresh = [(rank[i], i) for i in trigger if i not in known]
            fresh.sort()
            for _, segment_id in fresh:
                known[segment_id] = ""
            self._heap = fresh
            return
        for segment_id in segment_ids:
            queued = known.get(segment_id)
            if queued is None:
                known[segment_id] = via
                heapq.heappush(self._heap, (rank[segment_id], segment_id))
            elif queued and not via:
                known[segment_id] = via

    def run(self) -> None:
        if self._families:
            self._decide_families()
        # The hot loop of evaluation: everything it touches is a local.
        segments = self.catalog.segments
        subject = self.subject
        kind = subject.kind
        view = subject.view
        now = self.now
        names = self.names
        counts = subject.rollup_counts
        memberships = subject.memberships
        timers = subject.timers
        heap = self._heap
        via_of = self._via
        pop = heapq.heappop
        while heap:
            segment_id = pop(heap)[1]
            via = via_of.pop(segment_id)
            segment = segments[segment_id]
            rule = segment.rule
            if rule is None or segment.kind is not kind:
                continue
            result = rule.matches(view, now, names, counts)
            if rule.time_dependent:
                self._set_timer(segment_id, rule)
            elif timers:
                timers.pop(segment_id, None)
            if result != (segment_id in memberships):
                self.record(segment_id, result, Cause.DEPENDENCY if via else self.cause, via, rule)
                heap = self._heap

    def _decide_families(self) -> None:
        """Evaluates whole threshold families, each by a binary search and set operations
        (a family can be large; the subject's memberships and timers are few)."""
        subject = self.subject
        memberships = subject.memberships
        timers = subject.timers
        rank = self.catalog.rank
        flips: list[tuple[int, str, bool, CompiledRule]] = []
        for family in self._families:
            if family.kind is not subject.kind:
                continue
            holding = family.holding(subject.view, self.now, self.names, subject.rollup_counts)
            ids = family.segment_ids
            holds = ids[:holding] if family.holds_below else ids[holding:]
            current = family.members.intersection(memberships)
            for segment_id in current.symmetric_difference(holds):
                index = ids.index(segment_id)
                flips.append(
                    (rank[segment_id], segment_id, segment_id not in current, family.rules[index])
                )
            if timers:
                for segment_id in family.members.intersection(timers):
                    del timers[segment_id]
        self._families = []
        flips.sort(key=lambda flip: flip[:2])
        for _, segment_id, join, rule in flips:
            self.record(segment_id, join, self.cause, "", rule)

    def record(
        self,
        segment_id: str,
        join: bool,
        cause: Cause,
        via: str = "",
        rule: CompiledRule | None = None,
        version: int | None = None,
    ) -> None:
        subject = self.subject
        segment = self.catalog.segments.get(segment_id)
        name = segment_name(subject.dataset, segment_id)
        if version is None:
            if segment is not None:
                version = segment.version
            else:
                previous = subject.memberships.get(segment_id)
                version = previous.version if previous is not None else 0
        flipped: tuple[Any, ...] = ()
        if rule is not None:
            before = self.before
            before_mask = (
                0
                if before.view is None
                else rule.leaf_mask(before.view, before.now, before.names, before.rollup_counts)
            )
            flipped = rule.flipped_clauses(
                subject.view, self.now, self.names, subject.rollup_counts, before_mask
            )
        if join:
            subject.memberships[segment_id] = Membership(version, self.now)
            self.names.add(name)
        else:
            subject.memberships.pop(segment_id, None)
            self.names.discard(name)
        self.outcome.changes.append(
            Change(
                kind=subject.kind,
                subject_id=subject.subject_id,
                segment_id=segment_id,
                segment_version=version,
                change=ChangeKind.JOIN if join else ChangeKind.LEAVE,
                time=self.now,
                reason=Reason(
                    cause=cause,
                    event_ids=self.event_ids,
                    flipped=flipped,
                    dependency_segment=via,
                ),
            )
        )
        self._changed.append(name)
        if segment is not None:
            self.queue(self.catalog.dependents(segment_id), segment_id)

    def _set_timer(self, target_id: str, rule: CompiledRule, target: str | None = None) -> None:
        subject = self.subject
        target = target_id if target is None else target
        if not rule.time_dependent:
            subject.timers.pop(target, None)
            return
        due = rule.next_change(subject.view, self.now, self.names, subject.rollup_counts)
        if due is None:
            subject.timers.pop(target, None)
        else:
            subject.timers[target] = max(due, self.now + MIN_TIMER_DELAY)

    # Roll-ups (users only).

    def rollups(self, keys: Iterable[str] | None, extra: Iterable[str] = ()) -> None:
        subject = self.subject
        if subject.kind is not Kind.USER or not self.catalog.rollups:
            return
        if keys is None:
            targets = set(self.catalog.rollups)
        else:
            changed = [segment_dependency(name) for name in self._changed]
            targets = self.catalog.affected_rollups([*keys, *changed])
        targets.update(key for key in extra if key in self.catalog.rollups)
        for key in sorted(targets):
            rollup = self.catalog.rollups[key]
            result = rollup.rule.matches(subject.view, self.now, self.names, {})
            self._set_timer(key, rollup.rule, ROLLUP_TIMER_PREFIX + key)
            if result:
                subject.rollups.add(key)
            else:
                subject.rollups.discard(key)

    def finish(self) -> Outcome:
        subject = self.subject
        if subject.kind is Kind.USER:
            deltas = self.outcome.rollup_deltas
            old_account, new_account = self._old_account, subject.account_id
            old, new = self._old_rollups, frozenset(subject.rollups)
            if old_account != new_account:
                removed, added = old, new
            else:
                removed, added = old - new, new - old
            if old_account is not None:
                for key in removed:
                    deltas[(old_account, key)] = deltas.get((old_account, key), 0) - 1
            if new_account is not None:
                for key in added:
                    deltas[(new_account, key)] = deltas.get((new_account, key), 0) + 1
        return self.outcome


def _before_of(subject: Subject, now: int) -> Before:
    return Before(
        subject.view,
        now,
        frozenset(subject.segment_names()),
        dict(subject.rollup_counts),
        subject.account_id,
    )


def evaluate_change(
    catalog: Catalog,
    subject: Subject,
    *,
    now: int,
    cause: Cause,
    event_ids: tuple[str, ...] = (),
    keys: Iterable[str] | None,
    before: Before,
) -> Outcome:
    """Evaluates what a change of the subject can affect.

    Args:
        subject: the subject with its new view (and, for an account, its new counts).
        keys: the changed keys; None evaluates every segment (a new subject, a missed
            change, or aggregates that were re-registered).
        before: the subject's state before the change.
    """
    run = _Run(catalog, subject, now, cause, event_ids, before)
    if keys is None:
        run.queue(catalog.rule_segments[subject.kind])
        key_list: list[str] | None = None
    else:
        key_list = list(keys)
        run.queue(catalog.affected(subject.kind, key_list))
    run.run()
    run.rollups(key_list)
    return run.finish()


def evaluate_timers(
    catalog: Catalog, subject: Subject, *, now: int, due: Mapping[str, int]
) -> Outcome:
    """Re-evaluates the targets whose timers are due (cause ``TIME``).

    Args:
        due: each due target (segment id, or roll-up timer target) and its due instant.
    """
    earliest = min(due.values(), default=now)
    before = Before(
        subject.view,
        earliest - 1,
        frozenset(subject.segment_names()),
        dict(subject.rollup_counts),
        subject.account_id,
    )
    run = _Run(catalog, subject, now, Cause.TIME, (), before)
    segments = []
    rollups = []
    for target in due:
        if target.startswith(ROLLUP_TIMER_PREFIX):
            key = target.removeprefix(ROLLUP_TIMER_PREFIX)
            if key in catalog.rollups:
                rollups.append(key)
            else:
                subject.timers.pop(target, None)
        elif target in catalog.segments and catalog.segments[target].kind is subject.kind:
            segments.append(target)
        else:
            subject.timers.pop(target, None)
    run.queue(segments)
    run.run()
    run.rollups((), rollups)
    return run.finish()


def apply_forced(
    catalog: Catalog,
    subject: Subject,
    *,
    now: int,
    cause: Cause,
    forced: Mapping[str, tuple[bool, int]],
) -> Outcome:
    """Sets memberships decided elsewhere (a backfill, an import, a deletion), then
    evaluates the segments and roll-ups that refer to them.

    Args:
        forced: segment id → (whether a member, the segment version to record).
    """
    run = _Run(catalog, subject, now, cause, (), _before_of(subject, now))
    for segment_id, (member, version) in sorted(forced.items()):
        if member != (segment_id in subject.memberships):
            run.record(segment_id, member, cause, version=version)
    run.run()
    run.rollups(())
    return run.finish()


def erase(catalog: Catalog, subject: Subject, *, now: int, cause: Cause) -> Outcome:
    """Takes the subject out of every segment and every roll-up (an erasure or a merge)."""
    run = _Run(catalog, subject, now, cause, (), _before_of(subject, now))
    for segment_id in sorted(subject.memberships):
        run.record(segment_id, False, cause)
    subject.rollups.clear()
    subject.timers.clear()
    subject.account_id = None
    return run.finish()


def rollup_keys(deltas: Iterable[str]) -> list[str]:
    """The dependency keys of changed roll-up counts."""
    return [rollup_dependency(key) for key in deltas]


def refresh_timer(catalog: Catalog, subject: Subject, segment_id: str, *, now: int) -> None:
    """Sets the subject's timer for one time-dependent segment from its current view."""
    segment = catalog.segments.get(segment_id)
    if segment is None or segment.rule is None or not segment.rule.time_dependent:
        return
    due = segment.rule.next_change(
        subject.view, now, subject.segment_names(), subject.rollup_counts
    )
    if due is None:
        subject.timers.pop(segment_id, None)
    else:
        subject.timers[segment_id] = max(due, now + MIN_TIMER_DELAY)


def recount_rollups(
    catalog: Catalog, subject: Subject, keys: Iterable[str], *, now: int
) -> Outcome:
    """Evaluates a user's contribution to the given roll-ups (new ones, being backfilled)."""
    run = _Run(catalog, subject, now, Cause.BACKFILL, (), _before_of(subject, now))
    run.rollups((), keys)
    return run.finish()
