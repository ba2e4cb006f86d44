"""Session fixtures for tests that need real PostgreSQL and Redis.

Environment:
    AUDIENCE_TEST_POSTGRES_DSN: a superuser ``postgresql://`` URI of a server to use (CI:
        ``postgresql://postgres@127.0.0.1:5432/postgres``). Unset: an embedded PostgreSQL is
        started in a temporary directory for the session.
    AUDIENCE_TEST_REDIS_URL: a ``redis://`` URL of a server to use (CI:
        ``redis://127.0.0.1:6379/0``). Unset: an embedded Redis is started for the session.

Tests never assume an empty server: each run works in its own database (``postgres_dsn``,
or ``fresh_postgres_dsn`` for one test) and its own key prefix (``key_prefix``). A variable
that points at a server that does not answer fails the tests that need it, never skips them.
Fixtures are lazy: a test that requests none of them (all of tests/unit) starts nothing.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
import redis.exceptions
from redis.asyncio import Redis

from audience.db import dsn_with_database
from audience.embedded import EmbeddedPostgres, EmbeddedRedis

POSTGRES_ENV = "AUDIENCE_TEST_POSTGRES_DSN"
REDIS_ENV = "AUDIENCE_TEST_REDIS_URL"


@pytest.fixture(scope="session")
async def postgres_admin_dsn() -> AsyncIterator[str]:
    """A superuser DSN: the configured server, or an embedded one for the session."""
    dsn = os.environ.get(POSTGRES_ENV)
    if dsn:
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            pytest.fail(
                f"{POSTGRES_ENV}={dsn} does not answer: {type(exc).__name__}: {exc}", pytrace=False
            )
        await conn.close()
        yield dsn
        return
    with tempfile.TemporaryDirectory(prefix="audience-test-postgres-") as directory:
        server = EmbeddedPostgres(Path(directory))
        try:
            yield await asyncio.to_thread(server.start)
        finally:
            await asyncio.to_thread(server.stop)


@asynccontextmanager
async def _scratch_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"audience_test_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield dsn_with_database(admin_dsn, name)
        finally:
            # FORCE terminates connections a test left open (a pool not closed after a failure).
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def postgres_dsn(postgres_admin_dsn: str) -> AsyncIterator[str]:
    """A database made for this test run, dropped at its end."""
    async with _scratch_database(postgres_admin_dsn) as dsn:
        yield dsn


@pytest.fixture
async def fresh_postgres_dsn(postgres_admin_dsn: str) -> AsyncIterator[str]:
    """A database made for one test, dropped after it."""
    async with _scratch_database(postgres_admin_dsn) as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def redis_url() -> AsyncIterator[str]:
    """A Redis URL: the configured server, or an embedded one for the session."""
    url = os.environ.get(REDIS_ENV)
    if url:
        client = Redis.from_url(url, socket_connect_timeout=10)
        try:
            await client.ping()
        except (OSError, redis.exceptions.RedisError) as exc:
            pytest.fail(
                f"{REDIS_ENV}={url} does not answer: {type(exc).__name__}: {exc}", pytrace=False
            )
        finally:
            await client.aclose()
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="audience-test-redis-") as directory:
        server = EmbeddedRedis(Path(directory))
        try:
            yield await asyncio.to_thread(server.start)
        finally:
            await asyncio.to_thread(server.stop)


@pytest.fixture
async def key_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; every key starting with it is deleted afterwards."""
    prefix = f"audience-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
