"""Validation: each fault is an INVALID_ARGUMENT field violation at its place in the rule."""

from __future__ import annotations

from collections.abc import Mapping

import google.rpc.error_details_pb2 as error_details_pb2
import grpc
import pytest
from google.protobuf import duration_pb2

from audience.errors import AudienceError
from audience.rules import (
    SegmentInfo,
    compile_rule,
    parse_rule,
    rule_violations,
    validate_rule,
)
from audience.v1 import common_pb2, rule_pb2, segment_pb2

USER = segment_pb2.SEGMENT_KIND_USER
ACCOUNT = segment_pb2.SEGMENT_KIND_ACCOUNT


def _violations(rule: rule_pb2.Rule | str, kind: int = USER, **options: object) -> dict[str, str]:
    tree = parse_rule(rule) if isinstance(rule, str) else rule
    return {v.field: v.description for v in rule_violations(tree, kind, **options)}  # type: ignore[arg-type]


def _attribute(comparison: rule_pb2.Comparison, path: str = "plan") -> rule_pb2.Rule:
    return rule_pb2.Rule(attribute=rule_pb2.AttributeCondition(path=path, comparison=comparison))


def test_a_valid_rule_has_no_violations() -> None:
    assert _violations('cart.value < 100 and location.country = "US"') == {}


def test_an_invalid_rule_raises_invalid_argument_with_field_violations() -> None:
    rule = parse_rule('cart.value = "cheap" and attributes.plan > true')
    with pytest.raises(AudienceError) as caught:
        validate_rule(rule, field="segment.rule")
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_RULE"
    fields = [v.field for v in error.violations]
    assert fields == [
        "segment.rule.all.rules[0].session.comparison.value",
        "segment.rule.all.rules[1].attribute.comparison.value",
    ]
    bad_request = error_details_pb2.BadRequest()
    assert error.to_status().details[1].Unpack(bad_request)
    assert bad_request.field_violations[0].field == fields[0]


def test_unknown_and_missing_operators_are_rejected() -> None:
    unknown = _attribute(rule_pb2.Comparison(operator=99))  # type: ignore[arg-type]
    assert _violations(unknown) == {
        "rule.attribute.comparison.operator": "99 is not a known value."
    }
    missing = _attribute(rule_pb2.Comparison())
    assert "rule.attribute.comparison.operator" in _violations(missing)


def test_operators_that_do_not_apply_to_a_field_are_rejected() -> None:
    assert "rule.session.comparison.operator" in _violations('cart.value contains "1"')
    assert "rule.session.comparison.operator" in _violations("session.is_new_visitor > true")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('cart.value = "cheap"', "rule.session.comparison.value"),
        ("location.country = 1", "rule.context.comparison.value"),
        ("first_seen > 3", "rule.time.comparison.value"),
        ("days_since(first_seen) > @2024-01-01", "rule.time.comparison.value"),
        ("attributes.a starts with 1", "rule.attribute.comparison.value"),
        ("attributes.a > true", "rule.attribute.comparison.value"),
        ('count(event "e", all time) > "3"', "rule.behavior.comparison.value"),
        ('last_time(event "e", all time) > 3', "rule.behavior.comparison.value"),
        ("attributes.a in [[1]]", "rule.attribute.comparison.value.list_value.values[0]"),
        ("attributes.a = [1]", "rule.attribute.comparison.value"),
        ("attributes.a = null", "rule.attribute.comparison.value"),
        ('attributes.a between 1 and "2"', "rule.attribute.comparison.value"),
        ("attributes.a between 2 and 1", "rule.attribute.comparison.value"),
        ("attributes.a in 1", "rule.attribute.comparison.value"),
        ("attributes.a in []", "rule.attribute.comparison.value"),
    ],
)
def test_type_mismatches_name_the_operand(text: str, field: str) -> None:
    assert field in _violations(text)


def test_existence_operators_take_no_value() -> None:
    rule = _attribute(
        rule_pb2.Comparison(
            operator=rule_pb2.OPERATOR_EXISTS, value=common_pb2.Value(number_value=1)
        )
    )
    assert _violations(rule) == {"rule.attribute.comparison.value": "exists takes no value."}


def test_non_finite_numbers_and_sub_microsecond_times_are_rejected() -> None:
    nan = _attribute(
        rule_pb2.Comparison(
            operator=rule_pb2.OPERATOR_EQUALS, value=common_pb2.Value(number_value=float("nan"))
        )
    )
    assert "rule.attribute.comparison.value.number_value" in _violations(nan)
    assert "rule.time.comparison.value.timestamp_value" in _violations(
        "first_seen > @2024-01-01T00:00:00.0000001Z"
    )


@pytest.mark.parametrize(
    ("window", "fragment"),
    [
        (duration_pb2.Duration(seconds=0), "from 1 minute"),
        (duration_pb2.Duration(seconds=90), "whole number of minutes"),
        (duration_pb2.Duration(seconds=3651 * 86_400), "from 1 minute to 3650 days"),
        (duration_pb2.Duration(seconds=60, nanos=5), "whole number of minutes"),
    ],
)
def test_windows_out_of_range_are_rejected(window: duration_pb2.Duration, fragment: str) -> None:
    rule = parse_rule('count(event "e", last 1 day) > 0')
    rule.behavior.window.last.CopyFrom(window)
    assert fragment in _violations(rule)["rule.behavior.window.last"]


def test_between_windows_need_whole_seconds_in_order() -> None:
    backwards = 'count(event "e", between @2024-02-01 and @2024-01-01) > 0'
    assert "must be after" in _violations(backwards)["rule.behavior.window.between.end_time"]
    fraction = 'count(event "e", between @2024-01-01T00:00:00.5Z and @2024-02-01) > 0'
    assert "whole second" in _violations(fraction)["rule.behavior.window.between.start_time"]


def test_windowed_conditions_need_a_window() -> None:
    rule = parse_rule('count(event "e", all time) > 0')
    rule.behavior.ClearField("window")
    assert _violations(rule) == {"rule.behavior.window": "a window is required."}


def test_property_functions_need_a_property_and_count_takes_none() -> None:
    rule = parse_rule('sum(price, event "e", all time) > 0')
    rule.behavior.property = ""
    assert "rule.behavior.property" in _violations(rule)
    assert "rule.behavior.property" in _violations('count(price, event "e", all time) > 0')


def test_event_names_and_paths_are_checked() -> None:
    rule = parse_rule('count(event "e", all time) > 0')
    rule.behavior.event_name = "bad name"
    assert "rule.behavior.event_name" in _violations(rule)
    assert "rule.attribute.path" in _violations(
        _attribute(rule_pb2.Comparison(operator=rule_pb2.OPERATOR_EXISTS), path="a..b")
    )


def test_depth_is_limited() -> None:
    rule = parse_rule("attributes.a exists")
    for _ in range(16):
        rule = rule_pb2.Rule(negation=rule)
    violations = _violations(rule)
    assert list(violations.values()) == ["is nested more than 16 levels deep."]
    assert next(iter(violations)).startswith("rule.negation.negation")


def test_node_count_is_limited() -> None:
    leaf = parse_rule("attributes.a exists")
    group = rule_pb2.Rule(all=rule_pb2.RuleGroup(rules=[leaf] * 100))
    rule = rule_pb2.Rule(any=rule_pb2.RuleGroup(rules=[group] * 5))
    assert _violations(rule) == {"rule": "has more than 500 nodes."}


def test_group_list_and_string_sizes_are_limited() -> None:
    leaf = parse_rule("attributes.a exists")
    wide = rule_pb2.Rule(all=rule_pb2.RuleGroup(rules=[leaf] * 101))
    assert _violations(wide) == {"rule.all.rules": "holds more than 100 rules."}
    many = "attributes.a in [" + ", ".join(str(n) for n in range(1001)) + "]"
    assert _violations(many) == {"rule.attribute.comparison.value": "holds more than 1000 values."}
    long = f'attributes.a = "{"x" * 1025}"'
    assert "rule.attribute.comparison.value.string_value" in _violations(long)
    filters = " and ".join(f"p{n} exists" for n in range(11))
    assert "rule.behavior.filters" in _violations(f'count(event "e" where {filters}, all time) > 0')


def test_conditions_must_suit_the_segment_kind() -> None:
    assert "rule.session" in _violations("cart.value < 1", ACCOUNT)
    assert "rule.user_rollup" in _violations("count(users where attributes.a exists) >= 1", USER)
    nested = "count(users where count(users where attributes.a exists) >= 1) >= 1"
    assert "rule.user_rollup.user_rule.user_rollup" in _violations(nested, ACCOUNT)


def test_geo_and_random_bucket_bounds() -> None:
    assert set(_violations("location within 0 km of (91, 181)")) == {
        "rule.geo_distance.center.latitude",
        "rule.geo_distance.center.longitude",
        "rule.geo_distance.radius_km",
    }
    assert "rule.random_bucket.max_bucket" in _violations("random_bucket() between 50 and 10")
    assert "rule.random_bucket.salt" in _violations('random_bucket("a:b") between 0 and 10')


class _Segments:
    def __init__(self, known: Mapping[str, SegmentInfo]) -> None:
        self.known = known

    def resolve(self, segment: str) -> SegmentInfo | None:
        return self.known.get(segment)


def test_segment_references_must_exist_match_the_kind_and_not_cycle() -> None:
    a, b, c = (f"datasets/shop/segments/{name}" for name in "abc")
    resolver = _Segments(
        {
            b: SegmentInfo(USER, (c,)),
            c: SegmentInfo(USER, (a,)),
            "datasets/shop/segments/accounts": SegmentInfo(ACCOUNT),
        }
    )

    def check(text: str) -> dict[str, str]:
        return _violations(text, resolver=resolver, segment_name=a, dataset="shop")

    assert check('in segment "datasets/shop/segments/nope"') == {
        "rule.segment.segment": "segment 'datasets/shop/segments/nope' does not exist."
    }
    assert (
        "not a user segment"
        in check('in segment "datasets/shop/segments/accounts"')["rule.segment.segment"]
    )
    cycle = check(f'in segment "{b}"')["rule.segment.segment"]
    assert cycle == f"the reference makes a cycle: {a} → {b} → {c} → {a}."
    assert (
        "dataset 'shop'" in check('in segment "datasets/other/segments/x"')["rule.segment.segment"]
    )
    assert "datasets/{dataset}" in check('in segment "vip"')["rule.segment.segment"]


def test_compile_rule_validates_first() -> None:
    with pytest.raises(AudienceError):
        compile_rule(parse_rule('cart.value = "x"'))
