"""The profile service's migrations give the rules package's evaluation schema, column for
column, and carry the buckets of the first schema over into the aggregates document."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import AsyncIterator
from importlib.resources import as_file, files
from pathlib import Path

import asyncpg
import pytest

from audience import db
from audience.rules import BucketState, bucket_from_json, evaluation_schema_ddl
from audience.rules.values import datetime_from_micros
from services.profile.store import PROFILE_ROW, EventRow

pytestmark = pytest.mark.integration

_COLUMNS = (
    "SELECT table_name, column_name, data_type, collation_name, is_nullable, column_default"
    " FROM information_schema.columns WHERE table_schema = $1"
)
_INDEXES = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1"
_ATTRIBUTES = (
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute AS a"
    " WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped"
    " ORDER BY a.attnum"
)


@pytest.fixture
async def connection(fresh_postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database of its own, the profile service's migrations applied."""
    connection = await asyncpg.connect(fresh_postgres_dsn)
    try:
        await db.migrate(
            connection, schema="profile", migrations=files("services.profile") / "migrations"
        )
        yield connection
    finally:
        await connection.close()


async def test_the_migrated_schema_has_every_column_and_index_of_the_evaluation_schema(
    connection: asyncpg.Connection,
) -> None:
    await connection.execute('CREATE SCHEMA "evaluation"')
    await connection.execute(evaluation_schema_ddl("evaluation"))
    wanted = {tuple(row) for row in await connection.fetch(_COLUMNS, "evaluation")}
    found = {tuple(row) for row in await connection.fetch(_COLUMNS, "profile")}
    assert wanted <= found
    assert {row[0] for row in wanted} == {"profiles"}
    indexes = {
        row["indexname"]: row["indexdef"].replace("evaluation.", "profile.")
        for row in await connection.fetch(_INDEXES, "evaluation")
    }
    migrated = {
        row["indexname"]: row["indexdef"] for row in await connection.fetch(_INDEXES, "profile")
    }
    assert {name: migrated.get(name) for name in indexes} == indexes


async def test_the_row_types_of_the_bulk_writes_are_the_rows_the_store_builds(
    connection: asyncpg.Connection,
) -> None:
    names = [name for name, _ in PROFILE_ROW]
    types = await connection.fetchval(
        "SELECT array_agg(format_type(t::regtype, NULL) ORDER BY n)"
        " FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n)",
        [kind for _, kind in PROFILE_ROW],
    )
    profile_row = await connection.fetch(_ATTRIBUTES, "profile.profile_row")
    assert [tuple(row) for row in profile_row] == list(zip(names, types, strict=True))
    # An event row is inserted into the history as it is: the same columns, same types.
    event_row = await connection.fetch(_ATTRIBUTES, "profile.event_row")
    events = {
        row["attname"]: tuple(row) for row in await connection.fetch(_ATTRIBUTES, "profile.events")
    }
    assert [tuple(row) for row in event_row] == [events[name] for name in EventRow._fields]


async def test_the_aggregates_document_is_compressed_with_lz4_where_the_server_has_it(
    connection: asyncpg.Connection,
) -> None:
    offered = await connection.fetchval(
        "SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'"
    )
    method = await connection.fetchval(
        "SELECT attcompression::text FROM pg_attribute"
        " WHERE attrelid = 'profile.profiles'::regclass AND attname = 'aggregates'"
    )
    # '' is the server's default (pglz unless configured otherwise), 'l' is lz4.
    assert method == ("l" if "lz4" in offered else "")
    await connection.execute(
        "INSERT INTO profile.profiles (dataset, kind, profile_id, aggregates)"
        " VALUES ('d', 'user', 'u1', $1::jsonb)",
        json.dumps({f"agg_{n}": [[n, 1, 0.0, None, None, n, n]] for n in range(500)}),
    )
    written = await connection.fetchval(
        "SELECT pg_column_compression(aggregates) FROM profile.profiles"
    )
    assert written == ("lz4" if "lz4" in offered else "pglz")


async def test_buckets_of_the_first_schema_move_into_the_aggregates_document(
    fresh_postgres_dsn: str, tmp_path: Path
) -> None:
    with as_file(files("services.profile") / "migrations") as folder:
        first = tmp_path / "first"
        first.mkdir()
        shutil.copy(Path(folder) / "0001_profiles.sql", first / "0001_profiles.sql")
        connection = await asyncpg.connect(fresh_postgres_dsn)
        try:
            await db.migrate(connection, schema="profile", migrations=first)
            await connection.execute(
                "INSERT INTO profile.profiles (dataset, kind, profile_id)"
                " VALUES ('d', 'user', 'u1'), ('d', 'user', 'u2')"
            )
            buckets = {
                "agg_b": [
                    BucketState(0, 2, math.inf, 0.1, 1e16, 5, 7, ("s:a", "n:1.0")),
                ],
                "agg_a": [
                    BucketState(3_600_000_000, 1, 0.0, None, None, 3_600_000_001, None),
                    BucketState(7_200_000_000, 4, -2.5, -1.0, 0.5, None, 7_200_000_009),
                ],
            }
            await connection.executemany(
                "INSERT INTO profile.aggregate_buckets (dataset, kind, profile_id, aggregate_id,"
                " bucket_start, count, sum, min, max, first_time, last_time, distinct_values)"
                " VALUES ('d', 'user', 'u1', $1, $2, $3, $4, $5, $6, $7, $8, $9)",
                [
                    (
                        aggregate,
                        datetime_from_micros(b.start),
                        b.count,
                        b.sum,
                        b.min,
                        b.max,
                        None if b.first_time is None else datetime_from_micros(b.first_time),
                        None if b.last_time is None else datetime_from_micros(b.last_time),
                        list(b.distinct_values),
                    )
                    for aggregate, series in buckets.items()
                    for b in series
                ],
            )
            applied = await db.migrate(connection, schema="profile", migrations=Path(folder))
            assert applied == [
                "0002_aggregates_document.sql",
                "0003_aggregates_lz4.sql",
                "0004_merge_sequences.sql",
                "0005_outbox.sql",
                "0006_retired_profiles.sql",
                "0007_row_types.sql",
            ]
            rows = {
                row["profile_id"]: row
                for row in await connection.fetch(
                    "SELECT profile_id, aggregates::text AS document, aggregates_expire"
                    " FROM profile.profiles"
                )
            }
        finally:
            await connection.close()
    document = json.loads(rows["u1"]["document"])
    assert {
        aggregate: [bucket_from_json(item) for item in items]
        for aggregate, items in document.items()
    } == buckets
    assert rows["u1"]["aggregates_expire"] is not None
    assert (json.loads(rows["u2"]["document"]), rows["u2"]["aggregates_expire"]) == ({}, None)
