"""The host: health, reflection, limits, interceptors and graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from audience import errors
from audience.config import CommonConfig
from audience.server import Host, ServiceUnit
from audience.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[2]
ECHO = "audience.test.Echo"
OTHER = "audience.test.Other"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _config(**overrides: str) -> CommonConfig:
    return CommonConfig.from_env(
        {
            "AUDIENCE_LISTEN": "127.0.0.1:0",
            "AUDIENCE_MAX_MESSAGE_BYTES": "1024",
            "AUDIENCE_SHUTDOWN_GRACE": "1s",
            **overrides,
        }
    )


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _big(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"x" * int(request.decode())


async def _peer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return str(context.peer()).encode()


async def _ticks(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for tick in range(int(request.decode())):
        yield str(tick).encode()
        await asyncio.sleep(0.3)


async def _refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise errors.failed_precondition("Not now.", reason="NOT_NOW")


def _add_echo(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO,
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(_echo),
                    "Big": grpc.unary_unary_rpc_method_handler(_big),
                    "Refuse": grpc.unary_unary_rpc_method_handler(_refuse),
                    "Peer": grpc.unary_unary_rpc_method_handler(_peer),
                    "Ticks": grpc.unary_stream_rpc_method_handler(_ticks),
                },
            ),
        )
    )


def _add_nothing(server: grpc.aio.Server) -> None:
    return None


class Closed:
    def __init__(self) -> None:
        self.units: list[str] = []

    def closer(self, name: str) -> Callable[[], Awaitable[None]]:
        async def close() -> None:
            self.units.append(name)

        return close


def _units(closed: Closed, *background: Callable[[], Awaitable[None]]) -> list[ServiceUnit]:
    return [
        ServiceUnit("echo", (ECHO,), _add_echo, tuple(background), closed.closer("echo")),
        ServiceUnit("other", (OTHER,), _add_nothing, close=closed.closer("other")),
    ]


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    async with Host(_units(Closed()), _config()) as running:
        yield running


@pytest.fixture
async def channel(host: Host) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        yield channel


async def _check(channel: grpc.aio.Channel, service: str) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return response.status


async def test_health_is_serving_for_the_server_and_every_hosted_service(
    channel: grpc.aio.Channel,
) -> None:
    assert await _check(channel, "") == SERVING
    assert await _check(channel, ECHO) == SERVING
    assert await _check(channel, OTHER) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _check(channel, "audience.test.Unknown")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_every_hosted_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    responses = [response async for response in call]

    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {
        ECHO,
        OTHER,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_a_too_large_request_is_resource_exhausted(channel: grpc.aio.Channel) -> None:
    echo = channel.unary_unary(f"/{ECHO}/Echo")
    assert await echo(b"x" * 512, timeout=5) == b"x" * 512

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await echo(b"x" * 2048, timeout=5)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_too_large_response_is_resource_exhausted(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{ECHO}/Big")(b"4096", timeout=5)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_domain_errors_reach_the_client_as_rich_statuses(
    channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{ECHO}/Refuse")(b"", timeout=5)

    decoded = errors.decode(caught.value)
    assert (decoded.code, decoded.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_NOW")


async def _watch_while_pinging(port: int, ping_every_ms: int, seconds: float) -> grpc.StatusCode:
    """Holds an idle health Watch open while the client pings; returns how it ended."""
    options = [
        ("grpc.keepalive_time_ms", ping_every_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=seconds
        )
        try:
            async for _ in watch:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code()
    raise AssertionError("the watch ended without a status")


async def test_client_pings_at_the_permitted_interval_keep_the_connection() -> None:
    config = _config(AUDIENCE_KEEPALIVE_MIN_PING_INTERVAL="1s")
    async with Host([], config) as host:
        ended = await _watch_while_pinging(host.port, ping_every_ms=1500, seconds=5)

    assert ended == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_client_pinging_too_often_is_disconnected() -> None:
    config = _config(AUDIENCE_KEEPALIVE_MIN_PING_INTERVAL="10s")
    async with Host([], config) as host:
        ended = await _watch_while_pinging(host.port, ping_every_ms=200, seconds=20)

    assert ended == grpc.StatusCode.UNAVAILABLE


async def test_an_aged_connection_is_replaced_while_its_stream_runs_on() -> None:
    config = _config(AUDIENCE_MAX_CONNECTION_AGE="1s")
    async with (
        Host(_units(Closed()), config) as host,
        grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel,
    ):
        peer = channel.unary_unary(f"/{ECHO}/Peer")
        first = await peer(b"", timeout=5)
        ticks = channel.unary_stream(f"/{ECHO}/Ticks")(b"12", timeout=30)

        deadline = time.monotonic() + 10
        later = first
        while later == first and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            later = await peer(b"", timeout=5)
        received = [tick async for tick in ticks]

    assert later != first, "the connection was never replaced"
    assert received == [str(tick).encode() for tick in range(12)]


async def test_an_rpc_is_traced_from_client_to_server_but_probes_are_not() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry("audience-test", "console", tracer_provider=provider)
    async with (
        Host(_units(Closed()), _config(), telemetry=telemetry) as host,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{host.port}", interceptors=telemetry.client_interceptors()
        ) as channel,
    ):
        await channel.unary_unary(f"/{ECHO}/Echo")(b"hi", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(f"/{ECHO}/Refuse")(b"", timeout=5)
        await _check(channel, "")

    spans = exporter.get_finished_spans()
    served = {s.name: s for s in spans if s.kind == trace.SpanKind.SERVER}
    called = {s.name: s for s in spans if s.kind == trace.SpanKind.CLIENT}
    assert set(served) == {f"/{ECHO}/Echo", f"/{ECHO}/Refuse"}
    echo_server, echo_client = served[f"/{ECHO}/Echo"], called[f"/{ECHO}/Echo"]
    assert echo_server.parent is not None
    assert echo_server.parent.span_id == echo_client.context.span_id
    assert echo_server.context.trace_id == echo_client.context.trace_id
    refused = served[f"/{ECHO}/Refuse"].attributes or {}
    assert refused["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]


class RequireKey(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Stands in for the authentication interceptor a later change adds."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if not details.method.startswith(f"/{ECHO}/"):
            return handler

        def require(behavior: errors.Behavior) -> errors.Behavior:
            async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if ("x-api-key", "k1") not in context.invocation_metadata():
                    raise errors.unauthenticated("No API key.", reason="API_KEY_MISSING")
                return await behavior(request, context)

            return checked

        return errors.wrap_handler(handler, require)


async def test_extra_interceptors_raise_audience_errors_like_handlers() -> None:
    async with (
        Host(_units(Closed()), _config(), interceptors=[RequireKey()]) as host,
        grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel,
    ):
        echo = channel.unary_unary(f"/{ECHO}/Echo")
        assert await echo(b"hi", metadata=[("x-api-key", "k1")], timeout=5) == b"hi"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await echo(b"hi", timeout=5)
        assert await _check(channel, "") == SERVING

    decoded = errors.decode(caught.value)
    assert (decoded.code, decoded.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")


async def test_a_crashing_background_task_stops_the_host() -> None:
    async def consume() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("lost the stream")

    closed = Closed()
    host = Host(_units(closed, consume), _config())
    port = await host.start()

    assert await asyncio.wait_for(host.wait(), timeout=10) == 1
    assert closed.units == ["other", "echo"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _check(channel, "")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_background_task_that_returns_stops_the_host() -> None:
    async def consume() -> None:
        return None

    host = Host(_units(Closed(), consume), _config())
    await host.start()

    assert await asyncio.wait_for(host.wait(), timeout=10) == 1


async def test_stop_cancels_background_tasks_and_closes_units_once() -> None:
    cancelled = asyncio.Event()

    async def consume() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    closed = Closed()
    host = Host(_units(closed, consume), _config())
    await host.start()
    await asyncio.sleep(0)

    await asyncio.gather(host.stop(), host.stop())
    await host.stop()

    assert cancelled.is_set()
    assert closed.units == ["other", "echo"]
    assert host.exit_code == 0


async def test_a_port_in_use_is_an_error(host: Host) -> None:
    closed = Closed()
    second = Host(_units(closed), _config(AUDIENCE_LISTEN=f"127.0.0.1:{host.port}"))

    with pytest.raises(OSError, match=f"127.0.0.1:{host.port}"):
        await second.start()
    assert closed.units == ["other", "echo"]


def test_unit_and_service_names_must_be_unique() -> None:
    echo = ServiceUnit("echo", (ECHO,), _add_echo)
    with pytest.raises(ValueError, match="unit names"):
        Host([echo, echo], _config())
    with pytest.raises(ValueError, match="service names"):
        Host([echo, ServiceUnit("again", (ECHO,), _add_nothing)], _config())


class Child:
    """The host in a subprocess (tests/integration/_server_child.py)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout: list[str] = []

    async def line(self, wanted: str) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(20):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"child exited before printing {wanted!r}")
                line = raw.decode().rstrip("\n")
                self.stdout.append(line)
                if line.startswith(wanted):
                    return line

    async def finish(self) -> tuple[int, str, str]:
        stdout, stderr = await self.process.communicate()
        code = self.process.returncode
        assert code is not None
        return code, "\n".join([*self.stdout, stdout.decode()]), stderr.decode()


async def _start_child(mode: str, **environ: str) -> Child:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration._server_child",
        mode,
        cwd=ROOT,
        env={**clean, "AUDIENCE_LISTEN": "127.0.0.1:0", **environ},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Child(process)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        if child.process.returncode is None:
            child.process.kill()


async def _until_refused(port: int) -> None:
    """Returns once a new connection to ``port`` is refused."""
    for _ in range(200):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as fresh:
            try:
                await _check(fresh, "")
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    return
        await asyncio.sleep(0.05)
    raise AssertionError(f"port {port} still accepts connections")


# grpcio (1.85) logs, then prints, the CancelledError of an RPC whose peer closed at the
# moment it finished (the client leaving right after its answer): gRPC's report of a race
# the RPC survived, which the test must not mistake for a failure of ours.
_GRPC_CANCELLATION_REPORT = re.compile(
    r"^.*Exception not handled by _handle_exceptions in servicer method \[[^\]\n]*\]\n"
    r"(?:Traceback \(most recent call last\):\n(?:  .*\n)+asyncio\.exceptions\.CancelledError\n)+",
    re.MULTILINE,
)


def _without_grpc_cancellation_reports(stderr: str) -> str:
    return _GRPC_CANCELLATION_REPORT.sub("", stderr)


async def test_sigterm_drains_in_flight_rpcs_then_exits_zero(children: list[Child]) -> None:
    child = await _start_child("serve", AUDIENCE_SHUTDOWN_GRACE="10s", AUDIENCE_OTEL="console")
    children.append(child)
    port = int((await child.line("PORT")).split()[1])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert await _check(channel, "audience.test.Slow") == SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="audience.test.Slow"), timeout=30
        )
        assert (await watch.read()).status == SERVING
        slow = asyncio.ensure_future(
            channel.unary_unary("/audience.test.Slow/Wait")(b"4", timeout=30)
        )
        await child.line("STARTED")

        child.process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()

        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()
        await _until_refused(port)
        assert not slow.done(), "a new connection was refused while the RPC still ran"
        assert await slow == b"done"

    async with asyncio.timeout(15):
        code, stdout, stderr = await child.finish()
    assert code == 0, stderr
    assert time.monotonic() - stopped_at < 10
    assert "CLOSED" in stdout.splitlines()
    assert '"name": "/audience.test.Slow/Wait"' in stdout, "the RPC was traced"
    assert "grpc.health.v1.Health" not in stdout, "probes are not traced"
    assert "Traceback" not in _without_grpc_cancellation_reports(stderr)


async def test_a_crashing_background_task_exits_the_process_non_zero(
    children: list[Child],
) -> None:
    child = await _start_child("crash")
    children.append(child)

    async with asyncio.timeout(20):
        code, stdout, stderr = await child.finish()

    assert code == 1
    assert "Background task slow/_crash crashed; stopping the host" in stderr
    assert "RuntimeError: consumer lost its stream" in stderr
    assert "CLOSED" in stdout.splitlines()
