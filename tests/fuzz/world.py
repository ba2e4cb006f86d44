"""A seeded dataset to fuzz against, and a valid request for every RPC.

Fuzzing only with garbage stops at the first check of every handler. :func:`seed` fills a
dataset through the public RPCs (profiles in an account, a rule segment of each kind, an
imported one with members, a destination, a schedule, a webhook subscription and an
export job); :func:`valid_requests` gives each RPC requests that name those resources,
which the fuzzer sends as they are and with fuzzed fields merged in.

Nothing here reaches outside the machine: the SFTP destination and the webhook point at
closed ports of 127.0.0.1, and folder destinations lie under a temporary root.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from audience.v1 import (
    common_pb2,
    event_pb2,
    export_pb2,
    export_service_pb2,
    export_service_pb2_grpc,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_pb2,
    membership_service_pb2,
    profile_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
    rule_pb2,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from tests.fuzz.strategies import Pools

__all__ = ["SECRET_VARIABLE", "World", "seed", "valid_requests"]

SECRET_VARIABLE = "AUDIENCE_SECRET_FUZZ"
USERS = ("u1", "u2", "u3", "u4")
ACCOUNT = "acme"
USER_RULE = 'attributes.plan = "pro" or count(event "product_view", last 7 days) >= 1'
ACCOUNT_RULE = 'count(users where attributes.plan = "pro") >= 1'
# Closed ports: a delivery or an upload fails at once, without leaving the machine.
WEBHOOK_URL = "http://127.0.0.1:9/hook"
SFTP_PORT = 9


@dataclass(frozen=True)
class World:
    """The resources :func:`seed` made, by resource name."""

    dataset: str
    other_dataset: str
    profiles: tuple[str, ...]
    account: str
    user_segment: str
    imported_segment: str
    account_segment: str
    destination: str
    schedule: str
    webhook: str
    export_job: str
    export_root: str

    @property
    def parent(self) -> str:
        return f"datasets/{self.dataset}"

    @property
    def other_parent(self) -> str:
        return f"datasets/{self.other_dataset}"

    def pools(self) -> Pools:
        names = (
            self.parent,
            self.other_parent,
            *self.profiles,
            self.account,
            self.user_segment,
            self.imported_segment,
            self.account_segment,
            self.destination,
            self.schedule,
            self.webhook,
            self.export_job,
            # Near misses: another dataset, a missing resource, the wrong collection.
            f"{self.other_parent}/segments/vip",
            f"{self.parent}/segments/missing",
            f"{self.parent}/profiles/missing",
            f"{self.parent}/segments/{USERS[0]}",
            f"{self.parent}/failedEvents/1",
            f"{self.webhook}/deliveries/1",
            f"{self.parent}/exportJobs/missing",
        )
        words = (*USERS, ACCOUNT, "plan", "pro", "product_view", "email", "user_id", "UTC")
        return Pools(
            names=names,
            words=words,
            by_field={
                "rule_text": (
                    USER_RULE,
                    ACCOUNT_RULE,
                    f'in segment "{self.user_segment}"',
                    f'in segment "{self.other_parent}/segments/x"',
                    "(" * 17 + "attributes.a exists" + ")" * 17,
                    "all(" * 60 + "attributes.a exists" + ")" * 60,
                    "not " * 120 + "attributes.a exists",
                    "(" * 300,
                    'attributes.a = "' + "x" * 2_000 + '"',
                    "cart.value < 1e999",
                ),
                "cron": ("0 3 * * *", "* * * * *", "61 * * * *", "0 0 31 2 *", "@reboot", ""),
                "time_zone": ("UTC", "Europe/Paris", "Mars/Olympus", "../../etc/localtime"),
                "url": (
                    WEBHOOK_URL,
                    "https://127.0.0.1:1/x",
                    "http://[::1]:9/",
                    "http://user:pw@127.0.0.1:9/",
                    "http://127.0.0.1:99999/",
                    "ftp://127.0.0.1/",
                    "http://",
                ),
                "host": ("127.0.0.1", "localhost", "::1", "256.0.0.1", "-oProxyCommand=id"),
                "path": (
                    self.export_root,
                    f"{self.export_root}/sub",
                    f"{self.export_root}/../escape",
                    "/",
                    "relative/path",
                ),
                "credential_secret": (SECRET_VARIABLE, "FUZZ", "AUDIENCE_SECRET_", "lower"),
                "known_host_key": ("127.0.0.1 ssh-ed25519 AAAA", "garbage"),
                "secret": ("s" * 16, "s" * 15, "s" * 257),
                "file_name_template": (
                    "{segment}-{date}.csv",
                    "../{segment}.csv",
                    "/abs.csv",
                    "{time}/{date}",
                ),
                "identity_type": ("email", "user_id", "Bad Type"),
                "attribute_path": ("plan", "a.b.c", "", "x" * 200),
                "page_token": ("", "bm9wZQ", "!!!", "A" * 500),
                "resume_token": ("", "bm9wZQ", "!!!", "0", "A" * 500),
                "etag": ('"0"', "W/1", "stale"),
                "type": ("email", "user_id", "anonymous_id", "Bad Type"),
                "value": ("u1", "ada@example.com"),
            },
            rule_segments=(self.user_segment, self.imported_segment, self.account_segment),
        )


def _event(index: int, user: str, **fields: object) -> event_pb2.Event:
    event = event_pb2.Event(
        event_id=f"seed-{user}-{index}",
        type=event_pb2.EVENT_TYPE_TRACK,
        name="product_view",
        user_id=user,
        **fields,  # type: ignore[arg-type]
    )
    event.properties["category"].string_value = "shoes"
    return event


def _identify(user: str) -> event_pb2.Event:
    event = event_pb2.Event(
        event_id=f"seed-{user}-identify",
        type=event_pb2.EVENT_TYPE_IDENTIFY,
        name="identify",
        user_id=user,
        account_id=ACCOUNT if user in USERS[:2] else "",
    )
    event.identify.traits["plan"].string_value = "pro" if user == USERS[0] else "free"
    event.identify.identities.add(type="email", value=f"{user}@example.com")
    return event


async def _until(check: Callable[[], object], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"seeding: {what} did not happen within {within} s")
        await asyncio.sleep(0.1)


async def seed(
    channel: grpc.aio.Channel,
    dataset: str,
    other_dataset: str,
    export_root: str,
    metadata: Sequence[tuple[str, str]] = (),
) -> World:
    """Fills ``dataset`` through the public RPCs and returns what it made."""
    parent = f"datasets/{dataset}"
    ingest = ingest_service_pb2_grpc.IngestServiceStub(channel)
    profiles = profile_service_pb2_grpc.ProfileServiceStub(channel)
    segments = segment_service_pb2_grpc.SegmentServiceStub(channel)
    export = export_service_pb2_grpc.ExportServiceStub(channel)
    md = tuple(metadata)

    events = [_identify(user) for user in USERS] + [
        _event(index, user) for index, user in enumerate(USERS[:2])
    ]
    sent = await ingest.SendEvents(
        ingest_service_pb2.SendEventsRequest(parent=parent, events=events),
        timeout=10,
        metadata=md,
    )
    assert sent.accepted_count == len(events), sent
    names = tuple(f"{parent}/profiles/{user}" for user in USERS)

    async def profiles_applied() -> bool:
        for name in names:
            await profiles.GetProfile(
                profile_service_pb2.GetProfileRequest(name=name), timeout=10, metadata=md
            )
        return True

    await _until(profiles_applied, "the seeded profiles")

    async def create_segment(segment_id: str, segment: segment_pb2.Segment) -> str:
        response = await segments.CreateSegment(
            segment_service_pb2.CreateSegmentRequest(
                parent=parent, segment_id=segment_id, segment=segment
            ),
            timeout=10,
            metadata=md,
        )
        name: str = response.segment.name
        return name

    user_segment = await create_segment(
        "pro-users",
        segment_pb2.Segment(
            kind=segment_pb2.SEGMENT_KIND_USER,
            source=segment_pb2.SEGMENT_SOURCE_RULE,
            rule_text=USER_RULE,
            labels={"team": "growth"},
        ),
    )
    imported_segment = await create_segment(
        "crm-list",
        segment_pb2.Segment(
            kind=segment_pb2.SEGMENT_KIND_USER, source=segment_pb2.SEGMENT_SOURCE_IMPORTED
        ),
    )
    account_segment = await create_segment(
        "pro-accounts",
        segment_pb2.Segment(
            kind=segment_pb2.SEGMENT_KIND_ACCOUNT,
            source=segment_pb2.SEGMENT_SOURCE_RULE,
            rule_text=ACCOUNT_RULE,
        ),
    )
    await segments.ImportSegmentMembers(
        iter(
            [
                segment_service_pb2.ImportSegmentMembersRequest(
                    segment=imported_segment,
                    mode=segment_service_pb2.IMPORT_MODE_ADD,
                    ids=segment_service_pb2.ImportedIds(ids=list(USERS[:3])),
                )
            ]
        ),
        timeout=10,
        metadata=md,
    )

    destination = await export.CreateDestination(
        export_service_pb2.CreateDestinationRequest(
            parent=parent,
            destination_id="partner",
            destination=export_pb2.Destination(display_name="Partner", sftp=_sftp()),
        ),
        timeout=10,
        metadata=md,
    )
    schedule = await export.CreateSchedule(
        export_service_pb2.CreateScheduleRequest(
            parent=parent,
            schedule_id="nightly",
            schedule=export_pb2.Schedule(
                cron="0 3 * * *",
                time_zone="UTC",
                paused=True,
                job_template=_job(user_segment, destination.destination.name),
            ),
        ),
        timeout=10,
        metadata=md,
    )
    webhook = await export.CreateWebhookSubscription(
        export_service_pb2.CreateWebhookSubscriptionRequest(
            parent=parent,
            webhook_subscription_id="crm-hook",
            webhook_subscription=export_pb2.WebhookSubscription(
                url=WEBHOOK_URL,
                segments=[user_segment],
                secret="s" * 32,
                paused=True,
            ),
        ),
        timeout=10,
        metadata=md,
    )
    job = await export.CreateExportJob(
        export_service_pb2.CreateExportJobRequest(
            parent=parent,
            export_job_id="first",
            export_job=_job(imported_segment, destination.destination.name),
        ),
        timeout=10,
        metadata=md,
    )
    return World(
        dataset=dataset,
        other_dataset=other_dataset,
        profiles=names,
        account=f"{parent}/accounts/{ACCOUNT}",
        user_segment=user_segment,
        imported_segment=imported_segment,
        account_segment=account_segment,
        destination=destination.destination.name,
        schedule=schedule.schedule.name,
        webhook=webhook.webhook_subscription.name,
        export_job=job.export_job.name,
        export_root=export_root,
    )


def _sftp() -> export_pb2.SftpTarget:
    return export_pb2.SftpTarget(
        host="127.0.0.1",
        port=SFTP_PORT,
        path="/incoming",
        username="audience",
        credential_secret=SECRET_VARIABLE,
    )


def _job(segment: str, destination: str) -> export_pb2.ExportJob:
    return export_pb2.ExportJob(
        segments=[segment],
        mode=export_pb2.EXPORT_MODE_FULL,
        destination=destination,
        columns=[
            export_pb2.ExportColumn(field=export_pb2.EXPORT_FIELD_PROFILE_ID),
            export_pb2.ExportColumn(identity_type="email", header="Email"),
            export_pb2.ExportColumn(attribute_path="plan"),
        ],
    )


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def _pro_rule() -> rule_pb2.Rule:
    """USER_RULE's first clause as a tree, so that tree inputs start valid too."""
    rule = rule_pb2.Rule()
    rule.attribute.path = "plan"
    rule.attribute.comparison.operator = rule_pb2.OPERATOR_EQUALS
    rule.attribute.comparison.value.string_value = "pro"
    return rule


def _ingest(w: World) -> Mapping[str, list[Message]]:
    event = _event(99, USERS[0])
    cart = event_pb2.Event(
        event_id="fuzz-cart",
        type=event_pb2.EVENT_TYPE_CART_UPDATED,
        name="cart_updated",
        user_id=USERS[1],
        cart=event_pb2.Cart(
            currency="USD",
            items=[event_pb2.CartItem(product_id="sku-1", price=40.0, quantity=2)],
        ),
    )
    return {
        "SendEvent": [
            ingest_service_pb2.SendEventRequest(parent=w.parent, event=event),
            ingest_service_pb2.SendEventRequest(parent=w.parent, event=cart),
        ],
        "SendEvents": [ingest_service_pb2.SendEventsRequest(parent=w.parent, events=[event, cart])],
        "StreamEvents": [
            ingest_service_pb2.StreamEventsRequest(parent=w.parent, events=[event]),
            ingest_service_pb2.StreamEventsRequest(events=[cart]),
        ],
        "ListFailedEvents": [
            ingest_service_pb2.ListFailedEventsRequest(parent=w.parent, page_size=10)
        ],
        "ReplayFailedEvents": [
            ingest_service_pb2.ReplayFailedEventsRequest(
                parent=w.parent, names=[f"{w.parent}/failedEvents/1"]
            )
        ],
    }


def _profile(w: World) -> Mapping[str, list[Message]]:
    u1, u2, u3, _ = w.profiles
    spec = profile_pb2.AggregateSpec(
        event_name="product_view",
        function=rule_pb2.AGGREGATE_FUNCTION_COUNT,
        bucket_width=duration_pb2.Duration(seconds=3_600),
        retention=duration_pb2.Duration(seconds=8 * 86_400),
    )
    return {
        "GetProfile": [
            profile_service_pb2.GetProfileRequest(name=u1, view=profile_pb2.PROFILE_VIEW_FULL),
            profile_service_pb2.GetProfileRequest(
                dataset=w.parent,
                identity=common_pb2.Identity(type="email", value="u2@example.com"),
            ),
        ],
        "ListProfileEvents": [
            profile_service_pb2.ListProfileEventsRequest(
                parent=u1,
                page_size=2,
                event_name="product_view",
                start_time=timestamp_pb2.Timestamp(seconds=0),
            )
        ],
        "GetAccount": [profile_service_pb2.GetAccountRequest(name=w.account)],
        "ListAccountProfiles": [
            profile_service_pb2.ListAccountProfilesRequest(parent=w.account, page_size=1)
        ],
        "MergeProfiles": [profile_service_pb2.MergeProfilesRequest(target=u1, sources=[u2])],
        "EraseProfile": [profile_service_pb2.EraseProfileRequest(name=u3)],
        "ReleaseErasedIdentities": [
            profile_service_pb2.ReleaseErasedIdentitiesRequest(
                parent=w.parent, identities=[common_pb2.Identity(type="user_id", value="u3")]
            )
        ],
        "QueryProfiles": [
            profile_service_pb2.QueryProfilesRequest(
                parent=w.parent,
                kind=segment_pb2.SEGMENT_KIND_USER,
                rule=_pro_rule(),
                chunk_size=1,
            ),
            profile_service_pb2.QueryProfilesRequest(
                parent=w.parent,
                kind=segment_pb2.SEGMENT_KIND_USER,
                rule=rule_pb2.Rule(segment=rule_pb2.SegmentCondition(segment=w.imported_segment)),
                referenced_segments=[
                    profile_service_pb2.ReferencedSegment(
                        segment=w.imported_segment,
                        members=profile_service_pb2.ProfileIdList(profile_ids=list(USERS[:2])),
                    )
                ],
                count_only=True,
            ),
        ],
        "RegisterAggregates": [
            profile_service_pb2.RegisterAggregatesRequest(parent=w.parent, aggregates=[spec])
        ],
        "ListAggregates": [profile_service_pb2.ListAggregatesRequest(parent=w.parent)],
    }


def _segment(w: World) -> Mapping[str, list[Message]]:
    user = segment_pb2.SEGMENT_KIND_USER
    return {
        "CreateSegment": [
            segment_service_pb2.CreateSegmentRequest(
                parent=w.parent,
                segment_id="fuzzed",
                segment=segment_pb2.Segment(
                    kind=user,
                    source=segment_pb2.SEGMENT_SOURCE_RULE,
                    rule_text=f'in segment "{w.user_segment}" and cart.value < 100',
                    display_name="Fuzzed",
                ),
            ),
            segment_service_pb2.CreateSegmentRequest(
                parent=w.parent,
                segment_id="fuzzed-tree",
                segment=segment_pb2.Segment(
                    kind=user, source=segment_pb2.SEGMENT_SOURCE_RULE, rule=_pro_rule()
                ),
            ),
        ],
        "GetSegment": [segment_service_pb2.GetSegmentRequest(name=w.user_segment)],
        "ListSegments": [
            segment_service_pb2.ListSegmentsRequest(parent=w.parent, page_size=1, kind=user)
        ],
        "UpdateSegment": [
            segment_service_pb2.UpdateSegmentRequest(
                segment=segment_pb2.Segment(
                    name=w.user_segment,
                    display_name="Pro users",
                    rule_text=USER_RULE,
                    labels={"team": "growth"},
                ),
                update_mask=_mask("display_name", "rule_text", "labels"),
            )
        ],
        "DeleteSegment": [segment_service_pb2.DeleteSegmentRequest(name=w.account_segment)],
        "ValidateRule": [
            segment_service_pb2.ValidateRuleRequest(
                parent=w.parent, kind=user, rule_text=USER_RULE
            ),
            segment_service_pb2.ValidateRuleRequest(parent=w.parent, kind=user, rule=_pro_rule()),
        ],
        "PreviewSegment": [
            segment_service_pb2.PreviewSegmentRequest(
                parent=w.parent, kind=user, rule_text=USER_RULE, sample_size=2
            ),
            segment_service_pb2.PreviewSegmentRequest(
                parent=w.parent,
                kind=segment_pb2.SEGMENT_KIND_ACCOUNT,
                rule_text=ACCOUNT_RULE,
            ),
        ],
        "ImportSegmentMembers": [
            segment_service_pb2.ImportSegmentMembersRequest(
                segment=w.imported_segment,
                mode=segment_service_pb2.IMPORT_MODE_ADD,
                ids=segment_service_pb2.ImportedIds(ids=["u4"]),
            ),
            segment_service_pb2.ImportSegmentMembersRequest(
                segment=w.imported_segment,
                mode=segment_service_pb2.IMPORT_MODE_REPLACE,
                csv=b"profile_id\nu1\nu2\n",
            ),
            segment_service_pb2.ImportSegmentMembersRequest(csv=b"u3\n"),
        ],
        "GetSegmentStats": [segment_service_pb2.GetSegmentStatsRequest(name=w.user_segment)],
    }


def _membership(w: World) -> Mapping[str, list[Message]]:
    u1 = w.profiles[0]
    return {
        "ListMemberships": [
            membership_service_pb2.ListMembershipsRequest(parent=u1),
            membership_service_pb2.ListMembershipsRequest(
                parent=w.account, read_time=timestamp_pb2.Timestamp(seconds=1_700_000_000)
            ),
        ],
        "CheckMembership": [
            membership_service_pb2.CheckMembershipRequest(member=u1, segment=w.user_segment)
        ],
        "ListSegmentMembers": [
            membership_service_pb2.ListSegmentMembersRequest(parent=w.imported_segment, page_size=1)
        ],
        "StreamSegmentMembers": [
            membership_service_pb2.StreamSegmentMembersRequest(
                parent=w.imported_segment, chunk_size=1, include_segment_versions=True
            ),
            membership_service_pb2.StreamSegmentMembersRequest(parent=w.account_segment),
        ],
        "CountSegmentMembers": [
            membership_service_pb2.CountSegmentMembersRequest(segment=w.user_segment)
        ],
        "ExplainMembership": [
            membership_service_pb2.ExplainMembershipRequest(member=u1, segment=w.user_segment),
            membership_service_pb2.ExplainMembershipRequest(
                member=w.account, segment=w.account_segment
            ),
        ],
        "WatchMembershipChanges": [
            membership_service_pb2.WatchMembershipChangesRequest(
                parent=w.parent,
                segments=[w.user_segment],
                kind=membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN,
                start_time=timestamp_pb2.Timestamp(seconds=int(time.time()) - 60),
                heartbeat_interval=duration_pb2.Duration(seconds=1),
            )
        ],
    }


def _export(w: World) -> Mapping[str, list[Message]]:
    destination = export_pb2.Destination(display_name="Other", sftp=_sftp())
    folder = export_pb2.Destination(folder=export_pb2.FolderTarget(path=w.export_root))
    schedule = export_pb2.Schedule(
        cron="30 2 * * *",
        time_zone="Europe/Paris",
        paused=True,
        job_template=_job(w.user_segment, w.destination),
    )
    subscription = export_pb2.WebhookSubscription(
        url=WEBHOOK_URL,
        segments=[w.imported_segment],
        kinds=[membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE],
        secret="t" * 20,
        paused=True,
        max_attempts=3,
    )
    return {
        "ExportSegmentCsv": [
            export_service_pb2.ExportSegmentCsvRequest(
                segments=[w.imported_segment, w.user_segment],
                columns=_job(w.user_segment, w.destination).columns,
            )
        ],
        "CreateDestination": [
            export_service_pb2.CreateDestinationRequest(
                parent=w.parent, destination_id="other", destination=destination
            ),
            export_service_pb2.CreateDestinationRequest(
                parent=w.parent, destination_id="local", destination=folder
            ),
        ],
        "GetDestination": [export_service_pb2.GetDestinationRequest(name=w.destination)],
        "ListDestinations": [export_service_pb2.ListDestinationsRequest(parent=w.parent)],
        "UpdateDestination": [
            export_service_pb2.UpdateDestinationRequest(
                destination=export_pb2.Destination(name=w.destination, display_name="Renamed"),
                update_mask=_mask("display_name"),
            )
        ],
        "DeleteDestination": [export_service_pb2.DeleteDestinationRequest(name=w.destination)],
        "CreateExportJob": [
            export_service_pb2.CreateExportJobRequest(
                parent=w.parent, export_job=_job(w.user_segment, w.destination)
            )
        ],
        "GetExportJob": [export_service_pb2.GetExportJobRequest(name=w.export_job)],
        "ListExportJobs": [
            export_service_pb2.ListExportJobsRequest(parent=w.parent, schedule=w.schedule)
        ],
        "CancelExportJob": [export_service_pb2.CancelExportJobRequest(name=w.export_job)],
        "CreateSchedule": [
            export_service_pb2.CreateScheduleRequest(
                parent=w.parent, schedule_id="weekly", schedule=schedule
            )
        ],
        "GetSchedule": [export_service_pb2.GetScheduleRequest(name=w.schedule)],
        "ListSchedules": [export_service_pb2.ListSchedulesRequest(parent=w.parent)],
        "UpdateSchedule": [
            export_service_pb2.UpdateScheduleRequest(
                schedule=export_pb2.Schedule(name=w.schedule, cron="0 4 * * 1", paused=True),
                update_mask=_mask("cron", "paused"),
            )
        ],
        "DeleteSchedule": [export_service_pb2.DeleteScheduleRequest(name=w.schedule)],
        "RunSchedule": [export_service_pb2.RunScheduleRequest(name=w.schedule)],
        "CreateWebhookSubscription": [
            export_service_pb2.CreateWebhookSubscriptionRequest(
                parent=w.parent,
                webhook_subscription_id="other-hook",
                webhook_subscription=subscription,
            )
        ],
        "GetWebhookSubscription": [
            export_service_pb2.GetWebhookSubscriptionRequest(name=w.webhook)
        ],
        "ListWebhookSubscriptions": [
            export_service_pb2.ListWebhookSubscriptionsRequest(parent=w.parent)
        ],
        "UpdateWebhookSubscription": [
            export_service_pb2.UpdateWebhookSubscriptionRequest(
                webhook_subscription=export_pb2.WebhookSubscription(
                    name=w.webhook,
                    max_attempts=5,
                    kinds=[membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN],
                ),
                update_mask=_mask("max_attempts", "kinds"),
            )
        ],
        "DeleteWebhookSubscription": [
            export_service_pb2.DeleteWebhookSubscriptionRequest(name=w.webhook)
        ],
        "ListWebhookDeliveries": [
            export_service_pb2.ListWebhookDeliveriesRequest(
                parent=w.webhook, state=export_pb2.WEBHOOK_DELIVERY_STATE_PENDING
            )
        ],
        "ReplayWebhookDeliveries": [
            export_service_pb2.ReplayWebhookDeliveriesRequest(parent=w.webhook)
        ],
    }


_BY_SERVICE: dict[str, Callable[[World], Mapping[str, list[Message]]]] = {
    "audience.v1.IngestService": _ingest,
    "audience.v1.ProfileService": _profile,
    "audience.v1.SegmentService": _segment,
    "audience.v1.MembershipService": _membership,
    "audience.v1.ExportService": _export,
}


def valid_requests(world: World) -> dict[str, list[Message]]:
    """Valid requests by full method name (``audience.v1.SegmentService.GetSegment``)."""
    found: dict[str, list[Message]] = {}
    for service, requests_of in _BY_SERVICE.items():
        for method, requests in requests_of(world).items():
            found[f"{service}.{method}"] = requests
    return found
