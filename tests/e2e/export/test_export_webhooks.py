"""Webhooks fed by the real segment engine's change stream, POSTed to a real HTTP receiver."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from audience.v1 import export_pb2, export_service_pb2, membership_pb2
from services.export.app import DEFINITION as EXPORT
from services.export.domain.webhooks import verify
from services.segment_engine.app import DEFINITION as SEGMENT_ENGINE
from tests.e2e.conftest import StartSuite, new_dataset
from tests.e2e.export.conftest import FAST, Feeds
from tests.integration.export.peers import HttpReceiver, eventually

pytestmark = pytest.mark.e2e

SECRET = "whsec-e2e-0123456789"


@pytest.fixture
async def receiver() -> AsyncIterator[HttpReceiver]:
    async with HttpReceiver.start() as server:
        yield server


async def subscribe(feeds: Feeds, url: str, segment: str, **fields: Any) -> str:
    response = await feeds.api.CreateWebhookSubscription(
        export_service_pb2.CreateWebhookSubscriptionRequest(
            parent=feeds.parent,
            webhook_subscription_id="crm",
            webhook_subscription=export_pb2.WebhookSubscription(
                url=url, secret=SECRET, segments=[segment], **fields
            ),
        )
    )
    name: str = response.webhook_subscription.name
    return name


def accepted(receiver: HttpReceiver) -> list[dict[str, Any]]:
    bodies = []
    for request in receiver.accepted():
        assert verify(
            SECRET,
            request.headers["audience-timestamp"],
            request.body,
            request.headers["audience-signature"],
        )
        body = json.loads(request.body)
        assert request.headers["audience-delivery"] == body["id"]
        bodies.append(body)
    return bodies


def by_member(bodies: list[dict[str, Any]]) -> dict[str, list[str]]:
    changes: dict[str, list[str]] = {}
    for body in bodies:
        changes.setdefault(body["member_id"], []).append(body["kind"])
    return changes


async def test_a_receiver_failing_three_times_gets_each_change_once_more_in_order_signed(
    feeds: Feeds, receiver: HttpReceiver
) -> None:
    segment = await feeds.imported_segment("vip")
    await subscribe(feeds, receiver.url, segment)
    await eventually(lambda: _watching(feeds))
    receiver.statuses = [500, 502, 503]

    await feeds.join(segment, "ann", "bob")
    await feeds.leave(segment, "ann")
    await feeds.join(segment, "ann")
    await feeds.leave(segment, "bob")
    await eventually(lambda: len(receiver.accepted()) >= 5)

    bodies = accepted(receiver)
    assert len(receiver.requests) == 5 + 3
    assert by_member(bodies) == {"ann": ["join", "leave", "join"], "bob": ["join", "leave"]}
    assert len({body["id"] for body in bodies}) == 5
    for member in ("ann", "bob"):
        sequences = [b["member_sequence"] for b in bodies if b["member_id"] == member]
        assert sequences == sorted(sequences)
    assert {body["segment"] for body in bodies} == {segment}
    assert all(body["type"] in ("membership.join", "membership.leave") for body in bodies)


async def _watching(feeds: Feeds) -> bool:
    """Whether the subscription's watcher has read the stream once (its cursor is set)."""
    row = await feeds.suite.resources.postgres.fetchval(
        "SELECT resume_token IS NOT NULL FROM export.webhook_subscriptions WHERE dataset = $1",
        feeds.dataset,
    )
    return bool(row)


async def test_only_the_chosen_kind_is_sent(feeds: Feeds, receiver: HttpReceiver) -> None:
    segment = await feeds.imported_segment("vip")
    await subscribe(
        feeds, receiver.url, segment, kinds=[membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE]
    )
    await eventually(lambda: _watching(feeds))

    await feeds.join(segment, "ann", "bob")
    await feeds.leave(segment, "bob")
    await eventually(lambda: len(receiver.accepted()) >= 1)

    assert by_member(accepted(receiver)) == {"bob": ["leave"]}


async def test_dead_deliveries_are_listed_and_replayed(
    feeds: Feeds, receiver: HttpReceiver
) -> None:
    segment = await feeds.imported_segment("vip")
    name = await subscribe(feeds, receiver.url, segment, max_attempts=2)
    await eventually(lambda: _watching(feeds))
    receiver.statuses = [500, 500]

    await feeds.join(segment, "ann")

    async def dead() -> list[export_pb2.WebhookDelivery]:
        response = await feeds.api.ListWebhookDeliveries(
            export_service_pb2.ListWebhookDeliveriesRequest(parent=name)
        )
        return list(response.webhook_deliveries)

    async def one_dead() -> bool:
        return len(await dead()) == 1

    await eventually(one_dead)
    (delivery,) = await dead()
    assert (delivery.attempt_count, delivery.last_http_status) == (2, 500)
    assert json.loads(delivery.payload)["member_id"] == "ann"

    replayed = await feeds.api.ReplayWebhookDeliveries(
        export_service_pb2.ReplayWebhookDeliveriesRequest(parent=name, names=[delivery.name])
    )
    assert replayed.replayed_count == 1
    await eventually(lambda: len(receiver.accepted()) == 1)
    assert by_member(accepted(receiver)) == {"ann": ["join"]}
    assert await dead() == []


async def test_delivery_resumes_from_the_durable_cursor_after_a_restart(
    start_suite: StartSuite, receiver: HttpReceiver, tmp_path: Path
) -> None:
    environ = {**FAST, "AUDIENCE_EXPORT_ROOT": str(tmp_path)}
    dataset = new_dataset()
    async with start_suite([SEGMENT_ENGINE, EXPORT], environ) as suite:
        feeds = Feeds(suite, dataset, tmp_path)
        segment = await feeds.imported_segment("vip")
        await subscribe(feeds, receiver.url, segment)
        await eventually(lambda: _watching(feeds))
        await feeds.join(segment, "ann")
        await eventually(lambda: len(receiver.accepted()) == 1)

    # The export service is down while members come and go.
    async with start_suite([SEGMENT_ENGINE], environ) as suite:
        feeds = Feeds(suite, dataset, tmp_path)
        await feeds.join(segment, "bob")
        await feeds.leave(segment, "ann")

    async with start_suite([SEGMENT_ENGINE, EXPORT], environ) as suite:
        await eventually(lambda: len(receiver.accepted()) >= 3)

    assert by_member(accepted(receiver)) == {"ann": ["join", "leave"], "bob": ["join"]}
