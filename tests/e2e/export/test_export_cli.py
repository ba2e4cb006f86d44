"""``audience export`` against a running engine and export service."""

from __future__ import annotations

import asyncio
import csv
import json

import pytest
from click.testing import CliRunner, Result

from audience.cli.main import cli
from tests.e2e.export.conftest import Feeds

pytestmark = pytest.mark.e2e


async def run(feeds: Feeds, *args: str) -> Result:
    # The CLI runs its own event loop: off this one's thread.
    return await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["export", args[0], *args[1:], "--address", feeds.suite.address],
        env={"AUDIENCE_API_KEY": feeds.suite.api_key},
        catch_exceptions=False,
    )


async def test_a_segment_is_downloaded_and_exported_from_the_command_line(feeds: Feeds) -> None:
    segment = await feeds.imported_segment("vip")
    await feeds.join(segment, "ann", "=bob")
    output = feeds.root / "vip.csv"

    downloaded = await run(
        feeds, "csv", segment, "--column", "profile_id=Id", "--output", str(output)
    )

    assert downloaded.exit_code == 0, downloaded.output
    with output.open(newline="") as file:
        assert list(csv.reader(file)) == [["Id"], ["'=bob"], ["ann"]]
    assert "Wrote 2 rows" in downloaded.stderr

    folder = feeds.root / "files"
    created = await run(feeds, "destinations", "create-folder", feeds.parent, "local", str(folder))
    assert created.exit_code == 0, created.output
    destination = json.loads(created.stdout)["name"]

    job = await run(
        feeds,
        "jobs",
        "create",
        feeds.parent,
        "--segment",
        segment,
        "--destination",
        destination,
        "--file-name",
        "vip.csv",
        "--wait",
    )
    assert job.exit_code == 0, job.output
    assert json.loads(job.stdout)["state"] == "EXPORT_JOB_STATE_SUCCEEDED"
    assert sorted(path.name for path in folder.iterdir()) == [
        "vip.csv",
        "vip.csv.manifest.json",
        "vip.csv.sha256",
    ]

    listed = await run(feeds, "jobs", "list", feeds.parent)
    assert listed.exit_code == 0, listed.output
    assert "SUCCEEDED" in listed.output


async def test_a_bad_column_is_refused_before_calling(feeds: Feeds) -> None:
    result = await run(feeds, "csv", f"{feeds.parent}/segments/x", "--column", "nonsense")

    assert result.exit_code == 2
    assert "identity:TYPE or attribute:PATH" in result.output
