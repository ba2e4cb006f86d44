"""Accepting a batch of events: validate, normalise, encode, append de-duplicated, report.

Knows nothing of gRPC or Redis: it appends through an :class:`Appender` port and reads the
backpressure gauge. Events are the generated ``audience.v1.Event`` messages, used as data
(see :mod:`services.ingest.validation`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from operator import methodcaller
from typing import Protocol, cast

from opentelemetry import metrics

from audience import errors
from audience.streams import partition_of
from audience.telemetry import inject
from audience.v1 import event_pb2
from services.ingest.appender import Appended, PartitionBatch
from services.ingest.records import DatasetRecords, EventFields, receipt_fields
from services.ingest.validation import MAX_STRING_BYTES, Validator, Violation
from services.ingest.wire import event_encodings

__all__ = [
    "BatchResult",
    "Capacity",
    "EventStatus",
    "Ingestor",
    "PreparedBatch",
    "Sink",
    "parse_parent",
]

_DATASET = re.compile(r"[a-z0-9-]{1,63}")
_ENCODE = methodcaller("SerializeToString")
# Bounds the per-process caches of partitions and encoders by key and dataset.
_CACHE_LIMIT = 100_000


class EventStatus(IntEnum):
    """What happened to an event; the values are those of ``audience.v1.EventStatus``."""

    ACCEPTED = 1
    DUPLICATE = 2
    REJECTED = 3


@dataclass(slots=True)
class BatchResult:
    """The outcome of one batch.

    Attributes:
        event_ids: each event's id, in order.
        statuses: one per event, in order.
        violations: what was wrong with each rejected event, by index; paths are relative
            to the event.
    """

    event_ids: Sequence[str]
    statuses: list[EventStatus]
    violations: dict[int, list[Violation]]
    accepted: int
    duplicates: int

    @property
    def rejected(self) -> int:
        return len(self.violations)


@dataclass(slots=True)
class PreparedBatch:
    """A validated and encoded batch, ready to append."""

    event_ids: Sequence[str]
    statuses: list[EventStatus]
    violations: dict[int, list[Violation]]
    batches: list[PartitionBatch]
    headers_json: str


def _headers_json() -> str:
    """The trace context of the current span, as the bus entry's headers."""
    headers = inject()
    return json.dumps(headers, separators=(",", ":")) if headers else ""


class Sink(Protocol):
    """Where accepted events go (the bus, through the append script)."""

    async def append(
        self, batches: Sequence[PartitionBatch], headers_json: str
    ) -> list[Appended]: ...


class Capacity(Protocol):
    """Backpressure: raises ``RESOURCE_EXHAUSTED`` when the pipeline is too far behind."""

    def check(self) -> None: ...


def parse_parent(parent: str, field: str = "parent") -> str:
    """Returns the dataset id of ``datasets/{dataset}``.

    Raises:
        AudienceError: ``INVALID_ARGUMENT`` naming ``field``.
    """
    prefix, _, dataset = parent.partition("/")
    if prefix != "datasets" or not _DATASET.fullmatch(dataset):
        raise errors.invalid_argument(
            f"{field} must be datasets/{{dataset}}, got {parent[:100]!r}.",
            errors.FieldViolation(
                field,
                "Must be datasets/{dataset}, the dataset id 1–63 characters of lower-case "
                "letters, digits and '-'.",
            ),
            reason="INVALID_PARENT",
        )
    return dataset


class Ingestor:
    """Accepts batches of events into the bus.

    Args:
        sink: appends de-duplicated partition batches.
        capacity: refuses work while the pipeline is too far behind.
        partitions: the bus's partition count.
        clock: the receipt time, in nanoseconds since the epoch.
        meter: counts the events by outcome; OpenTelemetry's no-op meter by default.
    """

    def __init__(
        self,
        sink: Sink,
        capacity: Capacity,
        *,
        partitions: int,
        clock: Callable[[], int] = time.time_ns,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._sink = sink
        self._capacity = capacity
        self._partitions = partitions
        self._clock = clock
        self._validator = Validator()
        self._fields = EventFields()
        self._partition_cache: dict[str, int] = {}
        self._records: dict[str, DatasetRecords] = {}
        events = (meter or metrics.NoOpMeter(__name__)).create_counter(
            "audience.ingest.events",
            unit="{event}",
            description="Events received by ingest, by outcome (accepted, duplicate, rejected).",
        )
        self._count = events.add
        self._attributes = {status: {"status": status.name.lower()} for status in EventStatus}

    def check_capacity(self) -> None:
        """Raises ``RESOURCE_EXHAUSTED`` when the pipeline is too far behind."""
        self._capacity.check()

    async def ingest(
        self, dataset: str, events: Sequence[event_pb2.Event], encoded: bytes | None = None
    ) -> BatchResult:
        """Validates, normalises and appends events; returns each one's status, in order.

        Events that need the full check are normalised in place. Returns only once every
        accepted event is on the bus.

        Args:
            dataset: the dataset the events go to.
            events: the events.
            encoded: the request holding them, as it came (see :meth:`prepare`).

        Raises:
            AudienceError: ``RESOURCE_EXHAUSTED`` under backpressure (nothing appended);
                ``UNAVAILABLE`` when the bus cannot be reached.
        """
        return await self.append(self.prepare(dataset, events, encoded))

    def prepare(
        self, dataset: str, events: Sequence[event_pb2.Event], encoded: bytes | None = None
    ) -> PreparedBatch:
        """Validates, normalises and encodes a batch: the part of :meth:`ingest` before
        the append, for callers that prepare a batch while an earlier one is appended.

        Args:
            dataset: the dataset the events go to.
            events: the events.
            encoded: the request holding them as field 2, as it came, if the caller has
                it (``SendEventsRequest``, ``StreamEventsRequest``): each event's own
                encoding is then read from it instead of encoding each event anew.

        Raises:
            AudienceError: ``RESOURCE_EXHAUSTED`` under backpressure.
        """
        self._capacity.check()
        received_ns = self._clock()
        encodings = event_encodings(encoded) if encoded is not None else []
        if len(encodings) != len(events):
            # No request, or one whose field 2 is a single event written more than once.
            encodings = list(map(_ENCODE, events))
        checked = self._validator.check_batch(events, encodings, received_ns)
        violations = checked.violations
        check_encoded = self._validator.check_encoded
        for index in sorted(checked.rewritten):
            encoding = events[index].SerializeToString()
            if len(encoding) > MAX_STRING_BYTES:
                problems = check_encoded(events[index], len(encoding))
                if problems is not None:
                    violations[index] = problems
                    continue
            encodings[index] = encoding
        statuses = [EventStatus.ACCEPTED] * len(events)
        for index in violations:
            statuses[index] = EventStatus.REJECTED
        # Whole columns at a time, the valid events' only.
        keys, names, seconds, nanos = checked.keys, checked.names, checked.seconds, checked.nanos
        valid: Sequence[int] = range(len(events))
        if violations:
            valid = [i for i in valid if i not in violations]
            encodings = list(map(encodings.__getitem__, valid))
            keys = list(map(keys.__getitem__, valid))
            names = list(map(names.__getitem__, valid))
            seconds = list(map(seconds.__getitem__, valid))
            nanos = list(map(nanos.__getitem__, valid))
        fields = self._fields
        records = self._dataset_records(dataset).records(
            encodings,
            (fields.names(names), fields.timestamps(seconds, nanos)),
            receipt_fields(received_ns, timestamp=False),
        )
        cached = list(map(self._partition_cache.get, keys))
        partitions = (
            [
                self._partition(key) if partition is None else partition
                for partition, key in zip(cached, keys, strict=True)
            ]
            if None in cached
            else cast("list[int]", cached)
        )
        grouped: dict[int, list[int]] = {}
        for position, partition in enumerate(partitions):
            group = grouped.get(partition)
            if group is None:
                grouped[partition] = [position]
            else:
                group.append(position)
        event_ids = checked.event_ids
        batches = []
        for partition, positions in grouped.items():
            indexes = list(map(valid.__getitem__, positions))
            batches.append(
                PartitionBatch(
                    partition,
                    dataset,
                    list(map(event_ids.__getitem__, indexes)),
                    list(map(records.__getitem__, positions)),
                    indexes,
                )
            )
        return PreparedBatch(event_ids, statuses, violations, batches, _headers_json())

    async def append(self, prepared: PreparedBatch) -> BatchResult:
        """Appends a prepared batch; returns each event's status, in order.

        Raises:
            AudienceError: ``UNAVAILABLE`` when the bus cannot be reached.
        """
        statuses, violations = prepared.statuses, prepared.violations
        duplicates = 0
        if prepared.batches:
            ordered = prepared.batches
            appended = await self._sink.append(ordered, prepared.headers_json)
            for batch, outcome in zip(ordered, appended, strict=True):
                positions = batch.positions
                for duplicate in outcome.duplicates:
                    statuses[positions[duplicate]] = EventStatus.DUPLICATE
                duplicates += len(outcome.duplicates)
        accepted = len(prepared.event_ids) - duplicates - len(violations)
        count = self._count
        attributes = self._attributes
        if accepted:
            count(accepted, attributes[EventStatus.ACCEPTED])
        if duplicates:
            count(duplicates, attributes[EventStatus.DUPLICATE])
        if violations:
            count(len(violations), attributes[EventStatus.REJECTED])
        return BatchResult(prepared.event_ids, statuses, violations, accepted, duplicates)

    def _partition(self, key: str) -> int:
        cache = self._partition_cache
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        partition = cache[key] = partition_of(key, self._partitions)
        return partition

    def _dataset_records(self, dataset: str) -> DatasetRecords:
        records = self._records.get(dataset)
        if records is None:
            if len(self._records) >= _CACHE_LIMIT:
                self._records.clear()
            records = self._records[dataset] = DatasetRecords(dataset)
        return records
