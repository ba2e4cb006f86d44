"""Aggregates: the time-bucketed statistics that windowed conditions read.

Every windowed condition (behaviour, campaign, affinity) compiles to an ``AggregateSpec``
that the profile service maintains per profile as sparse time buckets, and that both
evaluators read: the Python predicate from the evaluation view, the SQL predicate from the
``aggregates`` column of ``profiles``, a JSON document written by :func:`aggregates_json`.

**Statistics kept.** A spec's ``function`` is canonical: ``COUNT`` keeps count and first
and last time (for the count, first-time and last-time functions); ``SUM`` keeps count,
sum, min and max of a numeric property, and counts only facts that have one (for sum, min,
max and average); ``DISTINCT_COUNT`` keeps the property's distinct values (at most 1,000
per bucket; further values of a full bucket are not kept) and counts only facts that have
a scalar one. So one aggregate serves every function of its family.

**Buckets.** A bucket starts at a multiple of its width since the Unix epoch; width 0
means one bucket, starting at the epoch, for all time. The width per window (so that a
window is exact to its width):

============================  ==============================================  ===========
Window                        Width                                           Retention
============================  ==============================================  ===========
all time                      0 (one bucket)                                  forever
this session                  1 second                                        2 days
last D                        the largest of 1 s, 1 min, 1 h, 1 d not above   D + width
                              D / 100 (1 s at least)
between S and E               the largest of 1 d, 1 h, 1 min, 1 s dividing    forever
                              both S and E (validation asks whole seconds)
============================  ==============================================  ===========

**Windows over buckets.** A window reads the buckets whose *start* lies in it:

- all time: every bucket;
- between S and E: ``S <= start < E`` — exact, as the width divides both ends;
- last D: ``bucket_start(now - D) <= start <= now`` — the bucket holding ``now - D`` counts
  whole, so the window reaches back at most one width further than D;
- this session: ``session_start - 1 s < start <= now`` — from the second the visit began
  (nothing when there is no visit).
"""

from __future__ import annotations

import hashlib
import json
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from google.protobuf import duration_pb2, json_format

from audience.rules.compare import FieldType, Namespace, Var, comparison_operand, test_source
from audience.rules.facts import Fact
from audience.rules.values import (
    AttrValue,
    distinct_key,
    micros_from_timestamp,
    timestamp_from_micros,
)
from audience.v1 import profile_pb2, rule_pb2

__all__ = [
    "DAY",
    "DISTINCT_LIMIT",
    "HOUR",
    "MINUTE",
    "SECOND",
    "AggregateMatcher",
    "BucketState",
    "Observation",
    "Series",
    "WindowPlan",
    "accumulate",
    "aggregate_id",
    "aggregates_json",
    "bucket_from_json",
    "bucket_json",
    "bucket_start",
    "canonical_function",
    "canonical_spec",
    "compile_aggregate",
    "document_json",
    "plan_window",
    "series_from_buckets",
    "series_from_proto",
    "series_json",
    "window_average",
    "window_count",
    "window_distinct",
    "window_first",
    "window_last",
    "window_max",
    "window_min",
    "window_sum",
]

SECOND = 1_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
_WIDTHS = (DAY, HOUR, MINUTE, SECOND)
SESSION_RETENTION = 2 * DAY
DISTINCT_LIMIT = 1000

_F = rule_pb2.AggregateFunction
_NUMERIC_FUNCTIONS = frozenset(
    {
        _F.AGGREGATE_FUNCTION_SUM,
        _F.AGGREGATE_FUNCTION_MIN,
        _F.AGGREGATE_FUNCTION_MAX,
        _F.AGGREGATE_FUNCTION_AVERAGE,
    }
)


def bucket_start(timestamp: int, width: int) -> int:
    """The start of the bucket holding ``timestamp`` (microseconds); 0 for width 0."""
    if width == 0:
        return 0
    return timestamp - timestamp % width


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """A window resolved to its kind, bucket width and retention (microseconds)."""

    kind: str  # "all_time", "this_session", "last" or "between"
    width: int
    retention: int  # 0: forever
    duration: int = 0  # for "last"
    start: int = 0  # for "between", inclusive
    end: int = 0  # for "between", exclusive


def _duration_micros(duration: duration_pb2.Duration) -> int:
    return duration.seconds * SECOND + duration.nanos // 1000


def plan_window(window: rule_pb2.Window) -> WindowPlan:
    """The bucket width and retention of a (validated) window; see the module's table."""
    kind = window.WhichOneof("window")
    if kind == "last":
        duration = _duration_micros(window.last)
        width = next((w for w in _WIDTHS if w * 100 <= duration), SECOND)
        return WindowPlan("last", width, duration + width, duration=duration)
    if kind == "between":
        start = micros_from_timestamp(window.between.start_time)
        end = micros_from_timestamp(window.between.end_time)
        width = next((w for w in _WIDTHS if start % w == 0 and end % w == 0), 1)
        return WindowPlan("between", width, 0, start=start, end=end)
    if kind == "this_session":
        return WindowPlan("this_session", SECOND, SESSION_RETENTION)
    return WindowPlan("all_time", 0, 0)


def canonical_function(function: int) -> int:
    """The aggregate family that serves ``function`` (see the module docstring)."""
    if function in _NUMERIC_FUNCTIONS:
        return _F.AGGREGATE_FUNCTION_SUM
    if function == _F.AGGREGATE_FUNCTION_DISTINCT_COUNT:
        return _F.AGGREGATE_FUNCTION_DISTINCT_COUNT
    return _F.AGGREGATE_FUNCTION_COUNT


def _canonical_json(message: Any) -> str:
    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True),
        sort_keys=True,
        separators=(",", ":"),
    )


def canonical_spec(spec: profile_pb2.AggregateSpec) -> profile_pb2.AggregateSpec:
    """The spec in canonical form: function family, filters sorted, id and retention clear."""
    function = canonical_function(spec.function)
    filters = sorted(spec.filters, key=_canonical_json)
    out = profile_pb2.AggregateSpec(
        event_name=spec.event_name,
        filters=filters,
        function=rule_pb2.AggregateFunction.ValueType(function),
        property=spec.property if function != _F.AGGREGATE_FUNCTION_COUNT else "",
    )
    out.bucket_width.CopyFrom(spec.bucket_width)
    return out


def aggregate_id(spec: profile_pb2.AggregateSpec) -> str:
    """A stable id of the spec: a hash of its canonical form, retention left out."""
    digest = hashlib.sha256(_canonical_json(canonical_spec(spec)).encode()).hexdigest()
    return "agg_" + digest[:24]


def make_spec(
    event_name: str,
    filters: Iterable[rule_pb2.PropertyFilter],
    function: int,
    property_path: str,
    plan: WindowPlan,
) -> profile_pb2.AggregateSpec:
    """The canonical spec, with its id and retention, for a condition's aggregate."""
    spec = profile_pb2.AggregateSpec(
        event_name=event_name,
        filters=list(filters),
        function=rule_pb2.AggregateFunction.ValueType(function),
        property=property_path,
    )
    spec.bucket_width.FromMicroseconds(plan.width)
    spec = canonical_spec(spec)
    spec.aggregate_id = aggregate_id(spec)
    spec.retention.FromMicroseconds(plan.retention)
    return spec


# --- Reading: a profile's buckets of one aggregate, by column, oldest first. ---


class Series:
    """The buckets of one aggregate for one profile, by column, sorted by start."""

    __slots__ = ("counts", "distincts", "firsts", "lasts", "maxs", "mins", "starts", "sums")

    def __init__(
        self,
        starts: list[int],
        counts: list[int],
        sums: list[float],
        mins: list[float | None],
        maxs: list[float | None],
        firsts: list[int | None],
        lasts: list[int | None],
        distincts: list[tuple[str, ...]],
    ) -> None:
        self.starts = starts
        self.counts = counts
        self.sums = sums
        self.mins = mins
        self.maxs = maxs
        self.firsts = firsts
        self.lasts = lasts
        self.distincts = distincts

    def __len__(self) -> int:
        return len(self.starts)

    def buckets(self) -> list[BucketState]:
        return [
            BucketState(
                self.starts[i],
                self.counts[i],
                self.sums[i],
                self.mins[i],
                self.maxs[i],
                self.firsts[i],
                self.lasts[i],
                self.distincts[i],
            )
            for i in range(len(self.starts))
        ]


class BucketState(NamedTuple):
    """One bucket's statistics (mirrors ``AggregateBucket``); times in microseconds.

    A named tuple: the profile service makes several per event, and a tuple is made at a
    fraction of a frozen dataclass's cost.
    """

    start: int
    # The statistic's name, though it hides the tuple's method of the same name.
    count: int  # type: ignore[assignment]
    sum: float
    min: float | None
    max: float | None
    first_time: int | None
    last_time: int | None
    distinct_values: tuple[str, ...] = ()

    def to_proto(self) -> profile_pb2.AggregateBucket:
        bucket = profile_pb2.AggregateBucket(
            start_time=timestamp_from_micros(self.start),
            count=self.count,
            sum=self.sum,
            distinct_values=self.distinct_values,
        )
        if self.min is not None:
            bucket.min = self.min
        if self.max is not None:
            bucket.max = self.max
        if self.first_time is not None:
            bucket.first_time.CopyFrom(timestamp_from_micros(self.first_time))
        if self.last_time is not None:
            bucket.last_time.CopyFrom(timestamp_from_micros(self.last_time))
        return bucket


def series_from_buckets(buckets: Iterable[BucketState]) -> Series:
    ordered = sorted(buckets, key=lambda bucket: bucket.start)
    return Series(
        [b.start for b in ordered],
        [b.count for b in ordered],
        [b.sum for b in ordered],
        [b.min for b in ordered],
        [b.max for b in ordered],
        [b.first_time for b in ordered],
        [b.last_time for b in ordered],
        [b.distinct_values for b in ordered],
    )


def series_from_proto(value: profile_pb2.AggregateValue) -> Series:
    return series_from_buckets(
        BucketState(
            micros_from_timestamp(b.start_time),
            b.count,
            b.sum,
            b.min if b.HasField("min") else None,
            b.max if b.HasField("max") else None,
            micros_from_timestamp(b.first_time) if b.HasField("first_time") else None,
            micros_from_timestamp(b.last_time) if b.HasField("last_time") else None,
            tuple(b.distinct_values),
        )
        for b in value.buckets
    )


def _span(series: Series, low: int, high: int) -> tuple[int, int]:
    starts = series.starts
    return bisect_left(starts, low), bisect_right(starts, high)


# Each reads the buckets with low <= start <= high; ``series`` None is an empty aggregate.


def window_count(series: Series | None, low: int, high: int) -> int:
    if series is None:
        return 0
    starts = series.starts
    i, j = bisect_left(starts, low), bisect_right(starts, high)
    if j - i == 1:
        return series.counts[i]
    return sum(series.counts[i:j])


def window_sum(series: Series | None, low: int, high: int) -> float:
    # Added one by one, oldest first, as SQL's `sum(... ORDER BY bucket_start)` does: float
    # addition is not associative and both evaluators must agree to the last bit.
    total = 0.0
    if series is None:
        return total
    i, j = _span(series, low, high)
    for value in series.sums[i:j]:
        total += value
    return total


def window_average(series: Series | None, low: int, high: int) -> float | None:
    if series is None:
        return None
    count = window_count(series, low, high)
    if count == 0:
        return None
    return window_sum(series, low, high) / count


def _extreme(
    values: Sequence[Any], pick: Callable[[Iterable[Any]], Any], i: int, j: int
) -> Any | None:
    present = [value for value in values[i:j] if value is not None]
    return pick(present) if present else None


def window_min(series: Series | None, low: int, high: int) -> float | None:
    if series is None:
        return None
    i, j = _span(series, low, high)
    result: float | None = _extreme(series.mins, min, i, j)
    return result


def window_max(series: Series | None, low: int, high: int) -> float | None:
    if series is None:
        return None
    i, j = _span(series, low, high)
    result: float | None = _extreme(series.maxs, max, i, j)
    return result


def window_first(series: Series | None, low: int, high: int) -> int | None:
    if series is None:
        return None
    i, j = _span(series, low, high)
    result: int | None = _extreme(series.firsts, min, i, j)
    return result


def window_last(series: Series | None, low: int, high: int) -> int | None:
    if series is None:
        return None
    i, j = _span(series, low, high)
    result: int | None = _extreme(series.lasts, max, i, j)
    return result


def window_distinct(series: Series | None, low: int, high: int) -> int:
    if series is None:
        return 0
    i, j = _span(series, low, high)
    if j - i == 1:
        return len(series.distincts[i])
    seen: set[str] = set()
    for values in series.distincts[i:j]:
        seen.update(values)
    return len(seen)


def window_next_change(
    series: Series | None,
    low: int,
    now: int,
    plan: WindowPlan,
    entering: bool = True,
    leaving: bool = True,
) -> int | None:
    """The next instant after ``now`` at which the buckets a window reads change by time alone.

    For ``last D``: when the oldest counted bucket leaves (``start + width + D``), or when a
    bucket that starts after ``now`` comes in. For this session: only the latter. All-time and
    between windows do not move. A caller that knows only one of the two can change its
    answer passes False for the other (``entering``: a bucket comes in; ``leaving``: the
    oldest goes).
    """
    if series is None or plan.kind in ("all_time", "between"):
        return None
    starts = series.starts
    candidates: list[int] = []
    after = bisect_right(starts, now)
    if entering and after < len(starts):
        candidates.append(starts[after])
    if leaving and plan.kind == "last":
        oldest = bisect_left(starts, low)
        if oldest < after:
            candidates.append(starts[oldest] + plan.width + plan.duration)
    return min(candidates) if candidates else None


# --- Storing: the `aggregates` column of `profiles`, which the SQL predicates read. ---
#
# {"<aggregate_id>": [[start, count, sum, min, max, first_time, last_time(, [distinct])],
# …], …}: instants in integer microseconds, an unknown min, max or time null, the distinct
# values only when there are some. Numbers are written as Python's repr, the shortest text
# that reads back as the same double; PostgreSQL keeps a JSON number as that decimal and
# gives the same text back, so `(v ->> 2)::float8` in SQL is the very double Python holds.
# JSON has no infinities: a sum that overflowed is written as a string float8 also reads.

_NON_FINITE = {math.inf: '"Infinity"', -math.inf: '"-Infinity"'}


def _json_float(value: float) -> str:
    if value - value == 0.0:
        return repr(value)
    return _NON_FINITE.get(value, '"NaN"')


def bucket_json(bucket: BucketState) -> str:
    """The JSON text of one bucket in the ``aggregates`` column."""
    start, count, total, low, high, first, last, distinct = bucket
    text = (
        f"[{start},{count},{repr(total) if total - total == 0.0 else _json_float(total)},"
        f"{'null' if low is None else _json_float(low)},"
        f"{'null' if high is None else _json_float(high)},"
        f"{'null' if first is None else first},{'null' if last is None else last}"
    )
    if distinct:
        return text + "," + json.dumps(list(distinct), ensure_ascii=False) + "]"
    return text + "]"


# Aggregate ids as JSON strings, by id (the registered ones); cleared when it grows too big.
_QUOTED: dict[str, str] = {}


def series_json(aggregate_id: str, buckets: Iterable[str]) -> str:
    """One aggregate's member of the document: ``buckets`` are :func:`bucket_json` texts,
    in start order."""
    quoted = _QUOTED.get(aggregate_id)
    if quoted is None:
        if len(_QUOTED) >= 100_000:
            _QUOTED.clear()
        quoted = _QUOTED[aggregate_id] = json.dumps(aggregate_id)
    return quoted + ":[" + ",".join(buckets) + "]"


def document_json(series: Iterable[str]) -> str:
    """The ``aggregates`` document of :func:`series_json` members (one per aggregate)."""
    return "{" + ",".join(series) + "}"


def aggregates_json(aggregates: Mapping[str, Series]) -> str:
    """The ``aggregates`` column of a subject with these (non-empty) aggregates."""
    return document_json(
        series_json(aggregate, (bucket_json(bucket) for bucket in series.buckets()))
        for aggregate, series in sorted(aggregates.items())
        if len(series)
    )


def bucket_from_json(item: Sequence[Any]) -> BucketState:
    """A bucket of the ``aggregates`` column, as ``json.loads`` reads it (jsonb gives a whole
    number back without its fraction, so floats are made floats again)."""
    low, high = item[3], item[4]
    return BucketState(
        item[0],
        item[1],
        float(item[2]),
        None if low is None else float(low),
        None if high is None else float(high),
        item[5],
        item[6],
        tuple(item[7]) if len(item) > 7 else (),
    )


# --- Writing: what the profile service calls to maintain aggregates exactly. ---


@dataclass(frozen=True, slots=True)
class Observation:
    """A fact as an aggregate counts it: which bucket, when, and what value."""

    bucket_start: int
    timestamp: int
    # The numeric value (SUM family), else None.
    value: float | None = None
    # The distinct-value key (DISTINCT_COUNT family), else None.
    distinct: str | None = None


def accumulate(bucket: BucketState | None, observation: Observation) -> BucketState:
    """The bucket after adding one observation (``bucket`` None: a new bucket)."""
    value = observation.value
    distinct: tuple[str, ...] = ()
    if observation.distinct is not None:
        distinct = (observation.distinct,)
    if bucket is None:
        return BucketState(
            observation.bucket_start,
            1,
            value if value is not None else 0.0,
            value,
            value,
            observation.timestamp,
            observation.timestamp,
            distinct,
        )
    if distinct and distinct[0] not in bucket.distinct_values:
        if len(bucket.distinct_values) < DISTINCT_LIMIT:
            distinct = bucket.distinct_values + distinct
        else:
            distinct = bucket.distinct_values
    else:
        distinct = bucket.distinct_values
    return bucket._replace(
        count=bucket.count + 1,
        sum=bucket.sum + value if value is not None else bucket.sum,
        min=_pick(min, bucket.min, value),
        max=_pick(max, bucket.max, value),
        first_time=_pick(min, bucket.first_time, observation.timestamp),
        last_time=_pick(max, bucket.last_time, observation.timestamp),
        distinct_values=distinct,
    )


def _pick(choose: Callable[[Any, Any], Any], old: Any, new: Any) -> Any:
    if old is None:
        return new
    if new is None:
        return old
    return choose(old, new)


class AggregateMatcher:
    """A compiled ``AggregateSpec``: which facts it counts, in which bucket, with what value."""

    def __init__(
        self,
        spec: profile_pb2.AggregateSpec,
        matches: Callable[[Fact], bool],
        extract: Callable[[Fact], AttrValue],
    ) -> None:
        self.spec = spec
        self.aggregate_id = spec.aggregate_id or aggregate_id(spec)
        self.function = canonical_function(spec.function)
        self.width = _duration_micros(spec.bucket_width)
        self.retention = _duration_micros(spec.retention)
        self.matches = matches
        # The value the aggregate reads of a fact (its ``property``), for SUM and
        # DISTINCT_COUNT.
        self.extract = extract

    def observe(self, fact: Fact) -> Observation | None:
        """The observation of ``fact``, or None when the aggregate does not count it."""
        if not self.matches(fact):
            return None
        start = bucket_start(fact.timestamp, self.width)
        if self.function == _F.AGGREGATE_FUNCTION_COUNT:
            return Observation(start, fact.timestamp)
        raw = self.extract(fact)
        if self.function == _F.AGGREGATE_FUNCTION_SUM:
            if type(raw) not in (float, int) or not math.isfinite(raw):  # type: ignore[arg-type]
                return None
            return Observation(start, fact.timestamp, value=float(raw))  # type: ignore[arg-type]
        key = distinct_key(raw)
        if key is None:
            return None
        return Observation(start, fact.timestamp, distinct=key)


def _reader(path: str, ns: Namespace, fact: str) -> str:
    keys = tuple(path.split("."))
    if keys[0] == "context":
        source, keys = f"{fact}.context", keys[1:]
    else:
        source = f"{fact}.properties"
    if len(keys) == 1:
        return f"{source}.get({ns.const(keys[0])})"
    return f"_lookup({source}, {ns.const(keys)})"


def filter_source(
    filters: Iterable[rule_pb2.PropertyFilter], ns: Namespace, fact: str
) -> list[str]:
    """Python tests of property filters over the fact named ``fact``."""
    parts = []
    for item in filters:
        operator, value = comparison_operand(item.comparison)
        var = Var(ns.fresh("_f"), _reader(item.path, ns, fact))
        parts.append(f"({test_source(operator, value, var, FieldType.ANY, ns)})")
    return parts


def compile_aggregate(spec: profile_pb2.AggregateSpec) -> AggregateMatcher:
    """Compiles a spec for the profile service: ``observe(fact)`` feeds ``accumulate``."""
    ns = Namespace()
    tests = [f"f.name == {ns.const(spec.event_name)}"]
    tests += filter_source(spec.filters, ns, "f")
    source = "def _matches(f):\n    return " + " and ".join(tests) + "\n"
    if spec.property:
        source += f"def _extract(f):\n    return {_reader(spec.property, ns, 'f')}\n"
    else:
        source += "def _extract(f):\n    return None\n"
    code = compile(source, "<aggregate>", "exec")
    exec(code, ns.values)
    return AggregateMatcher(spec, ns.values["_matches"], ns.values["_extract"])
