"""Ingest over gRPC: a real server on a local port, real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from audience.bus.v1 import events_pb2 as bus_events_pb2
from audience.errors import decode
from audience.streams import decode_entry
from audience.v1 import event_pb2, ingest_service_pb2, ingest_service_pb2_grpc
from services.ingest.app import DEFINITION as INGEST
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset

pytestmark = pytest.mark.e2e

ACCEPTED = ingest_service_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = ingest_service_pb2.EVENT_STATUS_DUPLICATE
REJECTED = ingest_service_pb2.EVENT_STATUS_REJECTED


def track(event_id: str, *, user: str = "u1", name: str = "product_view") -> event_pb2.Event:
    event = event_pb2.Event(
        event_id=event_id, type=event_pb2.EVENT_TYPE_TRACK, name=name, user_id=user
    )
    event.properties["category"].string_value = "shoes"
    return event


def stub(suite: RunningSuite) -> ingest_service_pb2_grpc.IngestServiceAsyncStub:
    return ingest_service_pb2_grpc.IngestServiceStub(suite.channel)  # type: ignore[return-value]


async def events_on_bus(suite: RunningSuite) -> list[bus_events_pb2.IngestedEvent]:
    bus = suite.resources.bus
    found: list[bus_events_pb2.IngestedEvent] = []
    for partition in range(bus.partitions):
        entries: Any = await bus.redis.xrange(bus.stream_key("events", partition))
        for _, fields in entries:
            payload, _ = decode_entry(fields)
            found.extend(bus_events_pb2.EventBatch.FromString(payload).events)
    return found


async def test_an_invalid_event_fails_with_invalid_argument_and_its_field_violations(
    start_suite: StartSuite,
) -> None:
    async with start_suite([INGEST]) as suite:
        event = track("e1", name="has spaces")
        event.properties["price"].number_value = float("nan")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(suite).SendEvent(
                ingest_service_pb2.SendEventRequest(parent=f"datasets/{new_dataset()}", event=event)
            )
    error = decode(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_EVENT"
    assert {v.field for v in error.violations} == {"event.name", "event.properties.price"}


async def test_a_parent_that_is_not_a_dataset_is_refused_naming_parent(
    start_suite: StartSuite,
) -> None:
    async with start_suite([INGEST]) as suite:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(suite).SendEvents(
                ingest_service_pb2.SendEventsRequest(
                    parent="datasets/Not_Valid", events=[track("e")]
                )
            )
    error = decode(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == ["parent"]


async def test_send_event_acknowledges_once_the_event_is_on_the_bus_and_a_repeat_as_duplicate(
    start_suite: StartSuite,
) -> None:
    dataset = new_dataset()
    async with start_suite([INGEST]) as suite:
        request = ingest_service_pb2.SendEventRequest(
            parent=f"datasets/{dataset}", event=track("e1")
        )
        first = await stub(suite).SendEvent(request)
        second = await stub(suite).SendEvent(request)
        on_bus = await events_on_bus(suite)
    assert first.result.status == ACCEPTED
    assert second.result.status == DUPLICATE
    assert [(e.dataset, e.event.event_id) for e in on_bus] == [(dataset, "e1")]
    assert on_bus[0].event.HasField("received_at")


async def test_a_mixed_batch_gets_a_result_per_event_and_only_valid_events_are_appended(
    start_suite: StartSuite,
) -> None:
    async with start_suite([INGEST]) as suite:
        events = [track("a"), track("b", name=""), track("a"), track("c", user="u2")]
        response = await stub(suite).SendEvents(
            ingest_service_pb2.SendEventsRequest(parent=f"datasets/{new_dataset()}", events=events)
        )
        on_bus = await events_on_bus(suite)
    assert [r.status for r in response.results] == [ACCEPTED, REJECTED, DUPLICATE, ACCEPTED]
    assert [r.event_id for r in response.results] == ["a", "b", "a", "c"]
    assert [(v.field, v.reason) for v in response.results[1].violations] == [
        ("events[1].name", "REQUIRED")
    ]
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (2, 1, 1)
    assert sorted(e.event.event_id for e in on_bus) == ["a", "c"]


def as_sent(event_id: str) -> bytes:
    """An event encoded with its fields last to first, as no protobuf library writes them."""
    parts = [
        event_pb2.Event(event_id=event_id),
        event_pb2.Event(type=event_pb2.EVENT_TYPE_TRACK),
        event_pb2.Event(name="product_view"),
        event_pb2.Event(user_id="u1"),
    ]
    return b"".join(part.SerializeToString() for part in reversed(parts))


def events_then_parent(dataset: str | None, events: list[bytes]) -> bytes:
    """A batch request's bytes with the events (field 2) before the parent (field 1)."""
    encoded = b"".join(b"\x12" + bytes([len(event)]) + event for event in events)
    if dataset is not None:
        encoded += ingest_service_pb2.SendEventsRequest(
            parent=f"datasets/{dataset}"
        ).SerializeToString()
    return encoded


async def payloads_on_bus(suite: RunningSuite) -> bytes:
    bus = suite.resources.bus
    found = b""
    for partition in range(bus.partitions):
        entries: Any = await bus.redis.xrange(bus.stream_key("events", partition))
        found += b"".join(decode_entry(fields)[0] for _, fields in entries)
    return found


async def test_the_bus_holds_each_event_of_a_batch_as_the_client_encoded_it(
    start_suite: StartSuite,
) -> None:
    # Ingest reads the events from the request's bytes as they came, not encoded again.
    sent = [as_sent("a"), as_sent("b")]
    async with start_suite([INGEST]) as suite:
        send = suite.channel.unary_unary(
            "/audience.v1.IngestService/SendEvents",
            response_deserializer=ingest_service_pb2.SendEventsResponse.FromString,
        )
        response = await send(events_then_parent(new_dataset(), sent))

        async def requests() -> AsyncIterator[bytes]:
            yield events_then_parent(new_dataset(), [as_sent("c")])
            yield events_then_parent(None, [as_sent("d")])

        stream = suite.channel.stream_stream(
            "/audience.v1.IngestService/StreamEvents",
            response_deserializer=ingest_service_pb2.StreamEventsResponse.FromString,
        )
        streamed = [r async for r in stream(requests())]
        on_bus = await payloads_on_bus(suite)
    assert [r.status for r in response.results] == [ACCEPTED, ACCEPTED]
    assert [r.results[0].status for r in streamed] == [ACCEPTED, ACCEPTED]
    for event_id in "abcd":
        assert as_sent(event_id) in on_bus


async def test_a_batch_that_does_not_parse_is_invalid_argument_naming_the_event(
    start_suite: StartSuite,
) -> None:
    async with start_suite([INGEST]) as suite:
        send = suite.channel.unary_unary("/audience.v1.IngestService/SendEvents")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(events_then_parent(new_dataset(), [as_sent("a"), b"\x0a\x05ab"]))
    error = decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert [v.field for v in error.violations] == ["events[1]"]


async def test_a_batch_over_the_limit_is_refused_naming_events(start_suite: StartSuite) -> None:
    async with start_suite([INGEST]) as suite:
        events = [track(f"e{i}") for i in range(1001)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(suite).SendEvents(
                ingest_service_pb2.SendEventsRequest(
                    parent=f"datasets/{new_dataset()}", events=events
                )
            )
    error = decode(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == ["events"]


async def test_stream_events_answers_each_batch_in_order_once_durable(
    start_suite: StartSuite,
) -> None:
    dataset = new_dataset()

    async def batches() -> AsyncIterator[ingest_service_pb2.StreamEventsRequest]:
        yield ingest_service_pb2.StreamEventsRequest(
            parent=f"datasets/{dataset}", events=[track(f"s{i}") for i in range(10)]
        )
        for batch in range(1, 6):
            yield ingest_service_pb2.StreamEventsRequest(
                events=[track(f"s{batch * 10 + i}") for i in range(10)] + [track("s0")]
            )

    async with start_suite([INGEST]) as suite:
        responses = [r async for r in stub(suite).StreamEvents(batches())]
        on_bus = await events_on_bus(suite)
    assert len(responses) == 6
    assert [r.event_id for r in responses[2].results] == [f"s{20 + i}" for i in range(10)] + ["s0"]
    assert all(r.results[-1].status == DUPLICATE for r in responses[1:])
    assert len(on_bus) == 60


async def test_stream_events_answers_a_batch_before_the_next_is_sent(
    start_suite: StartSuite,
) -> None:
    async with start_suite([INGEST]) as suite:
        call = stub(suite).StreamEvents()
        await call.write(
            ingest_service_pb2.StreamEventsRequest(
                parent=f"datasets/{new_dataset()}", events=[track("one")]
            )
        )
        first = await asyncio.wait_for(call.read(), timeout=10)
        await call.write(ingest_service_pb2.StreamEventsRequest(events=[track("two")]))
        second = await asyncio.wait_for(call.read(), timeout=10)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    assert [r.event_id for r in first.results] == ["one"]
    assert [r.event_id for r in second.results] == ["two"]


async def test_a_stream_that_changes_dataset_ends_with_invalid_argument_after_earlier_results(
    start_suite: StartSuite,
) -> None:
    async def batches() -> AsyncIterator[ingest_service_pb2.StreamEventsRequest]:
        yield ingest_service_pb2.StreamEventsRequest(
            parent=f"datasets/{new_dataset()}", events=[track("x")]
        )
        yield ingest_service_pb2.StreamEventsRequest(
            parent=f"datasets/{new_dataset()}", events=[track("y")]
        )

    async with start_suite([INGEST]) as suite:
        call = stub(suite).StreamEvents(batches())
        first = await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert [r.status for r in first.results] == [ACCEPTED]
    assert decode(caught.value).violations[0].field == "parent"


async def test_an_event_over_64_kib_is_rejected_and_a_message_over_the_limit_is_refused(
    start_suite: StartSuite,
) -> None:
    async with start_suite([INGEST], {"AUDIENCE_MAX_MESSAGE_BYTES": str(1024 * 1024)}) as suite:
        big = track("big")
        for i in range(10):
            big.properties[f"p{i}"].string_value = "x" * 8000
        response = await stub(suite).SendEvents(
            ingest_service_pb2.SendEventsRequest(
                parent=f"datasets/{new_dataset()}", events=[big, track("small")]
            )
        )
        huge = [track(f"h{i}") for i in range(200)]
        for event in huge:
            event.properties["blob"].string_value = "y" * 8000
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(suite).SendEvents(
                ingest_service_pb2.SendEventsRequest(
                    parent=f"datasets/{new_dataset()}", events=huge
                )
            )
        # The server is still up.
        again = await stub(suite).SendEvent(
            ingest_service_pb2.SendEventRequest(
                parent=f"datasets/{new_dataset()}", event=track("after")
            )
        )
    assert [r.status for r in response.results] == [REJECTED, ACCEPTED]
    assert [v.reason for v in response.results[0].violations] == ["EVENT_TOO_LARGE"]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert again.result.status == ACCEPTED


async def test_over_the_backlog_limit_calls_fail_with_resource_exhausted_and_a_retry_delay(
    start_suite: StartSuite,
) -> None:
    settings = {"AUDIENCE_INGEST_MAX_BACKLOG": "2", "AUDIENCE_INGEST_BACKLOG_INTERVAL": "20ms"}
    dataset = new_dataset()
    async with start_suite([INGEST], settings) as suite:
        for i in range(3):
            await stub(suite).SendEvent(
                ingest_service_pb2.SendEventRequest(
                    parent=f"datasets/{dataset}", event=track(f"e{i}")
                )
            )
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(suite).SendEvent(
                ingest_service_pb2.SendEventRequest(parent=f"datasets/{dataset}", event=track("e9"))
            )
    error = decode(caught.value)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "INGEST_BACKLOG_FULL"
    assert error.retry_delay is not None
    assert error.retry_delay.total_seconds() >= 1


# Keeps Redis busy for ARGV[1] milliseconds: every other client's command waits meanwhile.
_BUSY_REDIS = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000 + (now[2] - start[2]) / 1000 > tonumber(ARGV[1]) then
    return 1
  end
end
"""


async def test_a_burst_of_concurrent_calls_waits_for_redis_connections_rather_than_failing(
    start_suite: StartSuite,
) -> None:
    # Far more calls waiting on Redis at once than the pool has connections (64 at least).
    calls = 300
    async with start_suite([INGEST]) as suite:
        dataset = new_dataset()
        busy = asyncio.ensure_future(suite.resources.redis.eval(_BUSY_REDIS, 0, "500"))
        await asyncio.sleep(0.05)
        responses = await asyncio.gather(
            *(
                stub(suite).SendEvents(
                    ingest_service_pb2.SendEventsRequest(
                        parent=f"datasets/{dataset}", events=[track(f"burst-{n}", user=f"u{n}")]
                    ),
                    timeout=30,
                )
                for n in range(calls)
            ),
            return_exceptions=True,
        )
        await busy
        failed = [r for r in responses if isinstance(r, BaseException)]
        assert failed == []
        assert {r.results[0].status for r in responses} == {ACCEPTED}  # type: ignore[union-attr]
        on_bus = [e for e in await events_on_bus(suite) if e.dataset == dataset]
        assert len(on_bus) == calls
