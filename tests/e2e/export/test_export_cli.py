"""``audience export`` against a running engine and export service."""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Mapping
from typing import Any

import pytest
from click.testing import CliRunner, Result

from audience.cli.main import cli
from tests.e2e.export.conftest import Feeds

pytestmark = pytest.mark.e2e

WEBHOOK_SECRET = "whsec-cli-0123456789"


async def run(feeds: Feeds, *args: str, env: Mapping[str, str | None] | None = None) -> Result:
    return await invoke(feeds.suite.address, feeds.suite.api_key, args, env or {})


async def invoke(
    address: str, api_key: str, args: tuple[str, ...], env: Mapping[str, str | None]
) -> Result:
    # The CLI runs its own event loop: off this one's thread. AUDIENCE_DATASET is unset
    # unless a test sets it, so that the caller's environment cannot name a dataset.
    return await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["export", *args, "--address", address],
        env={"AUDIENCE_API_KEY": api_key, "AUDIENCE_DATASET": None, **env},
        catch_exceptions=False,
    )


def printed(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    resource: dict[str, Any] = json.loads(result.stdout)
    return resource


async def test_a_segment_is_downloaded_and_exported_from_the_command_line(feeds: Feeds) -> None:
    segment = await feeds.imported_segment("vip")
    await feeds.join(segment, "ann", "=bob")
    output = feeds.root / "vip.csv"
    dataset = ("--dataset", feeds.dataset)

    downloaded = await run(
        feeds, "csv", "vip", *dataset, "--column", "profile_id=Id", "--output", str(output)
    )

    assert downloaded.exit_code == 0, downloaded.output
    with output.open(newline="") as file:
        assert list(csv.reader(file)) == [["Id"], ["'=bob"], ["ann"]]
    assert "Wrote 2 rows" in downloaded.stderr

    folder = feeds.root / "files"
    created = await run(feeds, "destinations", "create-folder", "local", str(folder), *dataset)
    assert printed(created)["name"] == f"{feeds.parent}/destinations/local"

    job = await run(
        feeds,
        "jobs",
        "create",
        *dataset,
        "--id",
        "first",
        "--segment",
        "vip",
        "--destination",
        "local",
        "--file-name",
        "vip.csv",
        "--wait",
    )
    assert printed(job)["state"] == "EXPORT_JOB_STATE_SUCCEEDED"
    assert sorted(path.name for path in folder.iterdir()) == [
        "vip.csv",
        "vip.csv.manifest.json",
        "vip.csv.sha256",
    ]

    listed = await run(feeds, "jobs", "list", *dataset)
    assert listed.exit_code == 0, listed.output
    assert "SUCCEEDED" in listed.output
    shown = printed(await run(feeds, "jobs", "get", "first", *dataset))
    assert shown["name"] == f"{feeds.parent}/exportJobs/first"
    assert shown["segments"] == [segment]


async def test_resources_are_named_by_id_within_the_dataset_or_by_full_name(
    feeds: Feeds,
) -> None:
    segment = await feeds.imported_segment("vip")
    other = await feeds.imported_segment("gold")
    await feeds.join(segment, "ann")
    in_env = {"AUDIENCE_DATASET": feeds.dataset}
    folder = str(feeds.root / "files")
    destination = printed(
        await run(feeds, "destinations", "create-folder", "local", folder, env=in_env)
    )["name"]
    schedule = printed(
        await run(
            feeds,
            "schedules",
            "create",
            "nightly",
            "--cron",
            "0 2 * * *",
            "--segment",
            "vip",
            "--destination",
            destination,
            "--paused",
            env=in_env,
        )
    )
    assert schedule["job_template"]["segments"] == [segment]
    assert schedule["job_template"]["destination"] == destination
    webhook = printed(
        await run(
            feeds,
            "webhooks",
            "create",
            "crm",
            "--dataset",
            feeds.dataset,
            "--url",
            "http://127.0.0.1:9/hook",
            "--secret",
            WEBHOOK_SECRET,
            "--segment",
            segment,
            "--segment",
            "gold",
        )
    )
    assert webhook["segments"] == [segment, other]

    for group, name in (
        ("destinations", destination),
        ("schedules", schedule["name"]),
        ("webhooks", webhook["name"]),
    ):
        by_id = await run(feeds, group, "get", name.rpartition("/")[2], "--dataset", feeds.dataset)
        by_name = await run(feeds, group, "get", name)
        assert printed(by_id)["name"] == printed(by_name)["name"] == name

    job = printed(await run(feeds, "schedules", "run", schedule["name"], "--wait"))
    assert job["state"] == "EXPORT_JOB_STATE_SUCCEEDED"
    job_id = job["name"].rpartition("/")[2]
    assert printed(await run(feeds, "jobs", "get", job["name"]))["name"] == job["name"]
    for filter_ in ("nightly", schedule["name"]):
        # Wide enough that the table shows whole job names.
        listed = await run(
            feeds, "jobs", "list", "--schedule", filter_, env={**in_env, "COLUMNS": "300"}
        )
        assert listed.exit_code == 0, listed.output
        assert job_id in listed.output

    by_id = await run(feeds, "csv", "vip", "--dataset", feeds.dataset)
    by_name = await run(feeds, "csv", segment)
    assert by_id.exit_code == by_name.exit_code == 0, by_id.output + by_name.output
    assert by_id.stdout == by_name.stdout
    assert "ann" in by_id.stdout

    deleted = await run(feeds, "webhooks", "delete", "crm", env=in_env)
    assert deleted.exit_code == 0, deleted.output
    assert f"Deleted {webhook['name']}" in deleted.output


@pytest.mark.parametrize(
    "args",
    [
        ("csv", "vip"),
        ("csv", "datasets/shop/segments/vip", "vip"),
        ("destinations", "get", "local"),
        ("destinations", "list"),
        ("jobs", "create", "--segment", "vip", "--destination", "datasets/shop/destinations/x"),
        ("jobs", "get", "first"),
        ("jobs", "cancel", "first"),
        ("schedules", "pause", "nightly"),
        ("webhooks", "deliveries", "crm"),
        ("webhooks", "replay", "crm"),
    ],
)
async def test_an_id_without_a_dataset_is_a_usage_error(args: tuple[str, ...]) -> None:
    # Refused before any call: nothing answers at this address.
    result = await invoke("127.0.0.1:1", "unused", args, {})

    assert result.exit_code == 2, result.output
    assert "give --dataset (or AUDIENCE_DATASET)" in result.output


async def test_a_bad_column_is_refused_before_calling(feeds: Feeds) -> None:
    result = await run(feeds, "csv", f"{feeds.parent}/segments/x", "--column", "nonsense")

    assert result.exit_code == 2
    assert "identity:TYPE or attribute:PATH" in result.output
