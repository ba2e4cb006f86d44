"""The segment engine over gRPC, fed profile changes on the bus (the profile service's side
is a fake here; tests/e2e/segment_engine/test_pipeline.py runs the real one)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from audience import rules
from audience.bus.v1 import profile_change_pb2
from audience.errors import decode
from audience.v1 import (
    membership_pb2,
    membership_service_pb2,
    profile_pb2,
    segment_pb2,
    segment_service_pb2,
)
from services.segment_engine.app import DEFINITION
from services.segment_engine.segments import MAX_IMPORT_CSV_BYTES, MAX_IMPORT_IDS
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset
from tests.e2e.segment_engine.harness import (
    Clients,
    FakeProfiles,
    Feed,
    attributes_view,
    fake_profile_definition,
    fake_profiles,
    now_micros,
)

pytestmark = pytest.mark.e2e

FAST = {
    "AUDIENCE_SEGMENT_ENGINE_TIMER_INTERVAL": "50ms",
    "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "50ms",
    "AUDIENCE_SEGMENT_ENGINE_BACKFILL_CHUNK": "7",
}

JOIN = membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN
LEAVE = membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE


@dataclass
class Engine:
    suite: RunningSuite
    fake: FakeProfiles
    clients: Clients
    feed: Feed
    dataset: str


@contextlib.asynccontextmanager
async def engine(start_suite: StartSuite, **environ: str) -> AsyncIterator[Engine]:
    fake = fake_profiles()
    async with start_suite(
        [DEFINITION, fake_profile_definition(fake)], {**FAST, **environ}
    ) as suite:
        dataset = new_dataset()
        yield Engine(
            suite, fake, Clients(suite.channel), Feed(suite.resources.bus, dataset, fake), dataset
        )


@dataclass
class Subscriber:
    """Collects a change stream in the background."""

    items: list[membership_service_pb2.WatchMembershipChangesResponse] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    error: grpc.aio.AioRpcError | None = None

    @property
    def changes(self) -> list[membership_pb2.MembershipChange]:
        return [
            change
            for item in self.items
            for change in ([item.change] if item.HasField("change") else item.batch.changes)
        ]

    async def until(
        self, count: int, within: float = 10.0
    ) -> list[membership_pb2.MembershipChange]:
        deadline = time.monotonic() + within
        while len(self.changes) < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"{len(self.changes)} of {count}: {self.changes}"
            await asyncio.sleep(0.01)
        return self.changes

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def watch(e: Engine, **request: Any) -> Subscriber:
    subscriber = Subscriber()
    message = membership_service_pb2.WatchMembershipChangesRequest(
        parent=f"datasets/{e.dataset}", **request
    )

    async def run() -> None:
        call = e.clients.memberships.WatchMembershipChanges(message)
        try:
            async for item in call:
                subscriber.items.append(item)
        except grpc.aio.AioRpcError as error:
            subscriber.error = error
        finally:
            call.cancel()

    subscriber.task = asyncio.create_task(run())
    return subscriber


async def _heartbeat_token(e: Engine) -> str:
    """A token of the log's current end (from a first heartbeat)."""
    subscriber = watch(e, heartbeat_interval=_seconds(1))
    try:
        deadline = time.monotonic() + 5
        while not any(item.HasField("heartbeat") for item in subscriber.items):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        return next(i.heartbeat.resume_token for i in subscriber.items if i.HasField("heartbeat"))
    finally:
        await subscriber.stop()


def _seconds(value: float) -> Any:
    from google.protobuf import duration_pb2

    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=value))
    return duration


def _cart_view(value: float | None) -> profile_change_pb2.EvaluationView:
    view = profile_change_pb2.EvaluationView()
    if value is not None:
        view.session.session_id = "s1"
        view.session.cart.value = value
    return view


async def test_a_subscriber_hears_the_join_and_the_leave_of_the_cart_rule_with_reasons(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "cart-under-100", "cart.value < 100")
        await e.clients.wait_active(segment.name)
        subscriber = watch(e)
        await asyncio.sleep(0.2)
        await e.feed.publish([e.feed.change("shopper", _cart_view(40), ["session"])])
        (join,) = await subscriber.until(1)
        await e.feed.publish([e.feed.change("shopper", _cart_view(130), ["session"])])
        join, leave = await subscriber.until(2)
        await subscriber.stop()

    assert join.kind == JOIN
    assert leave.kind == LEAVE
    for change in (join, leave):
        assert change.member == f"datasets/{e.dataset}/profiles/shopper"
        assert change.segment == segment.name
        assert change.segment_version == 1
        assert change.reason.cause == membership_pb2.CHANGE_CAUSE_EVENT
        assert len(change.reason.event_ids) == 1
        (clause,) = change.reason.flipped_clauses
        assert clause.text == "cart.value < 100"
        assert change.resume_token
    assert join.reason.flipped_clauses[0].result
    assert not leave.reason.flipped_clauses[0].result
    assert leave.reason.flipped_clauses[0].observed.number_value == 130
    assert join.member_sequence < leave.member_sequence


async def test_a_view_republished_after_its_publish_was_lost_is_evaluated_in_full(
    start_suite: StartSuite,
) -> None:
    # The profile service committed the shopper's cart of 130, its publish was lost (Redis
    # went away), and the redelivered batch changed nothing: the same view goes out again
    # at the same sequence with no events and no keys (found by tests/faults).
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "cart-under-100", "cart.value < 100")
        await e.clients.wait_active(segment.name)
        await e.feed.publish([e.feed.change("shopper", _cart_view(40), ["session"])])
        await e.clients.eventually_segments(e.dataset, "shopper", {"cart-under-100"})
        republished = e.feed.change("shopper", _cart_view(130), [], events=0)
        await e.feed.publish([republished])

        await e.clients.eventually_segments(e.dataset, "shopper", set())


def _recent_view(seconds_ago: float, aggregate_id: str) -> profile_change_pb2.EvaluationView:
    moment = now_micros() - round(seconds_ago * 1_000_000)
    view = profile_change_pb2.EvaluationView()
    bucket = profile_pb2.AggregateBucket(
        start_time=rules.timestamp_from_micros(moment - moment % 1_000_000),
        count=1,
        first_time=rules.timestamp_from_micros(moment),
        last_time=rules.timestamp_from_micros(moment),
    )
    view.aggregates.add(aggregate_id=aggregate_id, buckets=[bucket])
    return view


async def test_a_window_rule_leaves_when_the_window_passes_with_no_event(
    start_suite: StartSuite,
) -> None:
    text = 'count(event "product_view", last 1 minute) >= 1'
    aggregate = rules.compile_rule(rules.parse_rule(text)).aggregates[0].aggregate_id
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "recent-viewers", text)
        await e.clients.wait_active(segment.name)
        subscriber = watch(e)
        await asyncio.sleep(0.2)
        # Viewed 58.5 s ago: in the window now, out of it in about two seconds.
        await e.feed.publish(
            [e.feed.change("viewer", _recent_view(58.5, aggregate), ["event:product_view"])]
        )
        (join,) = await subscriber.until(1)
        joined_at = time.monotonic()
        _, leave = await subscriber.until(2, within=10)
        waited = time.monotonic() - joined_at
        await subscriber.stop()

    assert join.kind == JOIN
    assert leave.kind == LEAVE
    assert leave.reason.cause == membership_pb2.CHANGE_CAUSE_TIME
    assert not leave.reason.event_ids
    assert 0.5 < waited < 6


async def test_timers_survive_a_restart(start_suite: StartSuite) -> None:
    text = 'count(event "product_view", last 1 minute) >= 1'
    aggregate = rules.compile_rule(rules.parse_rule(text)).aggregates[0].aggregate_id
    fake = fake_profiles()
    dataset = new_dataset()
    definitions = [DEFINITION, fake_profile_definition(fake)]
    async with start_suite(definitions, FAST) as suite:
        clients = Clients(suite.channel)
        feed = Feed(suite.resources.bus, dataset, fake)
        segment = await clients.create(dataset, "recent", text)
        await clients.wait_active(segment.name)
        await feed.publish([feed.change("p", _recent_view(59, aggregate), ["event:x"])])
        await clients.eventually_segments(dataset, "p", {"recent"})
    # Stopped across the boundary; the timer is in the database.
    await asyncio.sleep(1.5)
    async with start_suite(definitions, FAST) as suite:
        await Clients(suite.channel).eventually_segments(dataset, "p", set(), within=5)


async def test_a_subscriber_killed_at_random_points_and_resumed_misses_nothing(
    start_suite: StartSuite,
) -> None:
    rng = random.Random(11)
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "big-spenders", "attributes.spend >= 50")
        await e.clients.wait_active(segment.name)
        token = await _heartbeat_token(e)

        async def produce() -> None:
            for round_ in range(40):
                batch = [
                    e.feed.change(
                        f"p{rng.randrange(15)}",
                        attributes_view(spend=float(rng.randrange(100))),
                        ["attribute:spend"],
                    )
                    for _ in range(rng.randint(1, 5))
                ]
                await e.feed.publish(batch)
                await asyncio.sleep(rng.random() * 0.02)
                del round_

        producer = asyncio.create_task(produce())
        received: list[membership_pb2.MembershipChange] = []
        resumes = 0
        while not producer.done() or resumes < 3:
            subscriber = watch(e, resume_token=token, heartbeat_interval=_seconds(1))
            await asyncio.sleep(rng.random() * 0.3)
            await subscriber.stop()
            assert subscriber.error is None
            for item in subscriber.items:
                if item.HasField("change"):
                    received.append(item.change)
                    token = item.change.resume_token
                else:
                    token = item.heartbeat.resume_token
            resumes += 1
        await producer
        final = watch(e, resume_token=token, heartbeat_interval=_seconds(1))
        await asyncio.sleep(1.5)
        await final.stop()
        received.extend(final.changes)

        everything = watch(e, start_time=rules.timestamp_from_micros(0))
        await asyncio.sleep(1.0)
        await everything.stop()
        assert everything.error is not None  # 1970 is older than the retention

    logged = {(c.member_sequence, c.member, c.kind) for c in received}
    assert resumes >= 3
    # Every position delivered, none twice in the set, and per member in order.
    sequences = sorted(c.member_sequence for c in received)
    assert sequences == list(range(sequences[0], sequences[0] + len(logged)))
    by_member: dict[str, list[int]] = {}
    for change in received:
        by_member.setdefault(change.member, []).append(change.member_sequence)
    for positions in by_member.values():
        assert positions == sorted(positions)
    # Membership follows the changes: alternating joins and leaves per member.
    for member in by_member:
        kinds = [
            c.kind for c in sorted(received, key=lambda c: c.member_sequence) if c.member == member
        ]
        deduped = [k for index, k in enumerate(kinds) if index == 0 or kinds[index - 1] != k]
        assert deduped == kinds


async def test_an_expired_token_is_refused_with_out_of_range(start_suite: StartSuite) -> None:
    async with engine(
        start_suite,
        AUDIENCE_SEGMENT_ENGINE_CHANGE_RETENTION="1s",
        AUDIENCE_SEGMENT_ENGINE_PRUNE_INTERVAL="100ms",
    ) as e:
        segment = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        await e.clients.wait_active(segment.name)
        subscriber = watch(e)
        await asyncio.sleep(0.2)
        await e.feed.publish([e.feed.change("p", attributes_view(plan="pro"), ["attribute:plan"])])
        (change,) = await subscriber.until(1)
        await subscriber.stop()
        await asyncio.sleep(1.5)
        late = watch(e, resume_token=change.resume_token)
        await asyncio.sleep(0.5)
        await late.stop()

    assert late.error is not None
    decoded = decode(late.error)
    assert decoded.code == grpc.StatusCode.OUT_OF_RANGE
    assert decoded.reason == "RESUME_POINT_EXPIRED"


async def test_a_malformed_token_is_invalid_argument(start_suite: StartSuite) -> None:
    async with engine(start_suite) as e:
        subscriber = watch(e, resume_token="nope")
        await asyncio.sleep(0.3)
        await subscriber.stop()
    assert subscriber.error is not None
    assert decode(subscriber.error).reason == "INVALID_RESUME_TOKEN"


async def test_heartbeats_carry_tokens_that_resume_after_everything_before_them(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        await e.clients.wait_active(segment.name)
        await e.feed.publish([e.feed.change("a", attributes_view(plan="pro"), ["attribute:plan"])])
        await e.clients.eventually_segments(e.dataset, "a", {"pro"})
        token = await _heartbeat_token(e)
        await e.feed.publish([e.feed.change("b", attributes_view(plan="pro"), ["attribute:plan"])])
        await e.clients.eventually_segments(e.dataset, "b", {"pro"})
        subscriber = watch(e, resume_token=token)
        (change,) = await subscriber.until(1)
        await asyncio.sleep(0.3)
        await subscriber.stop()
    assert change.member.endswith("/b")
    assert len(subscriber.changes) == 1


async def test_changes_come_in_batches_when_asked_and_resume_from_inside_one(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        await e.clients.wait_active(segment.name)
        token = await _heartbeat_token(e)
        await e.feed.publish(
            [
                e.feed.change(f"p{n}", attributes_view(plan="pro"), ["attribute:plan"])
                for n in range(30)
            ]
        )
        single = watch(e, resume_token=token)
        expected = await single.until(30)
        # All logged by now, so each stream reads them at once.
        batched = watch(e, resume_token=token, max_changes_per_response=7)
        one_each = watch(e, resume_token=token, max_changes_per_response=1)
        await batched.until(30)
        await one_each.until(30)
        middle = next(
            item.batch.changes[2] for item in batched.items if len(item.batch.changes) > 3
        )
        resumed = watch(e, resume_token=middle.resume_token, max_changes_per_response=1000)
        after_middle = expected[[c.resume_token for c in expected].index(middle.resume_token) + 1 :]
        await resumed.until(len(after_middle))
        await asyncio.sleep(0.3)
        for subscriber in (single, batched, one_each, resumed):
            await subscriber.stop()

    assert len({change.member for change in expected}) == 30
    assert batched.changes == expected
    sizes = [len(item.batch.changes) for item in batched.items if item.HasField("batch")]
    assert max(sizes) == 7
    assert sum(sizes) == 30
    assert all(item.HasField("change") for item in single.items)
    assert one_each.items == single.items
    assert resumed.changes == after_middle


@pytest.mark.parametrize("per_response", [-1, 1001])
async def test_a_batch_size_out_of_range_is_invalid_argument(
    start_suite: StartSuite, per_response: int
) -> None:
    async with engine(start_suite) as e:
        call = e.clients.memberships.WatchMembershipChanges(
            membership_service_pb2.WatchMembershipChangesRequest(
                parent=f"datasets/{e.dataset}", max_changes_per_response=per_response
            )
        )
        assert await _refused(call.read()) == ["max_changes_per_response"]


async def test_a_filtered_subscriber_sees_only_its_segments_and_kind(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        pro = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        free = await e.clients.create(e.dataset, "free", 'attributes.plan = "free"')
        await e.clients.wait_active(pro.name)
        await e.clients.wait_active(free.name)
        subscriber = watch(e, segments=[pro.name], kind=LEAVE)
        await asyncio.sleep(0.2)
        await e.feed.publish([e.feed.change("p", attributes_view(plan="pro"), ["attribute:plan"])])
        await e.feed.publish([e.feed.change("p", attributes_view(plan="free"), ["attribute:plan"])])
        (leave,) = await subscriber.until(1)
        await asyncio.sleep(0.3)
        await subscriber.stop()
    assert leave.segment == pro.name
    assert leave.kind == LEAVE
    assert len(subscriber.changes) == 1


async def test_an_edited_segment_backfills_with_progress_and_backfill_reasons(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        changes = [
            e.feed.change(f"p{n:02d}", attributes_view(score=float(n)), ["attribute:score"])
            for n in range(30)
        ]
        await e.feed.publish(changes)
        segment = await e.clients.create(e.dataset, "high", "attributes.score >= 20")
        segment = await e.clients.wait_active(segment.name)
        assert segment.member_count == 10
        assert segment.backfill.percent == 100
        subscriber = watch(e)
        await asyncio.sleep(0.2)
        segment.rule_text = "attributes.score >= 25"
        segment.ClearField("rule")
        updated = (
            await e.clients.segments.UpdateSegment(
                segment_service_pb2.UpdateSegmentRequest(
                    segment=segment, update_mask=field_mask_pb2.FieldMask(paths=["rule_text"])
                ),
                timeout=10,
            )
        ).segment
        assert updated.version == 2
        assert updated.state == segment_pb2.SEGMENT_STATE_BACKFILLING
        done = await e.clients.wait_active(segment.name)
        leaves = await subscriber.until(5)
        await subscriber.stop()

    assert done.state == segment_pb2.SEGMENT_STATE_ACTIVE
    assert done.member_count == 5
    assert done.backfill.version == 2
    assert done.backfill.percent == 100
    assert done.backfill.profiles_done == 30
    assert {c.member.rsplit("/", 1)[1] for c in leaves} == {f"p{n}" for n in range(20, 25)}
    assert all(c.reason.cause == membership_pb2.CHANGE_CAUSE_BACKFILL for c in leaves)
    assert all(c.segment_version == 2 for c in leaves)


async def test_a_stale_etag_is_aborted_and_a_clash_already_exists(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        segment.display_name = "Pro"
        mask = field_mask_pb2.FieldMask(paths=["display_name"])
        renamed = (
            await e.clients.segments.UpdateSegment(
                segment_service_pb2.UpdateSegmentRequest(segment=segment, update_mask=mask)
            )
        ).segment
        assert renamed.display_name == "Pro"
        assert renamed.etag != segment.etag
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await e.clients.segments.UpdateSegment(
                segment_service_pb2.UpdateSegmentRequest(segment=segment, update_mask=mask)
            )
        with pytest.raises(grpc.aio.AioRpcError) as clash:
            await e.clients.create(e.dataset, "pro", 'attributes.plan = "x"')
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await e.clients.create(e.dataset, "bad", "attributes.plan >")
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert clash.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert decode(bad.value).violations


async def test_references_cascade_and_block_deletion_until_removed(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        base = await e.clients.create(e.dataset, "base", 'attributes.plan = "pro"')
        follower = await e.clients.create(
            e.dataset, "follower", f'in segment "{base.name}" and attributes.age >= 18'
        )
        await e.clients.wait_active(base.name)
        await e.clients.wait_active(follower.name)
        await e.feed.publish(
            [e.feed.change("p", attributes_view(plan="pro", age=30.0), ["attribute:plan"])]
        )
        await e.clients.eventually_segments(e.dataset, "p", {"base", "follower"})
        with pytest.raises(grpc.aio.AioRpcError) as in_use:
            await e.clients.segments.DeleteSegment(
                segment_service_pb2.DeleteSegmentRequest(name=base.name)
            )
        assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        subscriber = watch(e)
        await asyncio.sleep(0.2)
        await e.feed.publish(
            [e.feed.change("p", attributes_view(plan="free", age=30.0), ["attribute:plan"])]
        )
        first, second = await subscriber.until(2)
        await e.clients.segments.DeleteSegment(
            segment_service_pb2.DeleteSegmentRequest(name=follower.name)
        )
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await e.clients.segments.GetSegment(
                segment_service_pb2.GetSegmentRequest(name=follower.name)
            )
        await subscriber.stop()
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert (first.segment, second.segment) == (base.name, follower.name)
    assert second.reason.cause == membership_pb2.CHANGE_CAUSE_DEPENDENCY
    assert second.reason.dependency_segment == base.name


async def test_deleting_a_segment_makes_every_member_leave(start_suite: StartSuite) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        await e.clients.wait_active(segment.name)
        await e.feed.publish(
            [
                e.feed.change(f"p{n}", attributes_view(plan="pro"), ["attribute:plan"])
                for n in range(9)
            ]
        )
        for n in range(9):
            await e.clients.eventually_segments(e.dataset, f"p{n}", {"pro"})
        subscriber = watch(e)
        await asyncio.sleep(0.2)
        await e.clients.segments.DeleteSegment(
            segment_service_pb2.DeleteSegmentRequest(name=segment.name)
        )
        leaves = await subscriber.until(9)
        await subscriber.stop()
    assert {c.kind for c in leaves} == {LEAVE}
    assert {c.reason.cause for c in leaves} == {membership_pb2.CHANGE_CAUSE_SEGMENT_CHANGED}


async def test_an_erased_profile_leaves_every_segment_with_reason_erasure(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        pro = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        adult = await e.clients.create(e.dataset, "adult", "attributes.age >= 18")
        await e.clients.wait_active(pro.name)
        await e.clients.wait_active(adult.name)
        await e.feed.publish(
            [e.feed.change("p", attributes_view(plan="pro", age=40.0), ["attribute:plan"])]
        )
        await e.clients.eventually_segments(e.dataset, "p", {"pro", "adult"})
        subscriber = watch(e)
        await asyncio.sleep(0.2)
        await e.feed.publish([e.feed.erased("p")])
        leaves = await subscriber.until(2)
        # A late duplicate of an older change does not bring the profile back.
        stale = e.feed.change("p", attributes_view(plan="pro"), ["attribute:plan"])
        stale.sequence = 1
        await e.feed.publish([stale])
        await asyncio.sleep(0.5)
        assert await e.clients.segments_of(e.dataset, "p") == set()
        await subscriber.stop()
    assert {c.segment for c in leaves} == {pro.name, adult.name}
    assert {c.reason.cause for c in leaves} == {membership_pb2.CHANGE_CAUSE_ERASURE}


async def _upload(
    e: Engine, name: str, mode: int, chunks: list[segment_service_pb2.ImportSegmentMembersRequest]
) -> segment_service_pb2.ImportSegmentMembersResponse:
    chunks[0].segment = name
    chunks[0].mode = mode  # type: ignore[assignment]

    async def requests() -> AsyncIterator[segment_service_pb2.ImportSegmentMembersRequest]:
        for chunk in chunks:
            yield chunk

    response: segment_service_pb2.ImportSegmentMembersResponse = (
        await e.clients.segments.ImportSegmentMembers(requests(), timeout=10)
    )
    return response


async def test_imported_members_join_leave_and_feed_rules_that_use_them(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        imported = (
            await e.clients.segments.CreateSegment(
                segment_service_pb2.CreateSegmentRequest(
                    parent=f"datasets/{e.dataset}",
                    segment_id="crm-vips",
                    segment=segment_pb2.Segment(
                        kind=segment_pb2.SEGMENT_KIND_USER,
                        source=segment_pb2.SEGMENT_SOURCE_IMPORTED,
                    ),
                )
            )
        ).segment
        follower = await e.clients.create(
            e.dataset, "vip-adults", f'in segment "{imported.name}" and attributes.age >= 18'
        )
        await e.clients.wait_active(follower.name)
        await e.feed.publish([e.feed.change("a", attributes_view(age=30.0), ["attribute:age"])])
        await e.clients.eventually_segments(e.dataset, "a", set())
        added = await _upload(
            e,
            imported.name,
            segment_service_pb2.IMPORT_MODE_ADD,
            [
                segment_service_pb2.ImportSegmentMembersRequest(csv=b"email,profile_id\nx,a\ny,"),
                segment_service_pb2.ImportSegmentMembersRequest(csv=b"b\nz,\n"),
            ],
        )
        assert (added.joined_count, added.left_count, added.rejected_count) == (2, 0, 1)
        assert added.segment.version == 2
        await e.clients.eventually_segments(e.dataset, "a", {"crm-vips", "vip-adults"})
        replaced = await _upload(
            e,
            imported.name,
            segment_service_pb2.IMPORT_MODE_REPLACE,
            [
                segment_service_pb2.ImportSegmentMembersRequest(
                    ids=segment_service_pb2.ImportedIds(ids=["b", "c"])
                )
            ],
        )
        assert (replaced.joined_count, replaced.left_count) == (1, 1)
        await e.clients.eventually_segments(e.dataset, "a", set())
        count = await e.clients.memberships.CountSegmentMembers(
            membership_service_pb2.CountSegmentMembersRequest(segment=imported.name)
        )
        assert count.count == 2


async def test_memberships_at_a_past_time_come_from_the_log(start_suite: StartSuite) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        await e.clients.wait_active(segment.name)
        await e.feed.publish([e.feed.change("p", attributes_view(plan="pro"), ["attribute:plan"])])
        await e.clients.eventually_segments(e.dataset, "p", {"pro"})
        between = now_micros()
        await asyncio.sleep(0.05)
        await e.feed.publish([e.feed.change("p", attributes_view(plan="x"), ["attribute:plan"])])
        await e.clients.eventually_segments(e.dataset, "p", set())
        past = await e.clients.memberships.ListMemberships(
            membership_service_pb2.ListMembershipsRequest(
                parent=f"datasets/{e.dataset}/profiles/p",
                read_time=rules.timestamp_from_micros(between),
            )
        )
    assert [m.segment for m in past.memberships] == [segment.name]


async def _refused(call: Any) -> list[str]:
    """The fields an INVALID_ARGUMENT names."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    decoded = decode(caught.value)
    assert decoded.code == grpc.StatusCode.INVALID_ARGUMENT, decoded
    return [violation.field for violation in decoded.violations]


def _imported(e: Engine, segment_id: str, **fields: Any) -> Any:
    return e.clients.segments.CreateSegment(
        segment_service_pb2.CreateSegmentRequest(
            parent=f"datasets/{e.dataset}",
            segment_id=segment_id,
            segment=segment_pb2.Segment(
                kind=segment_pb2.SEGMENT_KIND_USER,
                source=segment_pb2.SEGMENT_SOURCE_IMPORTED,
                **fields,
            ),
        ),
        timeout=10,
    )


async def test_text_holding_nul_which_postgresql_cannot_store_is_refused_naming_the_field(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        assert await _refused(_imported(e, "a", display_name="a\x00b")) == ["segment.display_name"]
        assert await _refused(_imported(e, "b", description="\x00")) == ["segment.description"]
        assert await _refused(_imported(e, "c", labels={"team": "\x00"})) == [
            "segment.labels[team]"
        ]
        assert await _refused(_imported(e, "d", labels={"t\x00": "x"})) == ["segment.labels"]
        segment = (await _imported(e, "e", display_name="fine")).segment
        segment.display_name = "\x00"
        update = e.clients.segments.UpdateSegment(
            segment_service_pb2.UpdateSegmentRequest(
                segment=segment, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
            )
        )
        assert await _refused(update) == ["segment.display_name"]


async def test_an_upload_with_a_control_character_in_an_id_is_refused_whole(
    start_suite: StartSuite,
) -> None:
    """Member ids name profiles, whose names hold no control character; the change
    notification carries one id a line."""
    async with engine(start_suite) as e:
        imported = (await _imported(e, "crm")).segment
        Request = segment_service_pb2.ImportSegmentMembersRequest  # noqa: N806
        for bad in ("line\nbreak", "nul\x00", "tab\t"):
            upload = _upload(
                e,
                imported.name,
                segment_service_pb2.IMPORT_MODE_ADD,
                [
                    Request(ids=segment_service_pb2.ImportedIds(ids=["ok-1"])),
                    Request(ids=segment_service_pb2.ImportedIds(ids=["ok-2", bad])),
                ],
            )
            assert await _refused(upload) == ["ids.ids[1]"], bad
        # In CSV, a cell with one is a malformed line, rejected like an empty one.
        csv = await _upload(
            e,
            imported.name,
            segment_service_pb2.IMPORT_MODE_ADD,
            [Request(csv=b'ok-1\n"a\nb"\nnul\x00\n\n')],
        )
        assert (csv.joined_count, csv.rejected_count) == (1, 2)
        count = await e.clients.memberships.CountSegmentMembers(
            membership_service_pb2.CountSegmentMembersRequest(segment=imported.name)
        )
    assert count.count == 1


async def test_upload_messages_over_their_documented_size_are_refused(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        imported = (await _imported(e, "crm")).segment
        Request = segment_service_pb2.ImportSegmentMembersRequest  # noqa: N806
        ids = [f"u{i}" for i in range(MAX_IMPORT_IDS + 1)]
        too_many = _upload(
            e,
            imported.name,
            segment_service_pb2.IMPORT_MODE_ADD,
            [Request(ids=segment_service_pb2.ImportedIds(ids=ids))],
        )
        assert await _refused(too_many) == ["ids.ids"]
        too_large = _upload(
            e,
            imported.name,
            segment_service_pb2.IMPORT_MODE_ADD,
            [Request(csv=b"u\n" * (MAX_IMPORT_CSV_BYTES // 2) + b"x")],
        )
        assert await _refused(too_large) == ["csv"]


async def test_times_and_durations_out_of_range_are_invalid_argument(
    start_suite: StartSuite,
) -> None:
    """Past what timedelta and the store's times hold, as well as past the limits."""
    async with engine(start_suite) as e:
        parent = f"datasets/{e.dataset}/profiles/p"
        for seconds in (2**63 - 1, 253_402_300_800, -62_135_596_801):
            listing = e.clients.memberships.ListMemberships(
                membership_service_pb2.ListMembershipsRequest(
                    parent=parent, read_time=timestamp_pb2.Timestamp(seconds=seconds)
                ),
                timeout=10,
            )
            assert await _refused(listing) == ["read_time"], seconds
        refused: dict[str, dict[str, Any]] = {
            "heartbeat_interval": {
                "heartbeat_interval": duration_pb2.Duration(seconds=-86_399_999_913_601)
            },
            "start_time": {"start_time": timestamp_pb2.Timestamp(seconds=2**63 - 1)},
        }
        subscribers = {field: watch(e, **request) for field, request in refused.items()}
        await asyncio.sleep(0.3)
        for subscriber in subscribers.values():
            await subscriber.stop()
    for name, subscriber in subscribers.items():
        assert subscriber.error is not None, name
        decoded = decode(subscriber.error)
        assert decoded.code == grpc.StatusCode.INVALID_ARGUMENT, decoded
        assert [violation.field for violation in decoded.violations] == [name]


async def test_explain_says_which_clause_holds_and_what_is_missing(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(
            e.dataset, "pro-adults", 'attributes.plan = "pro" and attributes.age >= 18'
        )
        await e.clients.wait_active(segment.name)
        await e.feed.publish(
            [e.feed.change("p", attributes_view(plan="pro", age=12.0), ["attribute:plan"])]
        )
        await asyncio.sleep(0.3)
        explained = await e.clients.memberships.ExplainMembership(
            membership_service_pb2.ExplainMembershipRequest(
                member=f"datasets/{e.dataset}/profiles/p", segment=segment.name
            )
        )
    assert not explained.rule_result
    assert not explained.is_member
    plan, age = explained.explanation.children
    assert plan.result
    assert not age.result
    assert age.observed.number_value == 12
    assert age.missing


async def test_an_account_joins_when_enough_of_its_users_qualify(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(
            e.dataset,
            "busy-accounts",
            "count(users where attributes.active = true) >= 2",
            kind=segment_pb2.SEGMENT_KIND_ACCOUNT,
        )
        await e.clients.wait_active(segment.name)
        subscriber = watch(e)
        await asyncio.sleep(0.2)
        for user in ("u1", "u2"):
            view = attributes_view(active=True)
            view.account_id = "acme"
            await e.feed.publish([e.feed.change(user, view, ["attribute:active", "account"])])
        (join,) = await subscriber.until(1)
        view = attributes_view(active=False)
        view.account_id = "acme"
        await e.feed.publish([e.feed.change("u2", view, ["attribute:active"])])
        _, leave = await subscriber.until(2)
        await subscriber.stop()
    assert join.member == f"datasets/{e.dataset}/accounts/acme"
    assert (join.kind, leave.kind) == (JOIN, LEAVE)


async def test_stats_count_joins_and_leaves_per_day(start_suite: StartSuite) -> None:
    async with engine(start_suite) as e:
        segment = await e.clients.create(e.dataset, "pro", 'attributes.plan = "pro"')
        await e.clients.wait_active(segment.name)
        for plan in ("pro", "free", "pro"):
            await e.feed.publish(
                [e.feed.change("p", attributes_view(plan=plan), ["attribute:plan"])]
            )
            await asyncio.sleep(0.15)
        await e.clients.eventually_segments(e.dataset, "p", {"pro"})
        stats = await e.clients.segments.GetSegmentStats(
            segment_service_pb2.GetSegmentStatsRequest(name=segment.name, days=3)
        )
    assert stats.size == 1
    assert len(stats.days) == 3
    today = stats.days[-1]
    assert (today.joins, today.leaves, today.size) == (2, 1, 1)


async def test_validate_rule_returns_the_canonical_rule_and_what_it_depends_on(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        base = await e.clients.create(e.dataset, "base", 'attributes.plan = "pro"')
        response = await e.clients.segments.ValidateRule(
            segment_service_pb2.ValidateRuleRequest(
                parent=f"datasets/{e.dataset}",
                kind=segment_pb2.SEGMENT_KIND_USER,
                rule_text=f'count(event "product_view", last 30 minutes) >= 1 and '
                f'in segment "{base.name}"',
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await e.clients.segments.ValidateRule(
                segment_service_pb2.ValidateRuleRequest(
                    parent=f"datasets/{e.dataset}",
                    kind=segment_pb2.SEGMENT_KIND_USER,
                    rule_text=f'in segment "datasets/{e.dataset}/segments/nope"',
                )
            )
    assert list(response.event_names) == ["product_view"]
    assert list(response.segments) == [base.name]
    assert response.time_dependent
    assert response.rule.WhichOneof("node") == "all"
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_preview_estimates_the_size_and_samples_members_without_saving(
    start_suite: StartSuite,
) -> None:
    async with engine(start_suite) as e:
        await e.feed.publish(
            [
                e.feed.change(f"p{n}", attributes_view(score=float(n)), ["attribute:score"])
                for n in range(12)
            ]
        )
        preview = await e.clients.segments.PreviewSegment(
            segment_service_pb2.PreviewSegmentRequest(
                parent=f"datasets/{e.dataset}",
                kind=segment_pb2.SEGMENT_KIND_USER,
                rule_text="attributes.score >= 8",
                sample_size=3,
            )
        )
        listed = await e.clients.segments.ListSegments(
            segment_service_pb2.ListSegmentsRequest(parent=f"datasets/{e.dataset}")
        )
    assert preview.estimated_size == 4
    assert preview.profiles_scanned == 12
    assert len(preview.sample_members) == 3
    assert all(m.startswith(f"datasets/{e.dataset}/profiles/p") for m in preview.sample_members)
    assert not listed.segments


async def test_a_backfill_interrupted_by_a_restart_finishes_after_it(
    start_suite: StartSuite,
) -> None:
    fake = fake_profiles()
    dataset = new_dataset()
    definitions = [DEFINITION, fake_profile_definition(fake)]
    async with start_suite(definitions, FAST) as suite:
        feed = Feed(suite.resources.bus, dataset, fake)
        await feed.publish(
            [
                feed.change(f"p{n:02d}", attributes_view(vip=True), ["attribute:vip"])
                for n in range(40)
            ]
        )
        await asyncio.sleep(0.5)
        fake.delay = 0.2
        clients = Clients(suite.channel)
        segment = await clients.create(dataset, "vips", "attributes.vip = true")
        deadline = time.monotonic() + 10
        while (
            await clients.segments.GetSegment(
                segment_service_pb2.GetSegmentRequest(name=segment.name)
            )
        ).segment.member_count == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    fake.delay = 0.0
    async with start_suite(definitions, FAST) as suite:
        done = await Clients(suite.channel).wait_active(segment.name)
    assert done.member_count == 40
    assert done.backfill.percent == 100
