"""Applying one event to a profile or an account: visits, attributes, lifetime, aggregates.

**Visits.** A visit is what the person does on a site or in an app: every event but
campaign interactions and account updates. A new visit starts with the first such event,
after ``session_timeout`` without one, or when the event carries a client session id other
than the current visit's. An event older than the current visit's start (a late arrival)
leaves the visit alone. A visit takes its landing page from its first page view with a
path, and its source (``context.source``, else ``utm.source``, else the referrer's host),
referrer, UTM parameters and channel from its first event that has them. Its cart is the
last ``cart_updated`` one, emptied by ``order_completed``.

**Seen.** First and last seen move with every event but a campaign *received* (the person
did nothing) and an account update. The last context is the latest such event's, keeping
the place, weather and device of earlier events when the latest lacks them.

**Changed keys** follow ``ProfileChange.changed_keys``: ``session`` is reported when a
field a rule can read changed (not for the last-activity time alone), ``context`` when the
place, weather or device changed, ``attribute:{name}`` when a value actually changed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from google.protobuf.message import Message

from audience.rules.facts import Fact, cart_value, facts_from_event
from audience.rules.values import (
    AttrValue,
    micros_from_timestamp,
    timestamp_from_micros,
    value_from_proto,
)
from audience.v1 import common_pb2, event_pb2, profile_pb2
from services.profile.domain.aggregates import AggregateIndex, count_facts, prune
from services.profile.domain.model import AccountState, ProfileState, Touch, encoded_context

__all__ = [
    "Settings",
    "apply_account_event",
    "apply_event",
    "event_name",
    "event_time",
    "finish",
    "session_id_for",
    "update_traits",
]

# Plain ints: an enum wrapper's attribute lookup runs Python code on every access.
_TRACK = int(event_pb2.EVENT_TYPE_TRACK)
_PAGE = int(event_pb2.EVENT_TYPE_PAGE)
_SCREEN = int(event_pb2.EVENT_TYPE_SCREEN)
_IDENTIFY = int(event_pb2.EVENT_TYPE_IDENTIFY)
_CART_UPDATED = int(event_pb2.EVENT_TYPE_CART_UPDATED)
_ORDER_COMPLETED = int(event_pb2.EVENT_TYPE_ORDER_COMPLETED)
_CAMPAIGN_INTERACTION = int(event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION)
_ACCOUNT_UPDATE = int(event_pb2.EVENT_TYPE_ACCOUNT_UPDATE)
_RECEIVED = int(event_pb2.CAMPAIGN_ACTION_RECEIVED)


@dataclass(frozen=True, slots=True)
class Settings:
    """How events become visits: ``session_timeout`` in microseconds."""

    session_timeout: int


_FIXED_NAMES = {
    _PAGE: "page_view",
    _SCREEN: "screen_view",
    _IDENTIFY: "identify",
    _CART_UPDATED: "cart_updated",
    _ORDER_COMPLETED: "order_completed",
    _CAMPAIGN_INTERACTION: "campaign_interaction",
    _ACCOUNT_UPDATE: "account_updated",
}


def event_name(event: event_pb2.Event) -> str:
    """The event's name: its own for a track event, the type's fixed one otherwise."""
    if event.type == _TRACK:
        return event.name
    return _FIXED_NAMES.get(event.type, event.name)


def event_time(event: event_pb2.Event) -> int:
    """When the event happened: its timestamp, else when ingest received it.

    Raises:
        ValueError: the event has neither.
    """
    if event.HasField("timestamp"):
        return micros_from_timestamp(event.timestamp)
    if event.HasField("received_at"):
        return micros_from_timestamp(event.received_at)
    raise ValueError(f"event {event.event_id!r} has neither timestamp nor received_at")


def session_id_for(profile_id: str, start: int) -> str:
    """The id of a visit the client did not name: the same whenever it is recomputed."""
    digest = hashlib.blake2b(f"{profile_id}\x00{start}".encode(), digest_size=10).hexdigest()
    return f"v-{digest}"


def _is_visit(event: event_pb2.Event) -> bool:
    kind = event.type
    return kind != _CAMPAIGN_INTERACTION and kind != _ACCOUNT_UPDATE


def _is_seen(event: event_pb2.Event) -> bool:
    kind = event.type
    if kind == _ACCOUNT_UPDATE:
        return False
    return not (kind == _CAMPAIGN_INTERACTION and event.campaign_interaction.action == _RECEIVED)


def _source(context: event_pb2.Context) -> str:
    if context.source:
        return context.source
    if context.utm.source:
        return context.utm.source
    referrer = context.page.referrer
    if referrer:
        try:
            return urlsplit(referrer).hostname or ""
        except ValueError:
            return ""
    return ""


def _visit(
    state: ProfileState,
    event: event_pb2.Event,
    moment: int,
    settings: Settings,
    touch: Touch,
) -> event_pb2.Cart | None:
    """Moves the visit on; returns the visit's cart as it was before the event."""
    session = state.session
    context = event.context
    client_id = context.session_id
    previous: event_pb2.Cart | None = None
    if session is not None:
        if moment < micros_from_timestamp(session.start_time):
            return None
        last = micros_from_timestamp(session.last_activity_time)
        if (client_id and client_id != session.session_id) or (
            moment - last > settings.session_timeout
        ):
            session = None
        else:
            if moment > last:
                session.last_activity_time.CopyFrom(timestamp_from_micros(moment))
            if session.HasField("cart"):
                previous = session.cart
    changed = False
    if session is None:
        state.visit_count += 1
        session = profile_pb2.Session(
            session_id=client_id or session_id_for(state.profile_id, moment),
            start_time=timestamp_from_micros(moment),
            last_activity_time=timestamp_from_micros(moment),
            visit_number=state.visit_count,
        )
        state.session = session
        changed = True
    kind = event.type
    if kind in (_PAGE, _SCREEN):
        session.page_view_count += 1
        changed = True
        if not session.landing_page and context.page.path:
            session.landing_page = context.page.path
    if not session.source:
        source = _source(context)
        if source:
            session.source = source
            changed = True
    if not session.referrer and context.page.referrer:
        session.referrer = context.page.referrer
        changed = True
    if not session.HasField("utm") and context.HasField("utm") and context.utm.ByteSize():
        session.utm.CopyFrom(context.utm)
        changed = True
    if not session.channel and context.channel:
        session.channel = context.channel
        changed = True
    if kind == _CART_UPDATED:
        if previous is not None:
            # The fact builder reads the old cart after it is replaced here.
            previous = event_pb2.Cart.FromString(previous.SerializeToString())
        session.cart.CopyFrom(event.cart)
        if not event.cart.HasField("value"):
            session.cart.value = cart_value(event.cart)
        changed = True
    elif kind == _ORDER_COMPLETED and session.HasField("cart"):
        session.ClearField("cart")
        changed = True
    if changed:
        touch.keys.add("session")
    return previous


_PLACE: tuple[Literal["location", "weather", "device"], ...] = ("location", "weather", "device")


def _update_context(state: ProfileState, context: event_pb2.Context, touch: Touch) -> None:
    raw = context.SerializeToString(deterministic=True)
    before = state.context
    if before is not None and raw == encoded_context(state):
        # The latest context again (the same visitor on the same device, most of the time).
        return
    # A copy with its own memory: a part of the event would keep the whole batch alive.
    merged = event_pb2.Context.FromString(raw)
    if before is None:
        moved = any(merged.HasField(name) for name in _PLACE)
    else:
        moved = False
        for name in _PLACE:
            if merged.HasField(name):
                moved = (
                    moved
                    or not before.HasField(name)
                    or _encoded(before, name)
                    != (getattr(merged, name).SerializeToString(deterministic=True))
                )
            elif before.HasField(name):
                getattr(merged, name).CopyFrom(getattr(before, name))
    if moved:
        touch.keys.add("context")
    encoded = merged.SerializeToString(deterministic=True)
    if before is None or encoded != encoded_context(state):
        state.context = merged
        state.context_memo = (merged, encoded)
        touch.row = True


def _encoded(context: event_pb2.Context, name: str) -> bytes:
    part: Message = getattr(context, name)
    return part.SerializeToString(deterministic=True)


def update_traits(
    attributes: dict[str, AttrValue], traits: Mapping[str, common_pb2.Value], touch: Touch
) -> bool:
    """Sets traits on attributes (a null removes one); returns whether any changed."""
    changed = False
    for name, proto in traits.items():
        value = value_from_proto(proto)
        if value is None:
            if name in attributes:
                del attributes[name]
                touch.keys.add(f"attribute:{name}")
                changed = True
        elif name not in attributes or not _same(attributes[name], value):
            attributes[name] = value
            touch.keys.add(f"attribute:{name}")
            changed = True
    return changed


def _same(a: AttrValue, b: AttrValue) -> bool:
    # Typed: True == 1.0 in Python, but a boolean attribute is not a number.
    return type(a) is type(b) and a == b


def _seen(state: ProfileState | AccountState, moment: int, touch: Touch) -> bool:
    """Moves first/last seen; returns whether ``moment`` is the latest seen."""
    latest = state.last_seen is None or moment >= state.last_seen
    if state.first_seen is None or moment < state.first_seen:
        state.first_seen = moment
        touch.keys.add("seen")
    if state.last_seen is None or moment > state.last_seen:
        state.last_seen = moment
        touch.keys.add("seen")
    return latest


def apply_event(
    state: ProfileState,
    event: event_pb2.Event,
    index: AggregateIndex | None,
    settings: Settings,
    touch: Touch,
    now: int,
) -> list[Fact]:
    """Applies one new event to a profile; returns the facts it yielded.

    Args:
        index: the dataset's aggregates; ``None`` when it has none.
        now: the wall-clock instant, against which aggregate retention is measured. Call
            :func:`finish` once the unit of work is done with the profile.

    Raises:
        ValueError: the event cannot be applied (it has no time).
    """
    moment = event_time(event)
    previous_cart: event_pb2.Cart | None = None
    if _is_visit(event):
        previous_cart = _visit(state, event, moment, settings, touch)
    facts = facts_from_event(event, previous_cart)
    if _is_seen(event) and _seen(state, moment, touch):
        _update_context(state, event.context, touch)
    kind = event.type
    if kind == _ORDER_COMPLETED and facts:
        revenue = facts[0].properties.get("revenue")
        state.order_count += 1
        if isinstance(revenue, float) and math.isfinite(revenue):
            state.lifetime_value += revenue
        touch.keys.add("lifetime")
    elif kind == _IDENTIFY and update_traits(state.attributes, event.identify.traits, touch):
        state.attributes_encoded = None
    if event.account_id and event.account_id != state.account_id:
        state.account_id = event.account_id
        touch.keys.add("account")
    state.event_count += 1
    touch.keys.add(f"event:{event_name(event)}")
    touch.event_ids.append(event.event_id)
    touch.row = True
    if index is not None and facts:
        count_facts(state, facts, index, touch, now)
    return facts


def finish(state: ProfileState, index: AggregateIndex | None, touch: Touch, now: int) -> None:
    """Ends a unit of work on a profile: drops the buckets that expired, if any did."""
    if index is not None and state.expire is not None and state.expire < now:
        prune(state, index, touch, now)


def apply_account_event(account: AccountState, event: event_pb2.Event, touch: Touch) -> None:
    """Applies an account update to its account."""
    moment = event_time(event)
    _seen(account, moment, touch)
    if event.type == _ACCOUNT_UPDATE and update_traits(
        account.attributes, event.account_update.traits, touch
    ):
        account.attributes_encoded = None
    touch.event_ids.append(event.event_id)
    touch.keys.add(f"event:{event_name(event)}")
    touch.row = True
