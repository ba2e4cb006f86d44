"""``MembershipService.StreamSegmentMembers`` over gRPC: a segment's members from one
snapshot, in chunks, and a token that continues the listing with the change stream."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from audience import rules
from audience.v1 import (
    membership_pb2,
    membership_service_pb2,
    segment_pb2,
    segment_service_pb2,
)
from services.segment_engine.app import DEFINITION
from tests.e2e.conftest import StartSuite, new_dataset
from tests.e2e.segment_engine.harness import Clients, fake_profile_definition, fake_profiles

pytestmark = pytest.mark.e2e

Response = membership_service_pb2.StreamSegmentMembersResponse
JOIN = membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN
LEAVE = membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE
ADD = segment_service_pb2.IMPORT_MODE_ADD
REMOVE = segment_service_pb2.IMPORT_MODE_REMOVE


@dataclass
class Engine:
    clients: Clients
    dataset: str

    async def imported(self, segment_id: str, ids: Sequence[str] = ()) -> str:
        created = await self.clients.segments.CreateSegment(
            segment_service_pb2.CreateSegmentRequest(
                parent=f"datasets/{self.dataset}",
                segment_id=segment_id,
                segment=segment_pb2.Segment(
                    kind=segment_pb2.SEGMENT_KIND_USER,
                    source=segment_pb2.SEGMENT_SOURCE_IMPORTED,
                ),
            ),
            timeout=10,
        )
        name: str = created.segment.name
        if ids:
            await self.upload(name, ADD, ids)
        return name

    async def upload(self, name: str, mode: int, ids: Sequence[str]) -> None:
        request = segment_service_pb2.ImportSegmentMembersRequest(
            segment=name,
            mode=segment_service_pb2.ImportMode.ValueType(mode),
            ids=segment_service_pb2.ImportedIds(ids=ids),
        )
        response = await self.clients.segments.ImportSegmentMembers(iter([request]), timeout=60)
        assert response.rejected_count == 0

    def stream(
        self, name: str, *, chunk_size: int = 0, versions: bool = False
    ) -> grpc.aio.UnaryStreamCall[membership_service_pb2.StreamSegmentMembersRequest, Response]:
        return self.clients.memberships.StreamSegmentMembers(
            membership_service_pb2.StreamSegmentMembersRequest(
                parent=name, chunk_size=chunk_size, include_segment_versions=versions
            ),
            timeout=60,
        )

    async def listed(self, name: str, page_size: int) -> list[membership_pb2.Membership]:
        """Every membership through ``ListSegmentMembers``, page by page."""
        found: list[membership_pb2.Membership] = []
        token = ""
        while True:
            page = await self.clients.memberships.ListSegmentMembers(
                membership_service_pb2.ListSegmentMembersRequest(
                    parent=name, page_size=page_size, page_token=token
                ),
                timeout=10,
            )
            found.extend(page.memberships)
            token = page.next_page_token
            if not token:
                return found


@contextlib.asynccontextmanager
async def engine(start_suite: StartSuite) -> AsyncIterator[Engine]:
    async with start_suite([DEFINITION, fake_profile_definition(fake_profiles())]) as suite:
        yield Engine(Clients(suite.channel), new_dataset())


def _ids(responses: Sequence[Response]) -> list[str]:
    return [member for response in responses for member in response.member_ids]


def _times(responses: Sequence[Response]) -> list[int]:
    return [micros for response in responses for micros in response.join_time_micros]


async def test_members_come_in_id_byte_order_in_chunks_with_the_snapshot_first(
    start_suite: StartSuite,
) -> None:
    ids = ["b", "B", "a", "é", "z", "ä", "~", "Z0", *(f"p{n:02d}" for n in range(17))]
    async with engine(start_suite) as e:
        name = await e.imported("vips", ids)
        segment = (
            await e.clients.segments.GetSegment(segment_service_pb2.GetSegmentRequest(name=name))
        ).segment
        before = time.time_ns() // 1000
        responses = [response async for response in e.stream(name, chunk_size=10)]
        listed = await e.listed(name, 10)

    assert [len(response.member_ids) for response in responses] == [10, 10, 5]
    assert [response.HasField("snapshot") for response in responses] == [True, False, False]
    snapshot = responses[0].snapshot
    assert snapshot.resume_token
    assert snapshot.segment_kind == segment_pb2.SEGMENT_KIND_USER
    assert snapshot.segment_version == segment.version
    assert snapshot.member_count == len(ids)
    assert abs(rules.micros_from_timestamp(snapshot.read_time) - before) < 10_000_000
    assert _ids(responses) == sorted(ids, key=str.encode)
    assert _ids(responses) == [m.member.rsplit("/", 1)[1] for m in listed]
    assert _times(responses) == [rules.micros_from_timestamp(m.join_time) for m in listed]
    assert all(not response.segment_versions for response in responses)


async def test_segment_versions_come_only_when_asked_for(start_suite: StartSuite) -> None:
    async with engine(start_suite) as e:
        name = await e.imported("vips", ["a", "b"])
        await e.upload(name, ADD, ["c"])
        responses = [response async for response in e.stream(name, versions=True)]
        listed = await e.listed(name, 1000)

    versions = [v for response in responses for v in response.segment_versions]
    assert versions == [m.segment_version for m in listed]
    assert versions[0] < versions[2]


async def test_streamed_members_equal_every_page_of_list_segment_members(
    start_suite: StartSuite,
) -> None:
    ids = [f"user-{n:06d}" for n in range(25_000)]
    async with engine(start_suite) as e:
        name = await e.imported("big", ids[::2])
        await e.upload(name, ADD, ids[1::2])
        responses = [response async for response in e.stream(name, versions=True)]
        listed = await e.listed(name, 10_000)

    assert [len(response.member_ids) for response in responses] == [10_000, 10_000, 5_000]
    assert responses[0].snapshot.member_count == len(ids)
    assert list(
        zip(
            _ids(responses),
            _times(responses),
            [v for response in responses for v in response.segment_versions],
            strict=True,
        )
    ) == [
        (
            m.member.removeprefix(f"datasets/{e.dataset}/profiles/"),
            rules.micros_from_timestamp(m.join_time),
            m.segment_version,
        )
        for m in listed
    ]


async def test_the_listing_holds_its_snapshot_and_its_token_watches_exactly_what_came_after(
    start_suite: StartSuite,
) -> None:
    before = [f"p{n:03d}" for n in range(0, 200, 2)]
    async with engine(start_suite) as e:
        name = await e.imported("vips", before)
        call = e.stream(name, chunk_size=1)
        first = await call.read()
        assert isinstance(first, Response)
        # Committed while the stream is open: ids between those listed, one listed leaving.
        await e.upload(name, ADD, ["p001", "p101", "p199"])
        await e.upload(name, REMOVE, ["p100"])
        # Read on as begun: gRPC refuses iteration after read() on the same call.
        rest: list[Response] = []
        while (response := await call.read()) is not grpc.aio.EOF:
            rest.append(response)
        request = membership_service_pb2.WatchMembershipChangesRequest(
            parent=f"datasets/{e.dataset}", resume_token=first.snapshot.resume_token
        )
        request.heartbeat_interval.seconds = 1
        watch = e.clients.memberships.WatchMembershipChanges(request, timeout=20)
        changes: list[membership_pb2.MembershipChange] = []
        # A heartbeat comes once the stream has caught up with the log.
        async for item in watch:
            if item.HasField("change"):
                changes.append(item.change)
            elif len(changes) >= 4:
                break
        watch.cancel()

    assert _ids([first, *rest]) == before
    assert first.snapshot.member_count == len(before)
    seen = [(c.member.rsplit("/", 1)[1], c.kind) for c in changes]
    assert sorted(seen[:3]) == [("p001", JOIN), ("p101", JOIN), ("p199", JOIN)]
    assert seen[3:] == [("p100", LEAVE)]


async def test_an_empty_segment_streams_its_snapshot_alone(start_suite: StartSuite) -> None:
    async with engine(start_suite) as e:
        name = await e.imported("empty")
        await e.upload(name, ADD, ["gone"])
        await e.upload(name, REMOVE, ["gone"])
        responses = [response async for response in e.stream(name)]

    assert len(responses) == 1
    assert responses[0].snapshot.resume_token
    assert responses[0].snapshot.member_count == 0
    assert not responses[0].member_ids


async def test_a_deleted_or_unknown_segment_is_not_found(start_suite: StartSuite) -> None:
    async with engine(start_suite) as e:
        name = await e.imported("doomed", ["a", "b"])
        await e.clients.segments.DeleteSegment(segment_service_pb2.DeleteSegmentRequest(name=name))
        for missing in (name, f"datasets/{e.dataset}/segments/never"):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                _ = [response async for response in e.stream(missing)]
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_chunk_of_long_ids_is_split_to_keep_responses_small(
    start_suite: StartSuite,
) -> None:
    ids = [f"{n:05d}" + "é" * 250 for n in range(2_200)]
    async with engine(start_suite) as e:
        name = await e.imported("long", ids)
        responses = [response async for response in e.stream(name)]

    assert len(responses) == 2
    assert _ids(responses) == ids
    assert len(_times(responses)) == len(ids)
    assert max(response.ByteSize() for response in responses) < 2 * 1024 * 1024 + 100_000


@pytest.mark.parametrize("chunk_size", [-1, 10_001])
async def test_a_chunk_size_out_of_range_is_invalid(
    start_suite: StartSuite, chunk_size: int
) -> None:
    async with engine(start_suite) as e:
        name = await e.imported("vips", ["a"])
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            _ = [response async for response in e.stream(name, chunk_size=chunk_size)]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
