"""The text form: every node kind parses and prints, round trips hold, errors point."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

import tests.unit.rules.strategies as gen
from audience.rules import RuleSyntaxError, format_rule, parse_rule, rule_violations
from audience.rules.text import MAX_TEXT_NESTING
from audience.rules.validate import MAX_DEPTH
from audience.v1 import common_pb2, rule_pb2

USER_RULES = gen.user_rules([gen.SEGMENT_USER, gen.SEGMENT_IMPORTED])
ACCOUNT_RULES = gen.account_rules([gen.SEGMENT_USER], [gen.SEGMENT_ACCOUNT])

# One documented example per node kind (docs/rules.md), in canonical form.
EXAMPLES = {
    "all": 'attributes.plan = "pro" and cart.value < 100',
    "any": 'device.type = "mobile" or device.type = "tablet"',
    "negation": "not attributes.vip = true",
    "attribute": 'attributes.address.city in ["Paris", "Lyon"]',
    "behavior": 'count(event "product_view" where category = "shoes", last 30 days) >= 3',
    "session": 'session.utm_source starts with "news"',
    "context": 'weather.condition = "rain"',
    "geo_distance": "location within 25 km of (48.8566, 2.3522)",
    "campaign": 'campaign(email, clicked, "spring-sale", last 14 days) >= 2',
    "time": "days_since(last_seen) > 30",
    "affinity": 'affinity(purchased, brand "acme", last 90 days) >= 2',
    "lifetime": "lifetime.order_count between 2 and 5",
    "segment": 'not in segment "datasets/shop/segments/churned"',
    "random_bucket": 'random_bucket("checkout-test") between 0 and 49',
    "user_rollup": (
        'count(users where count(event "page_view" where path = "/pricing", last 7 days) >= 1) >= 3'
    ),
}


@given(rule=USER_RULES | ACCOUNT_RULES)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_printing_then_parsing_gives_back_the_tree(rule: rule_pb2.Rule) -> None:
    text = format_rule(rule)
    parsed = parse_rule(text)
    assert parsed == rule
    assert format_rule(parsed) == text


@pytest.mark.parametrize(("kind", "text"), sorted(EXAMPLES.items()))
def test_every_node_kind_has_a_text_form(kind: str, text: str) -> None:
    rule = parse_rule(text)
    assert rule.WhichOneof("node") == kind
    assert format_rule(rule) == text
    account = kind == "user_rollup"
    assert rule_violations(rule, gen.ACCOUNT if account else gen.USER) == []


def test_the_issue_example_is_three_conditions() -> None:
    rule = parse_rule(
        'cart.value < 100 and location.country = "US" and '
        'count(event "product_view" where category = "shoes", last 30 days) >= 3'
    )
    first, second, third = rule.all.rules
    assert first.session.field == rule_pb2.SESSION_FIELD_CART_VALUE
    assert first.session.comparison.operator == rule_pb2.OPERATOR_LESS_THAN
    assert first.session.comparison.value.number_value == 100
    assert second.context.field == rule_pb2.CONTEXT_FIELD_COUNTRY
    assert third.behavior.event_name == "product_view"
    assert third.behavior.filters[0].path == "category"
    assert third.behavior.window.last.seconds == 30 * 86_400
    assert third.behavior.function == rule_pb2.AGGREGATE_FUNCTION_COUNT


def test_not_binds_tighter_than_and_and_and_than_or() -> None:
    rule = parse_rule("not attributes.a exists and attributes.b exists or attributes.c exists")
    assert rule.WhichOneof("node") == "any"
    left, right = rule.any.rules
    assert left.WhichOneof("node") == "all"
    assert left.all.rules[0].WhichOneof("node") == "negation"
    assert right.attribute.path == "c"


def test_parentheses_nest_groups_and_print_back() -> None:
    text = "attributes.a exists and (attributes.b exists or attributes.c exists)"
    rule = parse_rule(text)
    assert rule.all.rules[1].WhichOneof("node") == "any"
    assert format_rule(rule) == text


def test_groups_of_fewer_than_two_print_as_calls() -> None:
    assert format_rule(parse_rule("all()")) == "all()"
    assert format_rule(parse_rule("any(attributes.a exists)")) == "any(attributes.a exists)"
    assert parse_rule("all()") == rule_pb2.Rule(all=rule_pb2.RuleGroup())


def test_negated_segment_differs_from_the_negation_of_a_segment() -> None:
    negated = parse_rule('not in segment "datasets/d/segments/s"')
    negation = parse_rule('not (in segment "datasets/d/segments/s")')
    assert negated.segment.negated
    assert negation.negation.segment.segment == "datasets/d/segments/s"
    assert format_rule(negation) == 'not (in segment "datasets/d/segments/s")'


def test_every_operator_and_value_type_round_trips() -> None:
    texts = [
        'attributes.a = "x"',
        "attributes.a != 1.5",
        'attributes.a in [1, "1", true, @2024-01-31T12:00:00.000250Z]',
        'attributes.a not in ["x"]',
        'attributes.a contains "x"',
        "attributes.a not contains 2",
        'attributes.a starts with "x"',
        'attributes.a ends with "x"',
        "attributes.a > -0.0",
        "attributes.a >= 1e+300",
        "attributes.a < 5e-324",
        "attributes.a <= @1969-12-31T23:59:59.999999Z",
        'attributes.a between "a" and "b"',
        "attributes.a exists",
        "attributes.a not exists",
        "attributes.a is empty",
        "attributes.a is not empty",
    ]
    for text in texts:
        assert format_rule(parse_rule(text)) == text


def test_hostile_strings_survive_the_round_trip() -> None:
    hostile = 'it\'s "quoted"; DROP TABLE x; -- /* \\ */ $1 日本 \n\t'
    rule = rule_pb2.Rule(
        attribute=rule_pb2.AttributeCondition(
            path="note",
            comparison=rule_pb2.Comparison(
                operator=rule_pb2.OPERATOR_EQUALS, value=common_pb2.Value(string_value=hostile)
            ),
        )
    )
    assert parse_rule(format_rule(rule)) == rule


def test_path_segments_may_start_with_digits_or_dashes() -> None:
    text = 'attributes.2fa.-x = true and count(event "e" where `2fa`.b = 1, all time) > 0'
    rule = parse_rule(text)
    assert rule.all.rules[0].attribute.path == "2fa.-x"
    assert rule.all.rules[1].behavior.filters[0].path == "2fa.b"
    assert format_rule(rule) == text


def test_dates_without_a_time_are_midnight_utc_and_offsets_are_applied() -> None:
    assert parse_rule("first_seen < @2024-01-01") == parse_rule(
        "first_seen < @2024-01-01T01:00:00+01:00"
    )
    assert format_rule(parse_rule("first_seen < @2024-01-01")) == (
        "first_seen < @2024-01-01T00:00:00Z"
    )


def test_windows_print_in_the_largest_whole_unit() -> None:
    assert "last 2 hours" in format_rule(parse_rule('count(event "e", last 120 minutes) > 0'))
    assert "last 1 day" in format_rule(parse_rule('count(event "e", last 24 hours) > 0'))
    assert "last 90 minutes" in format_rule(parse_rule('count(event "e", last 90 minutes) > 0'))


def test_comments_and_line_breaks_are_ignored() -> None:
    text = """
        # Cheap carts in the US
        cart.value < 100   # strictly
        and location.country = "US"
    """
    assert format_rule(parse_rule(text)) == 'cart.value < 100 and location.country = "US"'


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("cart.value < 100 and\n  location.country = ", 2, 22, "expected a value"),
        ("cart.price < 1", 1, 6, "expected a session field"),
        ('count(event "e", last 3 weeks) > 1', 1, 25, "expected a unit"),
        ('attributes.a = "open', 1, 16, "unexpected character"),
        ("first_seen < @2024-02-30", 1, 14, "not a valid timestamp"),
        ("attributes.a exists attributes.b exists", 1, 21, "expected 'and', 'or'"),
        ("favourite_colour = 1", 1, 1, "expected a condition"),
        ("attributes.a = 1 and", 1, 21, "found the end of the text"),
        ('attributes.a = "\\ud800"', 1, 16, "unpaired surrogate"),
    ],
)
def test_syntax_errors_name_the_line_and_column(
    text: str, line: int, column: int, fragment: str
) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule(text, field="segment.rule_text")
    error = caught.value
    assert (error.line, error.column) == (line, column)
    assert fragment in error.detail
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "RULE_SYNTAX_ERROR"
    assert error.violations[0].field == "segment.rule_text"
    assert error.violations[0].description.startswith(f"line {line}, column {column}: ")


# Each way text nests, as (opening, closing) around a condition.
NESTINGS = {
    "parentheses": ("(", ")"),
    "not": ("not ", ""),
    "all": ("all(", ")"),
    "any": ("any(", ")"),
    "roll-up": ("count(users where ", ") >= 1"),
}


def _nested(how: str, levels: int) -> str:
    opening, closing = NESTINGS[how]
    return opening * levels + "attributes.a exists" + closing * levels


@pytest.mark.parametrize("how", sorted(NESTINGS))
def test_text_nested_past_the_bound_is_a_syntax_error_at_the_opening_too_deep(how: str) -> None:
    assert parse_rule(_nested(how, MAX_TEXT_NESTING)).WhichOneof("node")
    opening = NESTINGS[how][0]
    for levels in (MAX_TEXT_NESTING + 1, 50_000):
        with pytest.raises(RuleSyntaxError) as caught:
            parse_rule(_nested(how, levels))
        error = caught.value
        assert (error.line, error.column) == (1, MAX_TEXT_NESTING * len(opening) + 1)
        assert f"nested more than {MAX_TEXT_NESTING} levels deep" in error.detail
        assert error.violations[0].field == "rule_text"


def test_lists_nested_past_the_bound_are_a_syntax_error() -> None:
    prefix = "attributes.a in "
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule(prefix + "[" * 50_000 + "1" + "]" * 50_000)
    assert caught.value.column == len(prefix) + MAX_TEXT_NESTING + 1


def test_the_deepest_valid_rule_prints_within_the_bound() -> None:
    # Negations of groups, alternately, the printer's most nested spelling: `not (… and …)`.
    rule = parse_rule("attributes.a exists")
    other = parse_rule("attributes.b exists")
    for level in range(MAX_DEPTH - 1):
        if level % 2:
            rule = rule_pb2.Rule(negation=rule)
        else:
            rule = rule_pb2.Rule(all=rule_pb2.RuleGroup(rules=[rule, other]))
    assert rule_violations(rule, gen.USER) == []
    deeper = rule_pb2.Rule(negation=rule_pb2.Rule(all=rule_pb2.RuleGroup(rules=[rule, other])))
    assert any("levels deep" in v.description for v in rule_violations(deeper, gen.USER))
    assert parse_rule(format_rule(rule)) == rule


def test_printing_an_incomplete_tree_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a kind"):
        format_rule(rule_pb2.Rule())
    with pytest.raises(ValueError, match="operator 0"):
        format_rule(
            rule_pb2.Rule(
                attribute=rule_pb2.AttributeCondition(path="a", comparison=rule_pb2.Comparison())
            )
        )
