"""``audience segments``, ``audience watch``, ``audience explain`` and ``audience members``.

Segments and members are named by id within ``--dataset`` (or ``AUDIENCE_DATASET``), or by
their full resource names (``datasets/shop/segments/vip``). Rules are in the text form,
from ``--rule`` or ``--rule-file`` (``-`` reads standard input).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc.aio
from google.protobuf import duration_pb2, field_mask_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from audience.cli.connection import connect, connection_options
from audience.cli.names import DATASET_OPTION, dataset_name, resource_name
from audience.errors import decode
from audience.rules.text import format_value
from audience.v1 import (
    common_pb2,
    membership_pb2,
    membership_service_pb2,
    membership_service_pb2_grpc,
    rule_pb2,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)

__all__ = ["explain", "members", "segments", "watch"]

T = TypeVar("T")

_KINDS = {"user": segment_pb2.SEGMENT_KIND_USER, "account": segment_pb2.SEGMENT_KIND_ACCOUNT}
_STATES = {
    "backfilling": segment_pb2.SEGMENT_STATE_BACKFILLING,
    "active": segment_pb2.SEGMENT_STATE_ACTIVE,
    "failed": segment_pb2.SEGMENT_STATE_FAILED,
}
_STATE_NAMES = {value: name for name, value in _STATES.items()}
_CHANGE_KINDS = {
    "join": membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN,
    "leave": membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE,
}
_MODES = {
    "replace": segment_service_pb2.IMPORT_MODE_REPLACE,
    "add": segment_service_pb2.IMPORT_MODE_ADD,
    "remove": segment_service_pb2.IMPORT_MODE_REMOVE,
}
_CAUSES = {
    membership_pb2.CHANGE_CAUSE_EVENT: "event",
    membership_pb2.CHANGE_CAUSE_TIME: "time",
    membership_pb2.CHANGE_CAUSE_BACKFILL: "backfill",
    membership_pb2.CHANGE_CAUSE_DEPENDENCY: "dependency",
    membership_pb2.CHANGE_CAUSE_ERASURE: "erasure",
    membership_pb2.CHANGE_CAUSE_MERGE: "merge",
    membership_pb2.CHANGE_CAUSE_SEGMENT_CHANGED: "segment changed",
}
_UPLOAD_CHUNK = 1 << 20


class _Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.segments = segment_service_pb2_grpc.SegmentServiceStub(channel)
        self.memberships = membership_service_pb2_grpc.MembershipServiceStub(channel)


def _call(address: str, action: Callable[[_Stubs], Awaitable[T]]) -> T:
    async def run() -> T:
        async with connect(address) as channel:
            return await action(_Stubs(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as error:
        decoded = decode(error)
        lines = [f"{decoded.code.name}: {decoded.message}"]
        lines += [f"  {v.field}: {v.description}" for v in decoded.violations]
        raise click.ClickException("\n".join(lines)) from None


def _segment(value: str, dataset: str) -> str:
    return resource_name(value, dataset, "segments")


def _member(value: str, dataset: str, account: bool) -> str:
    return resource_name(value, dataset, "accounts" if account else "profiles")


def _rule_text(rule: str | None, rule_file: str | None) -> str | None:
    if rule is not None and rule_file is not None:
        raise click.UsageError("give --rule or --rule-file, not both")
    if rule_file == "-":
        return sys.stdin.read()
    if rule_file is not None:
        return Path(rule_file).read_text(encoding="utf-8")
    return rule


def _print(message: Message) -> None:
    click.echo(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")


async def _follow_backfill(stubs: _Stubs, name: str) -> segment_pb2.Segment:
    """Shows the backfill as a bar until the segment is active (or failed)."""
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(f"backfilling {name}", total=100.0, detail="")
        while True:
            segment: segment_pb2.Segment = (
                await stubs.segments.GetSegment(
                    segment_service_pb2.GetSegmentRequest(name=name), timeout=10
                )
            ).segment
            backfill = segment.backfill
            progress.update(
                task,
                completed=backfill.percent,
                detail=f"{backfill.profiles_done:,}/{backfill.profiles_total:,} profiles",
            )
            if segment.state != segment_pb2.SEGMENT_STATE_BACKFILLING:
                break
            await asyncio.sleep(0.25)
    if segment.state == segment_pb2.SEGMENT_STATE_FAILED:
        raise click.ClickException(f"backfill failed: {segment.backfill.error}")
    return segment


@click.group()
def segments() -> None:
    """Create, inspect and change segments."""


@segments.command()
@connection_options
@DATASET_OPTION
@click.argument("segment_id")
@click.option("--rule", help="The rule in the text form.")
@click.option("--rule-file", help="A file holding the rule's text ('-' for standard input).")
@click.option("--kind", type=click.Choice(list(_KINDS)), default="user", show_default=True)
@click.option("--imported", is_flag=True, help="An imported segment: members are uploaded.")
@click.option("--display-name", default="")
@click.option("--description", default="")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE (repeat for several).")
@click.option("--wait/--no-wait", default=True, help="Show the backfill until it ends.")
def create(
    address: str,
    dataset: str,
    segment_id: str,
    rule: str | None,
    rule_file: str | None,
    kind: str,
    imported: bool,
    display_name: str,
    description: str,
    labels: Sequence[str],
    wait: bool,
) -> None:
    """Creates SEGMENT_ID and backfills it over every existing profile."""
    text = _rule_text(rule, rule_file)
    if imported == (text is not None):
        raise click.UsageError("give a rule, or --imported for an uploaded list")
    segment = segment_pb2.Segment(
        kind=_KINDS[kind],
        source=segment_pb2.SEGMENT_SOURCE_IMPORTED if imported else segment_pb2.SEGMENT_SOURCE_RULE,
        rule_text=text or "",
        display_name=display_name,
        description=description,
        labels=dict(label.partition("=")[::2] for label in labels),
    )

    async def action(stubs: _Stubs) -> segment_pb2.Segment:
        created: segment_pb2.Segment = (
            await stubs.segments.CreateSegment(
                segment_service_pb2.CreateSegmentRequest(
                    parent=dataset_name(dataset), segment_id=segment_id, segment=segment
                ),
                timeout=30,
            )
        ).segment
        if wait and created.state == segment_pb2.SEGMENT_STATE_BACKFILLING:
            return await _follow_backfill(stubs, created.name)
        return created

    _print(_call(address, action))


@segments.command(name="list")
@connection_options
@DATASET_OPTION
@click.option("--kind", type=click.Choice(list(_KINDS)))
@click.option("--state", type=click.Choice(list(_STATES)))
@click.option("--page-size", default=100, show_default=True)
@click.option("--page-token", default="")
def list_segments(
    address: str,
    dataset: str,
    kind: str | None,
    state: str | None,
    page_size: int,
    page_token: str,
) -> None:
    """Lists a dataset's segments."""
    request = segment_service_pb2.ListSegmentsRequest(
        parent=dataset_name(dataset),
        page_size=page_size,
        page_token=page_token,
        kind=_KINDS[kind] if kind else segment_pb2.SEGMENT_KIND_UNSPECIFIED,
        state=_STATES[state] if state else segment_pb2.SEGMENT_STATE_UNSPECIFIED,
    )

    async def action(stubs: _Stubs) -> segment_service_pb2.ListSegmentsResponse:
        response: segment_service_pb2.ListSegmentsResponse = await stubs.segments.ListSegments(
            request, timeout=30
        )
        return response

    response = _call(address, action)
    table = Table(title=f"Segments of {request.parent}", title_justify="left")
    for header in ("segment", "kind", "state", "version", "members", "rule"):
        table.add_column(header)
    for segment in response.segments:
        table.add_row(
            segment.name.rsplit("/", 1)[1],
            "account" if segment.kind == segment_pb2.SEGMENT_KIND_ACCOUNT else "user",
            _STATE_NAMES.get(segment.state, "?")
            + (f" {segment.backfill.percent:.0f}%" if segment.state == 1 else ""),
            str(segment.version),
            f"{segment.member_count:,}",
            segment.rule_text or "(imported)",
        )
    console = Console()
    console.print(table)
    if response.next_page_token:
        console.print(f"More: --page-token {response.next_page_token}")


@segments.command()
@connection_options
@DATASET_OPTION
@click.argument("segment")
def get(address: str, dataset: str, segment: str) -> None:
    """Shows SEGMENT (an id, or datasets/{dataset}/segments/{segment})."""

    async def action(stubs: _Stubs) -> segment_pb2.Segment:
        found: segment_pb2.Segment = (
            await stubs.segments.GetSegment(
                segment_service_pb2.GetSegmentRequest(name=_segment(segment, dataset)),
                timeout=30,
            )
        ).segment
        return found

    _print(_call(address, action))


@segments.command()
@connection_options
@DATASET_OPTION
@click.argument("segment")
@click.option("--rule", help="A new rule in the text form (makes a new version).")
@click.option("--rule-file", help="A file holding the new rule ('-' for standard input).")
@click.option("--display-name")
@click.option("--description")
@click.option("--wait/--no-wait", default=True, help="Show the backfill until it ends.")
def update(
    address: str,
    dataset: str,
    segment: str,
    rule: str | None,
    rule_file: str | None,
    display_name: str | None,
    description: str | None,
    wait: bool,
) -> None:
    """Changes SEGMENT; a new rule is a new version, backfilled."""
    text = _rule_text(rule, rule_file)
    changes = segment_pb2.Segment(name=_segment(segment, dataset))
    paths: list[str] = []
    if text is not None:
        changes.rule_text = text
        paths.append("rule_text")
    if display_name is not None:
        changes.display_name = display_name
        paths.append("display_name")
    if description is not None:
        changes.description = description
        paths.append("description")
    if not paths:
        raise click.UsageError("nothing to change")

    async def action(stubs: _Stubs) -> segment_pb2.Segment:
        updated: segment_pb2.Segment = (
            await stubs.segments.UpdateSegment(
                segment_service_pb2.UpdateSegmentRequest(
                    segment=changes, update_mask=field_mask_pb2.FieldMask(paths=paths)
                ),
                timeout=30,
            )
        ).segment
        if wait and updated.state == segment_pb2.SEGMENT_STATE_BACKFILLING:
            return await _follow_backfill(stubs, updated.name)
        return updated

    _print(_call(address, action))


@segments.command()
@connection_options
@DATASET_OPTION
@click.argument("segment")
def delete(address: str, dataset: str, segment: str) -> None:
    """Deletes SEGMENT; its members leave it."""
    name = _segment(segment, dataset)

    async def action(stubs: _Stubs) -> None:
        await stubs.segments.DeleteSegment(
            segment_service_pb2.DeleteSegmentRequest(name=name), timeout=30
        )

    _call(address, action)
    click.echo(f"Deleted {name}.")


@segments.command()
@connection_options
@DATASET_OPTION
@click.option("--rule", help="The rule in the text form.")
@click.option("--rule-file", help="A file holding the rule's text ('-' for standard input).")
@click.option("--kind", type=click.Choice(list(_KINDS)), default="user", show_default=True)
@click.option("--sample", default=10, show_default=True, help="Sample members to show.")
def preview(
    address: str, dataset: str, rule: str | None, rule_file: str | None, kind: str, sample: int
) -> None:
    """Estimates a rule's size and shows sample members, without saving anything."""
    text = _rule_text(rule, rule_file)
    if text is None:
        raise click.UsageError("give --rule or --rule-file")

    async def action(stubs: _Stubs) -> segment_service_pb2.PreviewSegmentResponse:
        response: segment_service_pb2.PreviewSegmentResponse = await stubs.segments.PreviewSegment(
            segment_service_pb2.PreviewSegmentRequest(
                parent=dataset_name(dataset), kind=_KINDS[kind], rule_text=text, sample_size=sample
            ),
            timeout=120,
        )
        return response

    response = _call(address, action)
    click.echo(f"{response.estimated_size:,} of {response.profiles_scanned:,} profiles match.")
    for member in response.sample_members:
        click.echo(f"  {member}")


@segments.command(name="import")
@connection_options
@DATASET_OPTION
@click.argument("segment")
@click.argument("file", type=click.File("rb"))
@click.option("--mode", type=click.Choice(list(_MODES)), default="add", show_default=True)
def import_members(address: str, dataset: str, segment: str, file: Any, mode: str) -> None:
    """Uploads FILE (CSV: a profile_id column, or ids in the first column) to SEGMENT."""
    name = _segment(segment, dataset)

    def chunks() -> Iterator[segment_service_pb2.ImportSegmentMembersRequest]:
        yield segment_service_pb2.ImportSegmentMembersRequest(segment=name, mode=_MODES[mode])
        while block := file.read(_UPLOAD_CHUNK):
            yield segment_service_pb2.ImportSegmentMembersRequest(csv=block)

    async def action(stubs: _Stubs) -> segment_service_pb2.ImportSegmentMembersResponse:
        async def requests() -> AsyncIterator[segment_service_pb2.ImportSegmentMembersRequest]:
            for chunk in chunks():
                yield chunk

        response: segment_service_pb2.ImportSegmentMembersResponse = (
            await stubs.segments.ImportSegmentMembers(requests(), timeout=3600)
        )
        return response

    response = _call(address, action)
    click.echo(
        f"{response.joined_count:,} joined, {response.left_count:,} left,"
        f" {response.rejected_count:,} rejected; {name} is at version {response.segment.version}."
    )


@segments.command()
@connection_options
@DATASET_OPTION
@click.argument("segment")
@click.option("--days", default=14, show_default=True)
def stats(address: str, dataset: str, segment: str, days: int) -> None:
    """Shows SEGMENT's size and its joins and leaves per day."""
    name = _segment(segment, dataset)

    async def action(stubs: _Stubs) -> segment_service_pb2.GetSegmentStatsResponse:
        response: segment_service_pb2.GetSegmentStatsResponse = (
            await stubs.segments.GetSegmentStats(
                segment_service_pb2.GetSegmentStatsRequest(name=name, days=days), timeout=30
            )
        )
        return response

    response = _call(address, action)
    table = Table(title=f"{name}: {response.size:,} members", title_justify="left")
    for header in ("date", "size", "joins", "leaves"):
        table.add_column(header, justify="right")
    for day in response.days:
        table.add_row(day.date, f"{day.size:,}", f"{day.joins:,}", f"{day.leaves:,}")
    Console().print(table)


def _observed(value: common_pb2.Value) -> str:
    """A value as the rule text writes it (``40``, ``"US"``, ``@2026-11-28T10:00:00Z``)."""
    return format_value(value) if value.WhichOneof("kind") else "nothing"


def _reason(change: membership_pb2.MembershipChange) -> str:
    reason = change.reason
    parts = [_CAUSES.get(reason.cause, "unknown")]
    if reason.event_ids:
        parts.append("events " + ", ".join(reason.event_ids[:3]))
    if reason.dependency_segment:
        parts.append("via " + reason.dependency_segment.rsplit("/", 1)[1])
    for clause in reason.flipped_clauses:
        observed = _observed(clause.observed) if clause.HasField("observed") else None
        parts.append(
            f"{clause.text} → {'true' if clause.result else 'false'}"
            + (f" (saw {observed})" if observed is not None else "")
        )
    return "; ".join(parts)


@click.command()
@connection_options
@DATASET_OPTION
@click.option("--segment", "segment_filter", multiple=True, help="Only this segment (repeat).")
@click.option("--kind", type=click.Choice(list(_CHANGE_KINDS)), help="Only joins or leaves.")
@click.option("--resume", "resume_token", help="Resume after the change that carried TOKEN.")
@click.option("--since", help="Start at an ISO 8601 time, such as 2026-01-31T12:00:00Z.")
@click.option("--heartbeat", default=10.0, show_default=True, help="Seconds between heartbeats.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def watch(
    address: str,
    dataset: str,
    segment_filter: Sequence[str],
    kind: str | None,
    resume_token: str | None,
    since: str | None,
    heartbeat: float,
    as_json: bool,
) -> None:
    """Streams joins and leaves with their reasons, as they happen.

    Each line ends with the change's resume token: run again with --resume TOKEN to carry
    on after it, missing nothing.
    """
    request = membership_service_pb2.WatchMembershipChangesRequest(
        parent=dataset_name(dataset),
        segments=[_segment(s, dataset) for s in segment_filter],
        kind=_CHANGE_KINDS[kind] if kind else membership_pb2.MEMBERSHIP_CHANGE_KIND_UNSPECIFIED,
        heartbeat_interval=duration_pb2.Duration(seconds=max(1, round(heartbeat))),
        # A busy dataset prints many changes a second: fewer, fuller responses keep up.
        max_changes_per_response=100,
    )
    if resume_token and since:
        raise click.UsageError("give --resume or --since, not both")
    if resume_token:
        request.resume_token = resume_token
    elif since:
        request.start_time.FromDatetime(
            datetime.fromisoformat(since.replace("Z", "+00:00")).astimezone(UTC)
        )
    console = Console(highlight=False)

    async def action(stubs: _Stubs) -> None:
        async for response in stubs.memberships.WatchMembershipChanges(request):
            if response.HasField("heartbeat"):
                if not as_json:
                    console.print(
                        f"[dim]· up to {_when(response.heartbeat.time)}"
                        f"  resume: {response.heartbeat.resume_token}[/dim]"
                    )
                continue
            for change in response.batch.changes:
                if as_json:
                    click.echo(json_format.MessageToJson(change, indent=None))
                    continue
                verb = "[green]joined[/green]" if change.kind == 1 else "[red]left[/red]"
                console.print(
                    f"{_when(change.change_time)}  {change.member.split('/', 2)[2]} {verb}"
                    f" {change.segment.rsplit('/', 1)[1]} (v{change.segment_version})"
                    f"  [dim]{_reason(change)}  resume: {change.resume_token}[/dim]"
                )

    with contextlib.suppress(KeyboardInterrupt):
        _call(address, action)


@click.command()
@connection_options
@DATASET_OPTION
@click.argument("profile")
@click.argument("segment")
@click.option("--account", is_flag=True, help="PROFILE is an account id.")
def explain(address: str, dataset: str, profile: str, segment: str, account: bool) -> None:
    """Explains SEGMENT's rule for PROFILE: each clause, true or false, and the values seen."""
    request = membership_service_pb2.ExplainMembershipRequest(
        member=_member(profile, dataset, account), segment=_segment(segment, dataset)
    )

    async def action(stubs: _Stubs) -> membership_service_pb2.ExplainMembershipResponse:
        response: membership_service_pb2.ExplainMembershipResponse = (
            await stubs.memberships.ExplainMembership(request, timeout=30)
        )
        return response

    response = _call(address, action)
    console = Console(highlight=False)
    state = "is a member" if response.is_member else "is not a member"
    console.print(f"{request.member} {state} of {request.segment} (v{response.segment_version})")

    def show(node: rule_pb2.RuleExplanation, depth: int) -> None:
        mark = "[green]✓[/green]" if node.result else "[red]✗[/red]"
        seen = ""
        if node.HasField("observed"):
            seen = f"  [dim]saw {escape(_observed(node.observed))}[/dim]"
        console.print(f"{'  ' * depth}{mark} {node.text}{seen}")
        if node.missing and not node.children:
            console.print(f"{'  ' * depth}    [yellow]{node.missing}[/yellow]")
        for child in node.children:
            show(child, depth + 1)

    show(response.explanation, 0)


@click.command()
@connection_options
@DATASET_OPTION
@click.argument("segment")
@click.option("--limit", default=0, help="Stop after this many members (0: all).")
@click.option("--count", "count_only", is_flag=True, help="Only count them.")
def members(address: str, dataset: str, segment: str, limit: int, count_only: bool) -> None:
    """Prints SEGMENT's members, one id a line."""
    name = _segment(segment, dataset)

    async def action(stubs: _Stubs) -> None:
        if count_only:
            response = await stubs.memberships.CountSegmentMembers(
                membership_service_pb2.CountSegmentMembersRequest(segment=name), timeout=30
            )
            click.echo(response.count)
            return
        token = ""
        printed = 0
        started = time.monotonic()
        while True:
            response = await stubs.memberships.ListSegmentMembers(
                membership_service_pb2.ListSegmentMembersRequest(
                    parent=name, page_size=10_000, page_token=token
                ),
                timeout=60,
            )
            lines = [m.member.rsplit("/", 1)[1] for m in response.memberships]
            if limit:
                lines = lines[: limit - printed]
            if lines:
                sys.stdout.write("\n".join(lines) + "\n")
            printed += len(lines)
            token = response.next_page_token
            if not token or (limit and printed >= limit):
                break
        click.echo(f"{printed:,} members in {time.monotonic() - started:.1f} s", err=True)

    _call(address, action)
