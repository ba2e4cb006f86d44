"""Clients of the segment engine's ``MembershipService`` and the profile service's
``ProfileService``: the only way export reads memberships and profiles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format

from audience.errors import AudienceError, decode, unavailable
from audience.v1 import (
    common_pb2,
    membership_pb2,
    membership_service_pb2,
    membership_service_pb2_grpc,
    profile_service_pb2,
    profile_service_pb2_grpc,
)
from services.export.domain.model import (
    AttributeValue,
    ChangeKind,
    Heartbeat,
    MemberPage,
    MembershipChange,
    MemberSnapshot,
    ProfileData,
)
from services.export.domain.names import dataset_name, member_prefixes, segment_name
from services.export.ports import ResumePointExpiredError

__all__ = ["MembershipClient", "ProfileClient", "peer_error"]

_KINDS = {
    membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN: ChangeKind.JOIN,
    membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE: ChangeKind.LEAVE,
}
# A busy dataset's changes cost the engine far less in batches (a response costs more than
# a change); nothing waits to fill one.
_CHANGES_PER_RESPONSE = 500
_KIND_FILTERS = {
    None: membership_pb2.MEMBERSHIP_CHANGE_KIND_UNSPECIFIED,
    ChangeKind.JOIN: membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN,
    ChangeKind.LEAVE: membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE,
}


def peer_error(service: str, error: grpc.aio.AioRpcError) -> AudienceError:
    """A peer's failure, passed on with its code and reason so that callers see, say, a
    missing segment as NOT_FOUND."""
    decoded = decode(error)
    reason = decoded.reason or decoded.code.name
    message = f"{service}: {decoded.message or decoded.code.name}"
    return AudienceError(
        decoded.code,
        reason,
        message,
        metadata=decoded.metadata,
        resource_type=decoded.resource_type,
        resource_name=decoded.resource_name,
    )


def _member_ids(dataset: str, members: list[str]) -> list[str]:
    profiles, accounts = member_prefixes(dataset)
    if not all(map(str.startswith, members, repeat((profiles, accounts)))):
        odd = next(m for m in members if not m.startswith((profiles, accounts)))
        raise ValueError(f"the segment engine returned a member of another dataset: {odd!r}")
    cut = len(profiles)
    return [member[cut:] for member in members]


def _time(timestamp: Any) -> datetime:
    moment: datetime = timestamp.ToDatetime(tzinfo=UTC)
    return moment


def _cause(reason: membership_pb2.ChangeReason) -> str:
    name: str = membership_pb2.ChangeCause.Name(reason.cause)
    return name.removeprefix("CHANGE_CAUSE_").lower()


def _change(dataset: str, change: membership_pb2.MembershipChange) -> MembershipChange:
    _, _, segment_id = change.segment.rpartition("/")
    reason: dict[str, object] = json_format.MessageToDict(
        change.reason, preserving_proto_field_name=True
    )
    cause = _cause(change.reason)
    reason["cause"] = cause
    return MembershipChange(
        resume_token=change.resume_token,
        member=change.member,
        member_id=_member_ids(dataset, [change.member])[0],
        segment_id=segment_id,
        segment_version=change.segment_version,
        kind=_KINDS.get(change.kind, ChangeKind.LEAVE),
        change_time=_time(change.change_time),
        member_sequence=change.member_sequence,
        cause=cause,
        reason=reason,
    )


class MembershipClient:
    """Reads members and changes from the segment engine."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 60.0) -> None:
        self._stub = membership_service_pb2_grpc.MembershipServiceStub(channel)
        self._timeout = timeout

    async def count(self, dataset: str, segment_id: str) -> int:
        try:
            response = await self._stub.CountSegmentMembers(
                membership_service_pb2.CountSegmentMembersRequest(
                    segment=segment_name(dataset, segment_id)
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise peer_error("segment engine", error) from None
        count: int = response.count
        return count

    async def pages(
        self, dataset: str, segment_id: str, *, versions: bool
    ) -> AsyncIterator[MemberSnapshot | MemberPage]:
        call = self._stub.StreamSegmentMembers(
            membership_service_pb2.StreamSegmentMembersRequest(
                parent=segment_name(dataset, segment_id), include_segment_versions=versions
            )
        )
        try:
            while True:
                # No deadline on the whole listing, which takes as long as the segment is
                # big and its reader slow; an engine that sends nothing for this long is
                # stuck.
                try:
                    async with asyncio.timeout(self._timeout):
                        response = await call.read()
                except TimeoutError:
                    raise unavailable(
                        f"segment engine: no members for {self._timeout:.0f}s while listing"
                        f" {segment_name(dataset, segment_id)}"
                    ) from None
                if response is grpc.aio.EOF:
                    return
                if response.HasField("snapshot"):
                    snapshot = response.snapshot
                    yield MemberSnapshot(snapshot.resume_token, _time(snapshot.read_time))
                # Whole columns copied out of the message at once: a large download costs
                # little more than its CSV formatting here.
                yield MemberPage(
                    segment_id=segment_id,
                    member_ids=list(response.member_ids),
                    versions=list(response.segment_versions) if versions else None,
                    join_micros=list(response.join_time_micros),
                )
        except grpc.aio.AioRpcError as error:
            raise peer_error("segment engine", error) from None
        finally:
            call.cancel()

    async def watch(
        self,
        dataset: str,
        segment_ids: Sequence[str],
        kind: ChangeKind | None,
        start: str | datetime | None,
        heartbeat_interval: timedelta,
    ) -> AsyncIterator[MembershipChange | Heartbeat]:
        request = membership_service_pb2.WatchMembershipChangesRequest(
            parent=dataset_name(dataset),
            segments=[segment_name(dataset, segment_id) for segment_id in segment_ids],
            kind=_KIND_FILTERS[kind],
            max_changes_per_response=_CHANGES_PER_RESPONSE,
        )
        request.heartbeat_interval.FromTimedelta(heartbeat_interval)
        if isinstance(start, str):
            request.resume_token = start
        elif isinstance(start, datetime):
            request.start_time.FromDatetime(start)
        call = self._stub.WatchMembershipChanges(request)
        try:
            async for response in call:
                # An engine older than batches (mid-rollout) still sends `change`.
                which = response.WhichOneof("message")
                if which == "batch":
                    for change in response.batch.changes:
                        yield _change(dataset, change)
                elif which == "change":
                    yield _change(dataset, response.change)
                else:
                    heartbeat = response.heartbeat
                    yield Heartbeat(heartbeat.resume_token, _time(heartbeat.time))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                raise ResumePointExpiredError(decode(error).message) from None
            raise peer_error("segment engine", error) from None
        finally:
            call.cancel()


def _value(value: common_pb2.Value) -> AttributeValue:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "timestamp_value":
        return _time(value.timestamp_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    if kind == "map_value":
        return {key: _value(item) for key, item in value.map_value.fields.items()}
    return None


class ProfileClient:
    """Reads profiles for identity and attribute columns, many at once with a bound.

    ``ProfileService`` has no batch read yet, so each profile is one ``GetProfile``; a
    ``BatchGetProfiles`` would make these columns far cheaper.
    """

    def __init__(
        self, channel: grpc.aio.Channel, *, concurrency: int = 64, timeout: float = 30.0
    ) -> None:
        self._stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
        self._limit = asyncio.Semaphore(concurrency)
        self._timeout = timeout

    async def _get(self, dataset: str, profile_id: str) -> ProfileData | None:
        async with self._limit:
            try:
                response = await self._stub.GetProfile(
                    profile_service_pb2.GetProfileRequest(
                        name=f"{dataset_name(dataset)}/profiles/{profile_id}"
                    ),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise peer_error("profile service", error) from None
        profile = response.profile
        identities: dict[str, str] = {}
        for identity in profile.identities:
            identities.setdefault(identity.type, identity.value)
        attributes = {key: _value(value) for key, value in profile.attributes.items()}
        return ProfileData(identities, attributes)

    async def get_many(
        self, dataset: str, profile_ids: Sequence[str]
    ) -> Mapping[str, ProfileData | None]:
        unique = list(dict.fromkeys(profile_ids))
        tasks = [asyncio.ensure_future(self._get(dataset, profile_id)) for profile_id in unique]
        try:
            found = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return dict(zip(unique, found, strict=True))
