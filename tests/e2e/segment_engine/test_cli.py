"""``audience segments``, ``explain`` and ``members`` against a running engine."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner, Result

from audience.cli.main import cli
from services.segment_engine.app import DEFINITION
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset
from tests.e2e.segment_engine.harness import (
    Clients,
    Feed,
    attributes_view,
    fake_profile_definition,
    fake_profiles,
)

pytestmark = pytest.mark.e2e


async def _run(suite: RunningSuite, dataset: str, *args: str) -> Result:
    runner = CliRunner()
    address = suite.address
    # The CLI runs its own event loop: off this one's thread.
    return await asyncio.to_thread(
        runner.invoke,
        cli,
        [*args[:2], "--address", address, "--dataset", dataset, *args[2:]]
        if args[0] == "segments"
        else [args[0], "--address", address, "--dataset", dataset, *args[1:]],
        env={"AUDIENCE_API_KEY": suite.api_key},
        catch_exceptions=False,
    )


async def test_segments_explain_and_members_from_the_command_line(
    start_suite: StartSuite,
) -> None:
    fake = fake_profiles()
    async with start_suite([DEFINITION, fake_profile_definition(fake)]) as suite:
        dataset = new_dataset()
        feed = Feed(suite.resources.bus, dataset, fake)
        await feed.publish(
            [
                feed.change(f"p{n}", attributes_view(plan="pro" if n % 2 else "free"), ["x"])
                for n in range(6)
            ]
        )
        await asyncio.sleep(0.5)
        created = await _run(
            suite, dataset, "segments", "create", "pro", "--rule", 'attributes.plan = "pro"'
        )
        assert created.exit_code == 0, created.output
        assert json.loads(created.stdout)["member_count"] == "3"
        listed = await _run(suite, dataset, "segments", "list")
        assert "pro" in listed.output
        assert "active" in listed.output
        members = await _run(suite, dataset, "members", "pro")
        assert members.stdout.split() == ["p1", "p3", "p5"]
        explained = await _run(suite, dataset, "explain", "p2", "pro")
        assert "is not a member" in explained.output
        assert 'attributes.plan = "pro"' in explained.output
        # What the clause saw, as the rule text writes a value.
        assert 'saw "free"' in explained.output
        bad = await _run(suite, dataset, "segments", "create", "x", "--rule", "nope ==")
        assert bad.exit_code != 0
        assert "INVALID_ARGUMENT" in bad.output
        deleted = await _run(suite, dataset, "segments", "delete", "pro")
        assert deleted.exit_code == 0
        await Clients(suite.channel).eventually_segments(dataset, "p1", set())
