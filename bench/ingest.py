"""Benchmark: events per second through the ingest service, against a bare gRPC echo.

    python -m bench.ingest [--seconds 10] [--calls 8] [--channels 2] [--batch 1000]
                           [--profile stacks.txt] [--quick]

The real ingest service (validation, normalisation, encoding, the de-dup and append script
into the real bus, backpressure, its interceptors) is hosted in this process on a local port
0, with a scratch PostgreSQL database and a Redis namespace of its own, both removed at the
end. A load generator in a separate process, so that its CPU is not counted against the
server, sends ``SendEvents`` calls of ``--batch`` realistic events (product views, page
views, cart updates, identifies, orders, campaign interactions, with properties and context,
from 100,000 users), ``--calls`` at a time over ``--channels`` connections, for
``--seconds`` after a warm-up; every event id is new, so every event is appended.

The baseline is a bare ``grpc.aio`` server in this same process, echoing the same
``SendEventsRequest`` batches (decoded, then encoded back), measured right after with the
same load generator. ``ratio`` is ingest's throughput over the echo's.

Redis is ``AUDIENCE_BENCH_REDIS_URL``, else ``AUDIENCE_TEST_REDIS_URL``, else the local
default; PostgreSQL (a superuser DSN, for the scratch database) is
``AUDIENCE_BENCH_POSTGRES_DSN``, else ``AUDIENCE_TEST_POSTGRES_DSN``, else the local
default. With ``--profile``, py-spy samples the server during the ingest run and the
hottest functions are printed. The last line printed is JSON with ``events_per_s``,
``baseline_events_per_s`` and ``ratio``. Goal: ≥ 200,000 events/s and a ratio ≥ 0.2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
from redis.asyncio import Redis

from audience.config import CommonConfig
from audience.db import dsn_with_database
from audience.server import Host
from audience.service import Resources, migrate, tune_garbage_collection
from audience.telemetry import Telemetry
from audience.v1 import event_pb2, ingest_service_pb2
from bench._suite import parse_options, redis_namespace
from services.ingest.app import DEFINITION as INGEST

GOAL_EVENTS_PER_S = 200_000
GOAL_RATIO = 0.2
METHOD = "/audience.v1.IngestService/SendEvents"
DATASET = "bench"
# Replaced in the encoded template by a tag unique to each call, so each call's event ids
# are new without encoding the batch again; the tag has the placeholder's length.
PLACEHOLDER = b"@@@@@@@@@@@@"
USERS = 100_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def realistic_event(index: int, rng: random.Random, now_ns: int) -> event_pb2.Event:
    """One event of the mix a storefront sends."""
    user = rng.randrange(USERS)
    event = event_pb2.Event(event_id=f"{PLACEHOLDER.decode()}-{index:04d}")
    if rng.random() < 0.7:
        event.user_id = f"user-{user}"
    event.anonymous_id = f"anon-{user * 7 % 1_000_003}"
    roll = rng.random()
    if roll < 0.45:
        event.type = event_pb2.EVENT_TYPE_TRACK
        event.name = rng.choice(["product_view", "search", "add_to_wishlist", "video_play"])
        properties = event.properties
        properties["category"].string_value = rng.choice(["shoes", "hats", "bags", "coats"])
        properties["product_id"].string_value = f"sku-{rng.randrange(5000)}"
        properties["price"].number_value = round(rng.uniform(5, 300), 2)
        properties["in_stock"].bool_value = rng.random() < 0.9
    elif roll < 0.80:
        event.type = event_pb2.EVENT_TYPE_PAGE
        path = rng.choice(["/", "/pricing", "/shoes", "/hats/summer", "/checkout"])
        event.context.page.url = f"https://shop.example.com{path}?utm_source=google"
        event.context.page.path = path
        event.context.page.title = "Shop"
        event.context.page.referrer = "https://www.google.com/"
    elif roll < 0.90:
        event.type = event_pb2.EVENT_TYPE_CART_UPDATED
        event.cart.currency = "USD"
        for item in range(rng.randrange(1, 4)):
            event.cart.items.add(
                product_id=f"sku-{item}",
                name="Runner",
                category="shoes",
                brand="Acme",
                price=round(rng.uniform(5, 150), 2),
                quantity=rng.randrange(1, 3),
            )
    elif roll < 0.95:
        event.type = event_pb2.EVENT_TYPE_IDENTIFY
        event.user_id = f"user-{user}"
        event.identify.traits["plan"].string_value = rng.choice(["free", "pro", "team"])
        event.identify.traits["age"].number_value = rng.randrange(18, 80)
        event.identify.identities.add(type="email", value=f"user{user}@example.com")
    elif roll < 0.98:
        event.type = event_pb2.EVENT_TYPE_ORDER_COMPLETED
        event.user_id = f"user-{user}"
        event.order.order_id = f"order-{index}"
        event.order.currency = "USD"
        event.order.items.add(product_id="sku-1", price=49.5, quantity=1)
    else:
        event.type = event_pb2.EVENT_TYPE_CAMPAIGN_INTERACTION
        event.user_id = f"user-{user}"
        event.campaign_interaction.campaign_id = "spring-sale"
        event.campaign_interaction.channel = event_pb2.CAMPAIGN_CHANNEL_EMAIL
        event.campaign_interaction.action = event_pb2.CAMPAIGN_ACTION_OPENED
    context = event.context
    context.channel = event_pb2.CHANNEL_WEB
    context.utm.source = "google"
    context.utm.medium = "cpc"
    context.utm.campaign = "spring"
    context.device.type = rng.choice([event_pb2.DEVICE_TYPE_MOBILE, event_pb2.DEVICE_TYPE_DESKTOP])
    context.device.os = "iOS"
    context.device.browser = "Safari"
    context.location.country = "US"
    context.location.city = "Austin"
    context.session_id = f"s-{user}"
    context.ip = "203.0.113.7"
    context.user_agent = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"
    context.locale = "en-US"
    sent_ns = now_ns - rng.randrange(1_000_000_000)
    event.sent_at.FromNanoseconds(sent_ns)
    event.timestamp.FromNanoseconds(sent_ns - rng.randrange(60_000_000_000))
    return event


def template(batch: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    now_ns = time.time_ns()
    events = [realistic_event(i, rng, now_ns) for i in range(batch)]
    request = ingest_service_pb2.SendEventsRequest(parent=f"datasets/{DATASET}", events=events)
    return request.SerializeToString()


# The load generator, run as `python -m bench.ingest --client ...`.


async def _client(options: argparse.Namespace) -> dict[str, Any]:
    data = template(options.batch)
    counter = 0
    prefix = uuid.uuid4().hex[:4]
    warm_until = time.monotonic() + options.warmup
    stop_at = warm_until + options.seconds
    events = accepted = sent = 0
    latencies: list[float] = []
    channels = [
        grpc.aio.insecure_channel(
            options.address,
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        for _ in range(options.channels)
    ]
    methods = [
        channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        for channel in channels
    ]

    async def worker(number: int) -> None:
        nonlocal counter, events, accepted, sent
        call = methods[number % len(methods)]
        while True:
            started = time.monotonic()
            if started >= stop_at:
                return
            counter += 1
            tag = f"{prefix}{counter:08x}".encode()
            response: bytes = await call(data.replace(PLACEHOLDER, tag), timeout=120)
            finished = time.monotonic()
            sent += options.batch
            if warm_until <= started and finished <= stop_at:
                events += options.batch
                latencies.append(finished - started)
                if options.mode == "ingest":
                    parsed = ingest_service_pb2.SendEventsResponse.FromString(response)
                    accepted += parsed.accepted_count

    cpu_before = time.process_time()
    await asyncio.gather(*(worker(i) for i in range(options.calls)))
    cpu = time.process_time() - cpu_before
    for channel in channels:
        await channel.close()
    latencies.sort()
    return {
        "events": events,
        "events_sent": sent,
        "accepted": accepted,
        "events_per_s": events / options.seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        "client_cpu_s": round(cpu, 2),
    }


def client_main(options: argparse.Namespace) -> None:
    print(json.dumps(asyncio.run(_client(options))))


# The server side.


@asynccontextmanager
async def scratch_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"audience_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield dsn_with_database(admin_dsn, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def run_client(address: str, mode: str, options: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.ingest", "--client", "--address", address]
    argv += ["--mode", mode, "--seconds", str(options.seconds), "--warmup", str(options.warmup)]
    argv += ["--calls", str(options.calls), "--channels", str(options.channels)]
    argv += ["--batch", str(options.batch)]
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed ({process.returncode})")
    result: dict[str, Any] = json.loads(output.decode().strip().splitlines()[-1])
    return result


async def redis_cpu(client: Redis) -> float:
    info: Any = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def measured(
    address: str, mode: str, options: argparse.Namespace, redis: Redis
) -> dict[str, Any]:
    cpu_before, redis_before = time.process_time(), await redis_cpu(redis)
    result = await run_client(address, mode, options)
    span = options.seconds + options.warmup
    server_cpu = time.process_time() - cpu_before
    redis_cpu_used = await redis_cpu(redis) - redis_before
    result["server_cpu_per_s"] = round(server_cpu / span, 2)
    result["redis_cpu_per_s"] = round(redis_cpu_used / span, 2)
    # Per event over the whole run, warm-up included: steadier than the rate, which
    # follows whatever else the machine is doing.
    sent = max(1, result["events_sent"])
    result["server_us_per_event"] = round(server_cpu * 1e6 / sent, 2)
    result["redis_us_per_event"] = round(redis_cpu_used * 1e6 / sent, 2)
    return result


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def summarise_profile(path: Path, top: int = 20) -> list[str]:
    """The functions py-spy saw most on the server's event loop thread.

    Native frames (protobuf, gRPC, system calls) count towards the Python function that
    called them, and are also listed on their own.
    """
    own: Counter[str] = Counter()
    native: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        if not any("run_forever" in frame for frame in frames):
            continue  # gRPC's and py-spy's own threads
        count = int(count_text)
        total += count
        # "function (file.py:line)" -> "function (file.py)": one entry per function.
        python = [f.rpartition(":")[0] + ")" for f in frames if ".py:" in f]
        own[python[-1]] += count
        if ".py:" not in frames[-1]:
            native[frames[-1].split(" (")[0]] += count
        for frame in set(python):
            inclusive[frame] += count
    if not total:
        return ["py-spy: no samples of the event loop"]
    lines = [f"py-spy: {total} samples of the event loop; own time, native calls included:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("native code:")
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in native.most_common(10)]
    lines.append("with callees:")
    lines += [
        f"  {100 * n / total:5.1f}%  {frame}"
        for frame, n in inclusive.most_common()
        if "services/" in frame or "audience/" in frame or "redis/" in frame
    ][:top]
    return lines


async def run_ingest(options: argparse.Namespace, admin_dsn: str, redis_url: str) -> dict[str, Any]:
    async with scratch_database(admin_dsn) as dsn, redis_namespace(redis_url) as namespace:
        environ = {
            "AUDIENCE_LISTEN": "127.0.0.1:0",
            "AUDIENCE_REDIS_NAMESPACE": namespace,
            "AUDIENCE_BUS_PARTITIONS": str(options.partitions),
            # Nothing consumes the events here: the backlog only grows.
            "AUDIENCE_INGEST_MAX_BACKLOG": str(10**9),
            "AUDIENCE_INGEST_DEDUP_WINDOW": "10m",
            "AUDIENCE_LOG_LEVEL": "warning",
        }
        common = CommonConfig.from_env(environ)
        resources = await Resources.open(
            common,
            environ,
            postgres_dsn=dsn,
            redis_url=redis_url,
            telemetry=Telemetry("bench", "off"),
            pool_size=4,
        )
        try:
            await migrate(resources.postgres, [INGEST])
            host = Host([await INGEST.build(resources)], common)
            port = await host.start()
            # As `serve` does in a deployed process (the echo below shares the setting).
            tune_garbage_collection()
            profiler = None
            try:
                if options.profile:
                    profiler = await asyncio.create_subprocess_exec(
                        _py_spy(),
                        "record",
                        "--pid",
                        str(os.getpid()),
                        "--duration",
                        str(int(options.seconds + options.warmup)),
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "--native",
                        "--output",
                        str(options.profile),
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                result = await measured(f"127.0.0.1:{port}", "ingest", options, resources.redis)
            finally:
                await host.stop(timedelta(seconds=1))
                if profiler is not None:
                    await asyncio.wait_for(profiler.wait(), 30)
            result["entries"] = sum(
                [
                    await resources.redis.xlen(resources.bus.stream_key("events", p))
                    for p in range(options.partitions)
                ]
            )
        finally:
            await resources.close()
    return result


async def run_echo(options: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    async def echo(
        request: ingest_service_pb2.SendEventsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_service_pb2.SendEventsRequest:
        return request

    common = CommonConfig.from_env({})
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", common.max_message_bytes),
            ("grpc.max_send_message_length", common.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    handler = grpc.unary_unary_rpc_method_handler(
        echo,
        request_deserializer=ingest_service_pb2.SendEventsRequest.FromString,
        response_serializer=ingest_service_pb2.SendEventsRequest.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "audience.v1.IngestService", {"SendEvents": handler}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    redis = Redis.from_url(redis_url)
    try:
        return await measured(f"127.0.0.1:{port}", "echo", options, redis)
    finally:
        await server.stop(0)
        await redis.aclose()


async def run(options: argparse.Namespace) -> dict[str, Any]:
    environ = os.environ
    redis_url = (
        environ.get("AUDIENCE_BENCH_REDIS_URL")
        or environ.get("AUDIENCE_TEST_REDIS_URL")
        or "redis://127.0.0.1:6379/0"
    )
    admin_dsn = (
        environ.get("AUDIENCE_BENCH_POSTGRES_DSN")
        or environ.get("AUDIENCE_TEST_POSTGRES_DSN")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    log(
        f"ingest: {options.calls} calls of {options.batch} events in flight over "
        f"{options.channels} channels, {options.seconds:g} s after {options.warmup:g} s warm-up"
    )
    ingest = await run_ingest(options, admin_dsn, redis_url)
    log(f"ingest: {json.dumps(ingest)}")
    echo = await run_echo(options, redis_url)
    log(f"echo:   {json.dumps(echo)}")
    if ingest["accepted"] != ingest["events"]:
        raise RuntimeError(f"only {ingest['accepted']} of {ingest['events']} events accepted")
    ratio = ingest["events_per_s"] / echo["events_per_s"]
    return {
        "events_per_s": round(ingest["events_per_s"]),
        "baseline_events_per_s": round(echo["events_per_s"]),
        "ratio": round(ratio, 3),
        "goal_events_per_s": GOAL_EVENTS_PER_S,
        "goal_ratio": GOAL_RATIO,
        "p50_ms": round(ingest["p50_ms"], 1),
        "p99_ms": round(ingest["p99_ms"], 1),
        "server_cpu_per_s": ingest["server_cpu_per_s"],
        "server_us_per_event": ingest["server_us_per_event"],
        "baseline_server_us_per_event": echo["server_us_per_event"],
        "redis_cpu_per_s": ingest["redis_cpu_per_s"],
        "redis_us_per_event": ingest["redis_us_per_event"],
        "client_cpu_s": ingest["client_cpu_s"],
        "bus_entries": ingest["entries"],
        "batch": options.batch,
        "calls": options.calls,
        "partitions": options.partitions,
    }


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured time first")
    parser.add_argument("--calls", type=int, default=8, help="calls in flight")
    parser.add_argument("--channels", type=int, default=2, help="client connections")
    parser.add_argument("--batch", type=int, default=1000, help="events per call")
    parser.add_argument("--partitions", type=int, default=8, help="bus partitions")
    parser.add_argument("--profile", type=Path, help="py-spy the server into this file")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("ingest", "echo"), help=argparse.SUPPRESS)
    return parse_options(parser, {"seconds": 3.0, "warmup": 1.0}, argv)


def main() -> None:
    options = parse()
    if options.client:
        client_main(options)
        return
    result = asyncio.run(run(options))
    if options.profile:
        # Sampling pauses the server (native stacks need it): figures of a profiled run
        # are lower than those of a plain one.
        if options.profile.exists():
            for line in summarise_profile(options.profile):
                log(line)
        else:
            log(f"py-spy wrote no {options.profile}; is it allowed to trace this process?")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
