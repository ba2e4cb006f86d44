"""Composition root of the profile service."""

from __future__ import annotations

import functools
from importlib.resources import files

from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.streams import ConsumerLag
from audience.v1 import profile_service_pb2_grpc
from services.profile.applier import Applier
from services.profile.backfill import Backfiller
from services.profile.config import ProfileConfig
from services.profile.consumer import (
    EVENTS,
    GROUP,
    PROFILE_CHANGES,
    PROFILE_CHANGES_GROUPS,
    EventWorker,
    Publisher,
    declare_topics,
)
from services.profile.domain.apply import Settings
from services.profile.grpc import ProfileServicer
from services.profile.memberships import Memberships
from services.profile.operations import Operations
from services.profile.outbox import Outbox, Relay
from services.profile.prune import Pruner
from services.profile.store import ProfileStore, Registry


async def build(resources: Resources) -> ServiceUnit:
    config = ProfileConfig.from_env(resources.environ)
    bus = resources.bus
    await declare_topics(bus)
    store = ProfileStore(resources.postgres)
    settings = Settings(session_timeout=int(config.session_timeout.total_seconds() * 1_000_000))
    applier = Applier(store, settings, cache_bytes=config.cache_bytes)
    publisher = Publisher(bus)
    workers = min(config.workers, bus.partitions)
    consumers = [
        EventWorker.for_partitions(
            applier,
            publisher,
            name=f"{config.consumer_name}-{index}",
            partitions=[p for p in range(bus.partitions) if p % workers == index],
            read_count=config.read_count,
            unit_events=config.unit_events,
            claim_idle=config.claim_idle.total_seconds(),
            tracer=resources.telemetry.tracer(__name__),
        )
        for index in range(workers)
    ]
    lag = ConsumerLag(bus, resources.telemetry.meter(__name__), topic=EVENTS, group=GROUP)
    backfiller = Backfiller(
        store,
        Registry(resources.postgres),
        publisher,
        settings,
        page_size=config.backfill_profiles,
        pause=config.backfill_pause.total_seconds(),
    )
    pruner = Pruner(Registry(resources.postgres), interval=config.prune_interval.total_seconds())
    relay = Relay(Outbox(store, publisher), grace=config.outbox_grace)
    memberships = Memberships(
        resources.channels, str(config.segment_engine), config.segment_timeout.total_seconds()
    )
    servicer = ProfileServicer(
        Operations(applier, publisher, memberships, backfill_queued=backfiller.wake)
    )

    async def trim() -> None:
        await bus.trim_forever({PROFILE_CHANGES: PROFILE_CHANGES_GROUPS})

    return ServiceUnit(
        name="profile",
        service_names=("audience.v1.ProfileService",),
        add_to_server=functools.partial(
            profile_service_pb2_grpc.add_ProfileServiceServicer_to_server, servicer
        ),
        background=(
            *(worker.run for worker in consumers),
            backfiller.run,
            pruner.run,
            relay.run,
            trim,
            lag.run,
        ),
        close=memberships.close,
    )


DEFINITION = ServiceDefinition(
    name="profile",
    schema="profile",
    migrations=files("services.profile") / "migrations",
    build=build,
)
