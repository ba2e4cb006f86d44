"""Fixtures that run services for real: migrated, hosted on a local port, called over gRPC.

``start_suite`` hosts any list of service definitions in one :class:`Host`, like
``audience up`` does, against the session's PostgreSQL database and a Redis namespace of
the test's own. Authentication is on, as in production: the suite accepts an admin key made
for it (every dataset, every scope; :attr:`RunningSuite.api_key`, which
:attr:`RunningSuite.channel` sends) and an internal key the services present to each other,
plus any key a test adds. Every service address (``AUDIENCE_*_ADDRESS``) points at that
host, so services that call each other work. Tests isolate their data by dataset id
(:func:`new_dataset`), since the database is shared by the session.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import grpc.aio
import pytest

from audience.auth import SCOPES, Scope, generate_api_key, hash_api_key
from audience.channels import api_key_interceptors
from audience.config import CommonConfig
from audience.security import Security
from audience.server import Host
from audience.service import Resources, ServiceDefinition, hosted
from audience.telemetry import Telemetry

SERVICE_ADDRESS_VARIABLES = (
    "AUDIENCE_INGEST_ADDRESS",
    "AUDIENCE_PROFILE_ADDRESS",
    "AUDIENCE_SEGMENT_ENGINE_ADDRESS",
    "AUDIENCE_EXPORT_ADDRESS",
)


@dataclass(frozen=True)
class SuiteKey:
    """An API key a test adds to a suite, with the entry that makes the suite accept it."""

    name: str
    datasets: tuple[str, ...]
    """Dataset ids, or ``("*",)`` for every dataset."""
    scopes: tuple[Scope, ...]
    key: str = field(default_factory=generate_api_key, repr=False)

    def entry(self) -> dict[str, object]:
        """The key's entry in ``AUDIENCE_API_KEYS``."""
        return {
            "name": self.name,
            "sha256": hash_api_key(self.key),
            "datasets": list(self.datasets),
            "scopes": list(self.scopes),
        }


def open_suite_channel(address: str, api_key: str | None) -> grpc.aio.Channel:
    """A channel to ``address`` that sends ``api_key`` on every call (none when ``None``),
    with gRPC's default options, as a client that knows nothing of the suite would have."""
    interceptors = api_key_interceptors(api_key) if api_key is not None else None
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


@dataclass(frozen=True)
class RunningSuite:
    """Services hosted for a test, with a channel to them."""

    host: Host
    resources: Resources
    address: str
    channel: grpc.aio.Channel
    """Sends :attr:`api_key` on every call."""
    api_key: str = field(repr=False)
    """A key for every dataset with every scope."""

    def open_channel(self, api_key: str | None) -> grpc.aio.Channel:
        """A channel that calls the suite with ``api_key`` (none when ``None``); the caller
        closes it (``async with``)."""
        return open_suite_channel(self.address, api_key)


StartSuite = Callable[..., AbstractAsyncContextManager[RunningSuite]]


def new_dataset() -> str:
    """A dataset id no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def run_suite(
    definitions: Sequence[ServiceDefinition],
    environ: Mapping[str, str] | None = None,
    keys: Sequence[SuiteKey] = (),
    *,
    postgres_dsn: str,
    redis_url: str,
    key_prefix: str,
) -> AsyncIterator[RunningSuite]:
    """Hosts ``definitions`` until the block ends; what :func:`start_suite` returns, for a
    fixture of a wider scope that brings its own Redis key prefix."""
    # The address must be known before the units are built, since they call each other
    # through it; the port is free now and nothing else here binds ports at random.
    address = f"127.0.0.1:{_free_port()}"
    admin = SuiteKey("test-admin", ("*",), SCOPES)
    internal = SuiteKey("internal", ("*",), ("read", "write"))
    settings = {
        "AUDIENCE_LISTEN": address,
        "AUDIENCE_REDIS_NAMESPACE": key_prefix,
        "AUDIENCE_SHUTDOWN_GRACE": "1s",
        "AUDIENCE_API_KEYS": json.dumps([k.entry() for k in (admin, internal, *keys)]),
        "AUDIENCE_INTERNAL_API_KEY": internal.key,
        **dict.fromkeys(SERVICE_ADDRESS_VARIABLES, address),
        **(environ or {}),
    }
    common = CommonConfig.from_env(settings)
    # As a service run alone reads it: keys required, the internal key among them.
    security = Security.from_env(settings, common, embedded=False)
    async with (
        hosted(
            definitions,
            common,
            settings,
            postgres_dsn=postgres_dsn,
            redis_url=redis_url,
            security=security,
            telemetry=Telemetry("test", "off"),
            pool_size=10,
        ) as running,
        open_suite_channel(address, admin.key) as channel,
    ):
        yield RunningSuite(running.host, running.resources, address, channel, admin.key)


@pytest.fixture
def start_suite(postgres_dsn: str, redis_url: str, key_prefix: str) -> StartSuite:
    """Returns ``start(definitions, environ={}, keys=())``, an async context manager of a
    suite that also accepts the :class:`SuiteKey` objects in ``keys``.

    ``environ`` may turn authentication off (``AUDIENCE_AUTH=disabled``) for a test that
    is about something else; it is on otherwise.
    """

    def start(
        definitions: Sequence[ServiceDefinition],
        environ: Mapping[str, str] | None = None,
        keys: Sequence[SuiteKey] = (),
    ) -> AbstractAsyncContextManager[RunningSuite]:
        return run_suite(
            definitions,
            environ,
            keys,
            postgres_dsn=postgres_dsn,
            redis_url=redis_url,
            key_prefix=key_prefix,
        )

    return start
