"""Fixtures that run services for real: migrated, hosted on a local port, called over gRPC.

``start_suite`` hosts any list of service definitions in one :class:`Host`, like
``audience up`` does, against the session's PostgreSQL database and a Redis namespace of
the test's own. Every service address (``AUDIENCE_*_ADDRESS``) points at that host, so
services that call each other work. Tests isolate their data by dataset id
(:func:`new_dataset`), since the database is shared by the session.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import grpc.aio
import pytest

from audience.config import CommonConfig
from audience.server import Host
from audience.service import Resources, ServiceDefinition, migrate
from audience.telemetry import Telemetry

SERVICE_ADDRESS_VARIABLES = (
    "AUDIENCE_INGEST_ADDRESS",
    "AUDIENCE_PROFILE_ADDRESS",
    "AUDIENCE_SEGMENT_ENGINE_ADDRESS",
    "AUDIENCE_EXPORT_ADDRESS",
)


@dataclass(frozen=True)
class RunningSuite:
    """Services hosted for a test, with a channel to them."""

    host: Host
    resources: Resources
    address: str
    channel: grpc.aio.Channel


StartSuite = Callable[..., AbstractAsyncContextManager[RunningSuite]]


def new_dataset() -> str:
    """A dataset id no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def start_suite(postgres_dsn: str, redis_url: str, key_prefix: str) -> StartSuite:
    """Returns ``start(definitions, environ={})``, an async context manager of a suite."""

    @asynccontextmanager
    async def start(
        definitions: Sequence[ServiceDefinition], environ: Mapping[str, str] | None = None
    ) -> AsyncIterator[RunningSuite]:
        # The address must be known before the units are built, since they call each other
        # through it; the port is free now and nothing else here binds ports at random.
        address = f"127.0.0.1:{_free_port()}"
        settings = {
            "AUDIENCE_LISTEN": address,
            "AUDIENCE_REDIS_NAMESPACE": key_prefix,
            "AUDIENCE_SHUTDOWN_GRACE": "1s",
            **dict.fromkeys(SERVICE_ADDRESS_VARIABLES, address),
            **(environ or {}),
        }
        common = CommonConfig.from_env(settings)
        resources = await Resources.open(
            common,
            settings,
            postgres_dsn=postgres_dsn,
            redis_url=redis_url,
            telemetry=Telemetry("test", "off"),
            pool_size=10,
        )
        try:
            await migrate(resources.postgres, definitions)
            units = [await definition.build(resources) for definition in definitions]
            host = Host(units, common)
            await host.start()
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    yield RunningSuite(host, resources, address, channel)
            finally:
                await host.stop(timedelta(seconds=1))
        finally:
            await resources.close()

    return start
