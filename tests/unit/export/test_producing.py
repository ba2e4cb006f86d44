"""The CSV producer over in-memory stand-ins for the segment engine and the profile service."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from services.export.domain.csvrows import CsvLayout
from services.export.domain.files import SegmentStats
from services.export.domain.model import (
    ChangeKind,
    ExportMode,
    Heartbeat,
    IdentityColumn,
    MemberPage,
    MembershipChange,
    MemberSnapshot,
    ProfileData,
)
from services.export.ports import SystemClock
from services.export.producing import CsvProducer

T0 = datetime(2024, 5, 1, tzinfo=UTC)


class Members:
    """Pages (each segment's after a snapshot) and a scripted change stream, as the segment
    engine would give them."""

    def __init__(
        self,
        pages: Mapping[str, Sequence[MemberPage]],
        stream: Sequence[MembershipChange | Heartbeat] = (),
    ) -> None:
        self._pages = pages
        self._stream = stream
        self.watch_starts: list[str | datetime | None] = []

    async def count(self, dataset: str, segment_id: str) -> int:
        return sum(len(page) for page in self._pages.get(segment_id, ()))

    async def pages(
        self, dataset: str, segment_id: str, *, versions: bool
    ) -> AsyncIterator[MemberSnapshot | MemberPage]:
        yield MemberSnapshot(f"token-{segment_id}", T0)
        for page in self._pages.get(segment_id, ()):
            yield page

    async def watch(
        self,
        dataset: str,
        segment_ids: Sequence[str],
        kind: ChangeKind | None,
        start: str | datetime | None,
        heartbeat_interval: timedelta,
    ) -> AsyncIterator[MembershipChange | Heartbeat]:
        self.watch_starts.append(start)
        for item in self._stream:
            yield item


class Profiles:
    def __init__(self, known: Mapping[str, ProfileData]) -> None:
        self._known = known
        self.requested: list[str] = []

    async def get_many(
        self, dataset: str, profile_ids: Sequence[str]
    ) -> Mapping[str, ProfileData | None]:
        self.requested.extend(profile_ids)
        return {profile_id: self._known.get(profile_id) for profile_id in profile_ids}


def page(segment: str, *ids: str) -> MemberPage:
    count = len(ids)
    return MemberPage(segment, list(ids), [1] * count, [1_714_521_600_000_000] * count)


def change(member: str, kind: ChangeKind, sequence: int, at: datetime) -> MembershipChange:
    return MembershipChange(
        resume_token=f"t{sequence}",
        member=f"datasets/d/profiles/{member}",
        member_id=member,
        segment_id="s",
        segment_version=1,
        kind=kind,
        change_time=at,
        member_sequence=sequence,
        cause="event",
        reason={},
    )


def producer(members: Members, profiles: Profiles | None = None, **options: int) -> CsvProducer:
    return CsvProducer(members, profiles or Profiles({}), SystemClock(), **options)  # type: ignore[arg-type]


async def test_members_of_every_segment_are_written_and_counted_per_segment() -> None:
    members = Members({"a": [page("a", "p1", "p2"), page("a", "p3")], "b": [page("b", "p1")]})
    stats: dict[str, SegmentStats] = {}
    layout = CsvLayout([], ExportMode.FULL)

    pieces = [piece async for piece in producer(members).members("d", ["a", "b"], layout, stats)]

    rows = list(csv.reader(io.StringIO("".join(piece.text for piece in pieces), newline="")))
    assert [row[:2] for row in rows] == [["p1", "a"], ["p2", "a"], ["p3", "a"], ["p1", "b"]]
    assert (stats["a"].rows, stats["b"].rows, stats["a"].versions) == (3, 1, {1})


async def test_profiles_are_read_only_for_identity_columns_and_erased_ones_skipped() -> None:
    members = Members({"a": [page("a", "p1", "erased", "p3")]})
    profiles = Profiles({"p1": ProfileData({"email": "1@x"}, {}), "p3": ProfileData({}, {})})
    layout = CsvLayout([IdentityColumn("email", "email")], ExportMode.FULL)
    stats: dict[str, SegmentStats] = {}

    pieces = [
        piece async for piece in producer(members, profiles).members("d", ["a"], layout, stats)
    ]

    assert [piece.text for piece in pieces] == ['1@x\r\n""\r\n']
    assert stats["a"].rows == 2
    assert profiles.requested == ["p1", "erased", "p3"]


async def test_pages_too_long_for_one_piece_are_split_on_row_boundaries() -> None:
    ids = [f"member-{i:04d}" for i in range(100)]
    members = Members({"a": [page("a", *ids)]})
    layout = CsvLayout([], ExportMode.FULL)

    pieces = [
        piece
        async for piece in producer(members, max_piece_chars=1000).members("d", ["a"], layout, {})
    ]

    assert len(pieces) > 1
    assert all(len(piece.text) <= 1000 and piece.text.endswith("\r\n") for piece in pieces)
    assert sum(piece.rows for piece in pieces) == 100


async def test_a_delta_read_stops_at_a_heartbeat_that_reaches_its_end() -> None:
    until = T0 + timedelta(hours=1)
    stream: list[MembershipChange | Heartbeat] = [
        change("p1", ChangeKind.JOIN, 1, T0 + timedelta(minutes=1)),
        Heartbeat("h1", T0 + timedelta(minutes=30)),
        change("p2", ChangeKind.LEAVE, 2, T0 + timedelta(minutes=40)),
        Heartbeat("h2", until + timedelta(seconds=1)),
        change("p3", ChangeKind.JOIN, 3, until + timedelta(minutes=5)),
    ]
    members = Members({}, stream)

    delta = await producer(members).read_delta("d", ["s"], "start-token", until)

    assert [(row.member_id, row.kind) for row in delta.rows] == [
        ("p1", ChangeKind.JOIN),
        ("p2", ChangeKind.LEAVE),
    ]
    assert (delta.resume_token, delta.end_time) == ("h2", until + timedelta(seconds=1))
    assert members.watch_starts == ["start-token"]


async def test_a_delta_read_stops_before_the_first_change_after_its_end() -> None:
    until = T0 + timedelta(hours=1)
    stream: list[MembershipChange | Heartbeat] = [
        change("p1", ChangeKind.JOIN, 1, T0),
        change("p2", ChangeKind.JOIN, 2, until + timedelta(seconds=1)),
        Heartbeat("h", until + timedelta(minutes=1)),
    ]

    delta = await producer(Members({}, stream)).read_delta("d", ["s"], "start", until)

    assert [row.member_id for row in delta.rows] == ["p1"]
    # The next run resumes after p1, so p2 is in it.
    assert (delta.resume_token, delta.end_time) == ("t1", until)


async def test_a_change_stream_that_ends_before_catching_up_fails_the_read() -> None:
    stream = [change("p1", ChangeKind.JOIN, 1, T0)]

    with pytest.raises(Exception, match="closed the change stream"):
        await producer(Members({}, stream)).read_delta("d", ["s"], "t", T0 + timedelta(hours=1))


async def test_each_segment_listed_reports_its_snapshot_empty_ones_too() -> None:
    members = Members({"a": [page("a", "p1")], "c": [page("c", "p2")]})
    snapshots: list[MemberSnapshot] = []
    layout = CsvLayout([], ExportMode.FULL)

    pieces = producer(members).members("d", ["a", "b", "c"], layout, {}, snapshots=snapshots)
    rows = [piece.rows async for piece in pieces]

    assert rows == [1, 1]
    assert [s.resume_token for s in snapshots] == ["token-a", "token-b", "token-c"]
