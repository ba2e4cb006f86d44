"""The gRPC host: one ``grpc.aio`` server for one or more services.

``audience up`` hosts every service in one process; ``python -m services.<name>`` hosts
one. Either way the server has the same limits, keepalive, interceptors (tracing, then
errors, then any the caller adds, such as authentication), the health service with a
status per hosted service, and reflection.

With TLS, a second, plaintext port (``AUDIENCE_HEALTH_LISTEN``) can serve the health
service alone, for probes that cannot speak TLS (the kubelet's ``grpc:`` probes).

Shutdown, on SIGTERM or SIGINT, on :meth:`Host.stop`, or when a background task dies:
health turns NOT_SERVING for every service, background tasks are cancelled, in-flight RPCs
get the grace period to finish, then every unit closes its resources.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from audience.config import Address, CommonConfig
from audience.errors import ErrorInterceptor
from audience.telemetry import Telemetry

__all__ = ["BackgroundTask", "Host", "ServiceUnit"]

_log = logging.getLogger(__name__)

BackgroundTask = Callable[[], Awaitable[None]]
"""Work that runs for the life of the server, such as a bus consumer."""


async def _nothing_to_close() -> None:
    return None


@dataclass(frozen=True)
class ServiceUnit:
    """One logical service (``ingest``, ``profile``, …) as a host runs it.

    Attributes:
        name: short name, for logs.
        service_names: the full gRPC names it serves (``audience.v1.IngestService``);
            each gets a health status and a reflection entry.
        add_to_server: registers its servicers, e.g.
            ``functools.partial(add_IngestServiceServicer_to_server, servicer)``.
        background: coroutines started with the server, which must run until cancelled.
            One that raises *or returns* stops the host with a non-zero exit: a dead
            consumer behind a SERVING health check is worse than a restart.
        close: releases its resources (pools, connections) after the server has stopped.
    """

    name: str
    service_names: tuple[str, ...]
    add_to_server: Callable[[grpc.aio.Server], None]
    background: tuple[BackgroundTask, ...] = ()
    close: Callable[[], Awaitable[None]] = _nothing_to_close


def _milliseconds(duration: timedelta) -> int:
    return round(duration.total_seconds() * 1000)


class Host:
    """Serves ``units`` on ``config.listen``.

    Args:
        units: the services to host; names and gRPC service names must be unique.
        config: listen address, message limit, keepalive and shutdown grace.
        telemetry: adds the tracing interceptor when telemetry is on.
        interceptors: run inside the error interceptor, so an :class:`AudienceError`
            raised from a wrapped behaviour (see :func:`audience.errors.wrap_handler`)
            reaches the client as its rich status.
        credentials: serve TLS (or mutual TLS) with these; ``None`` serves plaintext.
    """

    def __init__(
        self,
        units: Sequence[ServiceUnit],
        config: CommonConfig,
        *,
        telemetry: Telemetry | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        names = [unit.name for unit in units]
        if len(set(names)) != len(names):
            raise ValueError(f"unit names must be unique, got {names}")
        services = [service for unit in units for service in unit.service_names]
        if len(set(services)) != len(services) or "" in services:
            raise ValueError(f"gRPC service names must be unique and non-empty, got {services}")
        self._units = tuple(units)
        self._services = tuple(services)
        self._config = config
        self._interceptors = [
            *(telemetry.server_interceptors() if telemetry else ()),
            ErrorInterceptor(),
            *interceptors,
        ]
        self._credentials = credentials
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health_port: int | None = None
        self._health: health.aio.HealthServicer | None = None
        self._port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._failed = False

    @property
    def port(self) -> int:
        """The bound port (the real one when ``config.listen`` asked for port 0)."""
        if self._port is None:
            raise RuntimeError("the host has not started")
        return self._port

    @property
    def health_port(self) -> int | None:
        """The bound port of the plaintext health listener, if ``config.health_listen``."""
        return self._health_port

    @property
    def exit_code(self) -> int:
        """0 after a clean stop; 1 when a background task or a unit's ``close()`` failed."""
        return 1 if self._failed else 0

    def _options(self) -> list[tuple[str, int]]:
        keepalive = self._config.keepalive
        return [
            ("grpc.max_receive_message_length", self._config.max_message_bytes),
            ("grpc.max_send_message_length", self._config.max_message_bytes),
            ("grpc.keepalive_time_ms", _milliseconds(keepalive.time)),
            ("grpc.keepalive_timeout_ms", _milliseconds(keepalive.timeout)),
            ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                _milliseconds(keepalive.min_ping_interval),
            ),
            # The server's own keepalive pings must not stop on a connection without calls.
            ("grpc.http2.max_pings_without_data", 0),
            # No grace after the age: a watcher's stream may run for days on its connection.
            ("grpc.max_connection_age_ms", _milliseconds(self._config.max_connection_age)),
            # gRPC sets SO_REUSEPORT by default on Linux: a second process would then "bind"
            # the same port and quietly take half the connections.
            ("grpc.so_reuseport", 0),
        ]

    async def start(self) -> int:
        """Binds, starts serving and starts the background tasks; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the host has already started")
        server = grpc.aio.server(interceptors=self._interceptors, options=self._options())
        self._server = server
        try:
            servicer = health.aio.HealthServicer()
            self._health = servicer
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            for service in self._services:
                await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
            reflection.enable_server_reflection(
                (*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            for unit in self._units:
                unit.add_to_server(server)
            address = str(self._config.listen)
            try:
                if self._credentials is None:
                    port: int = server.add_insecure_port(address)
                else:
                    port = server.add_secure_port(address, self._credentials)
            except RuntimeError as error:
                raise OSError(f"cannot listen on {address}: {error}") from error
            self._port = port
            await server.start()
            if self._config.health_listen is not None:
                await self._start_health(servicer, self._config.health_listen)
        except BaseException:
            await self.stop(timedelta(0))
            raise
        for unit in self._units:
            for task in unit.background:
                label = f"{unit.name}/{getattr(task, '__qualname__', repr(task))}"
                self._tasks.append(asyncio.create_task(self._supervise(label, task), name=label))
        _log.info(
            "Serving %s on %s",
            ", ".join(unit.name for unit in self._units) or "nothing",
            Address(self._config.listen.host, port),
        )
        return port

    async def _start_health(self, servicer: health.aio.HealthServicer, listen: Address) -> None:
        # The same servicer: statuses, and NOT_SERVING at shutdown, are the main port's.
        server = grpc.aio.server(options=self._options())
        self._health_server = server
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        try:
            self._health_port = server.add_insecure_port(str(listen))
        except RuntimeError as error:
            raise OSError(f"cannot listen on {listen}: {error}") from error
        await server.start()
        _log.info(
            "Serving health alone, in plaintext, on %s", Address(listen.host, self._health_port)
        )

    async def _supervise(self, label: str, task: BackgroundTask) -> None:
        try:
            await task()
        except Exception:
            if self._stopping is not None:
                raise
            _log.exception("Background task %s crashed; stopping the host", label)
        else:
            if self._stopping is not None:
                return
            _log.error("Background task %s returned while serving; stopping the host", label)
        self._failed = True
        self._begin_stop(None)

    def _begin_stop(self, grace: timedelta | None) -> asyncio.Task[None]:
        if self._stopping is None:
            self._stopping = asyncio.create_task(
                self._shutdown(self._config.shutdown_grace if grace is None else grace),
                name="audience-host-shutdown",
            )
        return self._stopping

    async def stop(self, grace: timedelta | None = None) -> None:
        """Shuts down gracefully (once, however often it is called).

        Args:
            grace: how long in-flight RPCs may run; ``None`` means ``config.shutdown_grace``.
        """
        # Shielded: a caller cancelled mid-shutdown must not leave the server half stopped.
        await asyncio.shield(self._begin_stop(grace))

    async def wait(self) -> int:
        """Waits until the host has stopped, for whatever reason; returns :attr:`exit_code`."""
        await self._stopped.wait()
        return self.exit_code

    async def run_until_signal(self) -> int:
        """Starts if needed, serves until SIGTERM or SIGINT (or a failure), shuts down once.

        Returns:
            The process exit code: 0 after a clean shutdown, 1 after a failure.
        """
        if self._server is None:
            await self.start()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            return await self.wait()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping is None:
            _log.info("Received %s; shutting down", name)
        else:
            _log.info("Received %s; already shutting down", name)
        self._begin_stop(None)

    async def _shutdown(self, grace: timedelta) -> None:
        try:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            await self._stop_background(grace)
            if self._server is not None:
                await self._server.stop(grace.total_seconds())
            if self._health_server is not None:
                await self._health_server.stop(0)
            for unit in reversed(self._units):
                try:
                    await unit.close()
                except Exception:
                    _log.exception("Closing %s failed", unit.name)
                    self._failed = True
        finally:
            self._stopped.set()
        _log.info("Stopped")

    async def _stop_background(self, grace: timedelta) -> None:
        if not self._tasks:
            return
        for task in self._tasks:
            task.cancel()
        done, pending = await asyncio.wait(self._tasks, timeout=max(grace.total_seconds(), 1.0))
        for task in pending:
            _log.error("Background task %s ignored cancellation; leaving it", task.get_name())
            self._failed = True
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                _log.error(
                    "Background task %s failed while stopping",
                    task.get_name(),
                    exc_info=task.exception(),
                )

    async def __aenter__(self) -> Host:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
