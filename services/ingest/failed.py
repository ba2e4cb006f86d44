"""Failed events: kept when a later stage reports them, listed and replayed by operators.

The profile service publishes an ``audience.bus.v1.FailedEventBatch`` on the
``failed-events`` topic when it cannot apply an event; ingest keeps each failure (once, however
often the report is delivered) in its store. A replay puts the stored event back on the
``events`` topic with ``replay_count`` one higher, bypassing de-duplication (its id was seen
when it was first accepted).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from google.protobuf.message import DecodeError

from audience import errors
from audience.bus.v1 import events_pb2 as bus_events_pb2
from audience.streams import Message
from audience.telemetry import inject
from audience.v1 import event_pb2
from services.ingest.appender import EVENTS_TOPIC
from services.ingest.records import DatasetRecords
from services.ingest.store import FailedEventRow, NewFailure, Publish
from services.ingest.validation import partition_key

__all__ = [
    "FAILED_EVENTS_TOPIC",
    "FailedEvents",
    "FailedEventsPage",
    "FailedStore",
    "Publisher",
    "failed_event_name",
]

FAILED_EVENTS_TOPIC = "failed-events"

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_REPLAY_NAMES = 1000

_log = logging.getLogger(__name__)

_NAME = re.compile(r"datasets/(?P<dataset>[a-z0-9-]{1,63})/failedEvents/(?P<id>[1-9][0-9]{0,17})")
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,62}")


class FailedStore(Protocol):
    async def record(self, failures: Sequence[NewFailure]) -> None: ...

    async def page(
        self, dataset: str, *, reason: str | None, before_id: int | None, limit: int
    ) -> list[FailedEventRow]: ...

    async def missing(self, dataset: str, ids: Sequence[int]) -> list[int]: ...

    async def replay(
        self,
        dataset: str,
        publish: Publish,
        *,
        ids: Sequence[int] | None = None,
        reason: str | None = None,
        chunk: int = 500,
    ) -> int: ...


class Publisher(Protocol):
    """Appends messages to the bus (``audience.streams.Bus``)."""

    def partition_of(self, key: str | bytes) -> int: ...

    async def publish_batch(self, messages: Iterable[Message]) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class FailedEventsPage:
    rows: list[FailedEventRow]
    next_page_token: str


def failed_event_name(row: FailedEventRow) -> str:
    """Returns the resource name, ``datasets/{dataset}/failedEvents/{id}``."""
    return f"datasets/{row.dataset}/failedEvents/{row.id}"


def decode_failures(payload: bytes) -> list[NewFailure]:
    """Returns the failures of a ``FailedEventBatch`` payload.

    Raises:
        ValueError: the payload is not a ``FailedEventBatch``.
    """
    try:
        batch = bus_events_pb2.FailedEventBatch.FromString(payload)
    except DecodeError as error:
        raise ValueError(f"not a FailedEventBatch: {error}") from error
    failures: list[NewFailure] = []
    for record in batch.failures:
        ingested, failure = record.event, record.failure
        event = ingested.event
        if not ingested.dataset or not event.event_id:
            raise ValueError("a failure without a dataset or an event id")
        fail_time = (
            failure.fail_time.ToDatetime(tzinfo=UTC)
            if failure.HasField("fail_time")
            else datetime.now(UTC)
        )
        failures.append(
            NewFailure(
                dataset=ingested.dataset,
                event_id=event.event_id,
                event=event.SerializeToString(),
                stage=failure.stage or "unknown",
                reason=failure.reason if _REASON.fullmatch(failure.reason) else "UNKNOWN",
                message=failure.message,
                fail_time=fail_time,
                attempt=ingested.replay_count,
            )
        )
    return failures


def _encode_token(dataset: str, reason: str | None, before_id: int) -> str:
    data = json.dumps({"d": dataset, "r": reason, "b": before_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def _decode_token(token: str, dataset: str, reason: str | None) -> int:
    invalid = errors.invalid_argument(
        "page_token is not a token from this listing.",
        errors.FieldViolation("page_token", "Use the next_page_token of the same listing."),
        reason="INVALID_PAGE_TOKEN",
    )
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise invalid from None
    if (
        not isinstance(data, dict)
        or data.get("d") != dataset
        or data.get("r") != reason
        or not isinstance(data.get("b"), int)
    ):
        raise invalid
    before_id: int = data["b"]
    return before_id


class FailedEvents:
    """Keeps, lists and replays failed events."""

    def __init__(self, store: FailedStore, publisher: Publisher) -> None:
        self._store = store
        self._publisher = publisher

    async def record(self, payloads: Sequence[bytes]) -> int:
        """Stores the failures of ``FailedEventBatch`` payloads; returns how many were read.

        A payload that is not a batch is logged and skipped: it can never be stored, and
        leaving it unacknowledged would hold back the topic for good.
        """
        failures: list[NewFailure] = []
        for payload in payloads:
            try:
                failures.extend(decode_failures(payload))
            except ValueError as error:
                _log.error("dropping a malformed failed-events message: %s", error)
        await self._store.record(failures)
        return len(failures)

    async def page(
        self, dataset: str, *, page_size: int, page_token: str, reason: str
    ) -> FailedEventsPage:
        """Returns a page of a dataset's failed events, newest first.

        Raises:
            AudienceError: ``INVALID_ARGUMENT`` for a negative page size, a reason that is
                not UPPER_SNAKE_CASE or a token from another listing.
        """
        if page_size < 0:
            raise errors.invalid_argument(
                "page_size must not be negative.",
                errors.FieldViolation("page_size", "Must be 0 (the default, 100) to 1,000."),
            )
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        wanted = _reason(reason, "reason")
        before_id = _decode_token(page_token, dataset, wanted) if page_token else None
        rows = await self._store.page(dataset, reason=wanted, before_id=before_id, limit=limit + 1)
        token = _encode_token(dataset, wanted, rows[limit - 1].id) if len(rows) > limit else ""
        return FailedEventsPage(rows[:limit], token)

    async def replay(self, dataset: str, *, names: Sequence[str], reason: str) -> int:
        """Puts failed events back on the bus; returns how many.

        With ``names``, those events; without, every one of the dataset (with ``reason``)
        that awaits a replay.

        Raises:
            AudienceError: ``INVALID_ARGUMENT`` for a malformed name, one of another dataset
                or too many names; ``NOT_FOUND`` for a name that is not a failed event
                (nothing is replayed then).
        """
        if names:
            if len(names) > MAX_REPLAY_NAMES:
                raise errors.invalid_argument(
                    f"At most {MAX_REPLAY_NAMES} names per call.",
                    errors.FieldViolation("names", f"At most {MAX_REPLAY_NAMES}."),
                )
            if reason:
                raise errors.invalid_argument(
                    "reason filters a replay of every failed event; give names or a reason.",
                    errors.FieldViolation("reason", "Must be empty when names are given."),
                )
            ids = [_parse_name(name, dataset, f"names[{i}]") for i, name in enumerate(names)]
            missing = await self._store.missing(dataset, ids)
            if missing:
                raise errors.not_found(
                    "audience.dev/FailedEvent", f"datasets/{dataset}/failedEvents/{missing[0]}"
                )
            return await self._store.replay(dataset, self._publish, ids=sorted(set(ids)))
        return await self._store.replay(dataset, self._publish, reason=_reason(reason, "reason"))

    async def _publish(self, rows: Sequence[FailedEventRow]) -> None:
        by_partition: defaultdict[tuple[str, int], list[bytes]] = defaultdict(list)
        encoders: dict[str, DatasetRecords] = {}
        for row in rows:
            event = event_pb2.Event.FromString(row.event)
            partition = self._publisher.partition_of(partition_key(event))
            encoder = encoders.get(row.dataset) or encoders.setdefault(
                row.dataset, DatasetRecords(row.dataset)
            )
            by_partition[row.dataset, partition].append(
                encoder.record(row.event, replay_count=row.replay_count + 1)
            )
        headers = inject()
        await self._publisher.publish_batch(
            Message(EVENTS_TOPIC, partition, b"".join(records), headers)
            for (_, partition), records in by_partition.items()
        )


def _reason(reason: str, field: str) -> str | None:
    if not reason:
        return None
    if not _REASON.fullmatch(reason):
        raise errors.invalid_argument(
            f"{field} must be UPPER_SNAKE_CASE, got {reason[:100]!r}.",
            errors.FieldViolation(field, "A failure reason, UPPER_SNAKE_CASE."),
        )
    return reason


def _parse_name(name: str, dataset: str, field: str) -> int:
    match = _NAME.fullmatch(name)
    if match is None or match["dataset"] != dataset:
        raise errors.invalid_argument(
            f"{field} must be datasets/{dataset}/failedEvents/{{id}}, got {name[:200]!r}.",
            errors.FieldViolation(field, f"A failed event of datasets/{dataset}."),
            reason="INVALID_NAME",
        )
    return int(match["id"])
