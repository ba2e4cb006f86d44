"""The export job worker: claims jobs, writes their file, uploads it and publishes it.

A job's file is first written to a local spool file (hashing it on the way), then
uploaded under a temporary name with its manifest and checksum, and finally renamed into
place while the job's row is locked (see :meth:`ExportStore.complete_job`), so a cancel
and a completion never both win. Upload failures are retried with exponential backoff up
to the configured attempts; each failure is recorded on the job.

Replicas share the work: a job is claimed with ``FOR UPDATE SKIP LOCKED`` and held under
a lease the worker renews; a worker that dies stops renewing and the job is claimed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import random
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from audience.errors import AudienceError
from audience.waiting import stop_task
from services.export.domain.backoff import backoff
from services.export.domain.csvrows import CsvLayout
from services.export.domain.files import (
    Manifest,
    SegmentStats,
    checksum_file,
    checksum_name,
    manifest_name,
    render_file_name,
    temporary_name,
    unclaimed_name,
)
from services.export.domain.model import Destination, ExportJob, ExportMode, MemberSnapshot
from services.export.domain.names import EXPORT_JOBS, SCHEDULES, child_name
from services.export.ports import (
    Clock,
    DestinationError,
    FileSink,
    OpenSink,
    ResumePointExpiredError,
)
from services.export.producing import CsvProducer, Piece
from services.export.store import DeltaCursor, ExportStore

__all__ = ["JobRunner", "JobSettings"]

_log = logging.getLogger(__name__)

# Share of the percentage given to writing the rows; the upload takes the rest.
_WRITE_SHARE = 90.0


@dataclass(frozen=True, slots=True)
class JobSettings:
    workers: int = 2
    """Jobs run at once by one replica."""
    poll_interval: timedelta = timedelta(seconds=1)
    lease: timedelta = timedelta(seconds=30)
    max_attempts: int = 5
    """Upload attempts before a job fails."""
    backoff_base: timedelta = timedelta(seconds=2)
    backoff_cap: timedelta = timedelta(minutes=5)
    spool_dir: Path | None = None


@dataclass(slots=True)
class _Progress:
    rows: int = 0
    percent: float = 0.0
    attempts: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _File:
    path: Path
    rows: int
    size: int
    sha256: str
    stats: list[SegmentStats]
    start_time: datetime | None
    end_time: datetime
    snapshot: bool
    cursor: DeltaCursor | None


class _StoppedError(Exception):
    """The job is no longer this worker's: cancelled, or taken over after a lost lease."""


class JobRunner:
    def __init__(
        self,
        store: ExportStore,
        producer: CsvProducer,
        open_sink: OpenSink,
        clock: Clock,
        settings: JobSettings,
        *,
        worker_id: str | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._producer = producer
        self._open_sink = open_sink
        self._clock = clock
        self._settings = settings
        self.worker_id = worker_id or f"export-{uuid.uuid4().hex[:12]}"
        self._jitter = jitter
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Looks for work at once (a job was just created here)."""
        self._wake.set()

    async def run_forever(self) -> None:
        slots = asyncio.Semaphore(self._settings.workers)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                try:
                    job = await self._store.claim_job(
                        self.worker_id, self._clock.now(), self._settings.lease
                    )
                except Exception:
                    slots.release()
                    _log.exception("Claiming an export job failed; trying again")
                    await asyncio.sleep(self._settings.poll_interval.total_seconds())
                    continue
                if job is None:
                    slots.release()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), self._settings.poll_interval.total_seconds()
                        )
                    continue
                task = asyncio.create_task(self.run(job), name=f"export-job-{job.job_id}")
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def run(self, job: ExportJob) -> None:
        """Runs one claimed job to its end: succeeded, failed, or stopped by a cancel."""
        progress = _Progress(rows=job.rows_written, attempts=job.attempt_count)
        work = asyncio.create_task(self._work(job, progress))
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(job, progress, work, lost))
        try:
            await work
        except _StoppedError:
            _log.info("Export job %s/%s stopped: cancelled or taken over", job.dataset, job.job_id)
        except asyncio.CancelledError:
            if not lost.is_set():
                # The host is stopping: hand the job back rather than let its lease run out.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._store.release_job(job, self.worker_id))
                raise
            _log.info("Export job %s/%s stopped: cancelled or taken over", job.dataset, job.job_id)
        except Exception as error:
            _log.exception("Export job %s/%s failed", job.dataset, job.job_id)
            await self._store.fail_job(
                job, self.worker_id, _describe(error), progress.attempts, self._clock.now()
            )
        finally:
            await stop_task(keeper)

    async def _keep_lease(
        self,
        job: ExportJob,
        progress: _Progress,
        work: asyncio.Task[None],
        lost: asyncio.Event,
    ) -> None:
        lease = self._settings.lease
        interval = lease.total_seconds() / 3
        last_renewal = self._clock.now()
        while True:
            await asyncio.sleep(interval)
            now = self._clock.now()
            try:
                mine = await self._store.renew_job(
                    job,
                    self.worker_id,
                    now + lease,
                    rows_written=progress.rows,
                    percent=progress.percent,
                    attempt_count=progress.attempts,
                    error=progress.error,
                )
            except Exception:
                _log.exception("Renewing export job %s/%s failed", job.dataset, job.job_id)
                # Past most of the lease another worker may take the job: stop writing.
                mine = now - last_renewal < lease * 2 / 3
            else:
                last_renewal = now
            if not mine:
                lost.set()
                work.cancel()
                return

    async def _work(self, job: ExportJob, progress: _Progress) -> None:
        destination = await self._store.get_destination(job.dataset, job.spec.destination_id)
        if destination is None:
            raise DestinationError(
                f"the destination {job.spec.destination_id!r} no longer exists", retryable=False
            )
        settings = self._settings
        with tempfile.TemporaryDirectory(
            prefix="audience-export-", dir=settings.spool_dir
        ) as directory:
            for attempt in itertools.count(1):
                try:
                    produced = await self._produce(job, progress, Path(directory) / "export.csv")
                    break
                except (AudienceError, TimeoutError) as error:
                    # A peer restarting must not cost a night's feed: reading is retried
                    # like an upload.
                    if not _transient(error) or attempt >= settings.max_attempts:
                        raise
                    progress.error = f"reading the members failed: {_describe(error)}"
                    delay = backoff(
                        attempt, settings.backoff_base, settings.backoff_cap, self._jitter()
                    )
                    _log.warning(
                        "Export job %s/%s: %s; retrying in %.1fs",
                        job.dataset,
                        job.job_id,
                        progress.error,
                        delay.total_seconds(),
                    )
                    await asyncio.sleep(delay.total_seconds())
            await self._upload(job, destination, produced, progress)

    async def _produce(self, job: ExportJob, progress: _Progress, path: Path) -> _File:
        spec = job.spec
        layout = CsvLayout(spec.columns, spec.mode)
        stats: dict[str, SegmentStats] = {}
        started = self._clock.now()
        start_time: datetime | None = started
        snapshot = spec.mode is ExportMode.DELTA
        cursor: DeltaCursor | None = None
        pieces = None
        total = 0
        if spec.mode is ExportMode.DELTA:
            previous = (
                await self._store.delta_cursor(job.dataset, job.schedule_id)
                if job.schedule_id is not None
                else DeltaCursor(None, None)
            )
            if previous.resume_token is not None:
                try:
                    delta = await self._producer.read_delta(
                        job.dataset, spec.segment_ids, previous.resume_token, started
                    )
                except ResumePointExpiredError as error:
                    _log.warning(
                        "Delta feed of %s/%s resumes from a point the change log no longer "
                        "holds (%s); writing every member instead",
                        job.dataset,
                        job.job_id,
                        error,
                    )
                else:
                    snapshot = False
                    start_time = previous.time
                    cursor = DeltaCursor(delta.resume_token, delta.end_time)
                    total = len(delta.rows)
                    pieces = self._producer.changes(job.dataset, delta.rows, layout, stats)
        listed: list[MemberSnapshot] = []
        if pieces is None:
            total = await self._producer.count(job.dataset, spec.segment_ids)
            pieces = self._producer.members(
                job.dataset, spec.segment_ids, layout, stats, snapshots=listed
            )
        digest = hashlib.sha256()
        size = 0
        rows = 0

        def write(handle: BinaryIO, text: str) -> None:
            nonlocal size
            data = text.encode("utf-8")
            digest.update(data)
            size += len(data)
            handle.write(data)

        with path.open("wb") as handle:
            write(handle, layout.header())
            piece: Piece
            async for piece in pieces:
                write(handle, piece.text)
                rows += piece.rows
                progress.rows = rows
                progress.percent = min(_WRITE_SHARE, _WRITE_SHARE * rows / max(total, 1))
        end_time = self._clock.now()
        if snapshot and job.schedule_id is not None:
            # The next run reads the changes from where the first segment was listed: the
            # file holds none of them for that segment, and the later segments' listings,
            # read after it, hold some, which come again as repeats a receiver can apply.
            cursor = DeltaCursor(listed[0].resume_token, listed[0].read_time)
        if cursor is not None and spec.mode is ExportMode.DELTA and not snapshot:
            end_time = cursor.time or end_time
            await self._store.set_delta_range(job, self.worker_id, start_time, end_time)
        elif spec.mode is ExportMode.DELTA:
            await self._store.set_delta_range(job, self.worker_id, None, started)
        progress.percent = _WRITE_SHARE
        return _File(
            path=path,
            rows=rows,
            size=size,
            sha256=digest.hexdigest(),
            stats=[stats.get(s) or SegmentStats(_segment(job, s)) for s in spec.segment_ids],
            start_time=start_time,
            end_time=end_time,
            snapshot=snapshot,
            cursor=cursor,
        )

    @staticmethod
    def _manifest(job: ExportJob, produced: _File, final: str) -> Manifest:
        return Manifest(
            job=child_name(job.dataset, EXPORT_JOBS, job.job_id),
            schedule=(
                child_name(job.dataset, SCHEDULES, job.schedule_id) if job.schedule_id else None
            ),
            file_name=final,
            sha256=produced.sha256,
            size_bytes=produced.size,
            mode=job.spec.mode,
            columns=CsvLayout(job.spec.columns, job.spec.mode).columns,
            segments=produced.stats,
            start_time=produced.start_time,
            end_time=produced.end_time,
            snapshot=produced.snapshot,
        )

    async def _upload(
        self, job: ExportJob, destination: Destination, produced: _File, progress: _Progress
    ) -> None:
        settings = self._settings
        rendered = render_file_name(
            job.spec.file_name_template, job.spec.segment_ids, job.create_time, job.time_zone
        )
        while True:
            progress.attempts += 1
            try:
                async with self._open_sink(destination.target) as sink:
                    final = rendered
                    if await sink.exists(final):
                        final = unclaimed_name(rendered, job.job_id)
                    manifest = self._manifest(job, produced, final)
                    names = {
                        temporary_name(final, job.job_id): final,
                        temporary_name(checksum_name(final), job.job_id): checksum_name(final),
                        temporary_name(manifest_name(final), job.job_id): manifest_name(final),
                    }
                    try:
                        await self._send(
                            sink, produced, temporary_name(final, job.job_id), progress
                        )
                        await sink.write_text(
                            temporary_name(checksum_name(final), job.job_id),
                            checksum_file(final, produced.sha256),
                        )
                        await sink.write_text(
                            temporary_name(manifest_name(final), job.job_id), manifest.to_json()
                        )

                        async def publish(
                            sink: FileSink = sink, names: dict[str, str] = names
                        ) -> None:
                            # The data file first and the manifest last: a receiver that
                            # waits for the manifest finds everything in place.
                            for temporary, target in names.items():
                                await sink.rename(temporary, target)

                        published = await self._store.complete_job(
                            job,
                            self.worker_id,
                            publish,
                            rows_written=produced.rows,
                            file_path=sink.path_of(final),
                            sha256=produced.sha256,
                            attempt_count=progress.attempts,
                            now=self._clock.now(),
                            delta_cursor=produced.cursor,
                        )
                    except BaseException:
                        await _remove_quietly(sink, names)
                        raise
                    if not published:
                        await _remove_quietly(sink, names)
                        raise _StoppedError()
                    _log.info(
                        "Export job %s/%s wrote %d rows to %s",
                        job.dataset,
                        job.job_id,
                        produced.rows,
                        sink.path_of(final),
                    )
                    return
            except DestinationError as error:
                progress.error = f"attempt {progress.attempts}: {error}"
                if not error.retryable:
                    raise
                if progress.attempts >= settings.max_attempts:
                    raise DestinationError(
                        f"gave up after {progress.attempts} upload attempts; the last: {error}",
                        retryable=False,
                    ) from error
                delay = backoff(
                    progress.attempts, settings.backoff_base, settings.backoff_cap, self._jitter()
                )
                _log.warning(
                    "Export job %s/%s: upload attempt %d failed (%s); retrying in %.1fs",
                    job.dataset,
                    job.job_id,
                    progress.attempts,
                    error,
                    delay.total_seconds(),
                )
                await self._store.renew_job(
                    job,
                    self.worker_id,
                    self._clock.now() + settings.lease,
                    rows_written=progress.rows,
                    percent=progress.percent,
                    attempt_count=progress.attempts,
                    error=progress.error,
                )
                await asyncio.sleep(delay.total_seconds())

    async def _send(
        self, sink: FileSink, produced: _File, temporary: str, progress: _Progress
    ) -> None:
        size = max(produced.size, 1)

        def sent(copied: int) -> None:
            progress.percent = _WRITE_SHARE + (100 - _WRITE_SHARE) * min(copied, size) / size

        await sink.upload(produced.path, temporary, sent)


def _segment(job: ExportJob, segment_id: str) -> str:
    return f"datasets/{job.dataset}/segments/{segment_id}"


async def _remove_quietly(sink: FileSink, names: dict[str, str]) -> None:
    for temporary in names:
        try:
            await asyncio.shield(sink.remove(temporary))
        except (DestinationError, asyncio.CancelledError):
            _log.warning("Could not remove the temporary file %s", temporary)


# Status codes (by name) of peer failures that a later attempt may not meet.
_TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"})


def _transient(error: BaseException) -> bool:
    if isinstance(error, AudienceError):
        return error.code.name in _TRANSIENT
    return isinstance(error, TimeoutError)


def _describe(error: BaseException) -> str:
    if isinstance(error, DestinationError):
        return str(error)
    if isinstance(error, AudienceError):
        return error.message
    if isinstance(error, TimeoutError):
        return "reading the segment engine's change stream took too long"
    return f"internal error ({type(error).__name__})"
