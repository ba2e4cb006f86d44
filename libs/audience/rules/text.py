"""The text form of rules: a printer and a parser that round-trip (see docs/rules.md).

``format_rule(parse_rule(text))`` is the canonical spelling of ``text``, and
``parse_rule(format_rule(rule)) == rule`` for every rule the printer accepts. Syntax errors
are ``INVALID_ARGUMENT`` errors (:class:`RuleSyntaxError`) that name the line and column.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from audience.errors import AudienceError, FieldViolation
from audience.rules.validate import MAX_DEPTH
from audience.rules.values import format_instant, micros_from_timestamp
from audience.v1 import common_pb2, event_pb2, rule_pb2

__all__ = [
    "MAX_TEXT_NESTING",
    "RuleSyntaxError",
    "format_comparison",
    "format_rule",
    "format_value",
    "parse_rule",
]

_O = rule_pb2.Operator
_F = rule_pb2.AggregateFunction
_S = rule_pb2.SessionField
_C = rule_pb2.ContextField


_K = TypeVar("_K", bound=int)


def _invert(mapping: Mapping[_K, str]) -> dict[str, _K]:
    return {name: number for number, name in mapping.items()}


SESSION_NAMES: Mapping[rule_pb2.SessionField.ValueType, str] = {
    _S.SESSION_FIELD_CART_VALUE: "cart.value",
    _S.SESSION_FIELD_CART_ITEM_COUNT: "cart.item_count",
    _S.SESSION_FIELD_PAGE_VIEW_COUNT: "session.page_views",
    _S.SESSION_FIELD_LANDING_PAGE: "session.landing_page",
    _S.SESSION_FIELD_SOURCE: "session.source",
    _S.SESSION_FIELD_REFERRER: "session.referrer",
    _S.SESSION_FIELD_UTM_SOURCE: "session.utm_source",
    _S.SESSION_FIELD_UTM_MEDIUM: "session.utm_medium",
    _S.SESSION_FIELD_UTM_CAMPAIGN: "session.utm_campaign",
    _S.SESSION_FIELD_UTM_TERM: "session.utm_term",
    _S.SESSION_FIELD_UTM_CONTENT: "session.utm_content",
    _S.SESSION_FIELD_CHANNEL: "session.channel",
    _S.SESSION_FIELD_VISIT_COUNT: "session.visit_count",
    _S.SESSION_FIELD_IS_NEW_VISITOR: "session.is_new_visitor",
}
CONTEXT_NAMES: Mapping[rule_pb2.ContextField.ValueType, str] = {
    _C.CONTEXT_FIELD_COUNTRY: "location.country",
    _C.CONTEXT_FIELD_REGION: "location.region",
    _C.CONTEXT_FIELD_CITY: "location.city",
    _C.CONTEXT_FIELD_POSTAL_CODE: "location.postal_code",
    _C.CONTEXT_FIELD_WEATHER_CONDITION: "weather.condition",
    _C.CONTEXT_FIELD_TEMPERATURE_CELSIUS: "weather.temperature",
    _C.CONTEXT_FIELD_DEVICE_TYPE: "device.type",
    _C.CONTEXT_FIELD_OS: "device.os",
    _C.CONTEXT_FIELD_BROWSER: "device.browser",
}
LIFETIME_NAMES: Mapping[rule_pb2.LifetimeMetric.ValueType, str] = {
    rule_pb2.LIFETIME_METRIC_VALUE: "lifetime.value",
    rule_pb2.LIFETIME_METRIC_ORDER_COUNT: "lifetime.order_count",
    rule_pb2.LIFETIME_METRIC_AVERAGE_ORDER_VALUE: "lifetime.average_order_value",
}
TIME_FIELD_NAMES: Mapping[rule_pb2.TimeField.ValueType, str] = {
    rule_pb2.TIME_FIELD_FIRST_SEEN: "first_seen",
    rule_pb2.TIME_FIELD_LAST_SEEN: "last_seen",
}
FUNCTION_NAMES: Mapping[rule_pb2.AggregateFunction.ValueType, str] = {
    _F.AGGREGATE_FUNCTION_COUNT: "count",
    _F.AGGREGATE_FUNCTION_SUM: "sum",
    _F.AGGREGATE_FUNCTION_MIN: "min",
    _F.AGGREGATE_FUNCTION_MAX: "max",
    _F.AGGREGATE_FUNCTION_AVERAGE: "average",
    _F.AGGREGATE_FUNCTION_DISTINCT_COUNT: "distinct_count",
    _F.AGGREGATE_FUNCTION_FIRST_TIME: "first_time",
    _F.AGGREGATE_FUNCTION_LAST_TIME: "last_time",
}
CAMPAIGN_CHANNEL_NAMES: Mapping[event_pb2.CampaignChannel.ValueType, str] = {
    event_pb2.CAMPAIGN_CHANNEL_EMAIL: "email",
    event_pb2.CAMPAIGN_CHANNEL_AD: "ad",
}
CAMPAIGN_ACTION_NAMES: Mapping[event_pb2.CampaignAction.ValueType, str] = {
    event_pb2.CAMPAIGN_ACTION_RECEIVED: "received",
    event_pb2.CAMPAIGN_ACTION_OPENED: "opened",
    event_pb2.CAMPAIGN_ACTION_CLICKED: "clicked",
}
AFFINITY_ACTION_NAMES: Mapping[rule_pb2.AffinityAction.ValueType, str] = {
    rule_pb2.AFFINITY_ACTION_VIEWED: "viewed",
    rule_pb2.AFFINITY_ACTION_ADDED_TO_CART: "added_to_cart",
    rule_pb2.AFFINITY_ACTION_PURCHASED: "purchased",
}
AFFINITY_DIMENSION_NAMES: Mapping[rule_pb2.AffinityDimension.ValueType, str] = {
    rule_pb2.AFFINITY_DIMENSION_CATEGORY: "category",
    rule_pb2.AFFINITY_DIMENSION_BRAND: "brand",
    rule_pb2.AFFINITY_DIMENSION_PRODUCT: "product",
}
_SYMBOLS: Mapping[rule_pb2.Operator.ValueType, str] = {
    _O.OPERATOR_EQUALS: "=",
    _O.OPERATOR_NOT_EQUALS: "!=",
    _O.OPERATOR_GREATER_THAN: ">",
    _O.OPERATOR_GREATER_THAN_OR_EQUAL: ">=",
    _O.OPERATOR_LESS_THAN: "<",
    _O.OPERATOR_LESS_THAN_OR_EQUAL: "<=",
    _O.OPERATOR_IN: "in",
    _O.OPERATOR_NOT_IN: "not in",
    _O.OPERATOR_CONTAINS: "contains",
    _O.OPERATOR_NOT_CONTAINS: "not contains",
    _O.OPERATOR_STARTS_WITH: "starts with",
    _O.OPERATOR_ENDS_WITH: "ends with",
}
_BARE: Mapping[rule_pb2.Operator.ValueType, str] = {
    _O.OPERATOR_EXISTS: "exists",
    _O.OPERATOR_NOT_EXISTS: "not exists",
    _O.OPERATOR_IS_EMPTY: "is empty",
    _O.OPERATOR_IS_NOT_EMPTY: "is not empty",
}
_UNITS = (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1))
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


# --- Printing ---


def format_number(number: float) -> str:
    if number == 0 and math.copysign(1.0, number) < 0:
        return "-0.0"
    if math.isfinite(number) and number.is_integer() and abs(number) < 1e16:
        return str(int(number))
    return repr(number)


def format_timestamp(timestamp: timestamp_pb2.Timestamp) -> str:
    if timestamp.nanos % 1000:
        moment = format_instant(timestamp.seconds * 1_000_000)
        return f"@{moment[:-1]}.{timestamp.nanos:09d}Z"
    return "@" + format_instant(micros_from_timestamp(timestamp))


def format_value(value: common_pb2.Value) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return json.dumps(value.string_value, ensure_ascii=False)
    if kind == "number_value":
        return format_number(value.number_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "timestamp_value":
        return format_timestamp(value.timestamp_value)
    if kind == "list_value":
        return "[" + ", ".join(format_value(item) for item in value.list_value.values) + "]"
    if kind == "map_value":
        # No rule compares with a map, but an explanation may observe one (an attribute).
        fields = value.map_value.fields
        return (
            "{"
            + ", ".join(f"{json.dumps(k)}: {format_value(fields[k])}" for k in sorted(fields))
            + "}"
        )
    if kind == "null_value":
        return "null"
    raise ValueError(f"a {kind or 'missing'} value has no text form")


def format_comparison(comparison: rule_pb2.Comparison) -> str:
    operator = comparison.operator
    if operator in _BARE:
        return _BARE[operator]
    if operator == _O.OPERATOR_BETWEEN:
        values = comparison.value.list_value.values
        if comparison.value.WhichOneof("kind") != "list_value" or len(values) != 2:
            raise ValueError("between needs a list of two values")
        return f"between {format_value(values[0])} and {format_value(values[1])}"
    if operator not in _SYMBOLS:
        raise ValueError(f"operator {operator} has no text form")
    return f"{_SYMBOLS[operator]} {format_value(comparison.value)}"


def _name(mapping: Mapping[_K, str], number: int, what: str) -> str:
    for key, name in mapping.items():
        if key == number:
            return name
    raise ValueError(f"{what} {number} has no text form")


def _segment(name: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]+", name) and (_IDENT.fullmatch(name) or not name[0].isalpha()):
        return name
    raise ValueError(f"path segment {name!r} has no text form")


def format_path(path: str, *, leading: bool) -> str:
    """A dotted path; a leading segment that is not a name is quoted with backticks."""
    parts = [_segment(part) for part in path.split(".")]
    if leading and not _IDENT.fullmatch(parts[0]):
        parts[0] = f"`{parts[0]}`"
    return ".".join(parts)


def format_window(window: rule_pb2.Window) -> str:
    kind = window.WhichOneof("window")
    if kind == "all_time":
        return "all time"
    if kind == "this_session":
        return "this session"
    if kind == "last":
        if window.last.nanos:
            raise ValueError("a window of a fraction of a second has no text form")
        seconds = window.last.seconds
        unit, size = next((u, s) for u, s in _UNITS if seconds % s == 0)
        count = seconds // size
        return f"last {count} {unit}{'' if count == 1 else 's'}"
    if kind == "between":
        return (
            f"between {format_timestamp(window.between.start_time)}"
            f" and {format_timestamp(window.between.end_time)}"
        )
    raise ValueError("a window needs a kind")


def _infix(rule: rule_pb2.Rule) -> bool:
    kind = rule.WhichOneof("node")
    return kind in ("all", "any") and len(getattr(rule, kind).rules) >= 2


def format_rule(rule: rule_pb2.Rule) -> str:
    """The rule's canonical text.

    Raises:
        ValueError: the tree has a part the text form cannot express (an unset node,
            operator or enum; such a tree also fails validation).
    """
    kind = rule.WhichOneof("node")
    if kind in ("all", "any"):
        children = getattr(rule, kind).rules
        if len(children) < 2:
            return f"{kind}(" + ", ".join(format_rule(child) for child in children) + ")"
        joiner = " and " if kind == "all" else " or "
        return joiner.join(
            f"({format_rule(child)})" if _infix(child) else format_rule(child) for child in children
        )
    if kind == "negation":
        inner = rule.negation
        text = format_rule(inner)
        inner_kind = inner.WhichOneof("node")
        if _infix(inner) or (inner_kind == "segment" and not inner.segment.negated):
            return f"not ({text})"
        return f"not {text}"
    if kind is None:
        raise ValueError("a rule node needs a kind")
    return _LEAF_PRINTERS[kind](rule)


def _print_attribute(rule: rule_pb2.Rule) -> str:
    node = rule.attribute
    return (
        f"attributes.{format_path(node.path, leading=False)} {format_comparison(node.comparison)}"
    )


def _filters(filters: list[rule_pb2.PropertyFilter]) -> str:
    if not filters:
        return ""
    return " where " + " and ".join(
        f"{format_path(item.path, leading=True)} {format_comparison(item.comparison)}"
        for item in filters
    )


def _print_behavior(rule: rule_pb2.Rule) -> str:
    node = rule.behavior
    head = _name(FUNCTION_NAMES, node.function, "function")
    prop = f"{format_path(node.property, leading=True)}, " if node.property else ""
    event = json.dumps(node.event_name, ensure_ascii=False)
    return (
        f"{head}({prop}event {event}{_filters(list(node.filters))}, "
        f"{format_window(node.window)}) {format_comparison(node.comparison)}"
    )


def _print_session(rule: rule_pb2.Rule) -> str:
    node = rule.session
    return (
        f"{_name(SESSION_NAMES, node.field, 'session field')} {format_comparison(node.comparison)}"
    )


def _print_context(rule: rule_pb2.Rule) -> str:
    node = rule.context
    return (
        f"{_name(CONTEXT_NAMES, node.field, 'context field')} {format_comparison(node.comparison)}"
    )


def _print_geo(rule: rule_pb2.Rule) -> str:
    node = rule.geo_distance
    return (
        f"location within {format_number(node.radius_km)} km of "
        f"({format_number(node.center.latitude)}, {format_number(node.center.longitude)})"
    )


def _print_campaign(rule: rule_pb2.Rule) -> str:
    node = rule.campaign
    parts = [
        _name(CAMPAIGN_CHANNEL_NAMES, node.channel, "campaign channel"),
        _name(CAMPAIGN_ACTION_NAMES, node.action, "campaign action"),
    ]
    if node.campaign_id:
        parts.append(json.dumps(node.campaign_id, ensure_ascii=False))
    parts.append(format_window(node.window))
    text = "campaign(" + ", ".join(parts) + ")"
    if node.HasField("comparison"):
        text += " " + format_comparison(node.comparison)
    return text


def _print_time(rule: rule_pb2.Rule) -> str:
    node = rule.time
    field = _name(TIME_FIELD_NAMES, node.field, "time field")
    if node.measure == rule_pb2.TIME_MEASURE_DAYS_SINCE:
        return f"days_since({field}) {format_comparison(node.comparison)}"
    if node.measure != rule_pb2.TIME_MEASURE_INSTANT:
        raise ValueError(f"time measure {node.measure} has no text form")
    return f"{field} {format_comparison(node.comparison)}"


def _print_affinity(rule: rule_pb2.Rule) -> str:
    node = rule.affinity
    action = _name(AFFINITY_ACTION_NAMES, node.action, "affinity action")
    dimension = _name(AFFINITY_DIMENSION_NAMES, node.dimension, "affinity dimension")
    value = json.dumps(node.value, ensure_ascii=False)
    return (
        f"affinity({action}, {dimension} {value}, {format_window(node.window)}) "
        f"{format_comparison(node.comparison)}"
    )


def _print_lifetime(rule: rule_pb2.Rule) -> str:
    node = rule.lifetime
    name = _name(LIFETIME_NAMES, node.metric, "lifetime metric")
    return f"{name} {format_comparison(node.comparison)}"


def _print_segment(rule: rule_pb2.Rule) -> str:
    node = rule.segment
    prefix = "not in" if node.negated else "in"
    return f"{prefix} segment {json.dumps(node.segment, ensure_ascii=False)}"


def _print_bucket(rule: rule_pb2.Rule) -> str:
    node = rule.random_bucket
    salt = json.dumps(node.salt, ensure_ascii=False) if node.salt else ""
    return f"random_bucket({salt}) between {node.min_bucket} and {node.max_bucket}"


def _print_rollup(rule: rule_pb2.Rule) -> str:
    node = rule.user_rollup
    return f"count(users where {format_rule(node.user_rule)}) {format_comparison(node.comparison)}"


_LEAF_PRINTERS: Mapping[str, Callable[[rule_pb2.Rule], str]] = {
    "attribute": _print_attribute,
    "behavior": _print_behavior,
    "session": _print_session,
    "context": _print_context,
    "geo_distance": _print_geo,
    "campaign": _print_campaign,
    "time": _print_time,
    "affinity": _print_affinity,
    "lifetime": _print_lifetime,
    "segment": _print_segment,
    "random_bucket": _print_bucket,
    "user_rollup": _print_rollup,
}


# --- Parsing ---


class RuleSyntaxError(AudienceError):
    """Rule text that does not parse, with the line and column (both from 1) of the fault."""

    def __init__(self, message: str, line: int, column: int, field: str) -> None:
        located = f"line {line}, column {column}: {message}"
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT,
            "RULE_SYNTAX_ERROR",
            f"The rule text does not parse: {located}.",
            metadata={"line": str(line), "column": str(column)},
            violations=(FieldViolation(field, located),),
        )
        self.line = line
        self.column = column
        self.detail = message


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # STRING NUMBER TIME NAME SEGMENT PUNCT END
    text: str
    offset: int


_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\n]+|\#[^\n]*)
  | (?P<STRING>"(?:[^"\\]|\\.)*")
  | (?P<TIME>@[0-9]{4}-[0-9]{2}-[0-9]{2}
        (?:T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?(?:Z|[+-][0-9]{2}:[0-9]{2}))?)
  | (?P<NUMBER>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![A-Za-z0-9_]))
  | (?P<QUOTED>`[A-Za-z0-9_-]+`)
  | (?P<NAME>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<PUNCT>!=|>=|<=|[()\[\],.=<>])
    """,
    re.VERBOSE,
)
_AFTER_DOT = re.compile(r"[A-Za-z0-9_-]+|`[A-Za-z0-9_-]+`")

MAX_TEXT_NESTING = 2 * MAX_DEPTH
"""How deep text may nest parentheses, brackets, `not`, groups and roll-ups. The text of
every valid rule fits (the printer nests one level per level of the tree), deeper text is
refused as it is read: the parser recurses once per level, and protobuf refuses a tree
past 100 nested messages (a group or a roll-up is two a level)."""


class _Parser:
    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        self.tokens = self._lex()
        self.index = 0
        self.depth = 0

    # Lexing.

    def _fail_at(self, offset: int, message: str) -> RuleSyntaxError:
        line = self.text.count("\n", 0, offset) + 1
        column = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return RuleSyntaxError(message, line, column, self.field)

    def _lex(self) -> list[_Token]:
        tokens: list[_Token] = []
        offset = 0
        text = self.text
        while offset < len(text):
            if tokens and tokens[-1].text == "." and tokens[-1].kind == "PUNCT":
                # After a dot comes a path segment, which may start with a digit or `-`.
                segment = _AFTER_DOT.match(text, offset)
                if segment is None:
                    raise self._fail_at(offset, "expected a path segment after '.'")
                tokens.append(_Token("SEGMENT", segment.group().strip("`"), offset))
                offset = segment.end()
                continue
            match = _TOKEN.match(text, offset)
            if match is None:
                raise self._fail_at(offset, f"unexpected character {text[offset]!r}")
            kind = match.lastgroup or ""
            if kind == "QUOTED":
                tokens.append(_Token("SEGMENT", match.group().strip("`"), offset))
            elif kind != "space":
                tokens.append(_Token(kind, match.group(), offset))
            offset = match.end()
        tokens.append(_Token("END", "", len(text)))
        return tokens

    # Helpers.

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def peek(self, ahead: int = 1) -> _Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def fail(self, expected: str, token: _Token | None = None) -> RuleSyntaxError:
        token = token or self.token
        found = "the end of the text" if token.kind == "END" else repr(token.text)
        return self._fail_at(token.offset, f"expected {expected}, found {found}")

    def at(self, *words: str) -> bool:
        for ahead, word in enumerate(words):
            token = self.peek(ahead)
            if token.kind not in ("NAME", "PUNCT") or token.text != word:
                return False
        return True

    def accept(self, *words: str) -> bool:
        if self.at(*words):
            self.index += len(words)
            return True
        return False

    def expect(self, *words: str) -> None:
        for word in words:
            if not self.accept(word):
                raise self.fail(repr(word))

    def advance(self) -> _Token:
        token = self.token
        self.index += 1
        return token

    @contextmanager
    def nested(self, opening: _Token) -> Iterator[None]:
        """One level of nesting, opened by ``opening``, for the duration of the block."""
        if self.depth == MAX_TEXT_NESTING:
            raise self._fail_at(
                opening.offset, f"the rule is nested more than {MAX_TEXT_NESTING} levels deep"
            )
        self.depth += 1
        yield
        self.depth -= 1

    def choose(self, mapping: Mapping[str, _K], what: str) -> _K:
        token = self.token
        if token.kind == "NAME" and token.text in mapping:
            self.index += 1
            return mapping[token.text]
        raise self.fail(f"{what} ({', '.join(sorted(mapping))})")

    # Rules.

    def parse(self) -> rule_pb2.Rule:
        rule = self.rule()
        if self.token.kind != "END":
            raise self.fail("'and', 'or' or the end of the rule")
        return rule

    def rule(self) -> rule_pb2.Rule:
        first = self.conjunction()
        if not self.at("or"):
            return first
        children = [first]
        while self.accept("or"):
            children.append(self.conjunction())
        return rule_pb2.Rule(any=rule_pb2.RuleGroup(rules=children))

    def conjunction(self) -> rule_pb2.Rule:
        first = self.unary()
        if not self.at("and"):
            return first
        children = [first]
        while self.accept("and"):
            children.append(self.unary())
        return rule_pb2.Rule(all=rule_pb2.RuleGroup(rules=children))

    def unary(self) -> rule_pb2.Rule:
        if self.at("not", "in", "segment"):
            self.index += 3
            return rule_pb2.Rule(
                segment=rule_pb2.SegmentCondition(segment=self.string(), negated=True)
            )
        token = self.token
        if self.accept("not"):
            with self.nested(token):
                return rule_pb2.Rule(negation=self.unary())
        return self.primary()

    def primary(self) -> rule_pb2.Rule:
        token = self.token
        if self.accept("("):
            with self.nested(token):
                inner = self.rule()
            self.expect(")")
            return inner
        if token.kind != "NAME":
            raise self.fail("a condition")
        word = token.text
        if word in ("all", "any") and self.peek().text == "(":
            self.index += 2
            children: list[rule_pb2.Rule] = []
            if not self.accept(")"):
                with self.nested(token):
                    children.append(self.rule())
                    while self.accept(","):
                        children.append(self.rule())
                self.expect(")")
            group = rule_pb2.RuleGroup(rules=children)
            return rule_pb2.Rule(all=group) if word == "all" else rule_pb2.Rule(any=group)
        handler = _CONDITIONS.get(word)
        if handler is None:
            raise self.fail("a condition")
        return handler(self)

    # Conditions.

    def dotted(self, prefix: str, names: Mapping[str, _K], what: str) -> _K:
        self.expect(prefix, ".")
        token = self.token
        if token.kind == "SEGMENT" and f"{prefix}.{token.text}" in names:
            self.index += 1
            return names[f"{prefix}.{token.text}"]
        options = sorted(name.split(".", 1)[1] for name in names if name.startswith(prefix))
        raise self.fail(f"{what} ({', '.join(options)})")

    def attribute(self) -> rule_pb2.Rule:
        self.expect("attributes", ".")
        path = self.path_rest(self.segment())
        return rule_pb2.Rule(
            attribute=rule_pb2.AttributeCondition(path=path, comparison=self.comparison())
        )

    def session(self) -> rule_pb2.Rule:
        prefix = self.token.text
        field = self.dotted(prefix, _SESSION_BY_NAME, "a session field")
        return rule_pb2.Rule(
            session=rule_pb2.SessionCondition(field=field, comparison=self.comparison())
        )

    def context(self) -> rule_pb2.Rule:
        prefix = self.token.text
        if prefix == "location" and self.peek().text == "within":
            return self.geo()
        field = self.dotted(prefix, _CONTEXT_BY_NAME, "a context field")
        return rule_pb2.Rule(
            context=rule_pb2.ContextCondition(field=field, comparison=self.comparison())
        )

    def geo(self) -> rule_pb2.Rule:
        self.expect("location", "within")
        radius = self.number()
        self.expect("km", "of", "(")
        latitude = self.number()
        self.expect(",")
        longitude = self.number()
        self.expect(")")
        return rule_pb2.Rule(
            geo_distance=rule_pb2.GeoDistanceCondition(
                center=common_pb2.GeoPoint(latitude=latitude, longitude=longitude),
                radius_km=radius,
            )
        )

    def lifetime(self) -> rule_pb2.Rule:
        metric = self.dotted("lifetime", _LIFETIME_BY_NAME, "a lifetime measure")
        return rule_pb2.Rule(
            lifetime=rule_pb2.LifetimeCondition(metric=metric, comparison=self.comparison())
        )

    def seen(self) -> rule_pb2.Rule:
        field = self.choose(_TIME_BY_NAME, "first_seen or last_seen")
        return rule_pb2.Rule(
            time=rule_pb2.TimeCondition(
                field=field, measure=rule_pb2.TIME_MEASURE_INSTANT, comparison=self.comparison()
            )
        )

    def days_since(self) -> rule_pb2.Rule:
        self.expect("days_since", "(")
        field = self.choose(_TIME_BY_NAME, "first_seen or last_seen")
        self.expect(")")
        return rule_pb2.Rule(
            time=rule_pb2.TimeCondition(
                field=field,
                measure=rule_pb2.TIME_MEASURE_DAYS_SINCE,
                comparison=self.comparison(),
            )
        )

    def segment_condition(self) -> rule_pb2.Rule:
        self.expect("in", "segment")
        return rule_pb2.Rule(segment=rule_pb2.SegmentCondition(segment=self.string()))

    def random_bucket(self) -> rule_pb2.Rule:
        self.expect("random_bucket", "(")
        salt = "" if self.at(")") else self.string()
        self.expect(")", "between")
        low = self.integer()
        self.expect("and")
        high = self.integer()
        return rule_pb2.Rule(
            random_bucket=rule_pb2.RandomBucketCondition(min_bucket=low, max_bucket=high, salt=salt)
        )

    def campaign(self) -> rule_pb2.Rule:
        self.expect("campaign", "(")
        channel = self.choose(_CHANNEL_BY_NAME, "a campaign channel")
        self.expect(",")
        action = self.choose(_ACTION_BY_NAME, "a campaign action")
        self.expect(",")
        node = rule_pb2.CampaignCondition(channel=channel, action=action)
        if self.token.kind == "STRING":
            node.campaign_id = self.string()
            self.expect(",")
        node.window.CopyFrom(self.window())
        self.expect(")")
        if self.comparison_ahead():
            node.comparison.CopyFrom(self.comparison())
        return rule_pb2.Rule(campaign=node)

    def affinity(self) -> rule_pb2.Rule:
        self.expect("affinity", "(")
        action = self.choose(_AFFINITY_ACTION_BY_NAME, "an affinity action")
        self.expect(",")
        dimension = self.choose(_AFFINITY_DIMENSION_BY_NAME, "an affinity dimension")
        value = self.string()
        self.expect(",")
        window = self.window()
        self.expect(")")
        return rule_pb2.Rule(
            affinity=rule_pb2.AffinityCondition(
                action=action,
                dimension=dimension,
                value=value,
                window=window,
                comparison=self.comparison(),
            )
        )

    def aggregate(self) -> rule_pb2.Rule:
        opening = self.token
        function = self.choose(_FUNCTION_BY_NAME, "an aggregate function")
        self.expect("(")
        if function == _F.AGGREGATE_FUNCTION_COUNT and self.accept("users"):
            self.expect("where")
            with self.nested(opening):
                user_rule = self.rule()
            self.expect(")")
            return rule_pb2.Rule(
                user_rollup=rule_pb2.UserRollupCondition(
                    user_rule=user_rule, comparison=self.comparison()
                )
            )
        node = rule_pb2.BehaviorCondition(function=function)
        if not (self.at("event") and self.peek().kind == "STRING"):
            node.property = self.path()
            self.expect(",")
        self.expect("event")
        node.event_name = self.string()
        if self.accept("where"):
            node.filters.append(self.property_filter())
            while self.accept("and"):
                node.filters.append(self.property_filter())
        self.expect(",")
        node.window.CopyFrom(self.window())
        self.expect(")")
        node.comparison.CopyFrom(self.comparison())
        return rule_pb2.Rule(behavior=node)

    def property_filter(self) -> rule_pb2.PropertyFilter:
        path = self.path()
        return rule_pb2.PropertyFilter(path=path, comparison=self.comparison())

    # Pieces.

    def segment(self) -> str:
        token = self.token
        if token.kind in ("SEGMENT", "NAME"):
            self.index += 1
            return token.text
        raise self.fail("a name")

    def path_rest(self, first: str) -> str:
        parts = [first]
        while self.accept("."):
            parts.append(self.segment())
        return ".".join(parts)

    def path(self) -> str:
        return self.path_rest(self.segment())

    def string(self) -> str:
        token = self.token
        if token.kind != "STRING":
            raise self.fail("a string")
        self.index += 1
        try:
            value: str = json.loads(token.text)
        except json.JSONDecodeError as error:
            raise self._fail_at(token.offset + error.pos, f"bad string: {error.msg}") from None
        if any("\ud800" <= char <= "\udfff" for char in value):
            raise self._fail_at(token.offset, "the string holds an unpaired surrogate escape")
        return value

    def number(self) -> float:
        token = self.token
        if token.kind != "NUMBER":
            raise self.fail("a number")
        self.index += 1
        return float(token.text)

    def integer(self) -> int:
        token = self.token
        if token.kind != "NUMBER" or not re.fullmatch(r"-?[0-9]+", token.text):
            raise self.fail("a whole number")
        self.index += 1
        value = int(token.text)
        if not -(2**31) <= value < 2**31:
            raise self._fail_at(token.offset, "the number is out of range")
        return value

    def timestamp(self) -> timestamp_pb2.Timestamp:
        token = self.token
        if token.kind != "TIME":
            raise self.fail("a timestamp such as @2024-01-31T12:00:00Z")
        self.index += 1
        parsed = _parse_time(token.text[1:])
        if parsed is None:
            raise self._fail_at(token.offset, f"{token.text!r} is not a valid timestamp")
        return parsed

    def window(self) -> rule_pb2.Window:
        if self.accept("all", "time"):
            return rule_pb2.Window(all_time=rule_pb2.AllTime())
        if self.accept("this", "session"):
            return rule_pb2.Window(this_session=rule_pb2.ThisSession())
        if self.accept("last"):
            start = self.token
            count = self.integer()
            token = self.token
            unit = token.text.removesuffix("s") if token.kind == "NAME" else ""
            sizes = dict(_UNITS)
            if unit not in sizes:
                raise self.fail("a unit (minutes, hours or days)")
            self.index += 1
            if count < 0:
                raise self._fail_at(start.offset, "a window cannot be negative")
            return rule_pb2.Window(last=duration_pb2.Duration(seconds=count * sizes[unit]))
        if self.accept("between"):
            start_time = self.timestamp()
            self.expect("and")
            end_time = self.timestamp()
            return rule_pb2.Window(
                between=rule_pb2.TimeRange(start_time=start_time, end_time=end_time)
            )
        raise self.fail("a window (all time, this session, last N days, between … and …)")

    def value(self) -> common_pb2.Value:
        token = self.token
        if token.kind == "STRING":
            return common_pb2.Value(string_value=self.string())
        if token.kind == "NUMBER":
            return common_pb2.Value(number_value=self.number())
        if token.kind == "TIME":
            return common_pb2.Value(timestamp_value=self.timestamp())
        if self.accept("true"):
            return common_pb2.Value(bool_value=True)
        if self.accept("false"):
            return common_pb2.Value(bool_value=False)
        if self.accept("null"):
            return common_pb2.Value(null_value=struct_pb2.NULL_VALUE)
        if self.accept("["):
            items: list[common_pb2.Value] = []
            if not self.accept("]"):
                with self.nested(token):
                    items.append(self.value())
                    while self.accept(","):
                        items.append(self.value())
                self.expect("]")
            return common_pb2.Value(list_value=common_pb2.ValueList(values=items))
        raise self.fail("a value")

    def comparison_ahead(self) -> bool:
        token = self.token
        if token.kind == "PUNCT":
            return token.text in ("=", "!=", ">", ">=", "<", "<=")
        return token.kind == "NAME" and (
            token.text in ("in", "contains", "starts", "ends", "between", "exists", "is")
            or self.at("not", "in")
            or self.at("not", "contains")
            or self.at("not", "exists")
        )

    def comparison(self) -> rule_pb2.Comparison:
        for operator, words in _BARE_WORDS:
            if self.accept(*words):
                return rule_pb2.Comparison(operator=operator)
        if self.accept("between"):
            low = self.value()
            self.expect("and")
            high = self.value()
            return rule_pb2.Comparison(
                operator=_O.OPERATOR_BETWEEN,
                value=common_pb2.Value(list_value=common_pb2.ValueList(values=[low, high])),
            )
        for operator, words in _VALUE_WORDS:
            if self.accept(*words):
                return rule_pb2.Comparison(operator=operator, value=self.value())
        raise self.fail("a comparison (=, !=, <, in, contains, between, exists, …)")


_SESSION_BY_NAME = _invert(SESSION_NAMES)
_CONTEXT_BY_NAME = _invert(CONTEXT_NAMES)
_LIFETIME_BY_NAME = _invert(LIFETIME_NAMES)
_TIME_BY_NAME = _invert(TIME_FIELD_NAMES)
_FUNCTION_BY_NAME = _invert(FUNCTION_NAMES)
_CHANNEL_BY_NAME = _invert(CAMPAIGN_CHANNEL_NAMES)
_ACTION_BY_NAME = _invert(CAMPAIGN_ACTION_NAMES)
_AFFINITY_ACTION_BY_NAME = _invert(AFFINITY_ACTION_NAMES)
_AFFINITY_DIMENSION_BY_NAME = _invert(AFFINITY_DIMENSION_NAMES)
_BARE_WORDS = [(operator, tuple(text.split())) for operator, text in _BARE.items()]
# Longest first, so that `not in` is tried before `in` and `>=` before `>`.
_VALUE_WORDS = sorted(
    ((operator, tuple(text.split())) for operator, text in _SYMBOLS.items()),
    key=lambda item: -len(item[1]),
)

_CONDITIONS: Mapping[str, Callable[[_Parser], rule_pb2.Rule]] = {
    "attributes": _Parser.attribute,
    "cart": _Parser.session,
    "session": _Parser.session,
    "location": _Parser.context,
    "weather": _Parser.context,
    "device": _Parser.context,
    "lifetime": _Parser.lifetime,
    "first_seen": _Parser.seen,
    "last_seen": _Parser.seen,
    "days_since": _Parser.days_since,
    "in": _Parser.segment_condition,
    "random_bucket": _Parser.random_bucket,
    "campaign": _Parser.campaign,
    "affinity": _Parser.affinity,
    **dict.fromkeys(FUNCTION_NAMES.values(), _Parser.aggregate),
}

_TIME_TEXT = re.compile(
    r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})"
    r"(?:T(?P<h>[0-9]{2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]{1,9}))?)?"
    r"(?P<z>Z|[+-][0-9]{2}:[0-9]{2}))?"
)


def _parse_time(text: str) -> timestamp_pb2.Timestamp | None:
    match = _TIME_TEXT.fullmatch(text)
    if match is None:
        return None
    try:
        day = date(int(match["y"]), int(match["mo"]), int(match["d"]))
    except ValueError:
        return None
    hour, minute, second = int(match["h"] or 0), int(match["mi"] or 0), int(match["s"] or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    offset = 0
    zone = match["z"] or "Z"
    if zone != "Z":
        zone_hours, zone_minutes = int(zone[1:3]), int(zone[4:6])
        if zone_hours > 23 or zone_minutes > 59:
            return None
        offset = (zone_hours * 3600 + zone_minutes * 60) * (1 if zone[0] == "+" else -1)
    days = day.toordinal() - date(1970, 1, 1).toordinal()
    seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset
    nanos = int((match["f"] or "").ljust(9, "0"))
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def parse_rule(text: str, *, field: str = "rule_text") -> rule_pb2.Rule:
    """Parses rule text into the tree.

    Args:
        text: the rule in its text form.
        field: the request field the text came from, named in the error's field violation.

    Raises:
        RuleSyntaxError: the text does not parse (an ``INVALID_ARGUMENT`` with the line and
            column in the message, the violation and the ``ErrorInfo`` metadata).
    """
    return _Parser(text, field).parse()
