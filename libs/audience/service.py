"""Composition of a service process: shared resources, migrations, and the host.

Each service describes itself with a :class:`ServiceDefinition` (its name, the Postgres
schema and migrations it owns, and how to build its :class:`~audience.server.ServiceUnit`
from the shared :class:`Resources`). ``python -m services.<name>`` runs one definition with
:func:`run_alone`; ``audience up`` runs all of them in one process with :func:`serve`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources.abc import Traversable

import asyncpg
from redis.asyncio import BlockingConnectionPool, Redis

from audience import db
from audience.channels import Channels, ChannelSettings
from audience.config import CommonConfig, ConfigError
from audience.security import Security
from audience.server import Host, ServiceUnit
from audience.streams import Bus
from audience.telemetry import Telemetry, configure_logging, setup_telemetry

__all__ = [
    "Hosted",
    "Resources",
    "ServiceDefinition",
    "hosted",
    "migrate",
    "run_alone",
    "serve",
    "tune_garbage_collection",
]

_log = logging.getLogger(__name__)

# Seconds a Redis command waits for a free connection before it fails as unavailable.
_REDIS_CONNECTION_WAIT = 10.0


@dataclass(frozen=True)
class Resources:
    """Connections opened once per process and shared by the services it hosts."""

    common: CommonConfig
    environ: Mapping[str, str]
    postgres: asyncpg.Pool
    redis: Redis
    bus: Bus
    telemetry: Telemetry
    channels: Channels
    """Opens channels to the other services: ``resources.channels.open(address)``."""

    @classmethod
    async def open(
        cls,
        common: CommonConfig,
        environ: Mapping[str, str],
        *,
        postgres_dsn: str,
        redis_url: str,
        telemetry: Telemetry,
        pool_size: int,
        channels: ChannelSettings | None = None,
    ) -> Resources:
        """Opens the PostgreSQL pool and the Redis client; closes both if either fails.

        Args:
            channels: how the services call each other; by default read from ``environ``
                (``AUDIENCE_INTERNAL_API_KEY``, ``AUDIENCE_TLS_CA_FILE``, …).
        """
        settings = channels or ChannelSettings.from_env(environ, common)
        # No socket_timeout: redis-py then wraps every send in asyncio.wait_for, which on
        # Python 3.11 can swallow a task's cancellation (CPython gh-86296), leaving consumer
        # loops running after shutdown. TCP keepalive and health checks find dead peers.
        # A blocking pool: past its connections a command waits for one to come free (up
        # to the timeout) where the default pool fails it at once, which turned a burst of
        # concurrent ingest calls into "the event bus is unavailable".
        redis = Redis.from_pool(
            BlockingConnectionPool.from_url(
                redis_url,
                max_connections=max(64, pool_size * 4),
                timeout=_REDIS_CONNECTION_WAIT,
                socket_timeout=None,
                socket_connect_timeout=5,
                socket_keepalive=True,
                health_check_interval=30,
            )
        )
        try:
            await redis.ping()
            postgres = await db.create_pool(
                postgres_dsn,
                min_size=1,
                max_size=pool_size,
                application_name=f"audience-{telemetry.service_name}",
            )
        except BaseException:
            await redis.aclose()
            raise
        bus = Bus(redis, namespace=common.redis_namespace, partitions=common.bus_partitions)
        return cls(common, environ, postgres, redis, bus, telemetry, Channels(settings, telemetry))

    async def close(self) -> None:
        await self.postgres.close()
        await self.redis.aclose()


BuildUnit = Callable[[Resources], Awaitable[ServiceUnit]]


@dataclass(frozen=True)
class ServiceDefinition:
    """What a host needs to know to run one service.

    Attributes:
        name: the short name, also the ``services.<name>`` package.
        schema: the PostgreSQL schema the service owns.
        migrations: its ordered SQL migrations.
        build: wires the service from the shared resources (its composition root).
    """

    name: str
    schema: str
    migrations: Traversable
    build: BuildUnit


async def migrate(pool: asyncpg.Pool, definitions: Sequence[ServiceDefinition]) -> None:
    """Applies every service's pending migrations, each under its own advisory lock."""
    for definition in definitions:
        applied = await db.migrate(pool, schema=definition.schema, migrations=definition.migrations)
        for name in applied:
            _log.info("Applied migration %s/%s", definition.schema, name)


# The services make and drop many objects the cycle collector tracks on every call and
# every bus entry (upb's message wrappers among them): at Python's default threshold of 700
# a young collection runs every few hundred events, measured at 5-8% of ingest's CPU and as
# most of the segment engine's read latency tail (bench.ingest, bench.memberships).
_YOUNG_COLLECTION_THRESHOLD = 50_000


def tune_garbage_collection() -> None:
    """Sets the process's collector for a long-running service; :func:`serve` calls it
    once the services are built."""
    young, *older = gc.get_threshold()
    if young < _YOUNG_COLLECTION_THRESHOLD:
        gc.set_threshold(_YOUNG_COLLECTION_THRESHOLD, *older)
    # What exists once the services are built lives as long as the process: full
    # collections need not walk it.
    gc.freeze()


@dataclass(frozen=True)
class Hosted:
    """Services built and serving: their host and the resources they share."""

    host: Host
    resources: Resources


@asynccontextmanager
async def hosted(
    definitions: Sequence[ServiceDefinition],
    common: CommonConfig,
    environ: Mapping[str, str],
    *,
    postgres_dsn: str,
    redis_url: str,
    security: Security,
    telemetry: Telemetry,
    pool_size: int,
) -> AsyncIterator[Hosted]:
    """Opens the resources, migrates, builds the services and serves them until the block
    ends; then stops the host (gracefully, once) and closes the resources."""
    resources = await Resources.open(
        common,
        environ,
        postgres_dsn=postgres_dsn,
        redis_url=redis_url,
        telemetry=telemetry,
        pool_size=pool_size,
        channels=security.channels,
    )
    try:
        await migrate(resources.postgres, definitions)
        units = [await definition.build(resources) for definition in definitions]
        services = [name for unit in units for name in unit.service_names]
        host = Host(
            units,
            common,
            telemetry=telemetry,
            interceptors=security.server_interceptors(services),
            credentials=security.server_credentials(),
        )
        await host.start()
        try:
            yield Hosted(host, resources)
        finally:
            await host.stop()
    finally:
        await resources.close()


async def serve(
    definitions: Sequence[ServiceDefinition],
    common: CommonConfig,
    environ: Mapping[str, str],
    *,
    postgres_dsn: str,
    redis_url: str,
    security: Security | None = None,
    telemetry: Telemetry | None = None,
    on_started: Callable[[Host], None] = lambda host: None,
) -> int:
    """Runs services in one host until SIGTERM or SIGINT (or :meth:`Host.stop` on the host
    ``on_started`` is given); returns the exit code.

    Args:
        security: API keys, TLS and how the services call each other; by default read from
            ``environ`` as for a service run alone (:meth:`Security.from_env`).
        telemetry: where the services' spans and metrics go; by default set up from
            ``common`` (:func:`setup_telemetry`, which installs it globally). It is shut
            down when the host stops.
    """
    if security is None:
        security = Security.from_env(environ, common, embedded=False)
    for line in security.describe():
        _log.info("Security: %s", line)
    if telemetry is None:
        label = "audience" if len(definitions) > 1 else definitions[0].name
        telemetry = setup_telemetry(label, common.otel, common.otel_endpoint)
    try:
        async with hosted(
            definitions,
            common,
            environ,
            postgres_dsn=postgres_dsn,
            redis_url=redis_url,
            security=security,
            telemetry=telemetry,
            pool_size=8 * len(definitions),
        ) as running:
            tune_garbage_collection()
            on_started(running.host)
            return await running.host.run_until_signal()
    finally:
        telemetry.shutdown()


def run_alone(definition: ServiceDefinition) -> None:
    """Entry point of ``python -m services.<name>``: the service alone, configured servers."""
    environ = dict(os.environ)
    try:
        common = CommonConfig.from_env(environ)
        postgres_dsn = common.require_postgres_dsn()
        redis_url = common.require_redis_url()
    except ConfigError as error:
        print(f"{definition.name}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(common.log_level, common.log_format)
    try:
        security = Security.from_env(environ, common, embedded=False)
    except ConfigError as error:
        print(f"{definition.name}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        code = asyncio.run(
            serve(
                [definition],
                common,
                environ,
                postgres_dsn=postgres_dsn,
                redis_url=redis_url,
                security=security,
            )
        )
    except ConfigError as error:
        print(f"{definition.name}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)
