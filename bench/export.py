"""Benchmark: a segment's CSV through ``ExportService.ExportSegmentCsv`` against a raw
``COPY ... TO STDOUT (FORMAT csv)`` of the same rows, in the same run.

    python -m bench.export [--members 1000000] [--profile-dir DIR] [--quick]

The segment engine, the profile service and the export service run as separate processes
(``python -m services.<name>``), as they are deployed. The segment is an imported one,
filled through ``SegmentService.ImportSegmentMembers``. The download is written to a file
by a client in this process; the baseline copies the engine's membership rows (profile id,
segment id, join time) with asyncpg's ``copy_from_query`` to a file.

PostgreSQL and Redis are ``AUDIENCE_POSTGRES_DSN`` / ``AUDIENCE_REDIS_URL`` (a superuser
DSN: a scratch database is made and dropped), or embedded servers when unset. With
``--profile-dir`` and py-spy installed, the engine and the export service are sampled while
the download runs (flame graphs in that folder).

The last line printed is JSON: ``rows``, ``seconds``, ``rows_per_s``, ``baseline_seconds``,
``baseline_rows_per_s``, ``ratio``, and ``cpu_seconds``: the CPU time the engine, the
export service and the client used during the download, which shows where it went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import grpc.aio
import psutil

from audience.v1 import (
    export_service_pb2,
    export_service_pb2_grpc,
    membership_service_pb2,
    membership_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from bench._suite import (
    BenchKeys,
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

GOAL_ROWS_PER_S = 1_000_000
GOAL_RATIO = 0.25
IMPORT_CHUNK = 100_000
SERVICES = ("profile", "segment_engine", "export")


def _ids(count: int) -> Iterator[list[str]]:
    for start in range(0, count, IMPORT_CHUNK):
        yield [f"user-{i:08d}" for i in range(start, min(count, start + IMPORT_CHUNK))]


async def _fill(channel: grpc.aio.Channel, dataset: str, count: int) -> str:
    segments = segment_service_pb2_grpc.SegmentServiceStub(channel)
    created = await segments.CreateSegment(
        segment_service_pb2.CreateSegmentRequest(
            parent=f"datasets/{dataset}",
            segment_id="bench",
            segment=segment_pb2.Segment(
                display_name="Benchmark",
                kind=segment_pb2.SEGMENT_KIND_USER,
                source=segment_pb2.SEGMENT_SOURCE_IMPORTED,
            ),
        )
    )
    name: str = created.segment.name
    # One import per chunk: a single import of a million ids is one long transaction.
    joined = 0
    for ids in _ids(count):
        request = segment_service_pb2.ImportSegmentMembersRequest(
            segment=name,
            mode=segment_service_pb2.IMPORT_MODE_ADD,
            ids=segment_service_pb2.ImportedIds(ids=ids),
        )
        response = await segments.ImportSegmentMembers(iter([request]), timeout=600)
        joined += response.joined_count
        if joined % (count // 10 or 1) < len(ids):
            log(f"  {joined:,} imported")
    if joined != count:
        raise RuntimeError(f"imported {joined} members, expected {count}")
    members = membership_service_pb2_grpc.MembershipServiceStub(channel)
    counted = await members.CountSegmentMembers(
        membership_service_pb2.CountSegmentMembersRequest(segment=name)
    )
    if counted.count != count:
        raise RuntimeError(f"the segment has {counted.count} members, expected {count}")
    return name


async def _download(channel: grpc.aio.Channel, segment: str, path: Path) -> tuple[int, float]:
    api = export_service_pb2_grpc.ExportServiceStub(channel)
    rows = 0
    started = time.perf_counter()
    with path.open("wb") as file:
        async for chunk in api.ExportSegmentCsv(
            export_service_pb2.ExportSegmentCsvRequest(segments=[segment]), timeout=3600
        ):
            file.write(chunk.data)
            rows = chunk.rows_sent
    return rows, time.perf_counter() - started


async def _copy(dsn: str, dataset: str, path: Path) -> tuple[int, float]:
    connection = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        status = await connection.copy_from_query(
            "SELECT subject_id, segment_id, join_time FROM segment_engine.memberships"
            " WHERE dataset = $1 AND segment_id = 'bench' ORDER BY subject_id",
            dataset,
            output=str(path),
            format="csv",
        )
        elapsed = time.perf_counter() - started
    finally:
        await connection.close()
    return int(status.split()[-1]), elapsed


def _show_logs(directory: Path) -> None:
    for name in SERVICES:
        lines = (directory / f"{name}.log").read_text(errors="replace").splitlines()
        log(f"--- last lines of {name}'s log ---")
        log("\n".join(lines[-80:]))


@contextlib.asynccontextmanager
async def _sampling(profile_dir: Path | None, pids: Mapping[str, int]) -> AsyncIterator[None]:
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if profile_dir is None or spy is None:
        if profile_dir is not None:
            log("py-spy is not installed: no profiles")
        yield
        return
    samplers = [
        await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "1000",
            "--format",
            "speedscope",
            "--output",
            str(profile_dir / f"{name}.speedscope.json"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    try:
        yield
    finally:
        for sampler in samplers:
            sampler.send_signal(2)
        for sampler in samplers:
            await sampler.wait()


async def _measure(
    addresses: Mapping[str, str],
    processes: Mapping[str, asyncio.subprocess.Process],
    dsn: str,
    members: int,
    profile_dir: Path | None,
    directory: Path,
    api_key: str,
) -> tuple[int, float, int, float, dict[str, float]]:
    for name in SERVICES:
        await wait_serving(addresses[name], name, processes[name])
    dataset = f"bench{uuid.uuid4().hex[:8]}"
    async with client_channel(addresses["segment_engine"], api_key) as engine:
        log(f"Importing {members:,} members ...")
        started = time.perf_counter()
        segment = await _fill(engine, dataset, members)
        log(f"  imported in {time.perf_counter() - started:.1f}s")
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with client_channel(addresses["export"], api_key, options) as export:
        log("Downloading through ExportSegmentCsv ...")
        pids = {name: processes[name].pid for name in ("segment_engine", "export")}
        watched = {name: psutil.Process(pid) for name, pid in pids.items()}
        before = {name: _cpu(process) for name, process in watched.items()}
        client_before = time.process_time()
        async with _sampling(profile_dir, pids):
            rows, seconds = await _download(export, segment, directory / "export.csv")
        cpu = {name: round(_cpu(process) - before[name], 2) for name, process in watched.items()}
        cpu["client"] = round(time.process_time() - client_before, 2)
    log(f"  {rows:,} rows in {seconds:.2f}s; CPU seconds meanwhile: {cpu}")
    log("Copying the same rows with COPY ... TO STDOUT (FORMAT csv) ...")
    baseline_rows, baseline_seconds = await _copy(dsn, dataset, directory / "copy.csv")
    log(f"  {baseline_rows:,} rows in {baseline_seconds:.2f}s")
    with (directory / "export.csv").open("rb") as file:
        lines = sum(1 for _ in file)
    if rows != members or lines != members + 1 or baseline_rows != members:
        raise RuntimeError(
            f"row counts disagree: {rows} streamed, {lines - 1} in the file, "
            f"{baseline_rows} copied, {members} imported"
        )
    return rows, seconds, baseline_rows, baseline_seconds, cpu


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def run(members: int, profile_dir: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="audience-bench-export-") as scratch:
        directory = Path(scratch)
        async with (
            servers(directory) as (admin_dsn, redis_url),
            scratch_database(admin_dsn) as dsn,
            redis_namespace(redis_url) as namespace,
            contextlib.AsyncExitStack() as stack,
        ):
            addresses = {name: f"127.0.0.1:{free_port()}" for name in SERVICES}
            keys: BenchKeys = bench_keys()
            environ = {
                **os.environ,
                "AUDIENCE_POSTGRES_DSN": dsn,
                "AUDIENCE_REDIS_URL": redis_url,
                "AUDIENCE_REDIS_NAMESPACE": namespace,
                "AUDIENCE_PROFILE_ADDRESS": addresses["profile"],
                "AUDIENCE_SEGMENT_ENGINE_ADDRESS": addresses["segment_engine"],
                "AUDIENCE_EXPORT_ADDRESS": addresses["export"],
                "AUDIENCE_LOG_LEVEL": "warning",
                # Authentication on, as deployed: the export service reads the members from
                # the engine with the internal key.
                **keys.environ,
            }
            processes = {}
            for name in SERVICES:
                processes[name] = await stack.enter_async_context(
                    service(
                        ("-m", f"services.{name}"),
                        {**environ, "AUDIENCE_LISTEN": addresses[name]},
                        directory,
                        name,
                    )
                )
            try:
                rows, seconds, baseline_rows, baseline_seconds, cpu = await _measure(
                    addresses, processes, dsn, members, profile_dir, directory, keys.client
                )
            except BaseException:
                _show_logs(directory)
                raise
    rows_per_s = rows / seconds
    baseline_rows_per_s = baseline_rows / baseline_seconds
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_per_s),
        "baseline_seconds": round(baseline_seconds, 3),
        "baseline_rows_per_s": round(baseline_rows_per_s),
        "ratio": round(rows_per_s / baseline_rows_per_s, 3),
        "cpu_seconds": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--profile-dir", type=Path, default=None)
    args = parse_options(parser, {"members": 100_000})
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args.members, args.profile_dir))
    speed = "met" if result["rows_per_s"] >= GOAL_ROWS_PER_S else "missed"
    ratio = "met" if result["ratio"] >= GOAL_RATIO else "missed"
    log(f"Goal: {GOAL_ROWS_PER_S:,} rows/s ({speed}), ratio {GOAL_RATIO} ({ratio})")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
