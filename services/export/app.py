"""Composition root of the export service."""

from __future__ import annotations

import functools
from importlib.resources import files

from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.v1 import export_service_pb2_grpc
from services.export.adapters.folder import FolderSink
from services.export.adapters.http import HttpSender
from services.export.adapters.peers import MembershipClient, ProfileClient
from services.export.adapters.sftp import SftpSink
from services.export.application import ExportApplication
from services.export.config import ExportConfig
from services.export.domain.model import FolderTarget, Target
from services.export.grpc import ExportServicer
from services.export.jobs import JobRunner
from services.export.ports import FileSink, SystemClock
from services.export.producing import CsvProducer
from services.export.scheduler import Scheduler
from services.export.store import ExportStore
from services.export.webhook_worker import Dispatcher, WatchManager


async def build(resources: Resources) -> ServiceUnit:
    config = ExportConfig.from_env(resources.environ)
    clock = SystemClock()
    store = ExportStore(resources.postgres)
    engine_channel = resources.channels.open(config.segment_engine)
    profile_channel = resources.channels.open(config.profile)
    members = MembershipClient(engine_channel)
    producer = CsvProducer(
        members,
        ProfileClient(profile_channel, concurrency=config.profile_concurrency),
        clock,
        catch_up_timeout=config.delta_timeout,
        meter=resources.telemetry.meter(__name__),
    )

    def open_sink(target: Target) -> FileSink:
        if isinstance(target, FolderTarget):
            return FolderSink(config.export_root, target.path)
        return SftpSink(target, config.environ, config.sftp_timeout.total_seconds())

    runner = JobRunner(store, producer, open_sink, clock, config.jobs)
    scheduler = Scheduler(store, clock, interval=config.scheduler_interval, on_jobs=runner.wake)
    sender = HttpSender(config.webhooks.timeout, max_connections=config.webhooks.concurrency)
    dispatcher = Dispatcher(store, sender, clock, config.webhooks)
    watches = WatchManager(store, members, clock, config.webhooks, on_deliveries=dispatcher.wake)
    application = ExportApplication(
        store,
        producer,
        scheduler,
        clock,
        export_root=config.export_root,
        on_job=runner.wake,
        on_subscription=watches.wake,
    )

    async def close() -> None:
        await sender.close()
        await engine_channel.close()
        await profile_channel.close()

    return ServiceUnit(
        name="export",
        service_names=("audience.v1.ExportService",),
        add_to_server=functools.partial(
            export_service_pb2_grpc.add_ExportServiceServicer_to_server,
            ExportServicer(application),
        ),
        background=(
            runner.run_forever,
            scheduler.run_forever,
            watches.run_forever,
            dispatcher.run_forever,
        ),
        close=close,
    )


DEFINITION = ServiceDefinition(
    name="export", schema="export", migrations=files("services.export") / "migrations", build=build
)
