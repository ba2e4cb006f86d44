"""Builders shared by the profile service's tests: events, batches and decoded changes."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2

from audience.bus.v1 import events_pb2, profile_change_pb2
from audience.rules.values import AttrValue, timestamp_from_micros, value_to_proto
from audience.v1 import common_pb2, event_pb2, profile_pb2, rule_pb2

E = event_pb2.EventType
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
_ids = itertools.count(1)


def micros(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


def event(
    *,
    user: str = "",
    anon: str = "",
    account: str = "",
    kind: int = E.EVENT_TYPE_TRACK,
    name: str = "",
    at: datetime = T0,
    event_id: str = "",
    properties: Mapping[str, AttrValue] | None = None,
    traits: Mapping[str, AttrValue] | None = None,
    identities: Iterable[tuple[str, str]] = (),
    path: str = "",
    referrer: str = "",
    source: str = "",
    session_id: str = "",
    country: str = "",
    cart: Iterable[tuple[str, float, int]] = (),
    order: Iterable[tuple[str, float, int]] | None = None,
    account_traits: Mapping[str, AttrValue] | None = None,
) -> event_pb2.Event:
    """An accepted event; ``cart``/``order`` items are ``(product_id, price, quantity)``."""
    fixed: dict[int, str] = {
        E.EVENT_TYPE_PAGE: "page_view",
        E.EVENT_TYPE_SCREEN: "screen_view",
        E.EVENT_TYPE_IDENTIFY: "identify",
        E.EVENT_TYPE_CART_UPDATED: "cart_updated",
        E.EVENT_TYPE_ORDER_COMPLETED: "order_completed",
        E.EVENT_TYPE_CAMPAIGN_INTERACTION: "campaign_interaction",
        E.EVENT_TYPE_ACCOUNT_UPDATE: "account_updated",
    }
    message = event_pb2.Event(
        event_id=event_id or f"e{next(_ids)}",
        type=kind,  # type: ignore[arg-type]
        name=name or fixed.get(kind, ""),
        user_id=user,
        anonymous_id=anon,
        account_id=account,
        timestamp=timestamp_from_micros(micros(at)),
        received_at=timestamp_from_micros(micros(at)),
    )
    for key, value in (properties or {}).items():
        message.properties[key].CopyFrom(value_to_proto(value))
    context = message.context
    if path or referrer:
        context.page.path = path
        context.page.referrer = referrer
    if source:
        context.source = source
    if session_id:
        context.session_id = session_id
    if country:
        context.location.country = country
    if kind == E.EVENT_TYPE_IDENTIFY:
        for key, value in (traits or {}).items():
            message.identify.traits[key].CopyFrom(value_to_proto(value))
        message.identify.identities.extend(
            common_pb2.Identity(type=t, value=v) for t, v in identities
        )
    if kind == E.EVENT_TYPE_CART_UPDATED:
        message.cart.currency = "USD"
        for product, price, quantity in cart:
            message.cart.items.add(product_id=product, price=price, quantity=quantity)
    if kind == E.EVENT_TYPE_ORDER_COMPLETED:
        message.order.order_id = f"o-{message.event_id}"
        for product, price, quantity in order or ():
            message.order.items.add(product_id=product, price=price, quantity=quantity)
    if kind == E.EVENT_TYPE_ACCOUNT_UPDATE:
        for key, value in (account_traits or {}).items():
            message.account_update.traits[key].CopyFrom(value_to_proto(value))
    return message


def batch(dataset: str, events: Iterable[event_pb2.Event]) -> bytes:
    return events_pb2.EventBatch(
        events=[events_pb2.IngestedEvent(dataset=dataset, event=e) for e in events]
    ).SerializeToString()


def changes(payloads: Iterable[bytes]) -> list[profile_change_pb2.ProfileChange]:
    return [
        change
        for payload in payloads
        for change in profile_change_pb2.ProfileChangeBatch.FromString(payload).changes
    ]


def count_spec(
    event_name: str,
    *,
    width: timedelta = timedelta(0),
    retention: timedelta = timedelta(0),
    function: int = rule_pb2.AGGREGATE_FUNCTION_COUNT,
    prop: str = "",
    equals: tuple[str, AttrValue] | None = None,
) -> profile_pb2.AggregateSpec:
    spec = profile_pb2.AggregateSpec(
        event_name=event_name,
        function=function,  # type: ignore[arg-type]
        property=prop,
        bucket_width=duration_pb2.Duration(seconds=int(width.total_seconds())),
        retention=duration_pb2.Duration(seconds=int(retention.total_seconds())),
    )
    if equals is not None:
        spec.filters.add(
            path=equals[0],
            comparison=rule_pb2.Comparison(
                operator=rule_pb2.OPERATOR_EQUALS, value=value_to_proto(equals[1])
            ),
        )
    return spec
