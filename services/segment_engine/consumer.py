"""The bus side of the engine: profile changes in, as group ``segment_engine``.

Each read is applied in one transaction (:meth:`Processor.apply_changes`) and acknowledged
after it commits. Delivery is at least once: a change whose sequence the stored view has
reached is ignored. A payload that does not parse is logged and acknowledged (it can never
be applied); a failure of PostgreSQL is waited out and the same entries are tried again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NoReturn

import asyncpg
from google.protobuf.message import DecodeError
from opentelemetry import trace
from redis.exceptions import RedisError

from audience.bus.v1 import profile_change_pb2
from audience.db import SERVER_GONE
from audience.streams import Bus, Consumer, Delivery, run_to_end
from audience.telemetry import consumer_span
from services.segment_engine.processor import Processor

__all__ = ["GROUP", "PROFILE_CHANGES", "ProfileChangeConsumer", "declare_topics"]

_log = logging.getLogger(__name__)

PROFILE_CHANGES = "profile-changes"
GROUP = "segment_engine"
_MAX_BACKOFF = 30.0
_TRANSACTION_CHANGES = 500


async def declare_topics(bus: Bus) -> None:
    await bus.declare(PROFILE_CHANGES, [GROUP])


class ProfileChangeConsumer:
    """Reads profile changes and applies them, until cancelled.

    Args:
        workers: consumers run side by side, each reading its own share of the partitions
            (so one subject's changes stay in order within this replica).
        tracer: each read is applied in a span of it, in the trace of the profile service's
            span that published its first entry; no-op by default.
    """

    def __init__(
        self,
        bus: Bus,
        processor: Processor,
        *,
        name: str,
        count: int,
        claim_idle: float,
        workers: int = 1,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._processor = processor
        self._tracer = tracer or trace.NoOpTracer()
        partitions = list(range(bus.partitions))
        workers = max(1, min(workers, len(partitions)))
        self._consumers: list[Consumer] = [
            bus.consumer(
                PROFILE_CHANGES,
                GROUP,
                f"{name}-{index}",
                partitions=partitions[index::workers],
                count=count,
                block=1.0,
                claim_idle=claim_idle,
            )
            for index in range(workers)
        ]

    async def run(self) -> NoReturn:
        async with asyncio.TaskGroup() as group:
            for consumer in self._consumers:
                group.create_task(self._work(consumer))
        raise AssertionError("consumers never return")

    async def _work(self, consumer: Consumer) -> None:
        backoff = 0.1
        while True:
            try:
                deliveries = await consumer.read()
                if deliveries:
                    await run_to_end(self._apply_and_ack(consumer, deliveries))
                backoff = 0.1
            except (OSError, RedisError, asyncpg.InterfaceError, *SERVER_GONE):
                _log.warning("profile changes: infrastructure failure; retrying", exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _apply_and_ack(self, consumer: Consumer, deliveries: list[Delivery]) -> None:
        await self._apply(deliveries)
        await consumer.ack(deliveries)

    async def _apply(self, deliveries: list[Delivery]) -> None:
        changes: list[profile_change_pb2.ProfileChange] = []
        for delivery in deliveries:
            try:
                batch = profile_change_pb2.ProfileChangeBatch.FromString(delivery.payload)
            except DecodeError:
                _log.error(
                    "profile changes: entry %s of partition %d does not parse; dropping it",
                    delivery.entry_id,
                    delivery.partition,
                )
                continue
            changes.extend(batch.changes)
        if not changes:
            return
        with consumer_span(
            "segment_engine consume profile-changes",
            deliveries[0].headers,
            tracer=self._tracer,
            linked=[delivery.headers for delivery in deliveries[1:]],
            attributes={"messaging.destination.name": PROFILE_CHANGES},
        ):
            # Bounded transactions: a backlog read at once must not hold thousands of
            # subjects locked (and their changes unseen) until all of it is evaluated.
            for start in range(0, len(changes), _TRANSACTION_CHANGES):
                await self._processor.apply_changes(changes[start : start + _TRANSACTION_CHANGES])
