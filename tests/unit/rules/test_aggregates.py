"""Facts, aggregate specs, bucket arithmetic and what the profile service maintains."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from audience.rules import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    BucketState,
    Fact,
    Observation,
    accumulate,
    aggregate_id,
    bucket_start,
    compile_aggregate,
    compile_rule,
    facts_from_event,
    parse_rule,
    plan_window,
)
from audience.rules.aggregates import DISTINCT_LIMIT, make_spec
from audience.v1 import common_pb2, event_pb2, profile_pb2, rule_pb2

T = 1_700_000_000_123_456


def _window(text: str) -> rule_pb2.Window:
    return parse_rule(f'count(event "e", {text}) > 0').behavior.window


@pytest.mark.parametrize(
    ("window", "width", "retention"),
    [
        ("all time", 0, 0),
        ("this session", SECOND, 2 * DAY),
        ("last 1 minute", SECOND, MINUTE + SECOND),
        ("last 30 minutes", SECOND, 30 * MINUTE + SECOND),
        ("last 2 hours", MINUTE, 2 * HOUR + MINUTE),
        ("last 1 day", MINUTE, DAY + MINUTE),
        ("last 7 days", HOUR, 7 * DAY + HOUR),
        ("last 99 days", HOUR, 99 * DAY + HOUR),
        ("last 100 days", DAY, 101 * DAY),
        ("between @2024-01-01 and @2024-02-01", DAY, 0),
        ("between @2024-01-01T10:00:00Z and @2024-01-01T12:00:00Z", HOUR, 0),
        ("between @2024-01-01T10:00:01Z and @2024-01-01T12:00:00Z", SECOND, 0),
    ],
)
def test_bucket_width_and_retention_per_window(window: str, width: int, retention: int) -> None:
    plan = plan_window(_window(window))
    assert (plan.width, plan.retention) == (width, retention)


def test_bucket_starts_are_multiples_of_the_width_since_the_epoch() -> None:
    assert bucket_start(T, SECOND) == 1_700_000_000_000_000
    assert bucket_start(T, DAY) == 1_699_920_000_000_000
    assert bucket_start(-1, SECOND) == -SECOND
    assert bucket_start(T, 0) == 0


def _spec(rule_text: str) -> profile_pb2.AggregateSpec:
    (spec,) = compile_rule(parse_rule(rule_text)).aggregates
    return spec


def test_the_same_spec_always_has_the_same_id() -> None:
    a = _spec('count(event "e" where a = 1 and b = 2, last 7 days) > 0')
    b = _spec('count(event "e" where b = 2 and a = 1, last 5 days) > 0')
    assert a.aggregate_id == b.aggregate_id
    assert a.retention != b.retention
    assert aggregate_id(a) == a.aggregate_id
    last = _spec('last_time(event "e" where a = 1 and b = 2, last 7 days) exists')
    assert last.aggregate_id == a.aggregate_id
    total = _spec('sum(price, event "e", all time) > 0')
    assert total.aggregate_id == _spec('average(price, event "e", all time) > 0').aggregate_id
    assert total.aggregate_id != _spec('sum(cost, event "e", all time) > 0').aggregate_id
    assert (
        a.aggregate_id != _spec('count(event "e" where a = 1 and b = 2, all time) > 0').aggregate_id
    )


def test_campaign_and_affinity_conditions_are_aggregates_over_facts() -> None:
    campaign = _spec('campaign(email, clicked, "spring", last 7 days)')
    assert campaign.event_name == "campaign_interaction"
    assert {(f.path, f.comparison.value.string_value) for f in campaign.filters} == {
        ("channel", "email"),
        ("action", "clicked"),
        ("campaign_id", "spring"),
    }
    affinity = _spec('affinity(added_to_cart, category "shoes", all time) >= 2')
    assert affinity.event_name == "product_added"
    assert affinity.filters[0].path == "category"


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=micros // SECOND, nanos=micros % SECOND * 1000)


def _event(**fields: object) -> event_pb2.Event:
    return event_pb2.Event(event_id="e1", timestamp=_timestamp(T), **fields)  # type: ignore[arg-type]


def _item(product: str, quantity: int, price: float = 10.0) -> event_pb2.CartItem:
    return event_pb2.CartItem(
        product_id=product, category="shoes", brand="acme", price=price, quantity=quantity
    )


def test_a_track_event_is_its_own_fact_with_context_readable() -> None:
    event = _event(
        type=event_pb2.EVENT_TYPE_TRACK,
        name="product_view",
        properties={"category": common_pb2.Value(string_value="shoes")},
        context=event_pb2.Context(
            channel=event_pb2.CHANNEL_WEB,
            location=event_pb2.Location(country="US"),
            device=event_pb2.Device(type=event_pb2.DEVICE_TYPE_MOBILE),
        ),
    )
    (fact,) = facts_from_event(event, None)
    assert fact == Fact(
        "product_view",
        T,
        {"category": "shoes"},
        {"channel": "web", "location": {"country": "US"}, "device": {"type": "mobile"}},
    )


def test_pages_and_screens_become_views_with_page_fields() -> None:
    page = _event(
        type=event_pb2.EVENT_TYPE_PAGE,
        context=event_pb2.Context(page=event_pb2.Page(path="/pricing", title="Pricing")),
    )
    (fact,) = facts_from_event(page, None)
    assert (fact.name, fact.properties) == ("page_view", {"path": "/pricing", "title": "Pricing"})
    (screen,) = facts_from_event(_event(type=event_pb2.EVENT_TYPE_SCREEN), None)
    assert screen.name == "screen_view"


def test_a_cart_update_adds_a_product_fact_per_quantity_that_rose() -> None:
    before = event_pb2.Cart(items=[_item("p1", 1), _item("p2", 2)])
    after = event_pb2.Cart(items=[_item("p1", 3), _item("p2", 1), _item("p3", 1)], currency="USD")
    cart, *added = facts_from_event(
        _event(type=event_pb2.EVENT_TYPE_CART_UPDATED, cart=after), before
    )
    assert cart.name == "cart_updated"
    assert cart.properties == {"value": 50.0, "item_count": 5.0, "currency": "USD"}
    assert [(f.name, f.properties["product_id"], f.properties["quantity"]) for f in added] == [
        ("product_added", "p1", 2.0),
        ("product_added", "p3", 1.0),
    ]
    assert added[0].properties["category"] == "shoes"
    first = facts_from_event(_event(type=event_pb2.EVENT_TYPE_CART_UPDATED, cart=after), None)
    assert len(first) == 4


def test_an_order_yields_a_purchase_per_item() -> None:
    order = event_pb2.Order(order_id="o1", items=[_item("p1", 2), _item("p2", 1, 5.0)])
    completed, *bought = facts_from_event(
        _event(type=event_pb2.EVENT_TYPE_ORDER_COMPLETED, order=order), None
    )
    assert completed.name == "order_completed"
    assert completed.properties["revenue"] == 25.0
    assert completed.properties["order_id"] == "o1"
    assert [(f.name, f.properties["product_id"]) for f in bought] == [
        ("product_purchased", "p1"),
        ("product_purchased", "p2"),
    ]


def test_campaign_interactions_read_as_labels() -> None:
    interaction = event_pb2.CampaignInteraction(
        campaign_id="spring",
        channel=event_pb2.CAMPAIGN_CHANNEL_AD,
        action=event_pb2.CAMPAIGN_ACTION_OPENED,
    )
    (fact,) = facts_from_event(
        _event(type=event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION, campaign_interaction=interaction),
        None,
    )
    assert fact.properties == {"campaign_id": "spring", "channel": "ad", "action": "opened"}


def test_an_event_without_a_time_is_refused() -> None:
    with pytest.raises(ValueError, match="no timestamp"):
        facts_from_event(
            event_pb2.Event(event_id="e", type=event_pb2.EVENT_TYPE_TRACK, name="x"), None
        )


def test_a_matcher_counts_matching_facts_in_their_bucket() -> None:
    spec = _spec(
        'count(event "view" where category = "shoes" and context.location.country = "US",'
        " last 7 days) > 0"
    )
    matcher = compile_aggregate(spec)
    us = Fact("view", T, {"category": "shoes"}, {"location": {"country": "US"}})
    assert matcher.observe(us) == Observation(bucket_start(T, HOUR), T)
    assert matcher.observe(Fact("view", T, {"category": "shoes"})) is None
    assert matcher.observe(Fact("other", T, {"category": "shoes"}, us.context)) is None
    assert (matcher.width, matcher.retention) == (HOUR, 7 * DAY + HOUR)


def test_value_aggregates_count_only_facts_with_the_value() -> None:
    sums = compile_aggregate(_spec('sum(price, event "buy", all time) > 0'))
    assert sums.observe(Fact("buy", T, {"price": 9.5})) == Observation(0, T, value=9.5)
    assert sums.observe(Fact("buy", T, {"price": "9.5"})) is None
    assert sums.observe(Fact("buy", T, {})) is None
    distinct = compile_aggregate(_spec('distinct_count(sku, event "buy", all time) > 0'))
    assert distinct.observe(Fact("buy", T, {"sku": "a"})) == Observation(0, T, distinct="s:a")
    assert distinct.observe(Fact("buy", T, {"sku": 1.0})) == Observation(0, T, distinct="n:1.0")
    assert distinct.observe(Fact("buy", T, {"sku": [1]})) is None


def test_accumulate_keeps_count_sum_extremes_times_and_distinct_values() -> None:
    bucket = accumulate(None, Observation(0, 5, value=2.0))
    bucket = accumulate(bucket, Observation(0, 3, value=-1.0))
    bucket = accumulate(bucket, Observation(0, 9))
    assert bucket == BucketState(0, 3, 1.0, -1.0, 2.0, 3, 9)
    full = BucketState(0, 1, 0.0, None, None, 1, 1, tuple(f"s:{n}" for n in range(DISTINCT_LIMIT)))
    assert (
        accumulate(full, Observation(0, 2, distinct="s:new")).distinct_values
        == full.distinct_values
    )
    assert accumulate(full, Observation(0, 2, distinct="s:1")).count == 2


def test_make_spec_fills_id_and_retention() -> None:
    spec = make_spec(
        "e", [], rule_pb2.AGGREGATE_FUNCTION_MAX, "price", plan_window(_window("last 7 days"))
    )
    assert spec.function == rule_pb2.AGGREGATE_FUNCTION_SUM
    assert spec.bucket_width == duration_pb2.Duration(seconds=3600)
    assert spec.aggregate_id == aggregate_id(spec)
