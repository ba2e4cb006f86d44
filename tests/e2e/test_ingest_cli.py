"""``audience events send`` and ``audience failed-events list | replay`` against a real
ingest service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from audience.bus.v1 import events_pb2 as bus_events_pb2
from audience.cli.main import cli
from audience.streams import decode_entry
from audience.v1 import event_pb2, ingest_service_pb2, ingest_service_pb2_grpc, profile_pb2
from services.ingest.app import DEFINITION as INGEST
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset

pytestmark = pytest.mark.e2e


async def run(suite: RunningSuite, dataset: str, *args: str, input: str | None = None) -> Result:
    # The CLI runs its own event loop: off this one's thread.
    return await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        [args[0], args[1], "--address", suite.address, "--dataset", dataset, *args[2:]],
        input=input,
        # Wide enough that tables do not wrap their cells.
        env={"COLUMNS": "240", "AUDIENCE_API_KEY": suite.api_key},
    )


async def events_on_bus(suite: RunningSuite) -> list[bus_events_pb2.IngestedEvent]:
    bus = suite.resources.bus
    found: list[bus_events_pb2.IngestedEvent] = []
    for partition in range(bus.partitions):
        raw: Any = await bus.redis.xrange(bus.stream_key("events", partition))
        for _, fields in raw:
            payload, _ = decode_entry(fields)
            found.extend(bus_events_pb2.EventBatch.FromString(payload).events)
    return found


async def test_sending_one_event_from_flags_and_again_as_a_duplicate(
    start_suite: StartSuite,
) -> None:
    dataset = new_dataset()
    flags = ["--name", "product_view", "--user", "u1", "--event-id", "ev-1"]
    flags += ["--property", "category=shoes", "--property", "price=49.5"]
    async with start_suite([INGEST]) as suite:
        first = await run(suite, dataset, "events", "send", *flags)
        second = await run(suite, dataset, "events", "send", *flags)
        on_bus = await events_on_bus(suite)

    assert first.exit_code == 0, first.output
    assert "Accepted 1, duplicates 0, rejected 0." in first.output
    assert "Accepted 0, duplicates 1, rejected 0." in second.output
    (event,) = on_bus
    assert event.event.name == "product_view"
    assert event.event.properties["category"].string_value == "shoes"
    assert event.event.properties["price"].number_value == 49.5


async def test_sending_json_lines_from_a_file_reports_each_rejection_with_its_line(
    start_suite: StartSuite, tmp_path: Path
) -> None:
    lines = [
        {"eventId": "a", "type": "track", "name": "signup", "userId": "u1"},
        {"eventId": "b", "type": "identify", "userId": "u1", "traits": {"plan": "pro"}},
        {"eventId": "c", "type": "track", "name": "has spaces", "userId": "u1"},
        "not json",
        {"eventId": "a", "type": "track", "name": "signup", "userId": "u1"},
        {
            "eventId": "d",
            "type": "cart",
            "userId": "u2",
            "cart": {"items": [{"productId": "sku", "price": 10, "quantity": 2}]},
        },
    ]
    path = tmp_path / "events.jsonl"
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    dataset = new_dataset()
    async with start_suite([INGEST]) as suite:
        result = await run(
            suite, dataset, "events", "send", "--file", str(path), "--batch-size", "2"
        )
        on_bus = await events_on_bus(suite)

    assert result.exit_code == 1
    assert "Accepted 3, duplicates 1, rejected 2." in result.output
    assert "INVALID_NAME" in result.output
    assert "INVALID_LINE" in result.output
    assert sorted(e.event.event_id for e in on_bus) == ["a", "b", "d"]
    identify = next(e.event for e in on_bus if e.event.event_id == "b")
    assert identify.identify.traits["plan"].string_value == "pro"


async def test_sending_json_lines_from_stdin(start_suite: StartSuite) -> None:
    stdin = "".join(
        json.dumps({"eventId": f"s{i}", "name": "view", "anonymousId": f"a{i}"}) + "\n"
        for i in range(25)
    )
    async with start_suite([INGEST]) as suite:
        result = await run(
            suite, new_dataset(), "events", "send", "--file", "-", "--batch-size", "10", input=stdin
        )
    assert result.exit_code == 0, result.output
    assert "Accepted 25, duplicates 0, rejected 0." in result.output


async def test_event_flags_and_a_file_are_not_mixed(
    start_suite: StartSuite, tmp_path: Path
) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("")
    async with start_suite([INGEST]) as suite:
        result = await run(
            suite, new_dataset(), "events", "send", "--file", str(path), "--user", "u"
        )
    assert result.exit_code == 2
    assert "no event flags" in result.output


async def _publish_failure(suite: RunningSuite, dataset: str, event_id: str) -> None:
    event = event_pb2.Event(
        event_id=event_id, type=event_pb2.EVENT_TYPE_TRACK, name="view", user_id="u1"
    )
    record = bus_events_pb2.FailedEventRecord(
        event=bus_events_pb2.IngestedEvent(dataset=dataset, event=event),
        failure=profile_pb2.FailedEvent(
            stage="profile", reason="UNKNOWN_ACCOUNT", message="No such account."
        ),
    )
    payload = bus_events_pb2.FailedEventBatch(failures=[record]).SerializeToString()
    await suite.resources.bus.publish("failed-events", "u1", payload)


async def _wait_for_failed(suite: RunningSuite, dataset: str, count: int) -> list[Any]:
    stub: Any = ingest_service_pb2_grpc.IngestServiceStub(suite.channel)
    for _ in range(250):
        response = await stub.ListFailedEvents(
            ingest_service_pb2.ListFailedEventsRequest(parent=f"datasets/{dataset}")
        )
        if len(response.failed_events) >= count:
            return list(response.failed_events)
        await asyncio.sleep(0.02)
    raise AssertionError("the failed events were not kept")


async def test_failed_events_are_listed_and_replayed_from_the_command_line(
    start_suite: StartSuite,
) -> None:
    dataset = new_dataset()
    async with start_suite([INGEST]) as suite:
        await _publish_failure(suite, dataset, "lost-1")
        await _publish_failure(suite, dataset, "lost-2")
        failed = await _wait_for_failed(suite, dataset, 2)
        listed = await run(suite, dataset, "failed-events", "list")
        first_id = failed[-1].name.rsplit("/", 1)[-1]
        replayed_one = await run(suite, dataset, "failed-events", "replay", first_id)
        replayed_rest = await run(
            suite, dataset, "failed-events", "replay", "--all", "--reason", "UNKNOWN_ACCOUNT"
        )
        neither = await run(suite, dataset, "failed-events", "replay")
        on_bus = await events_on_bus(suite)
        after = await _wait_for_failed(suite, dataset, 2)

    assert listed.exit_code == 0, listed.output
    assert "lost-1" in listed.output
    assert "UNKNOWN_ACCOUNT" in listed.output
    assert replayed_one.output.strip() == "Replayed 1 failed event."
    assert replayed_rest.output.strip() == "Replayed 1 failed event."
    assert neither.exit_code == 2
    assert sorted((e.event.event_id, e.replay_count) for e in on_bus) == [
        ("lost-1", 1),
        ("lost-2", 1),
    ]
    assert [f.replay_count for f in after] == [1, 1]
    assert all(f.HasField("replay_time") for f in after)


async def test_an_empty_list_and_an_unknown_failed_event_say_so(start_suite: StartSuite) -> None:
    dataset = new_dataset()
    async with start_suite([INGEST]) as suite:
        listed = await run(suite, dataset, "failed-events", "list")
        result = await run(suite, dataset, "failed-events", "replay", "12345678")
    assert listed.output.strip() == f"No failed events in {dataset}."
    assert result.exit_code == 1
    assert "NOT_FOUND" in result.output
