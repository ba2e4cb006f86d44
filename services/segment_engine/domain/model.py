"""The engine's vocabulary: kinds, causes, memberships, changes and resource names.

Enum values are the numbers of the matching ``audience.v1`` enums, so the translation
layer maps them one to one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from audience.errors import FieldViolation, invalid_argument

__all__ = [
    "Cause",
    "Change",
    "ChangeKind",
    "Kind",
    "Membership",
    "Reason",
    "SegmentState",
    "Source",
    "dataset_name",
    "has_control_character",
    "member_name",
    "parse_dataset",
    "parse_member",
    "parse_segment",
    "segment_id_violation",
    "segment_name",
]


class Kind(IntEnum):
    """Whether members are users or accounts (``SegmentKind``)."""

    USER = 1
    ACCOUNT = 2


class Source(IntEnum):
    """Where a segment's members come from (``SegmentSource``)."""

    RULE = 1
    IMPORTED = 2


class SegmentState(IntEnum):
    """A segment's state (``SegmentState``)."""

    BACKFILLING = 1
    ACTIVE = 2
    FAILED = 3


class ChangeKind(IntEnum):
    """Join or leave (``MembershipChangeKind``)."""

    JOIN = 1
    LEAVE = 2


class Cause(IntEnum):
    """Why an evaluation happened (``ChangeCause``)."""

    EVENT = 1
    TIME = 2
    BACKFILL = 3
    DEPENDENCY = 4
    ERASURE = 5
    MERGE = 6
    SEGMENT_CHANGED = 7


@dataclass(frozen=True, slots=True)
class Membership:
    """A member's membership of one segment: the version it joined under, and when
    (microseconds since the epoch)."""

    version: int
    join_time: int


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a membership changed.

    Attributes:
        flipped: explanations of the clauses whose result flipped, as the rules adapter
            makes them; opaque here.
        dependency_segment: for ``DEPENDENCY``, the id of the segment whose membership
            changed first.
    """

    cause: Cause
    event_ids: tuple[str, ...] = ()
    flipped: tuple[Any, ...] = ()
    dependency_segment: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    """One join or leave of one member, as recorded in the change log."""

    kind: Kind
    subject_id: str
    segment_id: str
    segment_version: int
    change: ChangeKind
    time: int
    reason: Reason = field(default_factory=lambda: Reason(Cause.EVENT))


_DATASET = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SEGMENT_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
_SUBJECT_ID_MAX = 256
_CONTROL = re.compile(r"[\x00-\x1f]")
_COLLECTIONS = {"profiles": Kind.USER, "accounts": Kind.ACCOUNT}
_COLLECTION_OF = {kind: collection for collection, kind in _COLLECTIONS.items()}


def dataset_name(dataset: str) -> str:
    return f"datasets/{dataset}"


def segment_name(dataset: str, segment_id: str) -> str:
    return f"datasets/{dataset}/segments/{segment_id}"


def member_name(dataset: str, kind: Kind, subject_id: str) -> str:
    return f"datasets/{dataset}/{_COLLECTION_OF[kind]}/{subject_id}"


def _bad(field_name: str, message: str, reason: str) -> Exception:
    return invalid_argument(
        f"{field_name}: {message}", FieldViolation(field_name, message), reason=reason
    )


def parse_dataset(name: str, field_name: str = "parent") -> str:
    """Returns the dataset id of ``datasets/{dataset}``."""
    prefix, _, dataset = name.partition("/")
    if prefix != "datasets" or not _DATASET.fullmatch(dataset):
        raise _bad(
            field_name,
            f"must be datasets/{{dataset}} (the id 1–63 lower-case letters, digits and '-'),"
            f" got {name[:100]!r}.",
            "INVALID_DATASET_NAME",
        )
    return dataset


def segment_id_violation(segment_id: str) -> str | None:
    """Why ``segment_id`` is not a valid segment id, or None when it is."""
    if _SEGMENT_ID.fullmatch(segment_id):
        return None
    return (
        "must be 1–63 lower-case letters, digits and '-', starting with a letter;"
        f" got {segment_id[:100]!r}."
    )


def parse_segment(name: str, field_name: str = "name") -> tuple[str, str]:
    """Returns ``(dataset, segment_id)`` of ``datasets/{dataset}/segments/{segment}``."""
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "datasets"
        or parts[2] != "segments"
        or not _DATASET.fullmatch(parts[1])
        or not _SEGMENT_ID.fullmatch(parts[3])
    ):
        raise _bad(
            field_name,
            f"must be datasets/{{dataset}}/segments/{{segment}}, got {name[:200]!r}.",
            "INVALID_SEGMENT_NAME",
        )
    return parts[1], parts[3]


def has_control_character(text: str) -> bool:
    """Whether ``text`` holds a control character (U+0000–U+001F), which no member id may:
    the profile service's names refuse them, and a change notification carries one id a
    line."""
    return _CONTROL.search(text) is not None


def parse_member(name: str, field_name: str = "member") -> tuple[str, Kind, str]:
    """Returns ``(dataset, kind, id)`` of ``datasets/{d}/profiles/{id}`` (or ``accounts``)."""
    parts = name.split("/", 3)
    kind = _COLLECTIONS.get(parts[2]) if len(parts) == 4 else None
    if (
        kind is None
        or parts[0] != "datasets"
        or not _DATASET.fullmatch(parts[1])
        or not 0 < len(parts[3]) <= _SUBJECT_ID_MAX
        or has_control_character(parts[3])
    ):
        raise _bad(
            field_name,
            "must be datasets/{dataset}/profiles/{profile} or"
            f" datasets/{{dataset}}/accounts/{{account}}, got {name[:200]!r}.",
            "INVALID_MEMBER_NAME",
        )
    return parts[1], kind, parts[3]
