"""Compiled rules: the Python predicate's semantics, timers, explanations, keys and SQL shape."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.unit.rules.strategies as gen
from audience.rules import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    BucketState,
    CompiledRule,
    ImportedMembers,
    Instant,
    View,
    bucket_start,
    compile_rule,
    parse_rule,
    random_bucket,
    rollup_key,
    series_from_buckets,
)
from audience.rules.compiler import Threshold
from audience.rules.sql import SqlSegment
from audience.v1 import common_pb2, rule_pb2, segment_pb2

NOW = gen.BASE_NOW
ACCOUNT = segment_pb2.SEGMENT_KIND_ACCOUNT


def _rule(text: str, kind: int = segment_pb2.SEGMENT_KIND_USER) -> CompiledRule:
    return compile_rule(parse_rule(text), kind)


def _matches(text: str, **fields: object) -> bool:
    return _rule(text).matches(View(subject_id="u", **fields), NOW)  # type: ignore[arg-type]


def _counts(rule: CompiledRule, *times: int) -> View:
    """A view where the rule's (only) aggregate counted one event at each time."""
    (spec,) = rule.aggregates
    width = spec.bucket_width.ToMicroseconds()
    buckets: dict[int, BucketState] = {}
    for moment in times:
        start = bucket_start(moment, width)
        old = buckets.get(start)
        count = old.count + 1 if old else 1
        first = min(old.first_time or moment, moment) if old else moment
        last = max(old.last_time or moment, moment) if old else moment
        buckets[start] = BucketState(start, count, float(count), 1.0, 2.0, first, last)
    return View(
        subject_id="u", aggregates={spec.aggregate_id: series_from_buckets(buckets.values())}
    )


def test_leaving_when_cart_passes_threshold() -> None:
    rule = _rule('cart.value < 100 and location.country = "US"')
    shopper = View(subject_id="u", cart_value=80.0, country="US")
    assert rule.matches(shopper, NOW)
    richer = View(subject_id="u", cart_value=100.01, country="US")
    assert not rule.matches(richer, NOW)
    before, after = rule.leaf_mask(shopper, NOW), rule.leaf_mask(richer, NOW)
    assert rule.flipped(before, after) == ("cart.value < 100",)


@pytest.mark.parametrize(
    ("text", "attributes", "expected"),
    [
        ("attributes.age = 30", {"age": 30.0}, True),
        ('attributes.age = "30"', {"age": 30.0}, False),
        ("attributes.vip = 1", {"vip": True}, False),
        ("attributes.vip = true", {"vip": True}, True),
        ("attributes.age > 3", {"age": "4"}, False),
        ('attributes.name > "Z"', {"name": "a"}, True),
        ("attributes.age != 30", {}, True),
        ("attributes.age = 30", {}, False),
        ("attributes.age not in [30]", {"age": None}, True),
        ("attributes.age exists", {"age": None}, False),
        ("attributes.age is empty", {"age": None}, True),
        ("attributes.tags is empty", {"tags": []}, True),
        ("attributes.tags is empty", {"tags": ""}, True),
        ("attributes.tags is empty", {"tags": 0.0}, False),
        ('attributes.tags contains "a"', {"tags": ["b", "a"]}, True),
        ("attributes.tags contains 1", {"tags": [True]}, False),
        ('attributes.tags contains "ell"', {"tags": "hello"}, True),
        ('attributes.tags not contains "a"', {"tags": 5.0}, True),
        ("attributes.signup < @2024-01-01", {"signup": Instant(0)}, True),
        ("attributes.signup < 10", {"signup": Instant(0)}, False),
        ('attributes.address.city = "Paris"', {"address": {"city": "Paris"}}, True),
        ('attributes.address.city = "Paris"', {"address": ["Paris"]}, False),
        ("attributes.age between 18 and 30", {"age": 30.0}, True),
        ('attributes.age in [1, "1"]', {"age": "1"}, True),
    ],
)
def test_attribute_comparisons_are_typed_and_missing_is_false(
    text: str, attributes: dict[str, object], expected: bool
) -> None:
    assert _matches(text, attributes=attributes) is expected


def test_session_and_context_fields_are_missing_without_a_visit() -> None:
    assert not _matches("cart.value < 100")
    assert _matches("cart.value not exists")
    assert _matches('session.source != "ads"')
    assert not _matches("session.is_new_visitor = false")
    assert _matches("session.is_new_visitor = false", is_new_visitor=False)


def test_geo_distance_is_great_circle_distance() -> None:
    paris = {"latitude": 48.8566, "longitude": 2.3522}
    assert _matches("location within 1 km of (48.8566, 2.3522)", **paris)
    # Paris to London is about 344 km.
    assert _matches("location within 345 km of (51.5074, -0.1278)", **paris)
    assert not _matches("location within 343 km of (51.5074, -0.1278)", **paris)
    assert not _matches("location within 20000 km of (0, 0)")


def test_lifetime_average_is_missing_without_orders() -> None:
    assert _matches("lifetime.average_order_value = 25", lifetime_value=50.0, order_count=2)
    assert _matches("lifetime.average_order_value not exists", lifetime_value=50.0)


def test_days_since_counts_whole_days() -> None:
    rule = _rule("days_since(first_seen) >= 30")
    assert rule.matches(View(subject_id="u", first_seen=NOW - 30 * DAY), NOW)
    assert not rule.matches(View(subject_id="u", first_seen=NOW - 30 * DAY + 1), NOW)
    assert rule.next_change(View(subject_id="u", first_seen=NOW - 30 * DAY + 1), NOW) == NOW + 1


def test_sliding_window_counts_are_exact_to_the_bucket_width() -> None:
    rule = _rule('count(event "e", last 30 minutes) >= 2')
    (spec,) = rule.aggregates
    assert spec.bucket_width.ToMicroseconds() == SECOND
    view = _counts(rule, NOW - 30 * MINUTE, NOW - MINUTE)
    assert rule.matches(view, NOW)
    # The oldest event's second leaves the window one second after it turns 30 minutes old.
    leaves = bucket_start(NOW - 30 * MINUTE, SECOND) + SECOND + 30 * MINUTE
    assert rule.next_change(view, NOW) == leaves
    assert rule.matches(view, leaves - 1)
    assert not rule.matches(view, leaves)


def test_did_not_turns_true_when_the_window_empties() -> None:
    rule = _rule('count(event "checkout", last 1 hour) = 0')
    view = _counts(rule, NOW - 10 * MINUTE)
    assert not rule.matches(view, NOW)
    moment = rule.next_change(view, NOW)
    assert moment is not None
    assert rule.matches(view, moment)
    assert not rule.matches(view, moment - 1)
    assert rule.next_change(view, moment) is None


def test_an_event_in_the_future_counts_when_its_bucket_starts() -> None:
    rule = _rule('count(event "e", last 1 day) >= 1')
    view = _counts(rule, NOW + 5 * MINUTE)
    assert not rule.matches(view, NOW)
    moment = rule.next_change(view, NOW)
    assert moment == bucket_start(NOW + 5 * MINUTE, MINUTE)
    assert rule.matches(view, moment)


def test_a_count_moves_its_answer_only_one_way_as_time_passes() -> None:
    at_least_two = _rule('count(event "e", last 30 minutes) >= 2')
    one = _counts(at_least_two, NOW - MINUTE)
    # Short of its bound: buckets leaving only lower the count, so no instant can turn it.
    assert not at_least_two.matches(one, NOW)
    assert at_least_two.next_change(one, NOW) is None
    # A bucket yet to start can: it is the only instant that counts.
    coming = _counts(at_least_two, NOW - MINUTE, NOW + 5 * SECOND)
    assert at_least_two.next_change(coming, NOW) == bucket_start(NOW + 5 * SECOND, SECOND)
    # Below its bound and staying there as buckets leave.
    under_two = _rule('count(event "e", last 30 minutes) < 2')
    assert under_two.matches(one, NOW)
    assert under_two.next_change(one, NOW) is None
    two = _counts(under_two, NOW - 10 * MINUTE, NOW - MINUTE)
    leaves = bucket_start(NOW - 10 * MINUTE, SECOND) + SECOND + 30 * MINUTE
    assert under_two.next_change(two, NOW) == leaves
    assert under_two.matches(two, leaves)


def test_this_session_counts_from_the_visit_start() -> None:
    rule = _rule('count(event "e", this session) >= 1')
    series = _counts(rule, NOW - HOUR).aggregates
    assert rule.matches(View(subject_id="u", session_start=NOW - HOUR, aggregates=series), NOW)
    later = View(subject_id="u", session_start=NOW - HOUR + SECOND, aggregates=series)
    assert not rule.matches(later, NOW)
    assert not rule.matches(View(subject_id="u", aggregates=series), NOW)


def test_between_and_all_time_windows_do_not_move() -> None:
    between = _rule('count(event "e", between @2023-11-01 and @2023-11-02) >= 1')
    view = _counts(between, 1_698_796_800_000_000)  # 2023-11-01T00:00:00Z
    assert between.matches(view, NOW)
    assert between.next_change(view, NOW) is None
    assert not between.time_dependent
    ever = _rule('count(event "e", all time) >= 1')
    assert ever.matches(_counts(ever, 0), NOW)
    assert ever.next_change(_counts(ever, 0), NOW) is None


def test_aggregate_functions_read_the_window() -> None:
    def value(function: str, *buckets: BucketState) -> rule_pb2.RuleExplanation:
        rule = _rule(f'{function}(event "e", all time) exists')
        (spec,) = rule.aggregates
        view = View(subject_id="u", aggregates={spec.aggregate_id: series_from_buckets(buckets)})
        return rule.explain(view, NOW)

    a = BucketState(0, 2, 0.0, None, None, 5 * SECOND, 9 * SECOND)
    assert value("first_time", a).observed.timestamp_value.seconds == 5
    assert value("last_time", a).observed.timestamp_value.seconds == 9

    def numeric(function: str, *buckets: BucketState) -> float:
        rule = _rule(f'{function}(price, event "e", all time) exists')
        (spec,) = rule.aggregates
        view = View(subject_id="u", aggregates={spec.aggregate_id: series_from_buckets(buckets)})
        return rule.explain(view, NOW).observed.number_value

    b = BucketState(0, 4, 10.0, 1.0, 6.0, 0, 0, ("n:1.0", "s:a"))
    assert numeric("sum", b) == 10.0
    assert numeric("average", b) == 2.5
    assert numeric("min", b) == 1.0
    assert numeric("max", b) == 6.0
    assert numeric("distinct_count", b) == 2.0


def test_distinct_count_unites_the_buckets() -> None:
    rule = _rule('distinct_count(product_id, event "e", last 7 days) = 3')
    (spec,) = rule.aggregates
    width = spec.bucket_width.ToMicroseconds()
    buckets = [
        BucketState(bucket_start(NOW, width), 2, 0.0, None, None, NOW, NOW, ("s:a", "s:b")),
        BucketState(bucket_start(NOW - DAY, width), 2, 0.0, None, None, NOW, NOW, ("s:b", "s:c")),
    ]
    view = View(subject_id="u", aggregates={spec.aggregate_id: series_from_buckets(buckets)})
    assert rule.matches(view, NOW)


def test_next_change_is_none_for_settled_answers() -> None:
    rule = _rule('attributes.plan = "pro" and count(event "e", last 1 hour) >= 1')
    windowed = _counts(rule, NOW - MINUTE)
    free = View(subject_id="u", aggregates=windowed.aggregates)
    # `plan` is not "pro" and time will not change that: the rule stays false.
    assert rule.next_change(free, NOW) is None
    pro = View(subject_id="u", attributes={"plan": "pro"}, aggregates=windowed.aggregates)
    assert rule.next_change(pro, NOW) is not None


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_nothing_changes_before_next_change(data: st.DataObject) -> None:
    rule = data.draw(gen.user_rules([gen.SEGMENT_USER]))
    compiled = compile_rule(rule)
    now = data.draw(st.sampled_from(gen.NOWS))
    view = data.draw(gen.views("u", compiled.aggregates, gen.boundaries(rule, now)))
    segments = data.draw(st.sampled_from([frozenset(), frozenset({gen.SEGMENT_USER})]))
    answer = compiled.matches(view, now, segments)
    moment = compiled.next_change(view, now, segments)
    probes = [now + 1, now + SECOND, now + HOUR, now + 40 * DAY, now + 4000 * DAY]
    if moment is not None:
        assert moment > now
        probes = [p for p in probes if p < moment] + [moment - 1]
    for probe in probes:
        assert compiled.matches(view, probe, segments) == answer, probe


@given(data=st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conditions_explained_alone_read_as_in_the_whole_explanation(
    data: st.DataObject,
) -> None:
    rule = data.draw(gen.user_rules([gen.SEGMENT_USER]))
    compiled = compile_rule(rule)
    now = data.draw(st.sampled_from(gen.NOWS))
    view = data.draw(gen.views("u", compiled.aggregates, gen.boundaries(rule, now)))
    leaves = []
    stack = [compiled.explain(view, now)]
    while stack:
        node = stack.pop()
        if node.path in compiled.leaf_paths:
            leaves.append(node)
        stack.extend(reversed(node.children))
    wanted = sorted(data.draw(st.sets(st.integers(0, len(leaves) - 1)))) if leaves else []
    assert compiled.explain_conditions(wanted, view, now) == tuple(leaves[i] for i in wanted)


def test_an_explanation_shows_an_observed_map_attribute() -> None:
    rule = _rule('attributes.address = "Paris"')
    view = View(subject_id="u", attributes={"address": {"zip": 75001.0, "city": "Paris"}})
    explanation = rule.explain(view, NOW)
    assert not explanation.result
    assert explanation.missing == (
        'Needs attributes.address = "Paris"; observed {"city": "Paris", "zip": 75001}.'
    )


def test_explanations_give_paths_values_and_what_is_missing() -> None:
    rule = _rule('cart.value < 100 and (location.country = "US" or attributes.vip = true)')
    view = View(subject_id="u", cart_value=120.0, country="FR")
    explanation = rule.explain(view, NOW)
    assert not explanation.result
    assert explanation.path == ""
    cart, either = explanation.children
    assert cart.path == "all.rules[0]"
    assert cart.text == "cart.value < 100"
    assert cart.observed.number_value == 120.0
    assert cart.missing == "Needs cart.value < 100; observed 120."
    country, vip = either.children
    assert country.path == "all.rules[1].any.rules[0]"
    assert country.observed.string_value == "FR"
    assert not vip.HasField("observed")
    assert vip.missing == "Needs attributes.vip = true; observed nothing."
    assert rule.leaf_paths == (
        "all.rules[0]",
        "all.rules[1].any.rules[0]",
        "all.rules[1].any.rules[1]",
    )
    assert rule.leaf_results(view, NOW) == (False, False, False)


def test_dependency_keys_use_the_profile_change_vocabulary() -> None:
    rule = _rule(
        'attributes.address.city = "Paris" and cart.value < 1 and device.os = "iOS"'
        ' and count(event "e", this session) > 0 and days_since(first_seen) > 1'
        " and lifetime.order_count > 0 and campaign(email, opened, last 1 day)"
        ' and affinity(added_to_cart, brand "acme", all time) > 0'
        ' and in segment "datasets/d/segments/s" and random_bucket() between 0 and 9'
    )
    assert rule.dependencies == {
        "attribute:address",
        "session",
        "context",
        "event:e",
        "aggregates",
        "seen",
        "lifetime",
        "event:campaign_interaction",
        "event:cart_updated",
        "segment:datasets/d/segments/s",
    }
    assert rule.segments == {"datasets/d/segments/s"}
    assert rule.time_dependent


def test_equal_aggregates_are_shared_with_the_longest_retention() -> None:
    rule = _rule(
        'count(event "e", last 5 days) > 0 and last_time(event "e", last 7 days) exists'
        ' and count(event "e", last 1 day) > 0'
    )
    ids = {spec.aggregate_id for spec in rule.aggregates}
    assert len(ids) == 2  # 5 and 7 days share hourly buckets; 1 day has minutes
    hourly = next(s for s in rule.aggregates if s.bucket_width.ToMicroseconds() == HOUR)
    assert hourly.retention.ToMicroseconds() == 7 * DAY + HOUR


def test_account_rules_expose_their_rollups_as_user_predicates() -> None:
    text = 'count(users where attributes.role = "admin") >= 2 and attributes.tier = "gold"'
    rule = _rule(text, ACCOUNT)
    (rollup,) = rule.rollups
    assert rollup.key == rollup_key(parse_rule('attributes.role = "admin"'))
    admin = View(subject_id="u", attributes={"role": "admin"})
    assert rollup.predicate.matches(admin, NOW)
    gold = View(subject_id="a", attributes={"tier": "gold"})
    assert rule.matches(gold, NOW, rollups={rollup.key: 2})
    assert not rule.matches(gold, NOW, rollups={rollup.key: 1})
    assert not rule.matches(gold, NOW)
    assert f"rollup:{rollup.key}" in rule.dependencies


def test_random_buckets_are_stable_and_spread() -> None:
    assert random_bucket("exp", "user-1") == random_bucket("exp", "user-1")
    buckets = [random_bucket("exp", f"user-{n}") for n in range(10_000)]
    assert all(0 <= bucket <= 99 for bucket in buckets)
    half = sum(1 for bucket in buckets if bucket < 50)
    assert 4_700 < half < 5_300
    assert buckets != [random_bucket("other", f"user-{n}") for n in range(10_000)]


def test_rule_values_are_data_in_the_generated_predicate() -> None:
    sneaky = '") or True or ("'
    rule = compile_rule(
        rule_pb2.Rule(
            attribute=rule_pb2.AttributeCondition(
                path="name",
                comparison=rule_pb2.Comparison(
                    operator=rule_pb2.OPERATOR_EQUALS,
                    value=common_pb2.Value(string_value=sneaky),
                ),
            )
        )
    )
    assert not rule.matches(View(subject_id="u", attributes={"name": "x"}), NOW)
    assert rule.matches(View(subject_id="u", attributes={"name": sneaky}), NOW)


def _replace_strings(rule: rule_pb2.Rule, replace: Callable[[str], str]) -> None:
    """Replaces every string operand of the rule in place (lists included)."""

    def values(message: object) -> None:
        for descriptor, field in message.ListFields():  # type: ignore[attr-defined]
            if descriptor.message_type is None:
                continue
            items = field if descriptor.is_repeated else [field]
            for item in items:
                if isinstance(item, common_pb2.Value) and item.HasField("string_value"):
                    item.string_value = replace(item.string_value)
                else:
                    values(item)

    values(rule)


# The only literals the SQL templates write: type names, JSON constants, a format.
TEMPLATE_LITERALS = {
    "''",
    "'user'",
    "'null'",
    "'\"\"'",
    "'[]'",
    "'{}'",
    "'string'",
    "'array'",
    "'number'",
    "'$ts'",
    "'1 second'",
    "'x'",
    "':'",
}
HOSTILE = "x'); DROP TABLE profiles; -- /* $1 */ \\ \" ü"


@given(rule=gen.user_rules([gen.SEGMENT_USER, gen.SEGMENT_IMPORTED]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_values_never_change_the_sql(rule: rule_pb2.Rule) -> None:
    hostile = rule_pb2.Rule()
    hostile.CopyFrom(rule)
    _replace_strings(hostile, lambda text: HOSTILE)
    plain = rule_pb2.Rule()
    plain.CopyFrom(rule)
    _replace_strings(plain, lambda text: "a")
    segments: dict[str, SqlSegment | ImportedMembers] = {
        gen.SEGMENT_USER: compile_rule(parse_rule("attributes.a exists")),
        gen.SEGMENT_IMPORTED: ImportedMembers(["p1", "p'2"]),
    }
    queries = [
        compile_rule(tree).select_sql(NOW, schema="s", dataset="d", segments=segments)
        for tree in (plain, hostile)
    ]
    assert queries[0].text == queries[1].text
    assert len(queries[0].params) == len(queries[1].params)
    # Every value is a parameter: no literal but the fixed ones of the templates.
    literals = set(re.findall(r"'[^']*'", queries[1].text))
    assert literals <= TEMPLATE_LITERALS


def test_sql_names_every_referenced_segment() -> None:
    rule = _rule('in segment "datasets/d/segments/s"')
    with pytest.raises(ValueError, match="needs its rule or its members"):
        rule.to_sql(NOW, schema="s")
    with pytest.raises(ValueError, match="schema name"):
        rule.to_sql(NOW, schema='s"; drop', segments={})


_O = rule_pb2.Operator


@pytest.mark.parametrize(
    ("text", "threshold"),
    [
        ("cart.value >= 100", Threshold(("cart_value",), _O.OPERATOR_GREATER_THAN_OR_EQUAL, 100)),
        (
            "attributes.score.total < 2.5",
            Threshold(("attributes", "score", "total"), _O.OPERATOR_LESS_THAN, 2.5),
        ),
        ("lifetime.order_count > 3", Threshold(("order_count",), _O.OPERATOR_GREATER_THAN, 3)),
        ("cart.value >= 100 and cart.value < 200", None),
        ("not cart.value >= 100", None),
        ('attributes.plan >= "m"', None),
        ("attributes.score = 5", None),
        ("attributes.score between 1 and 5", None),
        ('count(event "e", last 1 day) >= 2', None),
        ('count(event "e", all time) >= 2', None),
    ],
)
def test_a_rule_that_is_one_ordered_comparison_with_a_number_is_a_threshold(
    text: str, threshold: Threshold | None
) -> None:
    assert _rule(text).threshold == threshold


_ORDERED = {">": False, ">=": False, "<": True, "<=": True}


@given(
    operator=st.sampled_from(sorted(_ORDERED)),
    bounds=st.lists(st.integers(-50, 50).map(lambda n: n / 4), min_size=2, max_size=8),
    value=st.one_of(
        st.none(),
        st.integers(-60, 60).map(lambda n: n / 4),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-15, 15),
        st.booleans(),
        st.text(max_size=2),
    ),
)
def test_thresholds_sorted_by_bound_answer_one_way_then_the_other(
    operator: str, bounds: list[float], value: object
) -> None:
    """What lets the engine decide a family of thresholds by a binary search."""
    for path, fields in (
        ("attributes.x", {"attributes": {"x": value}}),
        ("cart.value", {"cart_value": value if type(value) is float else None}),
    ):
        compiled = [_rule(f"{path} {operator} {bound}") for bound in sorted(bounds)]
        assert all(rule.threshold is not None for rule in compiled)
        view = View(subject_id="u", **fields)
        answers = [rule.matches(view, NOW) for rule in compiled]
        # False then true for `<`, true then false for `>`: never back again.
        rising = _ORDERED[operator]
        assert answers == sorted(answers, reverse=not rising)
