"""Rule text from anywhere: the parser returns a rule or its own syntax error, quickly.

Random text and text shaped like the language (its tokens shuffled, cut short, nested
deeply, with huge numbers and long strings) goes into ``parse_rule``. It returns a
``Rule`` or raises :class:`RuleSyntaxError` (``INVALID_ARGUMENT`` naming ``rule_text``,
with the line and column), never anything else; anything it parses prints and parses
back to the same tree; and no input of 100 KB takes long (no pathological backtracking,
no recursion without bound).
"""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tests.unit.rules.strategies as rules_gen
from audience.rules import RuleSyntaxError, format_rule, parse_rule
from audience.v1 import rule_pb2

pytestmark = pytest.mark.fuzz

# Each documented condition kind, in canonical form (docs/rules.md).
EXAMPLES = (
    'attributes.plan = "pro" and cart.value < 100',
    'device.type = "mobile" or device.type = "tablet"',
    "not attributes.vip = true",
    'attributes.address.city in ["Paris", "Lyon"]',
    'count(event "product_view" where category = "shoes", last 30 days) >= 3',
    'session.utm_source starts with "news"',
    "location within 25 km of (48.8566, 2.3522)",
    'campaign(email, clicked, "spring-sale", last 14 days) >= 2',
    "days_since(last_seen) > 30",
    'affinity(purchased, brand "acme", last 90 days) >= 2',
    "lifetime.order_count between 2 and 5",
    'not in segment "datasets/shop/segments/churned"',
    'random_bucket("checkout-test") between 0 and 49',
    'count(users where count(event "page_view" where path = "/pricing", last 7 days) >= 1) >= 3',
    "first_seen < @2024-01-01T00:00:00Z",
    "all()",
    "any()",
    "`2fa`.enabled exists",
)

TOKENS = (
    "and", "or", "not", "all", "any", "(", ")", "[", "]", ",", ".", "=", "!=", "<", "<=",
    ">", ">=", "in", "contains", "starts", "ends", "with", "between", "exists", "is",
    "empty", "count", "sum", "min", "max", "average", "distinct_count", "first_time",
    "last_time", "event", "where", "last", "days", "hours", "minutes", "this", "session",
    "time", "users", "segment", "within", "km", "of", "campaign", "email", "ad",
    "clicked", "opened", "received", "affinity", "viewed", "purchased", "brand",
    "category", "product", "random_bucket", "days_since", "first_seen", "last_seen",
    "lifetime", "cart", "value", "attributes", "plan", "location", "weather", "device",
    "true", "false", "0", "-0", "1.5", "-3e-7", "1e308", "1e999", "9" * 400, "0.1e-400",
    '""', '"x"', '"\\u0000"', '"\\ud800"', '"\\"', '"unterminated', '"' + "a" * 2_000 + '"',
    "@2024-01-31", "@2024-02-30", "@9999-12-31T23:59:59.999999999+23:59",
    "@0000-01-01T00:00:00Z", "`2fa`", "``", "#", "\n", "\t", "\r\n", "\x00", "é", "日本",
)  # fmt: skip


def _shuffled() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join)


def _mutated() -> st.SearchStrategy[str]:
    """A valid rule, cut short, with a token inserted, or with its tokens respaced."""

    def mutate(text: str, at: int, token: str, how: str) -> str:
        at %= len(text) + 1
        if how == "cut":
            return text[:at]
        if how == "insert":
            return f"{text[:at]} {token} {text[at:]}"
        if how == "drop":
            return text[:at] + text[at + 1 :]
        return text.replace(" ", "\n  # comment\n")

    rules = rules_gen.user_rules([rules_gen.SEGMENT_USER]) | rules_gen.account_rules(
        [rules_gen.SEGMENT_USER], [rules_gen.SEGMENT_ACCOUNT]
    )
    texts = st.sampled_from(EXAMPLES) | rules.map(format_rule)
    return st.builds(
        mutate,
        texts,
        st.integers(0, 10_000),
        st.sampled_from(TOKENS),
        st.sampled_from(["cut", "insert", "drop", "respace"]),
    )


def _nested() -> st.SearchStrategy[str]:
    def nest(text: str, depth: int, how: str) -> str:
        if how == "parentheses":
            return "(" * depth + text + ")" * depth
        if how == "unbalanced":
            return "(" * depth + text
        if how == "not":
            return "not " * depth + text
        if how == "all":
            return "all(" * depth + text + ")" * depth
        return "[" * depth + "1" + "]" * depth

    return st.builds(
        nest,
        st.sampled_from(EXAMPLES),
        st.sampled_from([1, 16, 17, 100, 1_000, 5_000]),
        st.sampled_from(["parentheses", "unbalanced", "not", "all", "list"]),
    )


RULE_TEXT = st.one_of(st.text(max_size=200), _shuffled(), _mutated(), _nested())


def _check(text: str) -> rule_pb2.Rule | None:
    """Parses ``text``; the rule, or None after a well-formed syntax error."""
    try:
        return parse_rule(text)
    except RuleSyntaxError as error:
        caught = error
    assert caught.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.reason == "RULE_SYNTAX_ERROR"
    assert [v.field for v in caught.violations] == ["rule_text"]
    assert 1 <= caught.line <= text.count("\n") + 1
    assert caught.column >= 1
    assert caught.metadata == {"line": str(caught.line), "column": str(caught.column)}
    return None


@given(text=RULE_TEXT)
@settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@example(text="")
@example(text="(" * 30 + "attributes.a exists" + ")" * 30)
def test_any_text_parses_to_a_rule_or_a_syntax_error_and_what_parses_round_trips(
    text: str,
) -> None:
    rule = _check(text)
    if rule is not None:
        printed = format_rule(rule)
        again = parse_rule(printed)
        assert again == rule
        assert format_rule(again) == printed


HUNDRED_KB = 100 * 1024
BIG_INPUTS = {
    "open-parentheses": "(" * HUNDRED_KB,
    "balanced-parentheses": "(" * (HUNDRED_KB // 2 - 20)
    + "attributes.a exists"
    + ")" * (HUNDRED_KB // 2 - 20),
    "nots": "not " * (HUNDRED_KB // 4) + "attributes.a exists",
    "ands": " and ".join(["attributes.a exists"] * (HUNDRED_KB // 24)),
    "long-string": 'attributes.a = "' + "x" * HUNDRED_KB + '"',
    "unterminated-string": 'attributes.a = "' + "\\x" * (HUNDRED_KB // 2),
    "escapes": 'attributes.a = "' + "\\\\" * (HUNDRED_KB // 2),
    "long-number": "cart.value < " + "9" * HUNDRED_KB,
    "long-fraction": "cart.value < 0." + "0" * HUNDRED_KB + "1",
    "long-path": "attributes." + ".".join(["a"] * (HUNDRED_KB // 2)) + " exists",
    "long-name": "attributes." + "a" * HUNDRED_KB + " exists",
    "big-list": "attributes.a in [" + ", ".join(["1"] * (HUNDRED_KB // 3)) + "]",
    "nested-lists": "attributes.a in " + "[" * (HUNDRED_KB // 2) + "]" * (HUNDRED_KB // 2),
    "comments": "# x\n" * (HUNDRED_KB // 4) + "attributes.a exists",
    "spaces": " " * HUNDRED_KB,
    "garbage": "\x00é" * (HUNDRED_KB // 2),
    "almost-times": "@2024-01-01T" * (HUNDRED_KB // 12),
    "number-then-letters": ("1e" + "1" * 50 + "x ") * (HUNDRED_KB // 54),
}
TIME_BOUND = 2.0
"""Seconds one 100 KB input may take: linear work is milliseconds."""


@pytest.mark.parametrize("shape", sorted(BIG_INPUTS))
def test_a_100_kb_input_is_answered_quickly(shape: str) -> None:
    text = BIG_INPUTS[shape]
    assert len(text) >= HUNDRED_KB * 0.9
    started = time.perf_counter()
    _check(text)
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_BOUND, f"{shape}: {elapsed:.2f} s"
