"""The clients of the fault test: they send events and edit segments as a careful client
would, retrying whatever the suite asks them to retry, and record what was acknowledged.

An event counts as acknowledged when ingest answered ``ACCEPTED`` or ``DUPLICATE`` for it
(a duplicate means an earlier send of the same id was durably appended). A call that
fails with a status that says "try again" (the process behind it was killed, the bus was
down, the backlog was full) is sent again with the same events, byte for byte; a call
that fails otherwise is recorded as unexpected and its events are not retried.

``INTERNAL`` and ``UNKNOWN`` count as "try again" only as gRPC reports them for a
connection torn mid-call. A service answers a call it could not serve for want of
PostgreSQL or Redis with ``UNAVAILABLE``; an ``INTERNAL`` carrying the service's own
``ErrorInfo`` is the service failing, recorded as unexpected (and retried, so the run goes
on and the rest of the verdict still means something).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2

from audience import errors
from audience.rules import format_rule, parse_rule
from audience.v1 import (
    event_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    profile_service_pb2,
    profile_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from tests.faults.workload import PARENT, Edit, PlannedEvent, SegmentSpec, segment_name

__all__ = ["Ingestor", "ProfileEditor", "SegmentEditor", "SendStats", "service_failure"]

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
_CALL_TIMEOUT = 15.0
_MAX_BACKOFF = 2.0


def service_failure(error: grpc.aio.AioRpcError) -> str | None:
    """What went wrong when the service itself failed the call (an unhandled exception,
    answered ``INTERNAL`` with the service's ``ErrorInfo``); None for any other error."""
    decoded = errors.decode(error)
    if decoded.code == grpc.StatusCode.INTERNAL and decoded.domain == errors.DOMAIN:
        return f"{decoded.code.name} ({decoded.reason}): {decoded.message}"
    return None


@dataclass
class SendStats:
    """What the clients saw."""

    acknowledged: set[str] = field(default_factory=set)
    accepted: int = 0
    duplicates_reported: int = 0
    rejected: list[str] = field(default_factory=list)
    failed_calls: Counter[str] = field(default_factory=Counter)
    resource_exhausted: int = 0
    unexpected: list[str] = field(default_factory=list)

    def record(self, results: Sequence[ingest_service_pb2.EventResult]) -> None:
        for result in results:
            if result.status == ingest_service_pb2.EVENT_STATUS_ACCEPTED:
                self.accepted += 1
                self.acknowledged.add(result.event_id)
            elif result.status == ingest_service_pb2.EVENT_STATUS_DUPLICATE:
                self.duplicates_reported += 1
                self.acknowledged.add(result.event_id)
            else:
                violations = "; ".join(f"{v.field}: {v.description}" for v in result.violations)
                self.rejected.append(f"{result.event_id}: {violations}")


async def _backoff(error: grpc.aio.AioRpcError, attempt: int) -> None:
    delay = errors.decode(error).retry_delay
    seconds = delay.total_seconds() if delay is not None else min(0.05 * 2**attempt, _MAX_BACKOFF)
    await asyncio.sleep(seconds * random.uniform(0.8, 1.2))


class Ingestor:
    """Sends events by every means ingest offers, with retries.

    Args:
        clock: the current instant in microseconds, for the events' ``sent_at``.
    """

    def __init__(
        self, channel: grpc.aio.Channel, stats: SendStats, clock: Callable[[], int]
    ) -> None:
        self._stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        self._stats = stats
        self._clock = clock

    def _failed(self, error: grpc.aio.AioRpcError, what: str) -> bool:
        """Records a failed call; whether to send it again."""
        code = error.code()
        self._stats.failed_calls[code.name] += 1
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._stats.resource_exhausted += 1
        failure = service_failure(error)
        if failure is not None:
            self._stats.unexpected.append(f"{what}: {failure}")
        if code in RETRYABLE:
            return True
        self._stats.unexpected.append(f"{what}: {code.name}: {error.details()}")
        return False

    async def send_one(self, planned: PlannedEvent) -> None:
        event = planned.stamp(self._clock())
        for attempt in range(10_000):
            try:
                reply = await self._stub.SendEvent(
                    ingest_service_pb2.SendEventRequest(parent=PARENT, event=event),
                    timeout=_CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as error:
                if not self._failed(error, f"SendEvent {event.event_id}"):
                    return
                await _backoff(error, attempt)
                continue
            self._stats.record([reply.result])
            return

    async def send_batch(self, events: Sequence[event_pb2.Event]) -> None:
        """``SendEvents``; a failed call is sent again whole."""
        request = ingest_service_pb2.SendEventsRequest(parent=PARENT, events=events)
        for attempt in range(10_000):
            try:
                reply = await self._stub.SendEvents(request, timeout=_CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                if not self._failed(error, f"SendEvents of {len(events)}"):
                    return
                await _backoff(error, attempt)
                continue
            self._stats.record(reply.results)
            return

    async def send_planned(self, planned: Sequence[PlannedEvent]) -> None:
        now = self._clock()
        await self.send_batch([p.stamp(now) for p in planned])

    async def stream(self, batches: Sequence[Sequence[PlannedEvent]]) -> None:
        """``StreamEvents``: batches whose results came back are done; after a broken
        stream the rest go on a new one."""
        now = self._clock()
        pending = [[p.stamp(now) for p in batch] for batch in batches]
        for attempt in range(10_000):
            if not pending:
                return

            async def requests(
                batches: list[list[event_pb2.Event]] = pending,
            ) -> AsyncIterator[ingest_service_pb2.StreamEventsRequest]:
                for index, batch in enumerate(batches):
                    yield ingest_service_pb2.StreamEventsRequest(
                        parent=PARENT if index == 0 else "", events=batch
                    )

            call = self._stub.StreamEvents(requests(), timeout=_CALL_TIMEOUT)
            try:
                async for reply in call:
                    self._stats.record(reply.results)
                    pending = pending[1:]
            except grpc.aio.AioRpcError as error:
                if not self._failed(error, f"StreamEvents of {len(pending)} batches"):
                    return
                await _backoff(error, attempt)
                continue
            if pending:
                self._stats.unexpected.append(f"StreamEvents ended with {len(pending)} unanswered")
                return


class _Editor:
    """Makes changes through a service's API, each retried until it has taken effect."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self.failed_calls: Counter[str] = Counter()
        self.unexpected: list[str] = []

    async def _retrying(self, what: str, attempt_once: Callable[[], Awaitable[bool]]) -> None:
        started = time.monotonic()
        for attempt in range(10_000):
            try:
                done = await attempt_once()
            except grpc.aio.AioRpcError as error:
                self.failed_calls[error.code().name] += 1
                failure = service_failure(error)
                if failure is not None:
                    self.unexpected.append(f"{what}: {failure}")
                if error.code() not in RETRYABLE:
                    self.unexpected.append(f"{what}: {error.code().name}: {error.details()}")
                    return
                await asyncio.sleep(min(0.1 * 2**attempt, _MAX_BACKOFF))
                continue
            if done:
                self._say(f"  {what} ({time.monotonic() - started:.1f} s)")
                return
        self.unexpected.append(f"{what}: gave up")


class SegmentEditor(_Editor):
    """Creates, changes and deletes segments."""

    def __init__(self, channel: grpc.aio.Channel, say: Callable[[str], None]) -> None:
        super().__init__(say)
        self._stub = segment_service_pb2_grpc.SegmentServiceStub(channel)

    async def _get(self, segment_id: str) -> segment_pb2.Segment | None:
        try:
            reply = await self._stub.GetSegment(
                segment_service_pb2.GetSegmentRequest(name=segment_name(segment_id)),
                timeout=_CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        segment: segment_pb2.Segment = reply.segment
        return segment

    async def create(self, spec: SegmentSpec) -> None:
        async def once() -> bool:
            try:
                await self._stub.CreateSegment(
                    segment_service_pb2.CreateSegmentRequest(
                        parent=PARENT,
                        segment_id=spec.segment_id,
                        segment=segment_pb2.Segment(
                            display_name=spec.segment_id,
                            kind=spec.kind,  # type: ignore[arg-type]
                            source=segment_pb2.SEGMENT_SOURCE_RULE,
                            rule_text=spec.rule_text,
                        ),
                    ),
                    timeout=_CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as error:
                # A retry of a create whose reply was lost.
                if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            return True

        await self._retrying(f"create {spec.segment_id}", once)

    async def update(self, spec: SegmentSpec) -> None:
        wanted = format_rule(parse_rule(spec.rule_text))

        async def once() -> bool:
            current = await self._get(spec.segment_id)
            if current is None:
                raise AssertionError(f"segment {spec.segment_id} vanished")
            if current.rule_text == wanted:
                return True
            try:
                await self._stub.UpdateSegment(
                    segment_service_pb2.UpdateSegmentRequest(
                        segment=segment_pb2.Segment(
                            name=current.name, etag=current.etag, rule_text=spec.rule_text
                        ),
                        update_mask=field_mask_pb2.FieldMask(paths=["rule_text"]),
                    ),
                    timeout=_CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.ABORTED:
                    raise
                return False
            return True

        await self._retrying(f"update {spec.segment_id} to v+1", once)

    async def delete(self, spec: SegmentSpec) -> None:
        async def once() -> bool:
            try:
                await self._stub.DeleteSegment(
                    segment_service_pb2.DeleteSegmentRequest(name=segment_name(spec.segment_id)),
                    timeout=_CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            return True

        await self._retrying(f"delete {spec.segment_id}", once)

    async def apply(self, edit: Edit) -> None:
        if edit.action == "create":
            await self.create(edit.spec)
        elif edit.action == "update":
            await self.update(edit.spec)
        else:
            await self.delete(edit.spec)


class ProfileEditor(_Editor):
    """Erases and merges profiles, as a privacy request or a support agent would."""

    def __init__(self, channel: grpc.aio.Channel, say: Callable[[str], None]) -> None:
        super().__init__(say)
        self._stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
        self.erased: list[str] = []
        self.merged: list[tuple[str, str]] = []

    async def erase(self, user_id: str) -> None:
        async def once() -> bool:
            try:
                await self._stub.EraseProfile(
                    profile_service_pb2.EraseProfileRequest(name=_profile(user_id)),
                    timeout=_CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as error:
                # No events of the user applied yet, or a retry of an erasure whose reply
                # was lost: either way nothing of the profile is left.
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return True
            self.erased.append(user_id)
            return True

        await self._retrying(f"erase {user_id}", once)

    async def merge(self, source: str, target: str) -> None:
        async def once() -> bool:
            try:
                await self._stub.MergeProfiles(
                    profile_service_pb2.MergeProfilesRequest(
                        target=_profile(target), sources=[_profile(source)]
                    ),
                    timeout=_CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as error:
                # Either profile not there yet, or a retry of a merge whose reply was lost
                # (the source is gone).
                if error.code() not in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    raise
                return True
            self.merged.append((source, target))
            return True

        await self._retrying(f"merge {source} into {target}", once)


def _profile(user_id: str) -> str:
    return f"{PARENT}/profiles/{user_id}"
