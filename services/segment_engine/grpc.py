"""SegmentService and MembershipService: protos in, domain calls, protos out."""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta

import grpc.aio
from google.protobuf import timestamp_pb2
from opentelemetry import metrics, trace

from audience.errors import FieldViolation, invalid_argument
from audience.rules import micros_from_timestamp
from audience.telemetry import extract
from audience.v1 import (
    membership_pb2,
    membership_service_pb2,
    membership_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from services.segment_engine.domain.model import (
    ChangeKind,
    Kind,
    SegmentState,
    Source,
    member_name,
    parse_dataset,
    parse_member,
    parse_segment,
    segment_name,
)
from services.segment_engine.domain.tokens import encode_token
from services.segment_engine.memberships import Memberships, decode_page_token, page_token
from services.segment_engine.segments import SegmentChanges, Segments
from services.segment_engine.store.log import ChangeLog
from services.segment_engine.store.members import MemberChunk
from services.segment_engine.translate import (
    change_message,
    membership_message,
    segment_message,
    timestamp,
)
from services.segment_engine.watch import (
    ChangeNotifier,
    Heartbeat,
    StartPoint,
    StreamedChange,
    watch_changes,
)

__all__ = ["MembershipServicer", "SegmentServicer"]

_MAX_WATCH_SEGMENTS = 1000
_MAX_CHANGES_PER_RESPONSE = 1000
_BATCH_BYTES = 1024 * 1024
"""A batch of changes is cut where its changes' encodings would pass this many bytes (a
change with many flipped clauses and long values can take kilobytes), so a response stays
well inside the 4 MiB a client accepts by default. A single change is sent whatever its
size, as it would be alone."""
_MAX_STREAM_CHUNK = 10_000
_CHUNK_ID_CHARS = 512 * 1024
"""A chunk whose member ids hold more characters is sent in parts: at most 4 bytes each in
UTF-8, so a response stays near 2 MiB, well inside the 4 MiB a client accepts by default."""


def _page_size(value: int, default: int, maximum: int, field: str = "page_size") -> int:
    if value == 0:
        return default
    if not 1 <= value <= maximum:
        raise invalid_argument(
            f"{field} must be from 1 to {maximum}.",
            FieldViolation(field, f"must be from 1 to {maximum} (0 for {default})."),
        )
    return value


# A Timestamp's range, 0001-01-01 to 9999-12-31: what the store's times can hold.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def _instant(moment: timestamp_pb2.Timestamp, field: str) -> int:
    """Microseconds since the epoch of a timestamp in range."""
    if not (_MIN_SECONDS <= moment.seconds <= _MAX_SECONDS and 0 <= moment.nanos < 10**9):
        raise invalid_argument(
            f"{field} is not a valid timestamp.",
            FieldViolation(
                field, "must be from 0001-01-01 to 9999-12-31 (nanos from 0 to 999,999,999)."
            ),
        )
    return micros_from_timestamp(moment)


def _kind(value: int) -> Kind | None:
    return Kind(value) if value in (1, 2) else None


def _enum_or_fail(value: int, allowed: Sequence[int], field: str) -> None:
    if value and value not in allowed:
        raise invalid_argument(
            f"{field} has an unknown value {value}.",
            FieldViolation(field, f"unknown value {value}."),
        )


def _changes(segment: segment_pb2.Segment) -> SegmentChanges:
    return SegmentChanges(
        display_name=segment.display_name,
        description=segment.description,
        labels=dict(segment.labels),
        rule=segment.rule if segment.HasField("rule") else None,
        rule_text=segment.rule_text,
        etag=segment.etag,
    )


def _list_token(kind: int, state: int, last: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{state}:{last}".encode()).decode()


def _list_after(token: str, kind: int, state: int) -> str:
    if not token:
        return ""
    text = decode_page_token(token)
    prefix = f"{kind}:{state}:"
    if not text.startswith(prefix):
        raise invalid_argument(
            "page_token was made for other filters.",
            FieldViolation("page_token", "the other fields must be the same as in that call."),
            reason="INVALID_PAGE_TOKEN",
        )
    return text.removeprefix(prefix)


class SegmentServicer(segment_service_pb2_grpc.SegmentServiceServicer):
    def __init__(self, segments: Segments) -> None:
        self._segments = segments

    async def CreateSegment(  # noqa: N802 - the gRPC method name
        self,
        request: segment_service_pb2.CreateSegmentRequest,
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.CreateSegmentResponse:
        dataset = parse_dataset(request.parent)
        segment = request.segment
        _enum_or_fail(segment.kind, (1, 2), "segment.kind")
        _enum_or_fail(segment.source, (1, 2), "segment.source")
        record = await self._segments.create(
            dataset,
            request.segment_id,
            _kind(segment.kind),
            Source(segment.source) if segment.source in (1, 2) else None,
            _changes(segment),
        )
        return segment_service_pb2.CreateSegmentResponse(segment=segment_message(record))

    async def GetSegment(  # noqa: N802
        self, request: segment_service_pb2.GetSegmentRequest, context: grpc.aio.ServicerContext
    ) -> segment_service_pb2.GetSegmentResponse:
        dataset, segment_id = parse_segment(request.name)
        record = await self._segments.get(dataset, segment_id)
        return segment_service_pb2.GetSegmentResponse(segment=segment_message(record))

    async def ListSegments(  # noqa: N802
        self,
        request: segment_service_pb2.ListSegmentsRequest,
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.ListSegmentsResponse:
        dataset = parse_dataset(request.parent)
        size = _page_size(request.page_size, 100, 1000)
        _enum_or_fail(request.kind, (1, 2), "kind")
        _enum_or_fail(request.state, (1, 2, 3), "state")
        after = _list_after(request.page_token, request.kind, request.state)
        records, more = await self._segments.page(
            dataset,
            after=after,
            limit=size,
            kind=_kind(request.kind),
            state=SegmentState(request.state) if request.state else None,
        )
        response = segment_service_pb2.ListSegmentsResponse(
            segments=[segment_message(record) for record in records]
        )
        if more and records:
            response.next_page_token = _list_token(
                request.kind, request.state, records[-1].segment_id
            )
        return response

    async def UpdateSegment(  # noqa: N802
        self,
        request: segment_service_pb2.UpdateSegmentRequest,
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.UpdateSegmentResponse:
        dataset, segment_id = parse_segment(request.segment.name, "segment.name")
        record = await self._segments.update(
            dataset, segment_id, _changes(request.segment), list(request.update_mask.paths)
        )
        return segment_service_pb2.UpdateSegmentResponse(segment=segment_message(record))

    async def DeleteSegment(  # noqa: N802
        self,
        request: segment_service_pb2.DeleteSegmentRequest,
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.DeleteSegmentResponse:
        dataset, segment_id = parse_segment(request.name)
        await self._segments.delete(dataset, segment_id, request.etag)
        return segment_service_pb2.DeleteSegmentResponse()

    async def ValidateRule(  # noqa: N802
        self,
        request: segment_service_pb2.ValidateRuleRequest,
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.ValidateRuleResponse:
        dataset = parse_dataset(request.parent)
        kind = _required_kind(request.kind)
        facts = await self._segments.validate_rule(
            dataset,
            kind,
            request.rule if request.HasField("rule") else None,
            request.rule_text,
        )
        return segment_service_pb2.ValidateRuleResponse(
            rule=facts.rule,
            rule_text=facts.text,
            event_names=facts.event_names,
            attribute_paths=facts.attribute_paths,
            segments=facts.segments,
            time_dependent=facts.time_dependent,
        )

    async def PreviewSegment(  # noqa: N802
        self,
        request: segment_service_pb2.PreviewSegmentRequest,
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.PreviewSegmentResponse:
        dataset = parse_dataset(request.parent)
        kind = _required_kind(request.kind)
        sample_size = request.sample_size or 10
        if not 0 <= request.sample_size <= 100:
            raise invalid_argument(
                "sample_size must be from 0 to 100.",
                FieldViolation("sample_size", "must be from 0 to 100."),
            )
        preview = await self._segments.preview(
            dataset,
            kind,
            request.rule if request.HasField("rule") else None,
            request.rule_text,
            sample_size,
        )
        collection = "profiles" if kind is Kind.USER else "accounts"
        return segment_service_pb2.PreviewSegmentResponse(
            estimated_size=preview.estimated_size,
            sample_members=[f"datasets/{dataset}/{collection}/{id_}" for id_ in preview.sample],
            profiles_scanned=preview.scanned,
        )

    async def ImportSegmentMembers(  # noqa: N802
        self,
        request_iterator: AsyncIterator[segment_service_pb2.ImportSegmentMembersRequest],
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.ImportSegmentMembersResponse:
        requests = aiter(request_iterator)
        first = await _next_or_none(requests)
        if first is None:
            raise invalid_argument(
                "The upload is empty.", FieldViolation("segment", "required in the first message.")
            )
        dataset, segment_id = parse_segment(first.segment, "segment")

        async def chunks() -> AsyncIterator[Sequence[str] | bytes]:
            message: segment_service_pb2.ImportSegmentMembersRequest | None = first
            while message is not None:
                which = message.WhichOneof("chunk")
                if which == "ids":
                    yield list(message.ids.ids)
                elif which == "csv":
                    yield message.csv
                message = await _next_or_none(requests)

        result = await self._segments.import_members(dataset, segment_id, first.mode, chunks())
        return segment_service_pb2.ImportSegmentMembersResponse(
            segment=segment_message(result.segment),
            joined_count=result.joined,
            left_count=result.left,
            rejected_count=result.rejected,
        )

    async def GetSegmentStats(  # noqa: N802
        self,
        request: segment_service_pb2.GetSegmentStatsRequest,
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.GetSegmentStatsResponse:
        dataset, segment_id = parse_segment(request.name)
        days = _page_size(request.days, 30, 366, "days")
        stats = await self._segments.stats(dataset, segment_id, days)
        return segment_service_pb2.GetSegmentStatsResponse(
            size=stats.size,
            days=[
                segment_pb2.SegmentDayStats(
                    date=time.strftime("%Y-%m-%d", time.gmtime(day * 86_400)),
                    size=size,
                    joins=joins,
                    leaves=leaves,
                )
                for day, size, joins, leaves in stats.days
            ],
        )


async def _next_or_none(
    requests: AsyncIterator[segment_service_pb2.ImportSegmentMembersRequest],
) -> segment_service_pb2.ImportSegmentMembersRequest | None:
    try:
        return await anext(requests)
    except StopAsyncIteration:
        return None


def _required_kind(value: int) -> Kind:
    kind = _kind(value)
    if kind is None:
        raise invalid_argument(
            "kind is required.", FieldViolation("kind", "SEGMENT_KIND_USER or _ACCOUNT.")
        )
    return kind


class MembershipServicer(membership_service_pb2_grpc.MembershipServiceServicer):
    """Membership reads and the change stream.

    Args:
        tracer: a change logged by a traced evaluation is sent to a subscriber in a span
            of it, a child of that evaluation's span linked to the stream's; no-op by
            default.
        meter: counts the open change streams; no-op by default.
    """

    def __init__(
        self,
        memberships: Memberships,
        log: ChangeLog,
        notifier: ChangeNotifier,
        *,
        retention: timedelta,
        watch_batch: int,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._memberships = memberships
        self._log = log
        self._notifier = notifier
        self._retention = round(retention.total_seconds() * 1_000_000)
        self._watch_batch = watch_batch
        self._tracer = tracer or trace.NoOpTracer()
        self._subscribers = (meter or metrics.NoOpMeter(__name__)).create_up_down_counter(
            "audience.segment_engine.watch.subscribers",
            unit="{subscriber}",
            description="Open WatchMembershipChanges streams.",
        )

    async def ListMemberships(  # noqa: N802
        self,
        request: membership_service_pb2.ListMembershipsRequest,
        context: grpc.aio.ServicerContext,
    ) -> membership_service_pb2.ListMembershipsResponse:
        dataset, kind, subject_id = parse_member(request.parent, "parent")
        size = _page_size(request.page_size, 1000, 1000)
        response = membership_service_pb2.ListMembershipsResponse()
        if request.HasField("read_time"):
            rows = await self._memberships.at(
                dataset, kind, subject_id, _instant(request.read_time, "read_time")
            )
            after = decode_page_token(request.page_token) if request.page_token else ""
            rows = [row for row in rows if row[0] > after]
            page, more = rows[:size], len(rows) > size
        else:
            after = decode_page_token(request.page_token) if request.page_token else ""
            found = await self._memberships.of_member(
                dataset, kind, subject_id, page_size=size, after=after
            )
            cached: membership_service_pb2.ListMembershipsResponse | None = found.renders.get(
                request.parent
            )
            if cached is not None:
                return cached
            page, more = list(found.items), found.more
        member = request.parent
        for segment_id, membership in page:
            message = response.memberships.add(
                member=member,
                segment=segment_name(dataset, segment_id),
                segment_version=membership.version,
            )
            if membership.join_time:
                message.join_time.CopyFrom(timestamp(membership.join_time))
        if more and page:
            response.next_page_token = page_token(page[-1][0])
        elif not request.HasField("read_time"):
            # Kept with the cached memberships; grpc only reads it to serialize.
            found.renders[request.parent] = response
        return response

    async def CheckMembership(  # noqa: N802
        self,
        request: membership_service_pb2.CheckMembershipRequest,
        context: grpc.aio.ServicerContext,
    ) -> membership_service_pb2.CheckMembershipResponse:
        dataset, kind, subject_id = parse_member(request.member)
        segment_dataset, segment_id = parse_segment(request.segment, "segment")
        _same_dataset(dataset, segment_dataset, "segment")
        membership = await self._memberships.check(dataset, segment_id, kind, subject_id)
        response = membership_service_pb2.CheckMembershipResponse(is_member=membership is not None)
        if membership is not None:
            response.membership.CopyFrom(
                membership_message(dataset, kind, subject_id, segment_id, membership)
            )
        return response

    async def ListSegmentMembers(  # noqa: N802
        self,
        request: membership_service_pb2.ListSegmentMembersRequest,
        context: grpc.aio.ServicerContext,
    ) -> membership_service_pb2.ListSegmentMembersResponse:
        dataset, segment_id = parse_segment(request.parent, "parent")
        size = _page_size(request.page_size, 1000, 10_000)
        after = decode_page_token(request.page_token) if request.page_token else ""
        kind, rows, more = await self._memberships.members(
            dataset, segment_id, page_size=size, after=after
        )
        response = membership_service_pb2.ListSegmentMembersResponse()
        prefix = member_name(dataset, kind, "")
        segment = request.parent
        add = response.memberships.add
        for subject_id, version, join_time in rows:
            message = add(member=prefix + subject_id, segment=segment, segment_version=version)
            stamp = message.join_time
            stamp.seconds, micros = divmod(join_time, 1_000_000)
            stamp.nanos = micros * 1000
        if more and rows:
            response.next_page_token = page_token(rows[-1][0])
        return response

    async def StreamSegmentMembers(  # noqa: N802
        self,
        request: membership_service_pb2.StreamSegmentMembersRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[membership_service_pb2.StreamSegmentMembersResponse]:
        dataset, segment_id = parse_segment(request.parent, "parent")
        size = _page_size(request.chunk_size, _MAX_STREAM_CHUNK, _MAX_STREAM_CHUNK, "chunk_size")
        async with self._memberships.listing(dataset, segment_id) as listing:
            snapshot = listing.snapshot
            first = membership_service_pb2.StreamSegmentMembersResponse(
                snapshot=membership_service_pb2.SegmentMembersSnapshot(
                    resume_token=encode_token(dataset, snapshot.position, snapshot.time),
                    read_time=timestamp(snapshot.time),
                    segment_kind=segment_pb2.SegmentKind.ValueType(snapshot.kind),
                    segment_version=snapshot.version,
                    member_count=snapshot.member_count,
                )
            )
            # The snapshot rides with the first members, or alone for an empty segment.
            pending: membership_service_pb2.StreamSegmentMembersResponse | None = first
            chunks = listing.chunks(size, versions=request.include_segment_versions)
            async for chunk in chunks:
                for response in _member_responses(chunk, pending):
                    pending = None
                    yield response
            if pending is not None:
                yield pending

    async def CountSegmentMembers(  # noqa: N802
        self,
        request: membership_service_pb2.CountSegmentMembersRequest,
        context: grpc.aio.ServicerContext,
    ) -> membership_service_pb2.CountSegmentMembersResponse:
        dataset, segment_id = parse_segment(request.segment, "segment")
        count = await self._memberships.count(dataset, segment_id)
        return membership_service_pb2.CountSegmentMembersResponse(count=count)

    async def ExplainMembership(  # noqa: N802
        self,
        request: membership_service_pb2.ExplainMembershipRequest,
        context: grpc.aio.ServicerContext,
    ) -> membership_service_pb2.ExplainMembershipResponse:
        dataset, kind, subject_id = parse_member(request.member)
        segment_dataset, segment_id = parse_segment(request.segment, "segment")
        _same_dataset(dataset, segment_dataset, "segment")
        explained = await self._memberships.explain(dataset, segment_id, kind, subject_id)
        response = membership_service_pb2.ExplainMembershipResponse(
            rule_result=explained.rule_result,
            is_member=explained.is_member,
            evaluation_time=timestamp(explained.evaluation_time),
            segment_version=explained.segment_version,
        )
        if explained.explanation is not None:
            response.explanation.CopyFrom(explained.explanation)
        else:
            response.explanation.text = "member of the imported list"
            response.explanation.result = explained.is_member
            if not explained.is_member:
                response.explanation.missing = "Needs to be uploaded to the imported segment."
        return response

    async def WatchMembershipChanges(  # noqa: N802
        self,
        request: membership_service_pb2.WatchMembershipChangesRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[membership_service_pb2.WatchMembershipChangesResponse]:
        dataset = parse_dataset(request.parent)
        if len(request.segments) > _MAX_WATCH_SEGMENTS:
            raise invalid_argument(
                f"At most {_MAX_WATCH_SEGMENTS} segments.",
                FieldViolation("segments", f"at most {_MAX_WATCH_SEGMENTS}."),
            )
        segment_ids: list[str] = []
        for index, name in enumerate(request.segments):
            segment_dataset, segment_id = parse_segment(name, f"segments[{index}]")
            _same_dataset(dataset, segment_dataset, f"segments[{index}]")
            segment_ids.append(segment_id)
        _enum_or_fail(request.kind, (1, 2), "kind")
        per_response = request.max_changes_per_response
        if not 0 <= per_response <= _MAX_CHANGES_PER_RESPONSE:
            raise invalid_argument(
                f"max_changes_per_response must be from 0 to {_MAX_CHANGES_PER_RESPONSE}.",
                FieldViolation(
                    "max_changes_per_response", f"from 0 to {_MAX_CHANGES_PER_RESPONSE}."
                ),
            )
        heartbeat = 10.0
        if request.HasField("heartbeat_interval"):
            # Not through timedelta, which overflows past a few million years.
            interval = request.heartbeat_interval
            heartbeat = interval.seconds + interval.nanos / 1e9
            if not 1.0 <= heartbeat <= 600.0:
                raise invalid_argument(
                    "heartbeat_interval must be from 1 second to 10 minutes.",
                    FieldViolation("heartbeat_interval", "from 1 second to 10 minutes."),
                )
        which = request.WhichOneof("start_from")
        start = StartPoint(
            token=request.resume_token if which == "resume_token" else None,
            time=_instant(request.start_time, "start_time") if which == "start_time" else None,
        )
        stream = watch_changes(
            self._log,
            self._notifier,
            dataset,
            start,
            segments=segment_ids,
            change=ChangeKind(request.kind) if request.kind else None,
            heartbeat=heartbeat,
            retention=self._retention,
            batch=self._watch_batch,
            clock=time.monotonic,
        )
        Response = membership_service_pb2.WatchMembershipChangesResponse  # noqa: N806
        streaming = trace.get_current_span().get_span_context()
        links = [trace.Link(streaming)] if streaming.is_valid else []
        # Per dataset: which tenant holds streams open is what an operator asks of it.
        subscriber = {"audience.dataset": dataset}
        self._subscribers.add(1, subscriber)
        try:
            async for item in stream:
                if isinstance(item, Heartbeat):
                    yield Response(
                        heartbeat=membership_service_pb2.Heartbeat(
                            resume_token=item.token, time=timestamp(item.time)
                        )
                    )
                    continue
                delivered = [
                    (change, change_message(dataset, change.row, change.token)) for change in item
                ]
                for group in _batches(delivered, max(per_response, 1)):
                    messages = [message for _, message in group]
                    if per_response > 1:
                        # Added in place: a batch passed in would be copied whole again.
                        response = Response()
                        response.batch.changes.extend(messages)
                    else:
                        response = Response(change=messages[0])
                    # Not made current: the generator may be closed at the yield, in a
                    # context other than the one the spans would have been attached to.
                    spans = [
                        self._delivery_span(change, message, links)
                        for change, message in group
                        if change.row.trace_parent is not None
                    ]
                    try:
                        yield response
                    finally:
                        for span in spans:
                            span.end()
        finally:
            self._subscribers.add(-1, subscriber)

    def _delivery_span(
        self,
        change: StreamedChange,
        message: membership_pb2.MembershipChange,
        links: list[trace.Link],
    ) -> trace.Span:
        return self._tracer.start_span(
            "segment_engine deliver membership change",
            context=extract({"traceparent": change.row.trace_parent or ""}),
            kind=trace.SpanKind.PRODUCER,
            links=links,
            attributes={
                "audience.segment": message.segment,
                "audience.membership.change": change.row.change.name.lower(),
            },
        )


_Delivered = tuple[StreamedChange, membership_pb2.MembershipChange]


def _batches(
    delivered: list[_Delivered], most: int, budget: int = _BATCH_BYTES
) -> Iterator[list[_Delivered]]:
    """Runs of at most ``most`` changes and, past their first, ``budget`` bytes."""
    batch: list[_Delivered] = []
    size = 0
    for pair in delivered:
        length = pair[1].ByteSize()
        if batch and (len(batch) >= most or size + length > budget):
            yield batch
            batch = []
            size = 0
        batch.append(pair)
        size += length
    if batch:
        yield batch


def _member_responses(
    chunk: MemberChunk,
    first: membership_service_pb2.StreamSegmentMembersResponse | None,
) -> Iterator[membership_service_pb2.StreamSegmentMembersResponse]:
    """A chunk as responses (one, unless its ids are long), the first filling ``first``."""
    ids, times, versions = chunk.ids, chunk.join_times, chunk.versions
    cuts = [0, len(ids)]
    if sum(map(len, ids)) > _CHUNK_ID_CHARS:
        cuts = [0]
        chars = 0
        for index, length in enumerate(map(len, ids)):
            if chars + length > _CHUNK_ID_CHARS:
                cuts.append(index)
                chars = 0
            chars += length
        cuts.append(len(ids))
    whole = len(cuts) == 2
    for start, end in itertools.pairwise(cuts):
        response = (
            first if first is not None else membership_service_pb2.StreamSegmentMembersResponse()
        )
        first = None
        # Columns are copied in one call each; slicing only when a chunk is split.
        response.member_ids.extend(ids if whole else ids[start:end])
        response.join_time_micros.extend(times if whole else times[start:end])
        if versions is not None:
            response.segment_versions.extend(versions if whole else versions[start:end])
        yield response


def _same_dataset(dataset: str, other: str, field: str) -> None:
    if dataset != other:
        raise invalid_argument(
            f"{field} belongs to another dataset.",
            FieldViolation(field, f"must be in datasets/{dataset}."),
        )
