"""`audience up`: the whole suite on the embedded default, answering on one address."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import grpc
import grpc.aio
import psutil
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from audience import errors
from audience.cli.main import cli
from audience.v1 import segment_service_pb2, segment_service_pb2_grpc
from services.registry import SERVICES
from tests.e2e.conftest import RunningSuite, StartSuite, _free_port

GRPC_SERVICES = (
    "audience.v1.IngestService",
    "audience.v1.ProfileService",
    "audience.v1.SegmentService",
    "audience.v1.MembershipService",
    "audience.v1.ExportService",
)


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    status: int = response.status
    return status


async def _reflected_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request]), timeout=5):
        return {service.name for service in response.list_services_response.service}
    return set()


async def test_every_service_serves_health_and_reflection_in_one_host(
    start_suite: StartSuite,
) -> None:
    suite: RunningSuite
    async with start_suite(SERVICES) as suite:
        for service in ("", *GRPC_SERVICES):
            assert await _health(suite.channel, service) == health_pb2.HealthCheckResponse.SERVING
        assert set(GRPC_SERVICES) <= await _reflected_services(suite.channel)


async def _wait_until_serving(address: str, process: asyncio.subprocess.Process) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        for _ in range(300):
            assert process.returncode is None, "audience up exited early"
            try:
                if await _health(channel, "") == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"audience up did not serve on {address}")


def _embedded_environment(address: str, data: Path, **extra: str) -> dict[str, str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in {"AUDIENCE_POSTGRES_DSN", "AUDIENCE_REDIS_URL"}
        and not key.startswith(("AUDIENCE_API_KEY", "AUDIENCE_AUTH", "AUDIENCE_TLS"))
    }
    return environ | {"AUDIENCE_LISTEN": address, "AUDIENCE_DATA_DIR": str(data), **extra}


async def _audience_up(environ: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from audience.cli import main; main()",
        "up",
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_audience_up_starts_the_embedded_suite_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    process = await _audience_up(_embedded_environment(address, tmp_path / "data"))
    try:
        await _wait_until_serving(address, process)
        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "the embedded PostgreSQL and Redis run as children"
        async with grpc.aio.insecure_channel(address) as channel:
            for service in GRPC_SERVICES:
                assert await _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
            assert set(GRPC_SERVICES) <= await _reflected_services(channel)
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode()
    assert process.returncode == 0, text
    assert address in text
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not [child for child in alive if child.status() != psutil.STATUS_ZOMBIE], text


async def _list_segments(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await segment_service_pb2_grpc.SegmentServiceStub(channel).ListSegments(
            segment_service_pb2.ListSegmentsRequest(parent="datasets/demo"),
            metadata=metadata,
            timeout=10,
        )


async def test_audience_up_by_default_prints_a_development_key_and_refuses_calls_without_it(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    data = tmp_path / "data"
    process = await _audience_up(_embedded_environment(address, data))
    try:
        await _wait_until_serving(address, process)
        key_file = data / "dev-api-key"
        key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await _list_segments(address)
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await _list_segments(address, (("authorization", "Bearer aud_not-the-key"),))
        await _list_segments(address, (("authorization", f"Bearer {key}"),))
        # The CLI on the same machine finds the key in the data directory.
        listed = await asyncio.to_thread(
            CliRunner().invoke,
            cli,
            ["segments", "list", "--address", address, "--dataset", "demo"],
            env={"AUDIENCE_DATA_DIR": str(data), "AUDIENCE_API_KEY": ""},
            catch_exceptions=False,
        )
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode()
    assert process.returncode == 0, text
    assert errors.decode(anonymous.value).reason == "API_KEY_MISSING"
    assert errors.decode(wrong.value).code == grpc.StatusCode.UNAUTHENTICATED
    assert listed.exit_code == 0, listed.output
    assert f"API key:    {key} (development key, made now)" in text
    assert "Authentication is OFF" not in text
