"""The pool and the migration runner against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from audience.db import MigrationError, create_pool, migrate, session_lock
from tests.integration.export.peers import eventually

pytestmark = pytest.mark.integration

# Runs migrate() in another OS process, starting when told to on stdin so that both racers
# are connected and waiting before either begins.
RACER = """
import asyncio, json, sys
from pathlib import Path

import asyncpg

from audience.db import migrate

async def main() -> None:
    dsn, schema, directory = sys.argv[1:]
    conn = await asyncpg.connect(dsn)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    applied = await migrate(conn, schema=schema, migrations=Path(directory))
    await conn.close()
    print(json.dumps(applied), flush=True)

asyncio.run(main())
"""


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(postgres_dsn, min_size=1, max_size=4, application_name="test-db")
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def schema() -> str:
    return f"svc_{uuid.uuid4().hex[:8]}"


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def history(pool: asyncpg.Pool, schema: str) -> list[tuple[int, str]]:
    rows = await pool.fetch(f"SELECT version, name FROM {schema}.schema_migrations ORDER BY 1")
    return [(row["version"], row["name"]) for row in rows]


async def test_racing_processes_apply_each_migration_once(
    postgres_dsn: str, pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    # Each file sleeps while holding the lock, so the second racer is sure to wait on it.
    directory = write(
        tmp_path / "migrations",
        {
            "0001_create_ran.sql": "CREATE TABLE ran (file text NOT NULL);\n"
            "INSERT INTO ran VALUES ('0001'); SELECT pg_sleep(0.3);",
            "0002_second.sql": "INSERT INTO ran VALUES ('0002'); SELECT pg_sleep(0.3);",
            "0003_third.sql": "INSERT INTO ran VALUES ('0003'); SELECT pg_sleep(0.3);",
        },
    )
    racers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RACER,
            postgres_dsn,
            schema,
            str(directory),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for racer in racers:
        assert racer.stdout is not None
        assert await racer.stdout.readline() == b"ready\n"
    outputs = await asyncio.gather(*(racer.communicate(b"go\n") for racer in racers))

    assert [racer.returncode for racer in racers] == [0, 0]
    applied = [json.loads(stdout) for stdout, _ in outputs]
    names = ["0001_create_ran.sql", "0002_second.sql", "0003_third.sql"]
    assert sorted(applied[0] + applied[1]) == names
    assert await history(pool, schema) == [(1, names[0]), (2, names[1]), (3, names[2])]
    ran = await pool.fetch(f"SELECT file FROM {schema}.ran ORDER BY file")
    assert [row["file"] for row in ran] == ["0001", "0002", "0003"]


async def test_only_pending_migrations_are_applied_in_order(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    directory = write(
        tmp_path,
        {
            "0002_add_email.sql": "ALTER TABLE users ADD COLUMN email text;",
            "0001_create_users.sql": "CREATE TABLE users (id bigint PRIMARY KEY);",
        },
    )
    assert await migrate(pool, schema=schema, migrations=directory) == [
        "0001_create_users.sql",
        "0002_add_email.sql",
    ]
    assert await migrate(pool, schema=schema, migrations=directory) == []

    write(directory, {"0003_add_name.sql": "ALTER TABLE users ADD COLUMN name text;"})
    assert await migrate(pool, schema=schema, migrations=directory) == ["0003_add_name.sql"]
    columns = await pool.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = $1 AND table_name = 'users' ORDER BY ordinal_position",
        schema,
    )
    assert [row["column_name"] for row in columns] == ["id", "email", "name"]


async def test_an_edited_applied_migration_is_refused(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    directory = write(tmp_path, {"0001_create_users.sql": "CREATE TABLE users (id bigint);"})
    await migrate(pool, schema=schema, migrations=directory)
    write(
        directory,
        {
            "0001_create_users.sql": "CREATE TABLE users (id bigint, email text);",
            "0002_more.sql": "CREATE TABLE more (id bigint);",
        },
    )

    with pytest.raises(MigrationError, match=r"0001_create_users\.sql .*must not be edited"):
        await migrate(pool, schema=schema, migrations=directory)
    assert await history(pool, schema) == [(1, "0001_create_users.sql")]


async def test_a_renamed_applied_migration_is_refused(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    sql = "CREATE TABLE users (id bigint);"
    await migrate(pool, schema=schema, migrations=write(tmp_path / "a", {"0001_users.sql": sql}))

    renamed = write(tmp_path / "b", {"0001_create_users.sql": sql})
    with pytest.raises(MigrationError, match=r"0001_create_users\.sql .*as 0001_users\.sql"):
        await migrate(pool, schema=schema, migrations=renamed)


async def test_crlf_line_endings_do_not_count_as_an_edit(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    path = tmp_path / "0001_create_users.sql"
    path.write_bytes(b"CREATE TABLE users (\n  id bigint\n);\n")
    await migrate(pool, schema=schema, migrations=tmp_path)

    path.write_bytes(b"CREATE TABLE users (\r\n  id bigint\r\n);\r\n")
    assert await migrate(pool, schema=schema, migrations=tmp_path) == []


async def test_a_new_schema_without_migrations_gets_an_empty_history(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    (tmp_path / "__init__.py").write_text("")

    assert await migrate(pool, schema=schema, migrations=tmp_path) == []
    assert await history(pool, schema) == []


async def test_a_failing_migration_keeps_the_earlier_ones_and_names_the_file(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    directory = write(
        tmp_path,
        {
            "0001_create_users.sql": "CREATE TABLE users (id bigint);",
            "0002_broken.sql": "CREATE TABLE half (id bigint); ALTER TABLE nowhere ADD x int;",
        },
    )
    with pytest.raises(MigrationError, match=r"0002_broken\.sql .*UndefinedTableError"):
        await migrate(pool, schema=schema, migrations=directory)
    assert await history(pool, schema) == [(1, "0001_create_users.sql")]
    assert await pool.fetchval("SELECT to_regclass($1)", f"{schema}.half") is None

    write(directory, {"0002_broken.sql": "CREATE TABLE half (id bigint);"})
    assert await migrate(pool, schema=schema, migrations=directory) == ["0002_broken.sql"]


async def test_unqualified_names_are_created_in_the_service_schema(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    directory = write(
        tmp_path,
        {
            "0001_enum.sql": "CREATE TYPE kind AS ENUM ('join');",
            # A new enum value is usable only after the transaction that added it commits.
            "0002_add_leave.sql": "ALTER TYPE kind ADD VALUE 'leave';",
            "0003_use_leave.sql": "CREATE TABLE changes (k kind NOT NULL DEFAULT 'leave');",
        },
    )
    await migrate(pool, schema=schema, migrations=directory)

    assert await pool.fetchval("SELECT to_regclass($1)::text", f"{schema}.changes") == (
        f"{schema}.changes"
    )
    assert await pool.fetchval("SELECT to_regclass('public.changes')") is None


async def test_migrations_are_read_from_a_zip_resource(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    archive = tmp_path / "service.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("service/migrations/0001_create_users.sql", "CREATE TABLE users (id int);")
        zf.writestr("service/migrations/__init__.py", "")
    with zipfile.ZipFile(archive) as zf:
        migrations = zipfile.Path(zf, "service/migrations/")
        assert await migrate(pool, schema=schema, migrations=migrations) == [
            "0001_create_users.sql"
        ]


async def test_migrate_refuses_a_connection_inside_a_transaction(
    pool: asyncpg.Pool, schema: str, tmp_path: Path
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(MigrationError, match="outside a transaction"):
            await migrate(conn, schema=schema, migrations=tmp_path)


async def test_migrate_rejects_a_schema_name_that_needs_quoting(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    with pytest.raises(MigrationError, match="lower-case"):
        await migrate(pool, schema='Profile"; DROP', migrations=tmp_path)


async def test_pool_returns_json_and_jsonb_as_python_objects(pool: asyncpg.Pool) -> None:
    value = {"cart": {"value": 99.5, "items": ["a", "é"]}, "known": True, "none": None}

    assert await pool.fetchval("SELECT $1::jsonb", value) == value
    assert await pool.fetchval("SELECT $1::json", [1, "two"]) == [1, "two"]
    assert await pool.fetchval("SELECT '{\"a\": [1, 2]}'::jsonb") == {"a": [1, 2]}


async def test_pool_sessions_are_named_and_in_utc(pool: asyncpg.Pool) -> None:
    assert await pool.fetchval("SHOW application_name") == "test-db"
    assert await pool.fetchval("SHOW TimeZone") == "UTC"


async def _advisory_holders(pool: asyncpg.Pool, key: int) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND ((classid::int8 << 32) | objid::int8) = $1",
        key,
    )
    return count


async def test_a_session_lock_is_exclusive_and_released_with_its_block(
    pool: asyncpg.Pool,
) -> None:
    key = uuid.uuid4().int % 2**31
    async with session_lock(pool, key, wait=True) as held:
        assert held
        async with session_lock(pool, key, wait=False) as also:
            assert not also
        assert await _advisory_holders(pool, key) == 1
    assert await _advisory_holders(pool, key) == 0
    async with session_lock(pool, key, wait=False) as again:
        assert again


async def test_a_block_that_fails_still_releases_its_session_lock(pool: asyncpg.Pool) -> None:
    key = uuid.uuid4().int % 2**31
    with pytest.raises(LookupError):
        async with session_lock(pool, key, wait=True):
            raise LookupError("the work failed")
    assert await _advisory_holders(pool, key) == 0


async def test_a_session_lock_cancelled_while_waiting_leaves_no_lock_behind(
    pool: asyncpg.Pool,
) -> None:
    key = uuid.uuid4().int % 2**31
    async with session_lock(pool, key, wait=True):

        async def wait_for_it() -> None:
            async with session_lock(pool, key, wait=True):
                raise AssertionError("granted while another session held it")

        waiter = asyncio.create_task(wait_for_it())
        await asyncio.sleep(0.2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    # The lock's holder is gone. The waiter's backend, still waiting when its connection
    # was closed, may be granted the lock as the holder lets go, until it finds its client
    # gone; then no one holds it.
    async def released() -> bool:
        return await _advisory_holders(pool, key) == 0

    await eventually(released, within=10)
    # And the waiter's connection did not keep a grant for whoever takes it from the pool
    # next.
    for _ in range(4):
        async with pool.acquire() as conn:
            assert not await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
                conn.get_server_pid(),
            )


async def test_a_released_connection_is_clean_without_a_reset_query(pool: asyncpg.Pool) -> None:
    async def fail_with_a_local_setting(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = '1s'")
            await conn.fetchval("SELECT 1 / 0")

    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await fail_with_a_local_setting(conn)
        pid = conn.get_server_pid()
    async with pool.acquire() as conn:
        assert conn.get_server_pid() == pid
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SHOW statement_timeout") == "0"
