"""Two segment engine replicas on one database and one bus: the bus shares each subject's
changes between them as they ask, so a subject is evaluated by one, then by the other, in
turns neither can predict. Each keeps the subjects it last wrote in memory, and must not
act on that copy once the other has changed them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from audience.v1 import segment_pb2, segment_service_pb2
from services.segment_engine.app import DEFINITION
from tests.e2e.conftest import StartSuite, new_dataset
from tests.e2e.segment_engine.harness import (
    Clients,
    Feed,
    attributes_view,
    fake_profile_definition,
    fake_profiles,
)

pytestmark = pytest.mark.e2e

_FAST = {
    "AUDIENCE_SEGMENT_ENGINE_TIMER_INTERVAL": "50ms",
    "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "50ms",
}

_SUBJECTS = [f"p{n}" for n in range(6)]


@contextlib.asynccontextmanager
async def _replicas(
    start_suite: StartSuite,
) -> AsyncIterator[tuple[Clients, Clients, Feed, segment_pb2.Segment]]:
    """Replicas a and b, a feed, and the segment "pro" (`attributes.plan = "pro"`)."""
    fake = fake_profiles()
    async with (
        start_suite(
            [DEFINITION, fake_profile_definition(fake)],
            {**_FAST, "AUDIENCE_SEGMENT_ENGINE_CONSUMER_NAME": "replica-a"},
        ) as first,
        start_suite(
            [DEFINITION, fake_profile_definition(fake)],
            {**_FAST, "AUDIENCE_SEGMENT_ENGINE_CONSUMER_NAME": "replica-b"},
        ) as second,
    ):
        a, b = Clients(first.channel), Clients(second.channel)
        feed = Feed(first.resources.bus, new_dataset(), fake)
        pro = await a.create(feed.dataset, "pro", 'attributes.plan = "pro"')
        yield a, b, feed, await a.wait_active(pro.name)


async def _publish(feed: Feed, plan: str) -> None:
    await feed.publish(
        [
            feed.change(subject, attributes_view(plan=plan), ["attribute:plan"])
            for subject in _SUBJECTS
        ]
    )


async def _all_in(clients: Clients, feed: Feed, expected: set[str]) -> None:
    for subject in _SUBJECTS:
        await clients.eventually_segments(feed.dataset, subject, expected)


async def test_a_segment_made_again_under_its_id_is_evaluated_by_its_new_rule_everywhere(
    start_suite: StartSuite,
) -> None:
    async with _replicas(start_suite) as (a, b, feed, pro):
        await _publish(feed, "pro")
        await _all_in(a, feed, {"pro"})
        # Deleted and made again through the other replica: the new segment starts again
        # at version 1, and replica a never loaded the catalog without it. The deletion's
        # leaves are written without the subjects being loaded, and still raise the
        # dataset's bulk generation: a replica that took its own copy of a subject (still
        # in "pro") for the truth would see no join to make below.
        await b.segments.DeleteSegment(segment_service_pb2.DeleteSegmentRequest(name=pro.name))
        await _all_in(a, feed, set())
        again = await b.create(feed.dataset, "pro", 'attributes.plan = "gold"')
        await b.wait_active(again.name)
        await _publish(feed, "gold")
        await _all_in(a, feed, {"pro"})
        await _all_in(b, feed, {"pro"})


async def test_replicas_taking_turns_on_the_same_subjects_miss_no_join_or_leave(
    start_suite: StartSuite,
) -> None:
    async with _replicas(start_suite) as (a, b, feed, _):
        for round_ in range(8):
            plan = "pro" if round_ % 2 == 0 else "free"
            await _publish(feed, plan)
            expected = {"pro"} if plan == "pro" else set()
            await _all_in(a, feed, expected)
            await _all_in(b, feed, expected)
