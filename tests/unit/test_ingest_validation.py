"""Ingest's validation and normalisation of events: limits, paths, skew, partition keys."""

from __future__ import annotations

import math

import pytest
from google.protobuf import struct_pb2

from audience.v1 import event_pb2
from services.ingest.validation import (
    MAX_EVENT_BYTES,
    Validator,
    correct_skew,
    partition_key,
)

NOW_NS = 1_764_000_000 * 1_000_000_000
SECOND_NS = 1_000_000_000


def track(**fields: object) -> event_pb2.Event:
    event = event_pb2.Event(
        event_id="e1", type=event_pb2.EVENT_TYPE_TRACK, name="product_view", user_id="u1"
    )
    for name, value in fields.items():
        setattr(event, name, value)
    return event


def problems(event: event_pb2.Event) -> list[tuple[str, str]]:
    """Returns (field, reason) of everything wrong, the encoded checks included."""
    validator = Validator()
    found = validator.check(event, NOW_NS)
    if found is None:
        found = validator.check_encoded(event, event.ByteSize())
    return [(v.field, v.reason) for v in found or []]


def realistic_events() -> list[event_pb2.Event]:
    view = track()
    view.properties["category"].string_value = "shoes"
    view.properties["price"].number_value = 49.5
    view.properties["in_stock"].bool_value = True
    view.properties["tags"].list_value.values.add().string_value = "sale"
    view.context.page.url = "https://shop.example.com/p/1"
    view.context.channel = event_pb2.CHANNEL_WEB
    view.context.location.country = "US"
    view.context.location.point.latitude = 30.27
    view.context.location.point.longitude = -97.74
    view.context.weather.condition = event_pb2.WEATHER_CONDITION_RAIN
    view.context.weather.temperature_celsius = 21.5
    view.context.device.type = event_pb2.DEVICE_TYPE_MOBILE
    page = event_pb2.Event(event_id="p", type=event_pb2.EVENT_TYPE_PAGE, anonymous_id="a1")
    identify = event_pb2.Event(event_id="i", type=event_pb2.EVENT_TYPE_IDENTIFY, user_id="u1")
    identify.identify.traits["plan"].string_value = "pro"
    identify.identify.identities.add(type="email", value="ann@example.com")
    cart = event_pb2.Event(event_id="c", type=event_pb2.EVENT_TYPE_CART_UPDATED, user_id="u1")
    cart.cart.items.add(product_id="sku-1", price=20.0, quantity=2)
    cart.cart.currency = "USD"
    order = event_pb2.Event(event_id="o", type=event_pb2.EVENT_TYPE_ORDER_COMPLETED, user_id="u")
    order.order.order_id = "o-1"
    order.order.items.add(product_id="sku-1", price=20.0, quantity=1)
    campaign = event_pb2.Event(
        event_id="m", type=event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION, user_id="u1"
    )
    campaign.campaign_interaction.campaign_id = "spring"
    campaign.campaign_interaction.channel = event_pb2.CAMPAIGN_CHANNEL_EMAIL
    campaign.campaign_interaction.action = event_pb2.CAMPAIGN_ACTION_OPENED
    account = event_pb2.Event(
        event_id="x", type=event_pb2.EVENT_TYPE_ACCOUNT_UPDATE, account_id="acme"
    )
    account.account_update.traits["seats"].number_value = 40
    return [view, page, identify, cart, order, campaign, account]


@pytest.mark.parametrize(
    "event", realistic_events(), ids=lambda e: event_pb2.EventType.Name(e.type)
)
def test_realistic_events_of_every_type_are_valid(event: event_pb2.Event) -> None:
    assert problems(event) == []


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (event_pb2.EVENT_TYPE_PAGE, "page_view"),
        (event_pb2.EVENT_TYPE_SCREEN, "screen_view"),
        (event_pb2.EVENT_TYPE_IDENTIFY, "identify"),
    ],
)
def test_fixed_types_get_their_name_and_refuse_another(kind: int, name: str) -> None:
    event = event_pb2.Event(event_id="e", type=kind, user_id="u")  # type: ignore[arg-type]
    assert problems(event) == []
    assert event.name == name
    event.name = "something_else"
    assert problems(event) == [("name", "NAME_MISMATCH")]


def test_track_events_need_a_name_of_the_allowed_characters() -> None:
    assert problems(track(name="")) == [("name", "REQUIRED")]
    assert problems(track(name="has space")) == [("name", "INVALID_NAME")]
    assert problems(track(name="x" * 129)) == [("name", "INVALID_NAME")]
    assert problems(track(name="checkout:step-2.done")) == []


def test_ids_are_one_to_128_characters() -> None:
    assert problems(track(event_id="")) == [("event_id", "REQUIRED")]
    assert problems(track(event_id="e" * 129)) == [("event_id", "ID_TOO_LONG")]
    assert problems(track(event_id="e" * 128)) == []
    assert problems(track(user_id="u" * 129)) == [("user_id", "ID_TOO_LONG")]
    assert problems(track(account_id="a" * 129)) == [("account_id", "ID_TOO_LONG")]


def test_ids_hold_no_control_characters_which_no_profile_name_can() -> None:
    for control in ("\x00", "\n", "\r", "\t", "\x1f"):
        for field in ("event_id", "user_id", "anonymous_id", "account_id"):
            assert problems(track(**{field: f"a{control}b"})) == [(field, "CONTROL_CHARACTER")]
    assert problems(track(user_id="del\x7f-and-é")) == []
    cart = event_pb2.Event(event_id="c", type=event_pb2.EVENT_TYPE_CART_UPDATED, user_id="u")
    cart.cart.items.add(product_id="sku\n1", quantity=1)
    assert problems(cart) == [("cart.items[0].product_id", "CONTROL_CHARACTER")]
    order = event_pb2.Event(event_id="o", type=event_pb2.EVENT_TYPE_ORDER_COMPLETED, user_id="u")
    order.order.order_id = "o\r1"
    assert problems(order) == [("order.order_id", "CONTROL_CHARACTER")]
    campaign = event_pb2.Event(
        event_id="m", type=event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION, user_id="u"
    )
    campaign.campaign_interaction.campaign_id = "spring"
    campaign.campaign_interaction.creative_id = "tab\there"
    campaign.campaign_interaction.channel = event_pb2.CAMPAIGN_CHANNEL_EMAIL
    campaign.campaign_interaction.action = event_pb2.CAMPAIGN_ACTION_OPENED
    assert problems(campaign) == [("campaign_interaction.creative_id", "CONTROL_CHARACTER")]


def test_no_string_anywhere_holds_nul_which_postgresql_cannot_store() -> None:
    event = track()
    event.properties["note"].string_value = "a\x00b"
    event.properties["tags"].list_value.values.add().string_value = "\x00"
    event.properties["fine"].string_value = "line\nbreak"
    event.context.page.title = "\x00"
    event.context.device.model = "x\x00"
    assert sorted(problems(event)) == [
        ("context.device.model", "NUL_CHARACTER"),
        ("context.page.title", "NUL_CHARACTER"),
        ("properties.note", "NUL_CHARACTER"),
        ("properties.tags[0]", "NUL_CHARACTER"),
    ]
    identify = event_pb2.Event(event_id="i", type=event_pb2.EVENT_TYPE_IDENTIFY, user_id="u")
    identify.identify.identities.add(type="email", value="ann\x00@example.com")
    identify.identify.traits["nested"].map_value.fields["deep"].string_value = "\x00"
    assert sorted(problems(identify)) == [
        ("identify.identities[0].value", "NUL_CHARACTER"),
        ("identify.traits.nested.deep", "NUL_CHARACTER"),
    ]


def test_an_event_needs_a_user_or_an_anonymous_id_and_an_account_update_an_account() -> None:
    assert problems(track(user_id="")) == [("user_id", "REQUIRED")]
    assert problems(track(user_id="", anonymous_id="a")) == []
    account = event_pb2.Event(event_id="x", type=event_pb2.EVENT_TYPE_ACCOUNT_UPDATE)
    account.account_update.SetInParent()
    assert problems(account) == [("account_id", "REQUIRED")]


def test_the_type_is_required_and_must_be_known() -> None:
    assert problems(track(type=0)) == [("type", "REQUIRED")]
    assert problems(track(type=42)) == [("type", "UNKNOWN_ENUM_VALUE")]


def test_the_payload_must_match_the_type() -> None:
    event = track()
    event.cart.currency = "USD"
    assert problems(event) == [("cart", "PAYLOAD_MISMATCH")]
    order = event_pb2.Event(event_id="o", type=event_pb2.EVENT_TYPE_ORDER_COMPLETED, user_id="u")
    assert problems(order) == [("order", "REQUIRED")]


def test_cart_items_and_amounts_are_checked_with_their_paths() -> None:
    cart = event_pb2.Event(event_id="c", type=event_pb2.EVENT_TYPE_CART_UPDATED, user_id="u")
    cart.cart.items.add(product_id="ok", price=1.0, quantity=1)
    cart.cart.items.add(product_id="", price=-1.0, quantity=0)
    cart.cart.items.add(product_id="nan", price=math.nan, quantity=1)
    cart.cart.currency = "usd"
    assert problems(cart) == [
        ("cart.items[1].product_id", "REQUIRED"),
        ("cart.items[1].price", "OUT_OF_RANGE"),
        ("cart.items[1].quantity", "OUT_OF_RANGE"),
        ("cart.items[2].price", "OUT_OF_RANGE"),
        ("cart.currency", "INVALID_CURRENCY"),
    ]
    many = event_pb2.Event(event_id="c", type=event_pb2.EVENT_TYPE_CART_UPDATED, user_id="u")
    for i in range(501):
        many.cart.items.add(product_id=f"p{i}", price=1.0, quantity=1)
    assert problems(many) == [("cart.items", "TOO_MANY_VALUES")]


def test_campaign_enums_reject_their_zero_value() -> None:
    event = event_pb2.Event(
        event_id="m", type=event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION, user_id="u"
    )
    event.campaign_interaction.campaign_id = "c"
    assert problems(event) == [
        ("campaign_interaction.channel", "REQUIRED"),
        ("campaign_interaction.action", "REQUIRED"),
    ]


def test_at_most_200_properties_and_traits() -> None:
    event = track()
    for i in range(201):
        event.properties[f"p{i}"].bool_value = True
    assert problems(event) == [("properties", "TOO_MANY_ENTRIES")]
    identify = event_pb2.Event(event_id="i", type=event_pb2.EVENT_TYPE_IDENTIFY, user_id="u")
    for i in range(201):
        identify.identify.traits[f"t{i}"].bool_value = True
    assert problems(identify) == [("identify.traits", "TOO_MANY_ENTRIES")]


def test_property_keys_are_names_the_rule_language_can_reach() -> None:
    event = track()
    event.properties["product name"].string_value = "x"
    event.properties["ok-key_1"].string_value = "y"
    assert problems(event) == [("properties", "INVALID_KEY")]


def test_values_nest_at_most_eight_levels_with_the_path_of_the_deepest() -> None:
    def nested(levels: int) -> event_pb2.Event:
        event = track()
        value = event.properties["a"]
        for _ in range(levels - 1):
            value = value.map_value.fields["b"]
        value.string_value = "leaf"
        return event

    assert problems(nested(8)) == []
    assert problems(nested(9)) == [("properties.a.b.b.b.b.b.b.b", "TOO_DEEP")]


def test_lists_hold_at_most_1000_values() -> None:
    event = track()
    values = event.properties["tags"].list_value.values
    for i in range(1001):
        values.add().number_value = i
    assert problems(event) == [("properties.tags", "TOO_MANY_VALUES")]


def test_numbers_are_finite_anywhere() -> None:
    event = track()
    event.properties["price"].number_value = math.inf
    event.properties["list"].list_value.values.add().number_value = math.nan
    event.context.location.point.latitude = 91
    event.context.weather.temperature_celsius = math.nan
    assert sorted(problems(event)) == [
        ("context.location.point.latitude", "OUT_OF_RANGE"),
        ("context.weather.temperature_celsius", "NOT_FINITE"),
        ("properties.list[0]", "NOT_FINITE"),
        ("properties.price", "NOT_FINITE"),
    ]


def test_a_value_must_have_a_kind() -> None:
    event = track()
    event.properties["empty"].SetInParent()
    assert problems(event) == [("properties.empty", "VALUE_NOT_SET")]


def test_strings_are_at_most_8192_bytes_counted_in_utf8() -> None:
    event = track()
    event.properties["ascii"].string_value = "x" * 8192
    assert problems(event) == []
    # 2,049 four-byte characters: few characters, too many bytes.
    event.properties["emoji"].string_value = "\U0001f600" * 2049
    event.context.page.title = "t" * 8193
    assert sorted(problems(event)) == [
        ("context.page.title", "STRING_TOO_LONG"),
        ("properties.emoji", "STRING_TOO_LONG"),
    ]


def test_an_event_over_64_kib_is_refused_whole() -> None:
    event = track()
    for i in range(9):
        event.properties[f"p{i}"].string_value = "x" * 8000
    assert event.ByteSize() > MAX_EVENT_BYTES
    assert problems(event) == [("", "EVENT_TOO_LARGE")]


def test_an_oversized_event_is_refused_before_its_nested_values_are_walked() -> None:
    event = track()
    for i in range(200):
        values = event.properties[f"p{i}"].list_value.values
        for _ in range(400):
            values.add().null_value = struct_pb2.NULL_VALUE
    found = Validator().check(event, NOW_NS)
    assert [(v.field, v.reason) for v in found or []] == [("", "EVENT_TOO_LARGE")]


def test_clock_skew_is_corrected_from_sent_at() -> None:
    event = track()
    # The client's clock is an hour behind: it says the event happened 5 s before sending.
    client_now = NOW_NS - 3600 * SECOND_NS
    event.timestamp.FromNanoseconds(client_now - 5 * SECOND_NS)
    event.sent_at.FromNanoseconds(client_now)
    assert problems_at(event) == []
    assert event.timestamp.ToNanoseconds() == NOW_NS - 5 * SECOND_NS
    assert correct_skew(10, 15, 100) == 95


def problems_at(event: event_pb2.Event) -> list[tuple[str, str]]:
    return [(v.field, v.reason) for v in Validator().check(event, NOW_NS) or []]


def test_without_sent_at_the_timestamp_is_kept_and_without_both_it_is_left_for_receipt() -> None:
    event = track()
    event.timestamp.FromNanoseconds(NOW_NS - 60 * SECOND_NS)
    assert problems_at(event) == []
    assert event.timestamp.ToNanoseconds() == NOW_NS - 60 * SECOND_NS
    bare = track()
    assert problems_at(bare) == []
    assert not bare.HasField("timestamp")


def test_absurd_times_are_refused() -> None:
    old = track()
    old.timestamp.FromSeconds(631_152_000)  # 1990
    assert problems_at(old) == [("timestamp", "TIMESTAMP_TOO_OLD")]
    future = track()
    future.timestamp.FromNanoseconds(NOW_NS + 2 * 86_400 * SECOND_NS)
    assert problems_at(future) == [("timestamp", "TIMESTAMP_IN_FUTURE")]
    bad_nanos = track()
    bad_nanos.timestamp.seconds = NOW_NS // SECOND_NS
    bad_nanos.timestamp.nanos = -1
    assert problems_at(bad_nanos) == [("timestamp", "INVALID_TIMESTAMP")]
    skewed_too_far = track()
    skewed_too_far.timestamp.FromNanoseconds(NOW_NS + 3 * 86_400 * SECOND_NS)
    skewed_too_far.sent_at.FromNanoseconds(NOW_NS)
    assert problems_at(skewed_too_far) == [("timestamp", "TIMESTAMP_IN_FUTURE")]


def test_timestamp_values_inside_properties_may_be_any_protobuf_timestamp() -> None:
    event = track()
    event.properties["born"].timestamp_value.FromSeconds(-631_152_000)  # 1950
    assert problems_at(event) == []
    event.properties["bad"].timestamp_value.nanos = 2_000_000_000
    assert problems_at(event) == [("properties.bad", "INVALID_TIMESTAMP")]


def test_country_codes_are_two_letters_upper_cased() -> None:
    event = track()
    event.context.location.country = "de"
    assert problems_at(event) == []
    assert event.context.location.country == "DE"
    event.context.location.country = "Germany"
    assert problems_at(event) == [("context.location.country", "INVALID_COUNTRY")]


def test_unknown_enum_values_in_the_context_are_refused() -> None:
    event = track()
    event.context.channel = 99  # type: ignore[assignment]
    event.context.device.type = 42  # type: ignore[assignment]
    assert problems_at(event) == [
        ("context.channel", "UNKNOWN_ENUM_VALUE"),
        ("context.device.type", "UNKNOWN_ENUM_VALUE"),
    ]


def test_identities_have_a_type_name_and_a_value() -> None:
    event = event_pb2.Event(event_id="i", type=event_pb2.EVENT_TYPE_IDENTIFY, user_id="u")
    event.identify.identities.add(type="Email", value="")
    assert problems_at(event) == [
        ("identify.identities[0].type", "INVALID_IDENTITY_TYPE"),
        ("identify.identities[0].value", "REQUIRED"),
    ]


def test_the_partition_key_is_the_user_then_the_visitor_then_the_account() -> None:
    assert partition_key(track(user_id="u", anonymous_id="a")) == "u"
    assert partition_key(track(user_id="", anonymous_id="a")) == "a"
    account = event_pb2.Event(type=event_pb2.EVENT_TYPE_ACCOUNT_UPDATE, account_id="acme")
    assert partition_key(account) == "account:acme"
