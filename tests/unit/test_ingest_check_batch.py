"""Ingest's batch path reaches, for every event, the verdict and the normalised event of the
per-event check (``Validator.check``), whatever the events hold and however they are encoded.

The batch path proves the common case over whole columns (services/ingest/wire.py and
patterns.py) and hands anything else to the per-event check; these tests compare what
``Ingestor.prepare`` puts on the bus, decoded, with the per-event check's outcome, and show
which events the bulk checks prove themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audience.bus.v1 import events_pb2 as bus_events_pb2
from audience.streams import partition_of
from audience.v1 import common_pb2, event_pb2, ingest_service_pb2
from services.ingest.appender import Appended, PartitionBatch
from services.ingest.ingestor import Ingestor
from services.ingest.records import EventFields, varint
from services.ingest.validation import MAX_STRING_BYTES, Validator, partition_key
from services.ingest.wire import event_encodings

NOW_NS = 1_764_000_000 * 1_000_000_000 + 123_456_789
SECOND_NS = 1_000_000_000
PARTITIONS = 4

Outcome = tuple[list[tuple[str, str]] | None, event_pb2.Event | None]


class _Sink:
    async def append(self, batches: Sequence[PartitionBatch], headers_json: str) -> list[Appended]:
        raise AssertionError("not appended in these tests")


class _NoBackpressure:
    def check(self) -> None:
        return None


def request_of(encodings: Sequence[bytes]) -> bytes:
    parent = b"datasets/shop"
    return (
        b"\x0a"
        + varint(len(parent))
        + parent
        + b"".join(b"\x12" + varint(len(encoding)) + encoding for encoding in encodings)
    )


def outcome(encodings: Sequence[bytes]) -> list[Outcome]:
    """What the batch path makes of events so encoded: violations, or the event on the bus."""
    encoded = request_of(encodings)
    events = ingest_service_pb2.SendEventsRequest.FromString(encoded).events
    sink = _Sink()
    ingestor = Ingestor(sink, _NoBackpressure(), partitions=PARTITIONS, clock=lambda: NOW_NS)
    prepared = ingestor.prepare("shop", events, encoded)
    on_bus: dict[int, event_pb2.Event] = {}
    for batch in prepared.batches:
        assert batch.dataset == "shop"
        for event_id, record, index in zip(
            batch.event_ids, batch.records, batch.positions, strict=True
        ):
            ingested = bus_events_pb2.EventBatch.FromString(record).events[0]
            assert ingested.dataset == "shop"
            event = event_pb2.Event()
            event.CopyFrom(ingested.event)
            assert event_id == event.event_id
            assert batch.partition == partition_of(partition_key(event), PARTITIONS)
            on_bus[index] = event
    return [
        (
            [(v.field, v.reason) for v in prepared.violations[index]]
            if index in prepared.violations
            else None,
            on_bus.get(index),
        )
        for index in range(len(encodings))
    ]


def expected(encoding: bytes) -> Outcome:
    """What the per-event check makes of one event so encoded."""
    event = event_pb2.Event.FromString(encoding)
    validator = Validator()
    problems = validator.check(event, NOW_NS)
    if problems is None:
        size = event.ByteSize()
        if size > MAX_STRING_BYTES:
            problems = validator.check_encoded(event, size)
    if problems:
        return [(v.field, v.reason) for v in problems], None
    if not event.HasField("timestamp"):
        event.timestamp.FromNanoseconds(NOW_NS)
    event.received_at.FromNanoseconds(NOW_NS)
    return None, event


def assert_as_each(encodings: Sequence[bytes]) -> None:
    assert outcome(encodings) == [expected(encoding) for encoding in encodings]


def proved_in_bulk(events: Sequence[event_pb2.Event]) -> bool:
    """Whether the bulk checks proved every event valid, with no per-event check."""
    encodings = [event.SerializeToString() for event in events]
    parsed = ingest_service_pb2.SendEventsRequest.FromString(request_of(encodings)).events
    checked = Validator().check_batch(parsed, encodings, NOW_NS)
    return not checked.violations and not checked.rewritten


def view(index: int = 0, **fields: object) -> event_pb2.Event:
    event = event_pb2.Event(
        event_id=f"e{index}",
        type=event_pb2.EVENT_TYPE_TRACK,
        name="product_view",
        user_id=f"u{index}",
        anonymous_id=f"a{index}",
    )
    for name, value in fields.items():
        setattr(event, name, value)
    event.properties["category"].string_value = "shoes"
    event.properties["price"].number_value = 49.5
    event.properties["in_stock"].bool_value = True
    event.properties["gift"].null_value = 0  # type: ignore[assignment]
    context = event.context
    context.channel = event_pb2.CHANNEL_WEB
    context.page.url = "https://shop.example.com/p/1"
    context.location.country = "US"
    context.location.point.latitude = 30.27
    context.location.point.longitude = -97.74
    context.weather.condition = event_pb2.WEATHER_CONDITION_RAIN
    context.weather.temperature_celsius = 21.5
    context.device.type = event_pb2.DEVICE_TYPE_MOBILE
    sent = NOW_NS - 3600 * SECOND_NS
    event.sent_at.FromNanoseconds(sent)
    event.timestamp.FromNanoseconds(sent - 5 * SECOND_NS - 17)
    return event


def storefront() -> list[event_pb2.Event]:
    events = [view(0), view(1)]
    page = event_pb2.Event(event_id="p", type=event_pb2.EVENT_TYPE_PAGE, anonymous_id="a1")
    page.context.page.path = "/pricing"
    identify = event_pb2.Event(event_id="i", type=event_pb2.EVENT_TYPE_IDENTIFY, user_id="u1")
    identify.identify.traits["plan"].string_value = "pro"
    identify.identify.identities.add(type="email", value="ann@example.com")
    cart = event_pb2.Event(event_id="c", type=event_pb2.EVENT_TYPE_CART_UPDATED, user_id="u1")
    cart.cart.items.add(product_id="sku-1", name="Runner", price=20.0, quantity=2)
    cart.cart.items.add(product_id="sku-2", quantity=1)
    cart.cart.currency = "USD"
    cart.cart.value = 40.0
    order = event_pb2.Event(event_id="o", type=event_pb2.EVENT_TYPE_ORDER_COMPLETED, user_id="u")
    order.order.order_id = "o-1"
    order.order.items.add(product_id="sku-1", price=20.0, quantity=1)
    order.order.discount = 5.0
    campaign = event_pb2.Event(
        event_id="m", type=event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION, user_id="u1"
    )
    campaign.campaign_interaction.campaign_id = "spring"
    campaign.campaign_interaction.channel = event_pb2.CAMPAIGN_CHANNEL_EMAIL
    campaign.campaign_interaction.action = event_pb2.CAMPAIGN_ACTION_OPENED
    others = [page, identify, cart, order, campaign]
    for event in others:
        event.timestamp.FromNanoseconds(NOW_NS - 60 * SECOND_NS)
        event.sent_at.FromNanoseconds(NOW_NS - 30 * SECOND_NS)
    return events + others


def test_a_storefront_call_is_proved_valid_in_bulk_and_normalised_as_each_event_alone() -> None:
    events = [*storefront(), view(2, user_id="u" * 128, name="n" * 128)]
    assert proved_in_bulk(events)
    assert_as_each([event.SerializeToString() for event in events])


def test_calls_whose_events_all_lack_a_time_or_a_sent_at_are_proved_in_bulk() -> None:
    without_sent = storefront()
    for event in without_sent:
        event.ClearField("sent_at")
    without_times = storefront()
    for event in without_times:
        event.ClearField("sent_at")
        event.ClearField("timestamp")
    only_sent = storefront()
    for event in only_sent:
        event.ClearField("timestamp")
    for events in (without_sent, without_times, only_sent):
        assert proved_in_bulk(events)
        assert_as_each([event.SerializeToString() for event in events])


def test_values_outside_the_bulk_checks_are_judged_as_each_event_alone() -> None:
    def with_property(value: common_pb2.Value, key: str = "k") -> event_pb2.Event:
        event = view()
        event.properties[key].CopyFrom(value)
        return event

    nested = with_property(common_pb2.Value(list_value=common_pb2.ValueList()))
    lower_case = view()
    lower_case.context.location.country = "de"
    no_sent = view()
    no_sent.ClearField("sent_at")  # unlike the rest of its call
    valid = [
        with_property(common_pb2.Value(string_value="x"), key="k" * 128),
        with_property(common_pb2.Value(string_value="x" * 126)),
        with_property(common_pb2.Value(null_value=3)),  # type: ignore[arg-type]
        nested,
        lower_case,
        no_sent,
    ]
    invalid = [
        with_property(common_pb2.Value(number_value=math.nan)),
        with_property(common_pb2.Value(number_value=-math.inf)),
        with_property(common_pb2.Value()),
        with_property(common_pb2.Value(string_value="x"), key="k" * 129),
        with_property(common_pb2.Value(string_value="x"), key="bad key"),
        view(event_id="e" * 129),
        view(type=event_pb2.EVENT_TYPE_PAGE),
    ]
    for event in valid + invalid:
        call = [view(1).SerializeToString(), event.SerializeToString()]
        assert_as_each(call)
        verdicts = [violations is None for violations, _ in outcome(call)]
        assert verdicts == [True, event in valid]
    # A nested value is walked, and a country upper-cased, by the per-event check.
    assert not proved_in_bulk([view(1), nested])
    assert not proved_in_bulk([view(1), lower_case])


def test_nul_anywhere_and_control_characters_in_ids_are_refused_in_bulk_as_alone() -> None:
    def edited(index: int, edit: Callable[[event_pb2.Event], object]) -> event_pb2.Event:
        return _edit(index, edit)

    refused = {
        ("user_id", "CONTROL_CHARACTER"): view(2, user_id="line\nbreak"),
        ("event_id", "CONTROL_CHARACTER"): view(2, event_id="e\x00"),
        ("properties.category", "NUL_CHARACTER"): edited(
            1, lambda e: setattr(e.properties["category"], "string_value", "sh\x00es")
        ),
        ("context.ip", "NUL_CHARACTER"): edited(1, lambda e: setattr(e.context, "ip", "\x00")),
        ("context.location.city", "NUL_CHARACTER"): edited(
            1, lambda e: setattr(e.context.location, "city", "Aus\x00tin")
        ),
        ("context.utm.term", "NUL_CHARACTER"): edited(
            1, lambda e: setattr(e.context.utm, "term", "\x00")
        ),
        ("order.coupon", "NUL_CHARACTER"): edited(
            ORDER, lambda e: setattr(e.order, "coupon", "SAVE\x00")
        ),
        ("order.order_id", "CONTROL_CHARACTER"): edited(
            ORDER, lambda e: setattr(e.order, "order_id", "o\t1")
        ),
        ("cart.items[2].name", "NUL_CHARACTER"): edited(
            CART, lambda e: e.cart.items.add(product_id="p", name="\x00", quantity=1)
        ),
        ("cart.items[2].product_id", "CONTROL_CHARACTER"): edited(
            CART, lambda e: e.cart.items.add(product_id="p\n", quantity=1)
        ),
        ("identify.identities[1].value", "NUL_CHARACTER"): edited(
            IDENTIFY, lambda e: e.identify.identities.add(type="phone", value="1\x00")
        ),
        ("identify.traits.plan", "NUL_CHARACTER"): edited(
            IDENTIFY, lambda e: setattr(e.identify.traits["plan"], "string_value", "\x00")
        ),
        ("campaign_interaction.campaign_id", "CONTROL_CHARACTER"): edited(
            CAMPAIGN, lambda e: setattr(e.campaign_interaction, "campaign_id", "c\r")
        ),
    }
    for (field, reason), event in refused.items():
        call = [view(1).SerializeToString(), event.SerializeToString()]
        assert_as_each(call)
        assert [violations for violations, _ in outcome(call)] == [None, [(field, reason)]]
    # Line breaks are refused in ids only; a round price (zero bytes) proves nothing wrong.
    fine = view(2)
    fine.context.page.title = "two\nlines"
    fine.properties["price"].number_value = 20.0
    assert proved_in_bulk([view(1), fine])


def _edit(index: int, edit: Callable[[event_pb2.Event], object]) -> event_pb2.Event:
    event = storefront()[index]
    edit(event)
    return event


IDENTIFY, CART, ORDER, CAMPAIGN = 3, 4, 5, 6
_item = event_pb2.CartItem
BOUNDARIES: dict[str, event_pb2.Event] = {
    "identity type capitalised": _edit(
        IDENTIFY, lambda e: e.identify.identities.add(type="Email", value="x")
    ),
    "identity type of 64": _edit(
        IDENTIFY, lambda e: e.identify.identities.add(type="t" * 64, value="x")
    ),
    "identity type of 65": _edit(
        IDENTIFY, lambda e: e.identify.identities.add(type="t" * 65, value="x")
    ),
    "identity value empty": _edit(
        IDENTIFY, lambda e: e.identify.identities.add(type="email", value="")
    ),
    "identity value of 256": _edit(
        IDENTIFY, lambda e: e.identify.identities.add(type="email", value="v" * 256)
    ),
    "identity value of 257": _edit(
        IDENTIFY, lambda e: e.identify.identities.add(type="email", value="v" * 257)
    ),
    "101 identities": _edit(
        IDENTIFY,
        lambda e: [e.identify.identities.add(type="t", value="v") for _ in range(100)],
    ),
    "trait key invalid": _edit(IDENTIFY, lambda e: e.identify.traits["bad key"].SetInParent()),
    "trait NaN": _edit(
        IDENTIFY, lambda e: setattr(e.identify.traits["n"], "number_value", math.nan)
    ),
    "item quantity 0": _edit(CART, lambda e: e.cart.items.add(product_id="p", quantity=0)),
    "item quantity -1": _edit(CART, lambda e: e.cart.items.add(product_id="p", quantity=-1)),
    "item quantity 2**62": _edit(CART, lambda e: e.cart.items.add(product_id="p", quantity=2**62)),
    "item price -1": _edit(
        CART, lambda e: e.cart.items.add(product_id="p", price=-1.0, quantity=1)
    ),
    "item price -0.0": _edit(
        CART, lambda e: e.cart.items.add(product_id="p", price=-0.0, quantity=1)
    ),
    "item price NaN": _edit(
        ORDER, lambda e: e.order.items.add(product_id="p", price=math.nan, quantity=1)
    ),
    "item product id empty": _edit(CART, lambda e: e.cart.items.add(quantity=1)),
    "item product id of 128": _edit(
        CART, lambda e: e.cart.items.add(product_id="p" * 128, quantity=1)
    ),
    "item product id of 129": _edit(
        ORDER, lambda e: e.order.items.add(product_id="p" * 129, quantity=1)
    ),
    "item name of 200": _edit(
        CART, lambda e: e.cart.items.add(product_id="p", name="n" * 200, quantity=1)
    ),
    "501 items": _edit(
        CART, lambda e: [e.cart.items.add(product_id="p", quantity=1) for _ in range(500)]
    ),
    "currency lower case": _edit(CART, lambda e: setattr(e.cart, "currency", "usd")),
    "currency unknown but well formed": _edit(ORDER, lambda e: setattr(e.order, "currency", "XYZ")),
    "currency of four": _edit(ORDER, lambda e: setattr(e.order, "currency", "EURO")),
    "cart value -1": _edit(CART, lambda e: setattr(e.cart, "value", -1.0)),
    "order revenue infinite": _edit(ORDER, lambda e: setattr(e.order, "revenue", math.inf)),
    "order discount NaN": _edit(ORDER, lambda e: setattr(e.order, "discount", math.nan)),
    "order id empty": _edit(ORDER, lambda e: setattr(e.order, "order_id", "")),
    "order id of 128": _edit(ORDER, lambda e: setattr(e.order, "order_id", "o" * 128)),
    "order id of 129": _edit(ORDER, lambda e: setattr(e.order, "order_id", "o" * 129)),
    "campaign channel unset": _edit(
        CAMPAIGN, lambda e: setattr(e.campaign_interaction, "channel", 0)
    ),
    "campaign channel unknown": _edit(
        CAMPAIGN, lambda e: setattr(e.campaign_interaction, "channel", 3)
    ),
    "campaign action unknown": _edit(
        CAMPAIGN, lambda e: setattr(e.campaign_interaction, "action", 4)
    ),
    "campaign id of 129": _edit(
        CAMPAIGN, lambda e: setattr(e.campaign_interaction, "campaign_id", "c" * 129)
    ),
    "creative id of 128": _edit(
        CAMPAIGN, lambda e: setattr(e.campaign_interaction, "creative_id", "c" * 128)
    ),
    "creative id of 129": _edit(
        CAMPAIGN, lambda e: setattr(e.campaign_interaction, "creative_id", "c" * 129)
    ),
    "account update": event_pb2.Event(
        event_id="x", type=event_pb2.EVENT_TYPE_ACCOUNT_UPDATE, account_id="acme"
    ),
}
WRITTEN: dict[str, bytes] = {
    # Written as protobuf does not: nanos 0 (Timestamp field 2, value 0), a map entry with
    # neither key nor value (Event field 10, length 0).
    "nanos of zero written": view(9).SerializeToString() + b"\x3a\x02\x10\x00",
    "property entry of nothing": view(9).SerializeToString() + b"\x52\x00",
}


@pytest.mark.parametrize("case", sorted(BOUNDARIES) + sorted(WRITTEN))
def test_limits_at_their_boundaries_in_an_otherwise_valid_call(case: str) -> None:
    encoding = WRITTEN[case] if case in WRITTEN else BOUNDARIES[case].SerializeToString()
    assert_as_each([*(e.SerializeToString() for e in storefront()), encoding])


def _alone(index: int, field: str) -> event_pb2.Event:
    """A storefront event whose only element of a list or map is empty."""
    event = storefront()[index]
    body = {
        "identities": event.identify,
        "traits": event.identify,
        "items": event.order,
        "properties": event,
    }[field]
    body.ClearField(field)
    if field == "traits":
        event.identify.traits[""].SetInParent()
    elif field == "properties":
        event.properties[""].SetInParent()
    else:
        getattr(body, field).add()
    return event


def test_an_empty_element_is_checked_like_any_other() -> None:
    """An empty encoding (an identity, item, map entry or campaign with nothing set) is
    checked for what it lacks, even when it is the only one of its kind in the call."""
    campaign = storefront()[CAMPAIGN]
    campaign.campaign_interaction.Clear()
    campaign.campaign_interaction.SetInParent()
    empty = [
        _alone(IDENTIFY, "identities"),
        _alone(IDENTIFY, "traits"),
        _alone(ORDER, "items"),
        _alone(1, "properties"),
        campaign,
    ]
    for event in empty:
        assert_as_each([storefront()[2].SerializeToString(), event.SerializeToString()])
        assert outcome([event.SerializeToString()])[0][0]


def test_numbers_at_the_edge_of_finite_are_told_apart() -> None:
    numbers = (1e308, -1e308, 5e-324, -0.0, math.inf, math.nan, -math.nan)
    events = [view(i) for i in range(len(numbers))]
    for event, number in zip(events, numbers, strict=True):
        event.properties["n"].number_value = number
    assert_as_each([event.SerializeToString() for event in events])
    assert [o[0] is None for o in outcome([e.SerializeToString() for e in events])] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_a_field_written_twice_is_read_as_the_parser_reads_it() -> None:
    """A client may write a field more than once (the parser keeps the last, and merges
    messages): two encodings concatenated are one event holding both."""

    def joined(first: event_pb2.Event, second: event_pb2.Event) -> bytes:
        return first.SerializeToString() + second.SerializeToString()

    bare = event_pb2.Event
    # An id, then an empty one (field 1, length 0): no id.
    empty_id = view().SerializeToString() + b"\x0a\x00"
    cases = [
        joined(view(), bare(event_id="e9")),
        empty_id,
        joined(view(), bare(type=event_pb2.EVENT_TYPE_PAGE)),
        joined(view(), view(2)),
        # A second timestamp written empty (field 7, length 0) changes nothing.
        view().SerializeToString() + b"\x3a\x00",
        joined(view(), bare(user_id="u" * 129)),
    ]
    two_kinds = view()
    two_kinds.properties["k"].string_value = "x"
    then_unset = event_pb2.Event()
    then_unset.properties["k"].SetInParent()
    cases.append(joined(two_kinds, then_unset))  # the entry's last value has no kind
    old = bare()
    old.timestamp.seconds = 631_152_000
    cases.append(joined(view(), old))  # the last seconds are from 1990
    for case in cases:
        assert_as_each([view(5).SerializeToString(), case, view(6).SerializeToString()])
    assert outcome([empty_id])[0][0] == [("event_id", "REQUIRED")]


def test_a_field_one_event_has_twice_and_another_not_at_all_stays_with_its_event() -> None:
    """Columns gather a field's occurrences over all events: an event with a field twice
    beside one without it must not pass for two events with it once."""
    twice = view(1)
    without = view(2)
    for field in ("event_id", "type", "timestamp", "sent_at"):
        moved = event_pb2.Event()
        moved.CopyFrom(view(3))
        for other in ("event_id", "type", "timestamp", "sent_at"):
            if other != field:
                moved.ClearField(other)
        without.ClearField(field)
        call = [twice.SerializeToString() + moved.SerializeToString(), without.SerializeToString()]
        assert_as_each(call)
        # Without an id or a type it is invalid; without a time, normalised otherwise.
        assert (outcome(call)[1][0] is not None) == (field in ("event_id", "type")), field
        without = view(2)
    seconds_twice = view(1).SerializeToString() + b"\x3a\x06\x08\x80\x80\x80\x80\x04"
    no_seconds = view(2)
    no_seconds.timestamp.seconds = 0
    assert_as_each([seconds_twice, no_seconds.SerializeToString()])
    order_without_id = storefront()[5]
    assert order_without_id.HasField("order")
    order_without_id.order.order_id = ""
    assert_as_each([storefront()[5].SerializeToString(), order_without_id.SerializeToString()])
    assert outcome([order_without_id.SerializeToString()])[0][0] == [("order.order_id", "REQUIRED")]


def test_times_set_to_zero_show_as_set() -> None:
    zero = view()
    zero.timestamp.Clear()
    zero.timestamp.SetInParent()  # set, to 1970-01-01
    no_times = view()
    no_times.ClearField("timestamp")
    no_times.ClearField("sent_at")
    zero_sent = view()
    zero_sent.ClearField("timestamp")
    zero_sent.sent_at.Clear()
    zero_sent.sent_at.SetInParent()
    for case in (zero, zero_sent):
        assert_as_each([no_times.SerializeToString(), case.SerializeToString()])
        assert outcome([case.SerializeToString()])[0][0]


def test_whole_seconds_are_times_like_any_other() -> None:
    events = [view(i) for i in range(4)]
    events[1].timestamp.nanos = 0
    events[2].sent_at.nanos = 0
    events[3].timestamp.nanos = events[3].sent_at.nanos = 0
    assert proved_in_bulk(events)
    assert_as_each([event.SerializeToString() for event in events])


def test_large_events_are_measured_as_each_event_alone() -> None:
    events = []
    for size in (8_000, 8_150, 8_300, 66_000):
        event = view(size)
        event.context.page.title = "t" * size
        events.append(event)
    many = view(1)
    for i in range(201):
        many.properties[f"p{i}"].bool_value = True
    events.append(many)
    assert_as_each([event.SerializeToString() for event in events])


def test_event_fields_are_appended_in_a_form_any_parser_reads() -> None:
    fields = EventFields()
    seconds = [0, 1, 946_684_800, 1 << 28, (1 << 35) - 1, 1 << 35, 253_402_300_799]
    nanos = [0, 1, 127, 16_383, 16_384, (1 << 28) - 1, 999_999_999]
    for second in seconds:
        for nano, encoded in zip(nanos, fields.timestamps([second] * 7, nanos), strict=True):
            parsed = event_pb2.Event.FromString(encoded).timestamp
            assert (parsed.seconds, parsed.nanos) == (second, nano)
    named = fields.names(["", "page_view", "identify"])
    assert named[0] == b""
    assert event_pb2.Event.FromString(named[1]).name == "page_view"


_id = st.one_of(
    st.just(""),
    st.text(alphabet="aZ9-é", min_size=1, max_size=3),
    st.sampled_from(["x" * 127, "x" * 128, "x" * 129, "é" * 64]),
    # Control characters, which ids may not hold, and DEL, which they may.
    st.sampled_from(["a\nb", "\x00", "tab\t", "\x1f", "\x7f"]),
)
# Strings limited in length only: NUL is refused in each, a line break is not.
_text = st.sampled_from(["", "x", "a\x00b", "\x00", "line\nbreak", "é\x00"])
_TEXT_FIELDS = (
    "context.page.url",
    "context.utm.source",
    "context.source",
    "context.location.region",
    "context.location.city",
    "context.device.os",
    "context.device.model",
    "context.session_id",
    "context.ip",
    "context.user_agent",
    "context.locale",
    "order.coupon",
)
_key = st.one_of(
    st.sampled_from(["color", "a-b_c", "k" * 127, "k" * 128, "k" * 129, "bad key", "", "é"]),
    st.text(alphabet="ab_-", min_size=1, max_size=4),
)
_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]),
)
_time = st.one_of(
    st.none(),
    st.sampled_from([0, NOW_NS - 60 * SECOND_NS, 631_152_000 * SECOND_NS, NOW_NS]),
    st.integers(min_value=NOW_NS - 10**15, max_value=NOW_NS + 2 * 86_400 * SECOND_NS),
    st.integers(min_value=NOW_NS // SECOND_NS - 100, max_value=NOW_NS // SECOND_NS).map(
        lambda seconds: seconds * SECOND_NS  # whole seconds: nanos not written
    ),
)


def _value(depth: int = 0) -> st.SearchStrategy[common_pb2.Value]:
    scalars = st.one_of(
        st.builds(common_pb2.Value, string_value=st.text(max_size=3)),
        st.builds(
            common_pb2.Value,
            string_value=st.sampled_from(["s" * 125, "s" * 126, "é" * 63, "é" * 64]),
        ),
        st.builds(common_pb2.Value, number_value=_number),
        st.builds(common_pb2.Value, bool_value=st.booleans()),
        st.builds(common_pb2.Value, null_value=st.sampled_from([0, 0, 1])),
        st.just(common_pb2.Value()),
    )
    if depth >= 2:
        return scalars
    nested = st.lists(_value(depth + 1), max_size=2).map(
        lambda values: common_pb2.Value(list_value=common_pb2.ValueList(values=values))
    )
    stamp = st.builds(common_pb2.Value, timestamp_value=st.builds(lambda: view().timestamp))
    return st.one_of(scalars, nested, stamp)


def _change(event: event_pb2.Event, draw: st.DrawFn) -> None:
    """Changes one thing of an event to a value at or past a limit, or unusual."""
    change = draw(st.integers(0, 19))
    context = event.context
    if change == 0:
        setattr(
            event,
            draw(st.sampled_from(["event_id", "user_id", "anonymous_id", "account_id"])),
            draw(_id),
        )
    elif change == 1:
        event.type = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 42]))  # type: ignore[assignment]
    elif change == 2:
        event.name = draw(
            st.sampled_from(["", "product_view", "page_view", "a:b.c-d", "has space", "n" * 129])
        )
    elif change == 3:
        event.properties[draw(_key)].CopyFrom(draw(_value()))
    elif change == 4:
        context.channel = draw(st.sampled_from([0, 1, 9, 10, 99]))  # type: ignore[assignment]
    elif change == 5:
        context.location.country = draw(st.sampled_from(["", "US", "us", "Us", "Germany", "1A"]))
    elif change == 6:
        point = context.location.point
        setattr(point, draw(st.sampled_from(["latitude", "longitude"])), draw(_number))
    elif change == 7:
        context.weather.condition = draw(st.sampled_from([0, 3, 7, 8]))  # type: ignore[assignment]
        if draw(st.booleans()):
            context.weather.temperature_celsius = draw(_number)
    elif change == 8:
        context.device.type = draw(st.sampled_from([0, 2, 6, 7]))  # type: ignore[assignment]
    elif change == 9:
        context.page.title = draw(st.sampled_from(["", "t" * 8_100, "t" * 8_200, "t" * 70_000]))
    elif change == 10:
        field = draw(st.sampled_from(["timestamp", "sent_at"]))
        at = draw(_time)
        if at is None:
            event.ClearField(field)  # type: ignore[arg-type]
        else:
            getattr(event, field).FromNanoseconds(at)
    elif change == 11:
        getattr(event, draw(st.sampled_from(["timestamp", "sent_at"]))).nanos = draw(
            st.sampled_from([0, -1, 999_999_999, 1_000_000_000])
        )
    elif change == 12 and not (event.HasField("order") or event.HasField("cart")):
        event.ClearField(draw(st.sampled_from(["event_id", "type", "user_id", "anonymous_id"])))
    elif change == 13:
        body = event.order if event.HasField("order") else event.cart
        item = body.items.add(product_id="sku-9", quantity=1)
        field = draw(st.sampled_from(["product_id", "name", "price", "quantity"]))
        values = {
            "product_id": _id,
            "name": _text,
            "price": _number,
            "quantity": st.sampled_from([0, -1, 2**40]),
        }
        setattr(item, field, draw(values[field]))
    elif change == 14:
        body = event.order if event.HasField("order") else event.cart
        body.currency = draw(st.sampled_from(["", "USD", "usd", "XYZ", "EURO"]))
        if event.HasField("order"):
            setattr(event.order, draw(st.sampled_from(["revenue", "discount"])), draw(_number))
        else:
            event.cart.value = draw(_number)
    elif change == 15:
        event.identify.identities.add(
            type=draw(st.sampled_from(["email", "Email", "", "x" * 64, "x" * 65])),
            value=draw(st.one_of(st.just("ann@example.com"), _id, st.just("v" * 257))),
        )
    elif change == 16:
        event.identify.traits[draw(_key)].CopyFrom(draw(_value()))
    elif change == 17:
        campaign = event.campaign_interaction
        field = draw(st.sampled_from(["channel", "action", "campaign_id", "creative_id"]))
        if field in ("channel", "action"):
            setattr(campaign, field, draw(st.sampled_from([0, 1, 3, 4])))
        else:
            setattr(campaign, field, draw(st.sampled_from(["", "c" * 128, "c" * 129])))
    elif change == 18:
        event.order.order_id = draw(_id)
    else:
        *path, name = draw(st.sampled_from(_TEXT_FIELDS)).split(".")
        message = event
        for part in path:
            message = getattr(message, part)
        setattr(message, name, draw(_text))


@st.composite
def _event(draw: st.DrawFn) -> event_pb2.Event:
    event = event_pb2.Event()
    event.CopyFrom(draw(st.sampled_from(storefront())))
    for _ in range(draw(st.integers(0, 2))):
        _change(event, draw)
    return event


@st.composite
def _encoding(draw: st.DrawFn) -> bytes:
    encoding = draw(_event()).SerializeToString()
    if draw(st.integers(0, 5)) == 0:
        # Some fields written again: the parser merges them into the event.
        again = event_pb2.Event()
        _change(again, draw)
        encoding += again.SerializeToString()
    return encoding


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_encoding(), min_size=1, max_size=6))
def test_any_call_is_judged_and_normalised_as_each_event_alone(encodings: list[bytes]) -> None:
    assert_as_each(encodings)


@settings(max_examples=100, deadline=None)
@given(st.lists(_encoding(), min_size=1, max_size=5))
def test_events_are_split_from_the_request_as_encoded(encodings: list[bytes]) -> None:
    assert event_encodings(request_of(encodings)) == encodings
