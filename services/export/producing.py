"""Producing CSV: the rows of a download or of an export file, from the segment engine's
members or change stream and, for identity and attribute columns, the profiles."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from opentelemetry import metrics

from audience.errors import unavailable
from services.export.domain.csvrows import CsvLayout, DeltaRow
from services.export.domain.delta import DeltaAccumulator
from services.export.domain.files import SegmentStats
from services.export.domain.model import ChangeKind, Heartbeat, MemberPage, MemberSnapshot
from services.export.domain.names import segment_name
from services.export.ports import Clock, MembershipReader, ProfileReader

__all__ = ["CsvProducer", "DeltaRead", "Piece"]

_log = logging.getLogger(__name__)

# Changes of a delta are written (and their profiles read) this many rows at a time.
_DELTA_BATCH = 10_000

_FROM_MEMBERS = {"audience.export.source": "members"}
_FROM_CHANGES = {"audience.export.source": "changes"}


@dataclass(frozen=True, slots=True)
class Piece:
    """CSV text ending on a row boundary, with how many rows it holds."""

    text: str
    rows: int


@dataclass(frozen=True, slots=True)
class DeltaRead:
    """The net changes read from the change stream, and where the read stopped."""

    rows: list[DeltaRow]
    resume_token: str
    end_time: datetime


def _split(page: MemberPage) -> tuple[MemberPage, MemberPage]:
    half = len(page) // 2

    def part(lo: int, hi: int | None) -> MemberPage:
        return MemberPage(
            segment_id=page.segment_id,
            member_ids=page.member_ids[lo:hi],
            versions=page.versions[lo:hi] if page.versions is not None else None,
            join_micros=page.join_micros[lo:hi],
        )

    return part(0, half), part(half, None)


class CsvProducer:
    """Reads members or changes and encodes them with a :class:`CsvLayout`.

    Args:
        members: the segment engine.
        profiles: the profile service, read only for identity and attribute columns.
        clock: the service's clock.
        heartbeat_interval: asked of the change stream; a delta read knows it has caught up
            when a heartbeat reaches the read's end time.
        catch_up_timeout: how long a delta read may take before it fails.
        max_piece_chars: pages whose text is longer are split, keeping messages and writes
            bounded however wide the rows.
        meter: counts the rows produced, by source (members, changes); no-op by default.
    """

    def __init__(
        self,
        members: MembershipReader,
        profiles: ProfileReader,
        clock: Clock,
        *,
        heartbeat_interval: timedelta = timedelta(seconds=1),
        catch_up_timeout: timedelta = timedelta(minutes=5),
        max_piece_chars: int = 2 * 1024 * 1024,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._members = members
        self._profiles = profiles
        self._clock = clock
        self._heartbeat = heartbeat_interval
        self._catch_up_timeout = catch_up_timeout
        self._max_piece_chars = max_piece_chars
        self._rows = (meter or metrics.NoOpMeter(__name__)).create_counter(
            "audience.export.rows",
            unit="{row}",
            description="CSV rows produced for downloads and export files, by source.",
        )

    async def count(self, dataset: str, segment_ids: Sequence[str]) -> int:
        counts = await asyncio.gather(
            *(self._members.count(dataset, segment_id) for segment_id in segment_ids)
        )
        return sum(counts)

    async def members(
        self,
        dataset: str,
        segment_ids: Sequence[str],
        layout: CsvLayout,
        stats: dict[str, SegmentStats],
        *,
        versions: bool = True,
        snapshots: list[MemberSnapshot] | None = None,
    ) -> AsyncIterator[Piece]:
        """Every member of each segment in turn, each segment from one snapshot of the
        engine, as pieces of CSV (no header).

        Members whose profile is gone when it is read (erased meanwhile) are left out.
        Without ``versions`` the segment versions are not read (nor counted in ``stats``)
        unless the layout writes them. Each segment's snapshot is appended to
        ``snapshots`` as its listing begins.
        """
        versions = versions or layout.needs_versions
        for segment_id in segment_ids:
            segment_stats = stats.setdefault(
                segment_id, SegmentStats(segment_name(dataset, segment_id))
            )
            async for page in self._members.pages(dataset, segment_id, versions=versions):
                if isinstance(page, MemberSnapshot):
                    if snapshots is not None:
                        snapshots.append(page)
                    continue
                if page.versions is not None:
                    segment_stats.versions.update(page.versions)
                pending = [page]
                while pending:
                    part = pending.pop(0)
                    profiles = None
                    if layout.needs_profiles:
                        profiles = await self._profiles.get_many(dataset, part.member_ids)
                    text, rows = layout.encode_members(part, profiles)
                    if len(text) > self._max_piece_chars and len(part) > 1:
                        pending[:0] = _split(part)
                        continue
                    segment_stats.rows += rows
                    segment_stats.joins += rows
                    if rows:
                        self._rows.add(rows, _FROM_MEMBERS)
                        yield Piece(text, rows)

    async def read_delta(
        self, dataset: str, segment_ids: Sequence[str], resume_token: str, until: datetime
    ) -> DeltaRead:
        """The net joins and leaves after ``resume_token`` up to ``until``.

        Stops at a heartbeat at or past ``until`` (resuming from its token next time), or
        before the first change after ``until`` (resuming from the last change taken).

        Raises:
            ResumePointExpiredError: the token is older than the change log keeps.
        """
        accumulator = DeltaAccumulator()
        token = resume_token
        end = until
        async with asyncio.timeout(self._catch_up_timeout.total_seconds()):
            async for item in self._members.watch(
                dataset, segment_ids, None, resume_token, self._heartbeat
            ):
                if isinstance(item, Heartbeat):
                    token = item.resume_token or token
                    if item.time >= until:
                        end = item.time
                        break
                    continue
                if item.change_time > until:
                    break
                accumulator.add(item)
                token = item.resume_token or token
            else:
                raise unavailable("the segment engine closed the change stream while catching up")
        return DeltaRead(accumulator.rows(), token, end)

    async def changes(
        self,
        dataset: str,
        delta: Sequence[DeltaRow],
        layout: CsvLayout,
        stats: dict[str, SegmentStats],
    ) -> AsyncIterator[Piece]:
        """The rows of a delta as pieces of CSV (no header)."""
        for start in range(0, len(delta), _DELTA_BATCH):
            batch = delta[start : start + _DELTA_BATCH]
            profiles = None
            if layout.needs_profiles:
                profiles = await self._profiles.get_many(dataset, [row.member_id for row in batch])
            text, rows = layout.encode_changes(batch, profiles)
            written = (
                batch
                if profiles is None
                else [row for row in batch if profiles.get(row.member_id) is not None]
            )
            for row in written:
                segment_stats = stats.setdefault(
                    row.segment_id, SegmentStats(segment_name(dataset, row.segment_id))
                )
                segment_stats.rows += 1
                segment_stats.versions.add(row.segment_version)
                if row.kind is ChangeKind.JOIN:
                    segment_stats.joins += 1
                else:
                    segment_stats.leaves += 1
            if rows:
                self._rows.add(rows, _FROM_CHANGES)
                yield Piece(text, rows)
