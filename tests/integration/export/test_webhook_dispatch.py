"""The webhook dispatcher on real PostgreSQL, POSTing to a real HTTP receiver.

The dispatcher claims due deliveries of every dataset in the session's database, so it may
also send other tests' leftovers; each test looks only at its own dataset.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from services.export.adapters.http import HttpSender
from services.export.domain.model import ChangeKind, DeliveryState, WebhookSubscription
from services.export.domain.webhooks import verify
from services.export.ports import SystemClock, WebhookResponse
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


class _StopAfterAnswer:
    """Sends for real, then stops the dispatcher the moment the answer is in: before the
    attempt is recorded, as a replica shutting down at the wrong instant would."""

    def __init__(self, sender: HttpSender) -> None:
        self.sender = sender
        self.dispatcher: asyncio.Task[None] | None = None

    async def post(self, url: str, body: str, headers: Mapping[str, str]) -> WebhookResponse:
        response = await self.sender.post(url, body, headers)
        assert self.dispatcher is not None
        self.dispatcher.cancel()
        return response


class _SlowToRecord(ExportStore):
    """The real store, with a database slow enough that a stop lands mid-recording."""

    async def finish_attempt(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.1)
        await super().finish_attempt(*args, **kwargs)


async def test_an_answered_delivery_is_recorded_though_the_replica_stops_at_that_moment(
    store: ExportStore, export_pool: asyncpg.Pool, receiver: HttpReceiver
) -> None:
    hook = await subscribe(store, receiver.url, max_attempts=3)
    sender = HttpSender(SETTINGS.timeout)
    stopping = _StopAfterAnswer(sender)
    dispatcher = Dispatcher(_SlowToRecord(export_pool), stopping, SystemClock(), SETTINGS)
    await store.record_changes(
        hook, f"w-{hook.dataset}", [change("ann", 1, ChangeKind.JOIN)], "t", SystemClock().now()
    )
    stopping.dispatcher = asyncio.create_task(dispatcher.run_forever())
    with contextlib.suppress(asyncio.CancelledError):
        await stopping.dispatcher
    await sender.close()

    assert len(receiver.accepted()) == 1
    (delivered,) = await store.list_deliveries(
        hook.dataset, "hook", DeliveryState.DELIVERED, None, 10
    )
    assert delivered.attempt_count == 1


@contextlib.asynccontextmanager
async def silent_receiver() -> AsyncIterator[str]:
    """A real HTTP peer that reads requests and never answers."""
    connections: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read(65536)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_delivery_cut_short_by_a_stopping_replica_goes_out_at_once_on_the_next(
    store: ExportStore, export_pool: asyncpg.Pool, receiver: HttpReceiver
) -> None:
    async with silent_receiver() as silent_url:
        hook = await subscribe(store, silent_url, max_attempts=3)
        await store.record_changes(
            hook,
            f"w-{hook.dataset}",
            [change("ann", 1, ChangeKind.JOIN), change("ann", 2, ChangeKind.LEAVE)],
            "t",
            SystemClock().now(),
        )

        async def in_flight() -> bool:
            claimed = await export_pool.fetchval(
                "SELECT count(*) FROM export.webhook_deliveries"
                " WHERE dataset = $1 AND claimed_until IS NOT NULL",
                hook.dataset,
            )
            return bool(claimed)

        async with dispatching(store):
            await eventually(in_flight)

    await store.update_subscription(
        hook.dataset,
        "hook",
        "hook",
        None,
        lambda subscription: dataclasses.replace(subscription, url=receiver.url),
        SystemClock().now(),
    )
    async with dispatching(store):
        # Well inside the claim the stopped replica took (SETTINGS: 2 × 5 s + 10 s).
        await eventually(lambda: len(receiver.accepted()) >= 2, within=5.0)

    assert [json.loads(r.body)["seq"] for r in receiver.accepted()] == [1, 2]
    delivered = await store.list_deliveries(hook.dataset, "hook", DeliveryState.DELIVERED, None, 10)
    assert sorted(d.attempt_count for d in delivered) == [1, 1]
