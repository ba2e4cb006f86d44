"""The evaluation view: what a rule reads of one profile (or account), as plain Python.

It mirrors ``audience.bus.v1.EvaluationView`` with the subject's id, flattened into typed
fields that are also the columns of the ``profiles`` table (``evaluation_schema.sql``), the
aggregates included: :func:`evaluation_row` gives a view's row, so the profile service
writes exactly what the Python predicate reads. Times are microseconds since the epoch; an
unset string, enum, time or place is ``None`` (missing), never ``""``.

Fields derived from the visit (``None`` when the subject has had no visit):

- ``cart_value``: the cart's ``value``, else the sum of ``price * quantity`` in item order;
  0 with no cart. ``cart_item_count``: the sum of the quantities.
- ``is_new_visitor``: the visit is the first: ``session.visit_number`` (else the view's
  ``visit_count``) is at most 1.
- ``channel``, ``weather_condition``, ``device_type``: lower-case enum labels (``web``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf import timestamp_pb2

from audience.rules.aggregates import Series, aggregates_json, series_from_proto
from audience.rules.facts import CHANNEL_LABELS, DEVICE_LABELS, WEATHER_LABELS, cart_value
from audience.rules.values import (
    AttrValue,
    attributes_from_proto,
    attributes_json,
    datetime_from_micros,
    micros_from_timestamp,
)
from audience.v1 import common_pb2, event_pb2, profile_pb2

__all__ = [
    "EVALUATION_COLUMNS",
    "EvaluationViewMessage",
    "LazyView",
    "View",
    "evaluation_row",
    "evaluation_row_from_parts",
    "view_from_parts",
    "view_from_proto",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class View:
    """One subject's state as rules see it. Build with :func:`view_from_proto` (or
    :func:`view_from_parts`); attribute values are in the forms of ``values``."""

    subject_id: str
    attributes: Mapping[str, AttrValue] = field(default_factory=dict)
    session_start: int | None = None
    cart_value: float | None = None
    cart_item_count: int | None = None
    page_view_count: int | None = None
    landing_page: str | None = None
    source: str | None = None
    referrer: str | None = None
    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    utm_term: str | None = None
    utm_content: str | None = None
    channel: str | None = None
    visit_count: int = 0
    is_new_visitor: bool | None = None
    country: str | None = None
    region: str | None = None
    city: str | None = None
    postal_code: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    weather_condition: str | None = None
    temperature_celsius: float | None = None
    device_type: str | None = None
    os: str | None = None
    browser: str | None = None
    first_seen: int | None = None
    last_seen: int | None = None
    lifetime_value: float = 0.0
    order_count: int = 0
    account_id: str | None = None
    # Aggregate id → its buckets. An aggregate that is absent is empty.
    aggregates: Mapping[str, Series] = field(default_factory=dict)


_VIEW_FIELDS: tuple[str, ...] = tuple(View.__dataclass_fields__)
# The columns of `profiles` the rules read, in order: each is a View field of the same name.
EVALUATION_COLUMNS: tuple[str, ...] = tuple(name for name in _VIEW_FIELDS if name != "subject_id")
_TIME_COLUMNS = frozenset({"session_start", "first_seen", "last_seen"})


class EvaluationViewMessage(Protocol):
    """The fields of ``audience.bus.v1.EvaluationView`` read by :func:`view_from_proto`."""

    @property
    def attributes(self) -> Mapping[str, common_pb2.Value]: ...
    @property
    def session(self) -> profile_pb2.Session: ...
    @property
    def context(self) -> event_pb2.Context: ...
    @property
    def first_seen_time(self) -> timestamp_pb2.Timestamp: ...
    @property
    def last_seen_time(self) -> timestamp_pb2.Timestamp: ...
    @property
    def lifetime_value(self) -> float: ...
    @property
    def order_count(self) -> int: ...
    @property
    def visit_count(self) -> int: ...
    @property
    def aggregates(self) -> Iterable[profile_pb2.AggregateValue]: ...
    @property
    def account_id(self) -> str: ...
    def HasField(self, field_name: Any, /) -> bool: ...  # noqa: N802 - the protobuf API


class _AggregatesOnRead(Mapping[str, Series]):
    """A view's aggregates, each decoded from its ``AggregateValue`` when first read: a
    subject holds dozens, and a change's evaluation reads the few its rules name."""

    __slots__ = ("_decoded", "_values")

    def __init__(self, values: Iterable[profile_pb2.AggregateValue]) -> None:
        self._values = {value.aggregate_id: value for value in values}
        self._decoded: dict[str, Series] = {}

    def get(self, key: str, default: Any = None) -> Any:
        series = self._decoded.get(key)
        if series is None:
            value = self._values.get(key)
            if value is None:
                return default
            series = self._decoded[key] = series_from_proto(value)
        return series

    def __getitem__(self, key: str) -> Series:
        series = self.get(key)
        if series is None:
            raise KeyError(key)
        return series  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _text(value: str) -> str | None:
    return value or None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def view_from_proto(message: EvaluationViewMessage, subject_id: str) -> View:
    """The view of an ``EvaluationView`` message, for the subject ``subject_id``."""
    fields: dict[str, Any] = {}
    for decode in _GROUP_DECODERS:
        fields.update(decode(message))
    return View(subject_id=subject_id, **fields)


class LazyView:
    """The view of an ``EvaluationView`` message, decoded a group of fields at a time (the
    attributes, the visit, the place and device, the aggregates, the rest) when a rule
    first reads one of them: evaluating a change runs the rules its changed keys affect,
    which read a few groups, and the view before it is read only for the rules whose
    answer changed. Reads as the :class:`View` of :func:`view_from_proto` does."""

    __slots__ = ("_message", *_VIEW_FIELDS)

    def __init__(self, message: EvaluationViewMessage, subject_id: str) -> None:
        object.__setattr__(self, "_message", message)
        object.__setattr__(self, "subject_id", subject_id)

    def __getattr__(self, name: str) -> Any:
        decode = _DECODER_OF.get(name)
        if decode is None:
            raise AttributeError(name)
        for field_name, value in decode(self._message).items():
            object.__setattr__(self, field_name, value)
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a view is read-only: cannot set {name!r}")


def view_from_parts(
    subject_id: str,
    *,
    attributes: Mapping[str, common_pb2.Value] | None = None,
    session: profile_pb2.Session | None = None,
    context: event_pb2.Context | None = None,
    first_seen_time: timestamp_pb2.Timestamp | None = None,
    last_seen_time: timestamp_pb2.Timestamp | None = None,
    lifetime_value: float = 0.0,
    order_count: int = 0,
    visit_count: int = 0,
    aggregates: Iterable[profile_pb2.AggregateValue] = (),
    account_id: str = "",
) -> View:
    """The view built from ``audience.v1`` pieces (what an ``EvaluationView`` holds)."""
    return View(
        subject_id=subject_id,
        attributes=attributes_from_proto(attributes or {}),
        **_visit_fields(session, visit_count),
        **_place_fields(context),
        **_totals(
            _micros(first_seen_time),
            _micros(last_seen_time),
            lifetime_value,
            order_count,
            visit_count,
            account_id,
        ),
        aggregates=_AggregatesOnRead(aggregates),
    )


def evaluation_row_from_parts(
    *,
    attributes: str,
    aggregates: str,
    session: profile_pb2.Session | None = None,
    context: event_pb2.Context | None = None,
    first_seen: int | None = None,
    last_seen: int | None = None,
    lifetime_value: float = 0.0,
    order_count: int = 0,
    visit_count: int = 0,
    account_id: str = "",
) -> dict[str, Any]:
    """What :func:`evaluation_row` gives for the view of these parts, straight from them
    (times in microseconds; ``attributes`` and ``aggregates`` already JSON text): the
    profile service writes a row for every profile a unit changes, and building the
    read-only view first cost it more than the rest of the row."""
    row = {
        **_visit_fields(session, visit_count),
        **_place_fields(context),
        **_totals(first_seen, last_seen, lifetime_value, order_count, visit_count, account_id),
        "attributes": attributes,
        "aggregates": aggregates,
    }
    for name in _TIME_COLUMNS:
        moment = row[name]
        if moment is not None:
            row[name] = datetime_from_micros(moment)
    return row


def _micros(timestamp: timestamp_pb2.Timestamp | None) -> int | None:
    return None if timestamp is None else micros_from_timestamp(timestamp)


def _visit_fields(session: profile_pb2.Session | None, visit_count: int) -> dict[str, Any]:
    if session is None:
        return _NO_VISIT
    cart = session.cart
    utm = session.utm
    return {
        "session_start": (
            micros_from_timestamp(session.start_time) if session.HasField("start_time") else None
        ),
        "cart_value": _finite(cart_value(cart)),
        "cart_item_count": sum(item.quantity for item in cart.items),
        "page_view_count": session.page_view_count,
        "landing_page": _text(session.landing_page),
        "source": _text(session.source),
        "referrer": _text(session.referrer),
        "utm_source": _text(utm.source),
        "utm_medium": _text(utm.medium),
        "utm_campaign": _text(utm.campaign),
        "utm_term": _text(utm.term),
        "utm_content": _text(utm.content),
        "channel": CHANNEL_LABELS.get(session.channel),
        "is_new_visitor": (session.visit_number or visit_count) <= 1,
    }


def _place_fields(context: event_pb2.Context | None) -> dict[str, Any]:
    if context is None:
        return _NO_PLACE
    location, weather, device = context.location, context.weather, context.device
    latitude = longitude = None
    if location.HasField("point"):
        point = location.point
        if math.isfinite(point.latitude) and math.isfinite(point.longitude):
            latitude, longitude = point.latitude, point.longitude
    return {
        "country": _text(location.country),
        "region": _text(location.region),
        "city": _text(location.city),
        "postal_code": _text(location.postal_code),
        "latitude": latitude,
        "longitude": longitude,
        "weather_condition": WEATHER_LABELS.get(weather.condition),
        "temperature_celsius": (
            _finite(weather.temperature_celsius)
            if weather.HasField("temperature_celsius")
            else None
        ),
        "device_type": DEVICE_LABELS.get(device.type),
        "os": _text(device.os),
        "browser": _text(device.browser),
    }


def _totals(
    first_seen: int | None,
    last_seen: int | None,
    lifetime_value: float,
    order_count: int,
    visit_count: int,
    account_id: str,
) -> dict[str, Any]:
    return {
        "first_seen": first_seen,
        "last_seen": last_seen,
        "lifetime_value": lifetime_value if math.isfinite(lifetime_value) else 0.0,
        "order_count": order_count,
        "visit_count": visit_count,
        "account_id": account_id or None,
    }


def _message_attributes(message: EvaluationViewMessage) -> dict[str, Any]:
    return {"attributes": attributes_from_proto(message.attributes)}


def _message_visit(message: EvaluationViewMessage) -> dict[str, Any]:
    session = message.session if message.HasField("session") else None
    return _visit_fields(session, message.visit_count)


def _message_place(message: EvaluationViewMessage) -> dict[str, Any]:
    return _place_fields(message.context if message.HasField("context") else None)


def _message_totals(message: EvaluationViewMessage) -> dict[str, Any]:
    return _totals(
        _micros(message.first_seen_time if message.HasField("first_seen_time") else None),
        _micros(message.last_seen_time if message.HasField("last_seen_time") else None),
        message.lifetime_value,
        message.order_count,
        message.visit_count,
        message.account_id,
    )


def _message_aggregates(message: EvaluationViewMessage) -> dict[str, Any]:
    return {"aggregates": _AggregatesOnRead(message.aggregates)}


_GROUP_DECODERS: tuple[Callable[[EvaluationViewMessage], dict[str, Any]], ...] = (
    _message_attributes,
    _message_visit,
    _message_place,
    _message_totals,
    _message_aggregates,
)
# What a view with no visit (or no place) holds in those fields.
_NO_VISIT: dict[str, Any] = dict.fromkeys(_visit_fields(profile_pb2.Session(), 0))
_NO_PLACE: dict[str, Any] = dict.fromkeys(_place_fields(event_pb2.Context()))
_DECODER_OF: dict[str, Callable[[EvaluationViewMessage], dict[str, Any]]] = {
    "attributes": _message_attributes,
    **dict.fromkeys(_NO_VISIT, _message_visit),
    **dict.fromkeys(_NO_PLACE, _message_place),
    **dict.fromkeys(_totals(None, None, 0.0, 0, 0, ""), _message_totals),
    "aggregates": _message_aggregates,
}


def evaluation_row(view: View) -> dict[str, Any]:
    """The view's columns of ``profiles``, as asyncpg takes them.

    ``attributes`` and ``aggregates`` are JSON text (for ``jsonb`` parameters); times are
    aware datetimes.
    """
    row: dict[str, Any] = {}
    for name in EVALUATION_COLUMNS:
        value = getattr(view, name)
        if name == "attributes":
            value = attributes_json(value)
        elif name == "aggregates":
            value = aggregates_json(value)
        elif name in _TIME_COLUMNS and value is not None:
            value = datetime_from_micros(value)
        row[name] = value
    return row
