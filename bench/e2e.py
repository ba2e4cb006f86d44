"""Benchmark: the whole suite, from ingest's acknowledgement to a subscriber hearing of the
membership change, with 1,000 segments of mixed kinds.

    python -m bench.e2e [--segments 1000] [--users 20000] [--rate 5000] [--seconds 20]
                        [--batch 100] [--events 100000] [--quick]

Ingest, profile and the segment engine run as their own processes (``python -m
services.<name>``), as deployed; this process sends events (``SendEvents`` batches) and
watches the dataset's membership changes (asking for them in batches of up to 500, as a
busy subscriber should; ADR 0003). Segments: attribute, behaviour (windowed
counts), cart, segment-reference and account roll-up rules. Phases:

1. Warm-up: one identify per user, so every profile exists (a new profile is evaluated
   against every segment once); waits until the pipeline has drained.
2. Latency: events at ``--rate`` per second for ``--seconds``, in calls of ``--batch``
   events (``--batch 1``: each event alone, as a storefront sends them); for every change
   the subscriber receives, the time from the acknowledgement of its triggering event
   (``reason.event_ids``) to its arrival.
3. Throughput: ``--events`` events sent as fast as ingest takes them (it pushes back with
   ``RESOURCE_EXHAUSTED`` when the pipeline falls behind); the rate is the events divided
   by the time until every stage has drained (the pipeline keeping up).
4. Baseline: a bare ``grpc.aio`` unary echo's round trip, in the same run.

PostgreSQL and Redis are ``AUDIENCE_POSTGRES_DSN`` / ``AUDIENCE_REDIS_URL`` (a superuser
DSN: a scratch database is made and dropped), or embedded servers when unset.

The last line printed is JSON: ``events_per_s``, ``p50_ms``, ``p99_ms`` (at ``--rate``),
``baseline_rtt_p50_ms``, with the changes measured and the settings. Goals: ≥ 25,000
events/s; p50 ≤ 5 ms; p99 ≤ 25 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from redis.asyncio import Redis

from audience import rules
from audience.errors import decode
from audience.streams import Bus
from audience.v1 import (
    common_pb2,
    event_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_service_pb2,
    membership_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from bench._suite import (
    ECHO_METHOD,
    BenchKeys,
    bench_keys,
    client_channel,
    closed_loop,
    free_port,
    latency_summary,
    log,
    parse_options,
    redis_namespace,
    scratch_database,
    serve_echo,
    servers,
    service,
    wait_serving,
)

DATASET = "bench"
GOAL_EVENTS_PER_S = 25_000
GOAL_P50_MS = 5.0
GOAL_P99_MS = 25.0


ATTRIBUTES = 30
VALUES = 10
EVENT_NAMES = 100


def segment_rules(count: int) -> list[tuple[str, int, str]]:
    """``count`` segments of mixed kinds, spread so that a typical event changes one or two
    memberships: (id, kind, rule text)."""
    user = segment_pb2.SEGMENT_KIND_USER
    account = segment_pb2.SEGMENT_KIND_ACCOUNT
    found: list[tuple[str, int, str]] = []
    shares = [("attr", 0.30), ("views", 0.30), ("cart", 0.15), ("ref", 0.15), ("acct", 0.10)]
    for family, share in shares:
        for i in range(round(count * share)):
            segment_id = f"{family}-{i:04d}"
            if family == "attr":
                text = f'attributes.a{i % ATTRIBUTES} = "v{i // ATTRIBUTES % VALUES}"'
                found.append((segment_id, user, text))
            elif family == "views":
                event = f"e{i % EVENT_NAMES}"
                times = 1 + i // EVENT_NAMES % 3
                found.append((segment_id, user, f'count(event "{event}", last 7 days) >= {times}'))
            elif family == "cart":
                found.append((segment_id, user, f"cart.value >= {20 * (i + 1)}"))
            elif family == "ref":
                target = f"datasets/{DATASET}/segments/attr-{i % 300:04d}"
                event = f"e{(i * 7) % EVENT_NAMES}"
                text = f'in segment "{target}" and count(event "{event}", last 7 days) >= 1'
                found.append((segment_id, user, text))
            else:
                attribute = f"a{i % ATTRIBUTES}"
                value = f"v{i // ATTRIBUTES % VALUES}"
                text = f'count(users where attributes.{attribute} = "{value}") >= {1 + i % 3}'
                found.append((segment_id, account, text))
    return found[:count]


def _now_stamp() -> Any:
    return rules.timestamp_from_micros(time.time_ns() // 1000)


class EventMaker:
    """Events of a storefront: track events (half), an identify setting one attribute, or a
    cart update (a quarter each). A cart grows an item at a time and starts again after
    eight, as carts do, so its value crosses few thresholds per update."""

    def __init__(self, seed: int, users: int, accounts: int) -> None:
        self._rng = random.Random(seed)
        self._users = users
        self._accounts = accounts
        self._carts: dict[int, list[float]] = {}

    def __call__(self) -> event_pb2.Event:
        rng = self._rng
        user = rng.randrange(self._users)
        stamp = _now_stamp()
        event = event_pb2.Event(
            event_id=uuid.uuid4().hex, user_id=f"u{user:06d}", timestamp=stamp, sent_at=stamp
        )
        event.context.session_id = f"s{user}"
        kind = rng.random()
        if kind < 0.5:
            event.type = event_pb2.EVENT_TYPE_TRACK
            event.name = f"e{rng.randrange(EVENT_NAMES)}"
        elif kind < 0.75:
            event.type = event_pb2.EVENT_TYPE_IDENTIFY
            event.identify.traits[f"a{rng.randrange(ATTRIBUTES)}"].CopyFrom(
                common_pb2.Value(string_value=f"v{rng.randrange(VALUES)}")
            )
            event.account_id = f"a{user % self._accounts:05d}"
        else:
            cart = self._carts.setdefault(user, [])
            if len(cart) == 8:
                cart.clear()
            cart.append(float(rng.randrange(5, 80)))
            event.type = event_pb2.EVENT_TYPE_CART_UPDATED
            event.cart.currency = "USD"
            for n, price in enumerate(cart):
                event.cart.items.add(product_id=f"sku-{n}", price=price, quantity=1)
        return event


@dataclass
class Watcher:
    """Receives the dataset's changes and times them against event acknowledgements."""

    acked: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    received: int = 0
    measuring: bool = False

    async def run(self, stub: membership_service_pb2_grpc.MembershipServiceStub) -> None:
        request = membership_service_pb2.WatchMembershipChangesRequest(
            parent=f"datasets/{DATASET}", max_changes_per_response=500
        )
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for response in stub.WatchMembershipChanges(request):
                changes = response.batch.changes
                arrived = time.monotonic()
                self.received += len(changes)
                if not self.measuring:
                    continue
                for change in changes:
                    for event_id in change.reason.event_ids:
                        acked = self.acked.get(event_id)
                        if acked is not None:
                            self.latencies.append(arrived - acked)
                            break


async def _send(
    stub: ingest_service_pb2_grpc.IngestServiceStub, events: list[event_pb2.Event]
) -> float:
    """Sends a batch until ingest takes it; returns when it was acknowledged."""
    request = ingest_service_pb2.SendEventsRequest(parent=f"datasets/{DATASET}", events=events)
    while True:
        try:
            await stub.SendEvents(request, timeout=30)
            return time.monotonic()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            delay = decode(error).retry_delay
            await asyncio.sleep(delay.total_seconds() if delay else 0.05)


async def _drained(bus: Bus, within: float = 900.0) -> None:
    deadline = time.monotonic() + within
    while True:
        behind = await bus.backlog("events", "profile") + await bus.backlog(
            "profile-changes", "segment_engine"
        )
        if not behind:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pipeline did not drain ({behind} entries behind)")
        await asyncio.sleep(0.05)


async def _create_segments(channel: grpc.aio.Channel, count: int) -> None:
    stub = segment_service_pb2_grpc.SegmentServiceStub(channel)
    for segment_id, kind, text in segment_rules(count):
        await stub.CreateSegment(
            segment_service_pb2.CreateSegmentRequest(
                parent=f"datasets/{DATASET}",
                segment_id=segment_id,
                segment=segment_pb2.Segment(
                    kind=segment_pb2.SegmentKind.ValueType(kind),
                    source=segment_pb2.SEGMENT_SOURCE_RULE,
                    rule_text=text,
                ),
            ),
            timeout=60,
        )
    while True:
        response = await stub.ListSegments(
            segment_service_pb2.ListSegmentsRequest(
                parent=f"datasets/{DATASET}",
                state=segment_pb2.SEGMENT_STATE_BACKFILLING,
                page_size=1,
            )
        )
        if not response.segments:
            return
        await asyncio.sleep(0.5)


async def _warm(
    stub: ingest_service_pb2_grpc.IngestServiceStub, bus: Bus, users: int, accounts: int
) -> None:
    rng = random.Random(3)
    batch: list[event_pb2.Event] = []
    for user in range(users):
        stamp = _now_stamp()
        event = event_pb2.Event(
            event_id=uuid.uuid4().hex,
            user_id=f"u{user:06d}",
            type=event_pb2.EVENT_TYPE_IDENTIFY,
            timestamp=stamp,
            sent_at=stamp,
            account_id=f"a{user % accounts:05d}",
        )
        event.identify.traits["age"].CopyFrom(
            common_pb2.Value(number_value=float(rng.randrange(16, 70)))
        )
        batch.append(event)
        if len(batch) == 500:
            await _send(stub, batch)
            batch = []
    if batch:
        await _send(stub, batch)
    await _drained(bus)


async def _paced(
    stub: ingest_service_pb2_grpc.IngestServiceStub,
    watcher: Watcher,
    rate: int,
    seconds: float,
    batch: int,
    users: int,
    accounts: int,
) -> int:
    make = EventMaker(5, users, accounts)
    interval = batch / rate
    started = time.monotonic()
    sent = 0
    in_flight: set[asyncio.Task[None]] = set()

    async def one(events: list[event_pb2.Event]) -> None:
        acked = await _send(stub, events)
        for event in events:
            watcher.acked[event.event_id] = acked

    while time.monotonic() - started < seconds:
        events = [make() for _ in range(batch)]
        task = asyncio.create_task(one(events))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        sent += batch
        next_at = started + (sent / batch) * interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*in_flight)
    return sent


async def _flood(
    stub: ingest_service_pb2_grpc.IngestServiceStub, events: int, users: int, accounts: int
) -> None:
    make = EventMaker(9, users, accounts)
    batches = [[make() for _ in range(500)] for _ in range(events // 500)]
    queue = iter(batches)

    async def worker() -> None:
        for batch in queue:
            await _send(stub, batch)

    await asyncio.gather(*(worker() for _ in range(8)))


@contextlib.asynccontextmanager
async def _suite(
    directory: Path, dsn: str, redis_url: str, keys: BenchKeys
) -> AsyncIterator[dict[str, str]]:
    async with (
        redis_namespace(redis_url) as namespace,
        _services(directory, dsn, redis_url, namespace, keys) as addresses,
    ):
        yield addresses


@contextlib.asynccontextmanager
async def _services(
    directory: Path, dsn: str, redis_url: str, namespace: str, keys: BenchKeys
) -> AsyncIterator[dict[str, str]]:
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("ingest", "profile", "engine")}
    environ = {
        "PATH": "/usr/bin:/bin",
        "AUDIENCE_POSTGRES_DSN": dsn,
        "AUDIENCE_REDIS_URL": redis_url,
        "AUDIENCE_REDIS_NAMESPACE": namespace,
        "AUDIENCE_PROFILE_ADDRESS": addresses["profile"],
        "AUDIENCE_SEGMENT_ENGINE_ADDRESS": addresses["engine"],
        "AUDIENCE_INGEST_ADDRESS": addresses["ingest"],
        "AUDIENCE_LOG_LEVEL": "warning",
        # Authentication on, as deployed: the services present the internal key to each
        # other, and the load its own key.
        **keys.environ,
    }
    async with (
        service(
            ["-m", "services.ingest"],
            {**environ, "AUDIENCE_LISTEN": addresses["ingest"]},
            directory,
            "ingest",
        ) as ingest,
        service(
            ["-m", "services.profile"],
            {**environ, "AUDIENCE_LISTEN": addresses["profile"]},
            directory,
            "profile",
        ) as profile,
        service(
            ["-m", "services.segment_engine"],
            {**environ, "AUDIENCE_LISTEN": addresses["engine"]},
            directory,
            "segment_engine",
        ) as engine,
        service(
            ["-m", "bench.e2e", "--echo", f"127.0.0.1:{(echo := free_port())}"],
            environ,
            directory,
            "echo",
        ),
    ):
        await wait_serving(addresses["ingest"], "ingest", ingest)
        await wait_serving(addresses["profile"], "profile", profile)
        await wait_serving(addresses["engine"], "segment engine", engine)
        yield {
            **addresses,
            "echo": f"127.0.0.1:{echo}",
            "namespace": namespace,
        }


async def _baseline(address: str) -> dict[str, float]:
    async with client_channel(address, None) as channel:
        method = channel.unary_unary(ECHO_METHOD)
        payload = b"x" * 64

        async def call() -> Any:
            return await method(payload, timeout=10)

        _, latencies = await closed_loop(call, concurrency=1, seconds=3, warmup=1)
    return latency_summary(latencies)


async def _run(options: argparse.Namespace) -> dict[str, Any]:
    keys = bench_keys()
    with tempfile.TemporaryDirectory(prefix="audience-bench-") as folder:
        directory = Path(folder)
        async with (
            servers(directory) as (admin_dsn, redis_url),
            scratch_database(admin_dsn) as dsn,
            _suite(directory, dsn, redis_url, keys) as addresses,
        ):
            redis = Redis.from_url(redis_url)
            bus = Bus(redis, namespace=addresses["namespace"], partitions=8)
            try:
                async with (
                    client_channel(addresses["ingest"], keys.client) as ingest_channel,
                    client_channel(addresses["engine"], keys.client) as engine_channel,
                ):
                    started = time.monotonic()
                    await _create_segments(engine_channel, options.segments)
                    log(f"{options.segments} segments in {time.monotonic() - started:.1f} s")
                    ingest = ingest_service_pb2_grpc.IngestServiceStub(ingest_channel)
                    started = time.monotonic()
                    await _warm(ingest, bus, options.users, options.accounts)
                    log(f"{options.users:,} profiles in {time.monotonic() - started:.1f} s")
                    watcher = Watcher()
                    watching = asyncio.create_task(
                        watcher.run(
                            membership_service_pb2_grpc.MembershipServiceStub(engine_channel)
                        )
                    )
                    await asyncio.sleep(1.0)
                    watcher.measuring = True
                    sent = await _paced(
                        ingest,
                        watcher,
                        options.rate,
                        options.seconds,
                        options.batch,
                        options.users,
                        options.accounts,
                    )
                    await _drained(bus)
                    await asyncio.sleep(0.5)
                    watcher.measuring = False
                    latency = latency_summary(watcher.latencies)
                    log(
                        f"latency at {options.rate}/s: {sent:,} events,"
                        f" {len(watcher.latencies):,} changes timed: {latency}"
                    )
                    started = time.monotonic()
                    await _flood(ingest, options.events, options.users, options.accounts)
                    accepted = time.monotonic() - started
                    await _drained(bus)
                    elapsed = time.monotonic() - started
                    log(
                        f"throughput: {options.events:,} events accepted in {accepted:.1f} s,"
                        f" drained after {elapsed:.1f} s; {watcher.received:,} changes seen"
                    )
                    watching.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watching
            finally:
                await redis.aclose()
            baseline = await _baseline(addresses["echo"])
    return {
        "events_per_s": round(options.events / elapsed),
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "baseline_rtt_p50_ms": baseline["p50_ms"],
        "changes_timed": len(watcher.latencies),
        "rate": options.rate,
        "batch": options.batch,
        "segments": options.segments,
        "users": options.users,
        "goal_events_per_s": GOAL_EVENTS_PER_S,
        "goal_p50_ms": GOAL_P50_MS,
        "goal_p99_ms": GOAL_P99_MS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=100, help="Events per call when paced.")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--echo", metavar="ADDRESS", help=argparse.SUPPRESS)
    options = parse_options(
        parser,
        {
            "segments": 40,
            "users": 1_000,
            "accounts": 50,
            "rate": 200,
            "seconds": 5.0,
            "events": 5_000,
        },
    )
    if options.echo:
        asyncio.run(serve_echo(options.echo))
        return
    print(json.dumps(asyncio.run(_run(options))))


if __name__ == "__main__":
    main()
