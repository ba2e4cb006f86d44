"""The bus side of the profile service: events in, profile changes and failures out.

A worker reads ``events`` as a member of group ``profile``, applies what it read in units
(:class:`~services.profile.applier.Applier`), publishes the changes of each unit on
``profile-changes`` after its commit, and acknowledges the entries once everything read
was applied or set aside.

An event that cannot be applied (it raises while being applied) must not hold up its
partition or the rest of its batch: the unit is retried per person (the events sharing a
user or anonymous id), then per event, and the event that still fails is published on
``failed-events`` with stage ``profile`` for ingest to keep and replay. Failures of the
infrastructure (PostgreSQL or Redis unreachable, a connection lost) are not the event's
fault: the worker waits and tries the same entries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NoReturn

import asyncpg
from google.protobuf.message import DecodeError
from opentelemetry import trace
from redis.exceptions import RedisError

from audience.bus.v1 import events_pb2
from audience.rules.values import timestamp_from_micros
from audience.streams import Bus, Consumer, Delivery, Message, run_to_end
from audience.telemetry import consumer_span, inject
from audience.v1 import profile_pb2
from services.profile.applier import Applier, ContentionError, Incoming, Published
from services.profile.codec import change_batch

__all__ = [
    "EVENTS",
    "FAILED_EVENTS",
    "GROUP",
    "PROFILE_CHANGES",
    "EventWorker",
    "Publisher",
    "declare_topics",
    "is_infrastructure",
]

_log = logging.getLogger(__name__)

EVENTS = "events"
GROUP = "profile"
PROFILE_CHANGES = "profile-changes"
PROFILE_CHANGES_GROUPS = ("segment_engine",)
FAILED_EVENTS = "failed-events"
FAILED_EVENTS_GROUPS = ("ingest",)
STAGE = "profile"
# Changes per bus entry: entries stay well under a megabyte with full views.
_CHANGES_PER_ENTRY = 500
# The first unit after an idle spell; each next one is twice as large, up to unit_events.
_FIRST_UNIT_EVENTS = 256
_MAX_BACKOFF = 30.0

# SQLSTATE classes that say the server or the connection is in trouble, not the data.
_INFRASTRUCTURE_CLASSES = frozenset({"08", "53", "57", "58", "XX"})


async def declare_topics(bus: Bus) -> None:
    """Declares what the service reads and, with their consumers' groups, what it writes."""
    await bus.declare(EVENTS, [GROUP])
    await bus.declare(PROFILE_CHANGES, PROFILE_CHANGES_GROUPS)
    await bus.declare(FAILED_EVENTS, FAILED_EVENTS_GROUPS)


def is_infrastructure(error: BaseException) -> bool:
    """Whether an error is the infrastructure's (retry later) rather than the event's."""
    if isinstance(error, OSError | TimeoutError | RedisError | ContentionError):
        return True
    if isinstance(error, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return True
    if isinstance(error, asyncpg.PostgresError):
        state = getattr(error, "sqlstate", None) or ""
        return state[:2] in _INFRASTRUCTURE_CLASSES
    return False


class Publisher:
    """Publishes profile changes and failed events, one entry per partition and chunk."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def changes(self, published: Sequence[Published]) -> None:
        if not published:
            return
        by_partition: defaultdict[int, list[bytes]] = defaultdict(list)
        for item in published:
            by_partition[self.bus.partition_of(item.key)].append(item.change)
        headers = inject()
        messages = [
            Message(
                PROFILE_CHANGES,
                partition,
                change_batch(changes[start : start + _CHANGES_PER_ENTRY]),
                headers,
            )
            for partition, changes in sorted(by_partition.items())
            for start in range(0, len(changes), _CHANGES_PER_ENTRY)
        ]
        await self.bus.publish_batch(messages)

    async def failures(self, records: Sequence[events_pb2.FailedEventRecord]) -> None:
        if not records:
            return
        by_partition: defaultdict[int, list[events_pb2.FailedEventRecord]] = defaultdict(list)
        for record in records:
            key = f"{record.event.dataset}/{record.event.event.event_id}"
            by_partition[self.bus.partition_of(key)].append(record)
        headers = inject()
        await self.bus.publish_batch(
            Message(
                FAILED_EVENTS,
                partition,
                events_pb2.FailedEventBatch(failures=batch).SerializeToString(),
                headers,
            )
            for partition, batch in sorted(by_partition.items())
        )


@dataclass(frozen=True, slots=True)
class _Item:
    ingested: events_pb2.IngestedEvent
    incoming: Incoming

    @property
    def person(self) -> tuple[str, str]:
        event = self.incoming.event
        return (self.incoming.dataset, event.user_id or event.anonymous_id or event.account_id)


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncpg.PostgresError):
        return "STORE_REJECTED"
    if isinstance(error, ValueError):
        return "INVALID_EVENT"
    return "APPLY_FAILED"


class EventWorker:
    """One worker of the ``profile`` group: reads, applies, publishes, acknowledges.

    Each read is handled in a span of ``tracer`` (no-op by default) in the trace of the
    ingest call that appended its first entry; the changes it publishes carry that span.
    """

    def __init__(
        self,
        applier: Applier,
        publisher: Publisher,
        consumer: Consumer,
        *,
        unit_events: int,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.applier = applier
        self.publisher = publisher
        self.consumer = consumer
        self.unit_events = unit_events
        self._unit_size = min(_FIRST_UNIT_EVENTS, unit_events)
        self.tracer = tracer or trace.NoOpTracer()
        self.applied = 0
        self.failed = 0

    @classmethod
    def for_partitions(
        cls,
        applier: Applier,
        publisher: Publisher,
        *,
        name: str,
        partitions: Collection[int],
        read_count: int,
        unit_events: int,
        claim_idle: float,
        block: float = 2.0,
        tracer: trace.Tracer | None = None,
    ) -> EventWorker:
        consumer = publisher.bus.consumer(
            EVENTS,
            GROUP,
            name,
            partitions=partitions,
            count=read_count,
            block=block,
            claim_idle=claim_idle,
            claim_interval=min(10.0, claim_idle),
        )
        return cls(applier, publisher, consumer, unit_events=unit_events, tracer=tracer)

    async def run(self) -> NoReturn:
        """Works until cancelled, waiting out infrastructure failures; cancelled, it
        first finishes handling what it read (:func:`~audience.streams.run_to_end`)."""
        backoff = 0.0
        while True:
            try:
                deliveries = await self.consumer.read()
                if deliveries:
                    await run_to_end(self.handle(deliveries))
                else:
                    self._unit_size = min(_FIRST_UNIT_EVENTS, self.unit_events)
                backoff = 0.0
            except Exception as error:
                if not is_infrastructure(error):
                    raise
                backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                _log.warning(
                    "profile worker %s: %s: %s; retrying in %.1fs",
                    self.consumer.name,
                    type(error).__name__,
                    error,
                    backoff,
                )
                await asyncio.sleep(backoff)

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Applies what was read, publishes it, then acknowledges it.

        Raises:
            Exception: an infrastructure failure; nothing read has been acknowledged, and
                calling again with the same deliveries is safe.
        """
        items: list[_Item] = []
        for delivery in deliveries:
            try:
                batch = events_pb2.EventBatch.FromString(delivery.payload)
            except DecodeError:
                # Not an event batch at all: nothing in it can be kept as a failed event.
                _log.error(
                    "dropping entry %s of %s partition %d: not an EventBatch",
                    delivery.entry_id,
                    delivery.topic,
                    delivery.partition,
                )
                continue
            items.extend(_Item(one, Incoming(one.dataset, one.event)) for one in batch.events)
        headers = deliveries[0].headers
        with consumer_span(
            "profile apply events",
            headers,
            tracer=self.tracer,
            linked=[delivery.headers for delivery in deliveries[1:]],
            attributes={
                "messaging.destination.name": EVENTS,
                "messaging.batch.message_count": len(deliveries),
            },
        ):
            # Units grow from small after an idle spell (see `_FIRST_UNIT_EVENTS`): the
            # first events of a burst are published, and reach the segment engine, after a
            # small unit rather than after the largest; a backlog still gets large units,
            # which cost less per event.
            start = 0
            while start < len(items):
                size = self._unit_size
                unit = items[start : start + size]
                start += size
                changes, failures = await self._apply(unit, split=True)
                await self.publisher.changes(changes)
                await self.publisher.failures(failures)
                self.failed += len(failures)
                self._unit_size = min(self.unit_events, size * 2)
        await self.consumer.ack(deliveries)

    async def _apply(
        self, items: Sequence[_Item], *, split: bool
    ) -> tuple[list[Published], list[events_pb2.FailedEventRecord]]:
        try:
            applied = await self.applier.apply([item.incoming for item in items])
        except Exception as error:
            if is_infrastructure(error):
                raise
            if len(items) == 1:
                _log.warning(
                    "event %s of dataset %s cannot be applied: %s: %s",
                    items[0].incoming.event.event_id,
                    items[0].incoming.dataset,
                    type(error).__name__,
                    error,
                )
                return [], [self._failure(items[0], error)]
            groups: dict[tuple[str, str], list[_Item]] = {}
            for item in items:
                groups.setdefault(item.person, []).append(item)
            parts = list(groups.values()) if split and len(groups) > 1 else [[i] for i in items]
            changes: list[Published] = []
            failures: list[events_pb2.FailedEventRecord] = []
            for part in parts:
                more, failed = await self._apply(part, split=False)
                changes.extend(more)
                failures.extend(failed)
            return changes, failures
        self.applied += applied.applied
        return applied.changes, []

    def _failure(self, item: _Item, error: BaseException) -> events_pb2.FailedEventRecord:
        message = f"{type(error).__name__}: {error}"
        return events_pb2.FailedEventRecord(
            event=item.ingested,
            failure=profile_pb2.FailedEvent(
                stage=STAGE,
                reason=_reason(error),
                message=message[:1000],
                fail_time=timestamp_from_micros(int(time.time() * 1_000_000)),
            ),
        )
