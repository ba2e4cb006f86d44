"""What each RPC of ``ExportService`` does, in domain terms; ``grpc.py`` only translates.

Every method takes already-parsed ids and domain values, checks them, and calls the store,
the scheduler or the producer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from audience.errors import FieldViolation, aborted, invalid_argument, not_found
from services.export.domain.cron import next_run, validate_cron, validate_time_zone
from services.export.domain.csvrows import CsvLayout, validate_columns
from services.export.domain.destinations import validate_target
from services.export.domain.jobs import MAX_SEGMENTS, generated_job_id, new_job, validate_spec
from services.export.domain.model import (
    ChangeKind,
    Column,
    DeliveryState,
    Destination,
    ExportJob,
    ExportMode,
    JobSpec,
    Schedule,
    Target,
    WebhookDelivery,
    WebhookSubscription,
)
from services.export.domain.names import (
    DESTINATIONS,
    EXPORT_JOBS,
    SCHEDULES,
    WEBHOOK_SUBSCRIPTIONS,
    check_new_id,
    child_name,
)
from services.export.domain.pages import decode_token, encode_token, page_size
from services.export.domain.webhooks import (
    validate_max_attempts,
    validate_secret,
    validate_url,
)
from services.export.ports import Clock
from services.export.producing import CsvProducer
from services.export.scheduler import Scheduler
from services.export.store import (
    DESTINATION_TYPE,
    JOB_TYPE,
    SCHEDULE_TYPE,
    SUBSCRIPTION_TYPE,
    ExportStore,
)

__all__ = [
    "DownloadChunk",
    "ExportApplication",
    "SubscriptionFields",
    "etag",
    "parse_etag",
]

_ETAG = re.compile(r"v(\d{1,18})")
MAX_DOWNLOAD_CHUNK = 1024 * 1024
MAX_SUBSCRIPTION_SEGMENTS = 1000


def etag(version: int) -> str:
    return f"v{version}"


def parse_etag(value: str, name: str) -> int | None:
    """The version an etag stands for; None when no etag was given."""
    if not value:
        return None
    match = _ETAG.fullmatch(value)
    if match is None:
        raise aborted(
            f"The etag of {name} is stale or not one it ever had.", reason="ETAG_MISMATCH"
        )
    return int(match[1])


MAX_DISPLAY_NAME = 200


def _display_name(value: str, field: str) -> str:
    if len(value) > MAX_DISPLAY_NAME:
        description = f"at most {MAX_DISPLAY_NAME} characters"
        raise invalid_argument(f"{field}: {description}", FieldViolation(field, description))
    return value


def _unknown_mask(paths: Sequence[str], allowed: Sequence[str]) -> None:
    if not paths:
        raise invalid_argument(
            "update_mask: required", FieldViolation("update_mask", "name the fields to update")
        )
    unknown = [path for path in paths if path not in allowed]
    if unknown:
        description = f"only {', '.join(allowed)} can be updated, not {', '.join(unknown)}"
        raise invalid_argument(
            f"update_mask: {description}", FieldViolation("update_mask.paths", description)
        )


@dataclass(frozen=True, slots=True)
class SubscriptionFields:
    """A subscription's settings as a request gives them."""

    display_name: str
    url: str
    segment_ids: tuple[str, ...]
    kinds: frozenset[ChangeKind]
    secret: str
    paused: bool
    max_attempts: int


@dataclass(frozen=True, slots=True)
class DownloadChunk:
    data: bytes
    rows_sent: int
    rows_total: int


class ExportApplication:
    def __init__(
        self,
        store: ExportStore,
        producer: CsvProducer,
        scheduler: Scheduler,
        clock: Clock,
        *,
        export_root: Path | None,
        on_job: Callable[[], None] = lambda: None,
        on_subscription: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._producer = producer
        self._scheduler = scheduler
        self._clock = clock
        self._root = str(export_root) if export_root is not None else None
        self._on_job = on_job
        self._on_subscription = on_subscription

    # --- CSV download --------------------------------------------------------------------

    async def download(
        self, dataset: str, segment_ids: Sequence[str], columns: Sequence[Column]
    ) -> AsyncIterator[DownloadChunk]:
        if not 1 <= len(segment_ids) <= MAX_SEGMENTS or len(set(segment_ids)) != len(segment_ids):
            description = f"1 to {MAX_SEGMENTS} distinct segments of one dataset"
            raise invalid_argument(
                f"segments: {description}", FieldViolation("segments", description)
            )
        validate_columns(columns)
        layout = CsvLayout(columns, ExportMode.FULL)
        total = await self._producer.count(dataset, segment_ids)
        header = layout.header().encode()
        buffered: list[bytes] = [header]
        size = len(header)
        sent = 0
        pieces = self._producer.members(dataset, segment_ids, layout, {}, versions=False)
        async for piece in pieces:
            data = piece.text.encode()
            if size and size + len(data) > MAX_DOWNLOAD_CHUNK:
                yield DownloadChunk(b"".join(buffered), sent, max(total, sent))
                buffered, size = [], 0
            buffered.append(data)
            size += len(data)
            sent += piece.rows
        yield DownloadChunk(b"".join(buffered), sent, max(total, sent))

    # --- destinations --------------------------------------------------------------------

    async def create_destination(
        self, dataset: str, destination_id: str, display_name: str, target: Target | None
    ) -> Destination:
        check_new_id(destination_id, "destination_id")
        now = self._clock.now()
        destination = Destination(
            dataset=dataset,
            destination_id=destination_id,
            display_name=_display_name(display_name, "destination.display_name"),
            target=validate_target(target, self._root, "destination"),
            create_time=now,
            update_time=now,
            version=1,
        )
        name = child_name(dataset, DESTINATIONS, destination_id)
        return await self._store.create_destination(destination, name)

    async def get_destination(self, dataset: str, destination_id: str) -> Destination:
        destination = await self._store.get_destination(dataset, destination_id)
        if destination is None:
            raise not_found(DESTINATION_TYPE, child_name(dataset, DESTINATIONS, destination_id))
        return destination

    async def list_destinations(
        self, dataset: str, size: int, token: str
    ) -> tuple[list[Destination], str]:
        limit = page_size(size)
        position = decode_token(token, "destinations")
        items = await self._store.list_destinations(
            dataset, str(position[0]) if position else None, limit + 1
        )
        more = len(items) > limit
        items = items[:limit]
        next_token = encode_token("destinations", [items[-1].destination_id]) if more else ""
        return items, next_token

    async def update_destination(
        self,
        dataset: str,
        destination_id: str,
        etag_value: str,
        paths: Sequence[str],
        display_name: str,
        target: Target | None,
    ) -> Destination:
        _unknown_mask(paths, ("display_name", "folder", "sftp"))
        _display_name(display_name, "destination.display_name")
        name = child_name(dataset, DESTINATIONS, destination_id)
        changed_target = None
        if "folder" in paths or "sftp" in paths:
            changed_target = validate_target(target, self._root, "destination")

        def apply(current: Destination) -> Destination:
            return dataclasses.replace(
                current,
                display_name=display_name if "display_name" in paths else current.display_name,
                target=changed_target or current.target,
            )

        return await self._store.update_destination(
            dataset, destination_id, name, parse_etag(etag_value, name), apply, self._clock.now()
        )

    async def delete_destination(self, dataset: str, destination_id: str, etag_value: str) -> None:
        name = child_name(dataset, DESTINATIONS, destination_id)
        await self._store.delete_destination(
            dataset, destination_id, name, parse_etag(etag_value, name)
        )

    # --- export jobs ---------------------------------------------------------------------

    async def _check_spec(self, dataset: str, spec: JobSpec, field: str) -> JobSpec:
        spec = validate_spec(spec, field)
        if await self._store.get_destination(dataset, spec.destination_id) is None:
            raise not_found(
                DESTINATION_TYPE, child_name(dataset, DESTINATIONS, spec.destination_id)
            )
        return spec

    async def create_job(self, dataset: str, job_id: str, spec: JobSpec) -> ExportJob:
        job_id = check_new_id(job_id, "export_job_id") if job_id else generated_job_id()
        spec = await self._check_spec(dataset, spec, "export_job")
        job = new_job(
            dataset, job_id, spec, schedule_id=None, time_zone="UTC", now=self._clock.now()
        )
        created = await self._store.create_job(job, child_name(dataset, EXPORT_JOBS, job_id))
        self._on_job()
        return created

    async def get_job(self, dataset: str, job_id: str) -> ExportJob:
        job = await self._store.get_job(dataset, job_id)
        if job is None:
            raise not_found(JOB_TYPE, child_name(dataset, EXPORT_JOBS, job_id))
        return job

    async def list_jobs(
        self, dataset: str, schedule_id: str | None, size: int, token: str
    ) -> tuple[list[ExportJob], str]:
        limit = page_size(size)
        kind = f"jobs:{schedule_id or ''}"
        position = decode_token(token, kind)
        after = None
        if position is not None:
            try:
                after = (datetime.fromisoformat(str(position[0])), str(position[1]))
            except (ValueError, IndexError):
                raise invalid_argument(
                    "page_token: not a page token of this method",
                    FieldViolation("page_token", "pass a next_page_token unchanged"),
                ) from None
        items = await self._store.list_jobs(dataset, schedule_id, after, limit + 1)
        more = len(items) > limit
        items = items[:limit]
        next_token = ""
        if more:
            last = items[-1]
            next_token = encode_token(kind, [last.create_time.isoformat(), last.job_id])
        return items, next_token

    async def cancel_job(self, dataset: str, job_id: str) -> ExportJob:
        return await self._store.cancel_job(
            dataset, job_id, child_name(dataset, EXPORT_JOBS, job_id), self._clock.now()
        )

    # --- schedules -----------------------------------------------------------------------

    async def create_schedule(
        self,
        dataset: str,
        schedule_id: str,
        display_name: str,
        cron: str,
        time_zone: str,
        template: JobSpec,
        paused: bool,
    ) -> Schedule:
        check_new_id(schedule_id, "schedule_id")
        _display_name(display_name, "schedule.display_name")
        cron = validate_cron(cron, "schedule.cron")
        time_zone = validate_time_zone(time_zone, "schedule.time_zone")
        template = await self._check_spec(dataset, template, "schedule.job_template")
        now = self._clock.now()
        schedule = Schedule(
            dataset=dataset,
            schedule_id=schedule_id,
            display_name=display_name,
            cron=cron,
            time_zone=time_zone,
            job_template=template,
            paused=paused,
            next_run_time=None if paused else next_run(cron, time_zone, now),
            last_run_time=None,
            last_job_id=None,
            create_time=now,
            update_time=now,
            version=1,
        )
        return await self._store.create_schedule(
            schedule, child_name(dataset, SCHEDULES, schedule_id)
        )

    async def get_schedule(self, dataset: str, schedule_id: str) -> Schedule:
        schedule = await self._store.get_schedule(dataset, schedule_id)
        if schedule is None:
            raise not_found(SCHEDULE_TYPE, child_name(dataset, SCHEDULES, schedule_id))
        return schedule

    async def list_schedules(
        self, dataset: str, size: int, token: str
    ) -> tuple[list[Schedule], str]:
        limit = page_size(size)
        position = decode_token(token, "schedules")
        items = await self._store.list_schedules(
            dataset, str(position[0]) if position else None, limit + 1
        )
        more = len(items) > limit
        items = items[:limit]
        return items, encode_token("schedules", [items[-1].schedule_id]) if more else ""

    async def update_schedule(
        self,
        dataset: str,
        schedule_id: str,
        etag_value: str,
        paths: Sequence[str],
        display_name: str,
        cron: str,
        time_zone: str,
        template: JobSpec | None,
        paused: bool,
    ) -> Schedule:
        _unknown_mask(paths, ("display_name", "cron", "time_zone", "job_template", "paused"))
        _display_name(display_name, "schedule.display_name")
        name = child_name(dataset, SCHEDULES, schedule_id)
        if "cron" in paths:
            cron = validate_cron(cron, "schedule.cron")
        if "time_zone" in paths:
            time_zone = validate_time_zone(time_zone, "schedule.time_zone")
        checked_template = None
        if "job_template" in paths:
            if template is None:
                raise invalid_argument(
                    "schedule.job_template: required",
                    FieldViolation("schedule.job_template", "required by the update mask"),
                )
            checked_template = await self._check_spec(dataset, template, "schedule.job_template")
        now = self._clock.now()

        def apply(current: Schedule) -> Schedule:
            changed = dataclasses.replace(
                current,
                display_name=display_name if "display_name" in paths else current.display_name,
                cron=cron if "cron" in paths else current.cron,
                time_zone=time_zone if "time_zone" in paths else current.time_zone,
                job_template=checked_template or current.job_template,
                paused=paused if "paused" in paths else current.paused,
            )
            timing = (changed.cron, changed.time_zone, changed.paused)
            if timing != (current.cron, current.time_zone, current.paused):
                changed = dataclasses.replace(
                    changed,
                    next_run_time=(
                        None if changed.paused else next_run(changed.cron, changed.time_zone, now)
                    ),
                )
            return changed

        return await self._store.update_schedule(
            dataset, schedule_id, name, parse_etag(etag_value, name), apply, now
        )

    async def delete_schedule(self, dataset: str, schedule_id: str, etag_value: str) -> None:
        name = child_name(dataset, SCHEDULES, schedule_id)
        await self._store.delete_schedule(dataset, schedule_id, name, parse_etag(etag_value, name))

    async def run_schedule(self, dataset: str, schedule_id: str) -> ExportJob:
        return await self._scheduler.run_now(
            dataset, schedule_id, child_name(dataset, SCHEDULES, schedule_id)
        )

    # --- webhooks ------------------------------------------------------------------------

    def _check_subscription_segments(self, segment_ids: Sequence[str]) -> tuple[str, ...]:
        if len(segment_ids) > MAX_SUBSCRIPTION_SEGMENTS:
            description = f"at most {MAX_SUBSCRIPTION_SEGMENTS} segments"
            raise invalid_argument(
                f"segments: {description}", FieldViolation("segments", description)
            )
        return tuple(dict.fromkeys(segment_ids))

    async def create_subscription(
        self,
        dataset: str,
        subscription_id: str,
        fields: SubscriptionFields,
    ) -> WebhookSubscription:
        check_new_id(subscription_id, "webhook_subscription_id")
        _display_name(fields.display_name, "webhook_subscription.display_name")
        now = self._clock.now()
        subscription = WebhookSubscription(
            dataset=dataset,
            subscription_id=subscription_id,
            display_name=fields.display_name,
            url=validate_url(fields.url, "webhook_subscription.url"),
            segment_ids=self._check_subscription_segments(fields.segment_ids),
            kinds=fields.kinds,
            secret=validate_secret(fields.secret, "webhook_subscription.secret"),
            paused=fields.paused,
            max_attempts=validate_max_attempts(
                fields.max_attempts, "webhook_subscription.max_attempts"
            ),
            create_time=now,
            update_time=now,
            version=1,
        )
        created = await self._store.create_subscription(
            subscription, child_name(dataset, WEBHOOK_SUBSCRIPTIONS, subscription_id)
        )
        self._on_subscription()
        return created

    async def get_subscription(self, dataset: str, subscription_id: str) -> WebhookSubscription:
        subscription = await self._store.get_subscription(dataset, subscription_id)
        if subscription is None:
            raise not_found(
                SUBSCRIPTION_TYPE, child_name(dataset, WEBHOOK_SUBSCRIPTIONS, subscription_id)
            )
        return subscription

    async def list_subscriptions(
        self, dataset: str, size: int, token: str
    ) -> tuple[list[WebhookSubscription], str]:
        limit = page_size(size)
        position = decode_token(token, "subscriptions")
        items = await self._store.list_subscriptions(
            dataset, str(position[0]) if position else None, limit + 1
        )
        more = len(items) > limit
        items = items[:limit]
        return items, encode_token("subscriptions", [items[-1].subscription_id]) if more else ""

    async def update_subscription(
        self,
        dataset: str,
        subscription_id: str,
        etag_value: str,
        paths: Sequence[str],
        values: SubscriptionFields,
    ) -> WebhookSubscription:
        allowed = ("display_name", "url", "segments", "kinds", "secret", "paused", "max_attempts")
        _unknown_mask(paths, allowed)
        _display_name(values.display_name, "webhook_subscription.display_name")
        name = child_name(dataset, WEBHOOK_SUBSCRIPTIONS, subscription_id)
        url = validate_url(values.url, "webhook_subscription.url") if "url" in paths else ""
        secret = (
            validate_secret(values.secret, "webhook_subscription.secret")
            if "secret" in paths
            else ""
        )
        attempts = (
            validate_max_attempts(values.max_attempts, "webhook_subscription.max_attempts")
            if "max_attempts" in paths
            else 0
        )
        segments = self._check_subscription_segments(values.segment_ids)

        def apply(current: WebhookSubscription) -> WebhookSubscription:
            return dataclasses.replace(
                current,
                display_name=(
                    values.display_name if "display_name" in paths else current.display_name
                ),
                url=url or current.url,
                segment_ids=segments if "segments" in paths else current.segment_ids,
                kinds=values.kinds if "kinds" in paths else current.kinds,
                secret=secret or current.secret,
                paused=values.paused if "paused" in paths else current.paused,
                max_attempts=attempts or current.max_attempts,
            )

        updated = await self._store.update_subscription(
            dataset, subscription_id, name, parse_etag(etag_value, name), apply, self._clock.now()
        )
        self._on_subscription()
        return updated

    async def delete_subscription(
        self, dataset: str, subscription_id: str, etag_value: str
    ) -> None:
        name = child_name(dataset, WEBHOOK_SUBSCRIPTIONS, subscription_id)
        await self._store.delete_subscription(
            dataset, subscription_id, name, parse_etag(etag_value, name)
        )
        self._on_subscription()

    async def list_deliveries(
        self,
        dataset: str,
        subscription_id: str,
        state: DeliveryState,
        size: int,
        token: str,
    ) -> tuple[list[WebhookDelivery], str]:
        await self.get_subscription(dataset, subscription_id)
        limit = page_size(size)
        kind = f"deliveries:{state.value}"
        position = decode_token(token, kind)
        before = int(position[0]) if position and isinstance(position[0], int) else None
        items = await self._store.list_deliveries(
            dataset, subscription_id, state, before, limit + 1
        )
        more = len(items) > limit
        items = items[:limit]
        return items, encode_token(kind, [items[-1].sequence]) if more else ""

    async def replay_deliveries(
        self, dataset: str, subscription_id: str, delivery_ids: Sequence[str]
    ) -> int:
        if len(delivery_ids) > 1000:
            raise invalid_argument(
                "names: at most 1,000 deliveries", FieldViolation("names", "at most 1,000")
            )
        await self.get_subscription(dataset, subscription_id)
        return await self._store.replay_deliveries(
            dataset, subscription_id, delivery_ids, self._clock.now()
        )
