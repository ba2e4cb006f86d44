"""Export jobs as values: new jobs, generated ids, and the checks of a job's settings."""

from __future__ import annotations

import secrets
from datetime import datetime

from audience.errors import FieldViolation, invalid_argument
from services.export.domain.csvrows import validate_columns
from services.export.domain.files import validate_template
from services.export.domain.model import ExportJob, JobSpec, JobState

__all__ = ["MAX_SEGMENTS", "generated_job_id", "new_job", "scheduled_job_id", "validate_spec"]

MAX_SEGMENTS = 50


def validate_spec(spec: JobSpec, field: str) -> JobSpec:
    """Returns ``spec`` with its defaults filled in, or rejects it naming the bad fields."""
    violations: list[FieldViolation] = []
    if not 1 <= len(spec.segment_ids) <= MAX_SEGMENTS:
        violations.append(FieldViolation(f"{field}.segments", f"1 to {MAX_SEGMENTS} segments"))
    elif len(set(spec.segment_ids)) != len(spec.segment_ids):
        violations.append(FieldViolation(f"{field}.segments", "a segment is listed twice"))
    if not spec.destination_id:
        violations.append(FieldViolation(f"{field}.destination", "required"))
    if violations:
        raise invalid_argument("The export job is not valid.", *violations)
    validate_columns(spec.columns, f"{field}.columns")
    template = validate_template(spec.file_name_template, f"{field}.file_name_template")
    return JobSpec(
        segment_ids=spec.segment_ids,
        mode=spec.mode,
        columns=spec.columns,
        destination_id=spec.destination_id,
        file_name_template=template,
    )


def generated_job_id() -> str:
    return f"job-{secrets.token_hex(10)}"


def scheduled_job_id(schedule_id: str, moment: datetime) -> str:
    """``{schedule}-{yyyymmdd}-{hhmmss}-{random}``, within the 63-character id limit."""
    return f"{schedule_id[:36]}-{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def new_job(
    dataset: str,
    job_id: str,
    spec: JobSpec,
    *,
    schedule_id: str | None,
    time_zone: str,
    now: datetime,
) -> ExportJob:
    return ExportJob(
        dataset=dataset,
        job_id=job_id,
        spec=spec,
        schedule_id=schedule_id,
        time_zone=time_zone,
        state=JobState.PENDING,
        rows_written=0,
        percent=0.0,
        file_path="",
        sha256="",
        error="",
        attempt_count=0,
        delta_start_time=None,
        delta_end_time=None,
        create_time=now,
        start_time=None,
        end_time=None,
    )
