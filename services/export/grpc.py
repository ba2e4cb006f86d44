"""``ExportService`` over gRPC: protos to domain values and back, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import grpc.aio
from google.protobuf import timestamp_pb2

from audience.errors import FieldViolation, invalid_argument
from audience.v1 import export_pb2, export_service_pb2, export_service_pb2_grpc, membership_pb2
from services.export.application import ExportApplication, SubscriptionFields, etag
from services.export.domain.model import (
    AttributeColumn,
    ChangeKind,
    Column,
    DeliveryState,
    Destination,
    ExportField,
    ExportJob,
    ExportMode,
    FieldColumn,
    FolderTarget,
    IdentityColumn,
    JobSpec,
    JobState,
    Schedule,
    SftpTarget,
    Target,
    WebhookDelivery,
    WebhookSubscription,
)
from services.export.domain.names import (
    DESTINATIONS,
    EXPORT_JOBS,
    SCHEDULES,
    WEBHOOK_SUBSCRIPTIONS,
    child_name,
    delivery_name,
    parse_child,
    parse_dataset,
    parse_delivery,
    parse_segment,
    segment_name,
)

__all__ = ["ExportServicer"]


_FIELDS = {
    export_pb2.EXPORT_FIELD_PROFILE_ID: ExportField.PROFILE_ID,
    export_pb2.EXPORT_FIELD_SEGMENT_ID: ExportField.SEGMENT_ID,
    export_pb2.EXPORT_FIELD_JOIN_TIME: ExportField.JOIN_TIME,
    export_pb2.EXPORT_FIELD_CHANGE: ExportField.CHANGE,
    export_pb2.EXPORT_FIELD_CHANGE_TIME: ExportField.CHANGE_TIME,
    export_pb2.EXPORT_FIELD_SEGMENT_VERSION: ExportField.SEGMENT_VERSION,
}
_FIELD_PROTOS = {field: proto for proto, field in _FIELDS.items()}
_MODES = {
    export_pb2.EXPORT_MODE_FULL: ExportMode.FULL,
    export_pb2.EXPORT_MODE_DELTA: ExportMode.DELTA,
}
_MODE_PROTOS = {mode: proto for proto, mode in _MODES.items()}
_JOB_STATES = {
    JobState.PENDING: export_pb2.EXPORT_JOB_STATE_PENDING,
    JobState.RUNNING: export_pb2.EXPORT_JOB_STATE_RUNNING,
    JobState.SUCCEEDED: export_pb2.EXPORT_JOB_STATE_SUCCEEDED,
    JobState.FAILED: export_pb2.EXPORT_JOB_STATE_FAILED,
    JobState.CANCELLED: export_pb2.EXPORT_JOB_STATE_CANCELLED,
}
_KINDS = {
    membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN: ChangeKind.JOIN,
    membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE: ChangeKind.LEAVE,
}
_KIND_PROTOS = {kind: proto for proto, kind in _KINDS.items()}
_DELIVERY_STATES = {
    export_pb2.WEBHOOK_DELIVERY_STATE_UNSPECIFIED: DeliveryState.DEAD,
    export_pb2.WEBHOOK_DELIVERY_STATE_PENDING: DeliveryState.PENDING,
    export_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED: DeliveryState.DELIVERED,
    export_pb2.WEBHOOK_DELIVERY_STATE_DEAD: DeliveryState.DEAD,
}
_DELIVERY_STATE_PROTOS = {
    DeliveryState.PENDING: export_pb2.WEBHOOK_DELIVERY_STATE_PENDING,
    DeliveryState.DELIVERED: export_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED,
    DeliveryState.DEAD: export_pb2.WEBHOOK_DELIVERY_STATE_DEAD,
}


def _bad(field: str, description: str) -> Exception:
    return invalid_argument(f"{field}: {description}", FieldViolation(field, description))


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


# --- protos to domain ------------------------------------------------------------------------


def _segments(names: Sequence[str], field: str, dataset: str) -> tuple[str, ...]:
    return tuple(
        parse_segment(name, f"{field}[{index}]", dataset)[1] for index, name in enumerate(names)
    )


def _column(column: export_pb2.ExportColumn, field: str) -> Column:
    source = column.WhichOneof("source")
    if source == "field":
        if column.field not in _FIELDS:
            raise _bad(f"{field}.field", "an ExportField other than EXPORT_FIELD_UNSPECIFIED")
        value = _FIELDS[column.field]
        return FieldColumn(value, column.header or value.value)
    if source == "identity_type":
        return IdentityColumn(column.identity_type, column.header or column.identity_type)
    if source == "attribute_path":
        return AttributeColumn(column.attribute_path, column.header or column.attribute_path)
    raise _bad(field, "one of field, identity_type or attribute_path is required")


def _columns(columns: Sequence[export_pb2.ExportColumn], field: str) -> tuple[Column, ...]:
    return tuple(_column(column, f"{field}[{index}]") for index, column in enumerate(columns))


def _target(destination: export_pb2.Destination) -> Target | None:
    kind = destination.WhichOneof("target")
    if kind == "folder":
        return FolderTarget(destination.folder.path)
    if kind == "sftp":
        sftp = destination.sftp
        return SftpTarget(
            host=sftp.host,
            port=sftp.port,
            path=sftp.path,
            username=sftp.username,
            credential_secret=sftp.credential_secret,
            known_host_key=sftp.known_host_key,
        )
    return None


def _spec(job: export_pb2.ExportJob, dataset: str, field: str) -> JobSpec:
    if job.mode not in _MODES:
        raise _bad(f"{field}.mode", "EXPORT_MODE_FULL or EXPORT_MODE_DELTA")
    if not job.destination:
        raise _bad(f"{field}.destination", "required")
    _, destination_id = parse_child(job.destination, DESTINATIONS, f"{field}.destination", dataset)
    return JobSpec(
        segment_ids=_segments(job.segments, f"{field}.segments", dataset),
        mode=_MODES[job.mode],
        columns=_columns(job.columns, f"{field}.columns"),
        destination_id=destination_id,
        file_name_template=job.file_name_template,
    )


def _kinds(
    kinds: Sequence[membership_pb2.MembershipChangeKind.ValueType], field: str
) -> frozenset[ChangeKind]:
    result = set()
    for index, kind in enumerate(kinds):
        value = _KINDS.get(kind)
        if value is None:
            raise _bad(f"{field}[{index}]", "MEMBERSHIP_CHANGE_KIND_JOIN or _LEAVE")
        result.add(value)
    return frozenset(result)


# --- domain to protos ------------------------------------------------------------------------


def _subscription_fields(proto: export_pb2.WebhookSubscription, dataset: str) -> SubscriptionFields:
    return SubscriptionFields(
        display_name=proto.display_name,
        url=proto.url,
        segment_ids=_segments(proto.segments, "webhook_subscription.segments", dataset),
        kinds=_kinds(proto.kinds, "webhook_subscription.kinds"),
        secret=proto.secret,
        paused=proto.paused,
        max_attempts=proto.max_attempts,
    )


def _column_proto(column: Column) -> export_pb2.ExportColumn:
    if isinstance(column, FieldColumn):
        return export_pb2.ExportColumn(field=_FIELD_PROTOS[column.field], header=column.header)
    if isinstance(column, IdentityColumn):
        return export_pb2.ExportColumn(identity_type=column.identity_type, header=column.header)
    return export_pb2.ExportColumn(attribute_path=column.path, header=column.header)


def _destination_proto(destination: Destination) -> export_pb2.Destination:
    proto = export_pb2.Destination(
        name=child_name(destination.dataset, DESTINATIONS, destination.destination_id),
        display_name=destination.display_name,
        create_time=_timestamp(destination.create_time),
        update_time=_timestamp(destination.update_time),
        etag=etag(destination.version),
    )
    target = destination.target
    if isinstance(target, FolderTarget):
        proto.folder.path = target.path
    else:
        proto.sftp.CopyFrom(
            export_pb2.SftpTarget(
                host=target.host,
                port=target.port,
                path=target.path,
                username=target.username,
                credential_secret=target.credential_secret,
                known_host_key=target.known_host_key,
            )
        )
    return proto


def _spec_fields(dataset: str, spec: JobSpec) -> dict[str, Any]:
    return {
        "segments": [segment_name(dataset, segment_id) for segment_id in spec.segment_ids],
        "mode": _MODE_PROTOS[spec.mode],
        "columns": [_column_proto(column) for column in spec.columns],
        "destination": child_name(dataset, DESTINATIONS, spec.destination_id),
        "file_name_template": spec.file_name_template,
    }


def _job_proto(job: ExportJob) -> export_pb2.ExportJob:
    return export_pb2.ExportJob(
        name=child_name(job.dataset, EXPORT_JOBS, job.job_id),
        schedule=child_name(job.dataset, SCHEDULES, job.schedule_id) if job.schedule_id else "",
        state=_JOB_STATES[job.state],
        rows_written=job.rows_written,
        percent=job.percent,
        file_path=job.file_path,
        sha256=job.sha256,
        error=job.error,
        attempt_count=job.attempt_count,
        delta_start_time=_timestamp(job.delta_start_time),
        delta_end_time=_timestamp(job.delta_end_time),
        create_time=_timestamp(job.create_time),
        start_time=_timestamp(job.start_time),
        end_time=_timestamp(job.end_time),
        **_spec_fields(job.dataset, job.spec),
    )


def _schedule_proto(schedule: Schedule) -> export_pb2.Schedule:
    return export_pb2.Schedule(
        name=child_name(schedule.dataset, SCHEDULES, schedule.schedule_id),
        display_name=schedule.display_name,
        cron=schedule.cron,
        time_zone=schedule.time_zone,
        job_template=export_pb2.ExportJob(**_spec_fields(schedule.dataset, schedule.job_template)),
        paused=schedule.paused,
        next_run_time=_timestamp(schedule.next_run_time),
        last_run_time=_timestamp(schedule.last_run_time),
        last_job=(
            child_name(schedule.dataset, EXPORT_JOBS, schedule.last_job_id)
            if schedule.last_job_id
            else ""
        ),
        create_time=_timestamp(schedule.create_time),
        update_time=_timestamp(schedule.update_time),
        etag=etag(schedule.version),
    )


def _subscription_proto(subscription: WebhookSubscription) -> export_pb2.WebhookSubscription:
    return export_pb2.WebhookSubscription(
        name=child_name(subscription.dataset, WEBHOOK_SUBSCRIPTIONS, subscription.subscription_id),
        display_name=subscription.display_name,
        url=subscription.url,
        segments=[
            segment_name(subscription.dataset, segment_id)
            for segment_id in subscription.segment_ids
        ],
        kinds=sorted(_KIND_PROTOS[kind] for kind in subscription.kinds),
        paused=subscription.paused,
        max_attempts=subscription.max_attempts,
        create_time=_timestamp(subscription.create_time),
        update_time=_timestamp(subscription.update_time),
        etag=etag(subscription.version),
    )


def _delivery_proto(delivery: WebhookDelivery) -> export_pb2.WebhookDelivery:
    return export_pb2.WebhookDelivery(
        name=delivery_name(delivery.dataset, delivery.subscription_id, delivery.delivery_id),
        payload=delivery.payload,
        state=_DELIVERY_STATE_PROTOS[delivery.state],
        attempt_count=delivery.attempt_count,
        last_http_status=delivery.last_http_status,
        last_error=delivery.last_error,
        create_time=_timestamp(delivery.create_time),
        last_attempt_time=_timestamp(delivery.last_attempt_time),
        next_attempt_time=(
            _timestamp(delivery.next_attempt_time)
            if delivery.state is DeliveryState.PENDING
            else None
        ),
    )


class ExportServicer(export_service_pb2_grpc.ExportServiceServicer):
    def __init__(self, application: ExportApplication) -> None:
        self._app = application

    async def ExportSegmentCsv(  # noqa: N802 (gRPC's name)
        self,
        request: export_service_pb2.ExportSegmentCsvRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[export_service_pb2.ExportSegmentCsvResponse]:
        if not request.segments:
            raise _bad("segments", "1 to 50 segments of one dataset")
        dataset, _ = parse_segment(request.segments[0], "segments[0]")
        segment_ids = _segments(request.segments, "segments", dataset)
        columns = _columns(request.columns, "columns")
        async for chunk in self._app.download(dataset, segment_ids, columns):
            yield export_service_pb2.ExportSegmentCsvResponse(
                data=chunk.data, rows_sent=chunk.rows_sent, rows_total=chunk.rows_total
            )

    # --- destinations --------------------------------------------------------------------

    async def CreateDestination(  # noqa: N802
        self,
        request: export_service_pb2.CreateDestinationRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.CreateDestinationResponse:
        dataset = parse_dataset(request.parent)
        destination = await self._app.create_destination(
            dataset,
            request.destination_id,
            request.destination.display_name,
            _target(request.destination),
        )
        return export_service_pb2.CreateDestinationResponse(
            destination=_destination_proto(destination)
        )

    async def GetDestination(  # noqa: N802
        self,
        request: export_service_pb2.GetDestinationRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.GetDestinationResponse:
        dataset, destination_id = parse_child(request.name, DESTINATIONS)
        destination = await self._app.get_destination(dataset, destination_id)
        return export_service_pb2.GetDestinationResponse(
            destination=_destination_proto(destination)
        )

    async def ListDestinations(  # noqa: N802
        self,
        request: export_service_pb2.ListDestinationsRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.ListDestinationsResponse:
        dataset = parse_dataset(request.parent)
        items, token = await self._app.list_destinations(
            dataset, request.page_size, request.page_token
        )
        return export_service_pb2.ListDestinationsResponse(
            destinations=[_destination_proto(item) for item in items], next_page_token=token
        )

    async def UpdateDestination(  # noqa: N802
        self,
        request: export_service_pb2.UpdateDestinationRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.UpdateDestinationResponse:
        proto = request.destination
        dataset, destination_id = parse_child(proto.name, DESTINATIONS, "destination.name")
        destination = await self._app.update_destination(
            dataset,
            destination_id,
            proto.etag,
            list(request.update_mask.paths),
            proto.display_name,
            _target(proto),
        )
        return export_service_pb2.UpdateDestinationResponse(
            destination=_destination_proto(destination)
        )

    async def DeleteDestination(  # noqa: N802
        self,
        request: export_service_pb2.DeleteDestinationRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.DeleteDestinationResponse:
        dataset, destination_id = parse_child(request.name, DESTINATIONS)
        await self._app.delete_destination(dataset, destination_id, request.etag)
        return export_service_pb2.DeleteDestinationResponse()

    # --- export jobs ---------------------------------------------------------------------

    async def CreateExportJob(  # noqa: N802
        self,
        request: export_service_pb2.CreateExportJobRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.CreateExportJobResponse:
        dataset = parse_dataset(request.parent)
        job = await self._app.create_job(
            dataset, request.export_job_id, _spec(request.export_job, dataset, "export_job")
        )
        return export_service_pb2.CreateExportJobResponse(export_job=_job_proto(job))

    async def GetExportJob(  # noqa: N802
        self,
        request: export_service_pb2.GetExportJobRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.GetExportJobResponse:
        dataset, job_id = parse_child(request.name, EXPORT_JOBS)
        job = await self._app.get_job(dataset, job_id)
        return export_service_pb2.GetExportJobResponse(export_job=_job_proto(job))

    async def ListExportJobs(  # noqa: N802
        self,
        request: export_service_pb2.ListExportJobsRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.ListExportJobsResponse:
        dataset = parse_dataset(request.parent)
        schedule_id = None
        if request.schedule:
            _, schedule_id = parse_child(request.schedule, SCHEDULES, "schedule", dataset)
        items, token = await self._app.list_jobs(
            dataset, schedule_id, request.page_size, request.page_token
        )
        return export_service_pb2.ListExportJobsResponse(
            export_jobs=[_job_proto(item) for item in items], next_page_token=token
        )

    async def CancelExportJob(  # noqa: N802
        self,
        request: export_service_pb2.CancelExportJobRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.CancelExportJobResponse:
        dataset, job_id = parse_child(request.name, EXPORT_JOBS)
        job = await self._app.cancel_job(dataset, job_id)
        return export_service_pb2.CancelExportJobResponse(export_job=_job_proto(job))

    # --- schedules -----------------------------------------------------------------------

    async def CreateSchedule(  # noqa: N802
        self,
        request: export_service_pb2.CreateScheduleRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.CreateScheduleResponse:
        dataset = parse_dataset(request.parent)
        proto = request.schedule
        if not proto.cron:
            raise _bad("schedule.cron", "required")
        schedule = await self._app.create_schedule(
            dataset,
            request.schedule_id,
            proto.display_name,
            proto.cron,
            proto.time_zone,
            _spec(proto.job_template, dataset, "schedule.job_template"),
            proto.paused,
        )
        return export_service_pb2.CreateScheduleResponse(schedule=_schedule_proto(schedule))

    async def GetSchedule(  # noqa: N802
        self,
        request: export_service_pb2.GetScheduleRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.GetScheduleResponse:
        dataset, schedule_id = parse_child(request.name, SCHEDULES)
        schedule = await self._app.get_schedule(dataset, schedule_id)
        return export_service_pb2.GetScheduleResponse(schedule=_schedule_proto(schedule))

    async def ListSchedules(  # noqa: N802
        self,
        request: export_service_pb2.ListSchedulesRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.ListSchedulesResponse:
        dataset = parse_dataset(request.parent)
        items, token = await self._app.list_schedules(
            dataset, request.page_size, request.page_token
        )
        return export_service_pb2.ListSchedulesResponse(
            schedules=[_schedule_proto(item) for item in items], next_page_token=token
        )

    async def UpdateSchedule(  # noqa: N802
        self,
        request: export_service_pb2.UpdateScheduleRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.UpdateScheduleResponse:
        proto = request.schedule
        dataset, schedule_id = parse_child(proto.name, SCHEDULES, "schedule.name")
        paths = list(request.update_mask.paths)
        template = (
            _spec(proto.job_template, dataset, "schedule.job_template")
            if "job_template" in paths
            else None
        )
        schedule = await self._app.update_schedule(
            dataset,
            schedule_id,
            proto.etag,
            paths,
            proto.display_name,
            proto.cron,
            proto.time_zone,
            template,
            proto.paused,
        )
        return export_service_pb2.UpdateScheduleResponse(schedule=_schedule_proto(schedule))

    async def DeleteSchedule(  # noqa: N802
        self,
        request: export_service_pb2.DeleteScheduleRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.DeleteScheduleResponse:
        dataset, schedule_id = parse_child(request.name, SCHEDULES)
        await self._app.delete_schedule(dataset, schedule_id, request.etag)
        return export_service_pb2.DeleteScheduleResponse()

    async def RunSchedule(  # noqa: N802
        self,
        request: export_service_pb2.RunScheduleRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.RunScheduleResponse:
        dataset, schedule_id = parse_child(request.name, SCHEDULES)
        job = await self._app.run_schedule(dataset, schedule_id)
        return export_service_pb2.RunScheduleResponse(export_job=_job_proto(job))

    # --- webhooks ------------------------------------------------------------------------

    async def CreateWebhookSubscription(  # noqa: N802
        self,
        request: export_service_pb2.CreateWebhookSubscriptionRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.CreateWebhookSubscriptionResponse:
        dataset = parse_dataset(request.parent)
        subscription = await self._app.create_subscription(
            dataset,
            request.webhook_subscription_id,
            _subscription_fields(request.webhook_subscription, dataset),
        )
        return export_service_pb2.CreateWebhookSubscriptionResponse(
            webhook_subscription=_subscription_proto(subscription)
        )

    async def GetWebhookSubscription(  # noqa: N802
        self,
        request: export_service_pb2.GetWebhookSubscriptionRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.GetWebhookSubscriptionResponse:
        dataset, subscription_id = parse_child(request.name, WEBHOOK_SUBSCRIPTIONS)
        subscription = await self._app.get_subscription(dataset, subscription_id)
        return export_service_pb2.GetWebhookSubscriptionResponse(
            webhook_subscription=_subscription_proto(subscription)
        )

    async def ListWebhookSubscriptions(  # noqa: N802
        self,
        request: export_service_pb2.ListWebhookSubscriptionsRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.ListWebhookSubscriptionsResponse:
        dataset = parse_dataset(request.parent)
        items, token = await self._app.list_subscriptions(
            dataset, request.page_size, request.page_token
        )
        return export_service_pb2.ListWebhookSubscriptionsResponse(
            webhook_subscriptions=[_subscription_proto(item) for item in items],
            next_page_token=token,
        )

    async def UpdateWebhookSubscription(  # noqa: N802
        self,
        request: export_service_pb2.UpdateWebhookSubscriptionRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.UpdateWebhookSubscriptionResponse:
        proto = request.webhook_subscription
        dataset, subscription_id = parse_child(
            proto.name, WEBHOOK_SUBSCRIPTIONS, "webhook_subscription.name"
        )
        subscription = await self._app.update_subscription(
            dataset,
            subscription_id,
            proto.etag,
            list(request.update_mask.paths),
            _subscription_fields(proto, dataset),
        )
        return export_service_pb2.UpdateWebhookSubscriptionResponse(
            webhook_subscription=_subscription_proto(subscription)
        )

    async def DeleteWebhookSubscription(  # noqa: N802
        self,
        request: export_service_pb2.DeleteWebhookSubscriptionRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.DeleteWebhookSubscriptionResponse:
        dataset, subscription_id = parse_child(request.name, WEBHOOK_SUBSCRIPTIONS)
        await self._app.delete_subscription(dataset, subscription_id, request.etag)
        return export_service_pb2.DeleteWebhookSubscriptionResponse()

    async def ListWebhookDeliveries(  # noqa: N802
        self,
        request: export_service_pb2.ListWebhookDeliveriesRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.ListWebhookDeliveriesResponse:
        dataset, subscription_id = parse_child(request.parent, WEBHOOK_SUBSCRIPTIONS, "parent")
        state = _DELIVERY_STATES.get(request.state)
        if state is None:
            raise _bad("state", "a WebhookDeliveryState")
        items, token = await self._app.list_deliveries(
            dataset, subscription_id, state, request.page_size, request.page_token
        )
        return export_service_pb2.ListWebhookDeliveriesResponse(
            webhook_deliveries=[_delivery_proto(item) for item in items], next_page_token=token
        )

    async def ReplayWebhookDeliveries(  # noqa: N802
        self,
        request: export_service_pb2.ReplayWebhookDeliveriesRequest,
        context: grpc.aio.ServicerContext,
    ) -> export_service_pb2.ReplayWebhookDeliveriesResponse:
        dataset, subscription_id = parse_child(request.parent, WEBHOOK_SUBSCRIPTIONS, "parent")
        delivery_ids = []
        for index, name in enumerate(request.names):
            field = f"names[{index}]"
            of_dataset, of_subscription, delivery_id = parse_delivery(name, field)
            if (of_dataset, of_subscription) != (dataset, subscription_id):
                raise _bad(field, f"a delivery of {request.parent}")
            delivery_ids.append(delivery_id)
        count = await self._app.replay_deliveries(dataset, subscription_id, delivery_ids)
        return export_service_pb2.ReplayWebhookDeliveriesResponse(replayed_count=count)
