"""The profile service's outbox relay, running in the hosted service: changes left in the
outbox (their publish lost after the commit) reach ``profile-changes``."""

from __future__ import annotations

import asyncio
import time

import pytest

from audience.bus.v1 import profile_change_pb2
from audience.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from services.ingest.app import DEFINITION as INGEST
from services.profile.app import DEFINITION as PROFILE
from services.profile.consumer import PROFILE_CHANGES
from tests.e2e.conftest import StartSuite, new_dataset
from tests.profile_support import E, changes, event

pytestmark = pytest.mark.e2e

UPDATED = profile_change_pb2.PROFILE_CHANGE_TYPE_UPDATED
ERASED = profile_change_pb2.PROFILE_CHANGE_TYPE_ERASED


async def test_the_service_relays_changes_left_in_the_outbox(start_suite: StartSuite) -> None:
    environ = {"AUDIENCE_PROFILE_OUTBOX_GRACE": "100ms"}
    async with start_suite([INGEST, PROFILE], environ) as running:
        dataset = new_dataset()
        reader = running.resources.bus.consumer(
            PROFILE_CHANGES, "segment_engine", "test", block=0.1
        )
        ingest = ingest_service_pb2_grpc.IngestServiceStub(running.channel)
        await ingest.SendEvents(
            ingest_service_pb2.SendEventsRequest(
                parent=f"datasets/{dataset}", events=[event(user="u1", kind=E.EVENT_TYPE_PAGE)]
            ),
            timeout=10,
        )

        async def read(until: int, within: float = 15.0) -> list[profile_change_pb2.ProfileChange]:
            """The dataset's changes, once there are ``until`` of them."""
            found: list[profile_change_pb2.ProfileChange] = []
            deadline = time.monotonic() + within
            while len(found) < until:
                assert time.monotonic() < deadline, f"only {found}"
                deliveries = await reader.read()
                found.extend(
                    c for c in changes(d.payload for d in deliveries) if c.dataset == dataset
                )
                await reader.ack(deliveries)
            return found

        [applied] = await read(1)
        # As an erasure of u9 and an update of u1 whose publish was lost would leave them.
        await running.resources.postgres.execute(
            "INSERT INTO profile.outbox (dataset, kind, subject_id, sequence, change_type)"
            " VALUES ($1, 'user', 'u9', 4, 'erased'), ($1, 'user', 'u1', 1, 'updated')",
            dataset,
        )

        relayed = {c.profile_id: c for c in await read(2)}

        assert (relayed["u9"].type, relayed["u9"].sequence) == (ERASED, 4)
        assert (relayed["u1"].type, relayed["u1"].sequence) == (UPDATED, applied.sequence)
        assert relayed["u1"].view.last_seen_time == applied.view.last_seen_time
        for _ in range(100):
            left = await running.resources.postgres.fetchval(
                "SELECT count(*) FROM profile.outbox WHERE dataset = $1", dataset
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
        assert left == 0
