"""Validation and normalisation of incoming events, with explicit limits.

Pure: no I/O, no gRPC, no Redis. It reads and fills the generated ``audience.v1.Event``
messages directly, as plain data: copying 200,000 events a second into domain objects and
back would cost more than everything else ingest does.

Limits (the ``Event`` proto states the public ones; each breach is one :class:`Violation`
naming the field, relative to the event):

- ids (``event_id``, ``user_id``, ``anonymous_id``, ``account_id``, product, order and
  campaign ids): 1–128 characters when given;
- ``name``: 1–128 characters of letters, digits, ``_ . : -``; required for track events,
  fixed for the other types;
- property, trait and nested map keys: 1–128 characters of letters, digits, ``_`` and
  ``-`` (so the rule language's dotted paths can name them);
- at most 200 entries in a map (properties, traits, a nested map), 1,000 values in a
  list, values nested at most 8 levels (a top-level property is level 1);
- strings of at most 8,192 bytes, anywhere in the event;
- the whole encoded event at most 64 KiB;
- numbers finite (NaN and infinities do not survive JSON or PostgreSQL ``jsonb``);
- ``timestamp`` (after clock-skew correction) from 2000-01-01 to a day after receipt,
  ``sent_at`` from 2000-01-01; timestamp values inside properties anywhere a protobuf
  ``Timestamp`` can be (years 1–9999);
- enums: a zero value where the field is required, or a value this version does not
  know, is refused; cart and order items at most 500, prices and amounts at least 0,
  quantities at least 1; at most 100 identities per identify, each of a type of 1–64
  characters of lower-case letters, digits and ``_`` and a value of 1–256 characters;
  currencies three upper-case letters; country codes two letters (upper-cased);
  coordinates within ±90° and ±180°; temperatures within ±100 °C.

Normalisation: ``received_at`` is the receipt time; with ``sent_at``, ``timestamp`` is
corrected for the client's clock skew (``received_at - (sent_at - timestamp)``); without a
``timestamp`` it is the receipt time; the fixed types get their fixed name. Defaults that
depend on the profile (a cart's value, an order's revenue, ``context.source``) are the
profile service's to apply.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from audience.v1 import common_pb2, event_pb2

__all__ = [
    "FIXED_NAMES",
    "MAX_DEPTH",
    "MAX_EVENT_BYTES",
    "MAX_ID_CHARS",
    "MAX_ITEMS",
    "MAX_LIST_VALUES",
    "MAX_MAP_ENTRIES",
    "MAX_STRING_BYTES",
    "Validator",
    "Violation",
    "correct_skew",
    "partition_key",
]

MAX_EVENT_BYTES = 64 * 1024
MAX_STRING_BYTES = 8192
MAX_MAP_ENTRIES = 200
MAX_LIST_VALUES = 1000
MAX_DEPTH = 8
MAX_ID_CHARS = 128
MAX_ITEMS = 500
MAX_IDENTITIES = 100

_NS = 1_000_000_000
# 2000-01-01T00:00:00Z: earlier event times are clock or encoding bugs (a zero timestamp).
_MIN_EVENT_SECONDS = 946_684_800
_FUTURE_TOLERANCE_NS = 86_400 * _NS
# The range of google.protobuf.Timestamp: 0001-01-01 to 9999-12-31.
_MIN_TIMESTAMP_SECONDS = -62_135_596_800
_MAX_TIMESTAMP_SECONDS = 253_402_300_799

_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_KEY = re.compile(r"[A-Za-z0-9_\-]{1,128}")
_IDENTITY_TYPE = re.compile(r"[a-z0-9_]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_COUNTRY = re.compile(r"[A-Za-z]{2}")

# Each cache of names already seen to be valid stays below this many entries, so a client
# sending random names cannot grow it without bound.
_CACHE_LIMIT = 100_000

TRACK = event_pb2.EVENT_TYPE_TRACK
IDENTIFY = event_pb2.EVENT_TYPE_IDENTIFY
ACCOUNT_UPDATE = event_pb2.EVENT_TYPE_ACCOUNT_UPDATE

FIXED_NAMES: dict[int, str] = {
    event_pb2.EVENT_TYPE_PAGE: "page_view",
    event_pb2.EVENT_TYPE_SCREEN: "screen_view",
    event_pb2.EVENT_TYPE_IDENTIFY: "identify",
    event_pb2.EVENT_TYPE_CART_UPDATED: "cart_updated",
    event_pb2.EVENT_TYPE_ORDER_COMPLETED: "order_completed",
    event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION: "campaign_interaction",
    event_pb2.EVENT_TYPE_ACCOUNT_UPDATE: "account_updated",
}
"""The name each non-track event type has."""

# The payload each type carries: (oneof field, required).
_PAYLOADS: dict[int, tuple[str | None, bool]] = {
    event_pb2.EVENT_TYPE_TRACK: (None, False),
    event_pb2.EVENT_TYPE_PAGE: (None, False),
    event_pb2.EVENT_TYPE_SCREEN: (None, False),
    event_pb2.EVENT_TYPE_IDENTIFY: ("identify", False),
    event_pb2.EVENT_TYPE_CART_UPDATED: ("cart", True),
    event_pb2.EVENT_TYPE_ORDER_COMPLETED: ("order", True),
    event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION: ("campaign_interaction", True),
    event_pb2.EVENT_TYPE_ACCOUNT_UPDATE: ("account_update", True),
}

_CHANNELS = frozenset(event_pb2.Channel.values())
_DEVICE_TYPES = frozenset(event_pb2.DeviceType.values())
_WEATHER = frozenset(event_pb2.WeatherCondition.values())
_CAMPAIGN_CHANNELS = frozenset(event_pb2.CampaignChannel.values()) - {0}
_CAMPAIGN_ACTIONS = frozenset(event_pb2.CampaignAction.values()) - {0}

_REQUIRED_PAYLOADS = frozenset(kind for kind, (_, required) in _PAYLOADS.items() if required)

_SCALAR_KINDS = frozenset({"null_value", "string_value", "bool_value"})

_isfinite = math.isfinite


@dataclass(frozen=True, slots=True)
class Violation:
    """One thing wrong with an event.

    Attributes:
        field: the path of the field, relative to the event (``properties.color``).
        reason: machine-readable, UPPER_SNAKE_CASE (``STRING_TOO_LONG``).
        description: what is wrong, in a sentence.
    """

    field: str
    reason: str
    description: str


def partition_key(event: event_pb2.Event) -> str:
    """Returns the profile key whose bus partition carries the event.

    ``user_id`` when set, else ``anonymous_id``, else ``account:<account_id>`` (an account
    update without a user). The profile service resolves identities (an anonymous visitor
    later identified); this key only has to be the same for every event of a visitor
    until then. Call it on valid events only.
    """
    return event.user_id or event.anonymous_id or "account:" + event.account_id


def correct_skew(timestamp_ns: int, sent_at_ns: int, received_at_ns: int) -> int:
    """Returns the event time on the server's clock: ``received - (sent - timestamp)``."""
    return received_at_ns - (sent_at_ns - timestamp_ns)


def _type_name(kind: int) -> str:
    try:
        return event_pb2.EventType.Name(event_pb2.EventType.ValueType(kind))
    except ValueError:
        return str(kind)


def _bad_type(kind: int) -> Violation:
    if kind == 0:
        return Violation("type", "REQUIRED", "Required: the kind of event.")
    return Violation("type", "UNKNOWN_ENUM_VALUE", f"Unknown event type {kind}.")


def _bad_name(name: str) -> Violation:
    if not name:
        return Violation("name", "REQUIRED", "Required for track events.")
    return Violation(
        "name",
        "INVALID_NAME",
        "Must be 1–128 characters of letters, digits, '_', '.', ':' and '-'.",
    )


def _too_long(path: str, what: str, limit: int, unit: str) -> Violation:
    return Violation(path, f"{what}_TOO_LONG", f"Must be at most {limit:,} {unit}.")


def _id(value: str, path: str, out: list[Violation], *, required: bool) -> None:
    if not value:
        if required:
            out.append(Violation(path, "REQUIRED", "Required: 1–128 characters."))
    elif len(value) > MAX_ID_CHARS:
        out.append(_too_long(path, "ID", MAX_ID_CHARS, "characters"))


def _finite(value: float, path: str, out: list[Violation], low: float, high: float) -> None:
    if not _isfinite(value):
        out.append(Violation(path, "NOT_FINITE", "Must be a finite number."))
    elif not low <= value <= high:
        out.append(
            Violation(path, "OUT_OF_RANGE", f"Must be from {low:g} to {high:g}, got {value:g}.")
        )


class Validator:
    """Checks and normalises events; one per process, as it caches names seen valid."""

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._keys: set[str] = set()
        # Only 249 codes exist, so this cache needs no bound.
        self._countries: set[str] = set()
        self._event = event_pb2.Event()
        self._sized = False

    def _name_ok(self, name: str) -> bool:
        if name in self._names:
            return True
        if not _NAME.fullmatch(name):
            return False
        if len(self._names) >= _CACHE_LIMIT:
            self._names.clear()
        self._names.add(name)
        return True

    def _key_ok(self, key: str) -> bool:
        if key in self._keys:
            return True
        if not _KEY.fullmatch(key):
            return False
        if len(self._keys) >= _CACHE_LIMIT:
            self._keys.clear()
        self._keys.add(key)
        return True

    def check(self, event: event_pb2.Event, received_at_ns: int) -> list[Violation] | None:
        """Returns what is wrong with an event, or None when it is valid so far.

        Normalises a valid event in place (see the module docstring), except for what
        every event of a call gets alike: ``received_at``, and ``timestamp`` when the
        event has none (then it is left unset, for the encoder to fill in, see
        :func:`services.ingest.records.receipt_fields`). Measuring the encoded event (its
        size and its strings) is left to :meth:`check_encoded`, since the caller encodes
        it anyway.

        Args:
            event: the event as the client sent it.
            received_at_ns: the receipt time, nanoseconds since the epoch.
        """
        out: list[Violation] = []
        self._event = event
        self._sized = False
        try:
            self._check(event, received_at_ns, out)
        except _TooLargeError as error:
            return [error.violation]
        return out or None

    def check_encoded(self, event: event_pb2.Event, size: int) -> list[Violation] | None:
        """Checks the encoded size of an event that :meth:`check` passed, and its strings.

        Args:
            event: the event, normalised.
            size: the length of its encoding.
        """
        if size > MAX_EVENT_BYTES:
            return [_too_large(size)]
        if size <= MAX_STRING_BYTES:
            # A string cannot be longer than the encoding that holds it.
            return None
        out: list[Violation] = []
        _strings(event, "", out)
        return out or None

    def _check(self, event: event_pb2.Event, received_at_ns: int, out: list[Violation]) -> None:
        # The common, valid case is written inline, with helpers only to report a problem:
        # this runs for every event, and each call or field read costs tens of nanoseconds.
        event_id = event.event_id
        if not 0 < len(event_id) <= MAX_ID_CHARS:
            _id(event_id, "event_id", out, required=True)
        kind = event.type
        name = event.name
        if kind == TRACK:
            if name not in self._names and not self._name_ok(name):
                out.append(_bad_name(name))
        else:
            fixed = FIXED_NAMES.get(kind)
            if fixed is None:
                out.append(_bad_type(kind))
            elif not name:
                event.name = fixed
            elif name != fixed:
                out.append(
                    Violation(
                        "name",
                        "NAME_MISMATCH",
                        f"Events of type {event_pb2.EventType.Name(kind)} are named {fixed!r}.",
                    )
                )
        user_id, anonymous_id, account_id = event.user_id, event.anonymous_id, event.account_id
        if kind == ACCOUNT_UPDATE:
            if not account_id:
                out.append(Violation("account_id", "REQUIRED", "Required for account updates."))
        elif not (user_id or anonymous_id):
            out.append(
                Violation("user_id", "REQUIRED", "Each event needs user_id or anonymous_id.")
            )
        if (
            len(user_id) > MAX_ID_CHARS
            or len(anonymous_id) > MAX_ID_CHARS
            or len(account_id) > MAX_ID_CHARS
        ):
            _id(user_id, "user_id", out, required=False)
            _id(anonymous_id, "anonymous_id", out, required=False)
            _id(account_id, "account_id", out, required=False)
        present = event.WhichOneof("payload")
        if present is not None or kind in _REQUIRED_PAYLOADS:
            self._payload(event, kind, present, out)
        properties = event.properties
        if properties:
            self._map(properties, "properties", 1, out)
        if event.HasField("context"):
            self._context(event.context, out)
        has_timestamp = event.HasField("timestamp")
        has_sent_at = event.HasField("sent_at")
        if has_timestamp or has_sent_at:
            self._times(event, has_timestamp, has_sent_at, received_at_ns, out)

    def _guard_size(self) -> None:
        """Refuses an oversized event before walking its nested values, whose number only
        the event's size bounds (checked once per event, and only for nested values)."""
        if not self._sized:
            self._sized = True
            size = self._event.ByteSize()
            if size > MAX_EVENT_BYTES:
                raise _TooLargeError(_too_large(size))

    def _payload(
        self, event: event_pb2.Event, kind: int, present: str | None, out: list[Violation]
    ) -> None:
        expected, required = _PAYLOADS.get(kind, (None, False))
        if present != expected:
            if present is not None:
                out.append(
                    Violation(
                        present,
                        "PAYLOAD_MISMATCH",
                        f"Events of type {_type_name(kind)} do not carry {present!r}.",
                    )
                )
            elif required:
                out.append(
                    Violation(
                        str(expected),
                        "REQUIRED",
                        f"Required for events of type {_type_name(kind)}.",
                    )
                )
            return
        if present == "cart":
            self._cart(event.cart, out)
        elif present == "order":
            self._order(event.order, out)
        elif present == "identify":
            self._identify(event.identify, out)
        elif present == "campaign_interaction":
            _campaign(event.campaign_interaction, out)
        elif present == "account_update" and event.account_update.traits:
            self._map(event.account_update.traits, "account_update.traits", 1, out)

    def _context(self, context: event_pb2.Context, out: list[Violation]) -> None:
        if context.channel not in _CHANNELS:
            _enum(context.channel, _CHANNELS, "context.channel", out, required=False)
        if context.HasField("location"):
            location = context.location
            country = location.country
            if country and country not in self._countries:
                if _COUNTRY.fullmatch(country):
                    if country.isupper():
                        self._countries.add(country)
                    else:
                        location.country = country.upper()
                else:
                    out.append(
                        Violation(
                            "context.location.country",
                            "INVALID_COUNTRY",
                            "Must be an ISO 3166-1 alpha-2 code such as 'US'.",
                        )
                    )
            if location.HasField("point"):
                point = location.point
                _finite(point.latitude, "context.location.point.latitude", out, -90.0, 90.0)
                _finite(point.longitude, "context.location.point.longitude", out, -180.0, 180.0)
        if context.HasField("weather"):
            weather = context.weather
            if weather.condition not in _WEATHER:
                _enum(weather.condition, _WEATHER, "context.weather.condition", out, required=False)
            if weather.HasField("temperature_celsius"):
                _finite(
                    weather.temperature_celsius,
                    "context.weather.temperature_celsius",
                    out,
                    -100.0,
                    100.0,
                )
        if context.HasField("device") and context.device.type not in _DEVICE_TYPES:
            _enum(context.device.type, _DEVICE_TYPES, "context.device.type", out, required=False)

    def _identify(self, identify: event_pb2.Identify, out: list[Violation]) -> None:
        if identify.traits:
            self._map(identify.traits, "identify.traits", 1, out)
        identities = identify.identities
        if len(identities) > MAX_IDENTITIES:
            out.append(
                Violation(
                    "identify.identities",
                    "TOO_MANY_VALUES",
                    f"At most {MAX_IDENTITIES} identities.",
                )
            )
            return
        for index, identity in enumerate(identities):
            path = f"identify.identities[{index}]"
            if not _IDENTITY_TYPE.fullmatch(identity.type):
                out.append(
                    Violation(
                        f"{path}.type",
                        "INVALID_IDENTITY_TYPE",
                        "Must be 1–64 characters of lower-case letters, digits and '_'.",
                    )
                )
            value = identity.value
            if not value:
                out.append(Violation(f"{path}.value", "REQUIRED", "Required: 1–256 characters."))
            elif len(value) > 256:
                out.append(_too_long(f"{path}.value", "VALUE", 256, "characters"))

    def _items(
        self, items: Iterable[event_pb2.CartItem], count: int, path: str, out: list[Violation]
    ) -> None:
        if count > MAX_ITEMS:
            out.append(Violation(path, "TOO_MANY_VALUES", f"At most {MAX_ITEMS} items."))
            return
        for index, item in enumerate(items):
            _id(item.product_id, f"{path}[{index}].product_id", out, required=True)
            price = item.price
            if not (_isfinite(price) and price >= 0):
                out.append(
                    Violation(
                        f"{path}[{index}].price", "OUT_OF_RANGE", "Must be a finite number ≥ 0."
                    )
                )
            if item.quantity < 1:
                out.append(
                    Violation(f"{path}[{index}].quantity", "OUT_OF_RANGE", "Must be at least 1.")
                )

    def _cart(self, cart: event_pb2.Cart, out: list[Violation]) -> None:
        self._items(cart.items, len(cart.items), "cart.items", out)
        _currency(cart.currency, "cart.currency", out)
        if cart.HasField("value"):
            _amount(cart.value, "cart.value", out)

    def _order(self, order: event_pb2.Order, out: list[Violation]) -> None:
        _id(order.order_id, "order.order_id", out, required=True)
        self._items(order.items, len(order.items), "order.items", out)
        _currency(order.currency, "order.currency", out)
        if order.HasField("revenue"):
            _amount(order.revenue, "order.revenue", out)
        _amount(order.discount, "order.discount", out)

    def _map(self, entries: Any, path: str, depth: int, out: list[Violation]) -> None:
        """Checks a ``map<string, Value>``: keys, entry count, and each value."""
        if len(entries) > MAX_MAP_ENTRIES:
            out.append(Violation(path, "TOO_MANY_ENTRIES", f"At most {MAX_MAP_ENTRIES} entries."))
            return
        keys = self._keys
        for key in entries:
            if key not in keys:
                break
            value = entries[key]
            kind = value.WhichOneof("kind")
            if kind in _SCALAR_KINDS or (kind == "number_value" and _isfinite(value.number_value)):
                continue
            break
        else:
            return
        # Something to report, or a key or a nested value to look into.
        key_ok = self._key_ok
        for key, value in entries.items():
            if not key_ok(key):
                out.append(
                    Violation(
                        path,
                        "INVALID_KEY",
                        f"Key {key[:140]!r} must be 1–128 characters of letters, digits, "
                        "'_' and '-'.",
                    )
                )
                continue
            kind = value.WhichOneof("kind")
            if kind in _SCALAR_KINDS:
                continue
            if kind == "number_value":
                if not _isfinite(value.number_value):
                    out.append(Violation(f"{path}.{key}", "NOT_FINITE", "Must be a finite number."))
            else:
                self._value(value, kind, f"{path}.{key}", depth, out)

    def _value(
        self, value: common_pb2.Value, kind: str | None, path: str, depth: int, out: list[Violation]
    ) -> None:
        """Checks a value that is not a plain string, boolean, null or number."""
        if kind is None:
            out.append(Violation(path, "VALUE_NOT_SET", "A value must have one of its kinds set."))
        elif kind == "timestamp_value":
            _timestamp_value(value.timestamp_value, path, out)
        elif depth >= MAX_DEPTH:
            out.append(Violation(path, "TOO_DEEP", f"Values nest at most {MAX_DEPTH} levels deep."))
        elif kind == "map_value":
            self._guard_size()
            self._map(value.map_value.fields, path, depth + 1, out)
        else:
            self._guard_size()
            values = value.list_value.values
            if len(values) > MAX_LIST_VALUES:
                out.append(
                    Violation(path, "TOO_MANY_VALUES", f"At most {MAX_LIST_VALUES:,} values.")
                )
                return
            for index, item in enumerate(values):
                item_kind = item.WhichOneof("kind")
                if item_kind in _SCALAR_KINDS:
                    continue
                if item_kind == "number_value":
                    if not _isfinite(item.number_value):
                        out.append(
                            Violation(f"{path}[{index}]", "NOT_FINITE", "Must be a finite number.")
                        )
                else:
                    self._value(item, item_kind, f"{path}[{index}]", depth + 1, out)

    def _times(
        self,
        event: event_pb2.Event,
        has_timestamp: bool,
        has_sent_at: bool,
        received_at_ns: int,
        out: list[Violation],
    ) -> None:
        """Checks the times of an event that has a ``timestamp`` or a ``sent_at``."""
        if not has_timestamp:
            # Its time is its receipt time, whatever sent_at says.
            _event_time(event.sent_at, "sent_at", out)
            return
        timestamp = event.timestamp
        seconds, nanos = timestamp.seconds, timestamp.nanos
        if not (_MIN_EVENT_SECONDS <= seconds <= _MAX_TIMESTAMP_SECONDS and 0 <= nanos < _NS):
            _event_time(timestamp, "timestamp", out)
            if has_sent_at:
                _event_time(event.sent_at, "sent_at", out)
            return
        if has_sent_at:
            sent_at = event.sent_at
            sent_seconds, sent_nanos = sent_at.seconds, sent_at.nanos
            if not (
                _MIN_EVENT_SECONDS <= sent_seconds <= _MAX_TIMESTAMP_SECONDS
                and 0 <= sent_nanos < _NS
            ):
                _event_time(sent_at, "sent_at", out)
                return
            corrected = correct_skew(
                seconds * _NS + nanos, sent_seconds * _NS + sent_nanos, received_at_ns
            )
        else:
            corrected = seconds * _NS + nanos
        if corrected > received_at_ns + _FUTURE_TOLERANCE_NS:
            out.append(
                Violation(
                    "timestamp",
                    "TIMESTAMP_IN_FUTURE",
                    "More than a day after the event was received"
                    + (" (after clock-skew correction)." if has_sent_at else "."),
                )
            )
        elif corrected < _MIN_EVENT_SECONDS * _NS:
            out.append(
                Violation(
                    "timestamp",
                    "TIMESTAMP_TOO_OLD",
                    "Before 2000-01-01 after clock-skew correction.",
                )
            )
        elif has_sent_at:
            timestamp.seconds, timestamp.nanos = divmod(corrected, _NS)


class _TooLargeError(Exception):
    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.description)
        self.violation = violation


def _too_large(size: int) -> Violation:
    return Violation(
        "",
        "EVENT_TOO_LARGE",
        f"The encoded event is {size:,} bytes; the limit is {MAX_EVENT_BYTES:,}.",
    )


def _event_time(timestamp: Any, path: str, out: list[Violation]) -> None:
    """Reports what is wrong with an event's time (``timestamp`` or ``sent_at``), if anything."""
    seconds, nanos = timestamp.seconds, timestamp.nanos
    if not 0 <= nanos < _NS:
        out.append(Violation(path, "INVALID_TIMESTAMP", "nanos must be from 0 to 999,999,999."))
    elif seconds < _MIN_EVENT_SECONDS:
        out.append(Violation(path, "TIMESTAMP_TOO_OLD", "Must not be before 2000-01-01."))
    elif seconds > _MAX_TIMESTAMP_SECONDS:
        out.append(Violation(path, "INVALID_TIMESTAMP", "Must not be after 9999-12-31."))


def _timestamp_value(timestamp: Any, path: str, out: list[Violation]) -> None:
    if not 0 <= timestamp.nanos < _NS or not (
        _MIN_TIMESTAMP_SECONDS <= timestamp.seconds <= _MAX_TIMESTAMP_SECONDS
    ):
        out.append(Violation(path, "INVALID_TIMESTAMP", "Must be from 0001-01-01 to 9999-12-31."))


def _currency(code: str, path: str, out: list[Violation]) -> None:
    if code and not _CURRENCY.fullmatch(code):
        out.append(Violation(path, "INVALID_CURRENCY", "Must be an ISO 4217 code such as 'USD'."))


def _amount(value: float, path: str, out: list[Violation]) -> None:
    if not (_isfinite(value) and value >= 0):
        out.append(Violation(path, "OUT_OF_RANGE", "Must be a finite number ≥ 0."))


def _campaign(campaign: event_pb2.CampaignInteraction, out: list[Violation]) -> None:
    _id(campaign.campaign_id, "campaign_interaction.campaign_id", out, required=True)
    _enum(campaign.channel, _CAMPAIGN_CHANNELS, "campaign_interaction.channel", out, required=True)
    _enum(campaign.action, _CAMPAIGN_ACTIONS, "campaign_interaction.action", out, required=True)
    _id(campaign.creative_id, "campaign_interaction.creative_id", out, required=False)


def _enum(
    value: int, known: frozenset[int], path: str, out: list[Violation], *, required: bool
) -> None:
    if value in known:
        return
    if value == 0:
        if required:
            out.append(Violation(path, "REQUIRED", "Required."))
    else:
        out.append(Violation(path, "UNKNOWN_ENUM_VALUE", f"Unknown value {value}."))


def _strings(message: Any, path: str, out: list[Violation]) -> None:
    """Reports every string over the byte limit in a message, map keys included."""
    for field, value in message.ListFields():
        name = f"{path}.{field.name}" if path else field.name
        if field.type == field.TYPE_STRING:
            if field.is_repeated:
                for index, item in enumerate(value):
                    _string(item, f"{name}[{index}]", out)
            else:
                _string(value, name, out)
        elif field.type != field.TYPE_MESSAGE:
            continue
        elif field.message_type.GetOptions().map_entry:
            # Every map of the event is map<string, Value>.
            for key, item in value.items():
                _string(key, name, out)
                _value_strings(item, f"{name}.{key}", out)
        elif field.is_repeated:
            for index, item in enumerate(value):
                _strings(item, f"{name}[{index}]", out)
        else:
            _strings(value, name, out)


def _value_strings(value: common_pb2.Value, path: str, out: list[Violation]) -> None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        _string(value.string_value, path, out)
    elif kind == "list_value":
        for index, item in enumerate(value.list_value.values):
            _value_strings(item, f"{path}[{index}]", out)
    elif kind == "map_value":
        for key, item in value.map_value.fields.items():
            _string(key, path, out)
            _value_strings(item, f"{path}.{key}", out)


def _string(value: str, path: str, out: list[Violation]) -> None:
    # A character is at most 4 bytes in UTF-8: short strings need no encoding.
    if len(value) * 4 > MAX_STRING_BYTES and len(value.encode()) > MAX_STRING_BYTES:
        out.append(_too_long(path, "STRING", MAX_STRING_BYTES, "bytes"))
