"""Views of encoded events that protobuf's C parser fills in bulk, for ingest's hot path.

Reading a field of a generated message from Python costs 50–300 ns (a wrapper object per
sub-message, a lookup per attribute, a string decoded per read), and a call of 1,000 events
would read tens of thousands of them. Views of the same bytes, parsed into message classes
built here from the real descriptors (so field numbers follow the protos), need none of
that:

- :func:`event_encodings` splits a message whose field 2 holds events (``SendEventsRequest``,
  ``StreamEventsRequest``) into each event's encoding.
- :func:`columns` reads the fields validation checks from every event at once, each as one
  list: protobuf merges repeated occurrences of a singular message field and appends to a
  repeated field, so declaring ``events`` singular and the checked fields repeated gathers
  each of them, from all events, into one list. Some fields are gathered as their
  encodings, for validation to check whole (a map entry, a cart item). The fields a view
  leaves out are kept by the merged message as unknown fields, in order: the strings
  validation only needs to know free of NUL are read that way, as one string of bytes.

A column holds every occurrence of its field in the input, in order, the ones a parser of
the real message drops as overwritten included, and nothing for a field at its default.
So it proves a property of *all* values present (every channel is known), not one of each
event (that each has a channel) nor which event holds a value. For the fields whose value
each event needs (its id, type and times), the view parses the events with a marker
appended to each: a value the field cannot hold in a valid event (an empty id, type 0, a
time of 0 seconds and 10⁹ nanoseconds). The column then ends each event's occurrences
with a marker, and an event with exactly one occurrence, like every valid event, is told
apart from one with none or two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain, repeat
from typing import Any, TypeVar, cast

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError

from audience.v1 import common_pb2, event_pb2
from services.ingest.records import varint

__all__ = ["Columns", "Times", "columns", "event_encodings"]

_T = TypeVar("_T")
_Field = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "audience.ingest.wire"
# The field of SendEventsRequest and StreamEventsRequest that holds the events.
_EVENTS_FIELD = 2

# Declares a field of a view as the encodings of its occurrences (repeated bytes).
_ENCODED = -1


def _build() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(
        name="audience/ingest/wire.proto", package=_PACKAGE, syntax="proto3"
    )

    def view(name: str, real: Descriptor, fields: dict[str, int | str]) -> None:
        """Declares a view of ``real``: each field repeated (a scalar type, or _ENCODED for
        its encodings) or merged (the name of another view)."""
        declared = file.message_type.add(name=name)
        for field_name, kind in fields.items():
            number = real.fields_by_name[field_name].number
            field = declared.field.add(name=field_name, number=number)
            if isinstance(kind, str):
                field.type, field.label = _Field.TYPE_MESSAGE, _Field.LABEL_OPTIONAL
                field.type_name = f".{_PACKAGE}.{kind}"
            else:
                field.label = _Field.LABEL_REPEATED
                field.type = cast(
                    "descriptor_pb2.FieldDescriptorProto.Type.ValueType",
                    _Field.TYPE_BYTES if kind == _ENCODED else kind,
                )

    string, double, int32, int64 = (
        _Field.TYPE_STRING,
        _Field.TYPE_DOUBLE,
        _Field.TYPE_INT32,
        _Field.TYPE_INT64,
    )
    event = event_pb2.Event.DESCRIPTOR
    # Holds whatever a message's fields are, unread: Page and Utm, all strings.
    file.message_type.add(name="Opaque")
    view("Timestamp", timestamp_pb2.Timestamp.DESCRIPTOR, {"seconds": int64, "nanos": int32})
    view("Point", common_pb2.GeoPoint.DESCRIPTOR, {"latitude": double, "longitude": double})
    view("Location", event_pb2.Location.DESCRIPTOR, {"country": string, "point": "Point"})
    view(
        "Weather",
        event_pb2.Weather.DESCRIPTOR,
        {"condition": int32, "temperature_celsius": double},
    )
    view("Device", event_pb2.Device.DESCRIPTOR, {"type": int32})
    view(
        "Context",
        event_pb2.Context.DESCRIPTOR,
        {
            "page": "Opaque",
            "utm": "Opaque",
            "channel": int32,
            "location": "Location",
            "weather": "Weather",
            "device": "Device",
        },
    )
    view("Identify", event_pb2.Identify.DESCRIPTOR, {"traits": _ENCODED, "identities": _ENCODED})
    view(
        "Cart",
        event_pb2.Cart.DESCRIPTOR,
        {"items": _ENCODED, "currency": string, "value": double},
    )
    view(
        "Order",
        event_pb2.Order.DESCRIPTOR,
        {
            "order_id": string,
            "items": _ENCODED,
            "currency": string,
            "revenue": double,
            "discount": double,
        },
    )
    view(
        "Event",
        event,
        {
            "event_id": string,
            "type": int32,
            "account_id": string,
            "timestamp": "Timestamp",
            "sent_at": "Timestamp",
            "properties": _ENCODED,
            "context": "Context",
            "identify": "Identify",
            "cart": "Cart",
            "order": "Order",
            "campaign_interaction": _ENCODED,
        },
    )
    root = file.message_type.add(name="Events")
    root.field.add(
        name="events",
        number=_EVENTS_FIELD,
        type=_Field.TYPE_MESSAGE,
        label=_Field.LABEL_OPTIONAL,
        type_name=f".{_PACKAGE}.Event",
    )
    encodings = file.message_type.add(name="Encodings")
    encodings.field.add(
        name="events", number=_EVENTS_FIELD, type=_Field.TYPE_BYTES, label=_Field.LABEL_REPEATED
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in ("Events", "Encodings")
    }


_VIEWS = _build()
_Events, _Encodings = _VIEWS["Events"], _VIEWS["Encodings"]


def event_encodings(encoded: bytes) -> list[bytes]:
    """Returns the encoding of each event of an encoded request, in order.

    Args:
        encoded: a message whose field 2 holds the events, well-formed (the generated class
            of the request parsed it).
    """
    events: list[bytes] = list(_Encodings.FromString(encoded).events)
    return events


def _tag(field: str, wire_type: int) -> bytes:
    number = event_pb2.Event.DESCRIPTOR.fields_by_name[field].number
    return bytes((number << 3 | wire_type,))


_NS = 1_000_000_000
# Appended to each event in the bulk view: an empty id, type 0, and as each time 0 seconds
# and 10⁹ nanos (Timestamp: seconds = 1, nanos = 2).
_NOT_A_TIME = b"\x08\x00\x10\x80\x94\xeb\xdc\x03"
_MARKERS = b"".join(
    (
        _tag("event_id", 2) + b"\x00",
        _tag("type", 0) + b"\x00",
        _tag("timestamp", 2) + bytes((len(_NOT_A_TIME),)) + _NOT_A_TIME,
        _tag("sent_at", 2) + bytes((len(_NOT_A_TIME),)) + _NOT_A_TIME,
    )
)

_EVENT = bytes((_EVENTS_FIELD << 3 | 2,))

# The tag and length of an event with its markers, by the event's size: a call's events
# come in a few hundred sizes. Kept below this many entries.
_MARKED_HEADS: dict[int, bytes] = {}
_MARKED_HEADS_LIMIT = 1 << 14


@dataclass(frozen=True, slots=True)
class Columns:
    """The fields validation checks in bulk, over all events.

    The first four are each event's own, in order, or None when some event has the field
    more than once, or when some events have it and others not; the others hold every
    occurrence.
    Fields named ``…_encoded`` hold encodings: each entry of a ``map<string, Value>`` (a
    message of the key, field 1, and the value, field 2), each cart or order item, each
    identity, each campaign interaction.
    """

    event_ids: list[str] | None
    types: list[int] | None
    timestamps: Times | None
    """Each event's ``timestamp``, or empty columns when no event's has a field written:
    then an event may still have one set to all zeros, which writes nothing but its tag
    (``HasField`` tells)."""
    sent_at: Times | None
    """Each event's ``sent_at``, in the same way."""
    account_ids: list[str]
    properties_encoded: list[bytes]
    channels: list[int]
    countries: list[str]
    latitudes: list[float]
    longitudes: list[float]
    conditions: list[int]
    temperatures: list[float]
    device_types: list[int]
    traits_encoded: list[bytes]
    identities_encoded: list[bytes]
    items_encoded: list[bytes]
    currencies: list[str]
    amounts: list[float]
    """Cart values, order revenues and discounts."""
    campaigns_encoded: list[bytes]
    order_ids: list[str]
    free_text: bytes
    """The encodings of the strings validation limits only in length (those of the context
    other than its country, an order's coupon), joined: their tags, lengths and UTF-8. A
    NUL character in one shows as a zero byte; nothing else does but a length of zero,
    which protobuf does not write (an empty string is not written)."""


def columns(encodings: Sequence[bytes]) -> Columns | None:
    """Reads the fields validation checks in bulk from the encodings of events.

    Returns None if they do not parse (they always do when the real request did).
    """
    count = len(encodings)
    sizes = list(map(len, encodings))
    cached = list(map(_MARKED_HEADS.get, sizes))
    heads = (
        [
            _marked_head(size) if head is None else head
            for head, size in zip(cached, sizes, strict=True)
        ]
        if None in cached
        else cast("list[bytes]", cached)
    )
    marked = b"".join(chain.from_iterable(zip(heads, encodings, repeat(_MARKERS), strict=False)))
    try:
        event = _Events.FromString(marked).events
    except DecodeError:
        return None
    context, identify, cart, order = event.context, event.identify, event.cart, event.order
    location, weather = context.location, context.weather
    found = Columns(
        event_ids=_one_each(list(event.event_id), "", count),
        types=_one_each(list(event.type), 0, count),
        timestamps=_times(event.timestamp, count),
        sent_at=_times(event.sent_at, count),
        account_ids=list(event.account_id),
        properties_encoded=list(event.properties),
        channels=list(context.channel),
        countries=list(location.country),
        latitudes=list(location.point.latitude),
        longitudes=list(location.point.longitude),
        conditions=list(weather.condition),
        temperatures=list(weather.temperature_celsius),
        device_types=list(context.device.type),
        traits_encoded=list(identify.traits),
        identities_encoded=list(identify.identities),
        items_encoded=[*cart.items, *order.items],
        currencies=[*cart.currency, *order.currency],
        amounts=[*cart.value, *order.revenue, *order.discount],
        campaigns_encoded=list(event.campaign_interaction),
        order_ids=list(order.order_id),
        free_text=b"",
    )
    return replace(found, free_text=_free_text(context, order))


def _marked_head(size: int) -> bytes:
    if len(_MARKED_HEADS) >= _MARKED_HEADS_LIMIT:
        _MARKED_HEADS.clear()
    head = _MARKED_HEADS[size] = _EVENT + varint(size + len(_MARKERS))
    return head


def _free_text(context: Any, order: Any) -> bytes:
    """The encodings of the strings the views leave unread (see ``Columns.free_text``):
    each view's unknown fields, what it still holds once the fields it reads are cleared.
    It empties the views: read them first."""
    parts = [context.page.SerializeToString(), context.utm.SerializeToString()]
    # A message before the one that holds it, which drops it when cleared.
    for message in (context.location, context.device, context, order):
        for field, _ in message.ListFields():
            message.ClearField(field.name)
        parts.append(message.SerializeToString())
    return b"".join(parts)


def _one_each(column: list[_T], marker: _T, count: int) -> list[_T] | None:
    """Each event's value, when each has exactly one, other than the marker."""
    # Values and markers alternate exactly when each event has one value: with none, a
    # marker would fall on a value's place; with two, a value on a marker's.
    values = column[::2]
    if len(column) == 2 * count and column[1::2].count(marker) == count and marker not in values:
        return values
    return None


def _times(stamps: Any, count: int) -> Times | None:
    """Each event's time, or empty columns when no event shows one; None when some do and
    others not, or when one has a field twice."""
    seconds = list(stamps.seconds)
    nanos = list(stamps.nanos)
    # The markers alone: count of each (a client's zero seconds would add one more).
    if len(seconds) == count and len(nanos) == count and not any(seconds):
        return Times([], [])
    each_seconds = _one_each(seconds, 0, count)
    if each_seconds is None:
        return None
    each_nanos = _one_each(nanos, _NS, count)
    if each_nanos is None:
        # Nanos of 0 are not written: an event's marker may come alone.
        each_nanos = []
        value = 0
        for item in nanos:
            if item == _NS:
                each_nanos.append(value)
                value = 0
            elif value:
                return None
            else:
                value = item
        if len(each_nanos) != count:
            return None
    return Times(each_seconds, each_nanos)


@dataclass(frozen=True, slots=True)
class Times:
    """Times, as columns: each one's seconds since the epoch and its nanoseconds."""

    seconds: list[int]
    nanos: list[int]
