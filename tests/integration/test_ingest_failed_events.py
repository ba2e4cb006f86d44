"""Failed events against real PostgreSQL and Redis: kept from the bus, listed, replayed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from audience import db
from audience.bus.v1 import events_pb2 as bus_events_pb2
from audience.errors import AudienceError
from audience.streams import Bus, decode_entry
from audience.v1 import event_pb2, profile_pb2
from services.ingest.appender import EVENTS_TOPIC
from services.ingest.consumer import INGEST_GROUP, consume_failed_events
from services.ingest.failed import FAILED_EVENTS_TOPIC, FailedEvents, failed_event_name
from services.ingest.store import FailedEventStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(postgres_dsn, min_size=1, max_size=4)
    await db.migrate(pool, schema="ingest", migrations=files("services.ingest") / "migrations")
    yield pool
    await pool.close()


@pytest.fixture
async def bus(redis_url: str, key_prefix: str) -> AsyncIterator[Bus]:
    client = Redis.from_url(redis_url)
    bus = Bus(client, namespace=key_prefix, partitions=4)
    await bus.declare(EVENTS_TOPIC, ["profile"])
    await bus.declare(FAILED_EVENTS_TOPIC, [INGEST_GROUP])
    yield bus
    await client.aclose()


@pytest.fixture
def dataset() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def failed(pool: asyncpg.Pool, bus: Bus) -> FailedEvents:
    return FailedEvents(FailedEventStore(pool), bus)


def failure(
    dataset: str, event_id: str, *, reason: str = "UNKNOWN_ACCOUNT", attempt: int = 0
) -> bus_events_pb2.FailedEventRecord:
    event = event_pb2.Event(
        event_id=event_id, type=event_pb2.EVENT_TYPE_TRACK, name="view", user_id=f"u-{event_id}"
    )
    record = bus_events_pb2.FailedEventRecord(
        event=bus_events_pb2.IngestedEvent(dataset=dataset, event=event, replay_count=attempt),
        failure=profile_pb2.FailedEvent(stage="profile", reason=reason, message="No such account."),
    )
    record.failure.fail_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    return record


def batch(*records: bus_events_pb2.FailedEventRecord) -> bytes:
    return bus_events_pb2.FailedEventBatch(failures=records).SerializeToString()


async def events_on_bus(bus: Bus) -> list[bus_events_pb2.IngestedEvent]:
    found: list[bus_events_pb2.IngestedEvent] = []
    for partition in range(bus.partitions):
        raw: Any = await bus.redis.xrange(bus.stream_key(EVENTS_TOPIC, partition))
        for _, fields in raw:
            payload, _ = decode_entry(fields)
            found.extend(bus_events_pb2.EventBatch.FromString(payload).events)
    return found


async def test_failures_published_on_the_bus_are_kept_once_and_acknowledged(
    bus: Bus, failed: FailedEvents, dataset: str
) -> None:
    payload = batch(failure(dataset, "e1"), failure(dataset, "e2", reason="BAD_CART"))
    await bus.publish(FAILED_EVENTS_TOPIC, "u-e1", payload)
    # The same report delivered again (the profile service retried) changes nothing.
    await bus.publish(FAILED_EVENTS_TOPIC, "u-e1", payload)
    consuming = asyncio.create_task(consume_failed_events(bus, failed, name="test"))
    try:
        for _ in range(200):
            if await bus.backlog(FAILED_EVENTS_TOPIC, INGEST_GROUP) == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        consuming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consuming

    page = await failed.page(dataset, page_size=0, page_token="", reason="")
    assert [(r.event_id, r.reason, r.stage, r.replay_count) for r in page.rows] == [
        ("e2", "BAD_CART", "profile", 0),
        ("e1", "UNKNOWN_ACCOUNT", "profile", 0),
    ]
    assert page.rows[0].fail_time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert event_pb2.Event.FromString(page.rows[0].event).user_id == "u-e2"
    assert page.next_page_token == ""


async def test_a_malformed_message_is_skipped_and_the_rest_kept(
    failed: FailedEvents, dataset: str
) -> None:
    assert await failed.record([b"\xff\xff not a batch", batch(failure(dataset, "ok"))]) == 1
    page = await failed.page(dataset, page_size=10, page_token="", reason="")
    assert [r.event_id for r in page.rows] == ["ok"]


async def test_failed_events_page_newest_first_and_filter_by_reason(
    failed: FailedEvents, dataset: str
) -> None:
    for i in range(5):
        await failed.record([batch(failure(dataset, f"e{i}", reason="ODD" if i % 2 else "EVEN"))])

    first = await failed.page(dataset, page_size=2, page_token="", reason="")
    second = await failed.page(dataset, page_size=2, page_token=first.next_page_token, reason="")
    last = await failed.page(dataset, page_size=2, page_token=second.next_page_token, reason="")
    odd = await failed.page(dataset, page_size=10, page_token="", reason="ODD")

    assert [r.event_id for r in first.rows + second.rows + last.rows] == [
        "e4",
        "e3",
        "e2",
        "e1",
        "e0",
    ]
    assert last.next_page_token == ""
    assert [r.event_id for r in odd.rows] == ["e3", "e1"]
    with pytest.raises(AudienceError) as wrong_token:
        await failed.page(dataset, page_size=2, page_token=first.next_page_token, reason="ODD")
    assert wrong_token.value.violations[0].field == "page_token"


async def test_replaying_named_events_puts_them_back_on_the_bus_counted(
    bus: Bus, failed: FailedEvents, dataset: str
) -> None:
    await failed.record([batch(failure(dataset, "e1"), failure(dataset, "e2"))])
    rows = (await failed.page(dataset, page_size=10, page_token="", reason="")).rows
    e1 = next(r for r in rows if r.event_id == "e1")

    assert await failed.replay(dataset, names=[failed_event_name(e1)], reason="") == 1

    replayed = await events_on_bus(bus)
    assert [(e.dataset, e.event.event_id, e.replay_count) for e in replayed] == [(dataset, "e1", 1)]
    after = {
        r.event_id: r
        for r in (await failed.page(dataset, page_size=10, page_token="", reason="")).rows
    }
    assert after["e1"].replay_count == 1
    assert after["e1"].replay_time is not None
    assert after["e2"].replay_count == 0


async def test_replaying_everything_takes_only_events_awaiting_a_replay_with_the_reason(
    bus: Bus, failed: FailedEvents, dataset: str
) -> None:
    await failed.record(
        [batch(failure(dataset, "a"), failure(dataset, "b"), failure(dataset, "c", reason="X"))]
    )

    assert await failed.replay(dataset, names=[], reason="UNKNOWN_ACCOUNT") == 2
    assert await failed.replay(dataset, names=[], reason="UNKNOWN_ACCOUNT") == 0
    # The replayed "a" fails again: it awaits a replay once more, with the new reason.
    await failed.record([batch(failure(dataset, "a", reason="STILL_BAD", attempt=1))])
    # A late copy of the first report does not undo that.
    await failed.record([batch(failure(dataset, "a", attempt=0))])
    assert await failed.replay(dataset, names=[], reason="") == 2

    counts: dict[str, list[int]] = {}
    for event in await events_on_bus(bus):
        counts.setdefault(event.event.event_id, []).append(event.replay_count)
    assert {key: sorted(value) for key, value in counts.items()} == {
        "a": [1, 2],
        "b": [1],
        "c": [1],
    }
    rows = {
        r.event_id: r
        for r in (await failed.page(dataset, page_size=10, page_token="", reason="")).rows
    }
    assert rows["a"].reason == "STILL_BAD"
    assert rows["a"].replay_count == 2


async def test_replay_refuses_names_of_another_dataset_and_unknown_ones(
    failed: FailedEvents, dataset: str
) -> None:
    with pytest.raises(AudienceError) as other:
        await failed.replay(dataset, names=["datasets/other/failedEvents/1"], reason="")
    with pytest.raises(AudienceError) as missing:
        await failed.replay(
            dataset, names=[f"datasets/{dataset}/failedEvents/999999999"], reason=""
        )

    assert other.value.violations[0].field == "names[0]"
    assert missing.value.code.name == "NOT_FOUND"
