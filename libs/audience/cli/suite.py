"""Commands that run the suite or check on it: ``up``, ``migrate`` and ``health``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import click
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from audience.cli.connection import connect, connection_options
from audience.config import CommonConfig, ConfigError, redact_url
from audience.embedded import EmbeddedPostgres, EmbeddedRedis
from audience.security import Security
from audience.server import Host
from audience.telemetry import configure_logging


def _common_config(environ: Mapping[str, str]) -> CommonConfig:
    try:
        return CommonConfig.from_env(environ)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


async def _servers(stack: AsyncExitStack, common: CommonConfig) -> tuple[str, str]:
    """Returns the configured PostgreSQL and Redis, starting embedded ones for what is not."""
    postgres_dsn, redis_url = common.postgres_dsn, common.redis_url
    if postgres_dsn is None:
        postgres = EmbeddedPostgres(common.data_dir / "postgres")
        postgres_dsn = await asyncio.to_thread(postgres.start)
        stack.push_async_callback(asyncio.to_thread, postgres.stop)
    if redis_url is None:
        redis = EmbeddedRedis(common.data_dir / "redis")
        redis_url = await asyncio.to_thread(redis.start)
        stack.push_async_callback(asyncio.to_thread, redis.stop)
    return postgres_dsn, redis_url


def _print_endpoints(
    console: Console, host: Host, common: CommonConfig, security: Security, dsn: str, url: str
) -> None:
    from services.registry import SERVICES

    address = f"{common.listen.host}:{host.port}"
    table = Table(title=f"Audience is up on {address}", title_justify="left")
    table.add_column("service")
    table.add_column("gRPC services")
    table.add_column("address")
    for definition in SERVICES:
        names = ", ".join(_grpc_names(definition.name))
        table.add_row(definition.name, names, address)
    console.print(table)
    embedded = common.postgres_dsn is None or common.redis_url is None
    console.print(f"PostgreSQL: {redact_url(dsn)}")
    console.print(f"Redis:      {redact_url(url)}")
    if embedded:
        console.print(f"Data:       {Path(common.data_dir).resolve()}")
    _print_security(console, security)
    console.print("Press Ctrl-C to stop.")


def _print_security(console: Console, security: Security) -> None:
    tls = security.server_tls
    console.print(f"TLS:        {'off' if tls is None else ('mutual' if tls.mutual else 'on')}")
    if security.keys is None:
        console.print(
            "[bold red]Authentication is OFF (AUDIENCE_AUTH=disabled):[/bold red] every "
            "caller may read and change every dataset."
        )
    elif security.dev_key is None:
        console.print("API keys:   as configured (docs/security.md)")
    else:
        dev = security.dev_key
        origin = "made now" if dev.created else "already in the data folder"
        # Never wrapped: the key is copied from here.
        console.print(
            f"API key:    [bold]{escape(dev.key)}[/bold] (development key, {origin})",
            soft_wrap=True,
        )
        where = escape(str(dev.path.resolve()))
        console.print(f"            in {where}, where the audience CLI finds it;")
        console.print("            other clients send `authorization: Bearer <key>`")


def _grpc_names(service: str) -> tuple[str, ...]:
    return {
        "ingest": ("audience.v1.IngestService",),
        "profile": ("audience.v1.ProfileService",),
        "segment_engine": ("audience.v1.SegmentService", "audience.v1.MembershipService"),
        "export": ("audience.v1.ExportService",),
    }[service]


@click.command()
def up() -> None:
    """Starts the whole suite in one process on one address.

    With AUDIENCE_POSTGRES_DSN and AUDIENCE_REDIS_URL unset, starts an embedded PostgreSQL and
    Redis that keep their data under AUDIENCE_DATA_DIR (./data). Ctrl-C stops everything.

    Every call needs an API key: those of AUDIENCE_API_KEYS (or AUDIENCE_API_KEYS_FILE) or,
    when none are configured, a development key made once under AUDIENCE_DATA_DIR, printed
    at every start, and read from there by the other commands. AUDIENCE_AUTH=disabled
    serves without keys, to every caller.
    """
    from audience.service import serve
    from services.registry import SERVICES

    environ = dict(os.environ)
    common = _common_config(environ)
    configure_logging(common.log_level, common.log_format)
    console = Console()
    try:
        security = Security.from_env(environ, common, embedded=True)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None

    async def run() -> int:
        async with AsyncExitStack() as stack:
            dsn, url = await _servers(stack, common)
            return await serve(
                SERVICES,
                common,
                environ,
                postgres_dsn=dsn,
                redis_url=url,
                security=security,
                on_started=lambda host: _print_endpoints(console, host, common, security, dsn, url),
            )
        return 1

    try:
        code = asyncio.run(run())
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    sys.exit(code)


@click.command()
def migrate() -> None:
    """Applies every service's database migrations (safe to run concurrently)."""
    from audience import db
    from audience.service import migrate as migrate_all
    from services.registry import SERVICES

    common = _common_config(os.environ)
    configure_logging(common.log_level, common.log_format)
    try:
        dsn = common.require_postgres_dsn()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None

    async def run() -> None:
        pool = await db.create_pool(
            dsn, min_size=1, max_size=2, application_name="audience-migrate"
        )
        try:
            await migrate_all(pool, SERVICES)
        finally:
            await pool.close()

    asyncio.run(run())
    click.echo("Migrations are up to date.")


@click.command()
@connection_options
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for answers.")
def health(address: str, timeout: float) -> None:
    """Shows each service's health status."""
    services = (
        "",
        *(
            name
            for key in ("ingest", "profile", "segment_engine", "export")
            for name in _grpc_names(key)
        ),
    )

    async def check() -> list[tuple[str, str]]:
        async with connect(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            rows: list[tuple[str, str]] = []
            for service in services:
                try:
                    response = await stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=timeout
                    )
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                except grpc.aio.AioRpcError as error:
                    status = error.code().name
                rows.append((service or "(overall)", status))
            return rows

    rows = asyncio.run(check())
    table = Table(title=f"Health of {address}", title_justify="left")
    table.add_column("service")
    table.add_column("status")
    for service, status in rows:
        style = "green" if status == "SERVING" else "red"
        table.add_row(service, f"[{style}]{status}[/{style}]")
    Console().print(table)
    if any(status != "SERVING" for _, status in rows):
        sys.exit(1)
