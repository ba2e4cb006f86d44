"""Exports over the whole pipeline: events into ingest, profiles, a rule segment in the
engine, and the export service reading identities and attributes from the profiles."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from audience.v1 import (
    export_pb2,
    export_service_pb2,
    export_service_pb2_grpc,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_service_pb2,
    membership_service_pb2_grpc,
    profile_service_pb2,
    profile_service_pb2_grpc,
)
from services.export.app import DEFINITION as EXPORT
from services.ingest.app import DEFINITION as INGEST
from services.profile.app import DEFINITION as PROFILE
from services.segment_engine.app import DEFINITION as SEGMENT_ENGINE
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset
from tests.e2e.export.conftest import FAST
from tests.e2e.segment_engine.harness import Clients
from tests.integration.export.peers import eventually
from tests.profile_support import E, event

pytestmark = pytest.mark.e2e

PIPELINE = {
    **FAST,
    "AUDIENCE_PROFILE_BACKFILL_PAUSE": "0s",
    "AUDIENCE_SEGMENT_ENGINE_TIMER_INTERVAL": "50ms",
    "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "50ms",
}


@pytest.fixture
async def suite(start_suite: StartSuite, tmp_path: Path) -> AsyncIterator[RunningSuite]:
    environ = {**PIPELINE, "AUDIENCE_EXPORT_ROOT": str(tmp_path)}
    async with start_suite([INGEST, PROFILE, SEGMENT_ENGINE, EXPORT], environ) as running:
        yield running


async def count(suite: RunningSuite, segment: str) -> int:
    response = await membership_service_pb2_grpc.MembershipServiceStub(
        suite.channel
    ).CountSegmentMembers(membership_service_pb2.CountSegmentMembersRequest(segment=segment))
    value: int = response.count
    return value


async def download(suite: RunningSuite, segment: str) -> list[list[str]]:
    columns = [
        export_pb2.ExportColumn(field=export_pb2.EXPORT_FIELD_PROFILE_ID),
        export_pb2.ExportColumn(identity_type="email", header="Email"),
        export_pb2.ExportColumn(attribute_path="plan"),
        export_pb2.ExportColumn(attribute_path="address.city", header="City"),
    ]
    api = export_service_pb2_grpc.ExportServiceStub(suite.channel)
    data = b"".join(
        [
            chunk.data
            async for chunk in api.ExportSegmentCsv(
                export_service_pb2.ExportSegmentCsvRequest(segments=[segment], columns=columns)
            )
        ]
    )
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


async def test_identity_and_attribute_columns_come_from_profiles_and_erased_ones_are_absent(
    suite: RunningSuite,
) -> None:
    dataset = new_dataset()
    ingest = ingest_service_pb2_grpc.IngestServiceStub(suite.channel)
    users = {
        "ann": ("ann@example.com", "Paris"),
        "bob": ("=bob@example.com", "Lyon"),
        "cat": ("cat@example.com", "Nice"),
    }
    await ingest.SendEvents(
        ingest_service_pb2.SendEventsRequest(
            parent=f"datasets/{dataset}",
            events=[
                event(
                    user=user,
                    kind=E.EVENT_TYPE_IDENTIFY,
                    traits={"plan": "pro", "address": {"city": city}},
                    identities=[("email", email)],
                )
                for user, (email, city) in users.items()
            ],
        )
    )
    clients = Clients(suite.channel)
    segment = (await clients.create(dataset, "pro", 'attributes.plan = "pro"')).name
    await clients.wait_active(segment)

    async def all_in() -> bool:
        return await count(suite, segment) == 3

    await eventually(all_in)
    assert await download(suite, segment) == [
        ["profile_id", "Email", "plan", "City"],
        ["ann", "ann@example.com", "pro", "Paris"],
        ["bob", "'=bob@example.com", "pro", "Lyon"],
        ["cat", "cat@example.com", "pro", "Nice"],
    ]

    profiles = profile_service_pb2_grpc.ProfileServiceStub(suite.channel)
    await profiles.EraseProfile(
        profile_service_pb2.EraseProfileRequest(name=f"datasets/{dataset}/profiles/bob")
    )

    async def left() -> bool:
        return await count(suite, segment) == 2

    await eventually(left)
    assert [row[0] for row in await download(suite, segment)] == ["profile_id", "ann", "cat"]
