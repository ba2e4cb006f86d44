"""Benchmark: ``MembershipService.ListMemberships`` (a profile's segments, the hot read)
against a bare ``grpc.aio`` unary echo, in the same run.

    python -m bench.memberships [--profiles 10000] [--seconds 10] [--clients 2] [--quick]

The segment engine runs as its own process (``python -m services.segment_engine``), with
authentication on (keys made for the run); the echo server too. Load comes from
``--clients`` processes, each keeping ``--concurrency`` calls in flight on one channel, and
the API key on each, for ``--seconds`` after a warm-up; the profile asked for is
random among ``--profiles`` (each in 0–10 of 100 segments, written to the engine's tables
before the run). Throughput is measured saturated; latency with one client keeping
``--latency-concurrency`` calls in flight.

PostgreSQL and Redis are ``AUDIENCE_POSTGRES_DSN`` / ``AUDIENCE_REDIS_URL`` (a superuser
DSN: a scratch database is made and dropped), or embedded servers when unset.

The last line printed is JSON: ``rps``, ``p50_ms``, ``p99_ms`` (light load), ``baseline_rps``
and ``ratio`` (``rps / baseline_rps``), with the saturated latencies and the settings.
Goals: ratio ≥ 0.7, p99 ≤ 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from audience.v1 import membership_service_pb2
from bench._suite import (
    ECHO_METHOD,
    bench_keys,
    client_channel,
    closed_loop,
    free_port,
    latency_summary,
    log,
    parse_options,
    redis_namespace,
    run_clients,
    scratch_database,
    serve_echo,
    servers,
    service,
    wait_serving,
)

GOAL_RATIO = 0.7
GOAL_P99_MS = 2.0
SEGMENTS = 100


async def _seed(dsn: str, dataset: str, profiles: int) -> int:
    rng = random.Random(1)
    joined = datetime.now(UTC)
    rows = []
    for n in range(profiles):
        for segment in rng.sample(range(SEGMENTS), rng.randint(0, 10)):
            rows.append((dataset, f"segment-{segment:03d}", f"profile-{n:07d}", 1, 1, joined))
    connection = await asyncpg.connect(dsn)
    try:
        await connection.copy_records_to_table(
            "memberships",
            schema_name="segment_engine",
            columns=["dataset", "segment_id", "subject_id", "kind", "version", "join_time"],
            records=rows,
        )
        await connection.execute("ANALYZE segment_engine.memberships")
    finally:
        await connection.close()
    return len(rows)


def _request(dataset: str, profiles: int, rng: random.Random) -> bytes:
    profile = f"profile-{rng.randrange(profiles):07d}"
    return membership_service_pb2.ListMembershipsRequest(
        parent=f"datasets/{dataset}/profiles/{profile}"
    ).SerializeToString()


async def _warm(address: str, dataset: str, profiles: int, api_key: str) -> None:
    """Reads every profile once, as a live service's traffic would have."""
    async with client_channel(address, api_key) as channel:
        method = channel.unary_unary("/audience.v1.MembershipService/ListMemberships")
        for start in range(0, profiles, 200):
            await asyncio.gather(
                *(
                    method(
                        membership_service_pb2.ListMembershipsRequest(
                            parent=f"datasets/{dataset}/profiles/profile-{n:07d}"
                        ).SerializeToString(),
                        timeout=30,
                    )
                    for n in range(start, min(profiles, start + 200))
                )
            )


async def _client(options: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random()
    # The key as call metadata rather than through the client interceptors of
    # `audience.channels`, which cost the load generator more CPU than the call itself; sent
    # to the echo too (which ignores it), so the client does the same work for each target.
    metadata = (("authorization", f"Bearer {os.environ['AUDIENCE_API_KEY']}"),)
    async with client_channel(options.address, None) as channel:
        if options.target == "echo":
            method = channel.unary_unary(ECHO_METHOD)
        else:
            # Bytes in and out for both targets: the client does the same work for each.
            method = channel.unary_unary("/audience.v1.MembershipService/ListMemberships")

        async def call() -> Any:
            request = _request(options.dataset, options.profiles, rng)
            return await method(request, metadata=metadata, timeout=10)

        count, latencies = await closed_loop(
            call,
            concurrency=options.concurrency,
            seconds=options.seconds,
            warmup=options.warmup,
        )
    return {"calls": count, "rps": count / options.seconds, **latency_summary(latencies)}


async def _load(
    address: str,
    target: str,
    dataset: str,
    options: argparse.Namespace,
    clients: int,
    concurrency: int,
    api_key: str,
) -> dict[str, Any]:
    results = await run_clients(
        "bench.memberships",
        [
            "--address",
            address,
            "--target",
            target,
            "--dataset",
            dataset,
            "--profiles",
            str(options.profiles),
            "--seconds",
            str(options.seconds),
            "--warmup",
            str(options.warmup),
            "--concurrency",
            str(concurrency),
        ],
        clients,
        api_key=api_key,
    )
    return {
        "rps": sum(r["rps"] for r in results),
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
    }


async def _run(options: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="audience-bench-") as folder:
        directory = Path(folder)
        async with (
            servers(directory) as (admin_dsn, redis_url),
            scratch_database(admin_dsn) as dsn,
            redis_namespace(redis_url) as namespace,
        ):
            engine_address = f"127.0.0.1:{free_port()}"
            echo_address = f"127.0.0.1:{free_port()}"
            keys = bench_keys()
            environ = {
                "PATH": "/usr/bin:/bin",
                "AUDIENCE_POSTGRES_DSN": dsn,
                "AUDIENCE_REDIS_URL": redis_url,
                "AUDIENCE_REDIS_NAMESPACE": namespace,
                "AUDIENCE_LISTEN": engine_address,
                "AUDIENCE_LOG_LEVEL": "warning",
                # Authentication on, as deployed: every call pays for its key's check.
                **keys.environ,
            }
            dataset = "bench"
            async with (
                service(["-m", "services.segment_engine"], environ, directory, "engine") as engine,
                service(
                    ["-m", "bench.memberships", "--echo", echo_address], environ, directory, "echo"
                ) as echo,
            ):
                await wait_serving(engine_address, "segment engine", engine)
                await asyncio.sleep(0.5)
                rows = await _seed(dsn, dataset, options.profiles)
                log(f"{options.profiles:,} profiles, {rows:,} memberships")
                await _warm(engine_address, dataset, options.profiles, keys.client)
                saturated = await _load(
                    engine_address,
                    "memberships",
                    dataset,
                    options,
                    options.clients,
                    options.concurrency,
                    keys.client,
                )
                log(f"ListMemberships saturated: {saturated}")
                assert echo.returncode is None
                baseline = await _load(
                    echo_address,
                    "echo",
                    dataset,
                    options,
                    options.clients,
                    options.concurrency,
                    keys.client,
                )
                log(f"echo saturated: {baseline}")
                light = await _load(
                    engine_address,
                    "memberships",
                    dataset,
                    options,
                    1,
                    options.latency_concurrency,
                    keys.client,
                )
                log(f"ListMemberships light load: {light}")
                light_echo = await _load(
                    echo_address,
                    "echo",
                    dataset,
                    options,
                    1,
                    options.latency_concurrency,
                    keys.client,
                )
                log(f"echo light load: {light_echo}")
    ratio = saturated["rps"] / baseline["rps"] if baseline["rps"] else 0.0
    return {
        "rps": round(saturated["rps"]),
        "p50_ms": light["p50_ms"],
        "p99_ms": light["p99_ms"],
        "baseline_rps": round(baseline["rps"]),
        "ratio": round(ratio, 3),
        "saturated_p50_ms": saturated["p50_ms"],
        "saturated_p99_ms": saturated["p99_ms"],
        "baseline_p99_ms": light_echo["p99_ms"],
        "light_rps": round(light["rps"]),
        "profiles": options.profiles,
        "clients": options.clients,
        "concurrency": options.concurrency,
        "latency_concurrency": options.latency_concurrency,
        "goal_ratio": GOAL_RATIO,
        "goal_p99_ms": GOAL_P99_MS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memberships", description=__doc__)
    parser.add_argument("--profiles", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-concurrency", type=int, default=2)
    parser.add_argument("--echo", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    options = parse_options(parser, {"profiles": 2_000, "seconds": 3.0, "warmup": 1.0})
    if options.echo:
        asyncio.run(serve_echo(options.echo))
    elif options.client:
        print(json.dumps(asyncio.run(_client(options))))
    else:
        print(json.dumps(asyncio.run(_run(options))))


if __name__ == "__main__":
    main()
