"""A subscriber of the membership change stream that the fault test drops and resumes.

It watches every segment of the dataset from before the first segment exists, keeps every
change in arrival order, and after any interruption (its own stream dropped on purpose, the
segment engine killed, PostgreSQL gone) watches again from the last token it received, of
a change or of a heartbeat, as the API tells a subscriber to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import grpc.aio
from google.protobuf import duration_pb2, timestamp_pb2

from audience.rules import micros_from_timestamp
from audience.v1 import membership_pb2, membership_service_pb2, membership_service_pb2_grpc
from tests.faults.driver import service_failure
from tests.faults.workload import PARENT

__all__ = ["SeenChange", "Subscriber"]

_JOIN = membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN


@dataclass(frozen=True, slots=True)
class SeenChange:
    member: str
    segment: str
    join: bool
    sequence: int
    version: int
    cause: int
    time: int


@dataclass
class Subscriber:
    channel: grpc.aio.Channel
    start_time: int
    """Microseconds; the first watch starts there, later ones from the last token."""
    changes: list[SeenChange] = field(default_factory=list)
    token: str | None = None
    heartbeat_time: int = 0
    """The time of the last heartbeat: every change up to it has been delivered."""
    opened: int = 0
    drops: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    _call: grpc.aio.UnaryStreamCall | None = None
    _heartbeat: asyncio.Condition = field(default_factory=asyncio.Condition)

    def drop(self) -> None:
        """Cancels the current stream; the subscriber watches again from its last token."""
        if self._call is not None and not self._call.done():
            self.drops += 1
            self._call.cancel()

    def _request(self) -> membership_service_pb2.WatchMembershipChangesRequest:
        request = membership_service_pb2.WatchMembershipChangesRequest(
            parent=PARENT,
            heartbeat_interval=duration_pb2.Duration(seconds=1),
            # Every other stream in batches, so drops land mid-batch as well as between
            # single changes.
            max_changes_per_response=50 if self.opened % 2 else 0,
        )
        if self.token is None:
            start = timestamp_pb2.Timestamp()
            start.seconds, rest = divmod(self.start_time, 1_000_000)
            start.nanos = rest * 1000
            request.start_time.CopyFrom(start)
        else:
            request.resume_token = self.token
        return request

    async def run(self) -> None:
        stub = membership_service_pb2_grpc.MembershipServiceStub(self.channel)
        backoff = 0.05
        while True:
            call = stub.WatchMembershipChanges(self._request())
            self._call = call
            self.opened += 1
            try:
                async for reply in call:
                    backoff = 0.05
                    await self._received(reply)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                self.errors[code.name] += 1
                failure = service_failure(error)
                if failure is not None:
                    self.unexpected.append(failure)
                if code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT):
                    self.unexpected.append(f"{code.name}: {error.details()}")
                    return
            except asyncio.CancelledError:
                # Our own drop cancels the call, not this task: tell the two apart.
                if not call.cancelled() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
            self._call = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _received(self, reply: membership_service_pb2.WatchMembershipChangesResponse) -> None:
        which = reply.WhichOneof("message")
        changes = [reply.change] if which == "change" else reply.batch.changes
        for change in changes:
            self.token = change.resume_token
            self.changes.append(
                SeenChange(
                    member=change.member,
                    segment=change.segment,
                    join=change.kind == _JOIN,
                    sequence=change.member_sequence,
                    version=change.segment_version,
                    cause=change.reason.cause,
                    time=micros_from_timestamp(change.change_time),
                )
            )
        if which == "heartbeat":
            self.token = reply.heartbeat.resume_token
            async with self._heartbeat:
                self.heartbeat_time = micros_from_timestamp(reply.heartbeat.time)
                self._heartbeat.notify_all()

    async def caught_up(self, instant: int, within: float) -> bool:
        """Waits for a heartbeat at or after ``instant`` (µs): every change before it is in."""
        deadline = time.monotonic() + within
        async with self._heartbeat:
            while self.heartbeat_time < instant:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._heartbeat.wait(), remaining)
        return True
