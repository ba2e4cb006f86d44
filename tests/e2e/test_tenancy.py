"""Tenancy through the whole suite: a key confined to dataset A gets nothing of dataset B,
through every RPC of every service.

Datasets A and B each hold data of every kind: profiles built from events sent through
ingest (with an identity and an account), rule-based and imported segments with members,
registered aggregates, a change stream, failed events, and export destinations, jobs,
schedules and webhook subscriptions with deliveries. B also holds resources that A has no
namesake of. With a key for A only:

- a request to any RPC that names B's resources is refused with ``PERMISSION_DENIED``. The
  RPCs come from the service descriptors, so a new RPC fails here until it has a case; each
  case is also shown to work on A's own resources, so the refusal is about B;
- a request that names A but carries B's ids, page tokens, resume token or segment
  references is refused, or answers with nothing of B;
- a read-only key of A is refused by every RPC that needs another scope;
- A's change stream, watched while both datasets change, carries only A's changes;

and B's data, read again with the admin key, is as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import pkgutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from redis.asyncio import Redis

import audience.v1
from audience import errors, rules
from audience.auth import RPC_SCOPES, SCOPES
from audience.bus.v1 import events_pb2 as bus_events_pb2
from audience.v1 import (
    common_pb2,
    event_pb2,
    export_pb2,
    export_service_pb2,
    ingest_service_pb2,
    membership_pb2,
    membership_service_pb2,
    profile_pb2,
    profile_service_pb2,
    rule_pb2,
    segment_pb2,
    segment_service_pb2,
)
from services.ingest.failed import FAILED_EVENTS_TOPIC
from services.registry import SERVICES
from tests.e2e.conftest import RunningSuite, SuiteKey, new_dataset, run_suite
from tests.integration.export.peers import HttpReceiver, eventually
from tests.profile_support import E, event

pytestmark = pytest.mark.e2e

USER = segment_pb2.SEGMENT_KIND_USER
JOIN = membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN
DELIVERED = export_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED
FINAL_JOB_STATES = {
    export_pb2.EXPORT_JOB_STATE_SUCCEEDED,
    export_pb2.EXPORT_JOB_STATE_FAILED,
    export_pb2.EXPORT_JOB_STATE_CANCELLED,
}
# What a request for A that carries something of B may fail with: anything that says the
# thing is not there or not acceptable, never a crash.
REFUSALS = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
SECRET = "whsec-tenancy-0123456789"
ENVIRONMENT = {
    "AUDIENCE_PROFILE_BACKFILL_PAUSE": "0s",
    "AUDIENCE_SEGMENT_ENGINE_TIMER_INTERVAL": "50ms",
    "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "50ms",
    "AUDIENCE_EXPORT_POLL_INTERVAL": "50ms",
    "AUDIENCE_EXPORT_SCHEDULER_INTERVAL": "100ms",
    "AUDIENCE_EXPORT_WEBHOOK_POLL_INTERVAL": "50ms",
    "AUDIENCE_EXPORT_WEBHOOK_HEARTBEAT": "1s",
}


def _services() -> list[Any]:
    """Every gRPC service of the public API, from the generated modules."""
    found = []
    for module in pkgutil.iter_modules(audience.v1.__path__):
        if module.name.endswith("_service_pb2"):
            descriptor = importlib.import_module(f"audience.v1.{module.name}").DESCRIPTOR
            found.extend(descriptor.services_by_name.values())
    return found


def _methods() -> list[MethodDescriptor]:
    return [method for service in _services() for method in service.methods]


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# --- the two datasets --------------------------------------------------------------------


@dataclass
class World:
    """One dataset's data, and the names a request about it uses."""

    dataset: str
    prefix: str
    """Starts the ids of its users and account, so no id is shared with the other world."""
    root: Path
    start: datetime
    marker: str
    """A trait value only this dataset's profiles hold, to spot its data in any answer."""
    jobs: list[str] = field(default_factory=list)
    failed_events: list[str] = field(default_factory=list)
    deliveries: list[str] = field(default_factory=list)

    @property
    def parent(self) -> str:
        return f"datasets/{self.dataset}"

    def user(self, index: int) -> str:
        return f"{self.prefix}-{index}"

    def email(self, index: int) -> str:
        return f"{self.user(index)}@example.com"

    def profile(self, index: int) -> str:
        return f"{self.parent}/profiles/{self.user(index)}"

    @property
    def account(self) -> str:
        return f"{self.parent}/accounts/{self.prefix}-corp"

    def segment(self, segment_id: str) -> str:
        return f"{self.parent}/segments/{segment_id}"

    def destination(self, destination_id: str) -> str:
        return f"{self.parent}/destinations/{destination_id}"

    def schedule(self, schedule_id: str) -> str:
        return f"{self.parent}/schedules/{schedule_id}"

    def hook(self, subscription_id: str) -> str:
        return f"{self.parent}/webhookSubscriptions/{subscription_id}"

    def in_a(self, name: str, other: World) -> str:
        """``name``, one of this world's resource names, moved into ``other``'s dataset."""
        assert name.startswith(self.parent + "/"), name
        return other.parent + name[len(self.parent) :]

    def markers(self) -> list[str]:
        """Strings that appear in this dataset's data and nowhere else."""
        return [self.dataset, self.prefix, self.marker]


def _rule(text: str) -> rule_pb2.Rule:
    return rules.parse_rule(text)


def _pro() -> str:
    return 'attributes.plan = "pro"'


def _job(w: World, destination: str = "out") -> export_pb2.ExportJob:
    return export_pb2.ExportJob(
        segments=[w.segment("vip")],
        mode=export_pb2.EXPORT_MODE_FULL,
        destination=w.destination(destination),
    )


def _schedule(w: World) -> export_pb2.Schedule:
    return export_pb2.Schedule(cron="0 3 * * *", time_zone="UTC", job_template=_job(w), paused=True)


def _spec(width: timedelta) -> profile_pb2.AggregateSpec:
    return profile_pb2.AggregateSpec(
        event_name="view",
        function=rule_pb2.AGGREGATE_FUNCTION_COUNT,
        bucket_width=duration_pb2.Duration(seconds=int(width.total_seconds())),
    )


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# A request (or, for a client stream, the requests) about one world, for every RPC.
Build = Callable[[World], Message | list[Message]]

CASES: dict[str, Build] = {
    # IngestService
    "/audience.v1.IngestService/SendEvent": lambda w: ingest_service_pb2.SendEventRequest(
        parent=w.parent, event=event(user=w.user(1), name="view")
    ),
    "/audience.v1.IngestService/SendEvents": lambda w: ingest_service_pb2.SendEventsRequest(
        parent=w.parent, events=[event(user=w.user(1), name="view")]
    ),
    "/audience.v1.IngestService/StreamEvents": lambda w: [
        ingest_service_pb2.StreamEventsRequest(
            parent=w.parent, events=[event(user=w.user(1), name="view")]
        )
    ],
    "/audience.v1.IngestService/ListFailedEvents": lambda w: (
        ingest_service_pb2.ListFailedEventsRequest(parent=w.parent)
    ),
    "/audience.v1.IngestService/ReplayFailedEvents": lambda w: (
        ingest_service_pb2.ReplayFailedEventsRequest(parent=w.parent, names=w.failed_events[:1])
    ),
    # ProfileService
    "/audience.v1.ProfileService/GetProfile": lambda w: profile_service_pb2.GetProfileRequest(
        name=w.profile(1), view=profile_pb2.PROFILE_VIEW_FULL
    ),
    "/audience.v1.ProfileService/ListProfileEvents": lambda w: (
        profile_service_pb2.ListProfileEventsRequest(parent=w.profile(1))
    ),
    "/audience.v1.ProfileService/GetAccount": lambda w: profile_service_pb2.GetAccountRequest(
        name=w.account
    ),
    "/audience.v1.ProfileService/ListAccountProfiles": lambda w: (
        profile_service_pb2.ListAccountProfilesRequest(parent=w.account)
    ),
    "/audience.v1.ProfileService/MergeProfiles": lambda w: profile_service_pb2.MergeProfilesRequest(
        target=w.profile(1), sources=[w.profile(2)]
    ),
    "/audience.v1.ProfileService/EraseProfile": lambda w: profile_service_pb2.EraseProfileRequest(
        name=w.profile(3)
    ),
    "/audience.v1.ProfileService/ReleaseErasedIdentities": lambda w: (
        profile_service_pb2.ReleaseErasedIdentitiesRequest(
            parent=w.parent, identities=[common_pb2.Identity(type="email", value=w.email(1))]
        )
    ),
    "/audience.v1.ProfileService/QueryProfiles": lambda w: profile_service_pb2.QueryProfilesRequest(
        parent=w.parent, kind=USER, rule=_rule(_pro())
    ),
    "/audience.v1.ProfileService/RegisterAggregates": lambda w: (
        profile_service_pb2.RegisterAggregatesRequest(
            parent=w.parent, aggregates=[_spec(timedelta(minutes=1))]
        )
    ),
    "/audience.v1.ProfileService/ListAggregates": lambda w: (
        profile_service_pb2.ListAggregatesRequest(parent=w.parent)
    ),
    # SegmentService
    "/audience.v1.SegmentService/CreateSegment": lambda w: segment_service_pb2.CreateSegmentRequest(
        parent=w.parent,
        segment_id="new",
        segment=segment_pb2.Segment(kind=USER, rule_text=_pro()),
    ),
    "/audience.v1.SegmentService/GetSegment": lambda w: segment_service_pb2.GetSegmentRequest(
        name=w.segment("pro")
    ),
    "/audience.v1.SegmentService/ListSegments": lambda w: segment_service_pb2.ListSegmentsRequest(
        parent=w.parent
    ),
    "/audience.v1.SegmentService/UpdateSegment": lambda w: segment_service_pb2.UpdateSegmentRequest(
        segment=segment_pb2.Segment(name=w.segment("pro"), display_name="Taken"),
        update_mask=_mask("display_name"),
    ),
    "/audience.v1.SegmentService/DeleteSegment": lambda w: segment_service_pb2.DeleteSegmentRequest(
        name=w.segment("pro")
    ),
    "/audience.v1.SegmentService/ValidateRule": lambda w: segment_service_pb2.ValidateRuleRequest(
        parent=w.parent, kind=USER, rule_text=f'in segment "{w.segment("vip")}"'
    ),
    "/audience.v1.SegmentService/PreviewSegment": lambda w: (
        segment_service_pb2.PreviewSegmentRequest(parent=w.parent, kind=USER, rule_text=_pro())
    ),
    "/audience.v1.SegmentService/ImportSegmentMembers": lambda w: [
        segment_service_pb2.ImportSegmentMembersRequest(
            segment=w.segment("vip"),
            mode=segment_service_pb2.IMPORT_MODE_ADD,
            ids=segment_service_pb2.ImportedIds(ids=["intruder"]),
        )
    ],
    "/audience.v1.SegmentService/GetSegmentStats": lambda w: (
        segment_service_pb2.GetSegmentStatsRequest(name=w.segment("pro"))
    ),
    # MembershipService
    "/audience.v1.MembershipService/ListMemberships": lambda w: (
        membership_service_pb2.ListMembershipsRequest(parent=w.profile(1))
    ),
    "/audience.v1.MembershipService/CheckMembership": lambda w: (
        membership_service_pb2.CheckMembershipRequest(member=w.profile(1), segment=w.segment("pro"))
    ),
    "/audience.v1.MembershipService/ListSegmentMembers": lambda w: (
        membership_service_pb2.ListSegmentMembersRequest(parent=w.segment("pro"))
    ),
    "/audience.v1.MembershipService/StreamSegmentMembers": lambda w: (
        membership_service_pb2.StreamSegmentMembersRequest(parent=w.segment("pro"))
    ),
    "/audience.v1.MembershipService/CountSegmentMembers": lambda w: (
        membership_service_pb2.CountSegmentMembersRequest(segment=w.segment("pro"))
    ),
    "/audience.v1.MembershipService/ExplainMembership": lambda w: (
        membership_service_pb2.ExplainMembershipRequest(
            member=w.profile(1), segment=w.segment("pro")
        )
    ),
    "/audience.v1.MembershipService/WatchMembershipChanges": lambda w: (
        membership_service_pb2.WatchMembershipChangesRequest(
            parent=w.parent, start_time=rules.timestamp_from_micros(_micros(w.start))
        )
    ),
    # ExportService
    "/audience.v1.ExportService/ExportSegmentCsv": lambda w: (
        export_service_pb2.ExportSegmentCsvRequest(segments=[w.segment("vip")])
    ),
    "/audience.v1.ExportService/CreateDestination": lambda w: (
        export_service_pb2.CreateDestinationRequest(
            parent=w.parent,
            destination_id="new",
            destination=export_pb2.Destination(
                folder=export_pb2.FolderTarget(path=str(w.root / "new"))
            ),
        )
    ),
    "/audience.v1.ExportService/GetDestination": lambda w: export_service_pb2.GetDestinationRequest(
        name=w.destination("out")
    ),
    "/audience.v1.ExportService/ListDestinations": lambda w: (
        export_service_pb2.ListDestinationsRequest(parent=w.parent)
    ),
    "/audience.v1.ExportService/UpdateDestination": lambda w: (
        export_service_pb2.UpdateDestinationRequest(
            destination=export_pb2.Destination(name=w.destination("out"), display_name="Taken"),
            update_mask=_mask("display_name"),
        )
    ),
    "/audience.v1.ExportService/DeleteDestination": lambda w: (
        export_service_pb2.DeleteDestinationRequest(name=w.destination("second"))
    ),
    "/audience.v1.ExportService/CreateExportJob": lambda w: (
        export_service_pb2.CreateExportJobRequest(parent=w.parent, export_job=_job(w))
    ),
    "/audience.v1.ExportService/GetExportJob": lambda w: export_service_pb2.GetExportJobRequest(
        name=w.jobs[0]
    ),
    "/audience.v1.ExportService/ListExportJobs": lambda w: export_service_pb2.ListExportJobsRequest(
        parent=w.parent
    ),
    "/audience.v1.ExportService/CancelExportJob": lambda w: (
        export_service_pb2.CancelExportJobRequest(name=w.jobs[0])
    ),
    "/audience.v1.ExportService/CreateSchedule": lambda w: export_service_pb2.CreateScheduleRequest(
        parent=w.parent, schedule_id="new", schedule=_schedule(w)
    ),
    "/audience.v1.ExportService/GetSchedule": lambda w: export_service_pb2.GetScheduleRequest(
        name=w.schedule("nightly")
    ),
    "/audience.v1.ExportService/ListSchedules": lambda w: export_service_pb2.ListSchedulesRequest(
        parent=w.parent
    ),
    "/audience.v1.ExportService/UpdateSchedule": lambda w: export_service_pb2.UpdateScheduleRequest(
        schedule=export_pb2.Schedule(name=w.schedule("nightly"), display_name="Taken"),
        update_mask=_mask("display_name"),
    ),
    "/audience.v1.ExportService/DeleteSchedule": lambda w: export_service_pb2.DeleteScheduleRequest(
        name=w.schedule("weekly")
    ),
    "/audience.v1.ExportService/RunSchedule": lambda w: export_service_pb2.RunScheduleRequest(
        name=w.schedule("nightly")
    ),
    "/audience.v1.ExportService/CreateWebhookSubscription": lambda w: (
        export_service_pb2.CreateWebhookSubscriptionRequest(
            parent=w.parent,
            webhook_subscription_id="new",
            webhook_subscription=export_pb2.WebhookSubscription(
                url="http://127.0.0.1:9/taken", secret=SECRET, segments=[w.segment("vip")]
            ),
        )
    ),
    "/audience.v1.ExportService/GetWebhookSubscription": lambda w: (
        export_service_pb2.GetWebhookSubscriptionRequest(name=w.hook("hook"))
    ),
    "/audience.v1.ExportService/ListWebhookSubscriptions": lambda w: (
        export_service_pb2.ListWebhookSubscriptionsRequest(parent=w.parent)
    ),
    "/audience.v1.ExportService/UpdateWebhookSubscription": lambda w: (
        export_service_pb2.UpdateWebhookSubscriptionRequest(
            webhook_subscription=export_pb2.WebhookSubscription(
                name=w.hook("hook"), url="http://127.0.0.1:9/taken"
            ),
            update_mask=_mask("url"),
        )
    ),
    "/audience.v1.ExportService/DeleteWebhookSubscription": lambda w: (
        export_service_pb2.DeleteWebhookSubscriptionRequest(name=w.hook("second"))
    ),
    "/audience.v1.ExportService/ListWebhookDeliveries": lambda w: (
        export_service_pb2.ListWebhookDeliveriesRequest(parent=w.hook("hook"), state=DELIVERED)
    ),
    "/audience.v1.ExportService/ReplayWebhookDeliveries": lambda w: (
        export_service_pb2.ReplayWebhookDeliveriesRequest(
            parent=w.hook("hook"), names=w.deliveries[:1]
        )
    ),
}


def _micros(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


# --- calling any RPC ---------------------------------------------------------------------


async def call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Message | list[Message],
    *,
    most: int | None = None,
) -> list[Any]:
    """Calls ``method`` and returns its responses; a server stream is read to its end, or to
    ``most`` messages (a change stream never ends)."""
    response_type = GetMessageClass(method.output_type)
    serialize: Callable[[Message], bytes] = lambda message: message.SerializeToString()  # noqa: E731
    options: dict[str, Any] = {
        "request_serializer": serialize,
        "response_deserializer": response_type.FromString,
    }
    path = _path(method)
    requests = request if isinstance(request, list) else [request]
    if method.client_streaming and method.server_streaming:
        stream: Any = channel.stream_stream(path, **options)(iter(requests), timeout=15)
    elif method.client_streaming:
        return [await channel.stream_unary(path, **options)(iter(requests), timeout=15)]
    elif method.server_streaming:
        stream = channel.unary_stream(path, **options)(requests[0], timeout=15)
    else:
        return [await channel.unary_unary(path, **options)(requests[0], timeout=15)]
    responses: list[Any] = []
    try:
        async for response in stream:
            responses.append(response)
            if most is not None and len(responses) >= most:
                break
    finally:
        stream.cancel()
    return responses


def _method(path: str) -> MethodDescriptor:
    (found,) = [m for m in _methods() if _path(m) == path]
    return found


async def refusal(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Message | list[Message]
) -> errors.DecodedError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, method, request, most=1)
    return errors.decode(raised.value)


def leaked(responses: Sequence[Message], other: World) -> list[str]:
    """The markers of ``other`` found anywhere in ``responses``."""
    data = b"".join(response.SerializeToString() for response in responses)
    return [marker for marker in other.markers() if marker.encode() in data]


async def nothing_of(
    other: World, answer: Awaitable[Sequence[Message]]
) -> tuple[errors.DecodedError | None, Sequence[Any]]:
    """Awaits ``answer``: a refusal passes, and so does an answer with nothing of ``other``.
    Returns the refusal (``None`` when answered) and the answer."""
    try:
        responses = await answer
    except grpc.aio.AioRpcError as error:
        decoded = errors.decode(error)
        assert decoded.code in REFUSALS, decoded
        return decoded, ()
    assert not leaked(responses, other), responses
    return None, responses


# What an answer to a request for A that carries something of B must say: that it found
# nothing. An RPC missing here that answers such a request fails the test, to be decided.
HOLDS_NOTHING: dict[str, Callable[[Any], bool]] = {
    "audience.v1.QueryProfilesResponse": lambda r: not r.profile_ids and not r.matched_count,
    "audience.v1.PreviewSegmentResponse": lambda r: not r.estimated_size and not r.sample_members,
    "audience.v1.ListMembershipsResponse": lambda r: not r.memberships,
    "audience.v1.CheckMembershipResponse": lambda r: not r.is_member,
    "audience.v1.ExplainMembershipResponse": lambda r: not r.is_member and not r.rule_result,
    "audience.v1.ListExportJobsResponse": lambda r: not r.export_jobs,
    "audience.v1.ReplayWebhookDeliveriesResponse": lambda r: not r.replayed_count,
    "audience.v1.ReplayFailedEventsResponse": lambda r: not r.replayed_count,
    "audience.v1.ReleaseErasedIdentitiesResponse": lambda r: not r.released_count,
}


# --- the suite and the data ----------------------------------------------------------------


@dataclass
class Tenancy:
    suite: RunningSuite
    a: World
    b: World
    tenant: SuiteKey
    """Every scope, dataset A only."""
    reader: SuiteKey
    """Read only, dataset A only."""
    receiver: HttpReceiver
    b_before: dict[str, Any] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def as_key(self, key: SuiteKey) -> AsyncIterator[grpc.aio.Channel]:
        async with self.suite.open_channel(key.key) as channel:
            yield channel

    async def admin(self, path: str, request: Message | list[Message]) -> Any:
        (response,) = await call(self.suite.channel, _method(path), request)
        return response

    async def snapshot(self, w: World) -> dict[str, Any]:
        """What B holds, as the admin key reads it: every resource named in :data:`CASES`."""
        channel = self.suite.channel
        found: dict[str, Any] = {}
        for user in (1, 2, 3):
            profile = await self.admin(
                "/audience.v1.ProfileService/GetProfile",
                profile_service_pb2.GetProfileRequest(
                    name=w.profile(user), view=profile_pb2.PROFILE_VIEW_FULL
                ),
            )
            found[w.profile(user)] = (
                profile.profile.event_count,
                sorted(profile.profile.attributes),
                sorted(identity.value for identity in profile.profile.identities),
            )
        for segment_id in ("pro", "vip", "secret"):
            segment = (
                await self.admin(
                    "/audience.v1.SegmentService/GetSegment",
                    segment_service_pb2.GetSegmentRequest(name=w.segment(segment_id)),
                )
            ).segment
            members = await call(
                channel,
                _method("/audience.v1.MembershipService/ListSegmentMembers"),
                membership_service_pb2.ListSegmentMembersRequest(parent=w.segment(segment_id)),
            )
            found[segment.name] = (
                segment.etag,
                segment.version,
                segment.display_name,
                sorted(m.member for response in members for m in response.memberships),
            )
        for destination_id in ("out", "second", "b-only"):
            destination = await self.admin(
                "/audience.v1.ExportService/GetDestination",
                export_service_pb2.GetDestinationRequest(name=w.destination(destination_id)),
            )
            found[destination.destination.name] = destination.destination.etag
        for schedule_id in ("nightly", "weekly", "b-only"):
            schedule = await self.admin(
                "/audience.v1.ExportService/GetSchedule",
                export_service_pb2.GetScheduleRequest(name=w.schedule(schedule_id)),
            )
            found[schedule.schedule.name] = (schedule.schedule.etag, schedule.schedule.last_job)
        for subscription_id in ("hook", "second", "b-only"):
            subscription = await self.admin(
                "/audience.v1.ExportService/GetWebhookSubscription",
                export_service_pb2.GetWebhookSubscriptionRequest(name=w.hook(subscription_id)),
            )
            found[subscription.webhook_subscription.name] = subscription.webhook_subscription.etag
        jobs = await self.admin(
            "/audience.v1.ExportService/ListExportJobs",
            export_service_pb2.ListExportJobsRequest(parent=w.parent),
        )
        found["jobs"] = sorted((job.name, job.state) for job in jobs.export_jobs)
        failed = await self.admin(
            "/audience.v1.IngestService/ListFailedEvents",
            ingest_service_pb2.ListFailedEventsRequest(parent=w.parent),
        )
        found["failed"] = sorted((f.name, f.replay_count) for f in failed.failed_events)
        deliveries = await self.admin(
            "/audience.v1.ExportService/ListWebhookDeliveries",
            export_service_pb2.ListWebhookDeliveriesRequest(parent=w.hook("hook"), state=DELIVERED),
        )
        found["deliveries"] = sorted(d.name for d in deliveries.webhook_deliveries)
        aggregates = await self.admin(
            "/audience.v1.ProfileService/ListAggregates",
            profile_service_pb2.ListAggregatesRequest(parent=w.parent),
        )
        found["aggregates"] = sorted(spec.aggregate_id for spec in aggregates.aggregates)
        # No RPC lists erased identities; they must stay suppressed all the same.
        found["erased"] = await self.suite.resources.postgres.fetchval(
            "SELECT count(*) FROM profile.erased_identities WHERE dataset = $1", w.dataset
        )
        return found

    async def assert_b_unchanged(self) -> None:
        assert await self.snapshot(self.b) == self.b_before


async def _send(t: Tenancy, w: World, *events: event_pb2.Event) -> None:
    response = await t.admin(
        "/audience.v1.IngestService/SendEvents",
        ingest_service_pb2.SendEventsRequest(parent=w.parent, events=list(events)),
    )
    assert response.accepted_count == len(events), response


async def _profiles_ready(t: Tenancy, w: World) -> None:
    async def ready() -> bool:
        for user in (1, 2, 3):
            try:
                profile = await t.admin(
                    "/audience.v1.ProfileService/GetProfile",
                    profile_service_pb2.GetProfileRequest(name=w.profile(user)),
                )
            except grpc.aio.AioRpcError:
                return False
            if profile.profile.event_count < 3:
                return False
        return True

    await eventually(ready, 30)


async def _segment(t: Tenancy, w: World, segment_id: str, rule_text: str = "") -> None:
    source = segment_pb2.SEGMENT_SOURCE_RULE if rule_text else segment_pb2.SEGMENT_SOURCE_IMPORTED
    await t.admin(
        "/audience.v1.SegmentService/CreateSegment",
        segment_service_pb2.CreateSegmentRequest(
            parent=w.parent,
            segment_id=segment_id,
            segment=segment_pb2.Segment(kind=USER, source=source, rule_text=rule_text),
        ),
    )


async def _join(t: Tenancy, segment: str, *ids: str) -> None:
    await t.admin(
        "/audience.v1.SegmentService/ImportSegmentMembers",
        [
            segment_service_pb2.ImportSegmentMembersRequest(
                segment=segment,
                mode=segment_service_pb2.IMPORT_MODE_ADD,
                ids=segment_service_pb2.ImportedIds(ids=list(ids)),
            )
        ],
    )


async def _members(t: Tenancy, segment: str) -> set[str]:
    response = await t.admin(
        "/audience.v1.MembershipService/ListSegmentMembers",
        membership_service_pb2.ListSegmentMembersRequest(parent=segment),
    )
    return {membership.member for membership in response.memberships}


async def _erased(t: Tenancy, w: World) -> None:
    """Erases a profile of ``w``, user 4, whose identity stays suppressed."""
    await _send(
        t,
        w,
        event(
            user=w.user(4),
            kind=E.EVENT_TYPE_IDENTIFY,
            identities=[("email", w.email(4))],
            at=w.start - timedelta(minutes=10),
        ),
    )

    async def exists() -> bool:
        try:
            await t.admin(
                "/audience.v1.ProfileService/GetProfile",
                profile_service_pb2.GetProfileRequest(name=w.profile(4)),
            )
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(exists, 30)
    await t.admin(
        "/audience.v1.ProfileService/EraseProfile",
        profile_service_pb2.EraseProfileRequest(name=w.profile(4)),
    )


def _failure(w: World, event_id: str) -> bus_events_pb2.FailedEventRecord:
    failed = event(user=w.user(1), name="view", event_id=event_id)
    record = bus_events_pb2.FailedEventRecord(
        event=bus_events_pb2.IngestedEvent(dataset=w.dataset, event=failed),
        failure=profile_pb2.FailedEvent(stage="profile", reason="BAD_CART", message=w.marker),
    )
    record.failure.fail_time.FromDatetime(w.start)
    return record


async def _populate(t: Tenancy, w: World, *, only_here: bool) -> None:
    """Gives ``w`` data of every kind; with ``only_here``, also resources the other dataset
    has no namesake of."""
    await _send(
        t,
        w,
        *(
            event(
                user=w.user(user),
                account=f"{w.prefix}-corp" if user < 3 else "",
                kind=E.EVENT_TYPE_IDENTIFY,
                traits={"plan": "pro", "marker": w.marker},
                identities=[("email", w.email(user))],
                at=w.start - timedelta(minutes=10),
            )
            for user in (1, 2, 3)
        ),
        *(
            event(user=w.user(user), name="view", at=w.start - timedelta(minutes=minutes))
            for user in (1, 2, 3)
            for minutes in (5, 4)
        ),
    )
    await _profiles_ready(t, w)
    await t.admin(
        "/audience.v1.ProfileService/RegisterAggregates",
        profile_service_pb2.RegisterAggregatesRequest(
            parent=w.parent, aggregates=[_spec(timedelta(hours=1)), _spec(timedelta(days=1))]
        ),
    )
    await _segment(t, w, "pro", _pro())
    await _segment(t, w, "vip")
    await _segment(t, w, "stream")
    await _join(t, w.segment("vip"), w.user(1), w.user(2))
    if only_here:
        await _segment(t, w, "secret")
        await _join(t, w.segment("secret"), w.user(3))
        await _erased(t, w)

    for destination_id in ("out", "second", *(("b-only",) if only_here else ())):
        await t.admin(
            "/audience.v1.ExportService/CreateDestination",
            export_service_pb2.CreateDestinationRequest(
                parent=w.parent,
                destination_id=destination_id,
                destination=export_pb2.Destination(
                    folder=export_pb2.FolderTarget(path=str(w.root / destination_id))
                ),
            ),
        )
    for schedule_id in ("nightly", "weekly", *(("b-only",) if only_here else ())):
        await t.admin(
            "/audience.v1.ExportService/CreateSchedule",
            export_service_pb2.CreateScheduleRequest(
                parent=w.parent, schedule_id=schedule_id, schedule=_schedule(w)
            ),
        )
    for subscription_id in ("hook", "second", *(("b-only",) if only_here else ())):
        await t.admin(
            "/audience.v1.ExportService/CreateWebhookSubscription",
            export_service_pb2.CreateWebhookSubscriptionRequest(
                parent=w.parent,
                webhook_subscription_id=subscription_id,
                webhook_subscription=export_pb2.WebhookSubscription(
                    url=t.receiver.url, secret=SECRET, segments=[w.segment("vip")]
                ),
            ),
        )
    for _ in range(2):
        job = await t.admin(
            "/audience.v1.ExportService/CreateExportJob",
            export_service_pb2.CreateExportJobRequest(parent=w.parent, export_job=_job(w)),
        )
        w.jobs.append(job.export_job.name)

    await t.suite.resources.bus.publish(
        FAILED_EVENTS_TOPIC,
        w.user(1),
        bus_events_pb2.FailedEventBatch(
            failures=[_failure(w, f"{w.prefix}-f1"), _failure(w, f"{w.prefix}-f2")]
        ).SerializeToString(),
    )


async def _settled(t: Tenancy, w: World) -> None:
    """Waits until what runs in the background (backfills, jobs, deliveries, failed events)
    is done, so that what follows reads still data."""

    async def pro_filled() -> bool:
        return len(await _members(t, w.segment("pro"))) == 3

    async def jobs_done() -> bool:
        for name in w.jobs:
            job = await t.admin(
                "/audience.v1.ExportService/GetExportJob",
                export_service_pb2.GetExportJobRequest(name=name),
            )
            if job.export_job.state not in FINAL_JOB_STATES:
                return False
        return True

    async def failures_kept() -> bool:
        response = await t.admin(
            "/audience.v1.IngestService/ListFailedEvents",
            ingest_service_pb2.ListFailedEventsRequest(parent=w.parent),
        )
        w.failed_events = [f.name for f in response.failed_events]
        return len(w.failed_events) == 2

    async def watching() -> bool:
        return bool(
            await t.suite.resources.postgres.fetchval(
                "SELECT bool_and(resume_token IS NOT NULL) FROM export.webhook_subscriptions"
                " WHERE dataset = $1",
                w.dataset,
            )
        )

    async def delivered() -> bool:
        response = await t.admin(
            "/audience.v1.ExportService/ListWebhookDeliveries",
            export_service_pb2.ListWebhookDeliveriesRequest(parent=w.hook("hook"), state=DELIVERED),
        )
        w.deliveries = [d.name for d in response.webhook_deliveries]
        return len(w.deliveries) == 2

    await eventually(pro_filled, 30)
    await eventually(jobs_done, 30)
    await eventually(failures_kept, 30)
    await eventually(watching, 30)
    # Two joins after the subscriptions watch: deliveries to list and replay.
    await _join(t, w.segment("vip"), w.user(3), f"{w.prefix}-lead")
    await eventually(delivered, 30)


@pytest.fixture(scope="module")
async def tenancy(
    postgres_dsn: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Tenancy]:
    """One suite and the data of both datasets, for every test of this file: building them
    takes longer than any one check."""
    root = tmp_path_factory.mktemp("exports")
    start = datetime.now(UTC)
    a = World(new_dataset(), f"ann{uuid.uuid4().hex[:8]}", root / "a", start, uuid.uuid4().hex)
    b = World(new_dataset(), f"bob{uuid.uuid4().hex[:8]}", root / "b", start, uuid.uuid4().hex)
    tenant = SuiteKey("tenant-a", (a.dataset,), SCOPES)
    reader = SuiteKey("tenant-a-reader", (a.dataset,), ("read",))
    prefix = f"audience-test-{uuid.uuid4().hex[:12]}"
    environ = {**ENVIRONMENT, "AUDIENCE_EXPORT_ROOT": str(root)}
    try:
        async with (
            HttpReceiver.start() as receiver,
            run_suite(
                SERVICES,
                environ,
                (tenant, reader),
                postgres_dsn=postgres_dsn,
                redis_url=redis_url,
                key_prefix=prefix,
            ) as suite,
        ):
            t = Tenancy(suite, a, b, tenant, reader, receiver)
            await _populate(t, a, only_here=False)
            await _populate(t, b, only_here=True)
            await _settled(t, a)
            await _settled(t, b)
            t.b_before = await t.snapshot(b)
            yield t
    finally:
        client = Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


# --- the tests -----------------------------------------------------------------------------


def test_every_rpc_has_a_case() -> None:
    paths = {_path(method) for method in _methods()}
    assert paths == set(CASES), "add a case for each new RPC (and drop those of removed ones)"
    assert paths <= set(RPC_SCOPES)


async def test_every_rpc_refuses_a_key_of_one_dataset_the_resources_of_another(
    tenancy: Tenancy,
) -> None:
    t = tenancy
    refused: dict[str, str] = {}
    async with t.as_key(t.tenant) as tenant, t.as_key(t.reader) as reader:
        for method in _methods():
            path = _path(method)
            error = await refusal(tenant, method, CASES[path](t.b))
            refused[path] = f"{error.code.name} {error.reason}"
            if RPC_SCOPES[path] == "read":
                # The same request about A's own data is answered: the refusal was about B.
                await call(reader, method, CASES[path](t.a), most=1)

    assert dict.fromkeys(CASES, "PERMISSION_DENIED DATASET_FORBIDDEN") == refused
    await t.assert_b_unchanged()


async def test_every_rpc_that_writes_refuses_a_read_only_key(tenancy: Tenancy) -> None:
    t = tenancy
    refused: dict[str, str] = {}
    async with t.as_key(t.reader) as reader:
        for method in _methods():
            path = _path(method)
            if RPC_SCOPES[path] != "read":
                error = await refusal(reader, method, CASES[path](t.a))
                refused[path] = f"{error.code.name} {error.reason} {error.metadata.get('scope')}"

    assert refused == {
        path: f"PERMISSION_DENIED SCOPE_MISSING {scope}"
        for path, scope in RPC_SCOPES.items()
        if scope != "read"
    }
    assert len(refused) > 20


def _pages() -> Iterator[tuple[MethodDescriptor, Callable[[World], Any]]]:
    """The RPCs that page, each with a request for a page of one item."""
    for method in _methods():
        if "page_token" in method.input_type.fields_by_name:
            build = CASES[_path(method)]

            def one_item(w: World, build: Build = build) -> Any:
                request: Any = build(w)
                request.page_size = 1
                return request

            yield method, one_item


async def test_a_page_token_of_one_dataset_gives_nothing_of_it_in_another(
    tenancy: Tenancy,
) -> None:
    t = tenancy
    tried = []
    async with t.as_key(t.tenant) as tenant:
        for method, build in _pages():
            (first,) = await call(t.suite.channel, method, build(t.b))
            token = first.next_page_token
            assert token, f"{method.name}: B has more than one page"
            request = build(t.a)
            request.page_token = token
            await nothing_of(t.b, call(tenant, method, request))
            tried.append(method.name)

    assert len(tried) == 12, tried
    await t.assert_b_unchanged()


async def test_a_resume_token_of_one_dataset_gives_nothing_of_it_in_another(
    tenancy: Tenancy,
) -> None:
    t = tenancy
    watch = _method("/audience.v1.MembershipService/WatchMembershipChanges")
    (first,) = await call(t.suite.channel, watch, CASES[_path(watch)](t.b), most=1)
    token = first.change.resume_token or first.heartbeat.resume_token
    assert token
    request = membership_service_pb2.WatchMembershipChangesRequest(
        parent=t.a.parent,
        resume_token=token,
        heartbeat_interval=duration_pb2.Duration(seconds=1),
    )
    async with t.as_key(t.tenant) as tenant:
        refused, _ = await nothing_of(t.b, call(tenant, watch, request, most=3))

    assert refused is not None, "a token of another dataset is refused"


async def test_names_of_another_dataset_inside_requests_get_nothing_of_it(
    tenancy: Tenancy,
) -> None:
    t = tenancy
    a, b = t.a, t.b
    # B's ids under A's dataset: none of them is A's, and none may reach B's rows.
    b_profile, b_job, b_delivery, b_failed = (
        b.in_a(b.profile(1), a),
        b.in_a(b.jobs[0], a),
        b.in_a(b.deliveries[0], a),
        b.in_a(b.failed_events[0], a),
    )
    smuggled: list[tuple[str, Message | list[Message]]] = [
        (
            "/audience.v1.ProfileService/GetProfile",
            profile_service_pb2.GetProfileRequest(name=b_profile),
        ),
        (
            "/audience.v1.ProfileService/GetProfile",
            profile_service_pb2.GetProfileRequest(
                identity=common_pb2.Identity(type="email", value=b.email(1)), dataset=a.parent
            ),
        ),
        (
            "/audience.v1.ProfileService/ListProfileEvents",
            profile_service_pb2.ListProfileEventsRequest(parent=b_profile),
        ),
        (
            "/audience.v1.ProfileService/GetAccount",
            profile_service_pb2.GetAccountRequest(name=b.in_a(b.account, a)),
        ),
        (
            "/audience.v1.ProfileService/ListAccountProfiles",
            profile_service_pb2.ListAccountProfilesRequest(parent=b.in_a(b.account, a)),
        ),
        (
            "/audience.v1.ProfileService/MergeProfiles",
            profile_service_pb2.MergeProfilesRequest(target=a.profile(1), sources=[b_profile]),
        ),
        (
            "/audience.v1.ProfileService/EraseProfile",
            profile_service_pb2.EraseProfileRequest(name=b.in_a(b.profile(2), a)),
        ),
        (
            "/audience.v1.ProfileService/ReleaseErasedIdentities",
            profile_service_pb2.ReleaseErasedIdentitiesRequest(
                parent=a.parent, identities=[common_pb2.Identity(type="email", value=b.email(4))]
            ),
        ),
        (
            "/audience.v1.ProfileService/QueryProfiles",
            profile_service_pb2.QueryProfilesRequest(
                parent=a.parent,
                kind=USER,
                rule=_rule(f'in segment "{a.segment("vip")}"'),
                referenced_segments=[
                    profile_service_pb2.ReferencedSegment(
                        segment=a.segment("vip"),
                        members=profile_service_pb2.ProfileIdList(
                            profile_ids=[b.user(1), b.user(2)]
                        ),
                    )
                ],
            ),
        ),
        (
            "/audience.v1.ProfileService/QueryProfiles",
            profile_service_pb2.QueryProfilesRequest(
                parent=a.parent, kind=USER, rule=_rule(f'attributes.marker = "{b.marker}"')
            ),
        ),
        # B's segment by name, by reference in a rule tree and in rule text.
        (
            "/audience.v1.SegmentService/GetSegment",
            segment_service_pb2.GetSegmentRequest(name=b.in_a(b.segment("secret"), a)),
        ),
        (
            "/audience.v1.SegmentService/UpdateSegment",
            segment_service_pb2.UpdateSegmentRequest(
                segment=segment_pb2.Segment(
                    name=b.in_a(b.segment("secret"), a), display_name="Taken"
                ),
                update_mask=_mask("display_name"),
            ),
        ),
        (
            "/audience.v1.SegmentService/DeleteSegment",
            segment_service_pb2.DeleteSegmentRequest(name=b.in_a(b.segment("secret"), a)),
        ),
        (
            "/audience.v1.SegmentService/CreateSegment",
            segment_service_pb2.CreateSegmentRequest(
                parent=a.parent,
                segment_id="borrowed-tree",
                segment=segment_pb2.Segment(
                    kind=USER, rule=_rule(f'in segment "{b.segment("secret")}"')
                ),
            ),
        ),
        (
            "/audience.v1.SegmentService/CreateSegment",
            segment_service_pb2.CreateSegmentRequest(
                parent=a.parent,
                segment_id="borrowed-text",
                segment=segment_pb2.Segment(
                    kind=USER, rule_text=f'in segment "{b.segment("secret")}"'
                ),
            ),
        ),
        (
            "/audience.v1.SegmentService/ValidateRule",
            segment_service_pb2.ValidateRuleRequest(
                parent=a.parent, kind=USER, rule_text=f'in segment "{b.segment("secret")}"'
            ),
        ),
        (
            "/audience.v1.SegmentService/PreviewSegment",
            segment_service_pb2.PreviewSegmentRequest(
                parent=a.parent, kind=USER, rule_text=f'in segment "{b.segment("secret")}"'
            ),
        ),
        (
            "/audience.v1.SegmentService/PreviewSegment",
            segment_service_pb2.PreviewSegmentRequest(
                parent=a.parent, kind=USER, rule_text=f'attributes.marker = "{b.marker}"'
            ),
        ),
        (
            "/audience.v1.SegmentService/ImportSegmentMembers",
            [
                segment_service_pb2.ImportSegmentMembersRequest(
                    segment=b.in_a(b.segment("secret"), a),
                    mode=segment_service_pb2.IMPORT_MODE_REPLACE,
                    ids=segment_service_pb2.ImportedIds(ids=["intruder"]),
                )
            ],
        ),
        (
            "/audience.v1.SegmentService/GetSegmentStats",
            segment_service_pb2.GetSegmentStatsRequest(name=b.in_a(b.segment("secret"), a)),
        ),
        # B's members and segments under A's names.
        (
            "/audience.v1.MembershipService/ListMemberships",
            membership_service_pb2.ListMembershipsRequest(parent=b_profile),
        ),
        (
            "/audience.v1.MembershipService/CheckMembership",
            membership_service_pb2.CheckMembershipRequest(
                member=b_profile, segment=a.segment("pro")
            ),
        ),
        (
            "/audience.v1.MembershipService/ListSegmentMembers",
            membership_service_pb2.ListSegmentMembersRequest(parent=b.in_a(b.segment("secret"), a)),
        ),
        (
            "/audience.v1.MembershipService/StreamSegmentMembers",
            membership_service_pb2.StreamSegmentMembersRequest(
                parent=b.in_a(b.segment("secret"), a)
            ),
        ),
        (
            "/audience.v1.MembershipService/CountSegmentMembers",
            membership_service_pb2.CountSegmentMembersRequest(
                segment=b.in_a(b.segment("secret"), a)
            ),
        ),
        (
            "/audience.v1.MembershipService/ExplainMembership",
            membership_service_pb2.ExplainMembershipRequest(
                member=b_profile, segment=a.segment("pro")
            ),
        ),
        (
            "/audience.v1.ExportService/ExportSegmentCsv",
            export_service_pb2.ExportSegmentCsvRequest(segments=[b.in_a(b.segment("secret"), a)]),
        ),
        # B's export resources under A's names.
        (
            "/audience.v1.ExportService/GetDestination",
            export_service_pb2.GetDestinationRequest(name=b.in_a(b.destination("b-only"), a)),
        ),
        (
            "/audience.v1.ExportService/UpdateDestination",
            export_service_pb2.UpdateDestinationRequest(
                destination=export_pb2.Destination(
                    name=b.in_a(b.destination("b-only"), a), display_name="Taken"
                ),
                update_mask=_mask("display_name"),
            ),
        ),
        (
            "/audience.v1.ExportService/DeleteDestination",
            export_service_pb2.DeleteDestinationRequest(name=b.in_a(b.destination("b-only"), a)),
        ),
        (
            "/audience.v1.ExportService/CreateExportJob",
            export_service_pb2.CreateExportJobRequest(
                parent=a.parent, export_job=_job(a, destination="b-only")
            ),
        ),
        (
            "/audience.v1.ExportService/GetExportJob",
            export_service_pb2.GetExportJobRequest(name=b_job),
        ),
        (
            "/audience.v1.ExportService/CancelExportJob",
            export_service_pb2.CancelExportJobRequest(name=b_job),
        ),
        (
            "/audience.v1.ExportService/ListExportJobs",
            export_service_pb2.ListExportJobsRequest(
                parent=a.parent, schedule=b.in_a(b.schedule("b-only"), a)
            ),
        ),
        (
            "/audience.v1.ExportService/GetSchedule",
            export_service_pb2.GetScheduleRequest(name=b.in_a(b.schedule("b-only"), a)),
        ),
        (
            "/audience.v1.ExportService/UpdateSchedule",
            export_service_pb2.UpdateScheduleRequest(
                schedule=export_pb2.Schedule(
                    name=b.in_a(b.schedule("b-only"), a), display_name="Taken"
                ),
                update_mask=_mask("display_name"),
            ),
        ),
        (
            "/audience.v1.ExportService/DeleteSchedule",
            export_service_pb2.DeleteScheduleRequest(name=b.in_a(b.schedule("b-only"), a)),
        ),
        (
            "/audience.v1.ExportService/RunSchedule",
            export_service_pb2.RunScheduleRequest(name=b.in_a(b.schedule("b-only"), a)),
        ),
        (
            "/audience.v1.ExportService/GetWebhookSubscription",
            export_service_pb2.GetWebhookSubscriptionRequest(name=b.in_a(b.hook("b-only"), a)),
        ),
        (
            "/audience.v1.ExportService/UpdateWebhookSubscription",
            export_service_pb2.UpdateWebhookSubscriptionRequest(
                webhook_subscription=export_pb2.WebhookSubscription(
                    name=b.in_a(b.hook("b-only"), a), url="http://127.0.0.1:9/taken"
                ),
                update_mask=_mask("url"),
            ),
        ),
        (
            "/audience.v1.ExportService/DeleteWebhookSubscription",
            export_service_pb2.DeleteWebhookSubscriptionRequest(name=b.in_a(b.hook("b-only"), a)),
        ),
        (
            "/audience.v1.ExportService/ListWebhookDeliveries",
            export_service_pb2.ListWebhookDeliveriesRequest(
                parent=b.in_a(b.hook("b-only"), a), state=DELIVERED
            ),
        ),
        (
            "/audience.v1.ExportService/ReplayWebhookDeliveries",
            export_service_pb2.ReplayWebhookDeliveriesRequest(
                parent=a.hook("hook"), names=[b_delivery]
            ),
        ),
        (
            "/audience.v1.IngestService/ReplayFailedEvents",
            ingest_service_pb2.ReplayFailedEventsRequest(parent=a.parent, names=[b_failed]),
        ),
    ]
    outcomes: list[tuple[str, str]] = []
    async with t.as_key(t.tenant) as tenant:
        for path, request in smuggled:
            refused, responses = await nothing_of(b, call(tenant, _method(path), request))
            outcomes.append((path, refused.code.name if refused else "answered"))
            for response in responses:
                kind = response.DESCRIPTOR.full_name
                assert kind in HOLDS_NOTHING, f"{path} answered: what may its answer hold?"
                assert HOLDS_NOTHING[kind](response), (path, response)

    by_path = dict(outcomes)
    # Not there for A, so not found (a rule naming B's segment is refused before that).
    for path in (
        "/audience.v1.ProfileService/GetAccount",
        "/audience.v1.SegmentService/GetSegment",
        "/audience.v1.ExportService/GetDestination",
        "/audience.v1.ExportService/GetExportJob",
        "/audience.v1.ExportService/GetSchedule",
        "/audience.v1.ExportService/GetWebhookSubscription",
    ):
        assert by_path[path] == "NOT_FOUND", (path, outcomes)
    await t.assert_b_unchanged()
    # And A got nothing new out of it either: no segment was made of B's.
    async with t.as_key(t.tenant) as tenant:
        listed = await call(
            tenant,
            _method("/audience.v1.SegmentService/ListSegments"),
            segment_service_pb2.ListSegmentsRequest(parent=a.parent),
        )
    assert not leaked(listed, b)
    names = {segment.name for response in listed for segment in response.segments}
    assert names == {a.segment(s) for s in ("pro", "vip", "stream")}


async def test_the_change_stream_of_one_dataset_never_carries_another_s_changes(
    tenancy: Tenancy,
) -> None:
    t = tenancy
    a, b = t.a, t.b
    watch = _method("/audience.v1.MembershipService/WatchMembershipChanges")
    heard: list[membership_pb2.MembershipChange] = []

    async def listen(channel: grpc.aio.Channel) -> None:
        stream = channel.unary_stream(
            _path(watch),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=membership_service_pb2.WatchMembershipChangesResponse.FromString,
        )(
            membership_service_pb2.WatchMembershipChangesRequest(
                parent=a.parent, heartbeat_interval=duration_pb2.Duration(seconds=1)
            )
        )
        with contextlib.suppress(asyncio.CancelledError):
            async for response in stream:
                if response.HasField("change"):
                    heard.append(response.change)

    async with t.as_key(t.tenant) as tenant:
        listening = asyncio.create_task(listen(tenant))
        try:
            # The stream starts from now: give it a moment to be in place.
            await asyncio.sleep(0.5)
            await _join(t, b.segment("stream"), b.user(1), b.user(2))
            await _join(t, a.segment("stream"), a.user(1))
            await _join(t, b.segment("stream"), b.user(3))
            # A's last change comes after B's: once it is heard, B's would have been too.
            await _join(t, a.segment("stream"), a.user(2))
            deadline = time.monotonic() + 20
            while {c.member for c in heard} != {a.profile(1), a.profile(2)}:
                assert time.monotonic() < deadline, heard
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening

    assert [(c.member, c.segment, c.kind) for c in heard] == [
        (a.profile(1), a.segment("stream"), JOIN),
        (a.profile(2), a.segment("stream"), JOIN),
    ]
    assert not leaked(
        [membership_service_pb2.WatchMembershipChangesResponse(change=c) for c in heard], b
    )
    # B's stream did carry B's changes: they were there to leak.
    assert await _members(t, b.segment("stream")) == {b.profile(u) for u in (1, 2, 3)}


async def test_the_exports_and_webhooks_of_one_dataset_carry_nothing_of_another(
    tenancy: Tenancy,
) -> None:
    t = tenancy
    a, b = t.a, t.b
    async with t.as_key(t.tenant) as tenant:
        csv = await call(
            tenant,
            _method("/audience.v1.ExportService/ExportSegmentCsv"),
            CASES["/audience.v1.ExportService/ExportSegmentCsv"](a),
        )
        deliveries = await call(
            tenant,
            _method("/audience.v1.ExportService/ListWebhookDeliveries"),
            CASES["/audience.v1.ExportService/ListWebhookDeliveries"](a),
        )
    files = sorted(a.root.rglob("*.csv"))
    written = [path.read_text() for path in files]

    assert files
    for what in (b"".join(r.data for r in csv).decode(), *written):
        assert a.user(1) in what
        assert not [marker for marker in b.markers() if marker in what], what
    payloads = [d.payload for r in deliveries for d in r.webhook_deliveries]
    assert len(payloads) == 2
    for payload in payloads:
        assert a.dataset in payload
        assert not [marker for marker in b.markers() if marker in payload], payload
