"""One event's trace and the suite's metrics, read from an in-memory exporter and reader.

The whole suite runs in one process as ``audience up`` runs it (:func:`audience.service.serve`),
with telemetry of the test's making: every span goes to an :class:`InMemorySpanExporter` and
every metric to an :class:`InMemoryMetricReader`. One event that makes a profile join a
segment must leave one connected trace, from ingest's ``SendEvent`` through the profile
service and the engine's evaluation to the change's delivery to a subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from audience import rules
from audience.auth import SCOPES
from audience.config import CommonConfig
from audience.security import Security
from audience.server import Host
from audience.service import serve
from audience.telemetry import Telemetry
from audience.v1 import (
    event_pb2,
    export_service_pb2,
    export_service_pb2_grpc,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_pb2,
    membership_service_pb2,
)
from services.registry import SERVICES
from tests.e2e.conftest import SERVICE_ADDRESS_VARIABLES, SuiteKey, new_dataset, open_suite_channel
from tests.e2e.segment_engine.harness import Clients, now_micros

pytestmark = pytest.mark.e2e

SEND_EVENT = "/audience.v1.IngestService/SendEvent"
WATCH = "/audience.v1.MembershipService/WatchMembershipChanges"
PROFILE_CONSUMES = "profile apply events"
ENGINE_CONSUMES = "segment_engine consume profile-changes"
EVALUATES = "segment_engine evaluate"
DELIVERS = "segment_engine deliver membership change"

Point = tuple[dict[str, Any], NumberDataPoint | HistogramDataPoint]


@dataclass
class TracedSuite:
    address: str
    channel: grpc.aio.Channel
    clients: Clients
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    partitions: int

    def finished(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans.get_finished_spans() if span.name == name]

    async def wait_finished(
        self, name: str, where: Callable[[ReadableSpan], bool], within: float = 10.0
    ) -> ReadableSpan:
        deadline = time.monotonic() + within
        while True:
            found = [span for span in self.finished(name) if where(span)]
            if found:
                (span,) = found
                return span
            assert time.monotonic() < deadline, f"no span {name!r} finished"
            await asyncio.sleep(0.02)

    def points(self, name: str) -> list[Point]:
        """Every data point of metric ``name``, with its attributes, across meters."""
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            (dict(point.attributes or {}), point)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
            if isinstance(point, NumberDataPoint | HistogramDataPoint)
        ]

    def value(self, name: str, **attributes: str) -> float:
        """The value of the one point of a counter or gauge with these attributes."""
        (point,) = [p for a, p in self.points(name) if a.items() >= attributes.items()]
        assert isinstance(point, NumberDataPoint)
        return point.value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def traced_suite(
    postgres_dsn: str, redis_url: str, key_prefix: str
) -> AsyncIterator[TracedSuite]:
    """Every service in one host, as ``audience up`` serves them, with in-memory telemetry."""
    address = f"127.0.0.1:{_free_port()}"
    admin = SuiteKey("test-admin", ("*",), SCOPES)
    internal = SuiteKey("internal", ("*",), ("read", "write"))
    environ = {
        "AUDIENCE_LISTEN": address,
        "AUDIENCE_REDIS_NAMESPACE": key_prefix,
        "AUDIENCE_SHUTDOWN_GRACE": "1s",
        "AUDIENCE_API_KEYS": json.dumps([admin.entry(), internal.entry()]),
        "AUDIENCE_INTERNAL_API_KEY": internal.key,
        "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "50ms",
        **dict.fromkeys(SERVICE_ADDRESS_VARIABLES, address),
    }
    common = CommonConfig.from_env(environ)
    spans = InMemorySpanExporter()
    metrics = InMemoryMetricReader()
    telemetry = Telemetry.recording(
        "audience",
        "console",
        span_processors=[SimpleSpanProcessor(spans)],
        metric_readers=[metrics],
    )
    started: asyncio.Future[Host] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(
        serve(
            SERVICES,
            common,
            environ,
            postgres_dsn=postgres_dsn,
            redis_url=redis_url,
            security=Security.from_env(environ, common, embedded=False),
            telemetry=telemetry,
            on_started=started.set_result,
        )
    )
    first: list[asyncio.Future[Any]] = [started, serving]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    assert not serving.done(), f"the suite stopped at start with {serving.result()}"
    host = started.result()
    try:
        async with open_suite_channel(address, admin.key) as channel:
            yield TracedSuite(
                address, channel, Clients(channel), spans, metrics, common.bus_partitions
            )
    finally:
        await host.stop()
        assert await serving == 0


def _cart(user: str, *prices: float) -> event_pb2.Event:
    now = rules.timestamp_from_micros(now_micros())
    event = event_pb2.Event(
        event_id=uuid.uuid4().hex,
        user_id=user,
        type=event_pb2.EVENT_TYPE_CART_UPDATED,
        timestamp=now,
        sent_at=now,
        cart=event_pb2.Cart(
            items=[
                event_pb2.CartItem(product_id=f"sku-{n}", price=price, quantity=1)
                for n, price in enumerate(prices)
            ],
            currency="USD",
        ),
    )
    event.context.session_id = "visit-1"
    return event


class Subscriber:
    """A ``WatchMembershipChanges`` stream, read in the background."""

    def __init__(self, suite: TracedSuite, dataset: str) -> None:
        self.changes: list[membership_pb2.MembershipChange] = []
        self.heartbeats = 0
        self._call = suite.clients.memberships.WatchMembershipChanges(
            membership_service_pb2.WatchMembershipChangesRequest(
                parent=f"datasets/{dataset}",
                heartbeat_interval=duration_pb2.Duration(seconds=1),
            )
        )
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for item in self._call:
                if item.HasField("change"):
                    self.changes.append(item.change)
                else:
                    self.heartbeats += 1

    async def until(self, done: Callable[[], bool], within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        while not done():
            assert time.monotonic() < deadline, self.changes
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    (found,) = [span for span in spans if span.name == name]
    return found


async def test_one_event_leaves_one_connected_trace_from_ingest_to_the_subscriber(
    postgres_dsn: str, redis_url: str, key_prefix: str
) -> None:
    dataset = new_dataset()
    on_dataset = {"audience.dataset": dataset}
    async with traced_suite(postgres_dsn, redis_url, key_prefix) as suite:
        segment = await suite.clients.create(dataset, "cart-under-100", "cart.value < 100")
        await suite.clients.wait_active(segment.name)
        subscriber = Subscriber(suite, dataset)
        # A heartbeat: the stream has its start position, so it will see the join.
        await subscriber.until(lambda: subscriber.heartbeats > 0)
        ingest = ingest_service_pb2_grpc.IngestServiceStub(suite.channel)

        response = await ingest.SendEvent(
            ingest_service_pb2.SendEventRequest(
                parent=f"datasets/{dataset}", event=_cart("shopper", 25.0, 15.0)
            ),
            timeout=10,
        )
        await subscriber.until(lambda: len(subscriber.changes) == 1)
        sent = await suite.wait_finished(SEND_EVENT, lambda span: True)
        trace_id = sent.context.trace_id
        delivered = await suite.wait_finished(
            DELIVERS, lambda span: span.context.trace_id == trace_id
        )

        (join,) = subscriber.changes
        assert response.result.status == ingest_service_pb2.EVENT_STATUS_ACCEPTED
        assert join.kind == membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN
        assert join.member == f"datasets/{dataset}/profiles/shopper"
        in_trace = [s for s in suite.spans.get_finished_spans() if s.context.trace_id == trace_id]
        profile = _one(in_trace, PROFILE_CONSUMES)
        engine = _one(in_trace, ENGINE_CONSUMES)
        evaluation = _one(in_trace, EVALUATES)
        assert sent.kind == trace.SpanKind.SERVER
        assert sent.parent is None
        assert (profile.kind, _parent_of(profile)) == (
            trace.SpanKind.CONSUMER,
            sent.context.span_id,
        )
        assert (engine.kind, _parent_of(engine)) == (
            trace.SpanKind.CONSUMER,
            profile.context.span_id,
        )
        assert _parent_of(evaluation) == engine.context.span_id
        assert evaluation.attributes is not None
        assert evaluation.attributes["audience.evaluation.operation"] == "profile_changes"
        assert (delivered.kind, _parent_of(delivered)) == (
            trace.SpanKind.PRODUCER,
            evaluation.context.span_id,
        )
        assert delivered.attributes is not None
        assert delivered.attributes["audience.segment"] == segment.name
        # Connected: every span of the trace but the call's hangs under another of it.
        span_ids = {span.context.span_id for span in in_trace}
        assert [s.name for s in in_trace if _parent_of(s) not in span_ids] == [SEND_EVENT]

        # The metrics, while the stream is open and after one join and one download.
        # Other tests' webhook subscriptions, in the shared database, hold streams too.
        assert suite.value("audience.segment_engine.watch.subscribers", **on_dataset) == 1
        download = export_service_pb2_grpc.ExportServiceStub(suite.channel).ExportSegmentCsv(
            export_service_pb2.ExportSegmentCsvRequest(segments=[segment.name]), timeout=10
        )
        assert [chunk.rows_sent async for chunk in download][-1] == 1
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await ingest.SendEvent(
                ingest_service_pb2.SendEventRequest(
                    parent=f"datasets/{dataset}", event=event_pb2.Event(event_id="no-user")
                ),
                timeout=10,
            )
        assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert suite.value("audience.ingest.events", status="accepted") == 1
        assert suite.value("audience.ingest.events", status="rejected") == 1
        assert (
            suite.value(
                "audience.segment_engine.membership.changes",
                **{"audience.membership.change": "join", "audience.cause": "event"},
            )
            == 1
        )
        (evaluations,) = [
            point
            for attributes, point in suite.points("audience.segment_engine.evaluation.duration")
            if attributes == {"audience.evaluation.operation": "profile_changes"}
        ]
        assert isinstance(evaluations, HistogramDataPoint)
        assert evaluations.count >= 1
        assert 0 < evaluations.sum < 10 * evaluations.count
        assert suite.value("audience.export.rows", **{"audience.export.source": "members"}) == 1
        lags: dict[tuple[str, str], dict[int, float]] = {}
        for attributes, point in suite.points("audience.bus.consumer.lag"):
            assert isinstance(point, NumberDataPoint)
            consumed = (
                attributes["messaging.destination.name"],
                attributes["messaging.consumer.group.name"],
            )
            partition = int(attributes["messaging.destination.partition.id"])
            lags.setdefault(consumed, {})[partition] = point.value
        assert set(lags) == {
            ("events", "profile"),
            ("profile-changes", "segment_engine"),
            ("failed-events", "ingest"),
        }
        for by_partition in lags.values():
            assert sorted(by_partition) == list(range(suite.partitions))
            assert all(lag >= 0 for lag in by_partition.values())

        await subscriber.close()
        watched = await suite.wait_finished(WATCH, lambda span: True)
        assert [link.context.span_id for link in delivered.links] == [watched.context.span_id]
        assert watched.context.trace_id != trace_id
        await _eventually(
            lambda: suite.value("audience.segment_engine.watch.subscribers", **on_dataset) == 0
        )


async def _eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
