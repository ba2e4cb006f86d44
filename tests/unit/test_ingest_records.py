"""The bus encoding ingest builds by hand equals what protobuf would build."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from audience.bus.v1 import events_pb2 as bus_events_pb2
from audience.v1 import event_pb2, ingest_service_pb2
from services.ingest.ingestor import EventStatus
from services.ingest.records import DatasetRecords, receipt_fields, varint


def event(event_id: str, *, padding: int = 0) -> event_pb2.Event:
    made = event_pb2.Event(
        event_id=event_id, type=event_pb2.EVENT_TYPE_TRACK, name="view", user_id="u1"
    )
    if padding:
        made.properties["padding"].string_value = "x" * padding
    return made


def test_varints_match_protobufs_encoding() -> None:
    assert varint(0) == b"\x00"
    for value in (1, 127, 128, 300, 16383, 16384, 2**21, 2**31 - 1):
        encoded = bus_events_pb2.IngestedEvent(replay_count=value).SerializeToString()
        assert encoded == b"\x18" + varint(value)


@given(
    dataset=st.text(min_size=0, max_size=80),
    sizes=st.lists(st.integers(min_value=0, max_value=70_000), min_size=1, max_size=4),
    replay_count=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_records_concatenate_into_the_event_batch_encoding(
    dataset: str, sizes: list[int], replay_count: int
) -> None:
    events = [event(f"e{i}", padding=size) for i, size in enumerate(sizes)]
    records = DatasetRecords(dataset)

    joined = b"".join(
        records.record(e.SerializeToString(), replay_count=replay_count) for e in events
    )

    expected = bus_events_pb2.EventBatch(
        events=[
            bus_events_pb2.IngestedEvent(dataset=dataset, event=e, replay_count=replay_count)
            for e in events
        ]
    )
    assert joined == expected.SerializeToString()


def test_any_subset_of_records_is_a_batch_of_those_events() -> None:
    records = DatasetRecords("shop")
    encoded = [records.record(event(f"e{i}").SerializeToString()) for i in range(5)]

    batch = bus_events_pb2.EventBatch.FromString(encoded[0] + encoded[2] + encoded[4])

    assert [e.event.event_id for e in batch.events] == ["e0", "e2", "e4"]
    assert {e.dataset for e in batch.events} == {"shop"}


def test_receipt_fields_set_the_receipt_time_and_replace_what_the_client_sent() -> None:
    received_ns = 1_764_000_000_123_456_789
    sent = event("e1")
    sent.received_at.FromSeconds(5)  # output only: a client's value is replaced
    sent.received_at.nanos = 7
    records = DatasetRecords("shop")

    with_time = bus_events_pb2.EventBatch.FromString(
        records.record(sent.SerializeToString(), receipt_fields(received_ns, timestamp=True))
    ).events[0]
    without = bus_events_pb2.EventBatch.FromString(
        records.record(sent.SerializeToString(), receipt_fields(received_ns, timestamp=False))
    ).events[0]

    assert with_time.event.received_at.ToNanoseconds() == received_ns
    assert with_time.event.timestamp.ToNanoseconds() == received_ns
    assert without.event.received_at.ToNanoseconds() == received_ns
    assert not without.event.HasField("timestamp")
    assert with_time.event.event_id == "e1"


def test_a_receipt_on_a_whole_second_still_clears_the_clients_nanos() -> None:
    sent = event("e1")
    sent.received_at.nanos = 999
    encoded = DatasetRecords("d").record(
        sent.SerializeToString(), receipt_fields(1_764_000_000 * 10**9, timestamp=False)
    )
    received = bus_events_pb2.EventBatch.FromString(encoded).events[0].event.received_at
    assert (received.seconds, received.nanos) == (1_764_000_000, 0)


def test_event_statuses_have_the_values_of_the_public_enum() -> None:
    for status in EventStatus:
        assert status.value == ingest_service_pb2.EventStatus.Value(f"EVENT_STATUS_{status.name}")
