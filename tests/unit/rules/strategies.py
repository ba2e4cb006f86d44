"""Hypothesis strategies for rules and evaluation views.

Values come from small pools on purpose, so that generated operands often equal generated
values (the interesting case for an evaluator) and include hostile text: quotes,
semicolons, comments, backslashes, dollar signs and non-ASCII.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import strategies as st

from audience.rules import DAY, HOUR, MINUTE, SECOND, Instant, View, bucket_start
from audience.rules.aggregates import BucketState, Series, series_from_buckets
from audience.rules.values import AttrValue, value_to_proto
from audience.v1 import common_pb2, event_pb2, profile_pb2, rule_pb2, segment_pb2

USER = segment_pb2.SEGMENT_KIND_USER
ACCOUNT = segment_pb2.SEGMENT_KIND_ACCOUNT
_O = rule_pb2.Operator

# 2023-11-14T22:13:20Z: the base `now`; the differential tests move it around.
BASE_NOW = 1_700_000_000_000_000
# Midnight UTC, and one microsecond either side: day and bucket boundaries.
MIDNIGHT = BASE_NOW - BASE_NOW % DAY
NOWS = [
    BASE_NOW,
    BASE_NOW + 123_456,
    MIDNIGHT,
    MIDNIGHT - 1,
    MIDNIGHT + 1,
    MIDNIGHT + HOUR - 1,
    # 2024-03-10T07:00:00Z, when the US moved its clocks (irrelevant to UTC instants).
    1_710_054_000_000_000,
]

HOSTILE = [
    "",
    "a",
    "b",
    "ab",
    "US",
    "shoes",
    "web",
    "O'Brien",
    "x'; DROP TABLE profiles; --",
    "/* comment */",
    "$1",
    'a"b',
    "back\\slash",
    "é",
    "日本",
    "Z",
    "zz",
    "\u00a0",
    "%_",
]
SEGMENT_USER = "datasets/d/segments/loyal"
SEGMENT_IMPORTED = "datasets/d/segments/crm-list"
SEGMENT_ACCOUNT = "datasets/d/segments/big-accounts"
BETWEEN_WINDOWS = [
    (MIDNIGHT - 7 * DAY, MIDNIGHT),
    (MIDNIGHT - 3 * HOUR, MIDNIGHT + 5 * HOUR),
    (BASE_NOW - 17 * SECOND - 60 * MINUTE, BASE_NOW + 3 * SECOND),
]
EVENT_NAMES = ["product_view", "order_completed", "page_view", "sign-up:v2.x"]


def strings() -> st.SearchStrategy[str]:
    return st.sampled_from(HOSTILE) | st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        max_size=5,
    )


def numbers() -> st.SearchStrategy[float]:
    return st.sampled_from(
        [0.0, -0.0, 1.0, 2.0, 3.0, -1.0, 0.5, 100.0, 99.99, 1e300, -1e-300, 5e-324]
    ) | st.floats(allow_nan=False, allow_infinity=False)


def instants() -> st.SearchStrategy[int]:
    offsets = st.sampled_from([0, -1, 1, -DAY, -30 * DAY, 7 * DAY, -SECOND, -365 * DAY])
    return st.one_of(
        st.builds(lambda now, offset: now + offset, st.sampled_from(NOWS), offsets),
        st.integers(-2_208_988_800 * SECOND, 7_258_118_400 * SECOND),  # 1900 to 2200
    )


STRINGS = strings()
NUMBERS = numbers()
INSTANTS = instants()
SCALARS: st.SearchStrategy[AttrValue] = st.one_of(
    STRINGS, NUMBERS, st.booleans(), INSTANTS.map(Instant)
)
ATTRIBUTE_VALUES: st.SearchStrategy[AttrValue] = st.one_of(
    st.none(),
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(st.sampled_from(["city", "zip", "n"]), SCALARS, max_size=2),
)


def scalars() -> st.SearchStrategy[AttrValue]:
    return SCALARS


ATTRIBUTE_PATHS = ["plan", "age", "tags", "signup", "score", "address", "address.city", "x-y"]


ATTRIBUTES = st.dictionaries(
    st.sampled_from(["plan", "age", "tags", "signup", "score", "address", "x-y"]),
    ATTRIBUTE_VALUES,
    max_size=5,
)


# --- Rules. ---


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, rest = divmod(micros, SECOND)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


def _value(value: AttrValue) -> common_pb2.Value:
    return value_to_proto(value)


def _list(values: Iterable[AttrValue]) -> common_pb2.Value:
    return common_pb2.Value(
        list_value=common_pb2.ValueList(values=[value_to_proto(item) for item in values])
    )


_CLASS: dict[str, Any] = {
    "s": lambda: STRINGS,
    "n": lambda: NUMBERS,
    "b": st.booleans,
    "t": lambda: INSTANTS.map(Instant),
}
_TYPED_CLASS = {"number": "n", "string": "s", "bool": "b", "timestamp": "t"}
_NO_OPERAND = [
    _O.OPERATOR_EXISTS,
    _O.OPERATOR_NOT_EXISTS,
    _O.OPERATOR_IS_EMPTY,
    _O.OPERATOR_IS_NOT_EMPTY,
]
_ORDERING = [
    _O.OPERATOR_GREATER_THAN,
    _O.OPERATOR_GREATER_THAN_OR_EQUAL,
    _O.OPERATOR_LESS_THAN,
    _O.OPERATOR_LESS_THAN_OR_EQUAL,
]


def _sorted_pair(klass: str) -> st.SearchStrategy[tuple[Any, Any]]:
    return st.tuples(_CLASS[klass](), _CLASS[klass]()).map(lambda pair: tuple(sorted(pair)))


@st.composite
def comparisons(draw: st.DrawFn, field_type: str) -> rule_pb2.Comparison:
    """A valid comparison for a field type: ``any``, ``number``, ``string``, ``bool``,
    ``timestamp``."""
    operators = [*_NO_OPERAND, _O.OPERATOR_EQUALS, _O.OPERATOR_NOT_EQUALS]
    operators += [_O.OPERATOR_IN, _O.OPERATOR_NOT_IN]
    if field_type in ("any", "string"):
        operators += [
            _O.OPERATOR_CONTAINS,
            _O.OPERATOR_NOT_CONTAINS,
            _O.OPERATOR_STARTS_WITH,
            _O.OPERATOR_ENDS_WITH,
        ]
    if field_type != "bool":
        operators += [*_ORDERING, _O.OPERATOR_BETWEEN]
    operator = draw(st.sampled_from(operators))
    comparison = rule_pb2.Comparison(operator=operator)
    if operator in _NO_OPERAND:
        return comparison
    if field_type == "any":
        if operator in (_O.OPERATOR_STARTS_WITH, _O.OPERATOR_ENDS_WITH):
            klass = "s"
        elif operator in _ORDERING or operator == _O.OPERATOR_BETWEEN:
            klass = draw(st.sampled_from(["s", "n", "t"]))
        else:
            klass = draw(st.sampled_from(["s", "n", "b", "t"]))
    else:
        klass = _TYPED_CLASS[field_type]
    if operator == _O.OPERATOR_BETWEEN:
        comparison.value.CopyFrom(_list(draw(_sorted_pair(klass))))
    elif operator in (_O.OPERATOR_IN, _O.OPERATOR_NOT_IN):
        if field_type == "any":
            items = draw(st.lists(SCALARS, min_size=1, max_size=4))
        else:
            items = draw(st.lists(_CLASS[klass](), min_size=1, max_size=4))
        comparison.value.CopyFrom(_list(items))
    else:
        comparison.value.CopyFrom(_value(draw(_CLASS[klass]())))
    return comparison


def numeric_comparisons() -> st.SearchStrategy[rule_pb2.Comparison]:
    """Comparisons of counts: small operands, so that they are often met exactly."""
    small = st.integers(0, 6).map(float) | st.sampled_from([0.5, 2.5, -1.0])

    @st.composite
    def build(draw: st.DrawFn) -> rule_pb2.Comparison:
        operator = draw(
            st.sampled_from(
                [_O.OPERATOR_EQUALS, _O.OPERATOR_NOT_EQUALS, *_ORDERING, _O.OPERATOR_BETWEEN]
            )
        )
        if operator == _O.OPERATOR_BETWEEN:
            low, high = sorted((draw(small), draw(small)))
            return rule_pb2.Comparison(operator=operator, value=_list([low, high]))
        return rule_pb2.Comparison(operator=operator, value=_value(draw(small)))

    return st.one_of(build(), comparisons("number"))


def windows() -> st.SearchStrategy[rule_pb2.Window]:
    last = st.sampled_from([1, 5, 30, 60, 90, 24 * 60, 7 * 24 * 60, 30 * 24 * 60]).map(
        lambda minutes: rule_pb2.Window(last=duration_pb2.Duration(seconds=minutes * 60))
    )
    between = st.sampled_from(BETWEEN_WINDOWS).map(
        lambda pair: rule_pb2.Window(
            between=rule_pb2.TimeRange(start_time=_timestamp(pair[0]), end_time=_timestamp(pair[1]))
        )
    )
    return st.one_of(
        last,
        between,
        st.just(rule_pb2.Window(all_time=rule_pb2.AllTime())),
        st.just(rule_pb2.Window(this_session=rule_pb2.ThisSession())),
    )


def _property_filters() -> st.SearchStrategy[list[rule_pb2.PropertyFilter]]:
    one = st.builds(
        lambda path, comparison: rule_pb2.PropertyFilter(path=path, comparison=comparison),
        st.sampled_from(["category", "price", "context.location.country", "2fa"]),
        comparisons("any"),
    )
    return st.lists(one, max_size=2)


@st.composite
def behaviors(draw: st.DrawFn) -> rule_pb2.Rule:
    function = draw(st.sampled_from(_FUNCTIONS))
    node = rule_pb2.BehaviorCondition(
        event_name=draw(st.sampled_from(EVENT_NAMES)),
        filters=draw(_property_filters()),
        function=function,
        window=draw(windows()),
    )
    if function in _PROPERTY_FUNCTIONS:
        node.property = draw(st.sampled_from(["price", "revenue", "product_id"]))
    if function in _TIME_FUNCTIONS:
        node.comparison.CopyFrom(draw(comparisons("timestamp")))
    else:
        node.comparison.CopyFrom(draw(numeric_comparisons()))
    return rule_pb2.Rule(behavior=node)


def _values(enum: Any) -> list[Any]:
    return [value for value in enum.values() if value]


_F = rule_pb2.AggregateFunction
_FUNCTIONS = _values(_F)
_PROPERTY_FUNCTIONS = {
    _F.AGGREGATE_FUNCTION_SUM,
    _F.AGGREGATE_FUNCTION_MIN,
    _F.AGGREGATE_FUNCTION_MAX,
    _F.AGGREGATE_FUNCTION_AVERAGE,
    _F.AGGREGATE_FUNCTION_DISTINCT_COUNT,
}
_TIME_FUNCTIONS = {_F.AGGREGATE_FUNCTION_FIRST_TIME, _F.AGGREGATE_FUNCTION_LAST_TIME}


def _leaf(**fields: Any) -> rule_pb2.Rule:
    return rule_pb2.Rule(**fields)


_SESSION_TYPES = {
    1: "number",
    2: "number",
    3: "number",
    4: "string",
    5: "string",
    6: "string",
    7: "string",
    8: "string",
    9: "string",
    10: "string",
    11: "string",
    12: "string",
    13: "number",
    14: "bool",
}
_CONTEXT_TYPES = {1: "string", 2: "string", 3: "string", 4: "string", 5: "string"}
_CONTEXT_TYPES |= {6: "number", 7: "string", 8: "string", 9: "string"}


@st.composite
def session_conditions(draw: st.DrawFn) -> rule_pb2.Rule:
    field = draw(st.sampled_from(sorted(_SESSION_TYPES)))
    return _leaf(
        session=rule_pb2.SessionCondition(
            field=rule_pb2.SessionField.ValueType(field),
            comparison=draw(comparisons(_SESSION_TYPES[field])),
        )
    )


@st.composite
def context_conditions(draw: st.DrawFn) -> rule_pb2.Rule:
    field = draw(st.sampled_from(sorted(_CONTEXT_TYPES)))
    return _leaf(
        context=rule_pb2.ContextCondition(
            field=rule_pb2.ContextField.ValueType(field),
            comparison=draw(comparisons(_CONTEXT_TYPES[field])),
        )
    )


CENTERS = [(40.7128, -74.006), (0.0, 0.0), (-33.8688, 151.2093), (89.9, 179.9)]


@st.composite
def geo_conditions(draw: st.DrawFn) -> rule_pb2.Rule:
    latitude, longitude = draw(st.sampled_from(CENTERS))
    radius = draw(st.sampled_from([0.001, 1.0, 10.0, 500.0, 20_000.0]) | st.floats(0.01, 20_000))
    return _leaf(
        geo_distance=rule_pb2.GeoDistanceCondition(
            center=common_pb2.GeoPoint(latitude=latitude, longitude=longitude), radius_km=radius
        )
    )


@st.composite
def campaign_conditions(draw: st.DrawFn) -> rule_pb2.Rule:
    node = rule_pb2.CampaignCondition(
        channel=draw(st.sampled_from(_values(event_pb2.CampaignChannel))),
        action=draw(st.sampled_from(_values(event_pb2.CampaignAction))),
        campaign_id=draw(st.sampled_from(["", "spring", "o'sale"])),
        window=draw(windows()),
    )
    if draw(st.booleans()):
        node.comparison.CopyFrom(draw(numeric_comparisons()))
    return _leaf(campaign=node)


@st.composite
def time_conditions(draw: st.DrawFn) -> rule_pb2.Rule:
    measure = draw(st.sampled_from(_values(rule_pb2.TimeMeasure)))
    comparison = (
        draw(comparisons("timestamp"))
        if measure == rule_pb2.TIME_MEASURE_INSTANT
        else draw(numeric_comparisons() | comparisons("number"))
    )
    return _leaf(
        time=rule_pb2.TimeCondition(
            field=draw(st.sampled_from(_values(rule_pb2.TimeField))),
            measure=measure,
            comparison=comparison,
        )
    )


@st.composite
def affinity_conditions(draw: st.DrawFn) -> rule_pb2.Rule:
    return _leaf(
        affinity=rule_pb2.AffinityCondition(
            action=draw(st.sampled_from(_values(rule_pb2.AffinityAction))),
            dimension=draw(st.sampled_from(_values(rule_pb2.AffinityDimension))),
            value=draw(st.sampled_from(["shoes", "acme", "sku-1", "O'Neil"])),
            window=draw(windows()),
            comparison=draw(numeric_comparisons()),
        )
    )


@st.composite
def lifetime_conditions(draw: st.DrawFn) -> rule_pb2.Rule:
    return _leaf(
        lifetime=rule_pb2.LifetimeCondition(
            metric=draw(st.sampled_from(_values(rule_pb2.LifetimeMetric))),
            comparison=draw(numeric_comparisons() | comparisons("number")),
        )
    )


@st.composite
def attribute_conditions(draw: st.DrawFn) -> rule_pb2.Rule:
    return _leaf(
        attribute=rule_pb2.AttributeCondition(
            path=draw(st.sampled_from(ATTRIBUTE_PATHS)), comparison=draw(comparisons("any"))
        )
    )


@st.composite
def random_buckets(draw: st.DrawFn) -> rule_pb2.Rule:
    low = draw(st.integers(0, 99))
    high = draw(st.integers(low, 99))
    salt = draw(st.sampled_from(["", "exp-1", "B_2"]))
    return _leaf(
        random_bucket=rule_pb2.RandomBucketCondition(min_bucket=low, max_bucket=high, salt=salt)
    )


def segment_conditions(names: Sequence[str]) -> st.SearchStrategy[rule_pb2.Rule]:
    return st.builds(
        lambda name, negated: _leaf(
            segment=rule_pb2.SegmentCondition(segment=name, negated=negated)
        ),
        st.sampled_from(list(names)),
        st.booleans(),
    )


def user_leaves(segments: Sequence[str] = ()) -> st.SearchStrategy[rule_pb2.Rule]:
    leaves = [
        attribute_conditions(),
        behaviors(),
        behaviors(),
        session_conditions(),
        context_conditions(),
        geo_conditions(),
        campaign_conditions(),
        time_conditions(),
        affinity_conditions(),
        lifetime_conditions(),
        random_buckets(),
    ]
    if segments:
        leaves.append(segment_conditions(segments))
    return st.one_of(leaves)


def trees(
    leaves: st.SearchStrategy[rule_pb2.Rule], max_leaves: int = 6
) -> st.SearchStrategy[rule_pb2.Rule]:
    def extend(children: st.SearchStrategy[rule_pb2.Rule]) -> st.SearchStrategy[rule_pb2.Rule]:
        groups = st.lists(children, max_size=3)
        return st.one_of(
            groups.map(lambda rules: rule_pb2.Rule(all=rule_pb2.RuleGroup(rules=rules))),
            groups.map(lambda rules: rule_pb2.Rule(any=rule_pb2.RuleGroup(rules=rules))),
            children.map(lambda rule: rule_pb2.Rule(negation=rule)),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


def user_rules(segments: Sequence[str] = ()) -> st.SearchStrategy[rule_pb2.Rule]:
    return trees(user_leaves(segments))


@st.composite
def rollups(draw: st.DrawFn, segments: Sequence[str] = ()) -> rule_pb2.Rule:
    return _leaf(
        user_rollup=rule_pb2.UserRollupCondition(
            user_rule=draw(trees(user_leaves(segments), max_leaves=3)),
            comparison=draw(numeric_comparisons()),
        )
    )


def account_rules(
    user_segments: Sequence[str] = (), account_segments: Sequence[str] = ()
) -> st.SearchStrategy[rule_pb2.Rule]:
    leaves = [
        attribute_conditions(),
        time_conditions(),
        lifetime_conditions(),
        random_buckets(),
        rollups(user_segments),
    ]
    if account_segments:
        leaves.append(segment_conditions(account_segments))
    return trees(st.one_of(leaves), max_leaves=4)


# --- Views. ---


def windows_of(rule: rule_pb2.Rule) -> list[rule_pb2.Window]:
    """Every window in a rule tree."""
    found: list[rule_pb2.Window] = []

    def walk(node: rule_pb2.Rule) -> None:
        kind = node.WhichOneof("node")
        if kind in ("all", "any"):
            for child in getattr(node, kind).rules:
                walk(child)
        elif kind == "negation":
            walk(node.negation)
        elif kind == "user_rollup":
            walk(node.user_rollup.user_rule)
        elif kind in ("behavior", "campaign", "affinity"):
            found.append(getattr(node, kind).window)

    walk(rule)
    return found


def boundaries(rule: rule_pb2.Rule, now: int) -> list[int]:
    """Instants where the rule's windows begin or end at ``now``."""
    points = [now]
    for window in windows_of(rule):
        kind = window.WhichOneof("window")
        if kind == "last":
            points.append(now - window.last.seconds * SECOND)
        elif kind == "between":
            points.append(window.between.start_time.seconds * SECOND)
            points.append(window.between.end_time.seconds * SECOND)
    return points


_BUCKET_NUMBERS = st.sampled_from([0.0, 1.0, 2.5, -3.0]) | st.floats(-1e6, 1e6)
_DISTINCT = st.lists(st.sampled_from(["s:a", "s:b", "n:1.0", "b:true"]), max_size=3)


@st.composite
def bucket_series(draw: st.DrawFn, width: int, points: Sequence[int], family: int) -> Series | None:
    """Buckets of one aggregate, clustered at the window boundaries ``points``."""
    if draw(st.integers(0, 4)) == 0:
        return None
    if width == 0:
        starts = {0}
    else:
        starts = set()
        for _ in range(draw(st.integers(1, 4))):
            point = points[draw(st.integers(0, len(points) - 1))]
            jitter = draw(st.integers(-1, 1))
            step = draw(st.integers(-2, 1))
            starts.add(bucket_start(point + jitter, width) + step * width)
    buckets = []
    for start in sorted(starts):
        if width:
            first = start + draw(st.integers(0, width - 1))
            last = max(first, start + draw(st.integers(0, width - 1)))
        else:
            first = draw(INSTANTS)
            last = max(first, draw(INSTANTS))
        low = draw(_BUCKET_NUMBERS)
        high = max(low, draw(_BUCKET_NUMBERS))
        has_values = family != _F.AGGREGATE_FUNCTION_COUNT and draw(st.booleans())
        buckets.append(
            BucketState(
                start,
                draw(st.integers(1, 4)),
                draw(_BUCKET_NUMBERS) if family == _F.AGGREGATE_FUNCTION_SUM else 0.0,
                low if has_values else None,
                high if has_values else None,
                first,
                last,
                (
                    tuple(sorted(set(draw(_DISTINCT))))
                    if family == _F.AGGREGATE_FUNCTION_DISTINCT_COUNT
                    else ()
                ),
            )
        )
    return series_from_buckets(buckets)


_TEXTS = st.none() | STRINGS
_OPTIONAL_NUMBERS = st.none() | NUMBERS
_OPTIONAL_INSTANTS = st.none() | INSTANTS
_LATITUDES = st.floats(-90, 90)
_LONGITUDES = st.floats(-180, 180)


@st.composite
def views(
    draw: st.DrawFn,
    subject_id: str,
    specs: Sequence[profile_pb2.AggregateSpec],
    points: Sequence[int],
    account_ids: Sequence[str] = (),
) -> View:
    """An evaluation view with buckets for ``specs`` near ``points``."""
    session: dict[str, Any] = {}
    if draw(st.booleans()):
        if draw(st.booleans()):
            start = points[draw(st.integers(0, len(points) - 1))]
            start += draw(st.integers(-2, 2)) * SECOND + draw(st.integers(-1, 1))
        else:
            start = draw(INSTANTS)
        session = {
            "session_start": start,
            "cart_value": draw(NUMBERS),
            "cart_item_count": draw(st.integers(0, 5)),
            "page_view_count": draw(st.integers(0, 5)),
            "landing_page": draw(_TEXTS),
            "source": draw(_TEXTS),
            "referrer": draw(_TEXTS),
            "utm_source": draw(_TEXTS),
            "utm_medium": draw(_TEXTS),
            "utm_campaign": draw(_TEXTS),
            "utm_term": draw(_TEXTS),
            "utm_content": draw(_TEXTS),
            "channel": draw(_CHANNELS),
            "is_new_visitor": draw(st.booleans()),
        }
    place: dict[str, Any] = {}
    if draw(st.booleans()):
        latitude, longitude = CENTERS[draw(st.integers(0, len(CENTERS) - 1))]
        place = {
            "latitude": draw(st.sampled_from([latitude, latitude + 0.05, -latitude]) | _LATITUDES),
            "longitude": draw(st.sampled_from([longitude, longitude - 0.1]) | _LONGITUDES),
        }
    aggregates = {}
    for spec in specs:
        series = draw(bucket_series(spec.bucket_width.ToMicroseconds(), points, spec.function))
        if series is not None:
            aggregates[spec.aggregate_id] = series
    account_id = None
    if account_ids and draw(st.integers(0, 5)) > 0:
        account_id = account_ids[draw(st.integers(0, len(account_ids) - 1))]
    return View(
        subject_id=subject_id,
        attributes=draw(ATTRIBUTES),
        visit_count=draw(st.integers(0, 3)),
        country=draw(_TEXTS),
        region=draw(_TEXTS),
        city=draw(_TEXTS),
        postal_code=draw(_TEXTS),
        weather_condition=draw(_WEATHER),
        temperature_celsius=draw(_OPTIONAL_NUMBERS),
        device_type=draw(_DEVICES),
        os=draw(_TEXTS),
        browser=draw(_TEXTS),
        first_seen=draw(_OPTIONAL_INSTANTS),
        last_seen=draw(_OPTIONAL_INSTANTS),
        lifetime_value=draw(NUMBERS),
        order_count=draw(st.integers(0, 4)),
        account_id=account_id,
        aggregates=aggregates,
        **place,
        **session,
    )


_CHANNELS = st.none() | st.sampled_from(["web", "app", "email"])
_WEATHER = st.none() | st.sampled_from(["rain", "clear"])
_DEVICES = st.none() | st.sampled_from(["mobile", "desktop"])
