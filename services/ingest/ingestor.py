"""Accepting a batch of events: validate, normalise, encode, append de-duplicated, report.

Knows nothing of gRPC or Redis: it appends through an :class:`Appender` port and reads the
backpressure gauge. Events are the generated ``audience.v1.Event`` messages, used as data
(see :mod:`services.ingest.validation`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from opentelemetry import metrics

from audience import errors
from audience.streams import partition_of
from audience.telemetry import inject
from audience.v1 import event_pb2
from services.ingest.appender import Appended, PartitionBatch, dedup_prefix
from services.ingest.records import DatasetRecords, receipt_fields
from services.ingest.validation import MAX_STRING_BYTES, Validator, Violation

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
        statuses: one per event, in order.
        violations: what was wrong with each rejected event, by index; paths are relative
            to the event.
    """

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

    size: int
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

    def stream_key(self, partition: int) -> str: ...

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
    """

    def __init__(self, sink: Sink, capacity: Capacity, *, partitions: int) -> None:
        self._sink = sink
        self._capacity = capacity
        self._partitions = partitions
        self._validator = Validator()
        self._partition_cache: dict[str, int] = {}
        self._records: dict[str, DatasetRecords] = {}
        self._dedup_prefixes: dict[tuple[str, int], str] = {}
        meter = metrics.get_meter("services.ingest")
        events = meter.create_counter(
            "audience.ingest.events",
            unit="{event}",
            description="Events received by ingest, by outcome (accepted, duplicate, rejected).",
        )
        self._count = events.add
        self._attributes = {status: {"status": status.name.lower()} for status in EventStatus}

    def check_capacity(self) -> None:
        """Raises ``RESOURCE_EXHAUSTED`` when the pipeline is too far behind."""
        self._capacity.check()

    async def ingest(self, dataset: str, events: Sequence[event_pb2.Event]) -> BatchResult:
        """Validates, normalises and appends events; returns each one's status, in order.

        The events are normalised in place. Returns only once every accepted event is on
        the bus.

        Raises:
            AudienceError: ``RESOURCE_EXHAUSTED`` under backpressure (nothing appended);
                ``UNAVAILABLE`` when the bus cannot be reached.
        """
        return await self.append(self.prepare(dataset, events))

    def prepare(self, dataset: str, events: Sequence[event_pb2.Event]) -> PreparedBatch:
        """Validates, normalises and encodes a batch: the part of :meth:`ingest` before
        the append, for callers that prepare a batch while an earlier one is appended.

        Raises:
            AudienceError: ``RESOURCE_EXHAUSTED`` under backpressure.
        """
        self._capacity.check()
        received_ns = time.time_ns()
        received = receipt_fields(received_ns, timestamp=False)
        received_as_time = receipt_fields(received_ns, timestamp=True)
        check = self._validator.check
        check_encoded = self._validator.check_encoded
        record = self._dataset_records(dataset).record
        partition_of_key = self._partition_cache.get
        statuses = [EventStatus.ACCEPTED] * len(events)
        violations: dict[int, list[Violation]] = {}
        batches: dict[int, PartitionBatch] = {}
        prefixes: dict[int, str] = {}
        for index, event in enumerate(events):
            problems = check(event, received_ns)
            if problems is None:
                encoded = event.SerializeToString()
                if len(encoded) > MAX_STRING_BYTES:
                    problems = check_encoded(event, len(encoded))
            if problems is not None:
                statuses[index] = EventStatus.REJECTED
                violations[index] = problems
                continue
            # The partition key; see validation.partition_key, inlined on the hot path.
            key = event.user_id or event.anonymous_id or "account:" + event.account_id
            partition = partition_of_key(key)
            if partition is None:
                partition = self._partition(key)
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = PartitionBatch(partition, [], [], [])
                prefixes[partition] = self._dedup_prefix(dataset, partition)
            batch.keys.append(prefixes[partition] + event.event_id)
            batch.records.append(
                record(encoded, received if event.HasField("timestamp") else received_as_time)
            )
            batch.positions.append(index)
        return PreparedBatch(
            len(events), statuses, violations, list(batches.values()), _headers_json()
        )

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
        accepted = prepared.size - duplicates - len(violations)
        count = self._count
        attributes = self._attributes
        if accepted:
            count(accepted, attributes[EventStatus.ACCEPTED])
        if duplicates:
            count(duplicates, attributes[EventStatus.DUPLICATE])
        if violations:
            count(len(violations), attributes[EventStatus.REJECTED])
        return BatchResult(statuses, violations, accepted, duplicates)

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

    def _dedup_prefix(self, dataset: str, partition: int) -> str:
        prefix = self._dedup_prefixes.get((dataset, partition))
        if prefix is None:
            if len(self._dedup_prefixes) >= _CACHE_LIMIT:
                self._dedup_prefixes.clear()
            prefix = dedup_prefix(self._sink.stream_key(partition), dataset)
            self._dedup_prefixes[dataset, partition] = prefix
        return prefix
