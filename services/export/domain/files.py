"""Export file names, the temporary name a file is written under, and its companions: the
manifest and the ``sha256sum`` checksum file."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from audience.errors import FieldViolation, invalid_argument
from services.export.domain.cron import zone
from services.export.domain.csvrows import rfc3339
from services.export.domain.model import (
    AttributeColumn,
    Column,
    ExportMode,
    FieldColumn,
    IdentityColumn,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "Manifest",
    "SegmentStats",
    "checksum_file",
    "checksum_name",
    "manifest_name",
    "render_file_name",
    "temporary_name",
    "unclaimed_name",
    "validate_template",
]

DEFAULT_TEMPLATE = "audience-{date}-{time}.csv"
_FIELDS = frozenset({"segment", "date", "time"})
# Room is left for the temporary and companion suffixes within a 255-byte file name.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


def _bad_template(field_path: str, description: str) -> Exception:
    return invalid_argument(f"{field_path}: {description}", FieldViolation(field_path, description))


def validate_template(template: str, field_path: str = "file_name_template") -> str:
    """Returns the template (the default for empty) or rejects it."""
    template = template or DEFAULT_TEMPLATE
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        raise _bad_template(field_path, f"not a valid template: {error}") from None
    for _, name, spec, conversion in parts:
        if name is not None and (name not in _FIELDS or spec or conversion):
            raise _bad_template(
                field_path, f"only {{segment}}, {{date}} and {{time}} may be used, got {{{name}}}"
            )
    sample = template.format(segment="segment-id", date="2024-01-31", time="235959")
    if not _FILE_NAME.fullmatch(sample) or ".." in sample:
        raise _bad_template(
            field_path,
            "must give a file name of letters, digits, '.', '_', '+' and '-', starting with a "
            f"letter or digit, without '/' or '..'; got {template!r}",
        )
    return template


def render_file_name(
    template: str, segment_ids: Sequence[str], moment: datetime, time_zone: str
) -> str:
    """The file name for a run at ``moment``; date and time are read in ``time_zone``."""
    local = moment.astimezone(zone(time_zone))
    name = template.format(
        segment="+".join(segment_ids),
        date=local.strftime("%Y-%m-%d"),
        time=local.strftime("%H%M%S"),
    )
    if not _FILE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"file name {name!r} is not safe")
    return name


def unclaimed_name(final: str, job_id: str) -> str:
    """The name a job publishes under when another run's file already has ``final`` (two
    runs in one second, or a template without ``{time}``): the job id goes before the
    extension, so that no run replaces what an earlier one delivered."""
    stem, dot, extension = final.rpartition(".")
    if not dot or not stem:
        return f"{final}-{job_id}"
    return f"{stem}-{job_id}.{extension}"


def temporary_name(final: str, job_id: str) -> str:
    """Hidden and without the final extension, so that collectors watching for ``*.csv``
    never pick up a partial file; unique per job, so that two jobs never share one."""
    return f".{final}.{job_id}.part"


def manifest_name(final: str) -> str:
    return f"{final}.manifest.json"


def checksum_name(final: str) -> str:
    return f"{final}.sha256"


def checksum_file(final: str, sha256: str) -> str:
    """The checksum file's content, in the format ``sha256sum -c`` reads."""
    return f"{sha256}  {final}\n"


def _column_source(column: Column) -> str:
    if isinstance(column, FieldColumn):
        return column.field.value
    if isinstance(column, IdentityColumn):
        return f"identity:{column.identity_type}"
    assert isinstance(column, AttributeColumn)
    return f"attribute:{column.path}"


@dataclass(slots=True)
class SegmentStats:
    segment: str
    """The segment's resource name."""
    rows: int = 0
    joins: int = 0
    leaves: int = 0
    versions: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a receiver needs to check and interpret an export file."""

    job: str
    schedule: str | None
    file_name: str
    sha256: str
    size_bytes: int
    mode: ExportMode
    columns: Sequence[Column]
    segments: Sequence[SegmentStats]
    start_time: datetime | None
    """Delta files: changes after this time; full files: when the read began."""
    end_time: datetime
    """Delta files: changes up to this time; full files: when the read ended."""
    snapshot: bool
    """Whether a delta file holds every current member as a join (a feed's first run, or a
    resume point too old to read from) rather than changes."""

    def to_json(self) -> str:
        document = {
            "job": self.job,
            "schedule": self.schedule,
            "file": self.file_name,
            "sha256": self.sha256,
            "bytes": self.size_bytes,
            "mode": self.mode.value,
            "snapshot": self.snapshot,
            "rows": sum(stats.rows for stats in self.segments),
            "columns": [
                {"header": column.header, "source": _column_source(column)}
                for column in self.columns
            ],
            "segments": [
                {
                    "segment": stats.segment,
                    "rows": stats.rows,
                    "joins": stats.joins,
                    "leaves": stats.leaves,
                    "versions": sorted(stats.versions),
                }
                for stats in self.segments
            ],
            "time_range": {
                "start": rfc3339(self.start_time) if self.start_time else None,
                "end": rfc3339(self.end_time),
            },
        }
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
