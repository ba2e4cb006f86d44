"""Clients of the segment engine's ``MembershipService`` and the profile service's
``ProfileService``: the only way export reads memberships and profiles."""

from __future__ import annotations

import asyncio
import operator
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format

from audience.errors import AudienceError, decode
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
    ProfileData,
)
from services.export.domain.names import dataset_name, member_prefixes, segment_name
from services.export.ports import ResumePointExpiredError

__all__ = ["MembershipClient", "ProfileClient", "peer_error"]

PAGE_SIZE = 10_000
_KINDS = {
    membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN: ChangeKind.JOIN,
    membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE: ChangeKind.LEAVE,
}
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


_MEMBER = operator.attrgetter("member")
_JOIN_TIME = operator.attrgetter("join_time")
_VERSION = operator.attrgetter("segment_version")
_SECONDS = operator.attrgetter("seconds")
_NANOS = operator.attrgetter("nanos")


def _page(dataset: str, segment_id: str, response: Any, versions: bool) -> MemberPage:
    # Field by field over the whole page, each read in C (map with attrgetter): reading
    # protobuf fields is most of what a large download costs here.
    memberships = response.memberships
    join_times = list(map(_JOIN_TIME, memberships))
    return MemberPage(
        segment_id=segment_id,
        member_ids=_member_ids(dataset, list(map(_MEMBER, memberships))),
        versions=list(map(_VERSION, memberships)) if versions else None,
        join_seconds=list(map(_SECONDS, join_times)),
        join_nanos=list(map(_NANOS, join_times)),
    )


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

    def __init__(
        self, channel: grpc.aio.Channel, *, page_size: int = PAGE_SIZE, timeout: float = 60.0
    ) -> None:
        self._stub = membership_service_pb2_grpc.MembershipServiceStub(channel)
        self._page_size = page_size
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

    async def _list(self, parent: str, token: str) -> Any:
        try:
            return await self._stub.ListSegmentMembers(
                membership_service_pb2.ListSegmentMembersRequest(
                    parent=parent, page_size=self._page_size, page_token=token
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise peer_error("segment engine", error) from None

    async def pages(
        self, dataset: str, segment_id: str, *, versions: bool
    ) -> AsyncIterator[MemberPage]:
        parent = segment_name(dataset, segment_id)
        pending: asyncio.Task[Any] = asyncio.ensure_future(self._list(parent, ""))
        try:
            while True:
                response = await pending
                token = response.next_page_token
                if token:
                    # The next page is on its way while the caller handles this one.
                    pending = asyncio.ensure_future(self._list(parent, token))
                yield _page(dataset, segment_id, response, versions)
                if not token:
                    return
        finally:
            if not pending.done():
                pending.cancel()

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
        )
        request.heartbeat_interval.FromTimedelta(heartbeat_interval)
        if isinstance(start, str):
            request.resume_token = start
        elif isinstance(start, datetime):
            request.start_time.FromDatetime(start)
        call = self._stub.WatchMembershipChanges(request)
        try:
            async for response in call:
                if response.HasField("change"):
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
