"""Commands that send events and look after failed ones: ``events send``,
``failed-events list`` and ``failed-events replay``."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import click
import grpc
import grpc.aio
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from audience import errors
from audience.cli.connection import connect, connection_options
from audience.v1 import event_pb2, ingest_service_pb2, ingest_service_pb2_grpc

__all__ = ["events", "failed_events"]

MAX_BATCH = 1000
# Rejections listed in full after a send; the counts always cover all of them.
_SHOWN_REJECTIONS = 50
_RETRIED_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)

_TYPES = {
    "track": event_pb2.EVENT_TYPE_TRACK,
    "page": event_pb2.EVENT_TYPE_PAGE,
    "screen": event_pb2.EVENT_TYPE_SCREEN,
    "identify": event_pb2.EVENT_TYPE_IDENTIFY,
    "cart": event_pb2.EVENT_TYPE_CART_UPDATED,
    "cart_updated": event_pb2.EVENT_TYPE_CART_UPDATED,
    "order": event_pb2.EVENT_TYPE_ORDER_COMPLETED,
    "order_completed": event_pb2.EVENT_TYPE_ORDER_COMPLETED,
    "campaign": event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION,
    "campaign_interaction": event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION,
    "account": event_pb2.EVENT_TYPE_ACCOUNT_UPDATE,
    "account_update": event_pb2.EVENT_TYPE_ACCOUNT_UPDATE,
}

DATASET_OPTION = click.option(
    "--dataset",
    required=True,
    envvar="AUDIENCE_DATASET",
    help="The dataset id (or AUDIENCE_DATASET).",
)


class LineError(ValueError):
    """A JSON line that is not an event."""


def _value(value: Any) -> dict[str, Any]:
    """Returns the proto JSON form of ``audience.v1.Value`` for a plain JSON value."""
    if value is None:
        return {"nullValue": "NULL_VALUE"}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int | float):
        return {"numberValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, list):
        return {"listValue": {"values": [_value(item) for item in value]}}
    if isinstance(value, dict):
        return {"mapValue": {"fields": {str(k): _value(v) for k, v in value.items()}}}
    raise LineError(f"cannot send a {type(value).__name__} as a value")


def _values(mapping: Any, where: str) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise LineError(f"{where} must be a JSON object")
    return {str(key): _value(value) for key, value in mapping.items()}


def _event_type(name: Any) -> int:
    if isinstance(name, str):
        key = name.lower().removeprefix("event_type_")
        if key in _TYPES:
            return _TYPES[key]
    raise LineError(f"unknown event type {name!r}; one of {', '.join(sorted(_TYPES))}")


def event_from_json(data: Any) -> event_pb2.Event:
    """Returns the event a JSON object describes.

    The object has the fields of ``audience.v1.Event`` in their JSON form (``eventId`` or
    ``event_id``), except that ``type`` may be short (``track``, ``cart``), properties and
    traits are plain JSON values, and a top-level ``traits`` goes to the identify or account
    update payload. An event without an id gets a random one, so sending the same file
    twice sends such events twice.

    Raises:
        LineError: the object does not describe an event.
    """
    if not isinstance(data, dict):
        raise LineError("each line must be a JSON object")
    data = dict(data)
    kind = _event_type(data.pop("type", "track"))
    traits = data.pop("traits", None)
    if "properties" in data:
        data["properties"] = _values(data["properties"], "properties")
    for payload in ("identify", "account_update", "accountUpdate"):
        body = data.get(payload)
        if isinstance(body, dict) and "traits" in body:
            data[payload] = {**body, "traits": _values(body["traits"], f"{payload}.traits")}
    if traits is not None:
        target = "identify" if kind == event_pb2.EVENT_TYPE_IDENTIFY else "account_update"
        if kind not in (event_pb2.EVENT_TYPE_IDENTIFY, event_pb2.EVENT_TYPE_ACCOUNT_UPDATE):
            raise LineError("traits go on identify and account events only")
        data[target] = {**data.get(target, {}), "traits": _values(traits, "traits")}
    event = event_pb2.Event()
    try:
        json_format.ParseDict(data, event)
    except json_format.ParseError as error:
        raise LineError(str(error)) from None
    event.type = event_pb2.EventType.ValueType(kind)
    if not event.event_id:
        event.event_id = str(uuid.uuid4())
    return event


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


@dataclass
class Rejection:
    """An event that was not accepted, with where it came from."""

    line: int
    event_id: str
    field: str
    reason: str
    description: str


@dataclass
class Tally:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)


def _lines(source: IO[str]) -> Iterator[tuple[int, event_pb2.Event | LineError]]:
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            yield number, event_from_json(json.loads(line))
        except ValueError as error:
            yield number, error if isinstance(error, LineError) else LineError(str(error))


def _batches(
    items: Iterable[tuple[int, event_pb2.Event | LineError]], size: int, tally: Tally
) -> Iterator[list[tuple[int, event_pb2.Event]]]:
    batch: list[tuple[int, event_pb2.Event]] = []
    for number, item in items:
        if isinstance(item, LineError):
            tally.rejected += 1
            tally.rejections.append(Rejection(number, "", "", "INVALID_LINE", str(item)))
            continue
        batch.append((number, item))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _fail(error: grpc.RpcError) -> click.ClickException:
    decoded = errors.decode(error)
    detail = "".join(f"\n  {v.field}: {v.description}" for v in decoded.violations)
    return click.ClickException(f"{decoded.code.name}: {decoded.message}{detail}")


async def _send_batch(
    stub: ingest_service_pb2_grpc.IngestServiceAsyncStub,
    request: ingest_service_pb2.SendEventsRequest,
    retries: int,
    console: Console,
) -> ingest_service_pb2.SendEventsResponse:
    for attempt in range(retries + 1):
        try:
            response: ingest_service_pb2.SendEventsResponse = await stub.SendEvents(
                request, timeout=60
            )
            return response
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RETRIED_CODES or attempt == retries:
                raise _fail(error) from None
            decoded = errors.decode(error)
            delay = decoded.retry_delay.total_seconds() if decoded.retry_delay else 2**attempt
            console.log(f"{decoded.code.name}: {decoded.message} Retrying in {delay:g}s.")
            # Resending is safe: the same event ids come back as duplicates.
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _send(
    address: str,
    dataset: str,
    batches: Iterator[list[tuple[int, event_pb2.Event]]],
    tally: Tally,
    progress: Progress,
    task: Any,
    retries: int,
    console: Console,
) -> None:
    async with connect(address) as channel:
        stub: Any = ingest_service_pb2_grpc.IngestServiceStub(channel)
        for batch in batches:
            request = ingest_service_pb2.SendEventsRequest(
                parent=f"datasets/{dataset}", events=[event for _, event in batch]
            )
            response = await _send_batch(stub, request, retries, console)
            tally.accepted += response.accepted_count
            tally.duplicates += response.duplicate_count
            tally.rejected += response.rejected_count
            for (number, event), result in zip(batch, response.results, strict=True):
                for violation in result.violations:
                    path = violation.field.split(".", 1)[1] if "." in violation.field else ""
                    tally.rejections.append(
                        Rejection(
                            number,
                            event.event_id,
                            path,
                            violation.reason,
                            violation.description,
                        )
                    )
            progress.advance(task, len(batch))


def _print_tally(console: Console, tally: Tally, *, with_lines: bool) -> None:
    console.print(
        f"[green]Accepted {tally.accepted:,}[/green], "
        f"[yellow]duplicates {tally.duplicates:,}[/yellow], "
        f"[red]rejected {tally.rejected:,}[/red]."
    )
    if not tally.rejections:
        return
    table = Table(title="Rejected", title_justify="left")
    if with_lines:
        table.add_column("line", justify="right")
    for column in ("event id", "field", "reason", "what is wrong"):
        table.add_column(column)
    shown = sorted(tally.rejections, key=lambda r: r.line)[:_SHOWN_REJECTIONS]
    for rejection in shown:
        cells = [rejection.event_id, rejection.field, rejection.reason, rejection.description]
        table.add_row(*([str(rejection.line)] if with_lines else []), *cells)
    console.print(table)
    if len(tally.rejections) > _SHOWN_REJECTIONS:
        console.print(f"… and {len(tally.rejections) - _SHOWN_REJECTIONS:,} more problems.")


@click.group()
def events() -> None:
    """Sends events."""


@events.command()
@connection_options
@DATASET_OPTION
@click.option(
    "--file",
    "source",
    type=click.File("r"),
    help="JSON lines, one event each ('-' for stdin), instead of one event from flags.",
)
@click.option("--type", "kind", default="track", show_default=True, help="The event type.")
@click.option("--name", default="", help="The event name (required for track events).")
@click.option("--event-id", default="", help="The event id (default: a random UUID).")
@click.option("--user", default="", help="The user id.")
@click.option("--anonymous", default="", help="The anonymous visitor's id.")
@click.option("--account", default="", help="The account id.")
@click.option(
    "--property",
    "properties",
    multiple=True,
    help="KEY=VALUE, repeatable; VALUE is read as JSON when it is JSON, else as text.",
)
@click.option("--trait", "traits", multiple=True, help="KEY=VALUE for identify or account events.")
@click.option("--timestamp", default="", help="When it happened, RFC 3339 (default: now).")
@click.option(
    "--batch-size",
    default=500,
    show_default=True,
    type=click.IntRange(1, MAX_BATCH),
    help="Events per call.",
)
@click.option(
    "--retries",
    default=5,
    show_default=True,
    type=click.IntRange(0),
    help="Retries of a batch refused for backpressure or an outage.",
)
def send(
    address: str,
    dataset: str,
    source: IO[str] | None,
    kind: str,
    name: str,
    event_id: str,
    user: str,
    anonymous: str,
    account: str,
    properties: tuple[str, ...],
    traits: tuple[str, ...],
    timestamp: str,
    batch_size: int,
    retries: int,
) -> None:
    """Sends one event described by flags, or JSON lines from a file or stdin.

    Prints how many events were accepted, were duplicates or were rejected, and why each
    rejected one was. Exits with 1 when any was rejected.

    \b
    audience events send --dataset shop --name product_view --user u1 --property category=shoes
    audience events send --dataset shop --file events.jsonl
    """
    console = Console(stderr=True)
    tally = Tally()
    with_lines = source is not None
    if source is not None:
        if any((name, event_id, user, anonymous, account, properties, traits, timestamp)):
            raise click.UsageError("--file sends the events of the file: no event flags with it")
        total = _count_lines(source)
        items: Iterable[tuple[int, event_pb2.Event | LineError]] = _lines(source)
    else:
        data: dict[str, Any] = {
            "type": kind,
            "name": name,
            "eventId": event_id,
            "userId": user,
            "anonymousId": anonymous,
            "accountId": account,
            "properties": dict(_assignment(p) for p in properties),
        }
        if traits:
            data["traits"] = dict(_assignment(t) for t in traits)
        if timestamp:
            data["timestamp"] = timestamp
        try:
            event = event_from_json({k: v for k, v in data.items() if v != ""})
        except LineError as error:
            raise click.UsageError(str(error)) from None
        total = 1
        items = [(1, event)]
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("Sending", total=total)
        batches = _batches(items, batch_size, tally)
        asyncio.run(_send(address, dataset, batches, tally, progress, task, retries, console))
    _print_tally(Console(), tally, with_lines=with_lines)
    if tally.rejected:
        sys.exit(1)


def _count_lines(source: IO[str]) -> int | None:
    """Counts the events of a seekable file for the progress bar; None for a pipe."""
    if not source.seekable():
        return None
    count = sum(1 for line in source if line.strip())
    source.seek(0)
    return count


@click.group("failed-events")
def failed_events() -> None:
    """Lists and replays events that passed ingest but could not be applied."""


async def _list_pages(
    address: str, dataset: str, reason: str, page_size: int, every: bool
) -> AsyncIterator[ingest_service_pb2.ListFailedEventsResponse]:
    async with connect(address) as channel:
        stub: Any = ingest_service_pb2_grpc.IngestServiceStub(channel)
        token = ""
        while True:
            request = ingest_service_pb2.ListFailedEventsRequest(
                parent=f"datasets/{dataset}", page_size=page_size, page_token=token, reason=reason
            )
            try:
                page: ingest_service_pb2.ListFailedEventsResponse = await stub.ListFailedEvents(
                    request, timeout=30
                )
            except grpc.aio.AioRpcError as error:
                raise _fail(error) from None
            yield page
            token = page.next_page_token
            if not token or not every:
                return


@failed_events.command("list")
@connection_options
@DATASET_OPTION
@click.option("--reason", default="", help="Only failures with this reason.")
@click.option(
    "--page-size", default=50, show_default=True, type=click.IntRange(1, 1000), help="Per page."
)
@click.option("--all", "every", is_flag=True, help="Every page, not just the first.")
def list_failed(address: str, dataset: str, reason: str, page_size: int, every: bool) -> None:
    """Lists failed events, newest first."""
    table = Table(title=f"Failed events of {dataset}", title_justify="left")
    for column in ("id", "event id", "event", "stage", "reason", "message", "failed", "replays"):
        table.add_column(column)
    more = False

    async def fill() -> None:
        nonlocal more
        async for page in _list_pages(address, dataset, reason, page_size, every):
            for failed in page.failed_events:
                event = failed.event
                kind = event_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_").lower()
                table.add_row(
                    failed.name.rsplit("/", 1)[-1],
                    event.event_id,
                    f"{kind} {event.name}".strip(),
                    failed.stage,
                    failed.reason,
                    failed.message,
                    failed.fail_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                    str(failed.replay_count),
                )
            more = bool(page.next_page_token)

    asyncio.run(fill())
    console = Console()
    if not table.row_count:
        console.print(
            f"No failed events in {dataset}" + (f" with reason {reason}." if reason else ".")
        )
        return
    console.print(table)
    if more:
        console.print("More failed events: add --all to list every page.")


@failed_events.command()
@connection_options
@DATASET_OPTION
@click.argument("names", nargs=-1)
@click.option("--reason", default="", help="With --all: only failures with this reason.")
@click.option("--all", "every", is_flag=True, help="Every failed event awaiting a replay.")
def replay(address: str, dataset: str, names: tuple[str, ...], reason: str, every: bool) -> None:
    """Puts failed events back on the bus: NAMES (ids from `list`, or full names), or --all."""
    if bool(names) == every:
        raise click.UsageError("give the failed events to replay, or --all (not both)")
    if reason and not every:
        raise click.UsageError("--reason filters --all")
    full = [n if "/" in n else f"datasets/{dataset}/failedEvents/{n}" for n in names]

    async def call() -> int:
        async with connect(address) as channel:
            stub: Any = ingest_service_pb2_grpc.IngestServiceStub(channel)
            request = ingest_service_pb2.ReplayFailedEventsRequest(
                parent=f"datasets/{dataset}", names=full, reason=reason
            )
            try:
                response = await stub.ReplayFailedEvents(request, timeout=300)
            except grpc.aio.AioRpcError as error:
                raise _fail(error) from None
            count: int = response.replayed_count
            return count

    count = asyncio.run(call())
    click.echo(f"Replayed {count:,} failed event{'s' if count != 1 else ''}.")
