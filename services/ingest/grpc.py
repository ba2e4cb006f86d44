"""``audience.v1.IngestService``: translates between the protos and the ingest domain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from datetime import datetime
from types import MethodType
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from audience import errors
from audience.v1 import (
    common_pb2,
    event_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    profile_pb2,
)
from services.ingest.failed import FailedEvents, failed_event_name
from services.ingest.ingestor import BatchResult, Ingestor, PreparedBatch, parse_parent
from services.ingest.store import FailedEventRow
from services.ingest.validation import Violation

__all__ = ["MAX_BATCH_EVENTS", "IngestServicer", "add_to_server"]

MAX_BATCH_EVENTS = 1000

# The longest id whose result's length (the id's, plus 4 bytes) takes one byte.
_MAX_SHORT_ID = 0x7F - 4

_StreamItem = asyncio.Future[ingest_service_pb2.StreamEventsResponse] | Exception | None

_M = TypeVar("_M", bound=Message)

# The last request a call's task parsed, with the bytes it was parsed from (see
# add_to_server).
_request_bytes: ContextVar[tuple[Message, bytes] | None] = ContextVar(
    "ingest_request_bytes", default=None
)

# The requests whose events are read from their encoding (Ingestor.prepare).
_KEEP_BYTES = frozenset({"SendEvents", "StreamEvents"})


def _parse_keeping_bytes(message_class: type[_M], data: bytes) -> _M:
    request = message_class.FromString(data)
    _request_bytes.set((request, data))
    return request


def _encoded(request: Message) -> bytes:
    """The bytes ``request`` was parsed from; encoded again if they were not kept."""
    kept = _request_bytes.get()
    if kept is not None and kept[0] is request:
        return kept[1]
    return request.SerializeToString()


def add_to_server(servicer: IngestServicer, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` as ``add_IngestServiceServicer_to_server`` does, except that
    the event batches' request bytes are kept for it.

    Ingest reads each event's encoding from its request's, and would otherwise encode a
    request it has just parsed again (about 5% of its CPU). The deserializer stays a parser
    bound to the request's class, as ``FromString`` is (the error interceptor answers bytes
    that do not parse with the field at fault, and the authentication interceptor reads the
    resource names of the real message), and passes the bytes on in a context variable: the
    call's task parses its request and then runs its handler, which takes the bytes only if
    they are those of the very request object it was given.
    """
    service = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        if method.client_streaming and method.server_streaming:
            factory = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming:
            factory = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            factory = grpc.unary_stream_rpc_method_handler
        else:
            factory = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=(
                MethodType(_parse_keeping_bytes, request_class)
                if method.name in _KEEP_BYTES
                else request_class.FromString
            ),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _check_count(count: int) -> None:
    if not 0 < count <= MAX_BATCH_EVENTS:
        raise errors.invalid_argument(
            f"A batch holds 1 to {MAX_BATCH_EVENTS:,} events, got {count:,}.",
            errors.FieldViolation("events", f"Must hold 1 to {MAX_BATCH_EVENTS:,} events."),
            reason="BATCH_SIZE",
        )


def _path(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if field else prefix


def _results(result: BatchResult) -> bytes:
    """The ``results`` of a batch's response (field 1 of both responses), encoded.

    Built as bytes rather than as a message per event, which the response's generated
    class then parses: a thousandth of a call's time per result otherwise.
    """
    event_ids, statuses, violations = result.event_ids, result.statuses, result.violations
    if statuses and not violations and statuses.count(statuses[0]) == len(statuses):
        sizes = set(map(len, event_ids))
        size = sizes.pop()
        if not sizes and size <= _MAX_SHORT_ID and "".join(event_ids).isascii():
            # Results alike but for the id, each id as long: one join for the lot.
            head = "\x0a" + chr(size + 4) + "\x0a" + chr(size)
            tail = "\x10" + chr(statuses[0])
            return (head + (tail + head).join(event_ids) + tail).encode("latin-1")
    return b"".join(
        _result(event_id, statuses[index], violations.get(index), index).SerializeToString()
        for index, event_id in enumerate(event_ids)
    )


def _result(
    event_id: str, status: int, violations: Sequence[Violation] | None, index: int
) -> ingest_service_pb2.SendEventsResponse:
    # One result as a response holding it: its encoding is the result's as field 1.
    response = ingest_service_pb2.SendEventsResponse()
    added = response.results.add(
        event_id=event_id, status=ingest_service_pb2.EventStatus.ValueType(status)
    )
    if violations:
        added.violations.extend(
            common_pb2.FieldViolation(
                field=_path(f"events[{index}]", v.field),
                description=v.description,
                reason=v.reason,
            )
            for v in violations
        )
    return response


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


def _failed_event(row: FailedEventRow) -> profile_pb2.FailedEvent:
    failed = profile_pb2.FailedEvent(
        name=failed_event_name(row),
        event=event_pb2.Event.FromString(row.event),
        stage=row.stage,
        reason=row.reason,
        message=row.message,
        fail_time=_timestamp(row.fail_time),
        replay_count=row.replay_count,
    )
    if row.replay_time is not None:
        failed.replay_time.CopyFrom(_timestamp(row.replay_time))
    return failed


def _invalid_event(violations: Sequence[Violation]) -> errors.AudienceError:
    return errors.invalid_argument(
        "The event is invalid: "
        + "; ".join(f"{_path('event', v.field)}: {v.description}" for v in violations[:3]),
        *(errors.FieldViolation(_path("event", v.field), v.description) for v in violations),
        reason="INVALID_EVENT",
        metadata={"reasons": ",".join(sorted({v.reason for v in violations}))},
    )


class IngestServicer(ingest_service_pb2_grpc.IngestServiceServicer):
    """The gRPC face of ingest.

    Args:
        ingestor: accepts batches.
        failed: lists and replays failed events.
        stream_depth: how many batches of one ``StreamEvents`` call are in flight at once.
    """

    def __init__(self, ingestor: Ingestor, failed: FailedEvents, *, stream_depth: int) -> None:
        self._ingestor = ingestor
        self._failed = failed
        self._stream_depth = stream_depth

    async def SendEvent(  # noqa: N802 (gRPC's name)
        self,
        request: ingest_service_pb2.SendEventRequest,
        context: grpc.aio.ServicerContext,
    ) -> ingest_service_pb2.SendEventResponse:
        dataset = parse_parent(request.parent)
        if not request.HasField("event"):
            raise errors.invalid_argument(
                "event is required.", errors.FieldViolation("event", "Required.")
            )
        result = await self._ingestor.ingest(dataset, [request.event])
        if result.violations:
            raise _invalid_event(result.violations[0])
        return ingest_service_pb2.SendEventResponse(
            result=ingest_service_pb2.EventResult(
                event_id=request.event.event_id,
                status=ingest_service_pb2.EventStatus.ValueType(result.statuses[0]),
            )
        )

    async def SendEvents(  # noqa: N802
        self,
        request: ingest_service_pb2.SendEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> ingest_service_pb2.SendEventsResponse:
        dataset = parse_parent(request.parent)
        events = request.events
        _check_count(len(events))
        result = await self._ingestor.ingest(dataset, events, _encoded(request))
        response = ingest_service_pb2.SendEventsResponse.FromString(_results(result))
        response.accepted_count = result.accepted
        response.duplicate_count = result.duplicates
        response.rejected_count = result.rejected
        return response

    async def StreamEvents(  # noqa: N802
        self,
        request_iterator: AsyncIterator[ingest_service_pb2.StreamEventsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_service_pb2.StreamEventsResponse]:
        # A reader task takes batches off the stream and prepares them (validation and
        # encoding) while earlier ones are appended, at most `stream_depth` ahead of the
        # batch whose results are being sent, so the stream's memory stays bounded. The
        # appends themselves run one after the other: a profile's events reach the bus in
        # the order the stream sent them, and the first of two copies of an event is the
        # one accepted.
        queue: asyncio.Queue[_StreamItem] = asyncio.Queue(self._stream_depth)
        reader = asyncio.create_task(self._read_stream(request_iterator, queue))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield await item
        finally:
            reader.cancel()
            while not queue.empty():
                left = queue.get_nowait()
                if isinstance(left, asyncio.Future):
                    left.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterator[ingest_service_pb2.StreamEventsRequest],
        queue: asyncio.Queue[_StreamItem],
    ) -> None:
        dataset: str | None = None
        previous: asyncio.Future[ingest_service_pb2.StreamEventsResponse] | None = None
        try:
            async for request in requests:
                if request.parent:
                    named = parse_parent(request.parent)
                    if dataset is not None and named != dataset:
                        raise errors.invalid_argument(
                            "A stream sends to one dataset.",
                            errors.FieldViolation(
                                "parent", f"Must be datasets/{dataset} or empty, as first sent."
                            ),
                        )
                    dataset = named
                elif dataset is None:
                    raise errors.invalid_argument(
                        "The first message of a stream names the dataset.",
                        errors.FieldViolation("parent", "Required on the first message."),
                    )
                events = request.events
                _check_count(len(events))
                prepared = self._ingestor.prepare(dataset, events, _encoded(request))
                previous = asyncio.ensure_future(self._append_after(previous, prepared))
                await queue.put(previous)
        except Exception as error:
            await queue.put(error)
        else:
            await queue.put(None)

    async def _append_after(
        self,
        previous: asyncio.Future[ingest_service_pb2.StreamEventsResponse] | None,
        prepared: PreparedBatch,
    ) -> ingest_service_pb2.StreamEventsResponse:
        if previous is not None:
            # An earlier batch that failed ends the stream with its error; this one is
            # then never appended.
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                raise asyncio.CancelledError
        result = await self._ingestor.append(prepared)
        return ingest_service_pb2.StreamEventsResponse.FromString(_results(result))

    async def ListFailedEvents(  # noqa: N802
        self,
        request: ingest_service_pb2.ListFailedEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> ingest_service_pb2.ListFailedEventsResponse:
        dataset = parse_parent(request.parent)
        page = await self._failed.page(
            dataset,
            page_size=request.page_size,
            page_token=request.page_token,
            reason=request.reason,
        )
        return ingest_service_pb2.ListFailedEventsResponse(
            failed_events=[_failed_event(row) for row in page.rows],
            next_page_token=page.next_page_token,
        )

    async def ReplayFailedEvents(  # noqa: N802
        self,
        request: ingest_service_pb2.ReplayFailedEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> ingest_service_pb2.ReplayFailedEventsResponse:
        dataset = parse_parent(request.parent)
        replayed = await self._failed.replay(dataset, names=request.names, reason=request.reason)
        return ingest_service_pb2.ReplayFailedEventsResponse(replayed_count=replayed)
