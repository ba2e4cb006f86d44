"""The shared fixtures of tests/conftest.py keep each run and each test in its own space."""

from __future__ import annotations

import asyncpg
import pytest
from redis.asyncio import Redis

pytestmark = pytest.mark.integration

# Prefixes handed out by key_prefix in this module, to check their keys are gone afterwards.
seen_prefixes: list[str] = []


async def test_postgres_dsn_is_a_database_made_for_this_run(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("audience_test_")
    finally:
        await conn.close()


async def test_fresh_postgres_dsn_is_another_database(
    postgres_dsn: str, fresh_postgres_dsn: str
) -> None:
    conn = await asyncpg.connect(fresh_postgres_dsn)
    try:
        fresh = await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()
    assert fresh.startswith("audience_test_")
    assert not postgres_dsn.endswith(f"/{fresh}")


async def test_keys_under_key_prefix_can_be_written(redis_url: str, key_prefix: str) -> None:
    seen_prefixes.append(key_prefix)
    client = Redis.from_url(redis_url)
    try:
        await client.set(f"{key_prefix}:a", "1")
        await client.xadd(f"{key_prefix}:stream", {"f": "v"})
        assert await client.exists(f"{key_prefix}:a", f"{key_prefix}:stream") == 2
    finally:
        await client.aclose()


# Runs after the test above (pytest keeps the order of a module) and checks its teardown.
async def test_keys_under_key_prefix_are_deleted_after_the_test(
    redis_url: str, key_prefix: str
) -> None:
    assert seen_prefixes
    assert key_prefix not in seen_prefixes
    client = Redis.from_url(redis_url)
    try:
        assert [key async for key in client.scan_iter(match=f"{seen_prefixes[0]}*")] == []
    finally:
        await client.aclose()
