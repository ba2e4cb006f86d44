"""The export service's resources and the membership data it reads, as plain values."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "AttributeColumn",
    "AttributeValue",
    "ChangeKind",
    "Column",
    "DeliveryState",
    "Destination",
    "ExportField",
    "ExportJob",
    "ExportMode",
    "FieldColumn",
    "FolderTarget",
    "Heartbeat",
    "IdentityColumn",
    "JobSpec",
    "JobState",
    "MemberPage",
    "MemberSnapshot",
    "MembershipChange",
    "ProfileData",
    "Schedule",
    "SftpTarget",
    "Target",
    "WebhookDelivery",
    "WebhookSubscription",
]


class ExportField(enum.Enum):
    """A fixed field of an exported membership; the value is its default header."""

    PROFILE_ID = "profile_id"
    SEGMENT_ID = "segment_id"
    JOIN_TIME = "join_time"
    CHANGE = "change"
    CHANGE_TIME = "change_time"
    SEGMENT_VERSION = "segment_version"


@dataclass(frozen=True, slots=True)
class FieldColumn:
    field: ExportField
    header: str


@dataclass(frozen=True, slots=True)
class IdentityColumn:
    """The profile's first identity of ``identity_type``."""

    identity_type: str
    header: str


@dataclass(frozen=True, slots=True)
class AttributeColumn:
    """A profile attribute by dotted path (``plan``, ``address.city``)."""

    path: str
    header: str


Column = FieldColumn | IdentityColumn | AttributeColumn


class ExportMode(enum.Enum):
    FULL = "full"
    DELTA = "delta"


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class ChangeKind(enum.Enum):
    JOIN = "join"
    LEAVE = "leave"


class DeliveryState(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class FolderTarget:
    """An absolute folder under the service's export root."""

    path: str


@dataclass(frozen=True, slots=True)
class SftpTarget:
    host: str
    port: int
    path: str
    username: str
    credential_secret: str
    """The environment variable (``AUDIENCE_SECRET_<NAME>``) holding a password or a key."""
    known_host_key: str
    """``[host pattern] key-type base64``, or empty to skip the host key check."""


Target = FolderTarget | SftpTarget


@dataclass(frozen=True, slots=True)
class Destination:
    dataset: str
    destination_id: str
    display_name: str
    target: Target
    create_time: datetime
    update_time: datetime
    version: int


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a job exports, and where: the input of a one-time job or a schedule's template."""

    segment_ids: tuple[str, ...]
    mode: ExportMode
    columns: tuple[Column, ...]
    destination_id: str
    file_name_template: str


@dataclass(frozen=True, slots=True)
class ExportJob:
    dataset: str
    job_id: str
    spec: JobSpec
    schedule_id: str | None
    time_zone: str
    """The zone of ``{date}`` and ``{time}`` in the file name: the schedule's, or UTC."""
    state: JobState
    rows_written: int
    percent: float
    file_path: str
    sha256: str
    error: str
    attempt_count: int
    delta_start_time: datetime | None
    delta_end_time: datetime | None
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None


@dataclass(frozen=True, slots=True)
class Schedule:
    dataset: str
    schedule_id: str
    display_name: str
    cron: str
    time_zone: str
    job_template: JobSpec
    paused: bool
    next_run_time: datetime | None
    last_run_time: datetime | None
    last_job_id: str | None
    create_time: datetime
    update_time: datetime
    version: int


@dataclass(frozen=True, slots=True)
class WebhookSubscription:
    dataset: str
    subscription_id: str
    display_name: str
    url: str
    segment_ids: tuple[str, ...]
    """The watched segments; all when empty."""
    kinds: frozenset[ChangeKind]
    """The kinds sent; both when empty."""
    secret: str
    paused: bool
    max_attempts: int
    create_time: datetime
    update_time: datetime
    version: int


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    dataset: str
    subscription_id: str
    delivery_id: str
    sequence: int
    """Order of creation within the subscription; a member's deliveries go out in this order."""
    member: str
    payload: str
    state: DeliveryState
    attempt_count: int
    last_http_status: int
    last_error: str
    create_time: datetime
    last_attempt_time: datetime | None
    next_attempt_time: datetime | None


@dataclass(frozen=True, slots=True)
class MemberPage:
    """Members of one segment, column by column (parallel lists), as read from the engine.

    Columns rather than one object per member: a page holds up to 10,000 members and the
    per-object cost would dominate a large export.
    """

    segment_id: str
    member_ids: Sequence[str]
    versions: Sequence[int] | None
    """The segment version each member joined under; None when it was not asked for."""
    join_micros: Sequence[int]
    """When each member joined, in microseconds since the Unix epoch."""

    def __len__(self) -> int:
        return len(self.member_ids)


@dataclass(frozen=True, slots=True)
class MemberSnapshot:
    """The engine's snapshot that a listing of a segment's members is read from."""

    resume_token: str
    """The change stream's position at the snapshot: watching from it delivers every change
    the listing does not hold, and none that it does."""
    read_time: datetime


@dataclass(frozen=True, slots=True)
class MembershipChange:
    resume_token: str
    member: str
    """The member's resource name, ``datasets/{d}/profiles/{id}`` or ``.../accounts/{id}``."""
    member_id: str
    segment_id: str
    segment_version: int
    kind: ChangeKind
    change_time: datetime
    member_sequence: int
    cause: str
    """Why, in lower case: ``event``, ``time``, ``backfill``, ``erasure``, …"""
    reason: Mapping[str, object]
    """The engine's full explanation, JSON-ready."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    resume_token: str
    time: datetime


AttributeValue = None | str | float | bool | datetime | list[object] | dict[str, object]


@dataclass(frozen=True, slots=True)
class ProfileData:
    """What identity and attribute columns read from a profile."""

    identities: Mapping[str, str]
    """The first identity of each type."""
    attributes: Mapping[str, AttributeValue]
