"""The segment engine on its own, fed profile changes straight onto the bus.

``FakeProfiles`` stands in for the profile service: it holds the views a test publishes
and answers ``QueryProfiles`` by evaluating the compiled rule over them in Python, and
registers aggregates as ready at once. Tests of the whole pipeline use the real services.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import grpc
import grpc.aio

from audience import rules
from audience.bus.v1 import profile_change_pb2
from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.streams import Bus
from audience.v1 import (
    membership_service_pb2,
    membership_service_pb2_grpc,
    profile_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)

PROFILE_CHANGES = "profile-changes"


def fake_profiles() -> FakeProfiles:
    return FakeProfiles()  # type: ignore[abstract]


def now_micros() -> int:
    return time.time_ns() // 1000


@dataclass
class FakeProfiles(profile_service_pb2_grpc.ProfileServiceServicer):
    """Views by (dataset, kind, id); rule queries evaluated over them. The other methods
    answer UNIMPLEMENTED (the generated base class)."""

    views: dict[tuple[str, int, str], profile_change_pb2.EvaluationView] = field(
        default_factory=dict
    )
    registered: dict[str, profile_pb2.AggregateSpec] = field(default_factory=dict)
    queries: int = 0
    # Seconds each streamed response waits, to catch a backfill midway.
    delay: float = 0.0

    async def RegisterAggregates(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.RegisterAggregatesResponse:
        out = []
        for spec in request.aggregates:
            copy = profile_pb2.AggregateSpec()
            copy.CopyFrom(spec)
            copy.aggregate_id = copy.aggregate_id or rules.aggregate_id(spec)
            copy.state = profile_pb2.AggregateSpec.STATE_READY
            self.registered[copy.aggregate_id] = copy
            out.append(copy)
        return profile_service_pb2.RegisterAggregatesResponse(aggregates=out)

    async def ListAggregates(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.ListAggregatesResponse:
        return profile_service_pb2.ListAggregatesResponse(aggregates=list(self.registered.values()))

    async def QueryProfiles(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[profile_service_pb2.QueryProfilesResponse]:
        self.queries += 1
        dataset = request.parent.removeprefix("datasets/")
        compiled = rules.compile_rule(request.rule, request.kind)
        now = rules.micros_from_timestamp(request.evaluation_time)
        referenced = {
            ref.segment: (
                rules.compile_rule(ref.rule, request.kind)
                if ref.HasField("rule")
                else set(ref.members.profile_ids)
            )
            for ref in request.referenced_segments
        }
        subjects = sorted(
            key[2] for key in self.views if key[0] == dataset and key[1] == request.kind
        )
        matched: list[str] = []
        for subject in subjects:
            view = rules.view_from_proto(self.views[(dataset, request.kind, subject)], subject)
            names: set[str] = set()
            for name, definition in referenced.items():
                if isinstance(definition, set):
                    if subject in definition:
                        names.add(name)
                elif definition.matches(view, now, names):
                    names.add(name)
            if compiled.matches(view, now, names):
                matched.append(subject)
        if request.limit:
            matched = matched[: request.limit]
        chunk = request.chunk_size or 10_000
        if request.count_only or not matched:
            yield profile_service_pb2.QueryProfilesResponse(
                scanned_count=len(subjects),
                total_count=len(subjects),
                matched_count=len(matched),
            )
            return
        for start in range(0, len(matched), chunk):
            await asyncio.sleep(self.delay)
            part = matched[start : start + chunk]
            yield profile_service_pb2.QueryProfilesResponse(
                profile_ids=part,
                scanned_count=len(subjects),
                total_count=len(subjects),
                matched_count=start + len(part),
            )


def fake_profile_definition(fake: FakeProfiles) -> ServiceDefinition:
    async def build(resources: Resources) -> ServiceUnit:
        return ServiceUnit(
            name="fake-profile",
            service_names=("audience.v1.ProfileService",),
            add_to_server=lambda server: (
                profile_service_pb2_grpc.add_ProfileServiceServicer_to_server(fake, server)
            ),
        )

    return ServiceDefinition(
        name="fake-profile",
        schema="fake_profile",
        # A folder without SQL files: the fake keeps everything in memory.
        migrations=files("tests.e2e.segment_engine"),
        build=build,
    )


class Feed:
    """Publishes profile changes for a dataset, numbering each subject's sequence."""

    def __init__(self, bus: Bus, dataset: str, fake: FakeProfiles | None = None) -> None:
        self.bus = bus
        self.dataset = dataset
        self.fake = fake
        self._sequences: dict[tuple[int, str], int] = {}
        self._events = itertools.count(1)

    def next_sequence(self, kind: int, subject: str) -> int:
        value = self._sequences.get((kind, subject), 0) + 1
        self._sequences[(kind, subject)] = value
        return value

    def change(
        self,
        subject: str,
        view: profile_change_pb2.EvaluationView,
        keys: Iterable[str],
        *,
        kind: int = segment_pb2.SEGMENT_KIND_USER,
        events: int = 1,
    ) -> profile_change_pb2.ProfileChange:
        change = profile_change_pb2.ProfileChange(
            dataset=self.dataset,
            kind=segment_pb2.SegmentKind.ValueType(kind),
            profile_id=subject,
            sequence=self.next_sequence(kind, subject),
            type=profile_change_pb2.PROFILE_CHANGE_TYPE_UPDATED,
            event_ids=[f"ev-{next(self._events)}" for _ in range(events)],
            changed_keys=list(keys),
            view=view,
            change_time=rules.timestamp_from_micros(now_micros()),
        )
        if self.fake is not None:
            self.fake.views[(self.dataset, kind, subject)] = view
        return change

    def erased(self, subject: str, kind: int = 1) -> profile_change_pb2.ProfileChange:
        if self.fake is not None:
            self.fake.views.pop((self.dataset, kind, subject), None)
        return profile_change_pb2.ProfileChange(
            dataset=self.dataset,
            kind=segment_pb2.SegmentKind.ValueType(kind),
            profile_id=subject,
            sequence=self.next_sequence(kind, subject),
            type=profile_change_pb2.PROFILE_CHANGE_TYPE_ERASED,
            change_time=rules.timestamp_from_micros(now_micros()),
        )

    async def publish(self, changes: Sequence[profile_change_pb2.ProfileChange]) -> None:
        by_subject: dict[str, list[profile_change_pb2.ProfileChange]] = {}
        for change in changes:
            by_subject.setdefault(change.profile_id, []).append(change)
        for subject, batch in by_subject.items():
            await self.bus.publish(
                PROFILE_CHANGES,
                subject,
                profile_change_pb2.ProfileChangeBatch(changes=batch).SerializeToString(),
            )


def attributes_view(**attributes: Any) -> profile_change_pb2.EvaluationView:
    view = profile_change_pb2.EvaluationView()
    for key, value in attributes.items():
        view.attributes[key].CopyFrom(rules.values.value_to_proto(value))
    return view


class Clients:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.segments = segment_service_pb2_grpc.SegmentServiceStub(channel)
        self.memberships = membership_service_pb2_grpc.MembershipServiceStub(channel)

    async def create(
        self, dataset: str, segment_id: str, rule_text: str, *, kind: int = 1
    ) -> segment_pb2.Segment:
        response = await self.segments.CreateSegment(
            segment_service_pb2.CreateSegmentRequest(
                parent=f"datasets/{dataset}",
                segment_id=segment_id,
                segment=segment_pb2.Segment(
                    kind=segment_pb2.SegmentKind.ValueType(kind),
                    source=segment_pb2.SEGMENT_SOURCE_RULE,
                    rule_text=rule_text,
                ),
            ),
            timeout=10,
        )
        created: segment_pb2.Segment = response.segment
        return created

    async def wait_active(self, name: str, within: float = 20.0) -> segment_pb2.Segment:
        deadline = time.monotonic() + within
        while True:
            segment: segment_pb2.Segment = (
                await self.segments.GetSegment(
                    segment_service_pb2.GetSegmentRequest(name=name), timeout=5
                )
            ).segment
            if segment.state != segment_pb2.SEGMENT_STATE_BACKFILLING:
                assert segment.state == segment_pb2.SEGMENT_STATE_ACTIVE, segment.backfill.error
                return segment
            assert time.monotonic() < deadline, f"{name} still backfilling: {segment.backfill}"
            await asyncio.sleep(0.05)

    async def segments_of(self, dataset: str, subject: str, kind: str = "profiles") -> set[str]:
        response = await self.memberships.ListMemberships(
            membership_service_pb2.ListMembershipsRequest(
                parent=f"datasets/{dataset}/{kind}/{subject}"
            ),
            timeout=5,
        )
        return {m.segment.rsplit("/", 1)[1] for m in response.memberships}

    async def eventually_segments(
        self, dataset: str, subject: str, expected: set[str], within: float = 10.0
    ) -> None:
        deadline = time.monotonic() + within
        while True:
            found = await self.segments_of(dataset, subject)
            if found == expected:
                return
            assert time.monotonic() < deadline, f"{subject}: {found} != {expected}"
            await asyncio.sleep(0.02)
