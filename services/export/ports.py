"""What the export service's logic needs from the outside, as protocols; ``adapters/``
implements them over gRPC, the file system, SFTP and HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Protocol

from services.export.domain.model import (
    ChangeKind,
    Heartbeat,
    MemberPage,
    MembershipChange,
    MemberSnapshot,
    ProfileData,
    Target,
)

__all__ = [
    "Clock",
    "DestinationError",
    "FileSink",
    "MembershipReader",
    "OpenSink",
    "ProfileReader",
    "ResumePointExpiredError",
    "SystemClock",
    "WebhookResponse",
    "WebhookSender",
]


class ResumePointExpiredError(Exception):
    """The change stream no longer holds the resume point: its retention has passed."""


class DestinationError(Exception):
    """Writing to a destination failed; the message says why, for the job's ``error``.

    ``retryable`` is False for failures another attempt cannot fix (a missing secret, a
    folder outside the export root)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class MembershipReader(Protocol):
    """The segment engine's ``MembershipService``."""

    async def count(self, dataset: str, segment_id: str) -> int: ...

    def pages(
        self, dataset: str, segment_id: str, *, versions: bool
    ) -> AsyncIterator[MemberSnapshot | MemberPage]:
        """Every member of the segment as of one snapshot of the engine: first the snapshot,
        then the members by member id, a page at a time; with ``versions``, the pages carry
        the segment version of each membership."""
        ...

    def watch(
        self,
        dataset: str,
        segment_ids: Sequence[str],
        kind: ChangeKind | None,
        start: str | datetime | None,
        heartbeat_interval: timedelta,
    ) -> AsyncIterator[MembershipChange | Heartbeat]:
        """Changes from ``start`` (a resume token, a time, or now when None), and heartbeats.

        Raises:
            ResumePointExpiredError: ``start`` is older than the change log keeps.
        """
        ...


class ProfileReader(Protocol):
    """The profile service's ``ProfileService``."""

    async def get_many(
        self, dataset: str, profile_ids: Sequence[str]
    ) -> Mapping[str, ProfileData | None]:
        """The profiles by id; None for a profile that does not exist (erased)."""
        ...


class FileSink(Protocol):
    """An open connection to a destination's folder; names are relative to it."""

    def path_of(self, name: str) -> str:
        """The file's full path at the destination, as reported in the job."""
        ...

    async def upload(self, local: Path, name: str, progress: Callable[[int], None]) -> None:
        """Copies ``local`` to ``name``, calling ``progress`` with the bytes sent so far."""
        ...

    async def write_text(self, name: str, text: str) -> None: ...

    async def exists(self, name: str) -> bool: ...

    async def rename(self, source: str, target: str) -> None:
        """Renames ``source`` to ``target``, replacing ``target``."""
        ...

    async def remove(self, name: str) -> None:
        """Removes ``name``; nothing happens when it does not exist."""
        ...

    async def __aenter__(self) -> FileSink: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


OpenSink = Callable[[Target], FileSink]
"""Returns an unopened sink for a destination (used as ``async with open_sink(target)``)."""


@dataclass(frozen=True, slots=True)
class WebhookResponse:
    status: int
    """The HTTP status, or 0 when no response came."""
    error: str
    """Why the attempt failed; empty on a 2xx."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class WebhookSender(Protocol):
    async def post(self, url: str, body: str, headers: Mapping[str, str]) -> WebhookResponse: ...
