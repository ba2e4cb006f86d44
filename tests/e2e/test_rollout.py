"""A rolling restart under load: each service in turn gets SIGTERM and is started again.

Every service runs as its own process (``python -m services.<name>``, configured only by
``AUDIENCE_*`` variables, authentication on), one replica each, and each start has a bus
consumer name of its own, as a new pod has a new name. A rollout of one replica
leaves its service away for a moment, so the clients behave as a client of a rolled-out
service must: the load retries a batch refused with ``UNAVAILABLE`` under the same event
ids (ingest de-duplicates them), the subscriber resumes from its last resume token, and
the downloads are asked again. Two replicas behind a balancer would hide the moment
instead of testing what the services promise across it: a SIGTERMed process turns
NOT_SERVING, finishes what it took on, stops and exits 0; an acknowledged event is never
lost, and a resumed change stream has no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from audience import rules
from audience.auth import SCOPES
from audience.v1 import (
    event_pb2,
    export_service_pb2,
    export_service_pb2_grpc,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_pb2,
    membership_service_pb2,
    membership_service_pb2_grpc,
    profile_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
)
from services.segment_engine.domain.tokens import decode_token
from tests.e2e.conftest import SuiteKey, new_dataset, open_suite_channel
from tests.e2e.segment_engine.harness import Clients, now_micros

pytestmark = pytest.mark.e2e

_REPO = Path(__file__).resolve().parents[2]

SERVICES = {
    "ingest": ("AUDIENCE_INGEST_ADDRESS", "audience.v1.IngestService"),
    "profile": ("AUDIENCE_PROFILE_ADDRESS", "audience.v1.ProfileService"),
    "segment_engine": ("AUDIENCE_SEGMENT_ENGINE_ADDRESS", "audience.v1.MembershipService"),
    "export": ("AUDIENCE_EXPORT_ADDRESS", "audience.v1.ExportService"),
}
GRACE = 2.0
EXIT_BUDGET = 2 * GRACE + 2.0
"""Seconds from SIGTERM to exit: a host stops its background work within the grace, then
gives in-flight calls the grace, then closes its pools (k8s/base: terminationGracePeriod
less the preStop sleep)."""
USERS = 20
RETRY_PAUSE = 0.1

_T = TypeVar("_T")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Service:
    name: str
    address: str
    environ: Mapping[str, str]
    log: Path
    process: asyncio.subprocess.Process | None = None
    generation: int = 0

    @property
    def grpc_service(self) -> str:
        return SERVICES[self.name][1]

    async def start(self) -> None:
        self.generation += 1
        # A new pod has a new name, and so a new consumer name in its bus groups: what the
        # process before it held unacknowledged is not its own to resume.
        consumer = f"AUDIENCE_{self.name.upper()}_CONSUMER_NAME"
        with self.log.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"services.{self.name}",
                env={**self.environ, consumer: f"{self.name}-{self.generation}"},
                cwd=_REPO,
                stdout=output,
                stderr=output,
            )

    async def wait_serving(self, within: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + within
        async with open_suite_channel(self.address, None) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process.returncode is None, self.failure("exited at start")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    checked = await health.Check(
                        health_pb2.HealthCheckRequest(service=self.grpc_service), timeout=1
                    )
                    if checked.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                assert time.monotonic() < deadline, self.failure("did not start serving")
                await asyncio.sleep(0.1)

    async def roll(self) -> tuple[list[int], int | None, float]:
        """SIGTERM, then start again; returns the health statuses watched across the
        SIGTERM, the exit code and the seconds the process took to exit."""
        assert self.process is not None
        async with open_suite_channel(self.address, None) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=self.grpc_service)
            )
            statuses = [(await watch.read()).status]
            terminated = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(grpc.aio.AioRpcError):
                while statuses[-1] == health_pb2.HealthCheckResponse.SERVING:
                    update = await watch.read()
                    if update is grpc.aio.EOF:
                        break
                    statuses.append(update.status)
            # Like a probe, the watch holds no call open through the drain.
            watch.cancel()
        try:
            code = await asyncio.wait_for(self.process.wait(), EXIT_BUDGET + 10)
        except TimeoutError:
            self.process.kill()
            code = None
        took = time.monotonic() - terminated
        await self.start()
        await self.wait_serving()
        return statuses, code, took

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), EXIT_BUDGET + 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def failure(self, what: str) -> str:
        return f"{self.name} {what}; its log ends:\n{self.log.read_text()[-3000:]}"


async def _retrying(call: Callable[[], Awaitable[_T]], within: float = 30.0) -> _T:
    """The answer of ``call``, asked again while the service is away (``UNAVAILABLE``)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(RETRY_PAUSE)


def _cart(user: str, value: float, at: int) -> event_pb2.Event:
    stamp = rules.timestamp_from_micros(at)
    event = event_pb2.Event(
        event_id=uuid.uuid4().hex,
        user_id=user,
        type=event_pb2.EVENT_TYPE_CART_UPDATED,
        timestamp=stamp,
        sent_at=stamp,
        cart=event_pb2.Cart(
            items=[event_pb2.CartItem(product_id="sku", price=value, quantity=1)],
            currency="USD",
        ),
    )
    event.context.session_id = "visit-1"
    return event


@dataclass
class Load:
    """Sends a batch of one cart event per user at a steady pace, each batch until ingest
    acknowledges it; remembers what was acknowledged."""

    ingest: ingest_service_pb2_grpc.IngestServiceStub
    dataset: str
    acknowledged: dict[str, int] = field(default_factory=dict)
    """Per user, how many of its events ingest acknowledged."""
    last_value: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, pace: float = 0.1) -> None:
        batch_number = 0
        while not self.stopping.is_set():
            batch_number += 1
            at = now_micros()
            values = {f"u{n}": 50.0 if (n + batch_number) % 3 else 150.0 for n in range(USERS)}
            request = ingest_service_pb2.SendEventsRequest(
                parent=f"datasets/{self.dataset}",
                events=[_cart(user, value, at) for user, value in values.items()],
            )
            while True:
                try:
                    response = await self.ingest.SendEvents(request, timeout=5)
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    self.retries += 1
                    await asyncio.sleep(RETRY_PAUSE)
            assert {result.status for result in response.results} <= {
                ingest_service_pb2.EVENT_STATUS_ACCEPTED,
                ingest_service_pb2.EVENT_STATUS_DUPLICATE,
            }, response
            for user, value in values.items():
                self.acknowledged[user] = self.acknowledged.get(user, 0) + 1
                self.last_value[user] = value
            await asyncio.sleep(pace)


@dataclass
class Subscriber:
    """Watches the dataset's changes; resumes from its last token whenever the stream ends."""

    memberships: membership_service_pb2_grpc.MembershipServiceStub
    dataset: str
    first_token: str | None = None
    """The token of the first heartbeat: where the stream started, before any change."""
    token: str | None = None
    changes: list[membership_pb2.MembershipChange] = field(default_factory=list)
    resumes: int = 0

    async def run(self) -> None:
        while True:
            request = membership_service_pb2.WatchMembershipChangesRequest(
                parent=f"datasets/{self.dataset}",
                heartbeat_interval=duration_pb2.Duration(seconds=1),
            )
            if self.token is not None:
                request.resume_token = self.token
            call = self.memberships.WatchMembershipChanges(request)
            try:
                async for item in call:
                    if item.HasField("change"):
                        self.changes.append(item.change)
                        self.token = item.change.resume_token
                    else:
                        self.token = item.heartbeat.resume_token
                        self.first_token = self.first_token or self.token
            except grpc.aio.AioRpcError as error:
                # The engine going away ends the stream with UNAVAILABLE, or CANCELLED
                # when the server cancels it at the end of its grace.
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
            self.resumes += 1
            await asyncio.sleep(RETRY_PAUSE)

    def replayed(self) -> set[str]:
        """The members the changes leave, each change checked against the one before."""
        members: set[str] = set()
        for change in self.changes:
            if change.kind == membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN:
                assert change.member not in members, f"joined twice: {change}"
                members.add(change.member)
            else:
                assert change.member in members, f"left without joining: {change}"
                members.remove(change.member)
        return members


@dataclass
class Downloads:
    """Downloads the segment's CSV now and then, as a reader of the export service would."""

    export: export_service_pb2_grpc.ExportServiceStub
    segment: str
    done: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async def download() -> bytes:
            stream = self.export.ExportSegmentCsv(
                export_service_pb2.ExportSegmentCsvRequest(segments=[self.segment]), timeout=10
            )
            return b"".join([chunk.data async for chunk in stream])

        while not self.stopping.is_set():
            assert (await _retrying(download)).startswith(b"profile_id")
            self.done += 1
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def cluster(
    postgres_dsn: str, redis_url: str, key_prefix: str, logs: Path, admin: SuiteKey
) -> AsyncIterator[dict[str, Service]]:
    internal = SuiteKey("internal", ("*",), ("read", "write"))
    addresses = {name: f"127.0.0.1:{_free_port()}" for name in SERVICES}
    common = {
        **{key: value for key, value in os.environ.items() if not key.startswith("AUDIENCE_")},
        "AUDIENCE_POSTGRES_DSN": postgres_dsn,
        "AUDIENCE_REDIS_URL": redis_url,
        "AUDIENCE_REDIS_NAMESPACE": key_prefix,
        "AUDIENCE_API_KEYS": json.dumps([admin.entry(), internal.entry()]),
        "AUDIENCE_INTERNAL_API_KEY": internal.key,
        "AUDIENCE_SHUTDOWN_GRACE": f"{GRACE:g}s",
        "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "50ms",
        **{variable: addresses[name] for name, (variable, _) in SERVICES.items()},
    }
    services = {
        name: Service(name, address, {**common, "AUDIENCE_LISTEN": address}, logs / f"{name}.log")
        for name, address in addresses.items()
    }
    try:
        for service in services.values():
            await service.start()
        for service in services.values():
            await service.wait_serving()
        yield services
    finally:
        for service in services.values():
            await service.stop()


async def _members(
    memberships: membership_service_pb2_grpc.MembershipServiceStub, segment: str
) -> set[str]:
    found: set[str] = set()
    token = ""
    while True:
        page = await memberships.ListSegmentMembers(
            membership_service_pb2.ListSegmentMembersRequest(parent=segment, page_token=token),
            timeout=10,
        )
        found.update(membership.member for membership in page.memberships)
        token = page.next_page_token
        if not token:
            return found


async def _event_counts(
    profiles: profile_service_pb2_grpc.ProfileServiceStub, dataset: str
) -> dict[str, int]:
    counts = {}
    for n in range(USERS):
        response = await profiles.GetProfile(
            profile_service_pb2.GetProfileRequest(
                name=f"datasets/{dataset}/profiles/u{n}", view=profile_pb2.PROFILE_VIEW_BASIC
            ),
            timeout=10,
        )
        counts[f"u{n}"] = response.profile.event_count
    return counts


async def test_a_rolling_restart_under_load_loses_no_event_and_leaves_no_gap(
    postgres_dsn: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    dataset = new_dataset()
    admin = SuiteKey("test-admin", ("*",), SCOPES)
    async with (
        cluster(postgres_dsn, redis_url, key_prefix, tmp_path, admin) as services,
        open_suite_channel(services["ingest"].address, admin.key) as ingest_channel,
        open_suite_channel(services["profile"].address, admin.key) as profile_channel,
        open_suite_channel(services["segment_engine"].address, admin.key) as engine_channel,
        open_suite_channel(services["export"].address, admin.key) as export_channel,
    ):
        engine = Clients(engine_channel)
        segment = await engine.create(dataset, "small-carts", "cart.value < 100")
        await engine.wait_active(segment.name)
        subscriber = Subscriber(engine.memberships, dataset)
        load = Load(ingest_service_pb2_grpc.IngestServiceStub(ingest_channel), dataset)
        downloads = Downloads(
            export_service_pb2_grpc.ExportServiceStub(export_channel), segment.name
        )
        tasks = [asyncio.create_task(subscriber.run())]
        try:
            while subscriber.first_token is None:
                assert not tasks[0].done(), tasks[0]
                await asyncio.sleep(0.05)
            tasks += [asyncio.create_task(work.run()) for work in (load, downloads)]
            await asyncio.sleep(2.0)
            rolled = {}
            for name, service in services.items():
                rolled[name] = await service.roll()
                assert not any(task.done() for task in tasks), [t for t in tasks if t.done()]
                await asyncio.sleep(1.5)
            load.stopping.set()
            downloads.stopping.set()
            await asyncio.wait_for(asyncio.gather(*tasks[1:]), 30)

            profiles = profile_service_pb2_grpc.ProfileServiceStub(profile_channel)
            expected = {
                f"datasets/{dataset}/profiles/{user}"
                for user, value in load.last_value.items()
                if value < 100
            }
            deadline = time.monotonic() + 30
            while (
                await _event_counts(profiles, dataset) != load.acknowledged
                or await _members(engine.memberships, segment.name) != expected
                or subscriber.replayed() != expected
            ):
                assert time.monotonic() < deadline, (
                    await _event_counts(profiles, dataset),
                    load.acknowledged,
                )
                await asyncio.sleep(0.2)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    for name, (statuses, code, took) in rolled.items():
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert statuses == [serving, not_serving], services[name].failure(f"went {statuses}")
        assert code == 0, services[name].failure(f"exited with {code}")
        assert took <= EXIT_BUDGET, services[name].failure(f"took {took:.1f}s to exit")
    assert subscriber.first_token is not None
    start = decode_token(dataset, subscriber.first_token).sequence
    sequences = [
        decode_token(dataset, change.resume_token).sequence for change in subscriber.changes
    ]
    assert sequences == list(range(start + 1, start + 1 + len(sequences)))
    assert subscriber.resumes >= 1
    assert load.retries >= 1
    assert downloads.done > 0
