"""Compilation of a rule, once per rule version, into everything that evaluates it.

Each condition kind is one class below that writes both targets: a Python expression (the
predicate is generated source, compiled once, so it runs about as fast as a hand-written
lambda; every value in it is a constant from a namespace, never spliced text) and a SQL
expression (every value a bound parameter). Keeping both forms of a condition side by side
is what keeps them in agreement; the differential tests check that they do.

Evaluation inputs besides the view:

- ``now``: the instant of evaluation, microseconds since the epoch (never read from the
  clock inside a predicate);
- ``segments``: the names of the segments the subject is in (rule-based or imported);
- ``rollups``: for an account rule, per roll-up key, how many of the account's users satisfy
  the roll-up's user rule (a key that is absent counts 0).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from audience.rules import aggregates as agg
from audience.rules.compare import FieldType, Namespace, Var, comparison_operand, test_source
from audience.rules.facts import (
    CAMPAIGN_INTERACTION,
    FACT_SOURCES,
    PRODUCT_ADDED,
    PRODUCT_PURCHASED,
    PRODUCT_VIEW,
)
from audience.rules.sql import ImportedMembers, SqlContext, SqlQuery, SqlSegment, sql_test
from audience.rules.text import (
    format_rule,
    format_value,
)
from audience.rules.validate import validate_rule
from audience.rules.values import (
    AttrValue,
    timestamp_from_micros,
    value_to_proto,
)
from audience.rules.view import View
from audience.v1 import common_pb2, event_pb2, profile_pb2, rule_pb2, segment_pb2

__all__ = [
    "EMPTY_ROLLUPS",
    "NO_SEGMENTS",
    "CompiledRule",
    "Predicate",
    "Rollup",
    "Threshold",
    "compile_rule",
    "random_bucket",
    "rollup_key",
]

Predicate = Callable[[View, int, Container[str], Mapping[str, int]], bool]

NO_SEGMENTS: frozenset[str] = frozenset()
EMPTY_ROLLUPS: Mapping[str, int] = {}

_O = rule_pb2.Operator
_F = rule_pb2.AggregateFunction
_S = rule_pb2.SessionField
_C = rule_pb2.ContextField
_USER = segment_pb2.SEGMENT_KIND_USER
_ACCOUNT = segment_pb2.SEGMENT_KIND_ACCOUNT
_KIND_NAMES: Mapping[int, str] = {_USER: "user", _ACCOUNT: "account"}

EARTH_RADIUS_KM = 6371.0088
_RADIANS = math.pi / 180.0
# Sines below this are taken as 0 in both evaluators: squaring a smaller one underflows,
# which PostgreSQL reports as an error rather than rounding to 0.
_TINY = 1e-100
# Lifetime values below this count as 0 (see _average_order_value).
_TINY_VALUE = 1e-300
# Bounds for "all time": before and after every instant a timestamptz can hold.
_LOWEST = -(2**62)
_HIGHEST = 2**62

_ARGS = "v, now, segs, rollups"
# The window functions whose value only grows as buckets come into the window.
_GROWING = frozenset({_F.AGGREGATE_FUNCTION_COUNT, _F.AGGREGATE_FUNCTION_DISTINCT_COUNT})
_RISING = frozenset({_O.OPERATOR_GREATER_THAN, _O.OPERATOR_GREATER_THAN_OR_EQUAL})
_ORDERED = frozenset(
    {
        _O.OPERATOR_GREATER_THAN,
        _O.OPERATOR_GREATER_THAN_OR_EQUAL,
        _O.OPERATOR_LESS_THAN,
        _O.OPERATOR_LESS_THAN_OR_EQUAL,
    }
)


# --- Runtime helpers the generated code calls. ---


def _days_since(moment: int | None, now: int) -> int | None:
    return None if moment is None else (now - moment) // agg.DAY


def _days_timer(moment: int | None, now: int) -> int | None:
    if moment is None:
        return None
    return moment + ((now - moment) // agg.DAY + 1) * agg.DAY


def _average_order_value(view: View) -> float | None:
    if view.order_count <= 0:
        return None
    value = view.lifetime_value
    # A quotient that underflows is an error in PostgreSQL: such a value counts as 0 in both.
    return (0.0 if -_TINY_VALUE < value < _TINY_VALUE else value) / view.order_count


def _flush(value: float) -> float:
    return 0.0 if -_TINY < value < _TINY else value


def _haversine(
    latitude: float | None,
    longitude: float | None,
    center_latitude: float,
    center_cosine: float,
    center_longitude: float,
) -> float | None:
    """The haversine of the central angle to the centre (``sin²(d / 2R)``), or None.

    Written step for step as the SQL form, so that both round identically. Coordinates and
    sines below ``_TINY`` count as 0: a product or quotient that underflows is an error in
    PostgreSQL, where Python rounds it to 0.
    """
    if latitude is None or longitude is None:
        return None
    north = _flush(math.sin((_flush(latitude) * _RADIANS - center_latitude) / 2.0))
    east = _flush(math.sin((_flush(longitude) * _RADIANS - center_longitude) / 2.0))
    cosine = math.cos(_flush(latitude) * _RADIANS)
    return north * north + cosine * center_cosine * east * east


def _distance_km(haversine: float) -> float:
    return 2.0 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, haversine)))


@functools.lru_cache(maxsize=65_536)
def random_bucket(salt: str, profile_id: str) -> int:
    """The profile's bucket, 0–99: the first 28 bits of ``md5(salt:profile_id)``, mod 100."""
    digest = hashlib.md5(f"{salt}:{profile_id}".encode(), usedforsecurity=False).hexdigest()
    return int(digest[:7], 16) % 100


def _session_low(session_start: int | None, now: int) -> int:
    # Buckets after the second the visit began; none at all without a visit.
    return now + 1 if session_start is None else session_start - agg.SECOND + 1


def rollup_key(user_rule: rule_pb2.Rule) -> str:
    """The stable key of a roll-up's user rule: a hash of its canonical JSON."""
    canonical = json.dumps(
        json_format.MessageToDict(user_rule, preserving_proto_field_name=True),
        sort_keys=True,
        separators=(",", ":"),
    )
    return "rollup_" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


# --- Conditions. ---


@dataclass(frozen=True, slots=True)
class _Site:
    """Where a condition is: its path in the tree and its text."""

    path: str
    text: str


class _Leaf:
    """A condition: an observed value and a test of it, in Python and in SQL."""

    field_type = FieldType.ANY

    def __init__(self, site: _Site, comparison: rule_pb2.Comparison | None) -> None:
        self.site = site
        self.comparison = comparison
        self.operator, self.operand = (
            comparison_operand(comparison) if comparison is not None else (0, None)
        )

    # Python.
    def py_observe(self, ns: Namespace) -> str:
        raise NotImplementedError

    def py_test(self, ns: Namespace, x: Var) -> str:
        return test_source(self.operator, self.operand, x, self.field_type, ns)

    def py_timer(self, ns: Namespace, answer: str) -> str | None:
        """When time alone could next change the condition, given its current ``answer``
        (an expression); None when it never can."""
        return None

    def observation(self) -> tuple[str, ...] | None:
        """What the condition reads, equal for conditions that read the same value whatever
        the subject and the time; None when that is not known."""
        return None

    # SQL.
    def sql_observe(self, ctx: SqlContext, alias: str) -> str:
        raise NotImplementedError

    def sql(self, ctx: SqlContext, alias: str) -> str:
        return sql_test(
            self.operator, self.operand, self.sql_observe(ctx, alias), self.field_type, ctx
        )

    # What it needs.
    def dependencies(self) -> set[str]:
        return set()

    def aggregates(self) -> list[profile_pb2.AggregateSpec]:
        return []

    def segments(self) -> set[str]:
        return set()

    def observed(self, raw: Any) -> common_pb2.Value | None:
        if raw is None:
            return None
        if self.field_type is FieldType.TIMESTAMP:
            return common_pb2.Value(timestamp_value=timestamp_from_micros(raw))
        if self.field_type is FieldType.NUMBER:
            return common_pb2.Value(number_value=float(raw))
        value: AttrValue = raw
        return value_to_proto(value)


class _Attribute(_Leaf):
    def __init__(self, site: _Site, node: rule_pb2.AttributeCondition) -> None:
        super().__init__(site, node.comparison)
        self.keys = tuple(node.path.split("."))

    def py_observe(self, ns: Namespace) -> str:
        if len(self.keys) == 1:
            return f"v.attributes.get({ns.const(self.keys[0])})"
        return f"_lookup(v.attributes, {ns.const(self.keys)})"

    def observation(self) -> tuple[str, ...] | None:
        return ("attributes", *self.keys)

    def sql_observe(self, ctx: SqlContext, alias: str) -> str:
        steps = "".join(f" -> {ctx.bind(key, 'text')}" for key in self.keys)
        return f"({alias}.attributes{steps})"

    def dependencies(self) -> set[str]:
        return {f"attribute:{self.keys[0]}"}


# The typed columns of the view, by condition field: (view field = column, type, key).
_SESSION_COLUMNS: Mapping[int, tuple[str, FieldType]] = {
    _S.SESSION_FIELD_CART_VALUE: ("cart_value", FieldType.NUMBER),
    _S.SESSION_FIELD_CART_ITEM_COUNT: ("cart_item_count", FieldType.NUMBER),
    _S.SESSION_FIELD_PAGE_VIEW_COUNT: ("page_view_count", FieldType.NUMBER),
    _S.SESSION_FIELD_LANDING_PAGE: ("landing_page", FieldType.STRING),
    _S.SESSION_FIELD_SOURCE: ("source", FieldType.STRING),
    _S.SESSION_FIELD_REFERRER: ("referrer", FieldType.STRING),
    _S.SESSION_FIELD_UTM_SOURCE: ("utm_source", FieldType.STRING),
    _S.SESSION_FIELD_UTM_MEDIUM: ("utm_medium", FieldType.STRING),
    _S.SESSION_FIELD_UTM_CAMPAIGN: ("utm_campaign", FieldType.STRING),
    _S.SESSION_FIELD_UTM_TERM: ("utm_term", FieldType.STRING),
    _S.SESSION_FIELD_UTM_CONTENT: ("utm_content", FieldType.STRING),
    _S.SESSION_FIELD_CHANNEL: ("channel", FieldType.STRING),
    _S.SESSION_FIELD_VISIT_COUNT: ("visit_count", FieldType.NUMBER),
    _S.SESSION_FIELD_IS_NEW_VISITOR: ("is_new_visitor", FieldType.BOOL),
}
_CONTEXT_COLUMNS: Mapping[int, tuple[str, FieldType]] = {
    _C.CONTEXT_FIELD_COUNTRY: ("country", FieldType.STRING),
    _C.CONTEXT_FIELD_REGION: ("region", FieldType.STRING),
    _C.CONTEXT_FIELD_CITY: ("city", FieldType.STRING),
    _C.CONTEXT_FIELD_POSTAL_CODE: ("postal_code", FieldType.STRING),
    _C.CONTEXT_FIELD_WEATHER_CONDITION: ("weather_condition", FieldType.STRING),
    _C.CONTEXT_FIELD_TEMPERATURE_CELSIUS: ("temperature_celsius", FieldType.NUMBER),
    _C.CONTEXT_FIELD_DEVICE_TYPE: ("device_type", FieldType.STRING),
    _C.CONTEXT_FIELD_OS: ("os", FieldType.STRING),
    _C.CONTEXT_FIELD_BROWSER: ("browser", FieldType.STRING),
}


class _Column(_Leaf):
    """A typed field of the view, which is also a column of ``profiles``."""

    def __init__(
        self,
        site: _Site,
        comparison: rule_pb2.Comparison,
        column: str,
        field_type: FieldType,
        key: str,
    ) -> None:
        super().__init__(site, comparison)
        self.column = column
        self.field_type = field_type
        self.key = key

    def py_observe(self, ns: Namespace) -> str:
        return f"v.{self.column}"

    def observation(self) -> tuple[str, ...] | None:
        return (self.column,)

    def sql_observe(self, ctx: SqlContext, alias: str) -> str:
        return f"{alias}.{self.column}"

    def dependencies(self) -> set[str]:
        return {self.key}


class _AverageOrderValue(_Leaf):
    field_type = FieldType.NUMBER

    def py_observe(self, ns: Namespace) -> str:
        return "_aov(v)"

    def sql_observe(self, ctx: SqlContext, alias: str) -> str:
        tiny = ctx.bind(_TINY_VALUE, "float8")
        value = f"{alias}.lifetime_value"
        return (
            f"(CASE WHEN {alias}.order_count > 0 THEN"
            f" (CASE WHEN abs({value}) < {tiny} THEN 0.0::float8 ELSE {value} END)"
            f" / {alias}.order_count::float8 END)"
        )

    def dependencies(self) -> set[str]:
        return {"lifetime"}


class _DaysSince(_Leaf):
    field_type = FieldType.NUMBER

    def __init__(self, site: _Site, comparison: rule_pb2.Comparison, column: str) -> None:
        super().__init__(site, comparison)
        self.column = column

    def py_observe(self, ns: Namespace) -> str:
        return f"_days(v.{self.column}, now)"

    def py_timer(self, ns: Namespace, answer: str) -> str | None:
        return f"_days_timer(v.{self.column}, now)"

    def sql_observe(self, ctx: SqlContext, alias: str) -> str:
        return (
            f"floor((extract(epoch FROM {ctx.now_param})"
            f" - extract(epoch FROM {alias}.{self.column})) / 86400)"
        )

    def dependencies(self) -> set[str]:
        return {"seen"}


class _Geo(_Leaf):
    field_type = FieldType.NUMBER

    def __init__(self, site: _Site, node: rule_pb2.GeoDistanceCondition) -> None:
        super().__init__(site, None)
        self.center_latitude = _flush(node.center.latitude) * _RADIANS
        self.center_cosine = math.cos(self.center_latitude)
        self.center_longitude = _flush(node.center.longitude) * _RADIANS
        sine = math.sin(node.radius_km / (2.0 * EARTH_RADIUS_KM))
        self.threshold = sine * sine

    def py_observe(self, ns: Namespace) -> str:
        args = ", ".join(
            ns.const(value)
            for value in (self.center_latitude, self.center_cosine, self.center_longitude)
        )
        return f"_haversine(v.latitude, v.longitude, {args})"

    def py_test(self, ns: Namespace, x: Var) -> str:
        return f"({x} is not None and {x} <= {ns.const(self.threshold)})"

    def sql(self, ctx: SqlContext, alias: str) -> str:
        radians = ctx.bind(_RADIANS, "float8")
        tiny = ctx.bind(_TINY, "float8")

        def flush(value: str) -> str:
            return f"(CASE WHEN abs({value}) < {tiny} THEN 0.0::float8 ELSE {value} END)"

        latitude = flush(f"{alias}.latitude")
        longitude = flush(f"{alias}.longitude")
        center_latitude = ctx.bind(self.center_latitude, "float8")
        center_longitude = ctx.bind(self.center_longitude, "float8")
        north = flush(f"sin(({latitude} * {radians} - {center_latitude}) / 2.0::float8)")
        east = flush(f"sin(({longitude} * {radians} - {center_longitude}) / 2.0::float8)")
        cosine = ctx.bind(self.center_cosine, "float8")
        haversine = f"{north} * {north} + cos({latitude} * {radians}) * {cosine} * {east} * {east}"
        return f"coalesce({haversine} <= {ctx.bind(self.threshold, 'float8')}, false)"

    def observed(self, raw: Any) -> common_pb2.Value | None:
        if raw is None:
            return None
        return common_pb2.Value(number_value=_distance_km(raw))

    def dependencies(self) -> set[str]:
        return {"context"}


class _Window(_Leaf):
    """An aggregate over a window: behaviour, campaign and affinity conditions."""

    def __init__(
        self,
        site: _Site,
        comparison: rule_pb2.Comparison,
        event_name: str,
        filters: Iterable[rule_pb2.PropertyFilter],
        function: int,
        property_path: str,
        window: rule_pb2.Window,
    ) -> None:
        super().__init__(site, comparison)
        self.event_name = event_name
        self.function = function
        self.plan = agg.plan_window(window)
        self.spec = agg.make_spec(event_name, filters, function, property_path, self.plan)
        self.field_type = (
            FieldType.TIMESTAMP
            if function in (_F.AGGREGATE_FUNCTION_FIRST_TIME, _F.AGGREGATE_FUNCTION_LAST_TIME)
            else FieldType.NUMBER
        )

    def _bounds(self) -> tuple[str, str]:
        plan = self.plan
        if plan.kind == "last":
            back = f"(now - {int(plan.duration)})"
            return f"{back} - {back} % {int(plan.width)}", "now"
        if plan.kind == "this_session":
            return "_session_low(v.session_start, now)", "now"
        if plan.kind == "between":
            return str(int(plan.start)), str(int(plan.end) - 1)
        return str(_LOWEST), str(_HIGHEST)

    def py_observe(self, ns: Namespace) -> str:
        low, high = self._bounds()
        reader = _WINDOW_READERS[self.function]
        return f"{reader}(v.aggregates.get({ns.const(self.spec.aggregate_id)}), {low}, {high})"

    def py_timer(self, ns: Namespace, answer: str) -> str | None:
        if self.plan.kind not in ("last", "this_session"):
            return None
        low, _ = self._bounds()
        series = f"v.aggregates.get({ns.const(self.spec.aggregate_id)})"
        entering = leaving = "True"
        if self.function in _GROWING and self.operator in _ORDERED:
            # The value only grows as a bucket comes in and only shrinks as one leaves: a
            # `>=` that holds can turn only by a bucket leaving, one that fails only by one
            # coming in (a `<` the other way round). A count of 2 when 3 are needed is no
            # timer, where it used to be one for when its oldest bucket left.
            rising = self.operator in _RISING
            entering = f"not {answer}" if rising else answer
            leaving = answer if rising else f"not {answer}"
        return f"_window_timer({series}, {low}, now, {ns.const(self.plan)}, {entering}, {leaving})"

    def sql_observe(self, ctx: SqlContext, alias: str) -> str:
        # The aggregate's buckets, one JSON array each (see `audience.rules.aggregates_json`),
        # read from the profile's own row: only this aggregate's buckets are walked.
        b = ctx.alias("b")
        plan = self.plan
        start = f"({b}.v -> 0)::int8"
        where = []
        if plan.kind == "last":
            low = agg.bucket_start(ctx.now - plan.duration, plan.width)
            where.append(f"{start} BETWEEN {ctx.bind(low, 'int8')} AND {ctx.now_micros_param}")
        elif plan.kind == "this_session":
            # From the second the visit began: the start's microseconds, exactly.
            session = f"(extract(epoch FROM {alias}.session_start) * 1000000)::int8"
            where.append(f"{start} > {session} - {agg.SECOND}")
            where.append(f"{start} <= {ctx.now_micros_param}")
        elif plan.kind == "between":
            where.append(f"{start} >= {ctx.bind(plan.start, 'int8')}")
            where.append(f"{start} < {ctx.bind(plan.end, 'int8')}")
        aggregate = ctx.bind(self.spec.aggregate_id, "text")
        source = f"FROM jsonb_array_elements({alias}.aggregates -> {aggregate}) AS {b}(v)"
        function = self.function
        if function == _F.AGGREGATE_FUNCTION_DISTINCT_COUNT:
            d = ctx.alias("d")
            source += f" CROSS JOIN LATERAL jsonb_array_elements_text({b}.v -> 7) AS {d}(value)"
            select = f"count(DISTINCT {d}.value)"
        else:
            count = f"sum(({b}.v -> 1)::int8)"
            ordered_sum = f"sum(({b}.v ->> 2)::float8 ORDER BY {start})"
            selects: Mapping[int, str] = {
                _F.AGGREGATE_FUNCTION_COUNT: f"coalesce({count}, 0)",
                _F.AGGREGATE_FUNCTION_SUM: f"coalesce({ordered_sum}, 0)",
                _F.AGGREGATE_FUNCTION_AVERAGE: f"{ordered_sum} / {count}::float8",
                _F.AGGREGATE_FUNCTION_MIN: f"min(({b}.v ->> 3)::float8)",
                _F.AGGREGATE_FUNCTION_MAX: f"max(({b}.v ->> 4)::float8)",
                _F.AGGREGATE_FUNCTION_FIRST_TIME: _instant(f"min(({b}.v -> 5)::int8)"),
                _F.AGGREGATE_FUNCTION_LAST_TIME: _instant(f"max(({b}.v -> 6)::int8)"),
            }
            select = selects[function]
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        return f"(SELECT {select} {source}{condition})"

    def dependencies(self) -> set[str]:
        keys = {f"event:{FACT_SOURCES.get(self.event_name, self.event_name)}", "aggregates"}
        if self.plan.kind == "this_session":
            keys.add("session")
        return keys

    def aggregates(self) -> list[profile_pb2.AggregateSpec]:
        return [self.spec]


def _instant(micros: str) -> str:
    """A ``timestamptz`` from integer microseconds, exact from year 1 to 9999: whole seconds
    (``to_timestamp`` is exact on those) plus the rest as a count of one-microsecond
    intervals. A float of the microseconds would round past 2**53."""
    return (
        f"(to_timestamp({micros} / 1000000)"
        f" + ({micros} % 1000000) * make_interval(secs => 0.000001))"
    )


_WINDOW_READERS: Mapping[int, str] = {
    _F.AGGREGATE_FUNCTION_COUNT: "_w_count",
    _F.AGGREGATE_FUNCTION_SUM: "_w_sum",
    _F.AGGREGATE_FUNCTION_MIN: "_w_min",
    _F.AGGREGATE_FUNCTION_MAX: "_w_max",
    _F.AGGREGATE_FUNCTION_AVERAGE: "_w_average",
    _F.AGGREGATE_FUNCTION_DISTINCT_COUNT: "_w_distinct",
    _F.AGGREGATE_FUNCTION_FIRST_TIME: "_w_first",
    _F.AGGREGATE_FUNCTION_LAST_TIME: "_w_last",
}

_CAMPAIGN_CHANNELS: Mapping[int, str] = {
    event_pb2.CAMPAIGN_CHANNEL_EMAIL: "email",
    event_pb2.CAMPAIGN_CHANNEL_AD: "ad",
}
_CAMPAIGN_ACTIONS: Mapping[int, str] = {
    event_pb2.CAMPAIGN_ACTION_RECEIVED: "received",
    event_pb2.CAMPAIGN_ACTION_OPENED: "opened",
    event_pb2.CAMPAIGN_ACTION_CLICKED: "clicked",
}
_AFFINITY_FACTS: Mapping[int, str] = {
    rule_pb2.AFFINITY_ACTION_VIEWED: PRODUCT_VIEW,
    rule_pb2.AFFINITY_ACTION_ADDED_TO_CART: PRODUCT_ADDED,
    rule_pb2.AFFINITY_ACTION_PURCHASED: PRODUCT_PURCHASED,
}
_AFFINITY_PROPERTIES: Mapping[int, str] = {
    rule_pb2.AFFINITY_DIMENSION_CATEGORY: "category",
    rule_pb2.AFFINITY_DIMENSION_BRAND: "brand",
    rule_pb2.AFFINITY_DIMENSION_PRODUCT: "product_id",
}


def _equals(path: str, text: str) -> rule_pb2.PropertyFilter:
    return rule_pb2.PropertyFilter(
        path=path,
        comparison=rule_pb2.Comparison(
            operator=_O.OPERATOR_EQUALS, value=common_pb2.Value(string_value=text)
        ),
    )


def _campaign(site: _Site, node: rule_pb2.CampaignCondition) -> _Window:
    filters = [
        _equals("channel", _CAMPAIGN_CHANNELS[node.channel]),
        _equals("action", _CAMPAIGN_ACTIONS[node.action]),
    ]
    if node.campaign_id:
        filters.append(_equals("campaign_id", node.campaign_id))
    comparison = node.comparison
    if not node.HasField("comparison"):
        comparison = rule_pb2.Comparison(
            operator=_O.OPERATOR_GREATER_THAN_OR_EQUAL, value=common_pb2.Value(number_value=1)
        )
    return _Window(
        site,
        comparison,
        CAMPAIGN_INTERACTION,
        filters,
        _F.AGGREGATE_FUNCTION_COUNT,
        "",
        node.window,
    )


def _affinity(site: _Site, node: rule_pb2.AffinityCondition) -> _Window:
    return _Window(
        site,
        node.comparison,
        _AFFINITY_FACTS[node.action],
        [_equals(_AFFINITY_PROPERTIES[node.dimension], node.value)],
        _F.AGGREGATE_FUNCTION_COUNT,
        "",
        node.window,
    )


class _Segment(_Leaf):
    field_type = FieldType.BOOL

    def __init__(self, site: _Site, node: rule_pb2.SegmentCondition) -> None:
        super().__init__(site, None)
        self.name = node.segment
        self.negated = node.negated

    def py_observe(self, ns: Namespace) -> str:
        return f"({ns.const(self.name)} in segs)"

    def py_test(self, ns: Namespace, x: Var) -> str:
        return f"not {x}" if self.negated else f"{x}"

    def sql(self, ctx: SqlContext, alias: str) -> str:
        source = ctx.segments.get(self.name)
        if source is None:
            raise ValueError(f"the SQL of segment {self.name!r} needs its rule or its members")
        if isinstance(source, ImportedMembers):
            members = ctx.bind(list(source.profile_ids), "text[]")
            inner = f"coalesce({alias}.profile_id = ANY({members}), false)"
        else:
            if self.name in ctx.inlining:
                raise ValueError(f"segment {self.name!r} refers to itself")
            ctx.inlining.append(self.name)
            inner = source.predicate_sql(ctx, alias)
            ctx.inlining.pop()
        return f"(NOT {inner})" if self.negated else inner

    def segments(self) -> set[str]:
        return {self.name}

    def dependencies(self) -> set[str]:
        return {f"segment:{self.name}"}


class _RandomBucket(_Leaf):
    field_type = FieldType.NUMBER

    def __init__(self, site: _Site, node: rule_pb2.RandomBucketCondition) -> None:
        super().__init__(site, None)
        self.salt = node.salt
        self.low = node.min_bucket
        self.high = node.max_bucket

    def py_observe(self, ns: Namespace) -> str:
        return f"_bucket({ns.const(self.salt)}, v.subject_id)"

    def py_test(self, ns: Namespace, x: Var) -> str:
        return f"{int(self.low)} <= {x} <= {int(self.high)}"

    def sql(self, ctx: SqlContext, alias: str) -> str:
        salt = ctx.bind(self.salt, "text")
        digest = f"md5({salt} || ':' || {alias}.profile_id)"
        bucket = f"(('x' || substr({digest}, 1, 7))::bit(28)::int % 100)"
        low, high = ctx.bind(self.low, "int"), ctx.bind(self.high, "int")
        return f"({bucket} BETWEEN {low} AND {high})"


class _Rollup(_Leaf):
    field_type = FieldType.NUMBER

    def __init__(
        self, site: _Site, node: rule_pb2.UserRollupCondition, compiled: CompiledRule
    ) -> None:
        super().__init__(site, node.comparison)
        self.key = rollup_key(node.user_rule)
        self.user = compiled

    def py_observe(self, ns: Namespace) -> str:
        return f"rollups.get({ns.const(self.key)}, 0)"

    def sql_observe(self, ctx: SqlContext, alias: str) -> str:
        u = ctx.alias("u")
        return (
            f"(SELECT count(*) FROM {ctx.table('profiles')} AS {u}"
            f" WHERE {u}.dataset = {alias}.dataset AND {u}.kind = 'user'"
            f" AND {u}.account_id = {alias}.profile_id"
            f" AND {self.user.predicate_sql(ctx, u)})"
        )

    def dependencies(self) -> set[str]:
        return {f"rollup:{self.key}"}


# --- The tree. ---


@dataclass(frozen=True, slots=True)
class _Group:
    kind: str  # "all", "any" or "not"
    site: _Site
    children: tuple[_Node, ...]


_Node = _Group | _Leaf


@dataclass(frozen=True, slots=True)
class Rollup:
    """A roll-up of an account rule: its key and its user rule, compiled.

    The engine keeps, per (account, key), how many of the account's users satisfy
    ``predicate`` and passes those counts as the account predicate's ``rollups``.
    """

    key: str
    user_rule: rule_pb2.Rule
    predicate: CompiledRule


class _Builder:
    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.leaves: list[_Leaf] = []
        self.rollups: dict[str, Rollup] = {}

    def build(self, rule: rule_pb2.Rule, path: str) -> _Node:
        kind = rule.WhichOneof("node")
        site = _Site(path, format_rule(rule))
        prefix = f"{path}." if path else ""
        if kind in ("all", "any"):
            children = tuple(
                self.build(child, f"{prefix}{kind}.rules[{index}]")
                for index, child in enumerate(getattr(rule, kind).rules)
            )
            return _Group(kind, site, children)
        if kind == "negation":
            return _Group("not", site, (self.build(rule.negation, f"{prefix}negation"),))
        leaf = self.leaf(rule, kind or "", site)
        self.leaves.append(leaf)
        return leaf

    def leaf(self, rule: rule_pb2.Rule, kind: str, site: _Site) -> _Leaf:
        if kind == "attribute":
            return _Attribute(site, rule.attribute)
        if kind == "session":
            column, field_type = _SESSION_COLUMNS[rule.session.field]
            return _Column(site, rule.session.comparison, column, field_type, "session")
        if kind == "context":
            column, field_type = _CONTEXT_COLUMNS[rule.context.field]
            return _Column(site, rule.context.comparison, column, field_type, "context")
        if kind == "geo_distance":
            return _Geo(site, rule.geo_distance)
        if kind == "behavior":
            node = rule.behavior
            return _Window(
                site,
                node.comparison,
                node.event_name,
                node.filters,
                node.function,
                node.property,
                node.window,
            )
        if kind == "campaign":
            return _campaign(site, rule.campaign)
        if kind == "affinity":
            return _affinity(site, rule.affinity)
        if kind == "time":
            node_time = rule.time
            column = (
                "first_seen" if node_time.field == rule_pb2.TIME_FIELD_FIRST_SEEN else "last_seen"
            )
            if node_time.measure == rule_pb2.TIME_MEASURE_DAYS_SINCE:
                return _DaysSince(site, node_time.comparison, column)
            return _Column(site, node_time.comparison, column, FieldType.TIMESTAMP, "seen")
        if kind == "lifetime":
            metric = rule.lifetime.metric
            if metric == rule_pb2.LIFETIME_METRIC_AVERAGE_ORDER_VALUE:
                return _AverageOrderValue(site, rule.lifetime.comparison)
            column = "lifetime_value" if metric == rule_pb2.LIFETIME_METRIC_VALUE else "order_count"
            return _Column(site, rule.lifetime.comparison, column, FieldType.NUMBER, "lifetime")
        if kind == "segment":
            return _Segment(site, rule.segment)
        if kind == "random_bucket":
            return _RandomBucket(site, rule.random_bucket)
        if kind == "user_rollup":
            node_rollup = rule.user_rollup
            user = CompiledRule(node_rollup.user_rule, _USER)
            leaf = _Rollup(site, node_rollup, user)
            self.rollups.setdefault(leaf.key, Rollup(leaf.key, node_rollup.user_rule, user))
            return leaf
        raise ValueError(f"rule node {kind!r} cannot be compiled")


def _threshold(root: _Node) -> Threshold | None:
    if not isinstance(root, _Leaf) or root.operator not in _ORDERED:
        return None
    bound = root.operand
    observed = root.observation()
    # A bool is an int to Python, and NaN sorts nowhere: neither orders a family.
    if observed is None or isinstance(bound, bool) or not isinstance(bound, int | float):
        return None
    if not math.isfinite(bound):
        return None
    return Threshold(observed, root.operator, float(bound))


def _python_source(node: _Node, tests: Mapping[int, str]) -> str:
    if isinstance(node, _Leaf):
        return f"({tests[id(node)]})"
    parts = [_python_source(child, tests) for child in node.children]
    if node.kind == "not":
        return f"(not {parts[0]})"
    if not parts:
        return "True" if node.kind == "all" else "False"
    joiner = " and " if node.kind == "all" else " or "
    return "(" + joiner.join(parts) + ")"


class _NextSource:
    """Generates the body of ``next_change``: statements that set each node's answer and
    the instant time alone could change it into locals, children first."""

    def __init__(self, tests: Mapping[int, str], timers: Mapping[int, str]) -> None:
        self._tests = tests
        self._timers = timers
        self.lines: list[str] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def _local(self, prefix: str, expression: str) -> str:
        name = self._name(prefix)
        self.lines.append(f"    {name} = {expression}")
        return name

    def node(self, node: _Node) -> tuple[str, str]:
        """The names holding the node's answer and its next instant ("None" when time
        alone cannot change it)."""
        if not self._timed(node):
            return self._local("_r", _python_source(node, self._tests)), "None"
        if isinstance(node, _Leaf):
            answer = self._local("_r", self._tests[id(node)])
            return answer, self._local("_m", f"{self._timers[id(node)]}({_ARGS}, {answer})")
        outcomes = [self.node(child) for child in node.children]
        if node.kind == "not":
            answer, moment = outcomes[0]
            return self._local("_r", f"not {answer}"), moment
        joiner = " and " if node.kind == "all" else " or "
        answer = self._local("_r", joiner.join(name for name, _ in outcomes))
        # An `all` that is false stays false until every false child could turn (the latest
        # of their times), an `any` that is true likewise; otherwise the first change of a
        # child may flip it.
        settled = f"not {answer}" if node.kind == "all" else answer
        pairs = ", ".join(f"({name}, {moment})" for name, moment in outcomes)
        moments = ", ".join(moment for _, moment in outcomes if moment != "None")
        moment = self._name("_m")
        self.lines.append(f"    if {settled}:")
        self.lines.append(f"        {moment} = _latest_deciding({answer}, ({pairs},))")
        self.lines.append("    else:")
        self.lines.append(f"        {moment} = _soonest(({moments},))")
        return answer, moment

    def _timed(self, node: _Node) -> bool:
        if isinstance(node, _Leaf):
            return id(node) in self._timers
        return any(self._timed(child) for child in node.children)


def _soonest(moments: Iterable[int | None]) -> int | None:
    present = [moment for moment in moments if moment is not None]
    return min(present) if present else None


def _latest_deciding(answer: bool, outcomes: Iterable[tuple[bool, int | None]]) -> int | None:
    """The latest instant among the children that give the node its answer; None when one
    of them never changes."""
    latest: int | None = None
    for result, moment in outcomes:
        if result == answer:
            if moment is None:
                return None
            if latest is None or moment > latest:
                latest = moment
    return latest


def _merge_specs(leaves: Iterable[_Leaf]) -> tuple[profile_pb2.AggregateSpec, ...]:
    """The distinct aggregates, each with the longest retention asked for (0 is forever)."""
    merged: dict[str, profile_pb2.AggregateSpec] = {}
    for leaf in leaves:
        for spec in leaf.aggregates():
            known = merged.get(spec.aggregate_id)
            if known is None:
                merged[spec.aggregate_id] = spec
                continue
            old, new = known.retention.ToMicroseconds(), spec.retention.ToMicroseconds()
            if old and (new == 0 or new > old):
                known.retention.CopyFrom(spec.retention)
    return tuple(merged.values())


@dataclass(frozen=True, slots=True)
class Threshold:
    """A rule that is one ordered comparison of a value with a number (``cart.value >= 100``).

    Rules with the same ``observed`` and ``operator`` differ only in ``bound``: for any
    subject and time, sorted by bound, their answers are a run of one answer followed by a
    run of the other. An evaluator may decide such a family with a binary search.
    """

    observed: tuple[str, ...]
    operator: int
    bound: float


class CompiledRule:
    """A rule compiled for evaluation. Build one with :func:`compile_rule`.

    Attributes:
        rule: the rule.
        kind: the segment kind it was compiled for (``SegmentKind``).
        text: its canonical text.
        predicate: the Python predicate, ``predicate(view, now, segments, rollups)``; the
            fastest way in (positional arguments, no defaults).
        aggregates: the aggregates the rule reads, to register with the profile service.
        dependencies: the keys a profile change must touch to possibly change the answer,
            in the ``changed_keys`` vocabulary of ``profile_change.proto``, plus
            ``segment:{name}`` per referenced segment and ``rollup:{key}`` per roll-up.
            An empty set means only a new subject (or a backfill) needs an evaluation.
        segments: the names of the segments the rule refers to.
        rollups: for an account rule, its roll-ups (each with a compiled user predicate).
        leaf_paths / leaf_texts: each condition's path in the tree and text, in the order
            of :meth:`leaf_results`.
        time_dependent: whether the passing of time alone can change the answer (some
            condition has a window that moves or counts days); when false,
            :meth:`next_change` is always ``None``.
        threshold: the rule as a :class:`Threshold`, when it is one.
    """

    def __init__(self, rule: rule_pb2.Rule, kind: int) -> None:
        self.rule = rule
        self.kind = kind
        self.text = format_rule(rule)
        builder = _Builder(kind)
        self._root = builder.build(rule, "")
        self._leaves = tuple(builder.leaves)
        self.aggregates = _merge_specs(self._leaves)
        self.dependencies = frozenset(key for leaf in self._leaves for key in leaf.dependencies())
        self.segments = frozenset(name for leaf in self._leaves for name in leaf.segments())
        self.rollups = tuple(builder.rollups.values())
        self.leaf_paths = tuple(leaf.site.path for leaf in self._leaves)
        self.leaf_texts = tuple(leaf.site.text for leaf in self._leaves)
        self._generate()
        self.threshold = None if self.time_dependent else _threshold(self._root)

    def _generate(self) -> None:
        ns = Namespace()
        ns.values.update(
            _aov=_average_order_value,
            _days=_days_since,
            _days_timer=_days_timer,
            _haversine=_haversine,
            _bucket=random_bucket,
            _session_low=_session_low,
            _window_timer=agg.window_next_change,
            _w_count=agg.window_count,
            _w_sum=agg.window_sum,
            _w_min=agg.window_min,
            _w_max=agg.window_max,
            _w_average=agg.window_average,
            _w_distinct=agg.window_distinct,
            _w_first=agg.window_first,
            _w_last=agg.window_last,
            _soonest=_soonest,
            _latest_deciding=_latest_deciding,
        )
        tests: dict[int, str] = {}
        timers: dict[int, str] = {}
        lines: list[str] = []
        for index, leaf in enumerate(self._leaves):
            observe = leaf.py_observe(ns)
            test = leaf.py_test(ns, Var(f"_v{index}", observe))
            tests[id(leaf)] = test
            lines.append(f"def _obs{index}({_ARGS}):\n    return {observe}\n")
            lines.append(f"def _leaf{index}({_ARGS}):\n    return {test}\n")
            timer = leaf.py_timer(ns, "answer")
            if timer is not None:
                lines.append(f"def _timer{index}({_ARGS}, answer):\n    return {timer}\n")
                timers[id(leaf)] = f"_timer{index}"
        lines.append(f"def _predicate({_ARGS}):\n    return {_python_source(self._root, tests)}\n")
        results = "".join(f"({tests[id(leaf)]}), " for leaf in self._leaves)
        lines.append(f"def _leaves({_ARGS}):\n    return ({results})\n")
        # Straight-line code in place of a walk of the tree: it runs for every evaluation
        # of a time-dependent rule, to set the subject's timer.
        source = _NextSource(tests, timers)
        root = self._root
        if not timers:
            moment = "None"
        elif isinstance(root, _Leaf):
            moment = f"{timers[id(root)]}({_ARGS}, {tests[id(root)]})"
        else:
            _, moment = source.node(root)
        body = "".join(f"{line}\n" for line in source.lines)
        lines.append(f"def _next_change({_ARGS}):\n{body}    return {moment}\n")
        exec(compile("".join(lines), "<rule>", "exec"), ns.values)
        values = ns.values
        self.predicate: Predicate = values["_predicate"]
        self._leaf_results: Callable[..., tuple[bool, ...]] = values["_leaves"]
        self._observers: dict[int, Callable[..., Any]] = {}
        self._tests: dict[int, Callable[..., bool]] = {}
        self._next_change: Callable[..., int | None] = values["_next_change"]
        self.time_dependent = bool(timers)
        for index, leaf in enumerate(self._leaves):
            self._observers[id(leaf)] = values[f"_obs{index}"]
            self._tests[id(leaf)] = values[f"_leaf{index}"]

    # Python evaluation.

    def matches(
        self,
        view: View,
        now: int,
        segments: Container[str] = NO_SEGMENTS,
        rollups: Mapping[str, int] = EMPTY_ROLLUPS,
    ) -> bool:
        """Whether the subject satisfies the rule at ``now`` (microseconds)."""
        return self.predicate(view, now, segments, rollups)

    def leaf_results(
        self,
        view: View,
        now: int,
        segments: Container[str] = NO_SEGMENTS,
        rollups: Mapping[str, int] = EMPTY_ROLLUPS,
    ) -> tuple[bool, ...]:
        """Each condition's result, in the order of ``leaf_paths``."""
        return self._leaf_results(view, now, segments, rollups)

    def leaf_mask(
        self,
        view: View,
        now: int,
        segments: Container[str] = NO_SEGMENTS,
        rollups: Mapping[str, int] = EMPTY_ROLLUPS,
    ) -> int:
        """The conditions' results as bits: bit ``i`` is condition ``i`` (``leaf_paths``)."""
        mask = 0
        for index, result in enumerate(self._leaf_results(view, now, segments, rollups)):
            if result:
                mask |= 1 << index
        return mask

    def flipped(self, before: int, after: int) -> tuple[str, ...]:
        """The texts of the conditions whose result differs between two leaf masks."""
        changed = before ^ after
        return tuple(text for index, text in enumerate(self.leaf_texts) if changed >> index & 1)

    def next_change(
        self,
        view: View,
        now: int,
        segments: Container[str] = NO_SEGMENTS,
        rollups: Mapping[str, int] = EMPTY_ROLLUPS,
    ) -> int | None:
        """The next instant after ``now`` at which the passing of time alone could change the
        answer; ``None`` when it cannot. Never later than the real change; it may be earlier
        (re-evaluate then, and ask again)."""
        return self._next_change(view, now, segments, rollups)

    def explain(
        self,
        view: View,
        now: int,
        segments: Container[str] = NO_SEGMENTS,
        rollups: Mapping[str, int] = EMPTY_ROLLUPS,
    ) -> rule_pb2.RuleExplanation:
        """Which clauses are true or false for the subject at ``now``, and the values seen."""
        return self._explain(self._root, (view, now, segments, rollups))

    def explain_conditions(
        self,
        indexes: Iterable[int],
        view: View,
        now: int,
        segments: Container[str] = NO_SEGMENTS,
        rollups: Mapping[str, int] = EMPTY_ROLLUPS,
    ) -> tuple[rule_pb2.RuleExplanation, ...]:
        """The explanations of some conditions (indexes into ``leaf_paths``), each as
        :meth:`explain` gives it in the tree, without explaining the rest."""
        args = (view, now, segments, rollups)
        return tuple(self._explain(self._leaves[index], args) for index in indexes)

    def _explain(self, node: _Node, args: tuple[Any, ...]) -> rule_pb2.RuleExplanation:
        out = rule_pb2.RuleExplanation(path=node.site.path, text=node.site.text)
        if isinstance(node, _Leaf):
            raw = self._observers[id(node)](*args)
            out.result = self._tests[id(node)](*args)
            observed = node.observed(raw)
            if observed is not None:
                out.observed.CopyFrom(observed)
            if not out.result:
                seen = format_value(observed) if observed is not None else "nothing"
                out.missing = f"Needs {node.site.text}; observed {seen}."
            return out
        children = [self._explain(child, args) for child in node.children]
        out.children.extend(children)
        if node.kind == "not":
            out.result = not children[0].result
            if not out.result:
                out.missing = "Needs the inner clause to be false."
        elif node.kind == "all":
            out.result = all(child.result for child in children)
            if not out.result:
                failing = sum(1 for child in children if not child.result)
                out.missing = f"Needs every clause to hold; {failing} of {len(children)} do not."
        else:
            out.result = any(child.result for child in children)
            if not out.result:
                out.missing = "Needs at least one clause to hold; none does."
        return out

    # SQL.

    def predicate_sql(self, ctx: SqlContext, alias: str) -> str:
        """The rule's SQL predicate over the ``profiles`` row aliased ``alias``, within a
        statement being built (for inlining into another rule's statement)."""
        return self._sql(self._root, ctx, alias)

    def _sql(self, node: _Node, ctx: SqlContext, alias: str) -> str:
        if isinstance(node, _Leaf):
            return node.sql(ctx, alias)
        parts = [self._sql(child, ctx, alias) for child in node.children]
        if node.kind == "not":
            return f"(NOT {parts[0]})"
        if not parts:
            return "true" if node.kind == "all" else "false"
        return "(" + (" AND " if node.kind == "all" else " OR ").join(parts) + ")"

    def to_sql(
        self,
        now: int,
        *,
        schema: str,
        segments: Mapping[str, SqlSegment | ImportedMembers] | None = None,
        alias: str = "p",
    ) -> SqlQuery:
        """The bare predicate over ``{schema}.profiles AS {alias}``, with its parameters.

        Args:
            now: the instant of evaluation, microseconds since the epoch.
            schema: the evaluation schema's name.
            segments: for each segment the rule refers to (and those they refer to), its
                compiled rule (inlined) or, for an imported segment, its members.
            alias: the alias of the ``profiles`` row in the caller's statement.
        """
        ctx = SqlContext(schema, now, segments or {})
        text = self.predicate_sql(ctx, alias)
        return SqlQuery(text, tuple(ctx.params))

    def select_sql(
        self,
        now: int,
        *,
        schema: str,
        dataset: str,
        segments: Mapping[str, SqlSegment | ImportedMembers] | None = None,
    ) -> SqlQuery:
        """``SELECT profile_id`` of every subject of ``dataset`` (of the rule's kind) that
        satisfies the rule at ``now`` — for backfills, previews and exports."""
        ctx = SqlContext(schema, now, segments or {})
        dataset_param = ctx.bind(dataset, "text")
        kind_param = ctx.bind(_KIND_NAMES[self.kind], "text")
        predicate = self.predicate_sql(ctx, "p")
        text = (
            f"SELECT p.profile_id FROM {ctx.table('profiles')} AS p"
            f" WHERE p.dataset = {dataset_param} AND p.kind = {kind_param} AND {predicate}"
        )
        return SqlQuery(text, tuple(ctx.params))


def compile_rule(rule: rule_pb2.Rule, kind: int = _USER) -> CompiledRule:
    """Validates and compiles a rule for subjects of ``kind`` (``SegmentKind``).

    Segment references are not resolved here: use :func:`validate_rule` with a resolver
    when the rule is saved.

    Raises:
        AudienceError: ``INVALID_ARGUMENT`` with a field violation per fault.
    """
    validate_rule(rule, kind)
    return CompiledRule(rule, kind)
