"""Composition root of the segment engine: stores, domain, servicers and background work."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from importlib.resources import files
from typing import NoReturn

import grpc.aio

from audience.db import LOOP_FAILURES
from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.streams import ConsumerLag
from audience.v1 import membership_service_pb2_grpc, segment_service_pb2_grpc
from services.segment_engine.backfill import Backfiller
from services.segment_engine.catalogs import Catalogs
from services.segment_engine.config import SegmentEngineConfig
from services.segment_engine.consumer import (
    GROUP,
    PROFILE_CHANGES,
    ProfileChangeConsumer,
    declare_topics,
)
from services.segment_engine.grpc import MembershipServicer, SegmentServicer
from services.segment_engine.memberships import MembershipCache, Memberships
from services.segment_engine.processor import Committed, Processor
from services.segment_engine.profile_client import ProfileClient
from services.segment_engine.segments import Segments
from services.segment_engine.store.imports import ImportStore
from services.segment_engine.store.log import ChangeLog
from services.segment_engine.store.members import MemberStore
from services.segment_engine.store.segments import SegmentStore
from services.segment_engine.store.state import StateStore
from services.segment_engine.timers import TimerLoop
from services.segment_engine.translate import encode_reason
from services.segment_engine.watch import ChangeNotifier

__all__ = ["DEFINITION", "build"]

_log = logging.getLogger(__name__)

# Uploads older than this were abandoned by a process that died mid-upload.
_STALE_IMPORT_SECONDS = 86_400.0


def _now() -> int:
    return time.time_ns() // 1000


async def _prune(log: ChangeLog, imports: ImportStore, config: SegmentEngineConfig) -> NoReturn:
    retention = round(config.change_retention.total_seconds() * 1_000_000)
    while True:
        try:
            deleted = await log.prune(_now() - retention)
            if deleted:
                _log.info("pruned %d membership changes older than the retention", deleted)
            await imports.forget_older(_STALE_IMPORT_SECONDS)
        except LOOP_FAILURES:
            _log.warning("pruning the change log failed; will retry", exc_info=True)
        await asyncio.sleep(config.prune_interval.total_seconds())


async def build(resources: Resources) -> ServiceUnit:
    config = SegmentEngineConfig.from_env(resources.environ)
    pool = resources.postgres
    origin = uuid.uuid4().hex
    notifier = ChangeNotifier(origin)
    cache = MembershipCache(
        config.membership_cache_size, config.membership_cache_ttl.total_seconds()
    )
    notifier.on_foreign_commit(cache.foreign_commit)
    segment_store = SegmentStore(pool)
    member_store = MemberStore(pool)
    log = ChangeLog(pool)
    imports = ImportStore(pool)
    catalogs = Catalogs(segment_store)
    tracer = resources.telemetry.tracer(__name__)
    meter = resources.telemetry.meter(__name__)
    processor = Processor(
        pool,
        StateStore(origin),
        catalogs,
        clock=_now,
        encode_reason=encode_reason,
        tracer=tracer,
        meter=meter,
        cache_bytes=config.state_cache_bytes,
    )
    timers = TimerLoop(
        pool,
        processor,
        interval=config.timer_interval.total_seconds(),
        batch=config.timer_batch,
        clock=_now,
    )

    def committed(done: Committed) -> None:
        notifier.notify({logged.dataset for logged in done.logged})
        if done.members:
            cache.invalidate(done.members)
        timers.committed(done)

    processor.on_commit.append(committed)
    channel = resources.channels.open(config.profile_address)
    profiles = ProfileClient(channel)
    backfiller = Backfiller(
        pool,
        segment_store,
        member_store,
        catalogs,
        processor,
        profiles,
        chunk=config.backfill_chunk,
        poll=config.backfill_poll.total_seconds(),
        aggregate_wait=config.aggregate_wait.total_seconds(),
        clock=_now,
    )
    segments = Segments(
        pool,
        segment_store,
        member_store,
        imports,
        catalogs,
        processor,
        profiles,
        clock=_now,
        on_change=backfiller.wake,
        chunk=config.backfill_chunk,
    )
    memberships = Memberships(
        member_store,
        segment_store,
        log,
        catalogs,
        cache,
        retention=round(config.change_retention.total_seconds() * 1_000_000),
        clock=_now,
    )
    await declare_topics(resources.bus)
    consumer = ProfileChangeConsumer(
        resources.bus,
        processor,
        name=config.consumer_name,
        count=config.consumer_batch,
        claim_idle=config.consumer_claim_idle.total_seconds(),
        workers=config.consumer_workers,
        tracer=tracer,
    )
    lag = ConsumerLag(resources.bus, meter, topic=PROFILE_CHANGES, group=GROUP)
    segment_servicer = SegmentServicer(segments)
    membership_servicer = MembershipServicer(
        memberships,
        log,
        notifier,
        retention=config.change_retention,
        watch_batch=config.watch_batch,
        tracer=tracer,
        meter=meter,
    )

    def add_to_server(server: grpc.aio.Server) -> None:
        segment_service_pb2_grpc.add_SegmentServiceServicer_to_server(segment_servicer, server)
        membership_service_pb2_grpc.add_MembershipServiceServicer_to_server(
            membership_servicer, server
        )

    async def listen() -> NoReturn:
        await notifier.listen(pool)

    async def prune() -> NoReturn:
        await _prune(log, imports, config)

    async def close() -> None:
        await channel.close()

    return ServiceUnit(
        name="segment_engine",
        service_names=("audience.v1.SegmentService", "audience.v1.MembershipService"),
        add_to_server=add_to_server,
        background=(consumer.run, timers.run, backfiller.run, listen, prune, lag.run),
        close=close,
    )


DEFINITION = ServiceDefinition(
    name="segment_engine",
    schema="segment_engine",
    migrations=files("services.segment_engine") / "migrations",
    build=build,
)
