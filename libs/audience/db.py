"""PostgreSQL access shared by the services: a configured asyncpg pool and the migration runner.

Each service owns one Postgres schema and ships its schema history as ordered SQL files,
``NNNN_description.sql``, in ``services/<name>/migrations/``. :func:`migrate` applies the
files that are not yet applied, once, even when several replicas start at the same time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

__all__ = [
    "LOOP_FAILURES",
    "SERVER_GONE",
    "Migration",
    "MigrationError",
    "create_pool",
    "dsn_with_database",
    "load_migrations",
    "migrate",
    "session_lock",
]

_log = logging.getLogger(__name__)

SERVER_GONE: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,
)
"""What asyncpg raises, besides ``OSError``, while PostgreSQL is out of reach: a connection
that failed or was lost (SQLSTATE class 08); a server shutting down, crashed or starting
(57P01-57P03); no connection slot left; and ``InternalClientError`` ("cannot switch to
state 11; another operation (2) is in progress"), raised instead of a closed connection
when the server's goodbye to an idle session is read before its socket closes. The pool
replaces such a connection; the next attempt gets a new one."""

LOOP_FAILURES: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    *SERVER_GONE,
)
"""What a background loop's database step may raise that a later pass can get past: the
loop logs it and tries again rather than stopping the process."""

_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<description>[a-z0-9][a-z0-9_]*)\.sql$")
# Lower-case only, so the quoted and the unquoted spelling name the same schema.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _encode_json(value: Any) -> str:
    # allow_nan=False: Postgres rejects NaN/Infinity in json, better to fail here with the value.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def _set_json_codecs(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, schema="pg_catalog", encoder=_encode_json, decoder=json.loads
        )


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    application_name: str = "audience",
    command_timeout: float | None = 30.0,
    statement_cache_size: int = 256,
    max_inactive_connection_lifetime: float = 300.0,
    server_settings: Mapping[str, str] | None = None,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> asyncpg.Pool:
    """Opens an asyncpg pool on which json and jsonb values are Python objects.

    Args:
        dsn: A ``postgresql://`` URI.
        min_size: Connections opened at once and kept open.
        max_size: Upper bound on open connections.
        application_name: Shown in ``pg_stat_activity``; use the service name.
        command_timeout: Seconds a statement may run before it is cancelled; None for no limit.
        statement_cache_size: Prepared statements kept per connection; 0 behind a
            transaction-pooling PgBouncer.
        max_inactive_connection_lifetime: Seconds after which an idle connection is closed.
        server_settings: Extra run-time parameters (e.g. ``search_path``); they override ours.
        init: Called on every new connection, after the json codecs are set.
    """
    # The session time zone is pinned so date_trunc and ::date on timestamptz bucket the same
    # way whatever the server's configuration says.
    settings = {"application_name": application_name, "TimeZone": "UTC"}
    settings.update(server_settings or {})

    async def setup(conn: asyncpg.Connection) -> None:
        await _set_json_codecs(conn)
        if init is not None:
            await init(conn)

    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache_size,
        max_inactive_connection_lifetime=max_inactive_connection_lifetime,
        server_settings=settings,
        init=setup,
        reset=_leave_session_as_is,
    )


async def _leave_session_as_is(conn: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's reset query, a round trip on every release, on
    the latency path of every unit of work: the pool still rolls back an open transaction
    and drops listener callbacks, and nothing here keeps session state past its use —
    session-level advisory locks go through :func:`session_lock` and the one ``LISTEN``
    terminates its connection when it cannot end cleanly."""


@asynccontextmanager
async def session_lock(pool: asyncpg.Pool, key: int, *, wait: bool) -> AsyncIterator[bool]:
    """Holds the session-level advisory lock ``key`` on a connection of ``pool`` for the
    block; yields whether it is held (``wait=False`` gives up at once when another session
    holds it). A connection that may still hold the lock after the block (the unlock
    failed or was cancelled) is terminated, so the lock ends with it rather than with
    whoever next takes the connection from the pool. (A backend terminated while it waited
    may still be granted the lock, and holds it until it finds its client gone: a moment.)"""
    async with pool.acquire() as conn:
        try:
            if wait:
                await conn.execute("SELECT pg_advisory_lock($1)", key)
                held = True
            else:
                held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
        except BaseException:
            # A cancelled lock call too: the server may have granted it all the same.
            conn.terminate()
            raise
        try:
            yield held
        finally:
            if held:
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)
                except BaseException:
                    conn.terminate()
                    raise


def dsn_with_database(dsn: str, database: str) -> str:
    """Returns the ``postgresql://`` URI ``dsn`` pointing at another database."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"expected a postgresql:// URI, got {dsn!r}")
    return urlunsplit(parts._replace(path=f"/{database}"))


class MigrationError(Exception):
    """A migration directory is inconsistent, or a migration failed to apply."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file of a schema's history."""

    version: int
    name: str
    checksum: str
    sql: str


def load_migrations(source: Traversable) -> list[Migration]:
    """Reads and checks the migration files in ``source``, ordered by version.

    Files not ending in ``.sql`` (``__init__.py``, a README) are ignored. A ``.sql`` file with
    a malformed name, a repeated version or a gap in the versions (which must run 1, 2, 3, …)
    raises :class:`MigrationError` naming the files.
    """
    if not source.is_dir():
        raise MigrationError(f"migrations directory {source} does not exist")
    migrations: list[Migration] = []
    for entry in source.iterdir():
        if not entry.is_file() or not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            raise MigrationError(
                f"migration file {entry.name} in {source} is not named NNNN_description.sql "
                "(four digits, then lower-case letters, digits and underscores)"
            )
        try:
            text = entry.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MigrationError(f"migration file {entry.name} is not UTF-8: {exc}") from exc
        # A checkout with CRLF line endings must not look like an edited migration.
        sql = text.replace("\r\n", "\n")
        migrations.append(
            Migration(
                version=int(match["version"]),
                name=entry.name,
                checksum=hashlib.sha256(sql.encode("utf-8")).hexdigest(),
                sql=sql,
            )
        )
    migrations.sort(key=lambda m: (m.version, m.name))
    for index, migration in enumerate(migrations):
        if index and migration.version == migrations[index - 1].version:
            raise MigrationError(
                f"migrations {migrations[index - 1].name} and {migration.name} in {source} "
                f"share version {migration.version}"
            )
        if migration.version != index + 1:
            raise MigrationError(
                f"migration {migration.name} in {source} should be version {index + 1:04d}: "
                "versions must start at 0001 and have no gaps"
            )
    return migrations


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"audience.migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(
    db: asyncpg.Pool | asyncpg.Connection,
    *,
    schema: str,
    migrations: Traversable,
) -> list[str]:
    """Brings ``schema`` up to date with the SQL files in ``migrations``.

    Creates the schema and ``<schema>.schema_migrations`` when missing, then applies each
    pending file in version order. Unqualified names in a file resolve to ``schema`` first
    (``search_path`` is ``<schema>, public`` while it runs).

    Each file runs in its own transaction, which holds a transaction-scoped advisory lock keyed
    on the schema and re-reads the applied versions under it: so racing processes apply every
    file exactly once, a file is all-or-nothing, a failure keeps the files before it (the next
    run resumes at the failed one), and a file can use what an earlier one created in ways
    Postgres forbids inside the creating transaction (a new enum value, for one).

    Args:
        db: A pool, or a connection that is not inside a transaction.
        schema: The service's schema, lower-case letters, digits and underscores.
        migrations: A directory (``pathlib.Path``) or an ``importlib.resources`` Traversable.

    Returns:
        The names of the files this call applied, in order; empty when up to date.

    Raises:
        MigrationError: The directory is inconsistent (see :func:`load_migrations`), an applied
            file was edited or renamed since, or a file failed to apply.
    """
    if not _SCHEMA_NAME.match(schema):
        raise MigrationError(
            f"schema name {schema!r} must be lower-case letters, digits and underscores"
        )
    files = load_migrations(migrations)
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await _migrate(conn, schema, files)
    if db.is_in_transaction():
        raise MigrationError(
            "migrate() needs a connection outside a transaction: each file commits on its own"
        )
    return await _migrate(db, schema, files)


async def _migrate(conn: asyncpg.Connection, schema: str, files: Sequence[Migration]) -> list[str]:
    quoted = f'"{schema}"'
    applied_now: list[str] = []
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
            if not applied_now:
                # Under the lock: CREATE ... IF NOT EXISTS is not safe against a concurrent create.
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations ("
                    " version integer PRIMARY KEY,"
                    " name text NOT NULL,"
                    " checksum text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
            rows = await conn.fetch(
                f"SELECT version, name, checksum FROM {quoted}.schema_migrations ORDER BY version"
            )
            applied = _check_applied(schema, files, rows)
            pending = next((m for m in files if m.version not in applied), None)
            if pending is None:
                break
            started = time.perf_counter()
            await conn.execute(f"SET LOCAL search_path TO {quoted}, public")
            try:
                await conn.execute(pending.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {pending.name} of schema {schema!r} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            await conn.execute(
                f"INSERT INTO {quoted}.schema_migrations (version, name, checksum)"
                " VALUES ($1, $2, $3)",
                pending.version,
                pending.name,
                pending.checksum,
            )
        applied_now.append(pending.name)
        _log.info(
            "applied migration %s to schema %s in %.0f ms",
            pending.name,
            schema,
            (time.perf_counter() - started) * 1000,
        )
    return applied_now


def _check_applied(
    schema: str, files: Sequence[Migration], rows: Sequence[Mapping[str, Any]]
) -> set[int]:
    by_version = {m.version: m for m in files}
    applied: set[int] = set()
    newer: list[str] = []
    for row in rows:
        version, name, checksum = row["version"], row["name"], row["checksum"]
        applied.add(version)
        migration = by_version.get(version)
        if migration is None:
            newer.append(name)
        elif migration.name != name or migration.checksum != checksum:
            raise MigrationError(
                f"migration {migration.name} of schema {schema!r} differs from what was applied "
                f"as {name} (checksum {checksum[:12]}, file now {migration.checksum[:12]}); "
                "applied migrations must not be edited: add a new one instead"
            )
    if newer:
        # An older release starting against a schema a newer one migrated: expected during a
        # rolling deploy, so it is reported rather than refused.
        _log.warning(
            "schema %s has migrations this code does not know: %s", schema, ", ".join(newer)
        )
    return applied
