"""``audience.v1.ProfileService``: requests checked and translated, responses built.

Everything else happens in :mod:`services.profile.operations`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

import grpc.aio
from google.protobuf import timestamp_pb2

from audience import errors
from audience.errors import FieldViolation
from audience.rules.aggregates import aggregate_id, canonical_spec
from audience.rules.validate import rule_violations
from audience.rules.values import micros_from_timestamp, timestamp_from_micros
from audience.v1 import (
    common_pb2,
    profile_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
    rule_pb2,
    segment_pb2,
)
from services.profile.codec import account_message, aggregate_values, profile_message, profile_name
from services.profile.operations import Operations

__all__ = ["ProfileServicer"]

_DATASET = re.compile(r"datasets/(?P<dataset>[a-z0-9-]{1,63})")
_PROFILE = re.compile(r"datasets/(?P<dataset>[a-z0-9-]{1,63})/profiles/(?P<id>[^\x00-\x1f]{1,256})")
_ACCOUNT = re.compile(r"datasets/(?P<dataset>[a-z0-9-]{1,63})/accounts/(?P<id>[^\x00-\x1f]{1,256})")
_SEGMENT = re.compile(r"datasets/(?P<dataset>[a-z0-9-]{1,63})/segments/[^\x00-\x1f/]{1,256}")
_IDENTITY_TYPE = re.compile(r"[a-z0-9_]{1,64}")
# What ingest lets an event be named: no other name is stored.
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# A Timestamp's range, 0001-01-01 to 9999-12-31: what the store's times can hold.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
# A Duration's range: about 10,000 years.
_MAX_DURATION_SECONDS = 315_576_000_000

MAX_SOURCES = 100
MAX_RELEASE = 1000
MAX_AGGREGATES = 10_000
MAX_REFERENCED = 1000


def _bad(field: str, description: str) -> errors.AudienceError:
    return errors.invalid_argument(f"{field} {description}", FieldViolation(field, description))


def _dataset(value: str, field: str) -> str:
    match = _DATASET.fullmatch(value)
    if match is None:
        raise _bad(field, "must be a dataset name, datasets/{dataset}.")
    return match["dataset"]


def _profile(value: str, field: str) -> tuple[str, str]:
    match = _PROFILE.fullmatch(value)
    if match is None:
        raise _bad(field, "must be a profile name, datasets/{dataset}/profiles/{profile}.")
    return match["dataset"], match["id"]


def _account(value: str, field: str) -> tuple[str, str]:
    match = _ACCOUNT.fullmatch(value)
    if match is None:
        raise _bad(field, "must be an account name, datasets/{dataset}/accounts/{account}.")
    return match["dataset"], match["id"]


def _instant(timestamp: timestamp_pb2.Timestamp, field: str) -> int:
    """Microseconds since the epoch of a timestamp in range."""
    if not (_MIN_SECONDS <= timestamp.seconds <= _MAX_SECONDS and 0 <= timestamp.nanos < 10**9):
        raise _bad(field, "must be from 0001-01-01 to 9999-12-31 (nanos from 0 to 999,999,999).")
    return micros_from_timestamp(timestamp)


def _page_size(value: int, default: int, maximum: int) -> int:
    if value < 0:
        raise _bad("page_size", "must not be negative.")
    return min(value or default, maximum)


def _identity(identity: common_pb2.Identity, field: str) -> tuple[str, str]:
    if not _IDENTITY_TYPE.fullmatch(identity.type):
        raise _bad(f"{field}.type", "must be 1–64 lower-case letters, digits and '_'.")
    if not 1 <= len(identity.value) <= 256:
        raise _bad(f"{field}.value", "must be 1–256 characters.")
    return identity.type, identity.value


def _spec_violations(spec: profile_pb2.AggregateSpec, field: str) -> list[FieldViolation]:
    """What is wrong with an aggregate, checked as the behaviour condition it serves."""
    found: list[FieldViolation] = []
    for name in ("bucket_width", "retention"):
        duration = getattr(spec, name)
        if duration.seconds < 0 or duration.nanos < 0:
            found.append(FieldViolation(f"{field}.{name}", "must not be negative."))
        elif duration.seconds > _MAX_DURATION_SECONDS or duration.nanos >= 10**9:
            found.append(
                FieldViolation(
                    f"{field}.{name}",
                    "must be a valid duration: at most 10,000 years, nanos below 10⁹.",
                )
            )
    behavior = rule_pb2.BehaviorCondition(
        event_name=spec.event_name,
        filters=spec.filters,
        function=spec.function,
        property=spec.property,
        window=rule_pb2.Window(all_time=rule_pb2.AllTime()),
        comparison=rule_pb2.Comparison(operator=rule_pb2.OPERATOR_EXISTS),
    )
    prefix = f"{field}.behavior."
    for violation in rule_violations(
        rule_pb2.Rule(behavior=behavior), segment_pb2.SEGMENT_KIND_USER, field=field
    ):
        name = violation.field
        if name.startswith(prefix):
            name = f"{field}.{name[len(prefix) :]}"
        found.append(FieldViolation(name, violation.description))
    return found


class ProfileServicer(profile_service_pb2_grpc.ProfileServiceServicer):
    """Serves ``ProfileService`` over :class:`Operations`."""

    def __init__(self, operations: Operations) -> None:
        self.operations = operations

    async def GetProfile(  # noqa: N802 - the gRPC method name
        self, request: profile_service_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.GetProfileResponse:
        which = request.WhichOneof("profile")
        if which == "name":
            dataset, profile_id = _profile(request.name, "name")
            if request.dataset and _dataset(request.dataset, "dataset") != dataset:
                raise _bad("dataset", "must be the dataset of name when both are given.")
        elif which == "identity":
            if not request.dataset:
                raise _bad("dataset", "is required with identity.")
            dataset = _dataset(request.dataset, "dataset")
            profile_id = await self.operations.owner(
                dataset, _identity(request.identity, "identity")
            )
        else:
            raise _bad("name", "or identity is required.")
        full = request.view == profile_pb2.PROFILE_VIEW_FULL
        read = await self.operations.profile(dataset, profile_id, full=full)
        message = profile_message(read.state)
        if full:
            message.aggregates.extend(aggregate_values(read.state.aggregates))
            message.recent_events.extend(read.recent_events)
            message.segments.extend(read.segments or [])
        return profile_service_pb2.GetProfileResponse(profile=message)

    async def ListProfileEvents(  # noqa: N802
        self,
        request: profile_service_pb2.ListProfileEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> profile_service_pb2.ListProfileEventsResponse:
        dataset, profile_id = _profile(request.parent, "parent")
        if request.event_name and not _EVENT_NAME.fullmatch(request.event_name):
            raise _bad(
                "event_name",
                "must be an event name: 1–128 letters, digits, '_', '.', ':' and '-'.",
            )
        start = end = None
        if request.HasField("start_time"):
            start = _instant(request.start_time, "start_time")
        if request.HasField("end_time"):
            end = _instant(request.end_time, "end_time")
        if start is not None and end is not None and end <= start:
            raise _bad("end_time", "must be after start_time.")
        events, token = await self.operations.events(
            dataset,
            profile_id,
            page_size=_page_size(request.page_size, 100, 1000),
            page_token=request.page_token,
            name=request.event_name,
            start=start,
            end=end,
        )
        return profile_service_pb2.ListProfileEventsResponse(events=events, next_page_token=token)

    async def GetAccount(  # noqa: N802
        self, request: profile_service_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.GetAccountResponse:
        dataset, account_id = _account(request.name, "name")
        account, segments = await self.operations.account(dataset, account_id)
        message = account_message(account)
        message.segments.extend(segments)
        return profile_service_pb2.GetAccountResponse(account=message)

    async def ListAccountProfiles(  # noqa: N802
        self,
        request: profile_service_pb2.ListAccountProfilesRequest,
        context: grpc.aio.ServicerContext,
    ) -> profile_service_pb2.ListAccountProfilesResponse:
        dataset, account_id = _account(request.parent, "parent")
        states, token = await self.operations.account_profiles(
            dataset,
            account_id,
            page_size=_page_size(request.page_size, 100, 1000),
            page_token=request.page_token,
        )
        return profile_service_pb2.ListAccountProfilesResponse(
            profiles=[profile_message(state) for state in states], next_page_token=token
        )

    async def MergeProfiles(  # noqa: N802
        self,
        request: profile_service_pb2.MergeProfilesRequest,
        context: grpc.aio.ServicerContext,
    ) -> profile_service_pb2.MergeProfilesResponse:
        dataset, target = _profile(request.target, "target")
        if not 1 <= len(request.sources) <= MAX_SOURCES:
            raise _bad("sources", f"must name 1–{MAX_SOURCES} profiles.")
        sources: list[str] = []
        for index, name in enumerate(request.sources):
            field = f"sources[{index}]"
            source_dataset, source = _profile(name, field)
            if source_dataset != dataset:
                raise _bad(field, "must be a profile of the target's dataset.")
            if source == target:
                raise _bad(field, "must not be the target.")
            if source in sources:
                raise _bad(field, "must not repeat a source.")
            sources.append(source)
        state, merges = await self.operations.merge(dataset, target, sources)
        return profile_service_pb2.MergeProfilesResponse(
            profile=profile_message(state),
            merges=[
                profile_pb2.ProfileMerge(
                    target=profile_name(*merge.target),
                    source=profile_name(*merge.source),
                    reason=merge.reason,
                    merge_time=timestamp_from_micros(merge.time),
                )
                for merge in merges
            ],
        )

    async def EraseProfile(  # noqa: N802
        self, request: profile_service_pb2.EraseProfileRequest, context: grpc.aio.ServicerContext
    ) -> profile_service_pb2.EraseProfileResponse:
        dataset, profile_id = _profile(request.name, "name")
        record = await self.operations.erase(dataset, profile_id)
        return profile_service_pb2.EraseProfileResponse(
            erasure=profile_pb2.Erasure(
                profile=profile_name(dataset, profile_id),
                identities=[
                    common_pb2.Identity(type=kind, value=value) for kind, value in record.identities
                ],
                erase_time=timestamp_from_micros(record.time),
                deleted_event_count=record.deleted_event_count,
            )
        )

    async def ReleaseErasedIdentities(  # noqa: N802
        self,
        request: profile_service_pb2.ReleaseErasedIdentitiesRequest,
        context: grpc.aio.ServicerContext,
    ) -> profile_service_pb2.ReleaseErasedIdentitiesResponse:
        dataset = _dataset(request.parent, "parent")
        if not 1 <= len(request.identities) <= MAX_RELEASE:
            raise _bad("identities", f"must hold 1–{MAX_RELEASE} identities.")
        identities = [
            _identity(identity, f"identities[{index}]")
            for index, identity in enumerate(request.identities)
        ]
        released = await self.operations.release(dataset, identities)
        return profile_service_pb2.ReleaseErasedIdentitiesResponse(released_count=released)

    async def QueryProfiles(  # noqa: N802
        self,
        request: profile_service_pb2.QueryProfilesRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[profile_service_pb2.QueryProfilesResponse]:
        dataset = _dataset(request.parent, "parent")
        if request.kind not in (segment_pb2.SEGMENT_KIND_USER, segment_pb2.SEGMENT_KIND_ACCOUNT):
            raise _bad("kind", "must be SEGMENT_KIND_USER or SEGMENT_KIND_ACCOUNT.")
        if not request.HasField("rule"):
            raise _bad("rule", "is required.")
        if request.limit < 0:
            raise _bad("limit", "must not be negative.")
        if not 0 <= request.chunk_size <= 100_000:
            raise _bad("chunk_size", "must be from 1 to 100,000 (0 for 10,000).")
        if len(request.referenced_segments) > MAX_REFERENCED:
            raise _bad("referenced_segments", f"must hold at most {MAX_REFERENCED} segments.")
        referenced: list[tuple[str, rule_pb2.Rule | None, Sequence[str]]] = []
        for index, segment in enumerate(request.referenced_segments):
            field = f"referenced_segments[{index}]"
            match = _SEGMENT.fullmatch(segment.segment)
            if match is None or match["dataset"] != dataset:
                raise _bad(f"{field}.segment", "must be a segment name of the query's dataset.")
            definition = segment.WhichOneof("definition")
            if definition is None:
                raise _bad(field, "needs a rule or members.")
            referenced.append(
                (
                    segment.segment,
                    segment.rule if definition == "rule" else None,
                    list(segment.members.profile_ids),
                )
            )
        compiled, segments = self.operations.compile(request.kind, request.rule, referenced)
        progress = self.operations.run_query(
            dataset,
            request.kind,
            compiled,
            segments,
            now=(
                micros_from_timestamp(request.evaluation_time)
                if request.HasField("evaluation_time")
                else None
            ),
            limit=request.limit,
            count_only=request.count_only,
            chunk_size=request.chunk_size or 10_000,
        )
        async for step in progress:
            yield profile_service_pb2.QueryProfilesResponse(
                profile_ids=step.profile_ids,
                scanned_count=step.scanned,
                total_count=step.total,
                matched_count=step.matched,
            )

    async def RegisterAggregates(  # noqa: N802
        self,
        request: profile_service_pb2.RegisterAggregatesRequest,
        context: grpc.aio.ServicerContext,
    ) -> profile_service_pb2.RegisterAggregatesResponse:
        dataset = _dataset(request.parent, "parent")
        if not 1 <= len(request.aggregates) <= MAX_AGGREGATES:
            raise _bad("aggregates", f"must hold 1–{MAX_AGGREGATES} aggregates.")
        violations: list[FieldViolation] = []
        specs: list[profile_pb2.AggregateSpec] = []
        for index, spec in enumerate(request.aggregates):
            found = _spec_violations(spec, f"aggregates[{index}]")
            if found:
                violations.extend(found)
                continue
            stored = canonical_spec(spec)
            stored.aggregate_id = aggregate_id(spec)
            stored.retention.CopyFrom(spec.retention)
            specs.append(stored)
        if violations:
            raise errors.invalid_argument(
                f"{len(violations)} problem(s) with the aggregates.",
                *violations[:100],
                reason="INVALID_AGGREGATE",
            )
        registered = await self.operations.register(dataset, specs)
        return profile_service_pb2.RegisterAggregatesResponse(aggregates=registered)

    async def ListAggregates(  # noqa: N802
        self,
        request: profile_service_pb2.ListAggregatesRequest,
        context: grpc.aio.ServicerContext,
    ) -> profile_service_pb2.ListAggregatesResponse:
        dataset = _dataset(request.parent, "parent")
        specs, token = await self.operations.aggregates(
            dataset,
            page_size=_page_size(request.page_size, 1000, 10_000),
            page_token=request.page_token,
        )
        return profile_service_pb2.ListAggregatesResponse(aggregates=specs, next_page_token=token)
