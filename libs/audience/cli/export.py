"""``audience export``: CSV downloads, destinations, export jobs, schedules and webhooks.

Segments, destinations, jobs, schedules and webhook subscriptions are named by id within
``--dataset`` (or ``AUDIENCE_DATASET``), or by their full resource names
(``datasets/shop/segments/vip``, ``datasets/shop/exportJobs/nightly-1``).

Columns are given as ``profile_id``, ``segment_id``, ``join_time``, ``change``,
``change_time``, ``segment_version``, ``identity:TYPE`` or ``attribute:PATH``, each
optionally followed by ``=HEADER`` (``identity:email=Email``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc.aio
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from audience.cli.connection import connect, connection_options
from audience.cli.names import DATASET_OPTION, dataset_name, resource_name
from audience.errors import decode
from audience.v1 import export_pb2, export_service_pb2, export_service_pb2_grpc, membership_pb2

__all__ = ["export"]

T = TypeVar("T")

_FIELDS = {
    "profile_id": export_pb2.EXPORT_FIELD_PROFILE_ID,
    "segment_id": export_pb2.EXPORT_FIELD_SEGMENT_ID,
    "join_time": export_pb2.EXPORT_FIELD_JOIN_TIME,
    "change": export_pb2.EXPORT_FIELD_CHANGE,
    "change_time": export_pb2.EXPORT_FIELD_CHANGE_TIME,
    "segment_version": export_pb2.EXPORT_FIELD_SEGMENT_VERSION,
}
_MODES = {"full": export_pb2.EXPORT_MODE_FULL, "delta": export_pb2.EXPORT_MODE_DELTA}
_KINDS = {
    "join": membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN,
    "leave": membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE,
}
_DELIVERY_STATES = {
    "pending": export_pb2.WEBHOOK_DELIVERY_STATE_PENDING,
    "delivered": export_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED,
    "dead": export_pb2.WEBHOOK_DELIVERY_STATE_DEAD,
}
_JOB_STATES = {
    export_pb2.EXPORT_JOB_STATE_SUCCEEDED,
    export_pb2.EXPORT_JOB_STATE_FAILED,
    export_pb2.EXPORT_JOB_STATE_CANCELLED,
}


def parse_column(text: str) -> export_pb2.ExportColumn:
    """``SOURCE[=HEADER]`` as an ``ExportColumn``."""
    source, _, header = text.partition("=")
    kind, _, argument = source.partition(":")
    if kind == "identity" and argument:
        return export_pb2.ExportColumn(identity_type=argument, header=header)
    if kind == "attribute" and argument:
        return export_pb2.ExportColumn(attribute_path=argument, header=header)
    if source in _FIELDS:
        return export_pb2.ExportColumn(field=_FIELDS[source], header=header)
    raise click.BadParameter(
        f"{text!r}: expected one of {', '.join(_FIELDS)}, identity:TYPE or attribute:PATH, "
        "optionally followed by =HEADER"
    )


def _columns(values: Sequence[str]) -> list[export_pb2.ExportColumn]:
    return [parse_column(value) for value in values]


def _call(
    address: str, action: Callable[[export_service_pb2_grpc.ExportServiceStub], Awaitable[T]]
) -> T:
    async def run() -> T:
        async with connect(address) as channel:
            return await action(export_service_pb2_grpc.ExportServiceStub(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as error:
        raise click.ClickException(_describe(error)) from None


def _describe(error: grpc.aio.AioRpcError) -> str:
    decoded = decode(error)
    lines = [f"{decoded.code.name}: {decoded.message}"]
    lines += [f"  {v.field}: {v.description}" for v in decoded.violations]
    return "\n".join(lines)


def _print(message: Message) -> None:
    click.echo(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], token: str) -> None:
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console = Console()
    console.print(table)
    if token:
        console.print(f"More: --page-token {token}")


def _segments(values: Sequence[str], dataset: str) -> list[str]:
    return [resource_name(value, dataset, "segments") for value in values]


def _subscription(value: str, dataset: str) -> str:
    return resource_name(value, dataset, "webhookSubscriptions")


def _job(
    dataset: str,
    segments: Sequence[str],
    destination: str,
    mode: str,
    columns: Sequence[str],
    file_name: str,
) -> export_pb2.ExportJob:
    return export_pb2.ExportJob(
        segments=_segments(segments, dataset),
        destination=resource_name(destination, dataset, "destinations"),
        mode=_MODES[mode],
        columns=_columns(columns),
        file_name_template=file_name,
    )


PAGE_OPTIONS = [
    click.option("--page-size", default=100, show_default=True, help="Items per page."),
    click.option("--page-token", default="", help="Token of the page to show."),
]


def _paged(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(PAGE_OPTIONS):
        function = option(function)
    return function


COLUMN_OPTION = click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="SOURCE[=HEADER]",
    help="A column (repeat for several); by default profile id, segment id and join time.",
)
JOB_OPTIONS = [
    click.option(
        "--segment",
        "segments",
        multiple=True,
        required=True,
        help="A segment: an id, or datasets/{dataset}/segments/{segment} (repeat for several).",
    ),
    click.option(
        "--destination",
        required=True,
        help="An id, or datasets/{dataset}/destinations/{destination}.",
    ),
    click.option("--mode", type=click.Choice(sorted(_MODES)), default="full", show_default=True),
    COLUMN_OPTION,
    click.option(
        "--file-name",
        default="",
        help="File name template with {segment}, {date} and {time}; "
        "audience-{date}-{time}.csv by default.",
    ),
]


def _job_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(JOB_OPTIONS):
        function = option(function)
    return function


@click.group()
def export() -> None:
    """Take segments elsewhere: CSV downloads, files to folders and SFTP, and webhooks."""


@export.command("csv")
@connection_options
@DATASET_OPTION
@click.argument("segments", nargs=-1, required=True)
@COLUMN_OPTION
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="File to write; standard output when absent.",
)
def download(
    address: str,
    dataset: str,
    segments: tuple[str, ...],
    columns: tuple[str, ...],
    output: Path | None,
) -> None:
    """Downloads the members of SEGMENTS (ids, or datasets/{dataset}/segments/{segment}) as
    CSV."""
    request = export_service_pb2.ExportSegmentCsvRequest(
        segments=_segments(segments, dataset), columns=_columns(columns)
    )

    async def run(stub: export_service_pb2_grpc.ExportServiceStub) -> int:
        sink = output.open("wb") if output is not None else sys.stdout.buffer
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=output is None,
        )
        try:
            with progress:
                task = progress.add_task("rows", total=None)
                rows = 0
                async for chunk in stub.ExportSegmentCsv(request):
                    sink.write(chunk.data)
                    rows = chunk.rows_sent
                    progress.update(task, completed=rows, total=max(chunk.rows_total, rows))
                return rows
        finally:
            if output is not None:
                sink.close()

    rows = _call(address, run)
    if output is not None:
        click.echo(f"Wrote {rows} rows to {output}", err=True)


# --- destinations ----------------------------------------------------------------------------


@export.group()
def destinations() -> None:
    """Folders and SFTP servers that export files go to."""


@destinations.command("create-folder")
@connection_options
@DATASET_OPTION
@click.argument("destination_id")
@click.argument("path")
@click.option("--display-name", default="")
def create_folder(
    address: str, dataset: str, destination_id: str, path: str, display_name: str
) -> None:
    """Creates DESTINATION_ID, the folder PATH under the service's export root."""
    destination = export_pb2.Destination(
        display_name=display_name, folder=export_pb2.FolderTarget(path=path)
    )
    request = export_service_pb2.CreateDestinationRequest(
        parent=dataset_name(dataset), destination_id=destination_id, destination=destination
    )
    _print(_call(address, lambda stub: stub.CreateDestination(request)).destination)


@destinations.command("create-sftp")
@connection_options
@DATASET_OPTION
@click.argument("destination_id")
@click.option("--host", required=True)
@click.option("--port", default=22, show_default=True)
@click.option("--path", required=True, help="The remote folder.")
@click.option("--username", required=True)
@click.option(
    "--secret",
    required=True,
    help="Environment variable of the export service holding the password or private key, "
    "AUDIENCE_SECRET_<NAME>.",
)
@click.option("--known-host-key", default="", help="The server's host key, known_hosts form.")
@click.option("--display-name", default="")
def create_sftp(
    address: str,
    dataset: str,
    destination_id: str,
    host: str,
    port: int,
    path: str,
    username: str,
    secret: str,
    known_host_key: str,
    display_name: str,
) -> None:
    """Creates DESTINATION_ID, an SFTP server; its credential stays in the service's
    environment."""
    destination = export_pb2.Destination(
        display_name=display_name,
        sftp=export_pb2.SftpTarget(
            host=host,
            port=port,
            path=path,
            username=username,
            credential_secret=secret,
            known_host_key=known_host_key,
        ),
    )
    request = export_service_pb2.CreateDestinationRequest(
        parent=dataset_name(dataset), destination_id=destination_id, destination=destination
    )
    _print(_call(address, lambda stub: stub.CreateDestination(request)).destination)


@destinations.command("get")
@connection_options
@DATASET_OPTION
@click.argument("destination")
def get_destination(address: str, dataset: str, destination: str) -> None:
    """Shows DESTINATION (an id, or datasets/{dataset}/destinations/{destination})."""
    request = export_service_pb2.GetDestinationRequest(
        name=resource_name(destination, dataset, "destinations")
    )
    _print(_call(address, lambda stub: stub.GetDestination(request)).destination)


@destinations.command("list")
@connection_options
@DATASET_OPTION
@_paged
def list_destinations(address: str, dataset: str, page_size: int, page_token: str) -> None:
    """Lists a dataset's destinations."""
    request = export_service_pb2.ListDestinationsRequest(
        parent=dataset_name(dataset), page_size=page_size, page_token=page_token
    )
    response = _call(address, lambda stub: stub.ListDestinations(request))
    rows = []
    for item in response.destinations:
        kind = item.WhichOneof("target") or ""
        where = item.folder.path if kind == "folder" else f"{item.sftp.host}:{item.sftp.path}"
        rows.append((item.name, kind, where, item.display_name))
    _table(
        "Destinations", ("name", "kind", "where", "display name"), rows, response.next_page_token
    )


@destinations.command("delete")
@connection_options
@DATASET_OPTION
@click.argument("destination")
def delete_destination(address: str, dataset: str, destination: str) -> None:
    """Deletes DESTINATION (an id or a full name), which no schedule may use."""
    name = resource_name(destination, dataset, "destinations")
    request = export_service_pb2.DeleteDestinationRequest(name=name)
    _call(address, lambda stub: stub.DeleteDestination(request))
    click.echo(f"Deleted {name}")


# --- jobs ------------------------------------------------------------------------------------


@export.group()
def jobs() -> None:
    """One-time exports to a destination."""


@jobs.command("create")
@connection_options
@DATASET_OPTION
@_job_options
@click.option("--id", "job_id", default="", help="The job id; generated when absent.")
@click.option("--wait", is_flag=True, help="Wait for the job to end, showing its progress.")
def create_job(
    address: str,
    dataset: str,
    segments: tuple[str, ...],
    destination: str,
    mode: str,
    columns: tuple[str, ...],
    file_name: str,
    job_id: str,
    wait: bool,
) -> None:
    """Starts an export job in --dataset."""
    request = export_service_pb2.CreateExportJobRequest(
        parent=dataset_name(dataset),
        export_job_id=job_id,
        export_job=_job(dataset, segments, destination, mode, columns, file_name),
    )
    job = _call(address, lambda stub: stub.CreateExportJob(request)).export_job
    if wait:
        job = _wait(address, job.name)
    _print(job)
    if job.state == export_pb2.EXPORT_JOB_STATE_FAILED:
        sys.exit(1)


def _wait(address: str, name: str) -> export_pb2.ExportJob:
    async def run(stub: export_service_pb2_grpc.ExportServiceStub) -> export_pb2.ExportJob:
        with Progress(console=Console(stderr=True)) as progress:
            task = progress.add_task(name, total=100)
            while True:
                response: export_service_pb2.GetExportJobResponse = await stub.GetExportJob(
                    export_service_pb2.GetExportJobRequest(name=name)
                )
                job = response.export_job
                progress.update(task, completed=job.percent)
                if job.state in _JOB_STATES:
                    return job
                await asyncio.sleep(0.5)

    return _call(address, run)


@jobs.command("get")
@connection_options
@DATASET_OPTION
@click.argument("job")
@click.option("--wait", is_flag=True, help="Wait for the job to end, showing its progress.")
def get_job(address: str, dataset: str, job: str, wait: bool) -> None:
    """Shows JOB (an id, or datasets/{dataset}/exportJobs/{job}) and its progress."""
    name = resource_name(job, dataset, "exportJobs")
    if wait:
        _print(_wait(address, name))
        return
    request = export_service_pb2.GetExportJobRequest(name=name)
    _print(_call(address, lambda stub: stub.GetExportJob(request)).export_job)


@jobs.command("list")
@connection_options
@DATASET_OPTION
@click.option("--schedule", default="", help="Only the jobs of this schedule (an id or name).")
@_paged
def list_jobs(address: str, dataset: str, schedule: str, page_size: int, page_token: str) -> None:
    """Lists a dataset's jobs, newest first."""
    request = export_service_pb2.ListExportJobsRequest(
        parent=dataset_name(dataset),
        schedule=resource_name(schedule, dataset, "schedules") if schedule else "",
        page_size=page_size,
        page_token=page_token,
    )
    response = _call(address, lambda stub: stub.ListExportJobs(request))
    rows = [
        (
            job.name,
            export_pb2.ExportJobState.Name(job.state).removeprefix("EXPORT_JOB_STATE_"),
            job.rows_written,
            f"{job.percent:.0f}%",
            job.file_path or job.error,
        )
        for job in response.export_jobs
    ]
    _table(
        "Export jobs",
        ("name", "state", "rows", "done", "file or error"),
        rows,
        response.next_page_token,
    )


@jobs.command("cancel")
@connection_options
@DATASET_OPTION
@click.argument("job")
def cancel_job(address: str, dataset: str, job: str) -> None:
    """Cancels JOB (an id or a full name), pending or running."""
    request = export_service_pb2.CancelExportJobRequest(
        name=resource_name(job, dataset, "exportJobs")
    )
    _print(_call(address, lambda stub: stub.CancelExportJob(request)).export_job)


# --- schedules -------------------------------------------------------------------------------


@export.group()
def schedules() -> None:
    """Recurring feeds, such as a nightly delta file."""


@schedules.command("create")
@connection_options
@DATASET_OPTION
@click.argument("schedule_id")
@click.option("--cron", required=True, help="Five fields, such as '0 2 * * *'.")
@click.option("--time-zone", default="UTC", show_default=True, help="IANA zone of the cron.")
@_job_options
@click.option("--paused", is_flag=True)
@click.option("--display-name", default="")
def create_schedule(
    address: str,
    dataset: str,
    schedule_id: str,
    cron: str,
    time_zone: str,
    segments: tuple[str, ...],
    destination: str,
    mode: str,
    columns: tuple[str, ...],
    file_name: str,
    paused: bool,
    display_name: str,
) -> None:
    """Creates SCHEDULE_ID: an export job run on --cron."""
    schedule = export_pb2.Schedule(
        display_name=display_name,
        cron=cron,
        time_zone=time_zone,
        job_template=_job(dataset, segments, destination, mode, columns, file_name),
        paused=paused,
    )
    request = export_service_pb2.CreateScheduleRequest(
        parent=dataset_name(dataset), schedule_id=schedule_id, schedule=schedule
    )
    _print(_call(address, lambda stub: stub.CreateSchedule(request)).schedule)


@schedules.command("get")
@connection_options
@DATASET_OPTION
@click.argument("schedule")
def get_schedule(address: str, dataset: str, schedule: str) -> None:
    """Shows SCHEDULE (an id, or datasets/{dataset}/schedules/{schedule})."""
    request = export_service_pb2.GetScheduleRequest(
        name=resource_name(schedule, dataset, "schedules")
    )
    _print(_call(address, lambda stub: stub.GetSchedule(request)).schedule)


@schedules.command("list")
@connection_options
@DATASET_OPTION
@_paged
def list_schedules(address: str, dataset: str, page_size: int, page_token: str) -> None:
    """Lists a dataset's schedules."""
    request = export_service_pb2.ListSchedulesRequest(
        parent=dataset_name(dataset), page_size=page_size, page_token=page_token
    )
    response = _call(address, lambda stub: stub.ListSchedules(request))
    rows = [
        (
            item.name,
            f"{item.cron} ({item.time_zone})",
            "paused" if item.paused else json_format.MessageToJson(item.next_run_time).strip('"'),
            item.last_job,
        )
        for item in response.schedules
    ]
    _table("Schedules", ("name", "cron", "next run", "last job"), rows, response.next_page_token)


@schedules.command("run")
@connection_options
@DATASET_OPTION
@click.argument("schedule")
@click.option("--wait", is_flag=True, help="Wait for the job to end, showing its progress.")
def run_schedule(address: str, dataset: str, schedule: str, wait: bool) -> None:
    """Runs the job of SCHEDULE (an id or a full name) now."""
    request = export_service_pb2.RunScheduleRequest(
        name=resource_name(schedule, dataset, "schedules")
    )
    job = _call(address, lambda stub: stub.RunSchedule(request)).export_job
    _print(_wait(address, job.name) if wait else job)


def _set_paused(address: str, dataset: str, schedule: str, paused: bool) -> None:
    request = export_service_pb2.UpdateScheduleRequest(
        schedule=export_pb2.Schedule(
            name=resource_name(schedule, dataset, "schedules"), paused=paused
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
    )
    _print(_call(address, lambda stub: stub.UpdateSchedule(request)).schedule)


@schedules.command("pause")
@connection_options
@DATASET_OPTION
@click.argument("schedule")
def pause_schedule(address: str, dataset: str, schedule: str) -> None:
    """Stops SCHEDULE (an id or a full name) from running."""
    _set_paused(address, dataset, schedule, True)


@schedules.command("resume")
@connection_options
@DATASET_OPTION
@click.argument("schedule")
def resume_schedule(address: str, dataset: str, schedule: str) -> None:
    """Lets a paused SCHEDULE run again (from its next time, not its missed ones)."""
    _set_paused(address, dataset, schedule, False)


@schedules.command("delete")
@connection_options
@DATASET_OPTION
@click.argument("schedule")
def delete_schedule(address: str, dataset: str, schedule: str) -> None:
    """Deletes SCHEDULE (an id or a full name)."""
    name = resource_name(schedule, dataset, "schedules")
    request = export_service_pb2.DeleteScheduleRequest(name=name)
    _call(address, lambda stub: stub.DeleteSchedule(request))
    click.echo(f"Deleted {name}")


# --- webhooks --------------------------------------------------------------------------------


@export.group()
def webhooks() -> None:
    """Joins and leaves POSTed to a URL as they happen."""


@webhooks.command("create")
@connection_options
@DATASET_OPTION
@click.argument("subscription_id")
@click.option("--url", required=True)
@click.option(
    "--secret",
    envvar="AUDIENCE_WEBHOOK_SECRET",
    prompt=True,
    hide_input=True,
    help="Signing secret, 16-256 characters (or AUDIENCE_WEBHOOK_SECRET; prompted otherwise).",
)
@click.option(
    "--segment",
    "segments",
    multiple=True,
    help="A segment to watch, an id or a full name (repeat for several); all when none.",
)
@click.option("--kind", "kinds", multiple=True, type=click.Choice(sorted(_KINDS)))
@click.option("--max-attempts", default=0, help="Attempts before a delivery is dead; 8 when 0.")
@click.option("--display-name", default="")
def create_webhook(
    address: str,
    dataset: str,
    subscription_id: str,
    url: str,
    secret: str,
    segments: tuple[str, ...],
    kinds: tuple[str, ...],
    max_attempts: int,
    display_name: str,
) -> None:
    """Creates SUBSCRIPTION_ID, a webhook subscription POSTing to --url."""
    subscription = export_pb2.WebhookSubscription(
        display_name=display_name,
        url=url,
        segments=_segments(segments, dataset),
        kinds=[_KINDS[kind] for kind in kinds],
        secret=secret,
        max_attempts=max_attempts,
    )
    request = export_service_pb2.CreateWebhookSubscriptionRequest(
        parent=dataset_name(dataset),
        webhook_subscription_id=subscription_id,
        webhook_subscription=subscription,
    )
    _print(
        _call(address, lambda stub: stub.CreateWebhookSubscription(request)).webhook_subscription
    )


@webhooks.command("get")
@connection_options
@DATASET_OPTION
@click.argument("subscription")
def get_webhook(address: str, dataset: str, subscription: str) -> None:
    """Shows SUBSCRIPTION (an id, or datasets/{dataset}/webhookSubscriptions/{subscription})."""
    request = export_service_pb2.GetWebhookSubscriptionRequest(
        name=_subscription(subscription, dataset)
    )
    _print(_call(address, lambda stub: stub.GetWebhookSubscription(request)).webhook_subscription)


@webhooks.command("list")
@connection_options
@DATASET_OPTION
@_paged
def list_webhooks(address: str, dataset: str, page_size: int, page_token: str) -> None:
    """Lists a dataset's webhook subscriptions."""
    request = export_service_pb2.ListWebhookSubscriptionsRequest(
        parent=dataset_name(dataset), page_size=page_size, page_token=page_token
    )
    response = _call(address, lambda stub: stub.ListWebhookSubscriptions(request))
    rows = [
        (item.name, item.url, "paused" if item.paused else "active", len(item.segments) or "all")
        for item in response.webhook_subscriptions
    ]
    _table("Webhooks", ("name", "url", "state", "segments"), rows, response.next_page_token)


@webhooks.command("delete")
@connection_options
@DATASET_OPTION
@click.argument("subscription")
def delete_webhook(address: str, dataset: str, subscription: str) -> None:
    """Deletes SUBSCRIPTION (an id or a full name) and its pending deliveries."""
    name = _subscription(subscription, dataset)
    request = export_service_pb2.DeleteWebhookSubscriptionRequest(name=name)
    _call(address, lambda stub: stub.DeleteWebhookSubscription(request))
    click.echo(f"Deleted {name}")


@webhooks.command("deliveries")
@connection_options
@DATASET_OPTION
@click.argument("subscription")
@click.option(
    "--state", type=click.Choice(sorted(_DELIVERY_STATES)), default="dead", show_default=True
)
@_paged
def list_deliveries(
    address: str, dataset: str, subscription: str, state: str, page_size: int, page_token: str
) -> None:
    """Lists the deliveries of SUBSCRIPTION (an id or a full name), newest first: by default
    the dead-letter list."""
    name = _subscription(subscription, dataset)
    request = export_service_pb2.ListWebhookDeliveriesRequest(
        parent=name, state=_DELIVERY_STATES[state], page_size=page_size, page_token=page_token
    )
    response = _call(address, lambda stub: stub.ListWebhookDeliveries(request))
    rows = [
        (item.name.rpartition("/")[2], item.attempt_count, item.last_http_status, item.last_error)
        for item in response.webhook_deliveries
    ]
    _table(
        f"{state.capitalize()} deliveries of {name}",
        ("delivery", "attempts", "last status", "last error"),
        rows,
        response.next_page_token,
    )


@webhooks.command("replay")
@connection_options
@DATASET_OPTION
@click.argument("subscription")
@click.option(
    "--delivery",
    "deliveries",
    multiple=True,
    help="A dead delivery, its id or full name (repeat for several); all when none.",
)
def replay_deliveries(
    address: str, dataset: str, subscription: str, deliveries: tuple[str, ...]
) -> None:
    """Sends the dead deliveries of SUBSCRIPTION (an id or a full name) again, in their
    original order."""
    name = _subscription(subscription, dataset)
    names = [d if d.startswith("datasets/") else f"{name}/deliveries/{d}" for d in deliveries]
    request = export_service_pb2.ReplayWebhookDeliveriesRequest(parent=name, names=names)
    response = _call(address, lambda stub: stub.ReplayWebhookDeliveries(request))
    click.echo(f"Queued {response.replayed_count} deliveries again")
