"""Registered aggregates: which facts each counts, and its buckets kept exactly.

A dataset's aggregates are compiled once into an :class:`AggregateIndex`. A fact is checked
only against the aggregates of its own name, and among those, an aggregate with an
``EQUALS`` or ``IN`` filter on a top-level property is checked only when the fact's
property holds one of the filter's values (a dictionary lookup): with a thousand aggregates
a fact typically meets a handful. The compiled matcher of ``audience.rules`` always has the
last word, so the index only ever skips aggregates that could not count the fact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from audience.rules.aggregates import (
    DISTINCT_LIMIT,
    AggregateMatcher,
    BucketState,
    compile_aggregate,
)
from audience.rules.facts import Fact
from audience.rules.values import Instant, distinct_key, value_from_proto
from audience.v1 import profile_pb2, rule_pb2
from services.profile.domain.model import AggregateSeries, ProfileState, Touch

__all__ = [
    "AggregateIndex",
    "Compiled",
    "combine",
    "count_facts",
    "earliest_expiry",
    "merge_series",
    "prune",
]

_O = rule_pb2.Operator


_HASHABLE = frozenset({str, float, int, Instant})


def _hashable(value: object) -> bool:
    return type(value) in _HASHABLE


def _lookup_filter(spec: profile_pb2.AggregateSpec) -> tuple[str, list[object]] | None:
    """A top-level property and the values it must hold for the spec to count a fact."""
    for item in spec.filters:
        path = item.path
        if "." in path:
            continue
        operator = item.comparison.operator
        if operator == _O.OPERATOR_EQUALS:
            value: object = value_from_proto(item.comparison.value)
            if _hashable(value):
                return path, [value]
        elif operator == _O.OPERATOR_IN:
            values: list[object] = [
                value_from_proto(v) for v in item.comparison.value.list_value.values
            ]
            if all(_hashable(value) for value in values):
                return path, values
    return None


_COUNT = int(rule_pb2.AggregateFunction.AGGREGATE_FUNCTION_COUNT)
_SUM = int(rule_pb2.AggregateFunction.AGGREGATE_FUNCTION_SUM)


class Compiled:
    """A compiled aggregate with what counting needs at hand.

    :func:`count_facts` counts a fact straight into its bucket, without building an
    ``Observation``; the outcome equals ``accumulate``'s (the tests hold them together).
    """

    __slots__ = (
        "aggregate_id",
        "expires",
        "extract",
        "family",
        "implied",
        "matcher",
        "matches",
        "width",
    )

    def __init__(self, matcher: AggregateMatcher, implied: bool) -> None:
        self.matcher = matcher
        # Whether being a candidate of a fact (see `AggregateIndex.candidates`) already says
        # that the aggregate counts it, so its matcher need not run.
        self.implied = implied
        self.matches = matcher.matches
        self.extract = matcher.extract
        self.aggregate_id = matcher.aggregate_id
        self.width = matcher.width
        # How far back a bucket may start and still be kept; 0: forever (all-time buckets
        # never expire).
        self.expires = matcher.retention if matcher.width else 0
        # COUNT, SUM or DISTINCT_COUNT (see ``audience.rules.canonical_function``).
        self.family = matcher.function


@dataclass(slots=True)
class _NameIndex:
    always: list[Compiled]
    # property path → property value → aggregates that need that value there.
    keyed: dict[str, dict[object, list[Compiled]]]


class AggregateIndex:
    """A dataset's compiled aggregates, indexed by fact name and filter value.

    Args:
        specs: the registered specs, each with its ``aggregate_id`` and ``retention``.
        version: the catalogue version they were read at, to tell when to reload.
    """

    def __init__(self, specs: Iterable[profile_pb2.AggregateSpec], version: int = 0) -> None:
        self.version = version
        self.matchers: dict[str, AggregateMatcher] = {}
        self._by_name: dict[str, _NameIndex] = {}
        for spec in specs:
            matcher = compile_aggregate(spec)
            self.matchers[matcher.aggregate_id] = matcher
            entry = self._by_name.setdefault(spec.event_name, _NameIndex([], {}))
            found = _lookup_filter(spec)
            # A fact is a candidate by its name, and by the value of the looked-up property:
            # with no other filter and only strings to look up, that is the match itself (a
            # string key is found only by an equal string).
            implied = not spec.filters or (
                len(spec.filters) == 1
                and found is not None
                and all(type(value) is str for value in found[1])
            )
            compiled = Compiled(matcher, implied)
            if found is None:
                entry.always.append(compiled)
                continue
            path, values = found
            table = entry.keyed.setdefault(path, {})
            for value in values:
                table.setdefault(value, []).append(compiled)

    def __len__(self) -> int:
        return len(self.matchers)

    def names(self) -> set[str]:
        """The fact names some aggregate counts."""
        return set(self._by_name)

    def candidates(self, fact: Fact) -> Sequence[Compiled]:
        """The aggregates that may count ``fact``: a superset of those that do."""
        entry = self._by_name.get(fact.name)
        if entry is None:
            return ()
        if not entry.keyed:
            return entry.always
        found = list(entry.always)
        properties = fact.properties
        for path, table in entry.keyed.items():
            value = properties.get(path)
            if type(value) in _HASHABLE:
                more = table.get(value)
                if more:
                    found += more
        return found


def _pick_min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def _pick_max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


def _first(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _last(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def combine(a: BucketState, b: BucketState) -> BucketState:
    """Two buckets of the same aggregate and start as one: what a merge of profiles does.

    Counts and sums add, min/max/first/last combine, distinct values unite (the first
    bucket's values first, at most ``DISTINCT_LIMIT``).
    """
    distinct = a.distinct_values
    if b.distinct_values:
        seen = set(distinct)
        extra = [value for value in b.distinct_values if value not in seen]
        distinct = (distinct + tuple(extra))[:DISTINCT_LIMIT]
    return BucketState(
        a.start,
        a.count + b.count,
        a.sum + b.sum,
        _pick_min(a.min, b.min),
        _pick_max(a.max, b.max),
        _first(a.first_time, b.first_time),
        _last(a.last_time, b.last_time),
        distinct,
    )


def merge_series(
    target: dict[str, AggregateSeries], source: Mapping[str, AggregateSeries], touch: Touch
) -> None:
    """Adds the source's buckets into the target's, recording what to write."""
    for aggregate_id, series in source.items():
        mine = target.get(aggregate_id)
        if mine is None:
            mine = target[aggregate_id] = AggregateSeries()
        for start, bucket in series.buckets.items():
            existing = mine.buckets.get(start)
            mine.put(bucket if existing is None else combine(existing, bucket))
        touch.aggregates.add(aggregate_id)


def count_facts(
    state: ProfileState,
    facts: Sequence[Fact],
    index: AggregateIndex,
    touch: Touch,
    now: int,
) -> None:
    """Counts facts into the profile's aggregates, as ``accumulate`` would.

    A fact older than an aggregate's retention is not counted: its bucket would be pruned
    at once.
    """
    aggregates = state.aggregates
    expire = state.expire
    changed = touch.aggregates
    for fact in facts:
        moment = fact.timestamp
        for compiled in index.candidates(fact):
            if not compiled.implied and not compiled.matches(fact):
                continue
            family = compiled.family
            value = 0.0
            key = ""
            if family != _COUNT:
                raw = compiled.extract(fact)
                if family == _SUM:
                    if type(raw) is not float and type(raw) is not int:
                        continue
                    value = float(raw)
                    if value - value != 0.0:
                        continue
                else:
                    found = distinct_key(raw)
                    if found is None:
                        continue
                    key = found
            width = compiled.width
            start = moment - moment % width if width else 0
            expires = compiled.expires
            if expires:
                if start + expires < now:
                    continue
                if expire is None or start + expires < expire:
                    expire = start + expires
            aggregate_id = compiled.aggregate_id
            series = aggregates.get(aggregate_id)
            old = None if series is None else series.buckets.get(start)
            if old is None:
                if family == _COUNT:
                    bucket = BucketState(start, 1, 0.0, None, None, moment, moment)
                elif family == _SUM:
                    bucket = BucketState(start, 1, value, value, value, moment, moment)
                else:
                    bucket = BucketState(start, 1, 0.0, None, None, moment, moment, (key,))
            else:
                first, last = old.first_time, old.last_time
                total, low, high, keys = old.sum, old.min, old.max, old.distinct_values
                if family == _SUM:
                    total += value
                    if low is None or value < low:
                        low = value
                    if high is None or value > high:
                        high = value
                elif family != _COUNT and key not in keys and len(keys) < DISTINCT_LIMIT:
                    keys += (key,)
                bucket = BucketState(
                    start,
                    old.count + 1,
                    total,
                    low,
                    high,
                    moment if first is None or moment < first else first,
                    moment if last is None or moment > last else last,
                    keys,
                )
            if series is None:
                # Most matches in a young profile start its series: made with its bucket.
                aggregates[aggregate_id] = AggregateSeries({start: bucket})
            else:
                series.put(bucket)
            changed.add(aggregate_id)
    state.expire = expire


def _retention(index: AggregateIndex, aggregate_id: str) -> int:
    """How long the aggregate's buckets are kept; 0: forever (all-time or unknown ones)."""
    matcher = index.matchers.get(aggregate_id)
    if matcher is None or not matcher.width:
        return 0
    return matcher.retention


def earliest_expiry(aggregates: Mapping[str, AggregateSeries], index: AggregateIndex) -> int | None:
    """When the first of these buckets expires, by the retentions of ``index``."""
    expire: int | None = None
    for aggregate_id, series in aggregates.items():
        retention = _retention(index, aggregate_id)
        if retention and series.buckets:
            first = min(series.buckets) + retention
            if expire is None or first < expire:
                expire = first
    return expire


def prune(state: ProfileState, index: AggregateIndex, touch: Touch, now: int) -> None:
    """Drops buckets that start before ``now - retention`` and sets ``state.expire`` to when
    the next one does. An all-time aggregate (width 0) has one bucket, which never expires.
    """
    for aggregate_id in list(state.aggregates):
        retention = _retention(index, aggregate_id)
        if not retention:
            continue
        series = state.aggregates[aggregate_id]
        for start in [start for start in series.buckets if start + retention < now]:
            series.drop(start)
            touch.removed.add((aggregate_id, start))
        if not series.buckets:
            del state.aggregates[aggregate_id]
    state.expire = earliest_expiry(state.aggregates, index)
