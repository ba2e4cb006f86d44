"""Composition root of the ingest service."""

from __future__ import annotations

import functools
from importlib.resources import files

from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.streams import ConsumerLag
from services.ingest.appender import EVENTS_TOPIC, Appender
from services.ingest.backlog import BacklogGauge
from services.ingest.config import IngestConfig
from services.ingest.consumer import INGEST_GROUP, consume_failed_events
from services.ingest.failed import FAILED_EVENTS_TOPIC, FailedEvents
from services.ingest.grpc import IngestServicer, add_to_server
from services.ingest.ingestor import Ingestor
from services.ingest.store import FailedEventStore

PROFILE_GROUP = "profile"
"""The group that consumes ``events``: its backlog is ingest's backpressure."""

TOPICS = {EVENTS_TOPIC: (PROFILE_GROUP,), FAILED_EVENTS_TOPIC: (INGEST_GROUP,)}
"""The topics ingest publishes or consumes, with the groups declared on each."""


async def build(resources: Resources) -> ServiceUnit:
    config = IngestConfig.from_env(resources.environ)
    bus = resources.bus
    # Declared before the first append, so no entry predates the groups that need it.
    for topic, groups in TOPICS.items():
        await bus.declare(topic, groups)
    gauge = BacklogGauge(
        bus,
        topic=EVENTS_TOPIC,
        group=PROFILE_GROUP,
        limit=config.max_backlog,
        interval=config.backlog_interval,
    )
    await gauge.measure()
    ingestor = Ingestor(
        Appender(bus, window=config.dedup_window),
        gauge,
        partitions=bus.partitions,
        meter=resources.telemetry.meter("services.ingest"),
    )
    failed = FailedEvents(FailedEventStore(resources.postgres), bus)
    servicer = IngestServicer(ingestor, failed, stream_depth=config.stream_depth)
    return ServiceUnit(
        name="ingest",
        service_names=("audience.v1.IngestService",),
        add_to_server=functools.partial(add_to_server, servicer),
        background=(
            gauge.run,
            functools.partial(
                consume_failed_events,
                bus,
                failed,
                name=config.consumer_name,
                tracer=resources.telemetry.tracer("services.ingest"),
            ),
            ConsumerLag(
                bus,
                resources.telemetry.meter("services.ingest"),
                topic=FAILED_EVENTS_TOPIC,
                group=INGEST_GROUP,
            ).run,
            functools.partial(bus.trim_forever, TOPICS),
        ),
    )


DEFINITION = ServiceDefinition(
    name="ingest", schema="ingest", migrations=files("services.ingest") / "migrations", build=build
)
