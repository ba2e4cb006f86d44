"""The ``ingest`` group's consumer of the ``failed-events`` topic."""

from __future__ import annotations

import asyncio
import logging
from typing import NoReturn

from opentelemetry import trace
from redis.exceptions import RedisError

from audience.db import LOOP_FAILURES
from audience.streams import Bus, Consumer, Delivery, run_to_end
from audience.telemetry import consumer_span
from services.ingest.failed import FAILED_EVENTS_TOPIC, FailedEvents

__all__ = ["INGEST_GROUP", "consume_failed_events"]

INGEST_GROUP = "ingest"

_log = logging.getLogger(__name__)

_FAILURES: tuple[type[Exception], ...] = (RedisError, *LOOP_FAILURES)

# Seconds to wait after a failure before reading again; the deliveries stay pending
# meanwhile and come back on the next read of this consumer's history.
_RETRY_DELAY = 1.0


async def consume_failed_events(
    bus: Bus, failed: FailedEvents, *, name: str, tracer: trace.Tracer | None = None
) -> NoReturn:
    """Stores every failure published on ``failed-events``, then acknowledges it; forever.

    Each read is handled in a span of ``tracer`` (no-op by default) in its messages' trace.

    Storing is idempotent, so a delivery handed out again after a crash (or taken over
    from a dead replica) is harmless. Redis and PostgreSQL outages are logged and retried.
    Cancelled, it first stores what it read (:func:`~audience.streams.run_to_end`).
    """
    spans = tracer or trace.NoOpTracer()
    while True:
        consumer = bus.consumer(FAILED_EVENTS_TOPIC, INGEST_GROUP, name)
        try:
            while True:
                deliveries = await consumer.read()
                if deliveries:
                    await run_to_end(_store(consumer, deliveries, failed, spans))
        except _FAILURES as error:
            _log.warning("consuming failed events failed; retrying: %s", error)
            # A new consumer re-reads its pending deliveries first.
            await asyncio.sleep(_RETRY_DELAY)


async def _store(
    consumer: Consumer, deliveries: list[Delivery], failed: FailedEvents, tracer: trace.Tracer
) -> None:
    with consumer_span(
        "ingest consume failed-events",
        deliveries[0].headers,
        tracer=tracer,
        linked=[d.headers for d in deliveries[1:]],
        attributes={
            "messaging.destination.name": FAILED_EVENTS_TOPIC,
            "messaging.batch.message_count": len(deliveries),
        },
    ):
        stored = await failed.record([d.payload for d in deliveries])
        await consumer.ack(deliveries)
    _log.info("kept %d failed events", stored)
