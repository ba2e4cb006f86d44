"""Benchmark: a new segment backfilled over a million existing profiles.

    python -m bench.backfill [--profiles 1000000] [--match 0.3] [--quick]

The profile service and the segment engine run as their own processes (``python -m
services.<name>``). Before the run, ``--profiles`` profiles are written straight into both
services' tables, as if they had come through the pipeline: the profile service's
evaluation rows (an attribute ``score`` from 0 to 99) and the engine's copy of each view.
Then ``attributes.score >= T`` (matching ``--match`` of them) is created through
``SegmentService.CreateSegment`` and timed until the segment is active; its member count
is checked. For reference, the same run times the profile service's rule query alone
(``QueryProfiles``, ids streamed to the client).

PostgreSQL and Redis are ``AUDIENCE_POSTGRES_DSN`` / ``AUDIENCE_REDIS_URL`` (a superuser
DSN: a scratch database is made and dropped), or embedded servers when unset.

The last line printed is JSON: ``profiles``, ``seconds`` (create to active), ``members``,
``query_seconds`` and ``profiles_per_s``. Goal: 1,000,000 profiles in ≤ 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc.aio

from audience import rules
from audience.bus.v1 import profile_change_pb2
from audience.v1 import (
    profile_service_pb2,
    profile_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from bench._suite import (
    bench_keys,
    client_channel,
    free_port,
    log,
    parse_options,
    redis_namespace,
    scratch_database,
    servers,
    service,
    wait_serving,
)

GOAL_SECONDS = 10.0
DATASET = "bench"
_COPY_CHUNK = 50_000


def _score(n: int) -> float:
    return float(n * 7919 % 100)


def _chunks(profiles: int) -> Iterator[range]:
    for start in range(0, profiles, _COPY_CHUNK):
        yield range(start, min(profiles, start + _COPY_CHUNK))


async def _seed(dsn: str, profiles: int) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            """
            INSERT INTO profile.profiles (dataset, kind, profile_id, attributes)
            SELECT $1, 'user', 'p' || lpad(n::text, 7, '0'),
                   jsonb_build_object('score', (n::bigint * 7919 % 100)::float8)
            FROM generate_series(0, $2 - 1) AS n
            """,
            DATASET,
            profiles,
        )
        for numbers in _chunks(profiles):
            records = []
            for n in numbers:
                view = profile_change_pb2.EvaluationView()
                view.attributes["score"].number_value = _score(n)
                records.append((DATASET, 1, f"p{n:07d}", 1, view.SerializeToString()))
            await connection.copy_records_to_table(
                "subjects",
                schema_name="segment_engine",
                columns=["dataset", "kind", "subject_id", "sequence", "view"],
                records=records,
            )
        await connection.execute(
            "UPDATE segment_engine.subjects SET view_time = now() - interval '1 hour'"
            " WHERE dataset = $1",
            DATASET,
        )
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


async def _query(channel: grpc.aio.Channel, rule: Any) -> tuple[int, float]:
    stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
    started = time.perf_counter()
    count = 0
    async for response in stub.QueryProfiles(
        profile_service_pb2.QueryProfilesRequest(
            parent=f"datasets/{DATASET}",
            kind=segment_pb2.SEGMENT_KIND_USER,
            rule=rule,
            chunk_size=10_000,
        ),
        timeout=600,
    ):
        count += len(response.profile_ids)
    return count, time.perf_counter() - started


async def _backfill(channel: grpc.aio.Channel, text: str) -> tuple[segment_pb2.Segment, float]:
    stub = segment_service_pb2_grpc.SegmentServiceStub(channel)
    started = time.perf_counter()
    created = await stub.CreateSegment(
        segment_service_pb2.CreateSegmentRequest(
            parent=f"datasets/{DATASET}",
            segment_id="high-scores",
            segment=segment_pb2.Segment(
                kind=segment_pb2.SEGMENT_KIND_USER,
                source=segment_pb2.SEGMENT_SOURCE_RULE,
                rule_text=text,
            ),
        ),
        timeout=60,
    )
    name = created.segment.name
    last = -1.0
    while True:
        segment: segment_pb2.Segment = (
            await stub.GetSegment(segment_service_pb2.GetSegmentRequest(name=name), timeout=30)
        ).segment
        if segment.backfill.percent >= last + 10:
            last = segment.backfill.percent
            log(f"  {segment.backfill.percent:5.1f}% after {time.perf_counter() - started:.1f} s")
        if segment.state != segment_pb2.SEGMENT_STATE_BACKFILLING:
            return segment, time.perf_counter() - started
        await asyncio.sleep(0.05)


async def _run(options: argparse.Namespace) -> dict[str, Any]:
    threshold = round(100 * (1 - options.match))
    text = f"attributes.score >= {threshold}"
    expected = sum(1 for n in range(options.profiles) if _score(n) >= threshold)
    with tempfile.TemporaryDirectory(prefix="audience-bench-") as folder:
        directory = Path(folder)
        async with (
            servers(directory) as (admin_dsn, redis_url),
            scratch_database(admin_dsn) as dsn,
            redis_namespace(redis_url) as namespace,
        ):
            address = f"127.0.0.1:{free_port()}"
            profile_address = f"127.0.0.1:{free_port()}"
            keys = bench_keys()
            environ = {
                "PATH": "/usr/bin:/bin",
                "AUDIENCE_POSTGRES_DSN": dsn,
                "AUDIENCE_REDIS_URL": redis_url,
                "AUDIENCE_REDIS_NAMESPACE": namespace,
                "AUDIENCE_PROFILE_ADDRESS": profile_address,
                "AUDIENCE_LOG_LEVEL": "warning",
                "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "50ms",
                # Authentication on, as deployed: the engine queries the profile service with
                # the internal key.
                **keys.environ,
            }
            async with (
                service(
                    ["-m", "services.profile"],
                    {**environ, "AUDIENCE_LISTEN": profile_address},
                    directory,
                    "profile",
                ) as profile,
                service(
                    ["-m", "services.segment_engine"],
                    {**environ, "AUDIENCE_LISTEN": address},
                    directory,
                    "segment_engine",
                ) as engine,
            ):
                await wait_serving(profile_address, "profile", profile)
                await wait_serving(address, "segment engine", engine)
                started = time.perf_counter()
                await _seed(dsn, options.profiles)
                log(
                    f"seeded {options.profiles:,} profiles in {time.perf_counter() - started:.1f} s"
                )
                async with client_channel(
                    profile_address,
                    keys.client,
                    [("grpc.max_receive_message_length", 64 * 1024 * 1024)],
                ) as channel:
                    matched, query_seconds = await _query(channel, rules.parse_rule(text))
                log(f"QueryProfiles alone: {matched:,} ids in {query_seconds:.2f} s")
                async with client_channel(address, keys.client) as channel:
                    segment, seconds = await _backfill(channel, text)
                for line in (directory / "segment_engine.log").read_text().splitlines()[-20:]:
                    log(line)
    if segment.state != segment_pb2.SEGMENT_STATE_ACTIVE:
        raise RuntimeError(f"the backfill failed: {segment.backfill.error}")
    if segment.member_count != expected:
        raise RuntimeError(f"{segment.member_count} members, expected {expected}")
    return {
        "profiles": options.profiles,
        "seconds": round(seconds, 2),
        "members": segment.member_count,
        "profiles_per_s": round(options.profiles / seconds),
        "query_seconds": round(query_seconds, 2),
        "goal_seconds": GOAL_SECONDS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__)
    parser.add_argument("--profiles", type=int, default=1_000_000)
    parser.add_argument(
        "--match", type=float, default=0.3, help="The share of profiles that match."
    )
    options = parse_options(parser, {"profiles": 100_000})
    print(json.dumps(asyncio.run(_run(options))))


if __name__ == "__main__":
    main()
