"""The webhook dispatcher on real PostgreSQL, POSTing to a real HTTP receiver.

The dispatcher claims due deliveries of every dataset in the session's database, so it may
also send other tests' leftovers; each test looks only at its own dataset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from services.export.adapters.http import HttpSender
from services.export.domain.model import ChangeKind, DeliveryState, WebhookSubscription
from services.export.domain.webhooks import verify
from services.export.ports import SystemClock
from services.export.store import ExportStore, NewDelivery
from services.export.webhook_worker import Dispatcher, WebhookSettings
from tests.integration.export.peers import HttpReceiver, eventually

pytestmark = pytest.mark.integration

SECRET = "whsec-0123456789abcdef"
SETTINGS = WebhookSettings(
    timeout=timedelta(seconds=5),
    backoff_base=timedelta(milliseconds=20),
    backoff_cap=timedelta(milliseconds=100),
    poll_interval=timedelta(milliseconds=20),
)


@contextlib.asynccontextmanager
async def dispatching(store: ExportStore) -> AsyncIterator[Dispatcher]:
    sender = HttpSender(SETTINGS.timeout)
    dispatcher = Dispatcher(store, sender, SystemClock(), SETTINGS, jitter=lambda: 1.0)
    task = asyncio.create_task(dispatcher.run_forever())
    try:
        yield dispatcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sender.close()


async def subscribe(store: ExportStore, url: str, max_attempts: int) -> WebhookSubscription:
    clock = SystemClock()
    name = f"t{uuid.uuid4().hex[:12]}"
    watcher = f"w-{name}"
    hook = await store.create_subscription(
        WebhookSubscription(
            dataset=name,
            subscription_id="hook",
            display_name="",
            url=url,
            segment_ids=(),
            kinds=frozenset(),
            secret=SECRET,
            paused=False,
            max_attempts=max_attempts,
            create_time=clock.now(),
            update_time=clock.now(),
            version=1,
        ),
        "hook",
    )
    await store.claim_watches(watcher, clock.now(), timedelta(minutes=1), 10_000)
    return hook


def change(member: str, sequence: int, kind: ChangeKind) -> NewDelivery:
    delivery_id = uuid.uuid4().hex
    body = json.dumps({"id": delivery_id, "member": member, "seq": sequence, "kind": kind.value})
    return NewDelivery(delivery_id, member, "vip", sequence, kind, body)


async def test_a_receiver_failing_three_times_gets_each_change_once_in_order_signed(
    store: ExportStore, receiver: HttpReceiver
) -> None:
    hook = await subscribe(store, receiver.url, max_attempts=8)
    changes = [
        change("ann", 1, ChangeKind.JOIN),
        change("bob", 2, ChangeKind.JOIN),
        change("ann", 3, ChangeKind.LEAVE),
        change("ann", 4, ChangeKind.JOIN),
        change("bob", 5, ChangeKind.LEAVE),
    ]
    receiver.statuses = [500, 503, 502]

    async with dispatching(store):
        await store.record_changes(hook, f"w-{hook.dataset}", changes, "t", SystemClock().now())
        await eventually(lambda: len(receiver.accepted()) >= len(changes))
        await asyncio.sleep(0.2)

    accepted = receiver.accepted()
    bodies = [json.loads(request.body) for request in accepted]
    assert sorted(body["seq"] for body in bodies) == [1, 2, 3, 4, 5]
    for member in ("ann", "bob"):
        order = [body["seq"] for body in bodies if body["member"] == member]
        assert order == sorted(order)
    for request in receiver.requests:
        assert verify(
            SECRET,
            request.headers["audience-timestamp"],
            request.body,
            request.headers["audience-signature"],
        )
        assert request.headers["audience-delivery"] == json.loads(request.body)["id"]
    delivered = await store.list_deliveries(
        hook.dataset, "hook", DeliveryState.DELIVERED, None, 100
    )
    assert len(delivered) == len(changes)
    assert sum(d.attempt_count for d in delivered) == len(changes) + 3


async def test_a_delivery_that_keeps_failing_goes_dead_and_the_member_moves_on(
    store: ExportStore, receiver: HttpReceiver
) -> None:
    hook = await subscribe(store, receiver.url, max_attempts=2)
    receiver.statuses = [500, 500]

    async with dispatching(store):
        await store.record_changes(
            hook,
            f"w-{hook.dataset}",
            [change("ann", 1, ChangeKind.JOIN), change("ann", 2, ChangeKind.LEAVE)],
            "t",
            SystemClock().now(),
        )
        await eventually(lambda: len(receiver.accepted()) >= 1)

        dead = await store.list_deliveries(hook.dataset, "hook", DeliveryState.DEAD, None, 10)
        assert [(json.loads(d.payload)["seq"], d.attempt_count) for d in dead] == [(1, 2)]
        assert dead[0].last_http_status == 500
        assert "HTTP 500" in dead[0].last_error
        assert [json.loads(r.body)["seq"] for r in receiver.accepted()] == [2]

        assert await store.replay_deliveries(hook.dataset, "hook", [], SystemClock().now()) == 1
        await eventually(lambda: len(receiver.accepted()) >= 2)

    assert [json.loads(r.body)["seq"] for r in receiver.accepted()] == [2, 1]


async def test_a_receiver_that_does_not_answer_is_recorded_as_a_failed_attempt(
    store: ExportStore,
) -> None:
    hook = await subscribe(store, "http://127.0.0.1:9/unreachable", max_attempts=1)

    async with dispatching(store):
        await store.record_changes(
            hook,
            f"w-{hook.dataset}",
            [change("ann", 1, ChangeKind.JOIN)],
            "t",
            SystemClock().now(),
        )

        async def dead() -> bool:
            found = await store.list_deliveries(hook.dataset, "hook", DeliveryState.DEAD, None, 1)
            return bool(found)

        await eventually(dead)

    (delivery,) = await store.list_deliveries(hook.dataset, "hook", DeliveryState.DEAD, None, 1)
    assert delivery.last_http_status == 0
    assert delivery.last_error
