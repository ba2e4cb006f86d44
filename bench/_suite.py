"""What the segment engine's benchmarks share: servers, a scratch database, services run as
processes (``python -m services.<name>``, as deployed), a bare echo server, and load
generators in their own processes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from audience.auth import SCOPES, generate_api_key, hash_api_key
from audience.channels import api_key_interceptors
from audience.db import dsn_with_database
from audience.embedded import EmbeddedPostgres, EmbeddedRedis

__all__ = [
    "ECHO_METHOD",
    "BenchKeys",
    "bench_keys",
    "client_channel",
    "closed_loop",
    "free_port",
    "latency_summary",
    "log",
    "parse_options",
    "redis_namespace",
    "run_clients",
    "scratch_database",
    "serve_echo",
    "servers",
    "service",
    "wait_serving",
]

ECHO_METHOD = "/bench.Echo/Echo"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_options(
    parser: argparse.ArgumentParser,
    quick: Mapping[str, Any],
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """Parses ``argv`` with a ``--quick`` option added, which replaces the defaults named in
    ``quick`` (by destination) so the bench takes seconds rather than minutes (``python -m
    bench --quick``); options given on the command line still win over these."""
    shrunk = ", ".join(f"--{dest.replace('_', '-')} {value}" for dest, value in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"a short run: {shrunk}")
    options = parser.parse_args(argv)
    unknown = sorted(dest for dest in quick if not hasattr(options, dest))
    if unknown:
        raise ValueError(f"--quick names options {parser.prog} does not have: {unknown}")
    if options.quick:
        parser.set_defaults(**quick)
        options = parser.parse_args(argv)
    return options


@dataclass(frozen=True)
class BenchKeys:
    """API keys made for one run, so that the services run with authentication on, as
    deployed: ``environ`` goes to each service, ``client`` to the load."""

    client: str = field(repr=False)
    """Every dataset, every scope."""
    environ: Mapping[str, str] = field(repr=False)
    """``AUDIENCE_API_KEYS`` (the client's and the internal key's hashes) and
    ``AUDIENCE_INTERNAL_API_KEY``."""


def bench_keys() -> BenchKeys:
    client, internal = generate_api_key(), generate_api_key()
    entries = [
        {"name": "bench", "sha256": hash_api_key(client), "datasets": ["*"], "scopes": SCOPES},
        {
            "name": "internal",
            "sha256": hash_api_key(internal),
            "datasets": ["*"],
            "scopes": ["read", "write"],
        },
    ]
    return BenchKeys(
        client,
        {"AUDIENCE_API_KEYS": json.dumps(entries), "AUDIENCE_INTERNAL_API_KEY": internal},
    )


def client_channel(
    address: str, api_key: str | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A plaintext channel that sends ``api_key`` on every call (none when ``None``)."""
    interceptors = api_key_interceptors(api_key) if api_key is not None else None
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


@contextlib.asynccontextmanager
async def servers(directory: Path) -> AsyncIterator[tuple[str, str]]:
    """A superuser PostgreSQL DSN and a Redis URL: ``AUDIENCE_POSTGRES_DSN`` and
    ``AUDIENCE_REDIS_URL``, or embedded servers in ``directory``."""
    async with contextlib.AsyncExitStack() as stack:
        dsn = os.environ.get("AUDIENCE_POSTGRES_DSN")
        url = os.environ.get("AUDIENCE_REDIS_URL")
        if not dsn:
            postgres = EmbeddedPostgres(directory / "postgres")
            dsn = await asyncio.to_thread(postgres.start)
            stack.push_async_callback(asyncio.to_thread, postgres.stop)
        if not url:
            redis = EmbeddedRedis(directory / "redis")
            url = await asyncio.to_thread(redis.start)
            stack.push_async_callback(asyncio.to_thread, redis.stop)
        yield dsn, url


@contextlib.asynccontextmanager
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


@contextlib.asynccontextmanager
async def redis_namespace(redis_url: str) -> AsyncIterator[str]:
    """A key namespace of its own on ``redis_url``, its keys deleted when the block ends
    (a shared Redis outlives every run)."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        yield namespace
    finally:
        redis = Redis.from_url(redis_url)
        try:
            batch: list[Any] = []
            async for key in redis.scan_iter(match=f"{namespace}:*", count=10_000):
                batch.append(key)
                if len(batch) >= 10_000:
                    await redis.unlink(*batch)
                    batch = []
            if batch:
                await redis.unlink(*batch)
        finally:
            await redis.aclose()


@contextlib.asynccontextmanager
async def service(
    command: Sequence[str], environ: Mapping[str, str], logs: Path, label: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Runs ``python COMMAND…`` until the block ends (SIGTERM, then SIGKILL)."""
    output = (logs / f"{label}.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, *command, env=dict(environ), stdout=output, stderr=output
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        output.close()


async def wait_serving(address: str, name: str, process: asyncio.subprocess.Process) -> None:
    # Health needs no key: probes carry none.
    async with client_channel(address, None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see its log")
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{name} did not start serving")


async def serve_echo(address: str) -> None:
    """A bare ``grpc.aio`` server answering ``ECHO_METHOD`` with its request's bytes."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo)},
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


async def closed_loop(
    call: Callable[[], Awaitable[Any]], *, concurrency: int, seconds: float, warmup: float
) -> tuple[int, list[float]]:
    """Keeps ``concurrency`` calls in flight; returns calls completed and their latencies
    (seconds) after the warm-up."""
    stop_at = time.perf_counter() + warmup + seconds
    measure_from = time.perf_counter() + warmup
    latencies: list[float] = []

    async def worker() -> None:
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            await call()
            if started >= measure_from:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), latencies


async def run_clients(
    module: str, arguments: Sequence[str], processes: int, *, api_key: str | None = None
) -> list[dict[str, Any]]:
    """Runs ``python -m MODULE --client ARGUMENTS`` in ``processes`` processes at once; each
    prints one JSON object as its last line. ``api_key`` reaches them as
    ``AUDIENCE_API_KEY`` (not as an argument, which any user of the machine can read)."""
    environ = dict(os.environ)
    if api_key is not None:
        environ["AUDIENCE_API_KEY"] = api_key
    started = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "--client",
            *arguments,
            env=environ,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    results = []
    for process in started:
        output, _ = await process.communicate()
        if process.returncode:
            raise RuntimeError(f"a client of {module} failed with {process.returncode}")
        results.append(json.loads(output.decode().strip().splitlines()[-1]))
    return results


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }
