"""The whole pipeline over gRPC: events into ingest, profiles built by the profile service,
memberships and the change stream from the segment engine."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc.aio
import pytest

from audience import rules
from audience.v1 import (
    common_pb2,
    event_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_pb2,
    membership_service_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
)
from services.ingest.app import DEFINITION as INGEST
from services.profile.app import DEFINITION as PROFILE
from services.segment_engine.app import DEFINITION as SEGMENT_ENGINE
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset
from tests.e2e.segment_engine.harness import Clients, now_micros

pytestmark = pytest.mark.e2e

JOIN = membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN
LEAVE = membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE

FAST = {
    "AUDIENCE_SEGMENT_ENGINE_TIMER_INTERVAL": "50ms",
    "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "50ms",
}


@dataclass
class Pipeline:
    suite: RunningSuite
    clients: Clients
    ingest: ingest_service_pb2_grpc.IngestServiceStub
    profiles: profile_service_pb2_grpc.ProfileServiceStub
    dataset: str

    async def send(self, *events: event_pb2.Event) -> list[str]:
        response = await self.ingest.SendEvents(
            ingest_service_pb2.SendEventsRequest(
                parent=f"datasets/{self.dataset}", events=list(events)
            ),
            timeout=10,
        )
        for result in response.results:
            assert result.status in (
                ingest_service_pb2.EVENT_STATUS_ACCEPTED,
                ingest_service_pb2.EVENT_STATUS_DUPLICATE,
            ), result
        return [event.event_id for event in events]


@contextlib.asynccontextmanager
async def pipeline(start_suite: StartSuite) -> AsyncIterator[Pipeline]:
    async with start_suite([INGEST, PROFILE, SEGMENT_ENGINE], FAST) as suite:
        yield Pipeline(
            suite,
            Clients(suite.channel),
            ingest_service_pb2_grpc.IngestServiceStub(suite.channel),
            profile_service_pb2_grpc.ProfileServiceStub(suite.channel),
            new_dataset(),
        )


def _stamp(micros: int) -> Any:
    return rules.timestamp_from_micros(micros)


def _event(user: str, **fields: Any) -> event_pb2.Event:
    now = now_micros()
    at = fields.pop("at", now)
    event = event_pb2.Event(
        event_id=fields.pop("event_id", uuid.uuid4().hex),
        user_id=user,
        timestamp=_stamp(at),
        sent_at=_stamp(now),
        **fields,
    )
    event.context.session_id = "visit-1"
    return event


def _cart(user: str, *prices: float) -> event_pb2.Event:
    return _event(
        user,
        type=event_pb2.EVENT_TYPE_CART_UPDATED,
        cart=event_pb2.Cart(
            items=[
                event_pb2.CartItem(product_id=f"sku-{n}", price=price, quantity=1)
                for n, price in enumerate(prices)
            ],
            currency="USD",
        ),
    )


class Watcher:
    def __init__(self, p: Pipeline) -> None:
        self.changes: list[membership_pb2.MembershipChange] = []
        self._call = p.clients.memberships.WatchMembershipChanges(
            membership_service_pb2.WatchMembershipChangesRequest(parent=f"datasets/{p.dataset}")
        )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for item in self._call:
                if item.HasField("change"):
                    self.changes.append(item.change)

    async def until(
        self, count: int, within: float = 15.0
    ) -> list[membership_pb2.MembershipChange]:
        deadline = time.monotonic() + within
        while len(self.changes) < count:
            assert time.monotonic() < deadline, self.changes
            await asyncio.sleep(0.01)
        return self.changes

    async def stop(self) -> None:
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_the_cart_under_100_example_end_to_end(start_suite: StartSuite) -> None:
    async with pipeline(start_suite) as p:
        segment = await p.clients.create(p.dataset, "cart-under-100", "cart.value < 100")
        await p.clients.wait_active(segment.name)
        watcher = Watcher(p)
        await asyncio.sleep(0.3)
        (first,) = await p.send(_cart("shopper", 25.0, 15.0))
        (join,) = await watcher.until(1)
        (second,) = await p.send(_cart("shopper", 25.0, 15.0, 70.0))
        _, leave = await watcher.until(2)
        await watcher.stop()

    member = f"datasets/{p.dataset}/profiles/shopper"
    assert (join.member, join.kind, join.segment) == (member, JOIN, segment.name)
    assert (leave.member, leave.kind, leave.segment) == (member, LEAVE, segment.name)
    assert list(join.reason.event_ids) == [first]
    assert list(leave.reason.event_ids) == [second]
    assert join.reason.cause == leave.reason.cause == membership_pb2.CHANGE_CAUSE_EVENT
    assert join.reason.flipped_clauses[0].observed.number_value == 40
    assert leave.reason.flipped_clauses[0].observed.number_value == 110


async def test_a_person_erased_then_released_is_segmented_again_when_they_come_back(
    start_suite: StartSuite,
) -> None:
    async with pipeline(start_suite) as p:
        segment = await p.clients.create(p.dataset, "browsing", "cart.value < 100")
        await p.clients.wait_active(segment.name)
        watcher = Watcher(p)
        await asyncio.sleep(0.3)
        # Enough changes that the first life's sequence is well above the second's start.
        for count in range(1, 6):
            await p.send(_cart("returning", *([10.0] * count)))
        await p.clients.eventually_segments(p.dataset, "returning", {"browsing"})
        name = f"datasets/{p.dataset}/profiles/returning"
        await p.profiles.EraseProfile(profile_service_pb2.EraseProfileRequest(name=name))
        await p.clients.eventually_segments(p.dataset, "returning", set())
        await p.profiles.ReleaseErasedIdentities(
            profile_service_pb2.ReleaseErasedIdentitiesRequest(
                parent=f"datasets/{p.dataset}",
                identities=[common_pb2.Identity(type="user_id", value="returning")],
            )
        )
        (back,) = await p.send(_cart("returning", 30.0))
        changes = await watcher.until(3)
        await watcher.stop()

    assert [(c.kind, c.reason.cause) for c in changes] == [
        (JOIN, membership_pb2.CHANGE_CAUSE_EVENT),
        (LEAVE, membership_pb2.CHANGE_CAUSE_ERASURE),
        (JOIN, membership_pb2.CHANGE_CAUSE_EVENT),
    ]
    assert list(changes[2].reason.event_ids) == [back]


async def test_a_window_rule_leaves_with_no_event_end_to_end(start_suite: StartSuite) -> None:
    async with pipeline(start_suite) as p:
        segment = await p.clients.create(
            p.dataset, "recent-viewers", 'count(event "product_view", last 1 minute) >= 1'
        )
        await p.clients.wait_active(segment.name)
        watcher = Watcher(p)
        await asyncio.sleep(0.3)
        await p.send(
            _event(
                "viewer",
                type=event_pb2.EVENT_TYPE_TRACK,
                name="product_view",
                at=now_micros() - 57_500_000,
            )
        )
        join, leave = await watcher.until(2, within=20)
        await watcher.stop()
    assert (join.kind, leave.kind) == (JOIN, LEAVE)
    assert leave.reason.cause == membership_pb2.CHANGE_CAUSE_TIME


RULES = {
    "pro": 'attributes.plan = "pro"',
    "big-cart": "cart.value >= 60",
    "shoppers": 'count(event "cart_updated", all time) >= 2',
    "pro-shoppers": 'in segment "datasets/{d}/segments/pro" and'
    ' in segment "datasets/{d}/segments/shoppers"',
    "not-pro": 'not in segment "datasets/{d}/segments/pro"',
    # Two families of thresholds on one value, which the engine decides by binary search.
    "cart-20": "cart.value >= 20",
    "cart-40": "cart.value >= 40",
    "cart-100": "cart.value >= 100",
    "under-30": "cart.value < 30",
    "under-50": "cart.value < 50",
    "under-90": "cart.value < 90",
    "under-120": "cart.value < 120",
    "cheap-pro": 'in segment "datasets/{d}/segments/under-50" and'
    ' in segment "datasets/{d}/segments/pro"',
}


def _random_events(rng: random.Random, users: int, count: int) -> list[event_pb2.Event]:
    events: list[event_pb2.Event] = []
    base = now_micros() - 3_600_000_000
    for n in range(count):
        user = f"u{rng.randrange(users)}"
        at = base + n * 1_000_000
        kind = rng.random()
        if kind < 0.4:
            event = _cart(user, *(float(rng.randrange(5, 50)) for _ in range(rng.randint(0, 3))))
            event.timestamp.CopyFrom(_stamp(at))
        elif kind < 0.7:
            event = _event(user, type=event_pb2.EVENT_TYPE_IDENTIFY, at=at)
            event.identify.traits["plan"].CopyFrom(
                common_pb2.Value(string_value=rng.choice(["pro", "free"]))
            )
        else:
            event = _event(user, type=event_pb2.EVENT_TYPE_TRACK, name="page_view", at=at)
        events.append(event)
    return events


async def _drained(p: Pipeline) -> None:
    bus = p.suite.resources.bus
    deadline = time.monotonic() + 60
    while await bus.backlog("events", "profile") or await bus.backlog(
        "profile-changes", "segment_engine"
    ):
        assert time.monotonic() < deadline, "the pipeline did not drain"
        await asyncio.sleep(0.1)


async def _members(p: Pipeline, name: str) -> set[str]:
    found: set[str] = set()
    token = ""
    while True:
        response = await p.clients.memberships.ListSegmentMembers(
            membership_service_pb2.ListSegmentMembersRequest(
                parent=name, page_size=10_000, page_token=token
            )
        )
        found.update(m.member.rsplit("/", 1)[1] for m in response.memberships)
        token = response.next_page_token
        if not token:
            return found


async def _from_scratch(p: Pipeline, name: str) -> set[str]:
    """The rule evaluated by the profile service over the final profiles."""
    segment = (
        await p.clients.segments.GetSegment(segment_service_pb2.GetSegmentRequest(name=name))
    ).segment
    referenced = []
    for other in RULES:
        other_name = f"datasets/{p.dataset}/segments/{other}"
        if other_name in segment.rule_text:
            got = (
                await p.clients.segments.GetSegment(
                    segment_service_pb2.GetSegmentRequest(name=other_name)
                )
            ).segment
            referenced.append(
                profile_service_pb2.ReferencedSegment(segment=other_name, rule=got.rule)
            )
    found: set[str] = set()
    async for response in p.profiles.QueryProfiles(
        profile_service_pb2.QueryProfilesRequest(
            parent=f"datasets/{p.dataset}",
            kind=segment_pb2.SEGMENT_KIND_USER,
            rule=segment.rule,
            referenced_segments=referenced,
        )
    ):
        found.update(response.profile_ids)
    return found


async def test_a_shuffled_duplicated_event_stream_ends_in_from_scratch_memberships(
    start_suite: StartSuite,
) -> None:
    rng = random.Random(5)
    async with pipeline(start_suite) as p:
        names = {}
        early = ["pro", "big-cart", "pro-shoppers", "shoppers"]
        early += [segment_id for segment_id in RULES if segment_id.startswith(("cart", "under"))]
        for segment_id in early:
            rule = RULES[segment_id].format(d=p.dataset)
            if segment_id == "pro-shoppers":
                continue
            names[segment_id] = (await p.clients.create(p.dataset, segment_id, rule)).name
        events = _random_events(rng, users=25, count=300)
        stream = events + rng.sample(events, 60)
        rng.shuffle(stream)
        half = len(stream) // 2
        for start in range(0, half, 25):
            await p.send(*stream[start : start + 25])
        # Segments made mid-stream are backfilled while events keep coming.
        for segment_id in ("pro-shoppers", "not-pro", "cheap-pro"):
            rule = RULES[segment_id].format(d=p.dataset)
            names[segment_id] = (await p.clients.create(p.dataset, segment_id, rule)).name
        sends = [p.send(*stream[start : start + 25]) for start in range(half, len(stream), 25)]
        await asyncio.gather(*sends)
        for name in names.values():
            await p.clients.wait_active(name, within=30)
        await _drained(p)
        deadline = time.monotonic() + 20
        while True:
            got = {segment_id: await _members(p, name) for segment_id, name in names.items()}
            want = {segment_id: await _from_scratch(p, name) for segment_id, name in names.items()}
            if got == want or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert got == want
    assert all(want.values())


async def test_an_account_segment_counting_users_of_a_user_segment_backfills(
    start_suite: StartSuite,
) -> None:
    # The backfill's rule query must define the user segment the roll-up names, and the
    # profile service must compile it as a user rule (a context condition is not allowed
    # in an account rule): found by the fault test (tests/faults).
    async with pipeline(start_suite) as p:
        events = []
        for user, account, country in (
            ("u1", "acme", "US"),
            ("u2", "acme", "US"),
            ("u3", "acme", "FR"),
            ("u4", "initech", "US"),
        ):
            event = _event(user, type=event_pb2.EVENT_TYPE_PAGE, account_id=account)
            event.context.location.country = country
            events.append(event)
        await p.send(*events)
        await _drained(p)
        users = await p.clients.create(p.dataset, "us-users", 'location.country = "US"')
        await p.clients.wait_active(users.name)
        teams = await p.clients.create(
            p.dataset,
            "us-teams",
            f'count(users where in segment "{users.name}") >= 2',
            kind=segment_pb2.SEGMENT_KIND_ACCOUNT,
        )
        done = await p.clients.wait_active(teams.name)
        members = await _members(p, teams.name)
    assert done.member_count == 1
    assert members == {"acme"}
