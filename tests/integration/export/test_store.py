"""The export store on real PostgreSQL: claiming jobs, cancel against completion, schedules
that missed runs, and webhook deliveries in member order."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from audience.errors import AudienceError
from services.export.domain.jobs import new_job
from services.export.domain.model import (
    ChangeKind,
    DeliveryState,
    Destination,
    ExportJob,
    ExportMode,
    FolderTarget,
    JobSpec,
    JobState,
    Schedule,
    WebhookSubscription,
)
from services.export.scheduler import Scheduler
from services.export.store import ExportStore, NewDelivery

pytestmark = pytest.mark.integration

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.moment = now

    def now(self) -> datetime:
        return self.moment


def dataset() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def spec(destination_id: str = "out", mode: ExportMode = ExportMode.FULL) -> JobSpec:
    return JobSpec(("vip",), mode, (), destination_id, "feed-{date}.csv")


async def with_destination(store: ExportStore, name: str) -> str:
    await store.create_destination(
        Destination(name, "out", "", FolderTarget("/exports/x"), T0, T0, 1), "d"
    )
    return name


async def add_job(
    store: ExportStore, name: str, job_id: str, schedule_id: str | None = None
) -> ExportJob:
    job = new_job(name, job_id, spec(), schedule_id=schedule_id, time_zone="UTC", now=T0)
    return await store.create_job(job, job_id)


def schedule(name: str, schedule_id: str, next_run: datetime | None) -> Schedule:
    return Schedule(
        dataset=name,
        schedule_id=schedule_id,
        display_name="",
        cron="0 2 * * *",
        time_zone="Europe/Paris",
        job_template=spec(mode=ExportMode.DELTA),
        paused=False,
        next_run_time=next_run,
        last_run_time=None,
        last_job_id=None,
        create_time=T0,
        update_time=T0,
        version=1,
    )


async def test_each_job_is_claimed_by_one_worker_even_when_they_race(store: ExportStore) -> None:
    name = await with_destination(store, dataset())
    for index in range(6):
        await add_job(store, name, f"j{index}")

    claims = await asyncio.gather(
        *(store.claim_job(f"w{n}", T0 + timedelta(seconds=1), LEASE) for n in range(12))
    )

    mine = [job.job_id for job in claims if job is not None and job.dataset == name]
    assert len(mine) == len(set(mine))


async def test_a_job_whose_worker_stopped_renewing_is_claimed_again(store: ExportStore) -> None:
    name = await with_destination(store, dataset())
    await add_job(store, name, "crashy")
    # Only this test's jobs matter; other tests' jobs may be claimed along the way.
    first = await _claim_own(store, name, "w1", T0)
    assert first is not None

    assert await _claim_own(store, name, "w2", T0 + LEASE / 2) is None
    again = await _claim_own(store, name, "w2", T0 + LEASE * 2)
    assert again is not None
    assert again.job_id == "crashy"
    assert again.state is JobState.RUNNING
    assert not await store.renew_job(first, "w1", T0 + LEASE * 3, rows_written=1, percent=1.0), (
        "the first worker lost the job"
    )


async def _claim_own(store: ExportStore, name: str, worker: str, now: datetime) -> ExportJob | None:
    while (job := await store.claim_job(worker, now, LEASE)) is not None:
        if job.dataset == name:
            return job
        await store.release_job(job, worker)
        # A job of another test: leave it pending for its owner, and look no further for it.
        await store.cancel_job(job.dataset, job.job_id, job.job_id, now)
    return None


async def test_a_schedule_runs_one_job_at_a_time(store: ExportStore) -> None:
    name = await with_destination(store, dataset())
    await store.create_schedule(schedule(name, "nightly", None), "s")
    await add_job(store, name, "run-1", schedule_id="nightly")
    await add_job(store, name, "run-2", schedule_id="nightly")

    first = await _claim_own(store, name, "w1", T0)
    second = await _claim_own(store, name, "w2", T0)

    assert first is not None
    assert second is None


async def test_cancel_stops_a_running_job_and_then_nothing_is_published(
    store: ExportStore,
) -> None:
    name = await with_destination(store, dataset())
    await add_job(store, name, "j")
    job = await _claim_own(store, name, "w", T0)
    assert job is not None

    cancelled = await store.cancel_job(name, "j", "j", T0)
    published: list[bool] = []

    async def publish() -> None:
        published.append(True)

    done = await store.complete_job(
        job,
        "w",
        publish,
        rows_written=1,
        file_path="/x",
        sha256="",
        attempt_count=1,
        now=T0,
        delta_cursor=None,
    )

    assert cancelled.state is JobState.CANCELLED
    assert (done, published) == (False, [])
    assert not await store.renew_job(job, "w", T0 + LEASE, rows_written=0, percent=0)


async def test_a_cancel_during_publishing_waits_and_finds_the_job_succeeded(
    store: ExportStore,
) -> None:
    name = await with_destination(store, dataset())
    await add_job(store, name, "j")
    job = await _claim_own(store, name, "w", T0)
    assert job is not None
    renaming = asyncio.Event()
    cancel: asyncio.Task[ExportJob] | None = None

    async def publish() -> None:
        nonlocal cancel
        cancel = asyncio.create_task(store.cancel_job(name, "j", "j", T0))
        renaming.set()
        await asyncio.sleep(0.2)

    done = await store.complete_job(
        job,
        "w",
        publish,
        rows_written=5,
        file_path="/x/feed.csv",
        sha256="ab",
        attempt_count=1,
        now=T0,
        delta_cursor=None,
    )

    assert done
    assert cancel is not None
    assert (await cancel).state is JobState.SUCCEEDED


async def test_a_schedule_that_missed_runs_while_down_runs_once_on_start(
    store: ExportStore,
) -> None:
    name = await with_destination(store, dataset())
    clock = Clock(T0)
    first_run = datetime(2024, 6, 2, 0, 0, tzinfo=UTC)  # 02:00 in Paris
    await store.create_schedule(schedule(name, "nightly", first_run), "s")
    scheduler = Scheduler(store, clock)

    # Down for three nights: the service starts again on June 5th at 09:00 UTC.
    clock.moment = datetime(2024, 6, 5, 9, 0, tzinfo=UTC)
    started = [job for job in await scheduler.tick() if job.dataset == name]
    again = [job for job in await scheduler.tick() if job.dataset == name]

    assert len(started) == 1
    assert again == []
    assert started[0].schedule_id == "nightly"
    assert started[0].spec.mode is ExportMode.DELTA
    assert started[0].time_zone == "Europe/Paris"
    after = await store.get_schedule(name, "nightly")
    assert after is not None
    assert after.next_run_time == datetime(2024, 6, 6, 0, 0, tzinfo=UTC)
    assert after.last_job_id == started[0].job_id


async def test_a_destination_in_use_by_a_schedule_cannot_be_deleted(store: ExportStore) -> None:
    name = await with_destination(store, dataset())
    await store.create_schedule(schedule(name, "nightly", None), "s")

    with pytest.raises(AudienceError) as raised:
        await store.delete_destination(name, "out", "d", None)

    assert raised.value.reason == "DESTINATION_IN_USE"


async def test_a_stale_version_is_refused(store: ExportStore) -> None:
    name = await with_destination(store, dataset())

    with pytest.raises(AudienceError) as raised:
        await store.delete_destination(name, "out", "d", expected_version=7)

    assert raised.value.reason == "ETAG_MISMATCH"


def subscription(name: str, sub_id: str = "hook") -> WebhookSubscription:
    return WebhookSubscription(
        dataset=name,
        subscription_id=sub_id,
        display_name="",
        url="http://127.0.0.1:9/hook",
        segment_ids=(),
        kinds=frozenset(),
        secret="x" * 16,
        paused=False,
        max_attempts=3,
        create_time=T0,
        update_time=T0,
        version=1,
    )


def delivery(member: str, sequence: int) -> NewDelivery:
    return NewDelivery(
        delivery_id=uuid.uuid4().hex,
        member=member,
        segment_id="vip",
        member_sequence=sequence,
        kind=ChangeKind.JOIN if sequence % 2 else ChangeKind.LEAVE,
        payload=f'{{"seq":{sequence}}}',
    )


async def test_a_change_is_recorded_once_however_often_the_stream_repeats_it(
    store: ExportStore,
) -> None:
    name = dataset()
    hook = await store.create_subscription(subscription(name), "w")
    await store.claim_watches("watcher", T0, LEASE, 10_000)

    assert await store.record_changes(hook, "watcher", [delivery("m", 1)], "tok1", T0)
    assert await store.record_changes(
        hook, "watcher", [delivery("m", 1), delivery("m", 2)], "tok2", T0
    )
    assert not await store.record_changes(hook, "intruder", [delivery("m", 3)], "tok3", T0)

    pending = await store.list_deliveries(name, "hook", DeliveryState.PENDING, None, 10)
    assert [d.payload for d in pending] == ['{"seq":2}', '{"seq":1}']
    (watched,) = [
        w
        for w in await store.claim_watches("watcher", T0, LEASE, 10_000)
        if w.subscription.dataset == name
    ]
    assert watched.resume_token == "tok2"


async def test_only_the_first_pending_delivery_of_each_member_is_handed_out(
    store: ExportStore,
) -> None:
    name = dataset()
    hook = await store.create_subscription(subscription(name), "w")
    await store.claim_watches("watcher", T0, LEASE, 10_000)
    changes = [delivery("a", 1), delivery("b", 2), delivery("a", 3), delivery("b", 4)]
    await store.record_changes(hook, "watcher", changes, "t", T0)

    def own(claimed: list) -> list[str]:  # type: ignore[type-arg]
        return [c.delivery.payload for c in claimed if c.delivery.dataset == name]

    first = await store.claim_deliveries(T0, LEASE, 1000)
    assert own(first) == ['{"seq":1}', '{"seq":2}']
    assert own(await store.claim_deliveries(T0, LEASE, 1000)) == []

    head = next(
        c for c in first if c.delivery.dataset == name and c.delivery.payload == '{"seq":1}'
    )
    await store.finish_attempt(
        head.delivery,
        state=DeliveryState.DELIVERED,
        attempt_count=1,
        http_status=200,
        error="",
        now=T0,
        next_attempt_time=None,
    )
    assert own(await store.claim_deliveries(T0, LEASE, 1000)) == ['{"seq":3}']


async def test_dead_deliveries_are_replayed_in_their_order(store: ExportStore) -> None:
    name = dataset()
    hook = await store.create_subscription(subscription(name), "w")
    await store.claim_watches("watcher", T0, LEASE, 10_000)
    await store.record_changes(hook, "watcher", [delivery("a", 1), delivery("a", 3)], "t", T0)
    for _ in range(2):
        (claimed,) = [
            c for c in await store.claim_deliveries(T0, LEASE, 1000) if c.delivery.dataset == name
        ]
        await store.finish_attempt(
            claimed.delivery,
            state=DeliveryState.DEAD,
            attempt_count=3,
            http_status=500,
            error="HTTP 500",
            now=T0,
            next_attempt_time=None,
        )

    dead = await store.list_deliveries(name, "hook", DeliveryState.DEAD, None, 10)
    assert [d.payload for d in dead] == ['{"seq":3}', '{"seq":1}']
    assert await store.replay_deliveries(name, "hook", [], T0) == 2

    replayed = [
        c.delivery.payload
        for c in await store.claim_deliveries(T0, LEASE, 1000)
        if c.delivery.dataset == name
    ]
    assert replayed == ['{"seq":1}']


async def test_a_paused_subscription_keeps_its_deliveries_waiting(store: ExportStore) -> None:
    name = dataset()
    hook = await store.create_subscription(subscription(name), "w")
    await store.update_subscription(
        name, "hook", "w", None, lambda s: _paused(s), T0 + timedelta(seconds=1)
    )
    await store.claim_watches("watcher", T0, LEASE, 10_000)
    await store.record_changes(hook, "watcher", [delivery("a", 1)], "t", T0)

    claimed = await store.claim_deliveries(T0, LEASE, 1000)

    assert [c for c in claimed if c.delivery.dataset == name] == []


def _paused(current: WebhookSubscription) -> WebhookSubscription:
    from dataclasses import replace

    return replace(current, paused=True)


async def test_one_watcher_holds_a_subscription_until_it_stops_renewing(
    store: ExportStore,
) -> None:
    name = dataset()
    await store.create_subscription(subscription(name), "w")

    def own(watched: list) -> list[str]:  # type: ignore[type-arg]
        return [w.subscription.subscription_id for w in watched if w.subscription.dataset == name]

    assert own(await store.claim_watches("a", T0, LEASE, 10_000)) == ["hook"]
    assert own(await store.claim_watches("b", T0 + LEASE / 2, LEASE, 10_000)) == []
    assert own(await store.claim_watches("b", T0 + LEASE * 2, LEASE, 10_000)) == ["hook"]
