"""Segments as resources: the stored record, its etag, and the limits on its fields."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from audience.errors import FieldViolation
from services.segment_engine.domain.model import Kind, SegmentState, Source

__all__ = [
    "MAX_DESCRIPTION",
    "MAX_DISPLAY_NAME",
    "MAX_LABELS",
    "Backfill",
    "SegmentRecord",
    "metadata_violations",
]

MAX_DISPLAY_NAME = 200
MAX_DESCRIPTION = 2000
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
# PostgreSQL's text cannot hold NUL.
_NUL = "\x00"
_NO_NUL = "must not hold the NUL character."


@dataclass(frozen=True, slots=True)
class Backfill:
    """Progress of a segment's current (or last) backfill; times in microseconds."""

    version: int = 0
    done: int = 0
    total: int = 0
    start_time: int | None = None
    end_time: int | None = None
    error: str = ""

    @property
    def percent(self) -> float:
        if self.end_time is not None and not self.error:
            return 100.0
        if self.total <= 0:
            return 0.0
        return min(99.9, 100.0 * self.done / self.total)


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """A stored segment.

    Attributes:
        rule: the serialized ``audience.v1.Rule`` of a rule segment; None for an imported
            one.
        revision: increases with every change people make; the etag is derived from it.
    """

    dataset: str
    segment_id: str
    kind: Kind
    source: Source
    display_name: str = ""
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    rule: bytes | None = None
    rule_text: str = ""
    version: int = 1
    revision: int = 1
    state: SegmentState = SegmentState.ACTIVE
    backfill: Backfill = field(default_factory=Backfill)
    member_count: int = 0
    create_time: int = 0
    update_time: int = 0

    @property
    def etag(self) -> str:
        digest = hashlib.blake2b(
            f"{self.dataset}/{self.segment_id}/{self.revision}".encode(), digest_size=8
        )
        return f'W/"{self.revision}-{digest.hexdigest()}"'


def metadata_violations(
    prefix: str, display_name: str, description: str, labels: Mapping[str, str]
) -> list[FieldViolation]:
    """Every fault of a segment's descriptive fields."""
    found: list[FieldViolation] = []
    if len(display_name) > MAX_DISPLAY_NAME:
        found.append(
            FieldViolation(f"{prefix}display_name", f"at most {MAX_DISPLAY_NAME} characters.")
        )
    elif _NUL in display_name:
        found.append(FieldViolation(f"{prefix}display_name", _NO_NUL))
    if len(description) > MAX_DESCRIPTION:
        found.append(
            FieldViolation(f"{prefix}description", f"at most {MAX_DESCRIPTION} characters.")
        )
    elif _NUL in description:
        found.append(FieldViolation(f"{prefix}description", _NO_NUL))
    if len(labels) > MAX_LABELS:
        found.append(FieldViolation(f"{prefix}labels", f"at most {MAX_LABELS} labels."))
    for key, value in labels.items():
        if not 0 < len(key) <= MAX_LABEL_KEY:
            found.append(
                FieldViolation(f"{prefix}labels", f"keys are 1–{MAX_LABEL_KEY} characters.")
            )
        elif _NUL in key:
            found.append(FieldViolation(f"{prefix}labels", f"keys {_NO_NUL}"))
            continue
        if len(value) > MAX_LABEL_VALUE:
            found.append(
                FieldViolation(
                    f"{prefix}labels[{key[:64]}]", f"at most {MAX_LABEL_VALUE} characters."
                )
            )
        elif _NUL in value:
            found.append(FieldViolation(f"{prefix}labels[{key[:64]}]", _NO_NUL))
    return found
