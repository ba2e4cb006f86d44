"""The profile service's pure domain: identity resolution, visits, attributes, merges,
aggregates, roll-ups, backfill, and the encoded views it publishes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audience.bus.v1 import profile_change_pb2
from audience.cache import StateCache
from audience.rules.aggregates import BucketState, Observation, accumulate, aggregate_id
from audience.rules.facts import facts_from_event
from audience.rules.values import AttrValue, Instant
from audience.rules.view import evaluation_row, view_from_proto
from audience.v1 import event_pb2, profile_pb2, rule_pb2
from services.profile.codec import (
    bucket_bytes,
    change_batch,
    encode_change,
    evaluation_columns,
    profile_view,
)
from services.profile.domain.aggregates import AggregateIndex, combine, count_facts, prune
from services.profile.domain.apply import Settings, apply_event, finish, session_id_for
from services.profile.domain.backfill import recompute
from services.profile.domain.batch import apply_accounts, apply_users
from services.profile.domain.identity import EventIdentities, Owner, resolve
from services.profile.domain.merge import merge_into
from services.profile.domain.model import (
    AccountState,
    AggregateSeries,
    ChangeType,
    ProfileState,
    Touch,
    profile_size,
)
from tests.profile_support import T0, E, count_spec, event, micros

SETTINGS = Settings(session_timeout=30 * 60 * 1_000_000)
NOW = micros(T0 + timedelta(days=1))
HOUR = timedelta(hours=1)


def _indexed(*specs: profile_pb2.AggregateSpec) -> tuple[AggregateIndex, list[str]]:
    stored = []
    for spec in specs:
        copy = profile_pb2.AggregateSpec()
        copy.CopyFrom(spec)
        copy.aggregate_id = aggregate_id(spec)
        stored.append(copy)
    return AggregateIndex(stored), [spec.aggregate_id for spec in stored]


def _apply(
    state: ProfileState, *events: event_pb2.Event, index: AggregateIndex | None = None
) -> Touch:
    touch = Touch()
    for one in events:
        apply_event(state, one, index, SETTINGS, touch, NOW)
    finish(state, index, touch, NOW)
    return touch


# --- Identity resolution -------------------------------------------------------------------


def test_a_new_user_and_a_new_visitor_become_profiles_named_by_their_ids() -> None:
    result = resolve(
        [EventIdentities("d", user_id="u1"), EventIdentities("d", anonymous_id="a1")], {}
    )
    assert result.profiles == [("d", "u1"), ("d", "a1")]
    assert result.created == {("d", "u1"), ("d", "a1")}
    assert result.links == {
        ("d", "user_id", "u1"): ("d", "u1"),
        ("d", "anonymous_id", "a1"): ("d", "a1"),
    }


def test_identifying_an_anonymous_visitor_merges_it_into_the_user() -> None:
    owners = {("d", "anonymous_id", "a1"): Owner("a1", known=False)}
    result = resolve(
        [
            EventIdentities("d", anonymous_id="a1"),
            EventIdentities("d", user_id="u1", anonymous_id="a1"),
            EventIdentities("d", anonymous_id="a1"),
        ],
        owners,
    )
    assert result.profiles == [("d", "a1"), ("d", "u1"), ("d", "u1")]
    assert [(m.event_index, m.source, m.target) for m in result.merges] == [
        (1, ("d", "a1"), ("d", "u1"))
    ]
    assert result.relied == {("d", "a1"): False}
    assert result.locked_profiles() == {("d", "a1"), ("d", "u1")}


def test_a_device_of_another_known_user_is_not_merged() -> None:
    owners = {
        ("d", "anonymous_id", "shared"): Owner("u1", known=True),
        ("d", "user_id", "u1"): Owner("u1", known=True),
    }
    result = resolve([EventIdentities("d", user_id="u2", anonymous_id="shared")], owners)
    assert result.profiles == [("d", "u2")]
    assert not result.merges
    assert ("d", "anonymous_id", "shared") not in result.links


def test_links_made_before_a_merge_end_with_the_merge_target() -> None:
    result = resolve(
        [
            EventIdentities("d", anonymous_id="a1", extra=(("email", "x@example.com"),)),
            EventIdentities("d", user_id="u1", anonymous_id="a1"),
            EventIdentities("d", user_id="u1", anonymous_id="a2"),
        ],
        {},
    )
    assert result.links[("d", "email", "x@example.com")] == ("d", "u1")
    assert result.links[("d", "anonymous_id", "a1")] == ("d", "u1")
    assert result.links[("d", "anonymous_id", "a2")] == ("d", "u1")


def test_an_identity_owned_by_another_profile_is_left_with_it() -> None:
    owners = {("d", "email", "x@example.com"): Owner("u9", known=True)}
    result = resolve(
        [EventIdentities("d", user_id="u1", extra=(("email", "x@example.com"),))], owners
    )
    assert ("d", "email", "x@example.com") not in result.links


# --- Visits, attributes, lifetime ------------------------------------------------------------


def test_a_visit_ends_after_the_inactivity_timeout() -> None:
    state = ProfileState("d", "u1")
    page = E.EVENT_TYPE_PAGE
    _apply(state, event(user="u1", kind=page, path="/a", at=T0))
    touch = _apply(state, event(user="u1", kind=page, path="/b", at=T0 + timedelta(minutes=29)))
    assert state.visit_count == 1
    assert "session" in touch.keys
    _apply(state, event(user="u1", kind=page, path="/c", at=T0 + timedelta(minutes=60)))
    assert state.visit_count == 2
    assert state.session is not None
    assert state.session.visit_number == 2
    assert state.session.landing_page == "/c"
    assert state.session.page_view_count == 1
    assert state.session.session_id == session_id_for("u1", micros(T0 + timedelta(minutes=60)))


def test_a_late_event_leaves_the_current_visit_alone() -> None:
    state = ProfileState("d", "u1")
    _apply(state, event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 + HOUR))
    _apply(state, event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0))
    assert state.visit_count == 1
    assert state.session is not None
    assert state.session.page_view_count == 1
    assert state.first_seen == micros(T0)
    assert state.last_seen == micros(T0 + HOUR)


def test_the_visit_source_falls_back_to_utm_then_the_referrer_host() -> None:
    state = ProfileState("d", "u1")
    with_referrer = event(user="u1", kind=E.EVENT_TYPE_PAGE, referrer="https://news.example/x")
    _apply(state, with_referrer)
    assert state.session is not None
    assert state.session.source == "news.example"
    other = ProfileState("d", "u2")
    with_utm = event(user="u2", kind=E.EVENT_TYPE_PAGE, referrer="https://news.example/x")
    with_utm.context.utm.source = "newsletter"
    _apply(other, with_utm)
    assert other.session is not None
    assert other.session.source == "newsletter"
    assert other.session.utm.source == "newsletter"


def test_the_cart_is_the_last_update_and_an_order_empties_it() -> None:
    state = ProfileState("d", "u1")
    _apply(
        state,
        event(user="u1", kind=E.EVENT_TYPE_CART_UPDATED, cart=[("a", 40.0, 2), ("b", 5.0, 1)]),
    )
    assert state.session is not None
    assert state.session.cart.value == 85.0
    touch = _apply(
        state,
        event(
            user="u1",
            kind=E.EVENT_TYPE_ORDER_COMPLETED,
            order=[("a", 40.0, 2)],
            at=T0 + timedelta(minutes=1),
        ),
    )
    assert not state.session.HasField("cart")
    assert (state.order_count, state.lifetime_value) == (1, 80.0)
    assert {"lifetime", "session", "event:order_completed"} <= touch.keys


def test_campaign_receipts_are_neither_visits_nor_sightings() -> None:
    state = ProfileState("d", "u1")
    received = event(user="u1", kind=E.EVENT_TYPE_CAMPAIGN_INTERACTION)
    received.campaign_interaction.campaign_id = "c1"
    received.campaign_interaction.channel = event_pb2.CAMPAIGN_CHANNEL_EMAIL
    received.campaign_interaction.action = event_pb2.CAMPAIGN_ACTION_RECEIVED
    touch = _apply(state, received)
    assert state.session is None
    assert state.last_seen is None
    assert touch.keys == {"event:campaign_interaction"}


def test_traits_set_attributes_and_a_null_removes_one() -> None:
    state = ProfileState("d", "u1")
    touch = _apply(
        state, event(user="u1", kind=E.EVENT_TYPE_IDENTIFY, traits={"plan": "pro", "vip": True})
    )
    assert state.attributes == {"plan": "pro", "vip": True}
    assert {"attribute:plan", "attribute:vip"} <= touch.keys
    touch = _apply(
        state, event(user="u1", kind=E.EVENT_TYPE_IDENTIFY, traits={"plan": "pro", "vip": None})
    )
    assert state.attributes == {"plan": "pro"}
    assert "attribute:plan" not in touch.keys
    assert "attribute:vip" in touch.keys
    touch = _apply(state, event(user="u1", kind=E.EVENT_TYPE_IDENTIFY, traits={"plan": 1.0}))
    assert "attribute:plan" in touch.keys


def test_the_context_keeps_the_last_place_when_the_latest_event_has_none() -> None:
    state = ProfileState("d", "u1")
    touch = _apply(state, event(user="u1", kind=E.EVENT_TYPE_PAGE, country="DE"))
    assert "context" in touch.keys
    touch = _apply(state, event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 + HOUR))
    assert "context" not in touch.keys
    assert state.context is not None
    assert state.context.location.country == "DE"


# --- Aggregates -------------------------------------------------------------------------------


def test_a_fact_meets_only_the_aggregates_of_its_name_and_filter_value() -> None:
    index, (shoes, any_view, purchases) = _indexed(
        count_spec("product_view", equals=("category", "shoes")),
        count_spec("product_view"),
        count_spec("order_completed"),
    )
    fact = facts_from_event(
        event(user="u", name="product_view", properties={"category": "hats"}), None
    )[0]
    assert [m.aggregate_id for m in index.candidates(fact)] == [any_view]
    fact = facts_from_event(
        event(user="u", name="product_view", properties={"category": "shoes"}), None
    )[0]
    assert {m.aggregate_id for m in index.candidates(fact)} == {shoes, any_view}
    assert purchases in index.matchers


_VALUES = st.one_of(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from([1.0, 2.0]),
    st.booleans(),
    st.builds(Instant, st.integers(1, 2)),
)


@settings(max_examples=200, deadline=None)
@given(
    filters=st.lists(
        st.tuples(st.sampled_from(["x", "y"]), st.lists(_VALUES, min_size=1, max_size=3)),
        min_size=1,
        max_size=6,
    ),
    properties=st.dictionaries(st.sampled_from(["x", "y", "z"]), _VALUES),
)
def test_the_index_never_skips_an_aggregate_that_counts_the_fact_nor_implies_one_that_does_not(
    filters: list[tuple[str, list[object]]], properties: dict[str, object]
) -> None:
    from audience.rules.values import value_to_proto

    specs = []
    for path, values in filters:
        spec = count_spec("e")
        operator = rule_pb2.OPERATOR_EQUALS if len(values) == 1 else rule_pb2.OPERATOR_IN
        value = (
            value_to_proto(values[0])  # type: ignore[arg-type]
            if len(values) == 1
            else value_to_proto(values)  # type: ignore[arg-type]
        )
        spec.filters.add(path=path, comparison=rule_pb2.Comparison(operator=operator, value=value))
        specs.append(spec)
    both = count_spec("e")
    both.filters.extend(spec.filters[0] for spec in specs[:2])
    index, _ = _indexed(*specs, both)
    fact = facts_from_event(event(user="u", name="e", properties=properties), None)[0]  # type: ignore[arg-type]
    counting = {m.aggregate_id for m in index.matchers.values() if m.observe(fact) is not None}
    candidates = index.candidates(fact)
    assert counting <= {m.aggregate_id for m in candidates}
    assert {m.aggregate_id for m in candidates if m.implied} <= counting


@settings(max_examples=200, deadline=None)
@given(
    left=st.lists(st.integers(-1000, 1000), min_size=1, max_size=8),
    right=st.lists(st.integers(-1000, 1000), min_size=1, max_size=8),
)
def test_combining_buckets_equals_counting_both_sides_into_one(
    left: list[int], right: list[int]
) -> None:
    def fill(values: list[int], offset: int) -> BucketState:
        bucket: BucketState | None = None
        for index, value in enumerate(values):
            bucket = accumulate(
                bucket, Observation(0, offset + index, float(value), f"n:{float(value % 7)}")
            )
        assert bucket is not None
        return bucket

    both = fill(left + right, 0)
    merged = combine(fill(left, 0), fill(right, len(left)))
    assert (merged.count, merged.sum, merged.min, merged.max) == (
        both.count,
        both.sum,
        both.min,
        both.max,
    )
    assert (merged.first_time, merged.last_time) == (both.first_time, both.last_time)
    assert set(merged.distinct_values) == set(both.distinct_values)


def test_buckets_past_retention_go_and_all_time_stays() -> None:
    index, (hourly, forever) = _indexed(
        count_spec("page_view", width=HOUR, retention=timedelta(hours=2)),
        count_spec("page_view", retention=timedelta(hours=2)),
    )
    state = ProfileState("d", "u1")
    touch = Touch()
    old = micros(T0 + timedelta(days=1) - timedelta(hours=5))
    facts = facts_from_event(event(user="u1", kind=E.EVENT_TYPE_PAGE), None)
    count_facts(state, [facts[0].__class__(facts[0].name, old, {}, {})], index, touch, NOW)
    assert hourly not in state.aggregates
    assert forever in state.aggregates
    state.aggregates[hourly] = AggregateSeries(
        {
            old - old % 3_600_000_000: BucketState(
                old - old % 3_600_000_000, 1, 0.0, None, None, old, old
            )
        }
    )
    prune(state, index, touch, NOW)
    assert hourly not in state.aggregates
    assert (hourly, old - old % 3_600_000_000) in touch.removed


# --- Merges and roll-ups ----------------------------------------------------------------------


def test_a_merge_keeps_the_target_attributes_and_adds_up_the_rest() -> None:
    index, (pages,) = _indexed(count_spec("page_view"))
    target = ProfileState("d", "u1", attributes={"plan": "pro"}, identities=[("user_id", "u1")])
    source = ProfileState(
        "d", "a1", attributes={"plan": "free", "color": "red"}, identities=[("anonymous_id", "a1")]
    )
    _apply(target, event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 + HOUR), index=index)
    _apply(source, event(anon="a1", kind=E.EVENT_TYPE_PAGE, at=T0), index=index)
    _apply(
        source,
        event(anon="a1", kind=E.EVENT_TYPE_ORDER_COMPLETED, order=[("x", 2.5, 2)], at=T0),
        index=index,
    )
    touch = Touch()
    merge_into(target, source, touch)
    assert target.attributes == {"plan": "pro", "color": "red"}
    assert target.identities == [("user_id", "u1"), ("anonymous_id", "a1")]
    assert (target.first_seen, target.last_seen) == (micros(T0), micros(T0 + HOUR))
    assert (target.event_count, target.order_count, target.lifetime_value) == (3, 1, 5.0)
    assert target.visit_count == 2
    assert target.aggregates[pages].buckets[0].count == 2
    assert target.merged_profiles == ["a1"]
    assert {"aggregates", "lifetime", "attribute:color", "seen"} <= touch.keys


def test_users_roll_up_into_their_accounts_and_move_between_them() -> None:
    states = {("d", "u1"): ProfileState("d", "u1")}
    resolution = resolve([EventIdentities("d", user_id="u1")], {})
    order = event(
        user="u1", account="acme", kind=E.EVENT_TYPE_ORDER_COMPLETED, order=[("x", 10.0, 1)]
    )
    outcome = apply_users([("d", order)], [True], resolution, states, {}, SETTINGS, NOW)
    assert outcome.accounts(states) == {("d", "acme")}
    accounts = {("d", "acme"): AccountState("d", "acme")}
    touches = apply_accounts(outcome, states, accounts, [("d", "acme")])
    acme = accounts[("d", "acme")]
    assert (acme.user_count, acme.order_count, acme.lifetime_value) == (1, 1, 10.0)
    assert {"account", "lifetime", "seen"} <= touches[("d", "acme")].keys

    move = event(user="u1", account="globex", at=T0 + HOUR)
    resolution = resolve(
        [EventIdentities("d", user_id="u1")], {("d", "user_id", "u1"): Owner("u1", True)}
    )
    outcome = apply_users([("d", move)], [True], resolution, states, {}, SETTINGS, NOW)
    assert outcome.accounts(states) == {("d", "acme"), ("d", "globex")}
    accounts[("d", "globex")] = AccountState("d", "globex")
    apply_accounts(outcome, states, accounts)
    globex = accounts[("d", "globex")]
    assert (acme.user_count, acme.order_count, acme.lifetime_value) == (0, 0, 0.0)
    assert (globex.user_count, globex.order_count, globex.lifetime_value) == (1, 1, 10.0)


def test_old_events_change_nothing_but_their_links_and_merges_happen() -> None:
    states = {("d", "u1"): ProfileState("d", "u1")}
    resolution = resolve([EventIdentities("d", user_id="u1")], {})
    outcome = apply_users(
        [("d", event(user="u1", kind=E.EVENT_TYPE_PAGE))],
        [False],
        resolution,
        states,
        {},
        SETTINGS,
        NOW,
    )
    state = states[("d", "u1")]
    assert state.event_count == 0
    assert state.identities == [("user_id", "u1")]
    assert outcome.touches[("d", "u1")].row


# --- Backfill -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["cart", "order", "page"]),
            st.integers(0, 50),
            st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(1, 4), max_size=3),
        ),
        max_size=12,
    )
)
def test_a_backfill_counts_what_the_live_path_counted(
    steps: list[tuple[str, int, dict[str, int]]],
) -> None:
    index, _ = _indexed(
        count_spec("product_added", function=rule_pb2.AGGREGATE_FUNCTION_SUM, prop="quantity"),
        count_spec("page_view", width=HOUR),
    )
    events = []
    moment = T0
    for kind, gap, items in steps:
        moment += timedelta(minutes=gap)
        if kind == "cart":
            events.append(
                event(
                    user="u1",
                    kind=E.EVENT_TYPE_CART_UPDATED,
                    cart=[(k, 1.0, q) for k, q in sorted(items.items())],
                    at=moment,
                )
            )
        elif kind == "order":
            events.append(
                event(
                    user="u1", kind=E.EVENT_TYPE_ORDER_COMPLETED, order=[("a", 1.0, 1)], at=moment
                )
            )
        else:
            events.append(event(user="u1", kind=E.EVENT_TYPE_PAGE, at=moment))
    live = ProfileState("d", "u1")
    _apply(live, *events, index=index)
    replayed = recompute("u1", events, index, SETTINGS, NOW)
    assert {k: v.buckets for k, v in replayed.items()} == {
        k: v.buckets for k, v in live.aggregates.items()
    }


# --- What is published and written -----------------------------------------------------------


_INSTANTS = st.integers(min_value=-62_135_596_800_000_000, max_value=253_402_300_799_999_999)
_DOUBLES = st.floats(allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    start=_INSTANTS,
    count=st.integers(min_value=0, max_value=2**63 - 1),
    total=_DOUBLES,
    low=st.none() | _DOUBLES,
    high=st.none() | _DOUBLES,
    first=st.none() | _INSTANTS,
    last=st.none() | _INSTANTS,
    distinct=st.lists(st.text(max_size=300), max_size=3).map(tuple),
)
def test_a_bucket_is_encoded_by_hand_as_protobuf_encodes_it(
    start: int,
    count: int,
    total: float,
    low: float | None,
    high: float | None,
    first: int | None,
    last: int | None,
    distinct: tuple[str, ...],
) -> None:
    bucket = BucketState(start, count, total, low, high, first, last, distinct)
    assert bucket_bytes(bucket) == bucket.to_proto().SerializeToString(deterministic=True)


def test_the_published_view_is_what_the_rules_read_from_the_row() -> None:
    index, (pages,) = _indexed(count_spec("page_view", width=HOUR))
    state = ProfileState("d", "u1", identities=[("user_id", "u1")])
    _apply(
        state,
        event(
            user="u1",
            kind=E.EVENT_TYPE_IDENTIFY,
            traits={"plan": "pro", "since": Instant(5)},
            account="acme",
        ),
        event(
            user="u1", kind=E.EVENT_TYPE_PAGE, path="/x", country="US", source="ads", at=T0 + HOUR
        ),
        event(user="u1", kind=E.EVENT_TYPE_CART_UPDATED, cart=[("a", 9.5, 2)], at=T0 + HOUR),
        index=index,
    )
    encoded = profile_view(state)
    assert profile_view(state) == encoded  # the memo gives the same bytes
    view = profile_change_pb2.EvaluationView.FromString(encoded)
    assert view.account_id == "acme"
    assert [a.aggregate_id for a in view.aggregates] == [pages]
    row = evaluation_row(view_from_proto(view, "u1"))
    assert evaluation_columns(state) == row
    assert row["cart_value"] == 19.0
    assert row["country"] == "US"

    change = encode_change(
        dataset="d",
        kind="user",
        subject_id="u1",
        sequence=7,
        change_type=ChangeType.UPDATED,
        event_ids=["e1"],
        keys={"session", "seen"},
        view=encoded,
        change_time=NOW,
    )
    merged = encode_change(
        dataset="d",
        kind="user",
        subject_id="a1",
        sequence=2,
        change_type=ChangeType.MERGED,
        event_ids=[],
        keys=(),
        view=None,
        change_time=NOW,
        merged_into="u1",
    )
    decoded = profile_change_pb2.ProfileChangeBatch.FromString(change_batch([change, merged]))
    assert [(c.profile_id, c.sequence, c.type) for c in decoded.changes] == [
        ("u1", 7, profile_change_pb2.PROFILE_CHANGE_TYPE_UPDATED),
        ("a1", 2, profile_change_pb2.PROFILE_CHANGE_TYPE_MERGED),
    ]
    assert list(decoded.changes[0].changed_keys) == ["seen", "session"]
    assert decoded.changes[0].view == view
    assert not decoded.changes[1].HasField("view")
    assert decoded.changes[1].merged_into == "u1"


def test_the_cache_hands_out_a_state_only_at_the_sequence_of_its_row() -> None:
    cache: StateCache[tuple[str, str], ProfileState] = StateCache(1 << 20, profile_size)
    state = ProfileState("d", "u1", sequence=3)
    cache.put(("d", "u1"), state)
    assert cache.take(("d", "u1"), 4) is None
    assert cache.take(("d", "u1"), 3) is None  # a stale entry is dropped, not kept
    cache.put(("d", "u1"), state)
    assert cache.take(("d", "u1"), 3) is state
    assert (len(cache), cache.weight) == (0, 0)


def test_the_cache_keeps_the_most_recent_states_that_fit_its_budget() -> None:
    index, _ = _indexed(*(count_spec(f"e{n}", width=HOUR) for n in range(10)))
    heavy = ProfileState("d", "heavy")
    _apply(heavy, *(event(user="heavy", name=f"e{n}") for n in range(10)), index=index)
    light = ProfileState("d", "light")
    assert profile_size(heavy) >= profile_size(light) + 10 * 1000

    cache: StateCache[tuple[str, str], ProfileState] = StateCache(
        profile_size(heavy) + 2 * profile_size(light), profile_size
    )
    cache.put(("d", "heavy"), heavy)
    for n in range(3):
        cache.put(("d", f"light{n}"), ProfileState("d", f"light{n}"))
    # The heavy one, least recently put, made room for the third light one.
    assert ("d", "heavy") not in cache
    assert len(cache) == 3
    assert cache.weight == 3 * profile_size(light)
    cache.put(("d", "light0"), light)  # put again: weighed again, counted once
    assert cache.weight == 3 * profile_size(light)
    cache.discard([("d", "light0"), ("d", "light1")])
    assert (len(cache), cache.weight) == (1, profile_size(light))

    nothing: StateCache[tuple[str, str], ProfileState] = StateCache(0, profile_size)
    nothing.put(("d", "light"), light)
    assert len(nothing) == 0


@pytest.mark.parametrize("kind", [E.EVENT_TYPE_PAGE, E.EVENT_TYPE_TRACK])
def test_an_event_without_a_time_cannot_be_applied(kind: int) -> None:
    timeless = event(user="u1", kind=kind, name="x" if kind == E.EVENT_TYPE_TRACK else "")
    timeless.ClearField("timestamp")
    timeless.ClearField("received_at")
    with pytest.raises(ValueError, match="timestamp"):
        _apply(ProfileState("d", "u1"), timeless)


_PROPERTY_VALUES = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["a", "b", "c"]),
    st.booleans(),
    st.builds(Instant, st.integers(0, 5)),
    st.just([1.0]),
)


@pytest.mark.parametrize(
    "function",
    [
        rule_pb2.AGGREGATE_FUNCTION_COUNT,
        rule_pb2.AGGREGATE_FUNCTION_SUM,
        rule_pb2.AGGREGATE_FUNCTION_DISTINCT_COUNT,
    ],
)
@settings(max_examples=100, deadline=None)
@given(
    moments=st.lists(
        st.tuples(st.integers(0, 10_000_000_000), _PROPERTY_VALUES), min_size=1, max_size=20
    )
)
def test_counting_without_an_observation_equals_accumulate(
    function: int, moments: list[tuple[int, AttrValue]]
) -> None:
    index, (counted,) = _indexed(
        count_spec("page_view", width=timedelta(seconds=7), function=function, prop="x")
    )
    matcher = index.matchers[counted]
    facts = [
        facts_from_event(event(user="u1", kind=E.EVENT_TYPE_PAGE), None)[0].__class__(
            "page_view", moment, {} if value is None else {"x": value}, {}
        )
        for moment, value in moments
    ]
    state = ProfileState("d", "u1")
    count_facts(state, facts, index, Touch(), NOW)
    expected: dict[int, BucketState] = {}
    for fact in facts:
        observation = matcher.observe(fact)
        if observation is None:
            continue
        start = observation.bucket_start
        expected[start] = accumulate(expected.get(start), observation)
    series = state.aggregates.get(counted)
    assert (series.buckets if series is not None else {}) == expected
