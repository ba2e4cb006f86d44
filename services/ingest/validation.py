"""Validation and normalisation of incoming events, with explicit limits.

Pure: no I/O, no gRPC, no Redis. It reads and fills the generated ``audience.v1.Event``
messages directly, as plain data: copying 200,000 events a second into domain objects and
back would cost more than everything else ingest does.

Limits (the ``Event`` proto states the public ones; each breach is one :class:`Violation`
naming the field, relative to the event):

- ids (``event_id``, ``user_id``, ``anonymous_id``, ``account_id``, product, order and
  campaign ids): 1–128 characters when given, none a control character (U+0000–U+001F:
  ids name profiles and accounts, whose names cannot hold them);
- ``name``: 1–128 characters of letters, digits, ``_ . : -``; required for track events,
  fixed for the other types;
- property, trait and nested map keys: 1–128 characters of letters, digits, ``_`` and
  ``-`` (so the rule language's dotted paths can name them);
- at most 200 entries in a map (properties, traits, a nested map), 1,000 values in a
  list, values nested at most 8 levels (a top-level property is level 1);
- strings of at most 8,192 bytes, anywhere in the event, and none holding NUL (U+0000),
  which PostgreSQL cannot store;
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from operator import add, attrgetter, floordiv, methodcaller, mod, sub
from typing import Any

from audience.v1 import common_pb2, event_pb2
from services.ingest.patterns import (
    CAMPAIGN,
    IDENTITY,
    ITEM,
    KEY_CHARACTER,
    SIMPLE_ENTRY,
    SMALLEST,
    all_match,
)
from services.ingest.wire import Columns, Times, columns

__all__ = [
    "FIXED_NAMES",
    "MAX_DEPTH",
    "MAX_EVENT_BYTES",
    "MAX_ID_CHARS",
    "MAX_ITEMS",
    "MAX_LIST_VALUES",
    "MAX_MAP_ENTRIES",
    "MAX_STRING_BYTES",
    "CheckedBatch",
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
_CONTROL = re.compile(r"[\x00-\x1f]")
_CONTROL_BYTES = bytes(range(0x20))
_KEY = re.compile(KEY_CHARACTER.decode() + "{1,128}")
_IDENTITY_TYPE = re.compile(r"[a-z0-9_]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_COUNTRY = re.compile(r"[A-Za-z]{2}")
# The currencies most events carry, checked without the pattern (which they match).
_CURRENCIES = frozenset({"USD", "EUR", "GBP", "JPY", "CNY", "CAD", "AUD", "CHF", "INR", "BRL"})

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
_FLAT_KINDS = _SCALAR_KINDS | {"number_value"}

_isfinite = math.isfinite

# The (type, name, payload) heads that check_batch proves with one set operation: every
# fixed type, named or not, with each payload it may carry. Track events are proved by
# their name; account updates, whose required fields and partition key differ, get the
# full check.
_FIXED_HEADS = frozenset(
    (kind, name, payload)
    for kind, fixed in FIXED_NAMES.items()
    if kind != ACCOUNT_UPDATE
    for name in ("", fixed)
    for payload in ((_PAYLOADS[kind][0],) if _PAYLOADS[kind][1] else (None, _PAYLOADS[kind][0]))
)

# Readers of fields of many events: operator's getters run in C.
_EVENT_ID_OF = attrgetter("event_id")
_TYPE_OF = attrgetter("type")
_NAME_OF = attrgetter("name")
_USER_OF = attrgetter("user_id")
_VISITOR_OF = attrgetter("anonymous_id")
_HAS_TIMESTAMP = methodcaller("HasField", "timestamp")
_HAS_SENT_AT = methodcaller("HasField", "sent_at")
_PAYLOAD_OF = methodcaller("WhichOneof", "payload")
_PROPERTIES_OF = attrgetter("properties")
_TIMES_OF = attrgetter("timestamp", "sent_at")
_TIME_OF = attrgetter("seconds", "nanos")
_ITEM_OF = attrgetter("product_id", "price", "quantity")

# An event encoded in at most this many bytes needs no size or string-length check, even
# with what normalisation appends (a fixed name, a corrected timestamp).
_SMALL_EVENT_BYTES = MAX_STRING_BYTES - 64
# Events this small cannot hold more entries, items or identities than the limits allow,
# if each is simple (see services.ingest.patterns.SMALLEST).
_FEW_ENTRIES_BYTES = SMALLEST[SIMPLE_ENTRY] * MAX_MAP_ENTRIES
_FEW_PAYLOAD_VALUES_BYTES = min(
    SMALLEST[SIMPLE_ENTRY] * MAX_MAP_ENTRIES,
    SMALLEST[ITEM] * MAX_ITEMS,
    SMALLEST[IDENTITY] * MAX_IDENTITIES,
)


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


@dataclass(slots=True)
class CheckedBatch:
    """What :meth:`Validator.check_batch` found in the events of a call, by index.

    Valid events are not written to: what :meth:`Validator.check` would set on each is
    returned as data, for the encoder to append to the event's own encoding (see
    :mod:`services.ingest.records`). The events that needed the full check were
    normalised in place instead, and are listed in ``rewritten``.

    Attributes:
        event_ids: each event's id.
        keys: each valid event's partition key (see :func:`partition_key`).
        seconds: each valid event's ``timestamp`` once normalised (its own, corrected for
            clock skew when it has a ``sent_at``, or the receipt time when it has none):
            its seconds since the epoch,
        nanos: and its nanoseconds.
        names: the ``name`` each valid event gets, or "" to keep its own.
        rewritten: valid events normalised in place, to encode anew (their ``names`` are
            "").
        violations: what is wrong with each invalid event.
    """

    event_ids: Sequence[str]
    keys: list[str]
    seconds: list[int]
    nanos: list[int]
    names: list[str]
    rewritten: set[int]
    violations: dict[int, list[Violation]]


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
    elif _CONTROL.search(value):
        out.append(
            Violation(
                path, "CONTROL_CHARACTER", "Must not hold control characters (U+0000–U+001F)."
            )
        )


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
        self._identity_types: set[str] = set()
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

    def check_batch(
        self,
        events: Sequence[event_pb2.Event],
        encodings: Sequence[bytes],
        received_at_ns: int,
    ) -> CheckedBatch:
        """Checks the events of a call and says how each valid one is normalised.

        Reaches the verdicts of :meth:`check` and :meth:`check_encoded` on each event. The
        common case is proved with a few field reads per event and checks over whole
        columns (see :mod:`services.ingest.wire` and :mod:`services.ingest.patterns`); an
        event these cannot prove valid (an unusual value, valid or not, or a large event)
        gets :meth:`check`.

        Args:
            events: the events, as the client sent them.
            encodings: each event's encoding.
            received_at_ns: the receipt time, nanoseconds since the epoch.
        """
        count = len(events)
        found = columns(encodings) if count else None
        if found is None:
            return self._check_each(events, encodings, received_at_ns, set(range(count)))
        # Each event's wrapper object is made once: a repeated field makes one per access.
        events = list(events)
        suspects: set[int] = set()
        event_ids = found.event_ids
        if event_ids is None:
            event_ids = list(map(_EVENT_ID_OF, events))
        kinds = found.types
        if kinds is None:
            kinds = list(map(_TYPE_OF, events))
        # A column per field: a tuple per event, transposed, costs half as much again.
        names = list(map(_NAME_OF, events))
        users = list(map(_USER_OF, events))
        anonymous = list(map(_VISITOR_OF, events))
        if min(map(len, event_ids)) == 0 or max(map(len, event_ids)) > MAX_ID_CHARS:
            suspects.update(i for i, v in enumerate(event_ids) if not 0 < len(v) <= MAX_ID_CHARS)
        for column in (users, anonymous):
            if max(map(len, column)) > MAX_ID_CHARS:
                suspects.update(i for i, v in enumerate(column) if len(v) > MAX_ID_CHARS)
        if _any_control(chain(event_ids, users, anonymous)):
            id_columns: tuple[Sequence[str], ...] = (event_ids, users, anonymous)
            for id_column in id_columns:
                suspects.update(i for i, v in enumerate(id_column) if _CONTROL.search(v))
        account_ids = found.account_ids
        if max(map(len, account_ids), default=0) > MAX_ID_CHARS or _any_control(account_ids):
            suspects.update(
                i
                for i, event in enumerate(events)
                if len(event.account_id) > MAX_ID_CHARS or _CONTROL.search(event.account_id)
            )
        if b"\x00" in found.free_text:
            # A NUL somewhere in a context or a coupon: in an event with a zero byte.
            suspects.update(i for i, encoding in enumerate(encodings) if b"\x00" in encoding)
        keys = [user or visitor for user, visitor in zip(users, anonymous, strict=True)]
        if not all(keys):
            suspects.update(i for i, key in enumerate(keys) if not key)
        sizes = list(map(len, encodings))
        if max(sizes) > _SMALL_EVENT_BYTES:
            suspects.update(i for i, size in enumerate(sizes) if size > _SMALL_EVENT_BYTES)
        payloads = list(map(_PAYLOAD_OF, events))
        self._check_heads(kinds, names, payloads, suspects)
        self._check_properties(found, events, sizes, suspects)
        self._check_payloads(found, events, encodings, kinds, payloads, sizes, suspects)
        self._check_contexts(found, events, suspects)
        seconds, nanos = self._check_times(found, events, received_at_ns, suspects)
        fixed_names = [
            "" if name or kind == TRACK else FIXED_NAMES.get(kind, "")
            for kind, name in zip(kinds, names, strict=True)
        ]
        checked = CheckedBatch(event_ids, keys, seconds, nanos, fixed_names, set(), {})
        return self._check_suspects(events, encodings, received_at_ns, suspects, checked)

    def _check_each(
        self,
        events: Sequence[event_pb2.Event],
        encodings: Sequence[bytes],
        received_at_ns: int,
        suspects: set[int],
    ) -> CheckedBatch:
        """Every event through :meth:`check`."""
        count = len(events)
        checked = CheckedBatch(
            list(map(_EVENT_ID_OF, events)),
            [""] * count,
            [0] * count,
            [0] * count,
            [""] * count,
            set(),
            {},
        )
        return self._check_suspects(events, encodings, received_at_ns, suspects, checked)

    def _check_suspects(
        self,
        events: Sequence[event_pb2.Event],
        encodings: Sequence[bytes],
        received_at_ns: int,
        suspects: set[int],
        checked: CheckedBatch,
    ) -> CheckedBatch:
        """Runs :meth:`check` on each suspect, and records the outcome in ``checked``."""
        violations = checked.violations
        for index in sorted(suspects):
            event = events[index]
            problems = self.check(event, received_at_ns, encoding=encodings[index])
            if problems is None:
                checked.keys[index] = partition_key(event)
                if event.HasField("timestamp"):
                    checked.seconds[index], checked.nanos[index] = _TIME_OF(event.timestamp)
                else:
                    checked.seconds[index], checked.nanos[index] = divmod(received_at_ns, _NS)
                checked.names[index] = ""
                checked.rewritten.add(index)
            else:
                violations[index] = problems
        return checked

    def _check_heads(
        self,
        kinds: Sequence[int],
        names: Sequence[str],
        payloads: Sequence[str | None],
        suspects: set[int],
    ) -> None:
        """Checks each event's type, name and payload kind together."""
        unproved = set(zip(kinds, names, payloads, strict=True)) - _FIXED_HEADS
        if not unproved:
            return
        names_seen = self._names
        bad = {
            head
            for head in unproved
            if not (
                head[0] == TRACK
                and head[2] is None
                and (head[1] in names_seen or self._name_ok(head[1]))
            )
        }
        if bad:
            suspects.update(
                i for i, head in enumerate(zip(kinds, names, payloads, strict=True)) if head in bad
            )

    def _check_properties(
        self,
        found: Columns,
        events: Sequence[event_pb2.Event],
        sizes: list[int],
        suspects: set[int],
    ) -> None:
        if all_match(SIMPLE_ENTRY, found.properties_encoded):
            if max(sizes) > _FEW_ENTRIES_BYTES:
                suspects.update(
                    i
                    for i, size in enumerate(sizes)
                    if size > _FEW_ENTRIES_BYTES and len(events[i].properties) > MAX_MAP_ENTRIES
                )
            return
        # Something else somewhere (a nested value, say): each event's own.
        keys_seen = self._keys
        for index, properties in enumerate(map(_PROPERTIES_OF, events)):
            if not properties or index in suspects:
                continue
            if len(properties) > MAX_MAP_ENTRIES:
                suspects.add(index)
                continue
            for key in properties:
                if key not in keys_seen and not self._key_ok(key):
                    break
                value = properties[key]
                kind = value.WhichOneof("kind")
                if kind == "string_value":
                    if "\x00" in value.string_value:
                        break
                    continue
                if kind in _SCALAR_KINDS or (
                    kind == "number_value" and _isfinite(value.number_value)
                ):
                    continue
                break
            else:
                continue
            suspects.add(index)

    def _check_payloads(
        self,
        found: Columns,
        events: Sequence[event_pb2.Event],
        encodings: Sequence[bytes],
        kinds: Sequence[int],
        payloads: list[str | None],
        sizes: list[int],
        suspects: set[int],
    ) -> None:
        carrying = [i for i, p in enumerate(payloads) if p is not None and i not in suspects]
        if not carrying:
            return
        if self._payloads_fine(found):
            # Every value present is valid; what a column cannot show is left: a required
            # order id (an order's only required field that may be missing) and the counts
            # a large event may exceed.
            each = [
                i
                for i in carrying
                if sizes[i] > _FEW_PAYLOAD_VALUES_BYTES
                or (
                    payloads[i] == "order" and not 0 < len(events[i].order.order_id) <= MAX_ID_CHARS
                )
            ]
        else:
            # The payload checks leave NUL to the full check, which an event without a
            # zero byte cannot hold.
            each = []
            for index in carrying:
                if b"\x00" in encodings[index]:
                    suspects.add(index)
                else:
                    each.append(index)
        for index in each:
            if not self._payload_fine(events[index], kinds[index], payloads[index]):
                suspects.add(index)

    def _payloads_fine(self, found: Columns) -> bool:
        """Whether every payload value present is valid (see :mod:`services.ingest.wire`)."""
        currencies = set(found.currencies)
        if not currencies <= _CURRENCIES and not all(map(_CURRENCY.fullmatch, currencies)):
            return False
        return (
            _all_within(found.amounts, 0.0, math.inf)
            and not _any_control(found.order_ids)
            and all_match(ITEM, found.items_encoded)
            and all_match(IDENTITY, found.identities_encoded)
            and all_match(CAMPAIGN, found.campaigns_encoded)
            and all_match(SIMPLE_ENTRY, found.traits_encoded)
        )

    def _payload_fine(self, event: event_pb2.Event, kind: int, present: str | None) -> bool:
        self._event = event
        self._sized = False
        out: list[Violation] = []
        try:
            self._payload(event, kind, present, out)
        except _TooLargeError:
            return False
        return not out

    def _check_contexts(
        self, found: Columns, events: Sequence[event_pb2.Event], suspects: set[int]
    ) -> None:
        if self._contexts_fine(found):
            return
        # Something to report or to normalise somewhere: find the events.
        for index, event in enumerate(events):
            if (
                index not in suspects
                and event.HasField("context")
                and not self._context_fine(event.context)
            ):
                suspects.add(index)

    def _contexts_fine(self, found: Columns) -> bool:
        """Whether every context field present is valid and needs no normalisation."""
        countries = set(found.countries)
        known = self._countries
        if not countries <= known:
            for country in countries - known:
                if _COUNTRY.fullmatch(country) and country.isupper():
                    known.add(country)
            if not countries <= known:
                return False
        return (
            set(found.channels) <= _CHANNELS
            and set(found.device_types) <= _DEVICE_TYPES
            and set(found.conditions) <= _WEATHER
            and _all_within(found.latitudes, -90.0, 90.0)
            and _all_within(found.longitudes, -180.0, 180.0)
            and _all_within(found.temperatures, -100.0, 100.0)
        )

    def _context_fine(self, context: event_pb2.Context) -> bool:
        """Whether :meth:`_context` would find nothing to report nor to normalise."""
        if context.channel not in _CHANNELS or context.device.type not in _DEVICE_TYPES:
            return False
        if context.HasField("location"):
            location = context.location
            country = location.country
            if country and country not in self._countries:
                return False
            if location.HasField("point"):
                point = location.point
                if not (
                    _within(point.latitude, -90.0, 90.0) and _within(point.longitude, -180.0, 180.0)
                ):
                    return False
        if context.HasField("weather"):
            weather = context.weather
            if weather.condition not in _WEATHER:
                return False
            if weather.HasField("temperature_celsius"):
                return _within(weather.temperature_celsius, -100.0, 100.0)
        return True

    def _check_times(
        self,
        found: Columns,
        events: Sequence[event_pb2.Event],
        received_at_ns: int,
        suspects: set[int],
    ) -> tuple[list[int], list[int]]:
        """The ``timestamp`` of each event once normalised, as seconds and nanos (see
        :class:`CheckedBatch`); the events whose times :meth:`_times` would report on are
        added to ``suspects``."""
        stamps, sent = found.timestamps, found.sent_at
        # Columns in bulk when the events of a call are alike, all with a time or none;
        # a time set to all zeros shows only to HasField.
        if stamps is None or sent is None or not _valid_times(stamps) or not _valid_times(sent):
            return self._check_times_each(events, received_at_ns, suspects)
        if not sent.seconds and any(map(_HAS_SENT_AT, events)):
            return self._check_times_each(events, received_at_ns, suspects)
        count = len(events)
        if not stamps.seconds:
            if any(map(_HAS_TIMESTAMP, events)):
                return self._check_times_each(events, received_at_ns, suspects)
            received_seconds, received_nanos = divmod(received_at_ns, _NS)
            return [received_seconds] * count, [received_nanos] * count
        if sent.seconds:
            # received - (sent - timestamp), in seconds and nanos: small integers, and a
            # carry of -1, 0 or 1 second from the nanos.
            received_seconds, received_nanos = divmod(received_at_ns, _NS)
            summed = list(map(sub, map(add, stamps.nanos, repeat(received_nanos)), sent.nanos))
            nanos = list(map(mod, summed, repeat(_NS)))
            seconds = list(
                map(
                    add,
                    map(sub, map(add, stamps.seconds, repeat(received_seconds)), sent.seconds),
                    map(floordiv, summed, repeat(_NS)),
                )
            )
        else:
            seconds, nanos = stamps.seconds, stamps.nanos
        latest_seconds, latest_nanos = divmod(received_at_ns + _FUTURE_TOLERANCE_NS, _NS)
        if min(seconds) < _MIN_EVENT_SECONDS:
            suspects.update(i for i, second in enumerate(seconds) if second < _MIN_EVENT_SECONDS)
        if max(seconds) >= latest_seconds:
            suspects.update(
                i
                for i, second in enumerate(seconds)
                if second > latest_seconds or (second == latest_seconds and nanos[i] > latest_nanos)
            )
        return seconds, nanos

    def _check_times_each(
        self, events: Sequence[event_pb2.Event], received_at_ns: int, suspects: set[int]
    ) -> tuple[list[int], list[int]]:
        times = [received_at_ns] * len(events)
        latest = received_at_ns + _FUTURE_TOLERANCE_NS
        earliest = _MIN_EVENT_SECONDS * _NS
        for index, (stamp, sent) in enumerate(map(_TIMES_OF, events)):
            seconds, nanos = _TIME_OF(stamp)
            sent_seconds, sent_nanos = _TIME_OF(sent)
            # A time set to all zeros reads like an unset one: HasField tells them apart.
            has_sent = bool(sent_seconds or sent_nanos) or events[index].HasField("sent_at")
            if has_sent and not (
                _MIN_EVENT_SECONDS <= sent_seconds <= _MAX_TIMESTAMP_SECONDS
                and 0 <= sent_nanos < _NS
            ):
                suspects.add(index)
            elif not (seconds or nanos or events[index].HasField("timestamp")):
                continue
            elif not (_MIN_EVENT_SECONDS <= seconds <= _MAX_TIMESTAMP_SECONDS and 0 <= nanos < _NS):
                suspects.add(index)
            else:
                value = seconds * _NS + nanos
                if has_sent:
                    value = correct_skew(value, sent_seconds * _NS + sent_nanos, received_at_ns)
                if earliest <= value <= latest:
                    times[index] = value
                else:
                    suspects.add(index)
        columns = list(zip(*map(divmod, times, repeat(_NS)), strict=True))
        return list(columns[0]), list(columns[1])

    def check(
        self, event: event_pb2.Event, received_at_ns: int, *, encoding: bytes | None = None
    ) -> list[Violation] | None:
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
            encoding: the event's encoding as it came, if the caller has it (else the
                event is encoded to look for NUL).
        """
        out: list[Violation] = []
        self._event = event
        self._sized = False
        try:
            self._check(event, received_at_ns, out)
        except _TooLargeError as error:
            return [error.violation]
        # The UTF-8 of NUL is a zero byte, and no other character's holds one: an encoding
        # without a zero byte (most are) has no string to look into.
        if b"\x00" in (event.SerializeToString() if encoding is None else encoding):
            nul: list[Violation] = []
            _nul_strings(event, "", nul)
            # An id holding NUL is reported once, for its control character.
            reported = {violation.field for violation in out}
            out.extend(violation for violation in nul if violation.field not in reported)
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
        if not 0 < len(event_id) <= MAX_ID_CHARS or _CONTROL.search(event_id):
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
            or _CONTROL.search(user_id + anonymous_id + account_id)
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
        types_seen = self._identity_types
        for index, identity in enumerate(identities):
            kind, value = identity.type, identity.value
            if kind in types_seen and 0 < len(value) <= 256:
                continue
            path = f"identify.identities[{index}]"
            if kind not in types_seen:
                if _IDENTITY_TYPE.fullmatch(kind):
                    # At most 37**64 names could match, so the cache is bounded by count.
                    if len(types_seen) >= _CACHE_LIMIT:
                        types_seen.clear()
                    types_seen.add(kind)
                else:
                    out.append(
                        Violation(
                            f"{path}.type",
                            "INVALID_IDENTITY_TYPE",
                            "Must be 1–64 characters of lower-case letters, digits and '_'.",
                        )
                    )
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
            product_id, price, quantity = _ITEM_OF(item)
            if (
                0 < len(product_id) <= MAX_ID_CHARS
                and not _CONTROL.search(product_id)
                and _isfinite(price)
                and price >= 0
                and quantity >= 1
            ):
                continue
            _id(product_id, f"{path}[{index}].product_id", out, required=True)
            if not (_isfinite(price) and price >= 0):
                out.append(
                    Violation(
                        f"{path}[{index}].price", "OUT_OF_RANGE", "Must be a finite number ≥ 0."
                    )
                )
            if quantity < 1:
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


def _any_control(texts: Iterable[str]) -> bool:
    """Whether some text holds a control character (U+0000–U+001F), over many at once: in
    UTF-8 their bytes are theirs alone, and deleting bytes is a C loop (a regular expression
    takes five times as long)."""
    encoded = "".join(texts).encode()
    return len(encoded.translate(None, _CONTROL_BYTES)) != len(encoded)


def _within(value: float, low: float, high: float) -> bool:
    return _isfinite(value) and low <= value <= high


def _all_within(values: list[float], low: float, high: float) -> bool:
    # A sum is finite only if every term is, and min and max then compare no NaN.
    return not values or (_isfinite(sum(values)) and min(values) >= low and max(values) <= high)


def _valid_times(found: Times) -> bool:
    """Whether every time is a valid event time, 2000-01-01 to 9999-12-31 (true of none)."""
    seconds, nanos = found.seconds, found.nanos
    return not seconds or (
        min(seconds) >= _MIN_EVENT_SECONDS
        and max(seconds) <= _MAX_TIMESTAMP_SECONDS
        and min(nanos) >= 0
        and max(nanos) < _NS
    )


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
    if code and code not in _CURRENCIES and not _CURRENCY.fullmatch(code):
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


def _nul_strings(message: Any, path: str, out: list[Violation]) -> None:
    """Reports every string holding NUL in a message, map keys included (at their map's
    path)."""
    for field, value in message.ListFields():
        name = f"{path}.{field.name}" if path else field.name
        if field.type == field.TYPE_STRING:
            if field.is_repeated:
                out.extend(_nul(f"{name}[{i}]") for i, item in enumerate(value) if "\x00" in item)
            elif "\x00" in value:
                out.append(_nul(name))
        elif field.type != field.TYPE_MESSAGE:
            continue
        elif field.message_type.GetOptions().map_entry:
            # Every map of the event is map<string, Value>.
            _nul_map(value, name, out)
        elif field.is_repeated:
            for index, item in enumerate(value):
                _nul_strings(item, f"{name}[{index}]", out)
        else:
            _nul_strings(value, name, out)


def _nul_map(entries: Any, path: str, out: list[Violation]) -> None:
    for key, value in entries.items():
        if "\x00" in key:
            out.append(_nul(path))
        else:
            _nul_value(value, f"{path}.{key}", out)


def _nul_value(value: common_pb2.Value, path: str, out: list[Violation]) -> None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if "\x00" in value.string_value:
            out.append(_nul(path))
    elif kind == "list_value":
        for index, item in enumerate(value.list_value.values):
            _nul_value(item, f"{path}[{index}]", out)
    elif kind == "map_value":
        _nul_map(value.map_value.fields, path, out)


def _nul(path: str) -> Violation:
    return Violation(path, "NUL_CHARACTER", "Must not hold the NUL character (U+0000).")


def _string(value: str, path: str, out: list[Violation]) -> None:
    # A character is at most 4 bytes in UTF-8: short strings need no encoding.
    if len(value) * 4 > MAX_STRING_BYTES and len(value.encode()) > MAX_STRING_BYTES:
        out.append(_too_long(path, "STRING", MAX_STRING_BYTES, "bytes"))
