"""Facts: what aggregates count. One event becomes one or more facts.

A fact has a name, a time and properties. Aggregates match facts by name and property
filters (``compile_aggregate``); a filter path ``context.<field>`` reads the event's
context instead of its properties (so an event property named ``context`` is out of reach
of filters). The vocabulary:

=========================  ==========================  =====================================
Event type                 Fact name                   Properties added to the event's own
=========================  ==========================  =====================================
track                      the event's name            —
page                       ``page_view``               ``url``, ``path``, ``title``,
                                                       ``referrer``, ``search`` (from
                                                       ``context.page``, when set)
screen                     ``screen_view``             —
identify                   ``identify``                —
cart_updated               ``cart_updated``            ``value``, ``item_count``, ``currency``
                           ``product_added`` per item  ``product_id``, ``name``, ``category``,
                           whose quantity rose         ``brand``, ``price``, ``quantity`` (the
                                                       rise), ``currency``
order_completed            ``order_completed``         ``order_id``, ``revenue``,
                                                       ``item_count``, ``currency``,
                                                       ``discount``, ``coupon``
                           ``product_purchased`` per   ``product_id``, ``name``, ``category``,
                           item                        ``brand``, ``price``, ``quantity``,
                                                       ``order_id``, ``currency``
campaign_interaction       ``campaign_interaction``    ``campaign_id``, ``channel`` (``email``
                                                       or ``ad``), ``action`` (``received``,
                                                       ``opened`` or ``clicked``),
                                                       ``creative_id``
account_update             ``account_updated``         —
=========================  ==========================  =====================================

Typed fields override an event property of the same name; empty strings are left out.
A product view for affinities is the track event ``product_view`` with ``category``,
``brand`` and ``product_id`` properties.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from google.protobuf.descriptor import EnumDescriptor

from audience.rules.values import AttrValue, attributes_from_proto, micros_from_timestamp
from audience.v1 import event_pb2

__all__ = [
    "CAMPAIGN_ACTION_LABELS",
    "CAMPAIGN_CHANNEL_LABELS",
    "CART_UPDATED",
    "CHANNEL_LABELS",
    "DEVICE_LABELS",
    "FACT_SOURCES",
    "ORDER_COMPLETED",
    "PRODUCT_ADDED",
    "PRODUCT_PURCHASED",
    "PRODUCT_VIEW",
    "WEATHER_LABELS",
    "Fact",
    "cart_value",
    "context_properties",
    "facts_from_event",
]

PRODUCT_VIEW = "product_view"
PRODUCT_ADDED = "product_added"
PRODUCT_PURCHASED = "product_purchased"
CART_UPDATED = "cart_updated"
ORDER_COMPLETED = "order_completed"
CAMPAIGN_INTERACTION = "campaign_interaction"

# The event whose arrival can produce a fact of each derived name (for dependency keys).
FACT_SOURCES: Mapping[str, str] = {
    PRODUCT_ADDED: CART_UPDATED,
    PRODUCT_PURCHASED: ORDER_COMPLETED,
}

# Plain ints: an enum wrapper's attribute lookup runs Python code on every access.
_TRACK = int(event_pb2.EVENT_TYPE_TRACK)
_PAGE = int(event_pb2.EVENT_TYPE_PAGE)
_CART = int(event_pb2.EVENT_TYPE_CART_UPDATED)
_ORDER = int(event_pb2.EVENT_TYPE_ORDER_COMPLETED)
_CAMPAIGN = int(event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION)
_FIXED_NAMES: Mapping[int, str] = {
    _PAGE: "page_view",
    int(event_pb2.EVENT_TYPE_SCREEN): "screen_view",
    int(event_pb2.EVENT_TYPE_IDENTIFY): "identify",
    _CART: CART_UPDATED,
    _ORDER: ORDER_COMPLETED,
    _CAMPAIGN: CAMPAIGN_INTERACTION,
    int(event_pb2.EVENT_TYPE_ACCOUNT_UPDATE): "account_updated",
}
_PAGE_FIELDS = ("url", "path", "title", "referrer", "search")


class Fact:
    """One countable thing that happened, at ``timestamp`` (microseconds since the epoch).

    ``context`` is the event's context as a map (see :func:`context_properties`), read by
    ``context.*`` paths. Few aggregates filter on it, so a fact made from an event builds it
    from the event's ``Context`` (``source``) only when first read.
    """

    __slots__ = ("_context", "_source", "name", "properties", "timestamp")

    def __init__(
        self,
        name: str,
        timestamp: int,
        properties: dict[str, AttrValue] | None = None,
        context: dict[str, AttrValue] | None = None,
        *,
        source: event_pb2.Context | None = None,
    ) -> None:
        self.name = name
        self.timestamp = timestamp
        self.properties: dict[str, AttrValue] = {} if properties is None else properties
        self._context = context
        self._source = source

    @property
    def context(self) -> dict[str, AttrValue]:
        found = self._context
        if found is None:
            found = {} if self._source is None else context_properties(self._source)
            self._context = found
        return found

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fact):
            return NotImplemented
        return (self.name, self.timestamp, self.properties, self.context) == (
            other.name,
            other.timestamp,
            other.properties,
            other.context,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Fact({self.name!r}, {self.timestamp}, {self.properties!r}, {self.context!r})"


def _labels(descriptor: EnumDescriptor, prefix: str) -> dict[int, str]:
    return {v.number: v.name.removeprefix(prefix).lower() for v in descriptor.values if v.number}


# Enum values read as lower-case labels without the prefix: CHANNEL_WEB is `web`.
CHANNEL_LABELS = _labels(event_pb2.Channel.DESCRIPTOR, "CHANNEL_")
WEATHER_LABELS = _labels(event_pb2.WeatherCondition.DESCRIPTOR, "WEATHER_CONDITION_")
DEVICE_LABELS = _labels(event_pb2.DeviceType.DESCRIPTOR, "DEVICE_TYPE_")
CAMPAIGN_CHANNEL_LABELS = _labels(event_pb2.CampaignChannel.DESCRIPTOR, "CAMPAIGN_CHANNEL_")
CAMPAIGN_ACTION_LABELS = _labels(event_pb2.CampaignAction.DESCRIPTOR, "CAMPAIGN_ACTION_")


def _put(target: dict[str, AttrValue], key: str, value: AttrValue) -> None:
    if value is not None and value != "":
        target[key] = value


def context_properties(context: event_pb2.Context) -> dict[str, AttrValue]:
    """The context as a map: ``page``, ``utm``, ``source``, ``channel``, ``location``,
    ``weather``, ``device``, ``session_id``, ``ip``, ``user_agent``, ``locale``.

    Enums read as lower-case labels (``web``, ``rain``, ``mobile``); unset fields are absent.
    """
    out: dict[str, AttrValue] = {}
    page: dict[str, AttrValue] = {}
    for key in ("url", "path", "title", "referrer", "search"):
        _put(page, key, getattr(context.page, key))
    if page:
        out["page"] = page
    utm: dict[str, AttrValue] = {}
    for key in ("source", "medium", "campaign", "term", "content"):
        _put(utm, key, getattr(context.utm, key))
    if utm:
        out["utm"] = utm
    _put(out, "source", context.source)
    _put(out, "channel", CHANNEL_LABELS.get(context.channel))
    location: dict[str, AttrValue] = {}
    for key in ("country", "region", "city", "postal_code", "time_zone"):
        _put(location, key, getattr(context.location, key))
    if context.location.HasField("point"):
        location["point"] = {
            "latitude": context.location.point.latitude,
            "longitude": context.location.point.longitude,
        }
    if location:
        out["location"] = location
    weather: dict[str, AttrValue] = {}
    _put(
        weather,
        "condition",
        WEATHER_LABELS.get(context.weather.condition),
    )
    if context.weather.HasField("temperature_celsius") and math.isfinite(
        context.weather.temperature_celsius
    ):
        weather["temperature_celsius"] = context.weather.temperature_celsius
    if weather:
        out["weather"] = weather
    device: dict[str, AttrValue] = {}
    _put(device, "type", DEVICE_LABELS.get(context.device.type))
    for key in ("os", "os_version", "browser", "browser_version", "model"):
        _put(device, key, getattr(context.device, key))
    if device:
        out["device"] = device
    for key in ("session_id", "ip", "user_agent", "locale"):
        _put(out, key, getattr(context, key))
    return out


def cart_value(cart: event_pb2.Cart) -> float:
    """The cart's value: as given, else the sum of ``price * quantity`` in item order."""
    if cart.HasField("value"):
        return cart.value
    total = 0.0
    for item in cart.items:
        total += item.price * item.quantity
    return total


def _quantities(cart: event_pb2.Cart | None) -> dict[str, int]:
    totals: dict[str, int] = {}
    if cart is not None:
        for item in cart.items:
            totals[item.product_id] = totals.get(item.product_id, 0) + item.quantity
    return totals


def _item_properties(item: event_pb2.CartItem, currency: str) -> dict[str, AttrValue]:
    props: dict[str, AttrValue] = {}
    _put(props, "product_id", item.product_id)
    _put(props, "name", item.name)
    _put(props, "category", item.category)
    _put(props, "brand", item.brand)
    props["price"] = item.price
    props["quantity"] = float(item.quantity)
    _put(props, "currency", currency)
    return props


def facts_from_event(event: event_pb2.Event, previous_cart: event_pb2.Cart | None) -> list[Fact]:
    """The facts an event yields, the event's own first.

    Args:
        event: an accepted event (ingest has set its timestamp).
        previous_cart: for a cart update, the visit's cart before it (``None`` for none); a
            ``product_added`` fact is made for each product whose quantity rose.

    Raises:
        ValueError: the event has no timestamp.
    """
    if event.HasField("timestamp"):
        timestamp = micros_from_timestamp(event.timestamp)
    elif event.HasField("received_at"):
        timestamp = micros_from_timestamp(event.received_at)
    else:
        raise ValueError(f"event {event.event_id!r} has no timestamp")
    kind = event.type
    name = event.name if kind == _TRACK else _FIXED_NAMES.get(kind)
    if not name:
        return []
    source = event.context
    props = attributes_from_proto(event.properties)
    if kind == _PAGE:
        page = source.page
        for key in _PAGE_FIELDS:
            value = getattr(page, key)
            if value:
                props[key] = value
        return [Fact(name, timestamp, props, source=source)]
    facts: list[Fact] = []
    if kind == _CART:
        cart = event.cart
        props["value"] = cart_value(cart)
        props["item_count"] = float(sum(item.quantity for item in cart.items))
        _put(props, "currency", cart.currency)
        before = _quantities(previous_cart)
        seen: set[str] = set()
        now = _quantities(cart)
        for item in cart.items:
            if item.product_id in seen:
                continue
            seen.add(item.product_id)
            rise = now[item.product_id] - before.get(item.product_id, 0)
            if rise > 0:
                added = _item_properties(item, cart.currency)
                added["quantity"] = float(rise)
                facts.append(Fact(PRODUCT_ADDED, timestamp, added, source=source))
    elif kind == _ORDER:
        order = event.order
        revenue = order.revenue if order.HasField("revenue") else None
        if revenue is None:
            revenue = 0.0
            for item in order.items:
                revenue += item.price * item.quantity
        _put(props, "order_id", order.order_id)
        props["revenue"] = revenue
        props["item_count"] = float(sum(item.quantity for item in order.items))
        _put(props, "currency", order.currency)
        props["discount"] = order.discount
        _put(props, "coupon", order.coupon)
        for item in order.items:
            bought = _item_properties(item, order.currency)
            _put(bought, "order_id", order.order_id)
            facts.append(Fact(PRODUCT_PURCHASED, timestamp, bought, source=source))
    elif kind == _CAMPAIGN:
        interaction = event.campaign_interaction
        _put(props, "campaign_id", interaction.campaign_id)
        _put(props, "channel", CAMPAIGN_CHANNEL_LABELS.get(interaction.channel))
        _put(props, "action", CAMPAIGN_ACTION_LABELS.get(interaction.action))
        _put(props, "creative_id", interaction.creative_id)
    return [Fact(name, timestamp, props, source=source), *facts]
