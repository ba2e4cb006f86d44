"""Webhooks at work: watchers turn the change stream into deliveries; the dispatcher POSTs
them.

**Watchers.** Each subscription is watched by one replica at a time (a renewed claim on
its row). The watcher reads the change stream from the subscription's durable cursor and,
in one transaction per batch, records a delivery per matching change (a change already
recorded is skipped, so the table holds each change once however often the stream repeats
it) and moves the cursor past the batch. After a restart it resumes from the cursor.

**Dispatcher.** Deliveries are claimed in creation order, but only the first pending
delivery of each member (per subscription): a member's later change waits until the earlier
one is delivered or dead. A failed attempt is retried with exponential backoff; after the
subscription's ``max_attempts`` the delivery is dead (the dead-letter list) and the member's
next change goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from audience.waiting import stop_task, wait_woken
from services.export.domain import webhooks
from services.export.domain.backoff import backoff
from services.export.domain.model import (
    DeliveryState,
    Heartbeat,
    MembershipChange,
    WebhookSubscription,
)
from services.export.domain.names import WEBHOOK_SUBSCRIPTIONS, child_name, segment_name
from services.export.ports import (
    Clock,
    MembershipReader,
    ResumePointExpiredError,
    WebhookSender,
)
from services.export.store import ClaimedDelivery, ExportStore, NewDelivery

__all__ = ["Dispatcher", "WatchManager", "WebhookSettings"]

_log = logging.getLogger(__name__)

_BATCH = 1000


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    concurrency: int = 32
    """Requests in flight at once, per replica."""
    timeout: timedelta = timedelta(seconds=10)
    backoff_base: timedelta = timedelta(seconds=2)
    backoff_cap: timedelta = timedelta(hours=1)
    poll_interval: timedelta = timedelta(milliseconds=500)
    lease: timedelta = timedelta(seconds=30)
    heartbeat_interval: timedelta = timedelta(seconds=10)
    max_watches: int = 1000
    """Subscriptions one replica watches at most."""


def _new_delivery(subscription: WebhookSubscription, change: MembershipChange) -> NewDelivery:
    delivery_id = uuid.uuid4().hex
    body = webhooks.payload(
        delivery_id,
        child_name(subscription.dataset, WEBHOOK_SUBSCRIPTIONS, subscription.subscription_id),
        segment_name(subscription.dataset, change.segment_id),
        change,
    )
    return NewDelivery(
        delivery_id=delivery_id,
        member=change.member,
        segment_id=change.segment_id,
        member_sequence=change.member_sequence,
        kind=change.kind,
        payload=body,
    )


class _Watcher:
    def __init__(
        self,
        manager: WatchManager,
        subscription: WebhookSubscription,
        resume_token: str | None,
    ) -> None:
        self.subscription = subscription
        self._manager = manager
        self._cursor: str | datetime | None = resume_token or subscription.create_time

    def _wanted(self, change: MembershipChange) -> bool:
        kinds = self.subscription.kinds
        return not kinds or change.kind in kinds

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                if not await self._follow():
                    return
            except ResumePointExpiredError as error:
                _log.error(
                    "Webhook %s/%s: the change log no longer holds its cursor (%s); changes "
                    "since were missed, watching from now",
                    self.subscription.dataset,
                    self.subscription.subscription_id,
                    error,
                )
                self._cursor = None
            except Exception as error:
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                _log.warning(
                    "Webhook %s/%s: watching changes failed (%s); again in %.1fs",
                    self.subscription.dataset,
                    self.subscription.subscription_id,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                # The stream ended cleanly (the engine restarting): resume from the cursor.
                failures = 0
                await asyncio.sleep(0.5)

    async def _follow(self) -> bool:
        """Follows the stream until it ends; False once the subscription is no longer ours."""
        subscription = self.subscription
        kinds = subscription.kinds
        only = next(iter(kinds)) if len(kinds) == 1 else None
        queue: asyncio.Queue[MembershipChange | Heartbeat] = asyncio.Queue(maxsize=10 * _BATCH)
        manager = self._manager

        async def read() -> None:
            async for item in manager.members.watch(
                subscription.dataset,
                subscription.segment_ids,
                only,
                self._cursor,
                manager.settings.heartbeat_interval,
            ):
                await queue.put(item)

        reader = asyncio.create_task(read())
        getter: asyncio.Future[MembershipChange | Heartbeat] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    reader.result()
                    return True
                items = [getter.result()]
                while len(items) < _BATCH and not queue.empty():
                    items.append(queue.get_nowait())
                deliveries = [
                    _new_delivery(subscription, item)
                    for item in items
                    if isinstance(item, MembershipChange) and self._wanted(item)
                ]
                token = next(
                    (item.resume_token for item in reversed(items) if item.resume_token), None
                )
                if token is None:
                    continue
                mine = await manager.store.record_changes(
                    subscription, manager.watcher_id, deliveries, token, manager.clock.now()
                )
                if not mine:
                    return False
                self._cursor = token
                if deliveries:
                    manager.on_deliveries()
        finally:
            # Cancelled while waiting (the subscription changed, or shutdown), the getter
            # would be left pending and destroyed with the queue.
            if getter is not None:
                getter.cancel()
            await stop_task(reader)


class WatchManager:
    """Claims subscriptions for this replica and runs a watcher for each."""

    def __init__(
        self,
        store: ExportStore,
        members: MembershipReader,
        clock: Clock,
        settings: WebhookSettings,
        *,
        on_deliveries: Callable[[], None] = lambda: None,
        watcher_id: str | None = None,
    ) -> None:
        self.store = store
        self.members = members
        self.clock = clock
        self.settings = settings
        self.on_deliveries = on_deliveries
        self.watcher_id = watcher_id or f"export-{uuid.uuid4().hex[:12]}"
        self._watchers: dict[tuple[str, str], tuple[_Watcher, asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Looks at the subscriptions at once (one was just created or changed here)."""
        self._wake.set()

    async def _reconcile(self) -> None:
        owned = await self.store.claim_watches(
            self.watcher_id, self.clock.now(), self.settings.lease, self.settings.max_watches
        )
        wanted = {}
        for watched in owned:
            subscription = watched.subscription
            key = (subscription.dataset, subscription.subscription_id)
            wanted[key] = watched
            running = self._watchers.get(key)
            if (
                running is not None
                and running[0].subscription.version == subscription.version
                and not running[1].done()
            ):
                continue
            if running is not None:
                await self._stop(key)
            watcher = _Watcher(self, subscription, watched.resume_token)
            task = asyncio.create_task(watcher.run(), name=f"webhook-watch-{key[0]}/{key[1]}")
            self._watchers[key] = (watcher, task)
        for key in list(self._watchers):
            if key not in wanted:
                await self._stop(key)

    async def _stop(self, key: tuple[str, str]) -> None:
        _, task = self._watchers.pop(key)
        await stop_task(task)

    async def run_forever(self) -> None:
        interval = self.settings.lease.total_seconds() / 3
        try:
            while True:
                try:
                    await self._reconcile()
                except Exception:
                    _log.exception("Claiming webhook subscriptions failed; trying again")
                self._wake.clear()
                await wait_woken(self._wake, interval)
        finally:
            for key in list(self._watchers):
                await self._stop(key)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release_watches(self.watcher_id))


class Dispatcher:
    """Sends due deliveries, a member's in order, retrying with backoff."""

    def __init__(
        self,
        store: ExportStore,
        sender: WebhookSender,
        clock: Clock,
        settings: WebhookSettings,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._sender = sender
        self._clock = clock
        self._settings = settings
        self._jitter = jitter
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        settings = self._settings
        in_flight: dict[asyncio.Task[None], int] = {}
        # A claim outlives the request's timeout, so a live sender never loses its claim.
        hold = settings.timeout * 2 + timedelta(seconds=10)
        try:
            while True:
                free = settings.concurrency - len(in_flight)
                claimed: list[ClaimedDelivery] = []
                if free > 0:
                    self._wake.clear()
                    try:
                        claimed = await self._store.claim_deliveries(self._clock.now(), hold, free)
                    except Exception:
                        _log.exception("Claiming webhook deliveries failed; trying again")
                for item in claimed:
                    task = asyncio.create_task(self._send(item))
                    in_flight[task] = item.delivery.sequence
                    task.add_done_callback(in_flight.pop)
                    # A finished delivery may free its member's next one.
                    task.add_done_callback(lambda _: self._wake.set())
                if claimed and len(claimed) == free:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), settings.poll_interval.total_seconds()
                    )
        finally:
            # Stopping: requests still unanswered are abandoned and their claims given back,
            # so the next replica to start sends them again at once (at least once).
            cut_short = list(in_flight.values())
            for task in list(in_flight):
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            if cut_short:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._store.release_claims(cut_short))

    async def _send(self, item: ClaimedDelivery) -> None:
        delivery = item.delivery
        now = self._clock.now()
        timestamp = int(now.timestamp())
        headers = webhooks.headers(delivery.delivery_id, item.secret, timestamp, delivery.payload)
        try:
            response = await self._sender.post(item.url, delivery.payload, headers)
        except Exception:
            _log.exception("Sending webhook delivery %s failed", delivery.delivery_id)
            return
        attempts = delivery.attempt_count + 1
        finished = self._clock.now()
        if response.ok:
            state, next_time = DeliveryState.DELIVERED, None
        elif attempts >= item.max_attempts:
            state, next_time = DeliveryState.DEAD, None
            _log.warning(
                "Webhook delivery %s is dead after %d attempts: %s",
                delivery.delivery_id,
                attempts,
                response.error,
            )
        else:
            state = DeliveryState.PENDING
            next_time = finished + backoff(
                attempts, self._settings.backoff_base, self._settings.backoff_cap, self._jitter()
            )
        recording = asyncio.ensure_future(
            self._store.finish_attempt(
                delivery,
                state=state,
                attempt_count=attempts,
                http_status=response.status,
                error=response.error,
                now=finished,
                next_attempt_time=next_time,
            )
        )
        try:
            # The receiver has answered: a replica stopping now still records it, or the
            # delivery would stay claimed (its member's later changes held back) and then
            # be sent again.
            await asyncio.shield(recording)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await recording
            raise
        except Exception:
            # The claim runs out and the delivery is sent again: at least once.
            _log.exception("Recording webhook delivery %s failed", delivery.delivery_id)
