"""The export service's tables (schema ``export``): every SQL statement of the service.

Times are passed in by the caller rather than read from ``now()``, so that the scheduler
and the retry logic run on one clock that tests can set.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from audience.errors import aborted, already_exists, failed_precondition, not_found
from services.export.domain.model import (
    AttributeColumn,
    ChangeKind,
    Column,
    DeliveryState,
    Destination,
    ExportField,
    ExportJob,
    ExportMode,
    FieldColumn,
    FolderTarget,
    IdentityColumn,
    JobSpec,
    JobState,
    Schedule,
    SftpTarget,
    Target,
    WebhookDelivery,
    WebhookSubscription,
)

__all__ = [
    "DESTINATION_TYPE",
    "JOB_TYPE",
    "SCHEDULE_TYPE",
    "SUBSCRIPTION_TYPE",
    "ClaimedDelivery",
    "DeltaCursor",
    "ExportStore",
    "NewDelivery",
    "WatchedSubscription",
]

DESTINATION_TYPE = "audience.dev/Destination"
JOB_TYPE = "audience.dev/ExportJob"
SCHEDULE_TYPE = "audience.dev/Schedule"
SUBSCRIPTION_TYPE = "audience.dev/WebhookSubscription"

# asyncpg ships no types; a record is read by column name.
Row = Mapping[str, Any]


# --- JSON forms of the values kept in jsonb columns -------------------------------------


def _target_to_json(target: Target) -> dict[str, Any]:
    if isinstance(target, FolderTarget):
        return {"folder": {"path": target.path}}
    return {
        "sftp": {
            "host": target.host,
            "port": target.port,
            "path": target.path,
            "username": target.username,
            "credential_secret": target.credential_secret,
            "known_host_key": target.known_host_key,
        }
    }


def _target_from_json(document: dict[str, Any]) -> Target:
    if "folder" in document:
        return FolderTarget(document["folder"]["path"])
    sftp = document["sftp"]
    return SftpTarget(
        host=sftp["host"],
        port=sftp["port"],
        path=sftp["path"],
        username=sftp["username"],
        credential_secret=sftp["credential_secret"],
        known_host_key=sftp["known_host_key"],
    )


def _column_to_json(column: Column) -> dict[str, str]:
    if isinstance(column, FieldColumn):
        return {"field": column.field.value, "header": column.header}
    if isinstance(column, IdentityColumn):
        return {"identity_type": column.identity_type, "header": column.header}
    return {"attribute_path": column.path, "header": column.header}


def _column_from_json(document: dict[str, str]) -> Column:
    if "field" in document:
        return FieldColumn(ExportField(document["field"]), document["header"])
    if "identity_type" in document:
        return IdentityColumn(document["identity_type"], document["header"])
    return AttributeColumn(document["attribute_path"], document["header"])


def _spec_to_json(spec: JobSpec) -> dict[str, Any]:
    return {
        "segment_ids": list(spec.segment_ids),
        "mode": spec.mode.value,
        "columns": [_column_to_json(column) for column in spec.columns],
        "destination_id": spec.destination_id,
        "file_name_template": spec.file_name_template,
    }


def _spec_from_json(document: dict[str, Any]) -> JobSpec:
    return JobSpec(
        segment_ids=tuple(document["segment_ids"]),
        mode=ExportMode(document["mode"]),
        columns=tuple(_column_from_json(column) for column in document["columns"]),
        destination_id=document["destination_id"],
        file_name_template=document["file_name_template"],
    )


# --- rows to values ----------------------------------------------------------------------


def _destination(row: Row) -> Destination:
    return Destination(
        dataset=row["dataset"],
        destination_id=row["destination_id"],
        display_name=row["display_name"],
        target=_target_from_json(row["target"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        version=row["version"],
    )


def _job(row: Row) -> ExportJob:
    return ExportJob(
        dataset=row["dataset"],
        job_id=row["job_id"],
        spec=_spec_from_json(row["spec"]),
        schedule_id=row["schedule_id"],
        time_zone=row["time_zone"],
        state=JobState(row["state"]),
        rows_written=row["rows_written"],
        percent=row["percent"],
        file_path=row["file_path"],
        sha256=row["sha256"],
        error=row["error"],
        attempt_count=row["attempt_count"],
        delta_start_time=row["delta_start_time"],
        delta_end_time=row["delta_end_time"],
        create_time=row["create_time"],
        start_time=row["start_time"],
        end_time=row["end_time"],
    )


def _schedule(row: Row) -> Schedule:
    return Schedule(
        dataset=row["dataset"],
        schedule_id=row["schedule_id"],
        display_name=row["display_name"],
        cron=row["cron"],
        time_zone=row["time_zone"],
        job_template=_spec_from_json(row["job_template"]),
        paused=row["paused"],
        next_run_time=row["next_run_time"],
        last_run_time=row["last_run_time"],
        last_job_id=row["last_job_id"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        version=row["version"],
    )


def _subscription(row: Row) -> WebhookSubscription:
    return WebhookSubscription(
        dataset=row["dataset"],
        subscription_id=row["subscription_id"],
        display_name=row["display_name"],
        url=row["url"],
        segment_ids=tuple(row["segment_ids"]),
        kinds=frozenset(ChangeKind(kind) for kind in row["kinds"]),
        secret=row["secret"],
        paused=row["paused"],
        max_attempts=row["max_attempts"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        version=row["version"],
    )


def _delivery(row: Row) -> WebhookDelivery:
    return WebhookDelivery(
        dataset=row["dataset"],
        subscription_id=row["subscription_id"],
        delivery_id=row["delivery_id"].hex,
        sequence=row["sequence"],
        member=row["member"],
        payload=row["payload"],
        state=DeliveryState(row["state"]),
        attempt_count=row["attempt_count"],
        last_http_status=row["last_http_status"],
        last_error=row["last_error"],
        create_time=row["create_time"],
        last_attempt_time=row["last_attempt_time"],
        next_attempt_time=row["next_attempt_time"],
    )


@dataclass(frozen=True, slots=True)
class DeltaCursor:
    """Where a schedule's delta feed resumes: the token and time its last success reached."""

    resume_token: str | None
    time: datetime | None


@dataclass(frozen=True, slots=True)
class WatchedSubscription:
    subscription: WebhookSubscription
    resume_token: str | None


@dataclass(frozen=True, slots=True)
class NewDelivery:
    delivery_id: str
    member: str
    segment_id: str
    member_sequence: int
    kind: ChangeKind
    payload: str


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    delivery: WebhookDelivery
    url: str
    secret: str
    max_attempts: int


def _check_version(row: Row | None, expected: int | None, resource_type: str, name: str) -> Row:
    if row is None:
        raise not_found(resource_type, name)
    if expected is not None and row["version"] != expected:
        raise aborted(
            f"{name} has changed since it was read (stale etag); read it again and retry.",
            reason="ETAG_MISMATCH",
        )
    return row


class ExportStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- destinations --------------------------------------------------------------------

    async def create_destination(self, destination: Destination, name: str) -> Destination:
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO export.destinations (dataset, destination_id, display_name,"
                " target, create_time, update_time) VALUES ($1, $2, $3, $4, $5, $5)"
                " RETURNING *",
                destination.dataset,
                destination.destination_id,
                destination.display_name,
                _target_to_json(destination.target),
                destination.create_time,
            )
        except asyncpg.UniqueViolationError:
            raise already_exists(DESTINATION_TYPE, name) from None
        return _destination(row)

    async def get_destination(self, dataset: str, destination_id: str) -> Destination | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM export.destinations WHERE dataset = $1 AND destination_id = $2",
            dataset,
            destination_id,
        )
        return None if row is None else _destination(row)

    async def list_destinations(
        self, dataset: str, after: str | None, limit: int
    ) -> list[Destination]:
        rows = await self._pool.fetch(
            "SELECT * FROM export.destinations WHERE dataset = $1"
            " AND ($2::text IS NULL OR destination_id > $2)"
            " ORDER BY destination_id LIMIT $3",
            dataset,
            after,
            limit,
        )
        return [_destination(row) for row in rows]

    async def update_destination(
        self,
        dataset: str,
        destination_id: str,
        name: str,
        expected_version: int | None,
        apply: Callable[[Destination], Destination],
        now: datetime,
    ) -> Destination:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM export.destinations WHERE dataset = $1 AND destination_id = $2"
                " FOR UPDATE",
                dataset,
                destination_id,
            )
            current = _destination(_check_version(row, expected_version, DESTINATION_TYPE, name))
            changed = apply(current)
            row = await conn.fetchrow(
                "UPDATE export.destinations SET display_name = $3, target = $4,"
                " version = version + 1, update_time = $5"
                " WHERE dataset = $1 AND destination_id = $2 RETURNING *",
                dataset,
                destination_id,
                changed.display_name,
                _target_to_json(changed.target),
                now,
            )
        return _destination(row)

    async def delete_destination(
        self, dataset: str, destination_id: str, name: str, expected_version: int | None
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT version FROM export.destinations"
                " WHERE dataset = $1 AND destination_id = $2 FOR UPDATE",
                dataset,
                destination_id,
            )
            _check_version(row, expected_version, DESTINATION_TYPE, name)
            try:
                await conn.execute(
                    "DELETE FROM export.destinations WHERE dataset = $1 AND destination_id = $2",
                    dataset,
                    destination_id,
                )
            except (asyncpg.ForeignKeyViolationError, asyncpg.RestrictViolationError):
                # PostgreSQL 15 reports a RESTRICT key as a foreign key violation, 18 as a
                # restrict violation.
                raise failed_precondition(
                    f"{name} is used by a schedule; delete or change the schedule first.",
                    reason="DESTINATION_IN_USE",
                ) from None

    # --- export jobs ---------------------------------------------------------------------

    async def create_job(self, job: ExportJob, name: str) -> ExportJob:
        try:
            row = await self._pool.fetchrow(
                _INSERT_JOB,
                job.dataset,
                job.job_id,
                _spec_to_json(job.spec),
                job.schedule_id,
                job.time_zone,
                job.create_time,
            )
        except asyncpg.UniqueViolationError:
            raise already_exists(JOB_TYPE, name) from None
        return _job(row)

    async def get_job(self, dataset: str, job_id: str) -> ExportJob | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM export.export_jobs WHERE dataset = $1 AND job_id = $2",
            dataset,
            job_id,
        )
        return None if row is None else _job(row)

    async def list_jobs(
        self,
        dataset: str,
        schedule_id: str | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ExportJob]:
        rows = await self._pool.fetch(
            "SELECT * FROM export.export_jobs WHERE dataset = $1"
            " AND ($2::text IS NULL OR schedule_id = $2)"
            " AND ($3::timestamptz IS NULL OR (create_time, job_id) < ($3, $4))"
            " ORDER BY create_time DESC, job_id DESC LIMIT $5",
            dataset,
            schedule_id,
            after[0] if after else None,
            after[1] if after else "",
            limit,
        )
        return [_job(row) for row in rows]

    async def cancel_job(self, dataset: str, job_id: str, name: str, now: datetime) -> ExportJob:
        """Cancels a pending or running job at once; its worker notices on its next renewal
        and removes the temporary file."""
        row = await self._pool.fetchrow(
            "UPDATE export.export_jobs SET state = 'cancelled', end_time = $3,"
            " error = 'Cancelled.', percent = percent"
            " WHERE dataset = $1 AND job_id = $2 AND state IN ('pending', 'running')"
            " RETURNING *",
            dataset,
            job_id,
            now,
        )
        if row is None:
            job = await self.get_job(dataset, job_id)
            if job is None:
                raise not_found(JOB_TYPE, name)
            return job
        return _job(row)

    async def claim_job(self, worker: str, now: datetime, lease: timedelta) -> ExportJob | None:
        """Claims the oldest runnable job: pending and due, or running under a claim that ran
        out. A schedule's jobs run one at a time, so a delta feed's runs never overlap."""
        async with self._pool.acquire() as conn, conn.transaction():
            candidates = await conn.fetch(
                "SELECT dataset, job_id, schedule_id FROM export.export_jobs"
                " WHERE (state = 'pending' AND not_before <= $1)"
                " OR (state = 'running' AND lease_until < $1)"
                " ORDER BY not_before, create_time LIMIT 16 FOR UPDATE SKIP LOCKED",
                now,
            )
            for candidate in candidates:
                if candidate["schedule_id"] is not None:
                    # Serialises claimers of one schedule's jobs on the schedule row.
                    await conn.execute(
                        "SELECT 1 FROM export.schedules WHERE dataset = $1 AND schedule_id = $2"
                        " FOR UPDATE",
                        candidate["dataset"],
                        candidate["schedule_id"],
                    )
                    busy = await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM export.export_jobs"
                        " WHERE dataset = $1 AND schedule_id = $2 AND job_id <> $3"
                        " AND state = 'running' AND lease_until >= $4)",
                        candidate["dataset"],
                        candidate["schedule_id"],
                        candidate["job_id"],
                        now,
                    )
                    if busy:
                        continue
                row = await conn.fetchrow(
                    "UPDATE export.export_jobs SET state = 'running', worker = $3,"
                    " lease_until = $4, start_time = coalesce(start_time, $5)"
                    " WHERE dataset = $1 AND job_id = $2 RETURNING *",
                    candidate["dataset"],
                    candidate["job_id"],
                    worker,
                    now + lease,
                    now,
                )
                return _job(row)
        return None

    async def renew_job(
        self,
        job: ExportJob,
        worker: str,
        until: datetime,
        *,
        rows_written: int,
        percent: float,
        attempt_count: int | None = None,
        error: str | None = None,
    ) -> bool:
        """Extends the claim and records progress; False when the job was cancelled or taken
        over (the worker must stop)."""
        status = await self._pool.execute(
            "UPDATE export.export_jobs SET lease_until = $4, rows_written = $5, percent = $6,"
            " attempt_count = coalesce($7, attempt_count), error = coalesce($8, error)"
            " WHERE dataset = $1 AND job_id = $2 AND worker = $3 AND state = 'running'",
            job.dataset,
            job.job_id,
            worker,
            until,
            rows_written,
            percent,
            attempt_count,
            error,
        )
        return bool(status == "UPDATE 1")

    async def fail_job(
        self, job: ExportJob, worker: str, error: str, attempt_count: int, now: datetime
    ) -> bool:
        status = await self._pool.execute(
            "UPDATE export.export_jobs SET state = 'failed', error = $4, attempt_count = $5,"
            " end_time = $6, lease_until = NULL"
            " WHERE dataset = $1 AND job_id = $2 AND worker = $3 AND state = 'running'",
            job.dataset,
            job.job_id,
            worker,
            error,
            attempt_count,
            now,
        )
        return bool(status == "UPDATE 1")

    async def release_job(self, job: ExportJob, worker: str) -> None:
        """Hands a running job back to the queue, for a worker that is shutting down."""
        await self._pool.execute(
            "UPDATE export.export_jobs SET state = 'pending', worker = NULL, lease_until = NULL"
            " WHERE dataset = $1 AND job_id = $2 AND worker = $3 AND state = 'running'",
            job.dataset,
            job.job_id,
            worker,
        )

    async def set_delta_range(
        self, job: ExportJob, worker: str, start: datetime | None, end: datetime
    ) -> None:
        await self._pool.execute(
            "UPDATE export.export_jobs SET delta_start_time = $4, delta_end_time = $5"
            " WHERE dataset = $1 AND job_id = $2 AND worker = $3",
            job.dataset,
            job.job_id,
            worker,
            start,
            end,
        )

    async def complete_job(
        self,
        job: ExportJob,
        worker: str,
        publish: Callable[[], Awaitable[None]],
        *,
        rows_written: int,
        file_path: str,
        sha256: str,
        attempt_count: int,
        now: datetime,
        delta_cursor: DeltaCursor | None,
    ) -> bool:
        """Publishes the file and marks the job succeeded, atomically against a cancel.

        The job's row stays locked while ``publish`` renames the file into place, so a
        cancel either comes first (nothing is published, False is returned) or waits and
        finds the job succeeded. A failing ``publish`` changes nothing and raises.
        With ``delta_cursor``, the schedule's feed resumes from it next time.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            mine = await conn.fetchval(
                "SELECT true FROM export.export_jobs WHERE dataset = $1 AND job_id = $2"
                " AND worker = $3 AND state = 'running' FOR UPDATE",
                job.dataset,
                job.job_id,
                worker,
            )
            if not mine:
                return False
            await publish()
            await conn.execute(
                "UPDATE export.export_jobs SET state = 'succeeded', rows_written = $3,"
                " percent = 100, file_path = $4, sha256 = $5, attempt_count = $6,"
                " end_time = $7, lease_until = NULL, error = ''"
                " WHERE dataset = $1 AND job_id = $2",
                job.dataset,
                job.job_id,
                rows_written,
                file_path,
                sha256,
                attempt_count,
                now,
            )
            if delta_cursor is not None and job.schedule_id is not None:
                await conn.execute(
                    "UPDATE export.schedules SET delta_resume_token = $3, delta_time = $4"
                    " WHERE dataset = $1 AND schedule_id = $2",
                    job.dataset,
                    job.schedule_id,
                    delta_cursor.resume_token,
                    delta_cursor.time,
                )
        return True

    async def job_state(self, job: ExportJob) -> JobState | None:
        state = await self._pool.fetchval(
            "SELECT state FROM export.export_jobs WHERE dataset = $1 AND job_id = $2",
            job.dataset,
            job.job_id,
        )
        return None if state is None else JobState(state)

    # --- schedules -----------------------------------------------------------------------

    async def create_schedule(self, schedule: Schedule, name: str) -> Schedule:
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO export.schedules (dataset, schedule_id, display_name, cron,"
                " time_zone, job_template, destination_id, paused, next_run_time,"
                " create_time, update_time)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING *",
                schedule.dataset,
                schedule.schedule_id,
                schedule.display_name,
                schedule.cron,
                schedule.time_zone,
                _spec_to_json(schedule.job_template),
                schedule.job_template.destination_id,
                schedule.paused,
                schedule.next_run_time,
                schedule.create_time,
            )
        except asyncpg.UniqueViolationError:
            raise already_exists(SCHEDULE_TYPE, name) from None
        except asyncpg.ForeignKeyViolationError:
            raise _missing_destination(schedule) from None
        return _schedule(row)

    async def get_schedule(self, dataset: str, schedule_id: str) -> Schedule | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM export.schedules WHERE dataset = $1 AND schedule_id = $2",
            dataset,
            schedule_id,
        )
        return None if row is None else _schedule(row)

    async def list_schedules(self, dataset: str, after: str | None, limit: int) -> list[Schedule]:
        rows = await self._pool.fetch(
            "SELECT * FROM export.schedules WHERE dataset = $1"
            " AND ($2::text IS NULL OR schedule_id > $2) ORDER BY schedule_id LIMIT $3",
            dataset,
            after,
            limit,
        )
        return [_schedule(row) for row in rows]

    async def update_schedule(
        self,
        dataset: str,
        schedule_id: str,
        name: str,
        expected_version: int | None,
        apply: Callable[[Schedule], Schedule],
        now: datetime,
    ) -> Schedule:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM export.schedules WHERE dataset = $1 AND schedule_id = $2 FOR UPDATE",
                dataset,
                schedule_id,
            )
            changed = apply(_schedule(_check_version(row, expected_version, SCHEDULE_TYPE, name)))
            try:
                row = await conn.fetchrow(
                    "UPDATE export.schedules SET display_name = $3, cron = $4, time_zone = $5,"
                    " job_template = $6, destination_id = $7, paused = $8, next_run_time = $9,"
                    " version = version + 1, update_time = $10"
                    " WHERE dataset = $1 AND schedule_id = $2 RETURNING *",
                    dataset,
                    schedule_id,
                    changed.display_name,
                    changed.cron,
                    changed.time_zone,
                    _spec_to_json(changed.job_template),
                    changed.job_template.destination_id,
                    changed.paused,
                    changed.next_run_time,
                    now,
                )
            except asyncpg.ForeignKeyViolationError:
                raise _missing_destination(changed) from None
        return _schedule(row)

    async def delete_schedule(
        self, dataset: str, schedule_id: str, name: str, expected_version: int | None
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT version FROM export.schedules WHERE dataset = $1 AND schedule_id = $2"
                " FOR UPDATE",
                dataset,
                schedule_id,
            )
            _check_version(row, expected_version, SCHEDULE_TYPE, name)
            await conn.execute(
                "DELETE FROM export.schedules WHERE dataset = $1 AND schedule_id = $2",
                dataset,
                schedule_id,
            )

    async def run_due_schedules(
        self,
        now: datetime,
        make_job: Callable[[Schedule], ExportJob],
        next_run: Callable[[Schedule], datetime],
        limit: int = 100,
    ) -> list[ExportJob]:
        """Starts a job for each schedule due at ``now``, once however many runs it missed,
        and moves its next run past ``now``. Replicas share the work without doubles."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT * FROM export.schedules WHERE NOT paused AND next_run_time <= $1"
                " ORDER BY next_run_time LIMIT $2 FOR UPDATE SKIP LOCKED",
                now,
                limit,
            )
            jobs = []
            for row in rows:
                schedule = _schedule(row)
                job = make_job(schedule)
                jobs.append(await self._start_schedule_job(conn, schedule, job, now))
                await conn.execute(
                    "UPDATE export.schedules SET next_run_time = $3"
                    " WHERE dataset = $1 AND schedule_id = $2",
                    schedule.dataset,
                    schedule.schedule_id,
                    next_run(schedule),
                )
        return jobs

    async def run_schedule_now(
        self,
        dataset: str,
        schedule_id: str,
        name: str,
        make_job: Callable[[Schedule], ExportJob],
        now: datetime,
    ) -> ExportJob:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM export.schedules WHERE dataset = $1 AND schedule_id = $2 FOR UPDATE",
                dataset,
                schedule_id,
            )
            if row is None:
                raise not_found(SCHEDULE_TYPE, name)
            schedule = _schedule(row)
            return await self._start_schedule_job(conn, schedule, make_job(schedule), now)

    async def _start_schedule_job(
        self, conn: asyncpg.Connection, schedule: Schedule, job: ExportJob, now: datetime
    ) -> ExportJob:
        row = await conn.fetchrow(
            _INSERT_JOB,
            job.dataset,
            job.job_id,
            _spec_to_json(job.spec),
            job.schedule_id,
            job.time_zone,
            job.create_time,
        )
        await conn.execute(
            "UPDATE export.schedules SET last_run_time = $3, last_job_id = $4"
            " WHERE dataset = $1 AND schedule_id = $2",
            schedule.dataset,
            schedule.schedule_id,
            now,
            job.job_id,
        )
        return _job(row)

    async def delta_cursor(self, dataset: str, schedule_id: str) -> DeltaCursor:
        row = await self._pool.fetchrow(
            "SELECT delta_resume_token, delta_time FROM export.schedules"
            " WHERE dataset = $1 AND schedule_id = $2",
            dataset,
            schedule_id,
        )
        if row is None:
            return DeltaCursor(None, None)
        return DeltaCursor(row["delta_resume_token"], row["delta_time"])

    # --- webhook subscriptions -----------------------------------------------------------

    async def create_subscription(
        self, subscription: WebhookSubscription, name: str
    ) -> WebhookSubscription:
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO export.webhook_subscriptions (dataset, subscription_id,"
                " display_name, url, segment_ids, kinds, secret, paused, max_attempts,"
                " create_time, update_time)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING *",
                subscription.dataset,
                subscription.subscription_id,
                subscription.display_name,
                subscription.url,
                list(subscription.segment_ids),
                sorted(kind.value for kind in subscription.kinds),
                subscription.secret,
                subscription.paused,
                subscription.max_attempts,
                subscription.create_time,
            )
        except asyncpg.UniqueViolationError:
            raise already_exists(SUBSCRIPTION_TYPE, name) from None
        return _subscription(row)

    async def get_subscription(
        self, dataset: str, subscription_id: str
    ) -> WebhookSubscription | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM export.webhook_subscriptions"
            " WHERE dataset = $1 AND subscription_id = $2",
            dataset,
            subscription_id,
        )
        return None if row is None else _subscription(row)

    async def list_subscriptions(
        self, dataset: str, after: str | None, limit: int
    ) -> list[WebhookSubscription]:
        rows = await self._pool.fetch(
            "SELECT * FROM export.webhook_subscriptions WHERE dataset = $1"
            " AND ($2::text IS NULL OR subscription_id > $2) ORDER BY subscription_id LIMIT $3",
            dataset,
            after,
            limit,
        )
        return [_subscription(row) for row in rows]

    async def update_subscription(
        self,
        dataset: str,
        subscription_id: str,
        name: str,
        expected_version: int | None,
        apply: Callable[[WebhookSubscription], WebhookSubscription],
        now: datetime,
    ) -> WebhookSubscription:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM export.webhook_subscriptions"
                " WHERE dataset = $1 AND subscription_id = $2 FOR UPDATE",
                dataset,
                subscription_id,
            )
            current = _subscription(_check_version(row, expected_version, SUBSCRIPTION_TYPE, name))
            changed = apply(current)
            row = await conn.fetchrow(
                "UPDATE export.webhook_subscriptions SET display_name = $3, url = $4,"
                " segment_ids = $5, kinds = $6, secret = $7, paused = $8, max_attempts = $9,"
                " version = version + 1, update_time = $10"
                " WHERE dataset = $1 AND subscription_id = $2 RETURNING *",
                dataset,
                subscription_id,
                changed.display_name,
                changed.url,
                list(changed.segment_ids),
                sorted(kind.value for kind in changed.kinds),
                changed.secret,
                changed.paused,
                changed.max_attempts,
                now,
            )
        return _subscription(row)

    async def delete_subscription(
        self, dataset: str, subscription_id: str, name: str, expected_version: int | None
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT version FROM export.webhook_subscriptions"
                " WHERE dataset = $1 AND subscription_id = $2 FOR UPDATE",
                dataset,
                subscription_id,
            )
            _check_version(row, expected_version, SUBSCRIPTION_TYPE, name)
            await conn.execute(
                "DELETE FROM export.webhook_subscriptions"
                " WHERE dataset = $1 AND subscription_id = $2",
                dataset,
                subscription_id,
            )

    async def claim_watches(
        self, watcher: str, now: datetime, lease: timedelta, limit: int
    ) -> list[WatchedSubscription]:
        """Renews this watcher's subscriptions and takes unwatched ones (never watched, or
        whose watcher stopped renewing), up to ``limit`` in all; returns them all."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "WITH candidates AS ("
                "  SELECT dataset, subscription_id FROM export.webhook_subscriptions"
                "  WHERE watcher = $1 OR watcher IS NULL OR watch_until < $2"
                "  ORDER BY (watcher = $1) DESC NULLS LAST, create_time"
                "  LIMIT $4 FOR UPDATE SKIP LOCKED)"
                " UPDATE export.webhook_subscriptions AS s"
                " SET watcher = $1, watch_until = $3"
                " FROM candidates c"
                " WHERE s.dataset = c.dataset AND s.subscription_id = c.subscription_id"
                " RETURNING s.*",
                watcher,
                now,
                now + lease,
                limit,
            )
        return [WatchedSubscription(_subscription(row), row["resume_token"]) for row in rows]

    async def release_watches(self, watcher: str) -> None:
        await self._pool.execute(
            "UPDATE export.webhook_subscriptions SET watcher = NULL, watch_until = NULL"
            " WHERE watcher = $1",
            watcher,
        )

    async def record_changes(
        self,
        subscription: WebhookSubscription,
        watcher: str,
        deliveries: Sequence[NewDelivery],
        resume_token: str,
        now: datetime,
    ) -> bool:
        """Adds deliveries (a change already recorded is skipped) and moves the cursor past
        them, in one transaction; False when this watcher no longer owns the subscription."""
        async with self._pool.acquire() as conn, conn.transaction():
            mine = await conn.fetchval(
                "SELECT true FROM export.webhook_subscriptions"
                " WHERE dataset = $1 AND subscription_id = $2 AND watcher = $3 FOR UPDATE",
                subscription.dataset,
                subscription.subscription_id,
                watcher,
            )
            if not mine:
                return False
            if deliveries:
                await conn.executemany(
                    "INSERT INTO export.webhook_deliveries (dataset, subscription_id,"
                    " delivery_id, member, segment_id, member_sequence, kind, payload, state,"
                    " create_time, next_attempt_time)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $9)"
                    " ON CONFLICT (dataset, subscription_id, member, segment_id,"
                    " member_sequence, kind) DO NOTHING",
                    [
                        (
                            subscription.dataset,
                            subscription.subscription_id,
                            uuid.UUID(hex=delivery.delivery_id),
                            delivery.member,
                            delivery.segment_id,
                            delivery.member_sequence,
                            delivery.kind.value,
                            delivery.payload,
                            now,
                        )
                        for delivery in deliveries
                    ],
                )
            await conn.execute(
                "UPDATE export.webhook_subscriptions SET resume_token = $3"
                " WHERE dataset = $1 AND subscription_id = $2",
                subscription.dataset,
                subscription.subscription_id,
                resume_token,
            )
        return True

    async def claim_deliveries(
        self, now: datetime, hold: timedelta, limit: int
    ) -> list[ClaimedDelivery]:
        """Claims due deliveries that head their member's queue: no earlier delivery of the
        same member and subscription is still pending. Paused subscriptions wait."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "WITH due AS ("
                "  SELECT d.sequence FROM export.webhook_deliveries d"
                "  JOIN export.webhook_subscriptions s"
                "    ON s.dataset = d.dataset AND s.subscription_id = d.subscription_id"
                "  WHERE d.state = 'pending' AND d.next_attempt_time <= $1"
                "  AND (d.claimed_until IS NULL OR d.claimed_until < $1) AND NOT s.paused"
                "  AND NOT EXISTS (SELECT 1 FROM export.webhook_deliveries e"
                "    WHERE e.dataset = d.dataset AND e.subscription_id = d.subscription_id"
                "    AND e.member = d.member AND e.state = 'pending' AND e.sequence < d.sequence)"
                "  ORDER BY d.sequence LIMIT $3 FOR UPDATE OF d SKIP LOCKED)"
                " UPDATE export.webhook_deliveries AS d SET claimed_until = $2"
                " FROM due, export.webhook_subscriptions s"
                " WHERE d.sequence = due.sequence"
                " AND s.dataset = d.dataset AND s.subscription_id = d.subscription_id"
                " RETURNING d.*, s.url, s.secret, s.max_attempts",
                now,
                now + hold,
                limit,
            )
        return [
            ClaimedDelivery(_delivery(row), row["url"], row["secret"], row["max_attempts"])
            for row in sorted(rows, key=lambda row: row["sequence"])
        ]

    async def finish_attempt(
        self,
        delivery: WebhookDelivery,
        *,
        state: DeliveryState,
        attempt_count: int,
        http_status: int,
        error: str,
        now: datetime,
        next_attempt_time: datetime | None,
    ) -> None:
        await self._pool.execute(
            "UPDATE export.webhook_deliveries SET state = $2, attempt_count = $3,"
            " last_http_status = $4, last_error = $5, last_attempt_time = $6,"
            " next_attempt_time = $7, claimed_until = NULL"
            " WHERE sequence = $1 AND state = 'pending'",
            delivery.sequence,
            state.value,
            attempt_count,
            http_status,
            error,
            now,
            next_attempt_time,
        )

    async def release_claims(self, sequences: Sequence[int]) -> None:
        """Gives back claims on deliveries whose attempt was cut short (a replica stopping
        mid-request), so they go out at once rather than when the claim runs out."""
        await self._pool.execute(
            "UPDATE export.webhook_deliveries SET claimed_until = NULL"
            " WHERE sequence = ANY($1::bigint[]) AND state = 'pending'",
            list(sequences),
        )

    async def list_deliveries(
        self,
        dataset: str,
        subscription_id: str,
        state: DeliveryState,
        before: int | None,
        limit: int,
    ) -> list[WebhookDelivery]:
        rows = await self._pool.fetch(
            "SELECT * FROM export.webhook_deliveries"
            " WHERE dataset = $1 AND subscription_id = $2 AND state = $3"
            " AND ($4::bigint IS NULL OR sequence < $4) ORDER BY sequence DESC LIMIT $5",
            dataset,
            subscription_id,
            state.value,
            before,
            limit,
        )
        return [_delivery(row) for row in rows]

    async def replay_deliveries(
        self, dataset: str, subscription_id: str, delivery_ids: Sequence[str], now: datetime
    ) -> int:
        """Makes dead deliveries (all, when ``delivery_ids`` is empty) pending again, with
        fresh attempts; they keep their place in their member's order."""
        status = await self._pool.execute(
            "UPDATE export.webhook_deliveries SET state = 'pending', attempt_count = 0,"
            " next_attempt_time = $4, claimed_until = NULL, last_error = ''"
            " WHERE dataset = $1 AND subscription_id = $2 AND state = 'dead'"
            " AND (cardinality($3::uuid[]) = 0 OR delivery_id = ANY($3::uuid[]))",
            dataset,
            subscription_id,
            [uuid.UUID(hex=delivery_id) for delivery_id in delivery_ids],
            now,
        )
        return int(status.split()[-1])


_INSERT_JOB = (
    "INSERT INTO export.export_jobs (dataset, job_id, spec, schedule_id, time_zone, state,"
    " create_time, not_before) VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6) RETURNING *"
)


def _missing_destination(schedule: Schedule) -> Exception:
    name = f"datasets/{schedule.dataset}/destinations/{schedule.job_template.destination_id}"
    return not_found(DESTINATION_TYPE, name)
