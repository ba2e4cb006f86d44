"""What ingest encodes by hand for speed equals what the libraries would encode: the
results of a batch's response, and the append script's command in the Redis protocol."""

from __future__ import annotations

from datetime import timedelta

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from audience.streams import Bus
from audience.v1 import common_pb2, ingest_service_pb2
from services.ingest.appender import Appender, PartitionBatch, dedup_prefix
from services.ingest.grpc import _results
from services.ingest.ingestor import BatchResult, EventStatus
from services.ingest.validation import Violation

ACCEPTED, DUPLICATE, REJECTED = EventStatus.ACCEPTED, EventStatus.DUPLICATE, EventStatus.REJECTED


def built(result: BatchResult) -> ingest_service_pb2.SendEventsResponse:
    """The response built a message at a time."""
    response = ingest_service_pb2.SendEventsResponse()
    for index, (event_id, status) in enumerate(zip(result.event_ids, result.statuses, strict=True)):
        added = response.results.add(event_id=event_id, status=status.value)
        for v in result.violations.get(index, []):
            added.violations.append(
                common_pb2.FieldViolation(
                    field=f"events[{index}].{v.field}" if v.field else f"events[{index}]",
                    description=v.description,
                    reason=v.reason,
                )
            )
    return response


@pytest.mark.parametrize(
    ("event_ids", "statuses"),
    [
        (["e1", "e2", "e3"], [ACCEPTED] * 3),
        (["e1", "e2", "e3"], [DUPLICATE] * 3),
        (["a", "bb", "ccc"], [ACCEPTED] * 3),
        (["é1", "é2"], [ACCEPTED] * 2),
        (["x" * 123, "y" * 123], [ACCEPTED] * 2),
        (["x" * 124, "y" * 124], [ACCEPTED] * 2),
        (["x" * 128], [DUPLICATE]),
        (["e1", "e2", "e3"], [ACCEPTED, DUPLICATE, ACCEPTED]),
    ],
)
def test_results_encoded_by_hand_are_the_messages_encoding(
    event_ids: list[str], statuses: list[EventStatus]
) -> None:
    result = BatchResult(event_ids, statuses, {}, 0, 0)
    assert _results(result) == built(result).SerializeToString()


def test_results_of_rejected_events_carry_their_violations() -> None:
    violations = {
        1: [Violation("", "EVENT_TOO_LARGE", "Too large."), Violation("name", "REQUIRED", "?")]
    }
    result = BatchResult(["e1", "e2", "e3"], [ACCEPTED, REJECTED, ACCEPTED], violations, 2, 0)
    parsed = ingest_service_pb2.SendEventsResponse.FromString(_results(result))
    assert parsed == built(result)
    assert [v.field for v in parsed.results[1].violations] == ["events[1]", "events[1].name"]


@pytest.mark.parametrize("event_ids", [["e1", "e2"], ["a", "bbb"], ["é", "x"]])
def test_the_append_command_is_what_redis_py_would_send(event_ids: list[str]) -> None:
    redis = Redis()
    appender = Appender(Bus(redis, namespace="ns", partitions=2), window=timedelta(minutes=10))
    records = [b"\x0a\x01r", b"\x0a\x02rr"]
    batch = PartitionBatch(0, "shop", event_ids, records, [0, 1])

    packed = b"".join(appender._command(batch, b"$0\r\n\r\n"))

    expected = Connection().pack_command(
        "EVALSHA",
        appender._sha,
        1,
        appender.stream_key(0),
        "600000",
        "",
        b"".join(records),
        b"\x03\x00\x00\x00\x04\x00\x00\x00",
        dedup_prefix(appender.stream_key(0), "shop"),
        *event_ids,
    )
    assert packed == b"".join(expected)
