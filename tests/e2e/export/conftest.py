"""The export service with the real segment engine: segments are filled and changed through
the engine's public RPCs (imported segments), and files go to a real SFTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from audience.v1 import (
    export_pb2,
    export_service_pb2,
    export_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from services.export.app import DEFINITION as EXPORT
from services.segment_engine.app import DEFINITION as SEGMENT_ENGINE
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset
from tests.integration.export.peers import PASSWORD, USERNAME, SftpServer, eventually

SECRET = "AUDIENCE_SECRET_PARTNER"
FINAL_STATES = {
    export_pb2.EXPORT_JOB_STATE_SUCCEEDED,
    export_pb2.EXPORT_JOB_STATE_FAILED,
    export_pb2.EXPORT_JOB_STATE_CANCELLED,
}

# Quick retries and polls, so that tests take seconds.
FAST = {
    "AUDIENCE_EXPORT_POLL_INTERVAL": "50ms",
    "AUDIENCE_EXPORT_SCHEDULER_INTERVAL": "100ms",
    "AUDIENCE_EXPORT_UPLOAD_BACKOFF": "50ms",
    "AUDIENCE_EXPORT_UPLOAD_ATTEMPTS": "3",
    "AUDIENCE_EXPORT_JOB_LEASE": "3s",
    "AUDIENCE_EXPORT_WEBHOOK_BACKOFF": "50ms",
    "AUDIENCE_EXPORT_WEBHOOK_BACKOFF_MAX": "200ms",
    "AUDIENCE_EXPORT_WEBHOOK_POLL_INTERVAL": "50ms",
    "AUDIENCE_EXPORT_WEBHOOK_HEARTBEAT": "1s",
    "AUDIENCE_EXPORT_WEBHOOK_LEASE": "3s",
    SECRET: PASSWORD,
}


@dataclass
class Feeds:
    """A running engine and export service, a dataset of the test's own, and helpers."""

    suite: RunningSuite
    dataset: str
    root: Path

    @property
    def parent(self) -> str:
        return f"datasets/{self.dataset}"

    @property
    def api(self) -> export_service_pb2_grpc.ExportServiceStub:
        return export_service_pb2_grpc.ExportServiceStub(self.suite.channel)

    @property
    def segments(self) -> segment_service_pb2_grpc.SegmentServiceStub:
        return segment_service_pb2_grpc.SegmentServiceStub(self.suite.channel)

    async def imported_segment(self, segment_id: str) -> str:
        response = await self.segments.CreateSegment(
            segment_service_pb2.CreateSegmentRequest(
                parent=self.parent,
                segment_id=segment_id,
                segment=segment_pb2.Segment(
                    kind=segment_pb2.SEGMENT_KIND_USER, source=segment_pb2.SEGMENT_SOURCE_IMPORTED
                ),
            )
        )
        name: str = response.segment.name
        return name

    async def _import(
        self, segment: str, mode: segment_service_pb2.ImportMode.ValueType, ids: Sequence[str]
    ) -> None:
        request = segment_service_pb2.ImportSegmentMembersRequest(
            segment=segment, mode=mode, ids=segment_service_pb2.ImportedIds(ids=list(ids))
        )
        await self.segments.ImportSegmentMembers(iter([request]))

    async def join(self, segment: str, *ids: str) -> None:
        await self._import(segment, segment_service_pb2.IMPORT_MODE_ADD, ids)

    async def leave(self, segment: str, *ids: str) -> None:
        await self._import(segment, segment_service_pb2.IMPORT_MODE_REMOVE, ids)

    async def sftp_destination(self, server: SftpServer, folder: str = "/incoming") -> str:
        response = await self.api.CreateDestination(
            export_service_pb2.CreateDestinationRequest(
                parent=self.parent,
                destination_id="partner",
                destination=export_pb2.Destination(
                    sftp=export_pb2.SftpTarget(
                        host="127.0.0.1",
                        port=server.port,
                        path=folder,
                        username=USERNAME,
                        credential_secret=SECRET,
                        known_host_key=server.known_host_line,
                    )
                ),
            )
        )
        name: str = response.destination.name
        return name

    async def job(self, name: str) -> export_pb2.ExportJob:
        response = await self.api.GetExportJob(export_service_pb2.GetExportJobRequest(name=name))
        job: export_pb2.ExportJob = response.export_job
        return job

    async def finished(self, name: str, within: float = 60.0) -> export_pb2.ExportJob:
        async def done() -> bool:
            return (await self.job(name)).state in FINAL_STATES

        await eventually(done, within)
        return await self.job(name)


@pytest.fixture
async def feeds(start_suite: StartSuite, tmp_path: Path) -> AsyncIterator[Feeds]:
    environ = {**FAST, "AUDIENCE_EXPORT_ROOT": str(tmp_path)}
    async with start_suite([SEGMENT_ENGINE, EXPORT], environ) as suite:
        yield Feeds(suite, new_dataset(), tmp_path)


@pytest.fixture
async def sftp_server(tmp_path: Path) -> AsyncIterator[SftpServer]:
    root = tmp_path / "sftp-root"
    root.mkdir()
    async with SftpServer.start(root) as server:
        yield server
