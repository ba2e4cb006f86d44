"""Evaluation views from the bus message, their SQL rows, and the value forms."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from audience.bus.v1 import profile_change_pb2
from audience.rules import (
    EVALUATION_COLUMNS,
    SECOND,
    BucketState,
    Instant,
    LazyView,
    View,
    aggregates_json,
    attributes_json,
    bucket_from_json,
    datetime_from_micros,
    evaluation_row,
    evaluation_row_from_parts,
    micros_from_datetime,
    view_from_parts,
    view_from_proto,
)
from audience.rules.values import distinct_key, format_instant, value_from_proto, value_to_proto
from audience.v1 import common_pb2, event_pb2, profile_pb2

T = 1_700_000_000_123_456


def _timestamp(micros: int, extra_nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(
        seconds=micros // SECOND, nanos=micros % SECOND * 1000 + extra_nanos
    )


def _full_message() -> profile_change_pb2.EvaluationView:
    return profile_change_pb2.EvaluationView(
        attributes={
            "plan": common_pb2.Value(string_value="pro"),
            "signup": common_pb2.Value(timestamp_value=_timestamp(T, 999)),
            "score": common_pb2.Value(number_value=math.inf),
        },
        session=profile_pb2.Session(
            start_time=_timestamp(T),
            cart=event_pb2.Cart(items=[event_pb2.CartItem(product_id="p", price=30.0, quantity=2)]),
            page_view_count=4,
            landing_page="/home",
            utm=event_pb2.Utm(source="news"),
            channel=event_pb2.CHANNEL_CALL_CENTER,
            visit_number=1,
        ),
        context=event_pb2.Context(
            location=event_pb2.Location(
                country="US", point=common_pb2.GeoPoint(latitude=1.5, longitude=-2.5)
            ),
            weather=event_pb2.Weather(
                condition=event_pb2.WEATHER_CONDITION_RAIN, temperature_celsius=-3.0
            ),
            device=event_pb2.Device(type=event_pb2.DEVICE_TYPE_TABLET, os="iOS"),
        ),
        first_seen_time=_timestamp(T - 10 * SECOND),
        lifetime_value=120.0,
        order_count=3,
        visit_count=7,
        aggregates=[
            profile_pb2.AggregateValue(
                aggregate_id="agg_1",
                buckets=[
                    profile_pb2.AggregateBucket(
                        start_time=_timestamp(0), count=2, sum=3.0, min=1.0, last_time=_timestamp(T)
                    )
                ],
            )
        ],
        account_id="acme",
    )


def test_a_view_mirrors_the_evaluation_view_message() -> None:
    view = view_from_proto(_full_message(), "user-1")
    assert view.subject_id == "user-1"
    assert view.attributes == {"plan": "pro", "signup": Instant(T), "score": None}
    assert type(view.attributes["signup"]) is Instant
    assert (view.session_start, view.cart_value, view.cart_item_count) == (T, 60.0, 2)
    assert (view.page_view_count, view.landing_page, view.utm_source) == (4, "/home", "news")
    assert (view.source, view.referrer, view.utm_medium) == (None, None, None)
    assert view.channel == "call_center"
    assert view.is_new_visitor is True
    assert (view.visit_count, view.lifetime_value, view.order_count) == (7, 120.0, 3)
    assert (view.country, view.region, view.latitude, view.longitude) == ("US", None, 1.5, -2.5)
    assert (view.weather_condition, view.temperature_celsius) == ("rain", -3.0)
    assert (view.device_type, view.os, view.browser) == ("tablet", "iOS", None)
    assert (view.first_seen, view.last_seen) == (T - 10 * SECOND, None)
    assert view.account_id == "acme"
    (bucket,) = view.aggregates["agg_1"].buckets()
    assert bucket == BucketState(0, 2, 3.0, 1.0, None, None, T)


@pytest.mark.parametrize(
    "message",
    [
        _full_message(),
        profile_change_pb2.EvaluationView(),
        profile_change_pb2.EvaluationView(
            session=profile_pb2.Session(), context=event_pb2.Context(), visit_count=2
        ),
    ],
    ids=["full", "empty", "empty-visit-and-place"],
)
def test_a_lazy_view_reads_as_the_decoded_view(
    message: profile_change_pb2.EvaluationView,
) -> None:
    decoded = view_from_proto(message, "u")

    def read(view: View | LazyView, name: str) -> object:
        value = getattr(view, name)
        # A series has no equality of its own: compared by its text.
        return aggregates_json(value) if name == "aggregates" else value

    # Each field read first, so that each group is decoded by a read of its own.
    for first in View.__dataclass_fields__:
        lazy = LazyView(message, "u")
        assert read(lazy, first) == read(decoded, first), first
        for name in View.__dataclass_fields__:
            assert read(lazy, name) == read(decoded, name), name


def test_a_lazy_view_is_read_only_and_has_only_a_views_fields() -> None:
    lazy = LazyView(_full_message(), "u")
    with pytest.raises(AttributeError):
        lazy.cart_value = 1.0
    with pytest.raises(AttributeError):
        lazy.not_a_field  # noqa: B018 - the read is the test
    assert lazy.cart_value == 60.0


def test_a_views_aggregates_read_like_a_dict_and_decode_each_once() -> None:
    message = profile_change_pb2.EvaluationView(
        aggregates=[
            profile_pb2.AggregateValue(
                aggregate_id=f"agg_{n}",
                buckets=[profile_pb2.AggregateBucket(start_time=_timestamp(n * SECOND), count=n)],
            )
            for n in (1, 2, 3)
        ]
    )
    aggregates = view_from_proto(message, "u").aggregates

    assert list(aggregates) == ["agg_1", "agg_2", "agg_3"]
    assert len(aggregates) == 3
    assert "agg_2" in aggregates
    assert aggregates.get("agg_9") is None
    assert "agg_9" not in aggregates
    with pytest.raises(KeyError):
        aggregates["agg_9"]
    assert aggregates.get("agg_2") is aggregates["agg_2"]
    counts = [bucket.count for series in aggregates.values() for bucket in series.buckets()]
    assert counts == [1, 2, 3]
    assert aggregates_json(aggregates) == aggregates_json(dict(aggregates))


def test_a_subject_without_a_visit_or_place_has_those_fields_missing() -> None:
    view = view_from_proto(profile_change_pb2.EvaluationView(), "a")
    assert view == View(subject_id="a")
    assert view_from_parts("a") == view


def test_the_row_has_every_typed_column_and_attributes_as_json() -> None:
    view = View(
        subject_id="u",
        attributes={"when": Instant(5), "n": 1.0, "tags": ["a", None], "nested": {"x": True}},
        session_start=T,
        cart_value=9.5,
    )
    row = evaluation_row(view)
    assert tuple(row) == EVALUATION_COLUMNS
    assert json.loads(row["attributes"]) == {
        "when": {"$ts": 5},
        "n": 1.0,
        "tags": ["a", None],
        "nested": {"x": True},
    }
    assert row["session_start"] == datetime_from_micros(T)
    assert row["cart_value"] == 9.5
    assert row["first_seen"] is None
    assert row["aggregates"] == "{}"


def test_the_row_from_parts_is_the_row_of_the_view_of_those_parts() -> None:
    message = _full_message()
    message.last_seen_time.CopyFrom(_timestamp(T + SECOND))
    message.lifetime_value = math.nan
    view = view_from_proto(message, "u")
    row = evaluation_row_from_parts(
        attributes=attributes_json(view.attributes),
        aggregates=aggregates_json(view.aggregates),
        session=message.session,
        context=message.context,
        first_seen=T - 10 * SECOND,
        last_seen=T + SECOND,
        lifetime_value=math.nan,
        order_count=3,
        visit_count=7,
        account_id="acme",
    )
    assert row == evaluation_row(view)
    assert row["lifetime_value"] == 0.0

    bare = evaluation_row_from_parts(attributes="{}", aggregates="{}")
    assert bare == evaluation_row(View(subject_id="a"))


def test_the_aggregates_column_holds_each_buckets_numbers_in_start_order() -> None:
    from audience.rules import series_from_buckets

    view = View(
        subject_id="u",
        aggregates={
            "agg_b": series_from_buckets(
                [
                    BucketState(2 * SECOND, 3, 0.1, -2.5, 1e16, T, T + 1, ("s:x", 'n:"q"')),
                    BucketState(SECOND, 1, 0.0, None, None, T, T),
                ]
            ),
            "agg_a": series_from_buckets([BucketState(0, 2, math.inf, 1e308, 1e308, None, None)]),
            "agg_empty": series_from_buckets([]),
        },
    )
    text = evaluation_row(view)["aggregates"]
    assert text == aggregates_json(view.aggregates)
    assert json.loads(text) == {
        "agg_a": [[0, 2, "Infinity", 1e308, 1e308, None, None]],
        "agg_b": [
            [SECOND, 1, 0.0, None, None, T, T],
            [2 * SECOND, 3, 0.1, -2.5, 1e16, T, T + 1, ["s:x", 'n:"q"']],
        ],
    }


def test_buckets_read_back_from_the_column_are_the_buckets_written() -> None:
    from audience.rules import bucket_json

    buckets = [
        BucketState(SECOND, 1, 0.0, None, None, T, T),
        BucketState(0, 3, -0.5, 1.0, 2.0, None, T, ("s:a",)),
        BucketState(0, 1, -math.inf, 3.0, 3.0, 1, 1),
    ]
    for bucket in buckets:
        assert bucket_from_json(json.loads(bucket_json(bucket))) == bucket
    # jsonb gives a whole number back without its fraction: it is still a float here.
    restored = bucket_from_json([0, 1, 16, 2, 3, 5, 5])
    assert (type(restored.sum), type(restored.min), type(restored.max)) == (float, float, float)
    nan = BucketState(SECOND, 1, math.nan, None, None, T, T)
    assert math.isnan(bucket_from_json(json.loads(bucket_json(nan))).sum)


def test_values_convert_both_ways() -> None:
    value = common_pb2.Value(
        list_value=common_pb2.ValueList(
            values=[
                common_pb2.Value(string_value="a"),
                common_pb2.Value(number_value=2.0),
                common_pb2.Value(bool_value=False),
                common_pb2.Value(null_value=struct_pb2.NULL_VALUE),
                common_pb2.Value(timestamp_value=_timestamp(T)),
                common_pb2.Value(
                    map_value=common_pb2.ValueMap(fields={"k": common_pb2.Value(string_value="v")})
                ),
            ]
        )
    )
    python = value_from_proto(value)
    assert python == ["a", 2.0, False, None, Instant(T), {"k": "v"}]
    assert value_to_proto(python) == value
    assert value_from_proto(common_pb2.Value()) is None


def test_instants_are_exact_microseconds() -> None:
    moment = datetime_from_micros(-1)
    assert micros_from_datetime(moment) == -1
    assert format_instant(T) == "2023-11-14T22:13:20.123456Z"
    assert format_instant(-62_135_596_800 * SECOND) == "0001-01-01T00:00:00Z"


def test_distinct_keys_are_tagged_by_type() -> None:
    assert distinct_key("1") == "s:1"
    assert distinct_key(1.0) == distinct_key(1) == "n:1.0"
    assert distinct_key(-0.0) == "n:0.0"
    assert distinct_key(True) == "b:true"
    assert distinct_key(Instant(3)) == "t:3"
    assert distinct_key(None) is None
    assert distinct_key(math.nan) is None


def test_attributes_json_writes_non_finite_numbers_as_null() -> None:
    assert attributes_json({"x": math.nan, "y": "ü"}) == '{"x":null,"y":"ü"}'
