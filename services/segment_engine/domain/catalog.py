"""A dataset's segments, indexed for evaluation: which segments a change can affect, in
which order to evaluate them, and the roll-ups its account segments keep.

Dependency keys are those of the rules package (``changed_keys`` of a profile change, plus
``segment:{name}`` for a referenced segment and ``rollup:{key}`` for a roll-up count).
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict
from collections.abc import Container, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.segment_engine.domain.model import Kind, Source

__all__ = [
    "ALL_KEYS",
    "Catalog",
    "CompiledRule",
    "RollupDef",
    "SegmentDef",
    "Threshold",
    "ThresholdFamily",
    "rollup_dependency",
    "segment_dependency",
]

_log = logging.getLogger(__name__)

ALL_KEYS = "aggregates"
"""The changed key after which every segment is evaluated (aggregates re-registered or
backfilled: any aggregate may now read differently)."""


def segment_dependency(name: str) -> str:
    return f"segment:{name}"


def rollup_dependency(key: str) -> str:
    return f"rollup:{key}"


# Smaller families of threshold rules are evaluated rule by rule: a binary search over
# them saves little.
_FAMILY_SIZE = 4


@dataclass(frozen=True, slots=True)
class Threshold:
    """A rule that is one comparison of an observed number with a bound (``x >= 100``).

    Rules of one ``family`` read the same value the same way and differ only in their
    bound. ``holds_below`` says which way a rule of the family goes: true when it holds for
    bounds up to the observed value (``x >= bound``, ``x > bound``), false when it holds
    for bounds above it (``x <= bound``, ``x < bound``).
    """

    family: Hashable
    bound: float
    holds_below: bool


class CompiledRule(Protocol):
    """What the engine needs of a compiled rule (the rules adapter provides it).

    ``view`` is the rules package's evaluation view, opaque here; ``segments`` holds the
    names of the segments the subject is in; ``rollups`` the roll-up counts of an account.
    """

    @property
    def dependencies(self) -> frozenset[str]: ...
    @property
    def segments(self) -> frozenset[str]: ...
    @property
    def time_dependent(self) -> bool: ...
    @property
    def rollups(self) -> Sequence[RollupDef]: ...
    @property
    def threshold(self) -> Threshold | None:
        """The rule as a :class:`Threshold`, when it is one."""
        ...

    def matches(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> bool: ...

    def leaf_mask(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> int: ...

    def flipped_clauses(
        self,
        view: Any,
        now: int,
        segments: Container[str],
        rollups: Mapping[str, int],
        before_mask: int,
    ) -> tuple[Any, ...]:
        """Explanations, under the given state, of the clauses whose result differs from
        ``before_mask`` (a :meth:`leaf_mask` taken earlier)."""
        ...

    def next_change(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> int | None: ...


@dataclass(frozen=True, slots=True)
class RollupDef:
    """A roll-up of an account rule: a stable key and the compiled user rule it counts."""

    key: str
    rule: CompiledRule


@dataclass(frozen=True, slots=True)
class SegmentDef:
    """A segment as evaluation sees it; ``rule`` is None for an imported segment."""

    segment_id: str
    name: str
    kind: Kind
    source: Source
    version: int
    rule: CompiledRule | None


@dataclass(frozen=True, slots=True, eq=False)
class ThresholdFamily:
    """The threshold rules of one family and kind, by bound.

    Sorted by bound, the rules' answers for a subject are a run of ``holds_below`` then a
    run of its opposite, so where the first run ends is found by a binary search.
    """

    kind: Kind
    segment_ids: tuple[str, ...]
    rules: tuple[CompiledRule, ...]
    holds_below: bool
    members: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", frozenset(self.segment_ids))

    def holding(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> int:
        """How many rules, from the lowest bound, answer ``holds_below``."""
        rules, holds_below = self.rules, self.holds_below
        low, high = 0, len(rules)
        while low < high:
            middle = (low + high) // 2
            if rules[middle].matches(view, now, segments, rollups) == holds_below:
                low = middle + 1
            else:
                high = middle
        return low


class Catalog:
    """The segments of one dataset at one catalog revision, indexed.

    Args:
        dataset: the dataset id.
        revision: the revision the segments were read at; bumped by every change of a
            segment's rule, so a stale catalog is noticed inside the transaction.
        segments: every segment of the dataset.
    """

    def __init__(self, dataset: str, revision: int, segments: Iterable[SegmentDef]) -> None:
        self.dataset = dataset
        self.revision = revision
        self.segments: dict[str, SegmentDef] = {s.segment_id: s for s in segments}
        self.by_name: dict[str, SegmentDef] = {s.name: s for s in self.segments.values()}
        self.rank = _topological_ranks(self.segments.values(), self.by_name)
        by_key: dict[Kind, defaultdict[str, list[str]]] = {kind: defaultdict(list) for kind in Kind}
        unkeyed: dict[Kind, list[str]] = {kind: [] for kind in Kind}
        dependents: defaultdict[str, list[str]] = defaultdict(list)
        timed: dict[Kind, list[str]] = {kind: [] for kind in Kind}
        rules: dict[Kind, list[str]] = {kind: [] for kind in Kind}
        self.rollups: dict[str, RollupDef] = {}
        thresholds: defaultdict[
            tuple[Kind, Hashable, bool], list[tuple[float, str, CompiledRule]]
        ] = defaultdict(list)
        for segment in sorted(self.segments.values(), key=lambda s: self.rank[s.segment_id]):
            rule = segment.rule
            if rule is None:
                continue
            threshold = rule.threshold
            if threshold is not None and not rule.time_dependent:
                family = (segment.kind, threshold.family, threshold.holds_below)
                thresholds[family].append((threshold.bound, segment.segment_id, rule))
            rules[segment.kind].append(segment.segment_id)
            if not rule.dependencies:
                unkeyed[segment.kind].append(segment.segment_id)
            for key in rule.dependencies:
                by_key[segment.kind][key].append(segment.segment_id)
            for name in rule.segments:
                dependents[name].append(segment.segment_id)
            if rule.time_dependent:
                timed[segment.kind].append(segment.segment_id)
            if segment.kind is Kind.ACCOUNT:
                for rollup in rule.rollups:
                    self.rollups.setdefault(rollup.key, rollup)
        rollups_by_key: defaultdict[str, list[str]] = defaultdict(list)
        unkeyed_rollups: list[str] = []
        for rollup in self.rollups.values():
            if not rollup.rule.dependencies:
                unkeyed_rollups.append(rollup.key)
            for key in rollup.rule.dependencies:
                rollups_by_key[key].append(rollup.key)
        self._by_key = {kind: dict(index) for kind, index in by_key.items()}
        self._unkeyed = unkeyed
        self._dependents = dict(dependents)
        self._rollups_by_key = dict(rollups_by_key)
        self.rule_segments: dict[Kind, tuple[str, ...]] = {k: tuple(v) for k, v in rules.items()}
        self.time_segments: dict[Kind, tuple[str, ...]] = {k: tuple(v) for k, v in timed.items()}
        self.time_rollups: tuple[str, ...] = tuple(
            key for key, rollup in self.rollups.items() if rollup.rule.time_dependent
        )
        families = []
        for (kind, _, holds_below), members in thresholds.items():
            if len(members) >= _FAMILY_SIZE:
                members.sort(key=lambda member: member[:2])
                ids = tuple(segment_id for _, segment_id, _ in members)
                family_rules = tuple(rule for _, _, rule in members)
                families.append(ThresholdFamily(kind, ids, family_rules, holds_below))
        self.families: tuple[ThresholdFamily, ...] = tuple(families)

    def affected(self, kind: Kind, keys: Iterable[str]) -> set[str]:
        """The rule segments of ``kind`` whose dependencies meet ``keys``."""
        index = self._by_key[kind]
        found: set[str] = set()
        for key in keys:
            hits = index.get(key)
            if hits:
                found.update(hits)
        return found

    def dependents(self, segment_id: str) -> list[str]:
        """The segments whose rules refer to ``segment_id`` directly."""
        segment = self.segments.get(segment_id)
        if segment is None:
            return []
        return self._dependents.get(segment.name, [])

    def referrers(self, name: str) -> list[str]:
        """The ids of segments and roll-ups whose rules refer to the segment ``name``."""
        found = list(self._dependents.get(name, []))
        found.extend(
            f"rollup {key}" for key in self._rollups_by_key.get(segment_dependency(name), [])
        )
        return found

    def affected_rollups(self, keys: Iterable[str]) -> set[str]:
        """The roll-up keys whose user rules depend on ``keys``."""
        found: set[str] = set()
        for key in keys:
            hits = self._rollups_by_key.get(key)
            if hits:
                found.update(hits)
        return found

    def unkeyed(self, kind: Kind) -> list[str]:
        """Rule segments that no change key affects (evaluated for new subjects only)."""
        return self._unkeyed[kind]


def _topological_ranks(
    segments: Iterable[SegmentDef], by_name: Mapping[str, SegmentDef]
) -> dict[str, int]:
    """Ranks segments so that every segment comes after those its rule refers to.

    Validation refuses cycles; should one exist anyway (a race between two updates), the
    segments on it are ranked by id rather than failing every evaluation.
    """
    members = {s.segment_id: s for s in segments}
    references: dict[str, set[str]] = {}
    referrers: defaultdict[str, set[str]] = defaultdict(set)
    for segment in members.values():
        refs = set()
        if segment.rule is not None:
            for name in segment.rule.segments:
                target = by_name.get(name)
                if target is not None and target.segment_id != segment.segment_id:
                    refs.add(target.segment_id)
        references[segment.segment_id] = refs
        for ref in refs:
            referrers[ref].add(segment.segment_id)
    waiting = {segment_id: len(refs) for segment_id, refs in references.items()}
    ready = [segment_id for segment_id, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    ranks: dict[str, int] = {}
    while len(ranks) < len(members):
        if not ready:
            stuck = sorted(set(members) - set(ranks))
            _log.error("segments %s refer to each other in a cycle; ranking by id", stuck)
            ready = [stuck[0]]
            waiting[stuck[0]] = 0
        segment_id = heapq.heappop(ready)
        if segment_id in ranks:
            continue
        ranks[segment_id] = len(ranks)
        for referrer in referrers[segment_id]:
            waiting[referrer] -= 1
            if waiting[referrer] == 0 and referrer not in ranks:
                heapq.heappush(ready, referrer)
    return ranks
