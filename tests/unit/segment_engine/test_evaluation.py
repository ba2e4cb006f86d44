"""The engine's evaluation of one subject: affected segments, cascades, timers, roll-ups."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.segment_engine.domain.catalog import RollupDef, rollup_dependency
from services.segment_engine.domain.evaluation import (
    MIN_TIMER_DELAY,
    ROLLUP_TIMER_PREFIX,
    Before,
    Subject,
    apply_forced,
    erase,
    evaluate_change,
    evaluate_timers,
    rollup_keys,
)
from services.segment_engine.domain.model import Cause, ChangeKind, Kind, Membership
from tests.unit.segment_engine.fakes import (
    DATASET,
    FakeRule,
    attribute_rule,
    catalog,
    member_of,
    segment,
    threshold_rule,
)

NOW = 1_700_000_000_000_000


def _subject(view: dict[str, Any], **fields: Any) -> Subject:
    return Subject(
        dataset=DATASET, kind=fields.pop("kind", Kind.USER), subject_id="p1", view=view, **fields
    )


def _before(subject: Subject, view: Any = None) -> Before:
    return Before(
        view,
        NOW,
        frozenset(subject.segment_names()),
        dict(subject.rollup_counts),
        subject.account_id,
    )


def _change(subject: Subject, view: dict[str, Any], keys: list[str] | None, **kw: Any) -> Any:
    cat = kw.pop("cat")
    before = _before(subject, subject.view)
    subject.view = view
    return evaluate_change(
        cat,
        subject,
        now=kw.pop("now", NOW),
        cause=Cause.EVENT,
        event_ids=("e1",),
        keys=keys,
        before=before,
    )


def test_a_change_evaluates_only_the_segments_whose_keys_it_touches() -> None:
    cart = attribute_rule("cart", lambda value: value is not None and value < 100)
    plan = attribute_rule("plan", lambda value: value == "pro")
    cat = catalog([segment("cheap-cart", cart), segment("pro", plan)])
    subject = _subject({"cart": 150})

    outcome = _change(subject, {"cart": 50}, ["attribute:cart"], cat=cat)

    assert len(cart.calls) == 1
    assert plan.calls == []
    assert [(c.segment_id, c.change) for c in outcome.changes] == [("cheap-cart", ChangeKind.JOIN)]


def test_joining_then_leaving_carries_the_cause_events_and_flipped_clause() -> None:
    cart = attribute_rule("cart", lambda value: value is not None and value < 100)
    cat = catalog([segment("cheap-cart", cart, version=3)])
    subject = _subject({})

    joined = _change(subject, {"cart": 40}, ["attribute:cart"], cat=cat)
    left = _change(subject, {"cart": 140}, ["attribute:cart"], cat=cat, now=NOW + 5)

    (join,) = joined.changes
    assert join.change is ChangeKind.JOIN
    assert join.segment_version == 3
    assert join.reason.cause is Cause.EVENT
    assert join.reason.event_ids == ("e1",)
    assert join.reason.flipped == ("the condition",)
    (leave,) = left.changes
    assert leave.change is ChangeKind.LEAVE
    assert leave.time == NOW + 5
    assert subject.memberships == {}


def test_a_membership_change_cascades_to_referring_segments_in_dependency_order() -> None:
    base = attribute_rule("vip", lambda value: value is True)
    middle = member_of("base")
    top = member_of("middle")
    # Listed out of order: evaluation order must come from the references.
    cat = catalog([segment("top", top), segment("middle", middle), segment("base", base)])
    subject = _subject({})

    outcome = _change(subject, {"vip": True}, ["attribute:vip"], cat=cat)

    assert [c.segment_id for c in outcome.changes] == ["base", "middle", "top"]
    assert outcome.changes[0].reason.cause is Cause.EVENT
    assert outcome.changes[1].reason.cause is Cause.DEPENDENCY
    assert outcome.changes[1].reason.dependency_segment == "base"
    assert outcome.changes[2].reason.dependency_segment == "middle"
    assert set(subject.memberships) == {"base", "middle", "top"}


def test_a_negated_reference_leaves_when_the_referenced_segment_is_joined() -> None:
    base = attribute_rule("vip", lambda value: value is True)
    others = member_of("base", negated=True)
    cat = catalog([segment("base", base), segment("others", others)])
    subject = _subject({}, memberships={"others": Membership(1, 1)})

    outcome = _change(subject, {"vip": True}, ["attribute:vip"], cat=cat)

    assert [(c.segment_id, c.change) for c in outcome.changes] == [
        ("base", ChangeKind.JOIN),
        ("others", ChangeKind.LEAVE),
    ]


def test_a_new_subject_is_evaluated_against_every_segment() -> None:
    always = FakeRule(lambda *_: True, frozenset())
    plan = attribute_rule("plan", lambda value: value == "pro")
    cat = catalog([segment("everyone", always), segment("pro", plan)])
    subject = _subject({})

    outcome = _change(subject, {"plan": "pro"}, None, cat=cat)

    assert {c.segment_id for c in outcome.changes} == {"everyone", "pro"}


def test_imported_and_other_kind_segments_are_never_evaluated_by_a_change() -> None:
    accounts = attribute_rule("plan", lambda value: value == "pro")
    cat = catalog([segment("crm-list", None), segment("pro-accounts", accounts, kind=Kind.ACCOUNT)])
    subject = _subject({}, memberships={"crm-list": Membership(1, 1)})

    outcome = _change(subject, {"plan": "pro"}, None, cat=cat)

    assert outcome.changes == []
    assert accounts.calls == []
    assert "crm-list" in subject.memberships


def test_a_time_dependent_segment_sets_a_timer_and_leaves_when_it_is_due() -> None:
    window = 30 * 60 * 1_000_000
    recent = FakeRule(
        lambda view, now, *_: view.get("viewed") is not None and now < view["viewed"] + window,
        frozenset({"event:product_view"}),
        time_dependent=True,
        timer=lambda view, now: (
            view["viewed"] + window
            if view.get("viewed") and now < view["viewed"] + window
            else None
        ),
    )
    cat = catalog([segment("recent", recent)])
    subject = _subject({})

    _change(subject, {"viewed": NOW}, ["event:product_view"], cat=cat)
    assert subject.timers == {"recent": NOW + window}

    outcome = evaluate_timers(cat, subject, now=NOW + window + 1, due=dict(subject.timers))

    (leave,) = outcome.changes
    assert leave.change is ChangeKind.LEAVE
    assert leave.reason.cause is Cause.TIME
    assert leave.reason.flipped == ("the condition",)
    assert subject.timers == {}


def test_a_timer_is_never_set_in_the_past() -> None:
    stuck = FakeRule(
        lambda *_: True,
        frozenset({"event:x"}),
        time_dependent=True,
        timer=lambda view, now: now - 10,
    )
    cat = catalog([segment("stuck", stuck)])
    subject = _subject({})

    _change(subject, {}, ["event:x"], cat=cat)

    assert subject.timers == {"stuck": NOW + MIN_TIMER_DELAY}


def test_a_due_timer_of_a_deleted_segment_is_dropped() -> None:
    cat = catalog([])
    subject = _subject({}, timers={"gone": NOW - 1})

    outcome = evaluate_timers(cat, subject, now=NOW, due={"gone": NOW - 1})

    assert outcome.changes == []
    assert subject.timers == {}


def _rollup_catalog(user_test: Any, threshold: int = 2) -> Any:
    user_rule = FakeRule(lambda view, now, *_: user_test(view), frozenset({"event:pricing_view"}))
    rollup = RollupDef("k1", user_rule)
    account_rule = FakeRule(
        lambda view, now, segs, rollups: rollups.get("k1", 0) >= threshold,
        frozenset({rollup_dependency("k1")}),
        rollups=(rollup,),
    )
    return catalog([segment("busy-accounts", account_rule, kind=Kind.ACCOUNT)])


def test_a_user_change_moves_its_accounts_rollup_count() -> None:
    cat = _rollup_catalog(lambda view: view.get("views", 0) >= 1)
    user = _subject({}, account_id="a1")

    outcome = _change(user, {"views": 1}, ["event:pricing_view"], cat=cat)

    assert user.rollups == {"k1"}
    assert outcome.rollup_deltas == {("a1", "k1"): 1}


def test_a_user_moving_to_another_account_moves_its_contributions() -> None:
    cat = _rollup_catalog(lambda view: view.get("views", 0) >= 1)
    user = _subject({"views": 3}, account_id="a1", rollups={"k1"})
    before = _before(user, user.view)
    user.account_id = "a2"

    outcome = evaluate_change(
        cat, user, now=NOW, cause=Cause.EVENT, keys=["account"], before=before
    )

    assert outcome.rollup_deltas == {("a1", "k1"): -1, ("a2", "k1"): 1}


def test_an_account_joins_when_its_rollup_count_reaches_the_threshold() -> None:
    cat = _rollup_catalog(lambda view: True, threshold=2)
    account = _subject({}, kind=Kind.ACCOUNT, rollup_counts={"k1": 1})
    before = _before(account, account.view)
    account.rollup_counts["k1"] = 2

    outcome = evaluate_change(
        cat, account, now=NOW, cause=Cause.EVENT, keys=rollup_keys(["k1"]), before=before
    )

    assert [(c.segment_id, c.change) for c in outcome.changes] == [
        ("busy-accounts", ChangeKind.JOIN)
    ]


def test_a_time_dependent_rollup_sets_a_timer_on_the_user() -> None:
    user_rule = FakeRule(
        lambda view, now, *_: True,
        frozenset({"event:x"}),
        time_dependent=True,
        timer=lambda view, now: now + 60_000_000,
    )
    account_rule = FakeRule(
        lambda *_: False, frozenset({"rollup:k"}), rollups=(RollupDef("k", user_rule),)
    )
    cat = catalog([segment("acc", account_rule, kind=Kind.ACCOUNT)])
    user = _subject({}, account_id="a1")

    _change(user, {}, ["event:x"], cat=cat)

    assert user.timers == {ROLLUP_TIMER_PREFIX + "k": NOW + 60_000_000}


def test_erasure_leaves_every_segment_and_withdraws_rollup_contributions() -> None:
    cat = _rollup_catalog(lambda view: True)
    user = _subject(
        {},
        account_id="a1",
        rollups={"k1"},
        memberships={"crm-list": Membership(2, 1), "old": Membership(1, 1)},
        timers={"x": NOW + 1},
    )

    outcome = erase(cat, user, now=NOW, cause=Cause.ERASURE)

    assert sorted((c.segment_id, c.change, c.reason.cause) for c in outcome.changes) == [
        ("crm-list", ChangeKind.LEAVE, Cause.ERASURE),
        ("old", ChangeKind.LEAVE, Cause.ERASURE),
    ]
    assert outcome.rollup_deltas == {("a1", "k1"): -1}
    assert user.memberships == {}
    assert user.timers == {}
    assert user.rollups == set()


def test_a_forced_join_cascades_to_segments_that_refer_to_it() -> None:
    follower = member_of("crm-list")
    cat = catalog([segment("crm-list", None, version=4), segment("follower", follower)])
    subject = _subject({})

    outcome = apply_forced(
        cat, subject, now=NOW, cause=Cause.SEGMENT_CHANGED, forced={"crm-list": (True, 4)}
    )

    assert [(c.segment_id, c.segment_version, c.reason.cause) for c in outcome.changes] == [
        ("crm-list", 4, Cause.SEGMENT_CHANGED),
        ("follower", 1, Cause.DEPENDENCY),
    ]


def test_a_forced_change_that_is_already_true_records_nothing() -> None:
    cat = catalog([segment("crm-list", None)])
    subject = _subject({}, memberships={"crm-list": Membership(1, 1)})

    outcome = apply_forced(
        cat, subject, now=NOW, cause=Cause.BACKFILL, forced={"crm-list": (True, 1)}
    )

    assert outcome.changes == []


def test_the_view_before_is_read_only_when_a_membership_changes() -> None:
    loads: list[int] = []

    def load() -> dict[str, Any]:
        loads.append(1)
        return {"plan": "free"}

    plan = attribute_rule("plan", lambda value: value == "pro")
    cat = catalog([segment("pro", plan)])
    subject = _subject({"plan": "free"})
    evaluate_change(
        cat,
        subject,
        now=NOW,
        cause=Cause.EVENT,
        keys=["attribute:plan"],
        before=Before(load, NOW, frozenset(), {}),
    )
    assert loads == []
    subject.view = {"plan": "pro"}
    evaluate_change(
        cat,
        subject,
        now=NOW,
        cause=Cause.EVENT,
        keys=["attribute:plan"],
        before=Before(load, NOW, frozenset(), {}),
    )
    assert loads == [1]


@pytest.mark.parametrize("order", [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]])
def test_ranks_put_every_segment_after_those_it_refers_to(order: list[str]) -> None:
    rules = {
        "a": attribute_rule("x", bool),
        "b": member_of("a"),
        "c": FakeRule(
            lambda *_: True,
            frozenset(),
            segments=frozenset(
                {f"datasets/{DATASET}/segments/a", f"datasets/{DATASET}/segments/b"}
            ),
        ),
    }
    cat = catalog([segment(name, rules[name]) for name in order])
    assert cat.rank["a"] < cat.rank["b"] < cat.rank["c"]


def test_a_reference_cycle_is_ranked_rather_than_failing() -> None:
    cat = catalog([segment("a", member_of("b")), segment("b", member_of("a"))])
    assert sorted(cat.rank.values()) == [0, 1]


def test_referrers_name_segments_and_rollups() -> None:
    user_rule = member_of("base")
    account_rule = FakeRule(
        lambda *_: True, frozenset({"rollup:k"}), rollups=(RollupDef("k", user_rule),)
    )
    cat = catalog(
        [
            segment("base", attribute_rule("x", bool)),
            segment("follower", member_of("base")),
            segment("acc", account_rule, kind=Kind.ACCOUNT),
        ]
    )
    assert sorted(cat.referrers(f"datasets/{DATASET}/segments/base")) == [
        "follower",
        "rollup k",
    ]


def test_a_merged_away_profile_leaves_with_cause_merge() -> None:
    cat = catalog([segment("pro", attribute_rule("plan", lambda value: value == "pro"))])
    subject = _subject({"plan": "pro"}, memberships={"pro": Membership(1, 1)})

    outcome = erase(cat, subject, now=NOW, cause=Cause.MERGE)

    (leave,) = outcome.changes
    assert (leave.segment_id, leave.change, leave.reason.cause) == (
        "pro",
        ChangeKind.LEAVE,
        Cause.MERGE,
    )


def test_a_family_of_thresholds_is_decided_by_a_binary_search() -> None:
    rules = [threshold_rule("cart", 20.0 * n) for n in range(1, 17)]
    cat = catalog([segment(f"cart-{n:02d}", rule) for n, rule in enumerate(rules, 1)])
    subject = _subject({"cart": 55.0}, memberships={"cart-01": Membership(1, 1)})
    subject.memberships["cart-02"] = Membership(1, 1)

    outcome = _change(subject, {"cart": 125.0}, ["attribute:cart"], cat=cat)

    assert [(c.segment_id, c.change) for c in outcome.changes] == [
        (f"cart-{n:02d}", ChangeKind.JOIN) for n in range(3, 7)
    ]
    assert set(subject.memberships) == {f"cart-{n:02d}" for n in range(1, 7)}
    assert sum(len(rule.calls) for rule in rules) <= 5


def test_a_threshold_family_joins_before_the_segments_that_refer_to_it() -> None:
    # Listed first: the referring segment must still come after the family's change.
    family = [segment(f"over-{b}", threshold_rule("cart", float(b))) for b in (10, 20, 30, 40)]
    cat = catalog([segment("refers", member_of("over-20")), *family])
    subject = _subject({})

    outcome = _change(subject, {"cart": 25.0}, ["attribute:cart"], cat=cat)

    assert [(c.segment_id, c.reason.cause) for c in outcome.changes] == [
        ("over-10", Cause.EVENT),
        ("over-20", Cause.EVENT),
        ("refers", Cause.DEPENDENCY),
    ]


def test_a_threshold_family_queued_in_part_is_evaluated_rule_by_rule() -> None:
    family = [threshold_rule("cart", bound) for bound in (10.0, 20.0, 30.0, 40.0)]
    family[3].dependencies = frozenset({"attribute:cart", "attribute:other"})
    cat = catalog([segment(f"s{n}", rule) for n, rule in enumerate(family)])
    subject = _subject({"cart": 45.0})

    outcome = _change(subject, {"cart": 45.0}, ["attribute:other"], cat=cat)

    assert [(c.segment_id, c.change) for c in outcome.changes] == [("s3", ChangeKind.JOIN)]
    assert [len(rule.calls) for rule in family] == [0, 0, 0, 1]


@given(
    bounds=st.lists(st.integers(0, 20), min_size=4, max_size=12),
    holds_below=st.booleans(),
    values=st.lists(st.one_of(st.none(), st.integers(-2, 22)), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_a_threshold_family_decides_what_each_rule_alone_would(
    bounds: list[int], holds_below: bool, values: list[int | None], seed: int
) -> None:
    rules = [threshold_rule("x", float(b), holds_below=holds_below) for b in bounds]
    segments = [segment(f"t{n:02d}", rule) for n, rule in enumerate(rules)]
    random.Random(seed).shuffle(segments)
    cat = catalog(segments)
    assert [len(family.segment_ids) for family in cat.families] == [len(bounds)]
    # Start from memberships that do not match the view: a family must not assume they do.
    subject = _subject(
        {}, memberships={s.segment_id: Membership(1, 1) for s in segments[: len(segments) // 2]}
    )

    for value in values:
        _change(subject, {"x": value}, ["attribute:x"], cat=cat)

        expected = {
            s.segment_id
            for s, rule in ((s, s.rule) for s in segments)
            if rule is not None and rule.matches(subject.view, NOW, set(), {})
        }
        assert set(subject.memberships) == expected
