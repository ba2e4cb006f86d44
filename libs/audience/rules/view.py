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
from collections.abc import Iterable, Iterator, Mapping
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
    "View",
    "evaluation_row",
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


# The columns of `profiles` the rules read, in order: each is a View field of the same name.
EVALUATION_COLUMNS: tuple[str, ...] = tuple(
    name for name in View.__dataclass_fields__ if name != "subject_id"
)
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
    return view_from_parts(
        subject_id,
        attributes=message.attributes,
        session=message.session if message.HasField("session") else None,
        context=message.context if message.HasField("context") else None,
        first_seen_time=(message.first_seen_time if message.HasField("first_seen_time") else None),
        last_seen_time=message.last_seen_time if message.HasField("last_seen_time") else None,
        lifetime_value=message.lifetime_value,
        order_count=message.order_count,
        visit_count=message.visit_count,
        aggregates=message.aggregates,
        account_id=message.account_id,
    )


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
    fields: dict[str, Any] = {}
    if session is not None:
        cart = session.cart
        fields.update(
            session_start=(
                micros_from_timestamp(session.start_time)
                if session.HasField("start_time")
                else None
            ),
            cart_value=_finite(cart_value(cart)),
            cart_item_count=sum(item.quantity for item in cart.items),
            page_view_count=session.page_view_count,
            landing_page=_text(session.landing_page),
            source=_text(session.source),
            referrer=_text(session.referrer),
            utm_source=_text(session.utm.source),
            utm_medium=_text(session.utm.medium),
            utm_campaign=_text(session.utm.campaign),
            utm_term=_text(session.utm.term),
            utm_content=_text(session.utm.content),
            channel=CHANNEL_LABELS.get(session.channel),
            is_new_visitor=(session.visit_number or visit_count) <= 1,
        )
    if context is not None:
        location = context.location
        fields.update(
            country=_text(location.country),
            region=_text(location.region),
            city=_text(location.city),
            postal_code=_text(location.postal_code),
            weather_condition=WEATHER_LABELS.get(context.weather.condition),
            temperature_celsius=(
                _finite(context.weather.temperature_celsius)
                if context.weather.HasField("temperature_celsius")
                else None
            ),
            device_type=DEVICE_LABELS.get(context.device.type),
            os=_text(context.device.os),
            browser=_text(context.device.browser),
        )
        if location.HasField("point"):
            latitude, longitude = location.point.latitude, location.point.longitude
            if math.isfinite(latitude) and math.isfinite(longitude):
                fields.update(latitude=latitude, longitude=longitude)
    return View(
        subject_id=subject_id,
        attributes=attributes_from_proto(attributes or {}),
        first_seen=(
            micros_from_timestamp(first_seen_time) if first_seen_time is not None else None
        ),
        last_seen=micros_from_timestamp(last_seen_time) if last_seen_time is not None else None,
        lifetime_value=lifetime_value if math.isfinite(lifetime_value) else 0.0,
        order_count=order_count,
        visit_count=visit_count,
        account_id=account_id or None,
        aggregates=_AggregatesOnRead(aggregates),
        **fields,
    )


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
