"""Validation of a rule tree: every fault as a field violation naming its place in the rule.

Field paths follow the proto fields from the rule, such as
``rule.all.rules[2].behavior.window.last``. A rule with faults raises one
``INVALID_ARGUMENT`` (reason ``INVALID_RULE``) listing them all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from audience.errors import AudienceError, FieldViolation, invalid_argument
from audience.rules.compare import FieldType
from audience.v1 import common_pb2, event_pb2, rule_pb2, segment_pb2

__all__ = [
    "MAX_CHILDREN",
    "MAX_DEPTH",
    "MAX_FILTERS",
    "MAX_LIST",
    "MAX_NODES",
    "MAX_STRING",
    "SegmentInfo",
    "SegmentResolver",
    "rule_violations",
    "validate_rule",
]

MAX_DEPTH = 16
MAX_NODES = 500
MAX_CHILDREN = 100
MAX_LIST = 1000
MAX_STRING = 1024
MAX_FILTERS = 10
MAX_PATH_SEGMENTS = 8
MIN_WINDOW_SECONDS = 60
MAX_WINDOW_SECONDS = 3650 * 86_400
MAX_RADIUS_KM = 20_000.0
# Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799

_O = rule_pb2.Operator
_F = rule_pb2.AggregateFunction
_USER = segment_pb2.SEGMENT_KIND_USER
_ACCOUNT = segment_pb2.SEGMENT_KIND_ACCOUNT

_PATH_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_SALT = re.compile(r"[A-Za-z0-9_-]{0,64}")
_SEGMENT_NAME = re.compile(r"datasets/(?P<dataset>[^/]{1,128})/segments/[^/]{1,128}")

_NO_OPERAND = frozenset(
    {_O.OPERATOR_EXISTS, _O.OPERATOR_NOT_EXISTS, _O.OPERATOR_IS_EMPTY, _O.OPERATOR_IS_NOT_EMPTY}
)
_LIST_OPERAND = frozenset({_O.OPERATOR_IN, _O.OPERATOR_NOT_IN})
_ORDERING = frozenset(
    {
        _O.OPERATOR_GREATER_THAN,
        _O.OPERATOR_GREATER_THAN_OR_EQUAL,
        _O.OPERATOR_LESS_THAN,
        _O.OPERATOR_LESS_THAN_OR_EQUAL,
        _O.OPERATOR_BETWEEN,
    }
)
_TEXT_ONLY = frozenset({_O.OPERATOR_STARTS_WITH, _O.OPERATOR_ENDS_WITH})
_CONTAINS = frozenset({_O.OPERATOR_CONTAINS, _O.OPERATOR_NOT_CONTAINS})
_EQUALITY = frozenset({_O.OPERATOR_EQUALS, _O.OPERATOR_NOT_EQUALS})

# What each field type may be compared with: value kinds, and the operators allowed.
_KIND_OF_TYPE = {
    FieldType.NUMBER: "number_value",
    FieldType.STRING: "string_value",
    FieldType.BOOL: "bool_value",
    FieldType.TIMESTAMP: "timestamp_value",
}
_TYPE_WORDS = {
    "number_value": "a number",
    "string_value": "a string",
    "bool_value": "a boolean",
    "timestamp_value": "a timestamp",
    "list_value": "a list",
    "map_value": "a map",
    "null_value": "null",
}
_SCALARS = frozenset({"string_value", "number_value", "bool_value", "timestamp_value"})
_ORDERED = frozenset({"string_value", "number_value", "timestamp_value"})

# Condition kinds allowed at the top of a rule (outside roll-ups) per segment kind.
_ACCOUNT_NODES = frozenset(
    {"all", "any", "negation", "attribute", "time", "lifetime", "segment", "random_bucket"}
    | {"user_rollup"}
)
_USER_NODES = frozenset(
    {
        "all",
        "any",
        "negation",
        "attribute",
        "behavior",
        "session",
        "context",
        "geo_distance",
        "campaign",
        "time",
        "affinity",
        "lifetime",
        "segment",
        "random_bucket",
    }
)

_SESSION_TYPES: Mapping[int, FieldType] = {
    rule_pb2.SESSION_FIELD_CART_VALUE: FieldType.NUMBER,
    rule_pb2.SESSION_FIELD_CART_ITEM_COUNT: FieldType.NUMBER,
    rule_pb2.SESSION_FIELD_PAGE_VIEW_COUNT: FieldType.NUMBER,
    rule_pb2.SESSION_FIELD_LANDING_PAGE: FieldType.STRING,
    rule_pb2.SESSION_FIELD_SOURCE: FieldType.STRING,
    rule_pb2.SESSION_FIELD_REFERRER: FieldType.STRING,
    rule_pb2.SESSION_FIELD_UTM_SOURCE: FieldType.STRING,
    rule_pb2.SESSION_FIELD_UTM_MEDIUM: FieldType.STRING,
    rule_pb2.SESSION_FIELD_UTM_CAMPAIGN: FieldType.STRING,
    rule_pb2.SESSION_FIELD_UTM_TERM: FieldType.STRING,
    rule_pb2.SESSION_FIELD_UTM_CONTENT: FieldType.STRING,
    rule_pb2.SESSION_FIELD_CHANNEL: FieldType.STRING,
    rule_pb2.SESSION_FIELD_VISIT_COUNT: FieldType.NUMBER,
    rule_pb2.SESSION_FIELD_IS_NEW_VISITOR: FieldType.BOOL,
}
_CONTEXT_TYPES: Mapping[int, FieldType] = {
    rule_pb2.CONTEXT_FIELD_COUNTRY: FieldType.STRING,
    rule_pb2.CONTEXT_FIELD_REGION: FieldType.STRING,
    rule_pb2.CONTEXT_FIELD_CITY: FieldType.STRING,
    rule_pb2.CONTEXT_FIELD_POSTAL_CODE: FieldType.STRING,
    rule_pb2.CONTEXT_FIELD_WEATHER_CONDITION: FieldType.STRING,
    rule_pb2.CONTEXT_FIELD_TEMPERATURE_CELSIUS: FieldType.NUMBER,
    rule_pb2.CONTEXT_FIELD_DEVICE_TYPE: FieldType.STRING,
    rule_pb2.CONTEXT_FIELD_OS: FieldType.STRING,
    rule_pb2.CONTEXT_FIELD_BROWSER: FieldType.STRING,
}
_PROPERTY_FUNCTIONS = frozenset(
    {
        _F.AGGREGATE_FUNCTION_SUM,
        _F.AGGREGATE_FUNCTION_MIN,
        _F.AGGREGATE_FUNCTION_MAX,
        _F.AGGREGATE_FUNCTION_AVERAGE,
        _F.AGGREGATE_FUNCTION_DISTINCT_COUNT,
    }
)
_TIME_FUNCTIONS = frozenset({_F.AGGREGATE_FUNCTION_FIRST_TIME, _F.AGGREGATE_FUNCTION_LAST_TIME})


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """What validation needs to know of a referenced segment."""

    kind: int  # SegmentKind
    # The segments its rule refers to (none for an imported segment).
    references: tuple[str, ...] = ()


class SegmentResolver(Protocol):
    """Looks segments up by resource name, for reference checks."""

    def resolve(self, segment: str) -> SegmentInfo | None:
        """The segment's kind and references, or None when there is no such segment."""
        ...


class _Checker:
    def __init__(
        self,
        kind: int,
        resolver: SegmentResolver | None,
        segment_name: str | None,
        dataset: str | None,
    ) -> None:
        self.kind = kind
        self.resolver = resolver
        self.segment_name = segment_name
        self.dataset = dataset
        self.violations: list[FieldViolation] = []
        self.nodes = 0
        self.root = "rule"

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    # Scalars.

    def string(self, field: str, value: str, what: str, *, required: bool = True) -> bool:
        if not value:
            if required:
                self.fail(field, f"{what} is required.")
            return not required
        if len(value) > MAX_STRING:
            self.fail(field, f"{what} is longer than {MAX_STRING} characters.")
            return False
        if "\x00" in value:
            self.fail(field, f"{what} contains a NUL character.")
            return False
        return True

    def path(self, field: str, path: str, what: str) -> bool:
        if not path:
            self.fail(field, f"{what} is required.")
            return False
        parts = path.split(".")
        if len(parts) > MAX_PATH_SEGMENTS or not all(_PATH_NAME.fullmatch(p) for p in parts):
            self.fail(
                field,
                f"{what} must be at most {MAX_PATH_SEGMENTS} names joined by dots, each 1–128"
                " characters of letters, digits, '_' and '-'.",
            )
            return False
        return True

    def enum(self, field: str, number: int, known: Container[int]) -> bool:
        if number == 0:
            self.fail(field, "is required.")
            return False
        if number not in known:
            self.fail(field, f"{number} is not a known value.")
            return False
        return True

    def value(self, field: str, value: common_pb2.Value, allowed: frozenset[str]) -> str | None:
        """Checks one operand value; returns its kind when it is acceptable."""
        kind = value.WhichOneof("kind")
        if kind is None:
            self.fail(field, "a value is required.")
            return None
        if kind == "null_value":
            self.fail(field, "null is not a value to compare with; use `exists` or `not exists`.")
            return None
        if kind not in allowed:
            words = " or ".join(_TYPE_WORDS[k] for k in sorted(allowed))
            self.fail(field, f"must be {words}, not {_TYPE_WORDS[kind]}.")
            return None
        if kind == "string_value":
            if len(value.string_value) > MAX_STRING:
                self.fail(f"{field}.string_value", f"is longer than {MAX_STRING} characters.")
                return None
            if "\x00" in value.string_value:
                self.fail(f"{field}.string_value", "contains a NUL character.")
                return None
        elif kind == "number_value" and not math.isfinite(value.number_value):
            self.fail(f"{field}.number_value", "must be a finite number.")
            return None
        elif kind == "timestamp_value" and not self.timestamp(
            f"{field}.timestamp_value", value.timestamp_value
        ):
            return None
        return kind

    def timestamp(self, field: str, timestamp: object) -> bool:
        seconds: int = getattr(timestamp, "seconds", 0)
        nanos: int = getattr(timestamp, "nanos", 0)
        if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS) or not (0 <= nanos < 1_000_000_000):
            self.fail(field, "is out of range (years 1 to 9999).")
            return False
        if nanos % 1000:
            self.fail(field, "must be a whole number of microseconds.")
            return False
        return True

    # Comparisons.

    def comparison(
        self,
        field: str,
        comparison: rule_pb2.Comparison,
        field_type: FieldType,
        what: str,
        *,
        present: bool = True,
    ) -> None:
        if not present:
            self.fail(field, "a comparison is required.")
            return
        operator = comparison.operator
        op_field = f"{field}.operator"
        if not self.enum(op_field, operator, set(rule_pb2.Operator.values())):
            return
        name = rule_pb2.Operator.Name(operator).removeprefix("OPERATOR_").lower()
        value_field = f"{field}.value"
        if operator in _NO_OPERAND:
            if comparison.HasField("value"):
                self.fail(value_field, f"{name} takes no value.")
            return
        allowed = self._operand_kinds(operator, field_type)
        if not allowed:
            self.fail(op_field, f"{name} does not apply to {what}.")
            return
        value = comparison.value
        if operator in _LIST_OPERAND or operator == _O.OPERATOR_BETWEEN:
            if value.WhichOneof("kind") != "list_value":
                self.fail(value_field, f"{name} needs a list of values.")
                return
            items = value.list_value.values
            if operator == _O.OPERATOR_BETWEEN and len(items) != 2:
                self.fail(value_field, "between needs exactly two values, low and high.")
                return
            if not items:
                self.fail(value_field, f"{name} needs at least one value.")
                return
            if len(items) > MAX_LIST:
                self.fail(value_field, f"holds more than {MAX_LIST} values.")
                return
            kinds = [
                self.value(f"{value_field}.list_value.values[{index}]", item, allowed)
                for index, item in enumerate(items)
            ]
            if operator == _O.OPERATOR_BETWEEN and None not in kinds:
                if kinds[0] != kinds[1]:
                    self.fail(value_field, "between needs two values of the same type.")
                elif _between_reversed(items[0], items[1]):
                    self.fail(value_field, "between needs the low value first.")
            return
        self.value(value_field, value, allowed)

    @staticmethod
    def _operand_kinds(operator: int, field_type: FieldType) -> frozenset[str]:
        if field_type is FieldType.ANY:
            if operator in _TEXT_ONLY:
                return frozenset({"string_value"})
            if operator in _ORDERING:
                return _ORDERED
            return _SCALARS
        kind = _KIND_OF_TYPE[field_type]
        if operator in _TEXT_ONLY or operator in _CONTAINS:
            return frozenset({kind}) if field_type is FieldType.STRING else frozenset()
        if operator in _ORDERING and field_type is FieldType.BOOL:
            return frozenset()
        return frozenset({kind})

    # Windows.

    def window(self, field: str, window: rule_pb2.Window, present: bool) -> None:
        kind = window.WhichOneof("window") if present else None
        if kind is None:
            self.fail(field, "a window is required.")
            return
        if kind == "last":
            last = window.last
            seconds = last.seconds
            if last.nanos or seconds % 60:
                self.fail(f"{field}.last", "must be a whole number of minutes.")
            elif not MIN_WINDOW_SECONDS <= seconds <= MAX_WINDOW_SECONDS:
                self.fail(f"{field}.last", "must be from 1 minute to 3650 days.")
        elif kind == "between":
            between = window.between
            for name in ("start_time", "end_time"):
                if not between.HasField(name):
                    self.fail(f"{field}.between.{name}", "is required.")
                    return
                moment = getattr(between, name)
                if not self.timestamp(f"{field}.between.{name}", moment):
                    return
                if moment.nanos:
                    self.fail(f"{field}.between.{name}", "must be a whole second.")
                    return
            if between.end_time.seconds <= between.start_time.seconds:
                self.fail(f"{field}.between.end_time", "must be after start_time.")

    # Nodes.

    def rule(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        self.nodes += 1
        if self.nodes == MAX_NODES + 1:
            self.fail(self.root, f"has more than {MAX_NODES} nodes.")
        if self.nodes > MAX_NODES:
            return
        if depth > MAX_DEPTH:
            self.fail(field, f"is nested more than {MAX_DEPTH} levels deep.")
            return
        node = rule.WhichOneof("node")
        if node is None:
            self.fail(field, "a condition is required.")
            return
        allowed = _ACCOUNT_NODES if kind == _ACCOUNT else _USER_NODES
        if node not in allowed:
            kind_name = "account" if kind == _ACCOUNT else "user"
            self.fail(
                f"{field}.{node}", f"a {node} condition is not allowed in a {kind_name} rule."
            )
            return
        self._NODE_CHECKS[node](self, f"{field}.{node}", rule, depth, kind)

    def group(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        group = rule.all if rule.WhichOneof("node") == "all" else rule.any
        if len(group.rules) > MAX_CHILDREN:
            self.fail(f"{field}.rules", f"holds more than {MAX_CHILDREN} rules.")
            return
        for index, child in enumerate(group.rules):
            self.rule(f"{field}.rules[{index}]", child, depth + 1, kind)

    def negation(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        self.rule(field, rule.negation, depth + 1, kind)

    def attribute(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.attribute
        self.path(f"{field}.path", node.path, "the attribute path")
        self.comparison(
            f"{field}.comparison",
            node.comparison,
            FieldType.ANY,
            "an attribute",
            present=node.HasField("comparison"),
        )

    def behavior(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.behavior
        if not node.event_name or not _EVENT_NAME.fullmatch(node.event_name):
            self.fail(
                f"{field}.event_name",
                "must be 1–128 characters of letters, digits, '_', '.', ':' and '-'.",
            )
        self.filters(f"{field}.filters", node.filters)
        function = node.function
        if self.enum(f"{field}.function", function, set(rule_pb2.AggregateFunction.values())):
            name = rule_pb2.AggregateFunction.Name(function).removeprefix("AGGREGATE_FUNCTION_")
            if function in _PROPERTY_FUNCTIONS:
                self.path(f"{field}.property", node.property, f"the property for {name.lower()}")
            elif node.property:
                self.fail(f"{field}.property", f"{name.lower()} takes no property.")
            field_type = FieldType.TIMESTAMP if function in _TIME_FUNCTIONS else FieldType.NUMBER
            self.comparison(
                f"{field}.comparison",
                node.comparison,
                field_type,
                f"the {name.lower()} of events",
                present=node.HasField("comparison"),
            )
        self.window(f"{field}.window", node.window, node.HasField("window"))

    def filters(self, field: str, filters: Sequence[rule_pb2.PropertyFilter]) -> None:
        if len(filters) > MAX_FILTERS:
            self.fail(field, f"holds more than {MAX_FILTERS} filters.")
            return
        for index, item in enumerate(filters):
            self.path(f"{field}[{index}].path", item.path, "the property path")
            self.comparison(
                f"{field}[{index}].comparison",
                item.comparison,
                FieldType.ANY,
                "a property",
                present=item.HasField("comparison"),
            )

    def session(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.session
        if self.enum(f"{field}.field", node.field, _SESSION_TYPES):
            self.comparison(
                f"{field}.comparison",
                node.comparison,
                _SESSION_TYPES[node.field],
                "this session field",
                present=node.HasField("comparison"),
            )

    def context(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.context
        if self.enum(f"{field}.field", node.field, _CONTEXT_TYPES):
            self.comparison(
                f"{field}.comparison",
                node.comparison,
                _CONTEXT_TYPES[node.field],
                "this context field",
                present=node.HasField("comparison"),
            )

    def geo_distance(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.geo_distance
        if not node.HasField("center"):
            self.fail(f"{field}.center", "is required.")
        else:
            latitude, longitude = node.center.latitude, node.center.longitude
            if not (math.isfinite(latitude) and -90 <= latitude <= 90):
                self.fail(f"{field}.center.latitude", "must be from -90 to 90.")
            if not (math.isfinite(longitude) and -180 <= longitude <= 180):
                self.fail(f"{field}.center.longitude", "must be from -180 to 180.")
        radius = node.radius_km
        if not (math.isfinite(radius) and 0 < radius <= MAX_RADIUS_KM):
            self.fail(f"{field}.radius_km", "must be more than 0 and at most 20000.")

    def campaign(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.campaign
        self.enum(f"{field}.channel", node.channel, _CAMPAIGN_CHANNELS)
        self.enum(f"{field}.action", node.action, _CAMPAIGN_ACTIONS)
        if node.campaign_id and len(node.campaign_id) > 128:
            self.fail(f"{field}.campaign_id", "is longer than 128 characters.")
        elif node.campaign_id:
            self.string(f"{field}.campaign_id", node.campaign_id, "the campaign id")
        self.window(f"{field}.window", node.window, node.HasField("window"))
        if node.HasField("comparison"):
            self.comparison(f"{field}.comparison", node.comparison, FieldType.NUMBER, "a count")

    def time(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.time
        self.enum(f"{field}.field", node.field, _TIME_FIELDS)
        if self.enum(f"{field}.measure", node.measure, _TIME_MEASURES):
            days = node.measure == rule_pb2.TIME_MEASURE_DAYS_SINCE
            self.comparison(
                f"{field}.comparison",
                node.comparison,
                FieldType.NUMBER if days else FieldType.TIMESTAMP,
                "days since" if days else "an instant",
                present=node.HasField("comparison"),
            )

    def affinity(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.affinity
        self.enum(f"{field}.action", node.action, _AFFINITY_ACTIONS)
        self.enum(f"{field}.dimension", node.dimension, _AFFINITY_DIMENSIONS)
        self.string(f"{field}.value", node.value, "the value")
        self.window(f"{field}.window", node.window, node.HasField("window"))
        self.comparison(
            f"{field}.comparison",
            node.comparison,
            FieldType.NUMBER,
            "a count",
            present=node.HasField("comparison"),
        )

    def lifetime(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.lifetime
        if self.enum(f"{field}.metric", node.metric, _LIFETIME_METRICS):
            self.comparison(
                f"{field}.comparison",
                node.comparison,
                FieldType.NUMBER,
                "a lifetime measure",
                present=node.HasField("comparison"),
            )

    def segment(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        name = rule.segment.segment
        match = _SEGMENT_NAME.fullmatch(name)
        if match is None:
            self.fail(f"{field}.segment", "must be a name `datasets/{dataset}/segments/{segment}`.")
            return
        if self.dataset is not None and match["dataset"] != self.dataset:
            self.fail(f"{field}.segment", f"must be a segment of dataset {self.dataset!r}.")
            return
        if self.resolver is None:
            return
        info = self.resolver.resolve(name)
        if info is None:
            self.fail(f"{field}.segment", f"segment {name!r} does not exist.")
            return
        if info.kind != kind:
            wanted = "user" if kind == _USER else "account"
            self.fail(f"{field}.segment", f"segment {name!r} is not a {wanted} segment.")
            return
        cycle = self._cycle(name)
        if cycle:
            self.fail(f"{field}.segment", "the reference makes a cycle: " + " → ".join(cycle) + ".")

    def _cycle(self, start: str) -> list[str] | None:
        """A chain of references from ``start`` back to the rule's own segment, if any."""
        if self.segment_name is None or self.resolver is None:
            return None
        target = self.segment_name
        stack: list[tuple[str, list[str]]] = [(start, [target, start])]
        seen: set[str] = set()
        while stack:
            name, chain = stack.pop()
            if name == target:
                return chain
            if name in seen:
                continue
            seen.add(name)
            info = self.resolver.resolve(name)
            for reference in info.references if info is not None else ():
                stack.append((reference, [*chain, reference]))
        return None

    def random_bucket(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.random_bucket
        if not 0 <= node.min_bucket <= 99:
            self.fail(f"{field}.min_bucket", "must be from 0 to 99.")
        if not node.min_bucket <= node.max_bucket <= 99:
            self.fail(f"{field}.max_bucket", "must be from min_bucket to 99.")
        if not _SALT.fullmatch(node.salt):
            self.fail(
                f"{field}.salt", "must be at most 64 characters of letters, digits, '_' and '-'."
            )

    def user_rollup(self, field: str, rule: rule_pb2.Rule, depth: int, kind: int) -> None:
        node = rule.user_rollup
        if not node.HasField("user_rule"):
            self.fail(f"{field}.user_rule", "is required.")
        else:
            self.rule(f"{field}.user_rule", node.user_rule, depth + 1, _USER)
        self.comparison(
            f"{field}.comparison",
            node.comparison,
            FieldType.NUMBER,
            "a count of users",
            present=node.HasField("comparison"),
        )

    _NODE_CHECKS: Mapping[str, Callable[[_Checker, str, rule_pb2.Rule, int, int], None]] = {
        "all": group,
        "any": group,
        "negation": negation,
        "attribute": attribute,
        "behavior": behavior,
        "session": session,
        "context": context,
        "geo_distance": geo_distance,
        "campaign": campaign,
        "time": time,
        "affinity": affinity,
        "lifetime": lifetime,
        "segment": segment,
        "random_bucket": random_bucket,
        "user_rollup": user_rollup,
    }


_CAMPAIGN_CHANNELS = {event_pb2.CAMPAIGN_CHANNEL_EMAIL, event_pb2.CAMPAIGN_CHANNEL_AD}
_CAMPAIGN_ACTIONS = {
    event_pb2.CAMPAIGN_ACTION_RECEIVED,
    event_pb2.CAMPAIGN_ACTION_OPENED,
    event_pb2.CAMPAIGN_ACTION_CLICKED,
}
_TIME_FIELDS = {rule_pb2.TIME_FIELD_FIRST_SEEN, rule_pb2.TIME_FIELD_LAST_SEEN}
_TIME_MEASURES = {rule_pb2.TIME_MEASURE_INSTANT, rule_pb2.TIME_MEASURE_DAYS_SINCE}
_AFFINITY_ACTIONS = {
    rule_pb2.AFFINITY_ACTION_VIEWED,
    rule_pb2.AFFINITY_ACTION_ADDED_TO_CART,
    rule_pb2.AFFINITY_ACTION_PURCHASED,
}
_AFFINITY_DIMENSIONS = {
    rule_pb2.AFFINITY_DIMENSION_CATEGORY,
    rule_pb2.AFFINITY_DIMENSION_BRAND,
    rule_pb2.AFFINITY_DIMENSION_PRODUCT,
}
_LIFETIME_METRICS = {
    rule_pb2.LIFETIME_METRIC_VALUE,
    rule_pb2.LIFETIME_METRIC_ORDER_COUNT,
    rule_pb2.LIFETIME_METRIC_AVERAGE_ORDER_VALUE,
}


def _between_reversed(low: common_pb2.Value, high: common_pb2.Value) -> bool:
    kind = low.WhichOneof("kind")
    if kind == "number_value":
        return low.number_value > high.number_value
    if kind == "string_value":
        return low.string_value > high.string_value
    if kind == "timestamp_value":
        a, b = low.timestamp_value, high.timestamp_value
        return (a.seconds, a.nanos) > (b.seconds, b.nanos)
    return False


def rule_violations(
    rule: rule_pb2.Rule,
    kind: int = _USER,
    *,
    resolver: SegmentResolver | None = None,
    segment_name: str | None = None,
    dataset: str | None = None,
    field: str = "rule",
) -> list[FieldViolation]:
    """Every fault of the rule, as field violations (empty when the rule is valid)."""
    checker = _Checker(kind, resolver, segment_name, dataset)
    if kind not in (_USER, _ACCOUNT):
        checker.fail("kind", "must be SEGMENT_KIND_USER or SEGMENT_KIND_ACCOUNT.")
        return checker.violations
    checker.root = field
    checker.rule(field, rule, 1, kind)
    return checker.violations


def validate_rule(
    rule: rule_pb2.Rule,
    kind: int = _USER,
    *,
    resolver: SegmentResolver | None = None,
    segment_name: str | None = None,
    dataset: str | None = None,
    field: str = "rule",
) -> None:
    """Checks a rule for subjects of ``kind`` (``SegmentKind``).

    Args:
        rule: the rule.
        kind: the kind of the segment the rule defines.
        resolver: looks referenced segments up; without one, references are checked for
            form only (existence, kind and cycles need it).
        segment_name: the resource name of the segment the rule defines, to detect cycles.
        dataset: the dataset of that segment; references must stay within it.
        field: the request field the rule is in, prefixed to every violation's path.

    Raises:
        AudienceError: ``INVALID_ARGUMENT`` (reason ``INVALID_RULE``) with a ``BadRequest``
            field violation per fault.
    """
    violations = rule_violations(
        rule,
        kind,
        resolver=resolver,
        segment_name=segment_name,
        dataset=dataset,
        field=field,
    )
    if violations:
        raise _invalid(violations)


def _invalid(violations: list[FieldViolation]) -> AudienceError:
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return invalid_argument(
        f"The rule is invalid: {first.field}: {first.description}{more}",
        *violations,
        reason="INVALID_RULE",
    )
