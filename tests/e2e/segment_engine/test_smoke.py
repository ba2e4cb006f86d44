"""Smoke: a segment, a profile change on the bus, a membership."""

from __future__ import annotations

from services.segment_engine.app import DEFINITION
from tests.e2e.conftest import StartSuite, new_dataset
from tests.e2e.segment_engine.harness import (
    Clients,
    Feed,
    attributes_view,
    fake_profile_definition,
    fake_profiles,
)


async def test_smoke(start_suite: StartSuite) -> None:
    fake = fake_profiles()
    async with start_suite([DEFINITION, fake_profile_definition(fake)]) as suite:
        dataset = new_dataset()
        clients = Clients(suite.channel)
        feed = Feed(suite.resources.bus, dataset, fake)
        await feed.publish([feed.change("p0", attributes_view(plan="pro"), ["attribute:plan"])])
        segment = await clients.create(dataset, "pro", 'attributes.plan = "pro"')
        await clients.wait_active(segment.name)
        await clients.eventually_segments(dataset, "p0", {"pro"})
        await feed.publish([feed.change("p1", attributes_view(plan="pro"), ["attribute:plan"])])
        await clients.eventually_segments(dataset, "p1", {"pro"})
