"""The fault test's workload: events and segment edits, all drawn from one seed.

Users (some first seen as anonymous visitors, merged when an event names both ids), many
of them in accounts; events of every type, shuffled across users and within each user,
some sent twice, most from clients whose clocks are hours off (each event carries the
client's ``sent_at``, so ingest corrects it). A share of the event times sit just inside
the 30-minute, 1-hour and 2-hour windows of the rules, so those windows close on them
while the test runs and the segment engine's timers move members with no event at all.

While events flow, a few users are erased (their later events must be suppressed) and a
few pairs of users are merged explicitly (their histories must survive as one).

The segments cover every kind of condition the engine evaluates differently: attributes,
session and context columns, windows (sliding, all time, "did not"), campaigns, days
since, random buckets, references to other segments (two levels), and account segments
with roll-ups over their users (one of them over a time-dependent user segment). Edits
happen while events flow: segments are created, changed (a new version, backfilled) and
deleted.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from audience.v1 import common_pb2, event_pb2, segment_pb2

__all__ = [
    "DATASET",
    "EDITS",
    "ERASE_AT",
    "INITIAL_SEGMENTS",
    "LONG",
    "MERGE_AT",
    "PARENT",
    "SHORT",
    "Edit",
    "PlannedEvent",
    "Scale",
    "SegmentSpec",
    "Workload",
    "flood_events",
    "plan_workload",
    "segment_name",
]

DATASET = "shop"
PARENT = f"datasets/{DATASET}"

_USER = segment_pb2.SEGMENT_KIND_USER
_ACCOUNT = segment_pb2.SEGMENT_KIND_ACCOUNT
_MINUTE = 60_000_000
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR


# The shares of the sends after which the erasures and the merges are made.
ERASE_AT = 0.45
MERGE_AT = 0.55


def segment_name(segment_id: str) -> str:
    return f"{PARENT}/segments/{segment_id}"


@dataclass(frozen=True)
class Scale:
    """How big a run is.

    Attributes:
        users: identified users (each may also have an anonymous visitor id).
        accounts: accounts the users are spread over.
        events_per_user: the range of events per user.
        send_seconds: the workload is paced to last about this long, so faults land
            throughout it.
        fault_rounds: passes through every kind of fault, at least.
        flood_events: the least events of each flood, sent by many clients at once as
            fast as ingest takes them; a flood goes on until ingest has pushed back for a
            while (``RESOURCE_EXHAUSTED``).
        floods: how many floods.
        senders: concurrent clients sending the workload.
    """

    name: str
    users: int
    accounts: int
    events_per_user: tuple[int, int]
    send_seconds: float
    fault_rounds: int
    flood_events: int
    floods: int
    senders: int
    profile_edits: int = 3
    """Users erased, and pairs of users merged, while the events flow."""
    anonymous_share: float = 0.35
    account_share: float = 0.6
    duplicate_share: float = 0.05


SHORT = Scale(
    "short",
    users=120,
    accounts=20,
    events_per_user=(4, 14),
    send_seconds=35.0,
    fault_rounds=1,
    flood_events=12_000,
    floods=1,
    senders=4,
)
LONG = Scale(
    "long",
    users=1_500,
    accounts=150,
    events_per_user=(5, 30),
    send_seconds=420.0,
    fault_rounds=4,
    flood_events=80_000,
    floods=2,
    senders=6,
    profile_edits=12,
)


@dataclass(frozen=True)
class SegmentSpec:
    segment_id: str
    kind: int
    rule_text: str


@dataclass(frozen=True)
class Edit:
    """A segment change made once ``at`` (a fraction) of the workload has been sent."""

    at: float
    action: str  # "create", "update" or "delete"
    spec: SegmentSpec


def _u(segment_id: str, rule: str) -> SegmentSpec:
    return SegmentSpec(segment_id, _USER, rule)


def _a(segment_id: str, rule: str) -> SegmentSpec:
    return SegmentSpec(segment_id, _ACCOUNT, rule)


def _ref(segment_id: str) -> str:
    return f'"{segment_name(segment_id)}"'


INITIAL_SEGMENTS: tuple[SegmentSpec, ...] = (
    _u("cheap-cart", "cart.value < 100"),
    _u("shoe-fans", 'count(event "product_view" where category = "shoes", all time) >= 3'),
    _u("recent-viewers", 'count(event "product_view", last 30 minutes) >= 1'),
    _u("big-spenders", "lifetime.value > 300 or lifetime.order_count >= 3"),
    _u("pro-us", 'attributes.plan = "pro" and location.country = "US"'),
    _u(
        "vip-shoes",
        f"in segment {_ref('big-spenders')} and in segment {_ref('shoe-fans')}",
    ),
    _u(
        "lapsed-buyers",
        'lifetime.order_count >= 1 and count(event "order_completed", last 1 hour) = 0',
    ),
    _u("email-clickers", "campaign(email, clicked, last 7 days) >= 1"),
    _u(
        "mobile-pricing",
        'device.type = "mobile"'
        ' and count(event "page_view" where context.page.path = "/pricing", last 2 hours) >= 1',
    ),
    _u("ab-engaged", 'random_bucket("exp") between 0 and 49 and session.page_views >= 2'),
    _u("new-faces", "days_since(first_seen) <= 1"),
    _u("not-vip-buyers", f"not in segment {_ref('vip-shoes')} and lifetime.order_count >= 1"),
    _a(
        "team-pricing",
        'count(users where count(event "page_view" where context.page.path = "/pricing",'
        " last 7 days) >= 1) >= 2",
    ),
    _a("gold-accounts", 'attributes.tier = "gold" and lifetime.value > 100'),
    _a("busy-accounts", f"count(users where in segment {_ref('recent-viewers')}) >= 1"),
)

EDITS: tuple[Edit, ...] = (
    Edit(
        0.3,
        "create",
        _u("wishlisters", 'count(event "add_to_wishlist", all time) >= 1 or attributes.age >= 40'),
    ),
    Edit(0.45, "update", _u("cheap-cart", "cart.value < 80 and cart.item_count >= 1")),
    Edit(
        0.6,
        "update",
        _u("shoe-fans", 'count(event "product_view" where category = "shoes", all time) >= 2'),
    ),
    Edit(0.7, "create", _a("ordering-accounts", "lifetime.order_count >= 2")),
    Edit(0.85, "delete", _u("ab-engaged", "")),
)


@dataclass
class PlannedEvent:
    """An event of the workload. Its times are set when it is first sent, as a client
    would: ``timestamp`` on the client's clock, ``sent_at`` from that clock at sending."""

    event: event_pb2.Event
    true_time: int
    skew: int | None
    stamped: event_pb2.Event | None = None

    @property
    def event_id(self) -> str:
        return self.event.event_id

    def stamp(self, now: int) -> event_pb2.Event:
        """The event as sent, the same on every later send (a retry resends its bytes)."""
        if self.stamped is None:
            stamped = event_pb2.Event()
            stamped.CopyFrom(self.event)
            if self.skew is None:
                _set_time(stamped.timestamp, self.true_time)
            else:
                _set_time(stamped.timestamp, self.true_time + self.skew)
                _set_time(stamped.sent_at, now + self.skew)
            self.stamped = stamped
        return self.stamped


@dataclass
class Workload:
    """What the driver sends: events in sending order (duplicates included) and the
    account updates' trait keys, by which the test checks that none was lost; and the
    profile edits made while they are sent."""

    events: list[PlannedEvent]
    unique_events: int
    users: int
    anonymous_visitors: int
    accounts: int
    account_markers: dict[str, set[str]] = field(default_factory=dict)
    erasures: list[str] = field(default_factory=list)
    """Users erased once ``ERASE_AT`` of the sends are done."""
    merges: list[tuple[str, str]] = field(default_factory=list)
    """(source, target) users merged once ``MERGE_AT`` of the sends are done."""

    def erased_events(self) -> set[str]:
        """The events that name a user to erase, or that user's visitor id: each may be
        gone, erased with the profile or suppressed after it, so the loss check passes
        them over. (One may also be kept: a visitor's event applied to a profile of its
        own before an identify linked the two, or any event when the profile did not
        exist yet at the erasure.)"""
        names = {*self.erasures, *(_visitor_of(user) for user in self.erasures)}
        return {
            planned.event_id
            for planned in self.events
            if planned.event.user_id in names or planned.event.anonymous_id in names
        }


def _set_time(target: timestamp_pb2.Timestamp, micros: int) -> None:
    target.seconds, remainder = divmod(micros, 1_000_000)
    target.nanos = remainder * 1000


def _string(value: str) -> common_pb2.Value:
    return common_pb2.Value(string_value=value)


def _number(value: float) -> common_pb2.Value:
    return common_pb2.Value(number_value=value)


_COUNTRIES = ("US", "FR", "DE", "GB")
_DEVICES = (
    event_pb2.DEVICE_TYPE_DESKTOP,
    event_pb2.DEVICE_TYPE_MOBILE,
    event_pb2.DEVICE_TYPE_TABLET,
)
_CATEGORIES = ("shoes", "hats", "bags")
_PATHS = ("/", "/pricing", "/docs", "/blog")
_KINDS = ("view", "page", "identify", "cart", "order", "campaign", "wishlist")
_KIND_WEIGHTS = (30, 22, 10, 14, 7, 10, 4)


def _event_time(rng: random.Random, now: int) -> int:
    """Mostly spread over three days; a share just inside the windows that the rules
    measure, so that they close during the run."""
    draw = rng.random()
    if draw < 0.45:
        return now - rng.randrange(_HOUR, 3 * _DAY)
    if draw < 0.65:
        return now - rng.randrange(27 * _MINUTE, 31 * _MINUTE)
    if draw < 0.75:
        return now - rng.randrange(57 * _MINUTE, 61 * _MINUTE)
    if draw < 0.82:
        return now - rng.randrange(117 * _MINUTE, 121 * _MINUTE)
    return now - rng.randrange(0, 10 * _MINUTE)


def _items(rng: random.Random, count: int) -> list[event_pb2.CartItem]:
    return [
        event_pb2.CartItem(
            product_id=f"sku-{rng.randrange(40)}",
            name="thing",
            category=rng.choice(_CATEGORIES),
            price=round(rng.uniform(5, 80), 2),
            quantity=rng.randint(1, 3),
        )
        for _ in range(count)
    ]


class _Planner:
    def __init__(self, rng: random.Random, scale: Scale, now: int) -> None:
        self.rng = rng
        self.scale = scale
        self.now = now
        self.serial = 0

    def next_id(self) -> str:
        self.serial += 1
        return f"e{self.serial:07d}"

    def context(self, country: str, device: event_pb2.DeviceType.ValueType) -> event_pb2.Context:
        rng = self.rng
        if rng.random() < 0.2:
            country = rng.choice(_COUNTRIES)
        if rng.random() < 0.2:
            device = rng.choice(_DEVICES)
        context = event_pb2.Context(
            location=event_pb2.Location(country=country, city=f"city-{rng.randrange(5)}"),
            device=event_pb2.Device(type=device, os="os"),
        )
        if rng.random() < 0.3:
            context.weather.condition = rng.choice(
                (event_pb2.WEATHER_CONDITION_CLEAR, event_pb2.WEATHER_CONDITION_RAIN)
            )
            context.weather.temperature_celsius = round(rng.uniform(-5, 30), 1)
        return context

    def body(self, kind: str, event: event_pb2.Event) -> None:
        rng = self.rng
        if kind == "view":
            event.type = event_pb2.EVENT_TYPE_TRACK
            event.name = "product_view"
            event.properties["category"].CopyFrom(_string(rng.choice(_CATEGORIES)))
            event.properties["price"].CopyFrom(_number(round(rng.uniform(5, 200), 2)))
            event.properties["product_id"].CopyFrom(_string(f"sku-{rng.randrange(40)}"))
        elif kind == "page":
            event.type = event_pb2.EVENT_TYPE_PAGE
            path = rng.choice(_PATHS)
            event.context.page.path = path
            event.context.page.url = f"https://shop.example{path}"
        elif kind == "identify":
            event.type = event_pb2.EVENT_TYPE_IDENTIFY
            traits = event.identify.traits
            traits["plan"].CopyFrom(_string(rng.choice(("free", "pro"))))
            traits["age"].CopyFrom(_number(rng.randint(18, 70)))
        elif kind == "cart":
            event.type = event_pb2.EVENT_TYPE_CART_UPDATED
            event.cart.currency = "USD"
            event.cart.items.extend(_items(rng, rng.randint(0, 4)))
        elif kind == "order":
            event.type = event_pb2.EVENT_TYPE_ORDER_COMPLETED
            event.order.order_id = f"o-{event.event_id}"
            event.order.currency = "USD"
            event.order.items.extend(_items(rng, rng.randint(1, 3)))
            if rng.random() < 0.5:
                event.order.revenue = round(rng.uniform(20, 250), 2)
        elif kind == "campaign":
            event.type = event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION
            interaction = event.campaign_interaction
            interaction.campaign_id = rng.choice(("spring", "summer"))
            interaction.channel = rng.choice(
                (event_pb2.CAMPAIGN_CHANNEL_EMAIL, event_pb2.CAMPAIGN_CHANNEL_AD)
            )
            interaction.action = rng.choice(
                (
                    event_pb2.CAMPAIGN_ACTION_RECEIVED,
                    event_pb2.CAMPAIGN_ACTION_OPENED,
                    event_pb2.CAMPAIGN_ACTION_CLICKED,
                )
            )
        else:
            event.type = event_pb2.EVENT_TYPE_TRACK
            event.name = "add_to_wishlist"
            event.properties["product_id"].CopyFrom(_string(f"sku-{rng.randrange(40)}"))

    def user(self, index: int, account: str | None) -> tuple[list[PlannedEvent], bool]:
        rng = self.rng
        user_id = _user_id(index)
        anonymous = _visitor_of(user_id) if rng.random() < self.scale.anonymous_share else None
        skew = rng.randrange(-3 * _HOUR, 3 * _HOUR) if rng.random() < 0.7 else None
        country = rng.choice(_COUNTRIES)
        device = rng.choice(_DEVICES)
        count = rng.randint(*self.scale.events_per_user)
        planned: list[PlannedEvent] = []
        for position in range(count):
            kind = rng.choices(_KINDS, _KIND_WEIGHTS)[0]
            event = event_pb2.Event(event_id=self.next_id())
            self.body(kind, event)
            event.context.MergeFrom(self.context(country, device))
            if anonymous is not None and position == 0:
                # The link: an identify naming both ids merges the visitor into the user.
                event.Clear()
                event.event_id = self.next_id()
                self.body("identify", event)
                event.user_id = user_id
                event.anonymous_id = anonymous
            elif anonymous is not None and rng.random() < 0.4:
                event.anonymous_id = anonymous
            else:
                event.user_id = user_id
                if account is not None and rng.random() < 0.5:
                    event.account_id = account
            planned.append(PlannedEvent(event, _event_time(rng, self.now), skew))
        if account is not None and not any(p.event.account_id for p in planned):
            planned[-1].event.account_id = account
            if not planned[-1].event.user_id:
                planned[-1].event.user_id = user_id
                planned[-1].event.ClearField("anonymous_id")
        return planned, anonymous is not None

    def account_update(self, account: str, markers: set[str]) -> PlannedEvent:
        rng = self.rng
        event = event_pb2.Event(
            event_id=self.next_id(), type=event_pb2.EVENT_TYPE_ACCOUNT_UPDATE, account_id=account
        )
        traits = event.account_update.traits
        traits["tier"].CopyFrom(_string(rng.choice(("gold", "silver"))))
        traits["employees"].CopyFrom(_number(rng.randint(1, 500)))
        # Each update also sets a trait of its own: the account's attributes then show
        # that every acknowledged update was applied (updates have no history to list).
        marker = f"update_{event.event_id}"
        traits[marker].CopyFrom(common_pb2.Value(bool_value=True))
        markers.add(marker)
        return PlannedEvent(event, self.now - rng.randrange(0, 2 * _DAY), None)


def _user_id(index: int) -> str:
    return f"u{index:05d}"


def _visitor_of(user_id: str) -> str:
    return "a" + user_id[1:]


def plan_workload(seed: int, scale: Scale, now: int) -> Workload:
    """The events to send, in sending order, for ``seed`` at ``scale``; ``now`` in µs."""
    rng = random.Random(seed)
    planner = _Planner(rng, scale, now)
    accounts = [f"acct{index:03d}" for index in range(scale.accounts)]
    events: list[PlannedEvent] = []
    anonymous = 0
    for index in range(scale.users):
        account = rng.choice(accounts) if rng.random() < scale.account_share else None
        planned, has_visitor = planner.user(index, account)
        anonymous += has_visitor
        events.extend(planned)
    markers: dict[str, set[str]] = {}
    for account in accounts:
        for _ in range(rng.randint(1, 3)):
            events.append(planner.account_update(account, markers.setdefault(account, set())))
    unique = len(events)
    rng.shuffle(events)
    for original in rng.sample(events, round(unique * scale.duplicate_share)):
        events.insert(rng.randrange(len(events) + 1), original)
    # Drawn apart from the events, so a seed sends what it sent before these edits.
    edited = random.Random(seed * 31 + 7).sample(range(scale.users), 3 * scale.profile_edits)
    users = [_user_id(index) for index in edited]
    edits = scale.profile_edits
    return Workload(
        events,
        unique,
        scale.users,
        anonymous,
        len(accounts),
        markers,
        erasures=users[:edits],
        merges=list(zip(users[edits : 2 * edits], users[2 * edits :], strict=True)),
    )


def flood_events(round_index: int, profiles: int) -> Iterator[event_pb2.Event]:
    """Small events for the flood, without end, over ``profiles`` users of their own; no
    timestamp, so ingest stamps them with their receipt time."""
    for index in itertools.count():
        event = event_pb2.Event(
            event_id=f"flood{round_index}-{index:07d}",
            type=event_pb2.EVENT_TYPE_TRACK,
            name="flood_ping",
            user_id=f"f{index % profiles:05d}",
        )
        event.properties["n"].CopyFrom(_number(index))
        yield event
