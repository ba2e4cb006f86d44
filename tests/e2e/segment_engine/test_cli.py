"""``audience segments``, ``explain``, ``members`` and ``watch`` against a running engine."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

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


async def _watched(suite: RunningSuite, dataset: str, count: int, *args: str) -> list[Any]:
    """The first ``count`` changes ``audience watch --json`` prints; then it is stopped."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from audience.cli.main import main; main()",
        "watch",
        "--address",
        suite.address,
        "--dataset",
        dataset,
        "--json",
        *args,
        env={**os.environ, "AUDIENCE_API_KEY": suite.api_key},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    lines: list[bytes] = []
    try:
        for _ in range(count):
            lines.append(await asyncio.wait_for(process.stdout.readline(), 20))
    except TimeoutError:
        process.terminate()
        raise AssertionError(f"{lines}, stderr: {await process.stderr.read()!r}") from None
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
    return [json.loads(line) for line in lines]


async def test_watch_prints_changes_with_tokens_to_resume_from(start_suite: StartSuite) -> None:
    fake = fake_profiles()
    async with start_suite([DEFINITION, fake_profile_definition(fake)]) as suite:
        dataset = new_dataset()
        feed = Feed(suite.resources.bus, dataset, fake)
        since = datetime.now(UTC).isoformat()
        created = await _run(
            suite, dataset, "segments", "create", "pro", "--rule", 'attributes.plan = "pro"'
        )
        assert created.exit_code == 0, created.output
        await feed.publish(
            [feed.change(f"p{n}", attributes_view(plan="pro"), ["x"]) for n in range(3)]
        )
        everything = await _watched(suite, dataset, 3, "--since", since)
        rest = await _watched(suite, dataset, 2, "--resume", everything[0]["resumeToken"])

    assert sorted(change["member"].rsplit("/", 1)[1] for change in everything) == ["p0", "p1", "p2"]
    assert {change["kind"] for change in everything} == {"MEMBERSHIP_CHANGE_KIND_JOIN"}
    assert rest == everything[1:]
