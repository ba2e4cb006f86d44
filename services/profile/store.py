"""The profile service's tables (schema ``profile``, migrations in ``migrations/``).

Statements that change many rows take them as one array and ``unnest`` it, so a batch
costs one round trip per table rather than one per row. The wide and frequent ones take
an array of a composite type (migration 0007), one element per row: asyncpg checks each
element of an array in Python, and a row of dozens of columns as arrays cost dozens.
Methods that take a connection run inside the caller's transaction; the others open their
own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import asyncpg
from google.protobuf import duration_pb2

from audience.rules.values import datetime_from_micros
from audience.rules.view import EVALUATION_COLUMNS
from audience.v1 import profile_pb2
from services.profile.codec import (
    ACCOUNT,
    USER,
    account_from_row,
    evaluation_columns,
    profile_from_parts,
    state_blob,
)
from services.profile.domain.identity import Owner
from services.profile.domain.model import (
    AccountKey,
    AccountState,
    IdentityKey,
    ProfileKey,
    ProfileState,
)

__all__ = [
    "AGGREGATE_BACKFILLING",
    "AGGREGATE_READY",
    "EVALUATION_COLUMN_TYPES",
    "PROFILE_ROW",
    "EventRow",
    "ProfileStore",
    "identity_hash",
]

_log = logging.getLogger(__name__)

S = '"profile"'

AGGREGATE_BACKFILLING = 1
AGGREGATE_READY = 2

# The SQL type of each typed column of `profiles` (the evaluation schema's).
EVALUATION_COLUMN_TYPES: Mapping[str, str] = {
    "attributes": "text",
    "session_start": "timestamptz",
    "cart_value": "float8",
    "cart_item_count": "int8",
    "page_view_count": "int8",
    "landing_page": "text",
    "source": "text",
    "referrer": "text",
    "utm_source": "text",
    "utm_medium": "text",
    "utm_campaign": "text",
    "utm_term": "text",
    "utm_content": "text",
    "channel": "text",
    "visit_count": "int8",
    "is_new_visitor": "bool",
    "country": "text",
    "region": "text",
    "city": "text",
    "postal_code": "text",
    "latitude": "float8",
    "longitude": "float8",
    "weather_condition": "text",
    "temperature_celsius": "float8",
    "device_type": "text",
    "os": "text",
    "browser": "text",
    "first_seen": "timestamptz",
    "last_seen": "timestamptz",
    "lifetime_value": "float8",
    "order_count": "int8",
    "account_id": "text",
    "aggregates": "text",
}
_JSON_COLUMNS = frozenset({"attributes", "aggregates"})
_OWN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sequence", "int8"),
    ("known", "bool"),
    ("user_count", "int8"),
    ("event_count", "int8"),
    ("state", "bytea"),
    ("aggregates_expire", "timestamptz"),
)


def _write_statement() -> str:
    missing = [name for name in EVALUATION_COLUMNS if name not in EVALUATION_COLUMN_TYPES]
    if missing:
        raise RuntimeError(f"evaluation columns without a known SQL type: {missing}")
    sets = ", ".join(
        f"{name} = u.{name}::jsonb" if name in _JSON_COLUMNS else f"{name} = u.{name}"
        for name in _WRITTEN_COLUMNS
    )
    return (
        f"UPDATE {S}.profiles AS p SET {sets}, update_time = now() "
        f"FROM unnest($2::{S}.profile_row[]) AS u "
        "WHERE p.dataset = u.dataset AND p.kind = $1 AND p.profile_id = u.profile_id"
    )


_WRITTEN_COLUMNS = (*EVALUATION_COLUMNS, *(name for name, _ in _OWN_COLUMNS))
PROFILE_ROW: Sequence[tuple[str, str]] = (
    ("dataset", "text"),
    ("profile_id", "text"),
    *((name, EVALUATION_COLUMN_TYPES[name]) for name in EVALUATION_COLUMNS),
    *_OWN_COLUMNS,
)
"""The attributes of ``profile_row``, the rows :meth:`ProfileStore.write_profiles` passes
(migration 0007), in order."""
_WRITE_PROFILES = _write_statement()

_ROW_COLUMNS = (
    "p.sequence, p.attributes, p.account_id, p.first_seen, p.last_seen, p.lifetime_value,"
    " p.order_count, p.visit_count, p.event_count, p.user_count, p.state, p.aggregates_expire"
)


def identity_hash(dataset: str, kind: str, value: str) -> bytes:
    """The SHA-256 digest an erased identity is kept as."""
    return hashlib.sha256(f"{dataset}\x00{kind}\x00{value}".encode()).digest()


def profile_hash(dataset: str, profile_id: str) -> bytes:
    """The SHA-256 digest a retired profile's id is kept as."""
    return hashlib.sha256(f"{dataset}\x00{profile_id}".encode()).digest()


def _month(moment: datetime) -> int:
    return moment.year * 12 + moment.month - 1


def _month_start(month: int) -> datetime:
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC)


class EventRow(NamedTuple):
    """One event of the history, as stored: the attributes of ``event_row`` (migration
    0007), in order."""

    dataset: str
    occurred_at: datetime
    event_id: str
    profile_id: str | None
    account_id: str | None
    name: str
    payload: bytes


class ProfileStore:
    """Reads and writes the ``profile`` schema through a pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._partitions: set[int] | None = None

    # --- History partitions -------------------------------------------------------------

    async def ensure_partitions(self, moments: Iterable[datetime]) -> None:
        """Creates the monthly partitions of ``events`` that these instants need."""
        months = {_month(moment) for moment in moments}
        if self._partitions is None:
            rows = await self.pool.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                f" WHERE i.inhparent = '{S}.events'::regclass"
            )
            self._partitions = {
                int(row["relname"][7:11]) * 12 + int(row["relname"][11:13]) - 1
                for row in rows
                if row["relname"].startswith("events_")
            }
        for month in sorted(months - self._partitions):
            start, end = _month_start(month), _month_start(month + 1)
            name = f"events_{start.year:04d}{start.month:02d}"
            async with self.pool.acquire() as conn, conn.transaction():
                # Replicas may race to create the same month: serialise on a lock, re-check.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('profile.events'))")
                exists = await conn.fetchval("SELECT to_regclass($1)", f"profile.{name}")
                if exists is None:
                    await conn.execute(
                        f"CREATE TABLE {S}.{name} PARTITION OF {S}.events"
                        f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
                    )
                    _log.info("created history partition %s", name)
            self._partitions.add(month)

    # --- The unit of work of a batch (inside the caller's transaction) ---------------------

    async def identify(
        self,
        conn: asyncpg.Connection,
        keys: Iterable[IdentityKey],
        hashes: Sequence[tuple[str, bytes]],
    ) -> tuple[dict[IdentityKey, Owner], set[tuple[str, bytes]]]:
        """The owners of these identities and which of these ``(dataset, identity hash)``
        are erased, read in one statement and so at one instant. Read apart, an erasure
        could commit between the two: the hash not erased yet, the owner already gone, and
        the erased person's event would start a profile of its own. Read together, an
        erasure committed before shows as erased, and one committed after leaves an owner
        that the unit locks and finds gone."""
        unique = sorted(set(keys))
        if not unique and not hashes:
            return {}, set()
        rows = await conn.fetch(
            "SELECT i.dataset, i.type, i.value, i.profile_id, p.known,"
            f" NULL::bytea AS identity_hash FROM {S}.identities i"
            f" JOIN unnest($1::{S}.identity_key[]) AS k"
            " ON i.dataset = k.dataset AND i.type = k.type AND i.value = k.value"
            f" JOIN {S}.profiles p"
            " ON p.dataset = i.dataset AND p.kind = 'user' AND p.profile_id = i.profile_id"
            " UNION ALL"
            " SELECT e.dataset, NULL, NULL, NULL, NULL, e.identity_hash"
            f" FROM {S}.erased_identities e"
            f" JOIN unnest($2::{S}.erased_key[]) AS h"
            " ON e.dataset = h.dataset AND e.identity_hash = h.identity_hash",
            unique,
            hashes,
        )
        owners: dict[IdentityKey, Owner] = {}
        erased: set[tuple[str, bytes]] = set()
        for row in rows:
            digest = row["identity_hash"]
            if digest is None:
                owners[(row["dataset"], row["type"], row["value"])] = Owner(
                    row["profile_id"], row["known"]
                )
            else:
                erased.add((row["dataset"], bytes(digest)))
        return owners, erased

    async def count_suppressed(
        self, conn: asyncpg.Connection, counts: Mapping[tuple[str, bytes], int]
    ) -> None:
        if not counts:
            return
        keys = sorted(counts)
        await conn.execute(
            f"UPDATE {S}.erased_identities e SET suppressed_count = e.suppressed_count + u.n,"
            " last_suppress_time = now()"
            " FROM unnest($1::text[], $2::bytea[], $3::int8[]) AS u(dataset, identity_hash, n)"
            " WHERE e.dataset = u.dataset AND e.identity_hash = u.identity_hash",
            [dataset for dataset, _ in keys],
            [digest for _, digest in keys],
            [counts[key] for key in keys],
        )

    async def owners(
        self, conn: asyncpg.Connection, keys: Iterable[IdentityKey]
    ) -> dict[IdentityKey, Owner]:
        """The owners of these identities, with whether each owner is known."""
        found, _ = await self.identify(conn, keys, [])
        return found

    async def create(
        self, conn: asyncpg.Connection, kind: str, keys: Iterable[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        """Inserts empty rows to lock for new subjects; returns those this call inserted."""
        unique = sorted(set(keys))
        if not unique:
            return set()
        # A person who was erased or merged away before continues above that life's last
        # sequence (see ``retire``).
        rows = await conn.fetch(
            f"INSERT INTO {S}.profiles (dataset, kind, profile_id, sequence)"
            " SELECT k.dataset, $1, k.profile_id, coalesce(r.sequence, 0)"
            " FROM unnest($2::text[], $3::text[], $4::bytea[]) AS k(dataset, profile_id, digest)"
            f" LEFT JOIN {S}.retired_profiles r"
            "   ON r.dataset = k.dataset AND r.profile_hash = k.digest"
            " ORDER BY k.dataset, k.profile_id"
            " ON CONFLICT DO NOTHING RETURNING dataset, profile_id",
            kind,
            [key[0] for key in unique],
            [key[1] for key in unique],
            [profile_hash(*key) for key in unique],
        )
        return {(row["dataset"], row["profile_id"]) for row in rows}

    async def retire(
        self, conn: asyncpg.Connection, last: Iterable[tuple[ProfileKey, int]]
    ) -> None:
        """Keeps the last sequence of profiles that are gone (erased, merged away), so one
        created again under the same id continues above it."""
        found = sorted(last)
        if not found:
            return
        await conn.execute(
            f"INSERT INTO {S}.retired_profiles (dataset, profile_hash, sequence)"
            " SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[])"
            " ON CONFLICT (dataset, profile_hash)"
            " DO UPDATE SET sequence = greatest(retired_profiles.sequence, EXCLUDED.sequence)",
            [key[0] for key, _ in found],
            [profile_hash(*key) for key, _ in found],
            [sequence for _, sequence in found],
        )

    async def lock(
        self, conn: asyncpg.Connection, kind: str, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, bool]]:
        """Locks subjects' rows in key order; returns each found one's sequence and known flag."""
        unique = sorted(set(keys))
        if not unique:
            return {}
        rows = await conn.fetch(
            f"SELECT p.dataset, p.profile_id, p.sequence, p.known FROM {S}.profiles p"
            f" JOIN unnest($2::{S}.profile_key[]) AS k"
            " ON p.dataset = k.dataset AND p.profile_id = k.profile_id"
            " WHERE p.kind = $1 ORDER BY p.dataset, p.profile_id FOR UPDATE OF p",
            kind,
            unique,
        )
        return {
            (row["dataset"], row["profile_id"]): (row["sequence"], row["known"]) for row in rows
        }

    async def load_profiles(
        self,
        conn: asyncpg.Connection | asyncpg.Pool,
        keys: Iterable[ProfileKey],
        *,
        aggregates: bool = True,
    ) -> dict[ProfileKey, ProfileState]:
        """Reads profiles, with their aggregates unless ``aggregates`` is false."""
        unique = sorted(set(keys))
        if not unique:
            return {}
        document = ", p.aggregates" if aggregates else ""
        rows = await conn.fetch(
            f"SELECT p.dataset, p.profile_id, {_ROW_COLUMNS}{document} FROM {S}.profiles p"
            f" JOIN unnest($1::{S}.profile_key[]) AS k"
            " ON p.dataset = k.dataset AND p.profile_id = k.profile_id WHERE p.kind = 'user'",
            unique,
        )
        return {
            (row["dataset"], row["profile_id"]): profile_from_parts(
                row["dataset"], row["profile_id"], row, row["aggregates"] if aggregates else None
            )
            for row in rows
        }

    async def load_accounts(
        self, conn: asyncpg.Connection | asyncpg.Pool, keys: Iterable[AccountKey]
    ) -> dict[AccountKey, AccountState]:
        unique = sorted(set(keys))
        if not unique:
            return {}
        rows = await conn.fetch(
            f"SELECT p.dataset, p.profile_id, {_ROW_COLUMNS} FROM {S}.profiles p"
            f" JOIN unnest($1::{S}.profile_key[]) AS k"
            " ON p.dataset = k.dataset AND p.profile_id = k.profile_id WHERE p.kind = 'account'",
            unique,
        )
        return {
            (row["dataset"], row["profile_id"]): account_from_row(
                row["dataset"], row["profile_id"], row
            )
            for row in rows
        }

    async def catalog_versions(
        self, conn: asyncpg.Connection, datasets: Iterable[str]
    ) -> dict[str, int]:
        rows = await conn.fetch(
            f"SELECT dataset, version FROM {S}.aggregate_catalogs WHERE dataset = ANY($1::text[])",
            sorted(set(datasets)),
        )
        return {row["dataset"]: row["version"] for row in rows}

    async def specs(
        self, conn: asyncpg.Connection | asyncpg.Pool, dataset: str
    ) -> tuple[int, list[profile_pb2.AggregateSpec]]:
        """A dataset's catalogue version and registered aggregates, with their states."""
        version = await conn.fetchval(
            f"SELECT version FROM {S}.aggregate_catalogs WHERE dataset = $1", dataset
        )
        rows = await conn.fetch(
            f"SELECT spec, state FROM {S}.aggregate_specs WHERE dataset = $1 ORDER BY aggregate_id",
            dataset,
        )
        specs = []
        for row in rows:
            spec = profile_pb2.AggregateSpec.FromString(row["spec"])
            spec.state = row["state"]
            specs.append(spec)
        return version or 0, specs

    async def insert_events(
        self, conn: asyncpg.Connection, rows: Sequence[EventRow]
    ) -> set[tuple[str, str, datetime]]:
        """Records events in the history; returns the keys of those not recorded before."""
        if not rows:
            return set()
        inserted = await conn.fetch(
            f"INSERT INTO {S}.events"
            " (dataset, occurred_at, event_id, profile_id, account_id, name, payload)"
            f" SELECT * FROM unnest($1::{S}.event_row[])"
            " ON CONFLICT DO NOTHING RETURNING dataset, event_id, occurred_at",
            rows,
        )
        return {(row["dataset"], row["event_id"], row["occurred_at"]) for row in inserted}

    async def link(
        self, conn: asyncpg.Connection, links: Mapping[IdentityKey, ProfileKey]
    ) -> list[IdentityKey]:
        """Links identities to profiles; returns those another profile already owns."""
        if not links:
            return []
        keys = sorted(links)
        inserted = await conn.fetch(
            f"INSERT INTO {S}.identities (dataset, type, value, profile_id)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
            " ON CONFLICT DO NOTHING RETURNING dataset, type, value",
            [key[0] for key in keys],
            [key[1] for key in keys],
            [key[2] for key in keys],
            [links[key][1] for key in keys],
        )
        done = {(row["dataset"], row["type"], row["value"]) for row in inserted}
        rest = [key for key in keys if key not in done]
        if not rest:
            return []
        owned = await self.owners(conn, rest)
        return [key for key in rest if key not in owned or owned[key].profile_id != links[key][1]]

    async def record_merges(
        self,
        conn: asyncpg.Connection,
        merges: Sequence[tuple[ProfileKey, ProfileKey, str, datetime, int]],
    ) -> None:
        """Moves sources' identities and history to their targets, deletes the sources (and
        their buckets), and records the merges (reason, time and the sequence of the
        source's MERGED change)."""
        if not merges:
            return
        datasets = [source[0] for source, *_ in merges]
        sources = [source[1] for source, *_ in merges]
        targets = [target[1] for _, target, *_ in merges]
        await conn.execute(
            f"UPDATE {S}.identities i SET profile_id = m.target"
            " FROM unnest($1::text[], $2::text[], $3::text[]) AS m(dataset, source, target)"
            " WHERE i.dataset = m.dataset AND i.profile_id = m.source",
            datasets,
            sources,
            targets,
        )
        await conn.execute(
            f"UPDATE {S}.events e SET profile_id = m.target"
            " FROM unnest($1::text[], $2::text[], $3::text[]) AS m(dataset, source, target)"
            " WHERE e.dataset = m.dataset AND e.profile_id = m.source",
            datasets,
            sources,
            targets,
        )
        await conn.execute(
            f"DELETE FROM {S}.profiles p USING unnest($1::text[], $2::text[]) AS m(dataset, source)"
            " WHERE p.dataset = m.dataset AND p.kind = 'user' AND p.profile_id = m.source",
            datasets,
            sources,
        )
        await conn.execute(
            f"INSERT INTO {S}.merges (dataset, source, target, reason, merge_time, sequence)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
            " $5::timestamptz[], $6::int8[]) ON CONFLICT DO NOTHING",
            datasets,
            sources,
            targets,
            [reason for _, _, reason, _, _ in merges],
            [moment for _, _, _, moment, _ in merges],
            [sequence for *_, sequence in merges],
        )

    async def merges_caused_by(
        self, conn: asyncpg.Connection, events: Sequence[tuple[str, str]]
    ) -> list[tuple[ProfileKey, ProfileKey, int]]:
        """The merges that the events ``(dataset, event id)`` caused: source, target and
        the sequence of the source's MERGED change."""
        if not events:
            return []
        rows = await conn.fetch(
            f"SELECT m.dataset, m.source, m.target, m.sequence FROM {S}.merges m"
            " JOIN unnest($1::text[], $2::text[]) AS e(dataset, event_id)"
            " ON m.dataset = e.dataset AND m.reason = e.event_id"
            " WHERE m.sequence IS NOT NULL",
            [dataset for dataset, _ in events],
            [event_id for _, event_id in events],
        )
        return [
            ((row["dataset"], row["source"]), (row["dataset"], row["target"]), row["sequence"])
            for row in rows
        ]

    async def write_profiles(
        self, conn: asyncpg.Connection, states: Sequence[ProfileState]
    ) -> None:
        """Writes profiles' rows (sequence included); the rows exist and are locked."""
        if not states:
            return
        rows = []
        for state in states:
            columns = evaluation_columns(state)
            rows.append(
                (
                    state.dataset,
                    state.profile_id,
                    *map(columns.__getitem__, EVALUATION_COLUMNS),
                    state.sequence,
                    state.known,
                    0,
                    state.event_count,
                    state_blob(state),
                    None if state.expire is None else datetime_from_micros(state.expire),
                )
            )
        await conn.execute(_WRITE_PROFILES, USER, rows)

    async def write_accounts(
        self, conn: asyncpg.Connection, accounts: Sequence[AccountState]
    ) -> None:
        if not accounts:
            return
        rows = []
        for account in accounts:
            columns = evaluation_columns(account)
            rows.append(
                (
                    account.dataset,
                    account.account_id,
                    *map(columns.__getitem__, EVALUATION_COLUMNS),
                    account.sequence,
                    False,
                    account.user_count,
                    0,
                    None,
                    None,
                )
            )
        await conn.execute(_WRITE_PROFILES, ACCOUNT, rows)


@dataclass(frozen=True, slots=True)
class Backfill:
    """A backfill in progress: the aggregates being filled, and the last profile done."""

    dataset: str
    aggregate_ids: list[str]
    cursor: str | None


class Registry:
    """The aggregate catalogue and its backfills (``aggregate_specs``, ``backfills``)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def register(
        self, dataset: str, specs: Sequence[profile_pb2.AggregateSpec]
    ) -> list[profile_pb2.AggregateSpec]:
        """Stores canonical specs (with ids): new ones, and known ones whose retention grows,
        are filled again from the history. Returns the stored specs, in request order."""
        async with self.pool.acquire() as conn, conn.transaction():
            # One registration per dataset at a time: versions and backfills stay in step.
            await conn.execute(
                f"INSERT INTO {S}.aggregate_catalogs (dataset, version) VALUES ($1, 0)"
                " ON CONFLICT DO NOTHING",
                dataset,
            )
            await conn.fetchval(
                f"SELECT version FROM {S}.aggregate_catalogs WHERE dataset = $1 FOR UPDATE",
                dataset,
            )
            ids = sorted({spec.aggregate_id for spec in specs})
            rows = await conn.fetch(
                f"SELECT aggregate_id, spec, state FROM {S}.aggregate_specs"
                " WHERE dataset = $1 AND aggregate_id = ANY($2::text[])",
                dataset,
                ids,
            )
            stored = {row["aggregate_id"]: row for row in rows}
            changed: dict[str, profile_pb2.AggregateSpec] = {}
            result: dict[str, profile_pb2.AggregateSpec] = {}
            for spec in specs:
                if spec.aggregate_id in result:
                    current = result[spec.aggregate_id]
                elif spec.aggregate_id in stored:
                    current = profile_pb2.AggregateSpec.FromString(
                        stored[spec.aggregate_id]["spec"]
                    )
                    current.state = stored[spec.aggregate_id]["state"]
                else:
                    current = profile_pb2.AggregateSpec()
                    current.CopyFrom(spec)
                    current.state = AGGREGATE_BACKFILLING  # type: ignore[assignment]
                    changed[spec.aggregate_id] = current
                if _longer(spec.retention, current.retention):
                    current.retention.CopyFrom(spec.retention)
                    current.state = AGGREGATE_BACKFILLING  # type: ignore[assignment]
                    changed[spec.aggregate_id] = current
                result[spec.aggregate_id] = current
            if changed:
                await conn.executemany(
                    f"INSERT INTO {S}.aggregate_specs"
                    " (dataset, aggregate_id, event_name, spec, state) VALUES ($1, $2, $3, $4, $5)"
                    " ON CONFLICT (dataset, aggregate_id) DO UPDATE SET spec = EXCLUDED.spec,"
                    " state = EXCLUDED.state, ready_time = NULL",
                    [
                        (dataset, key, spec.event_name, _without_state(spec), spec.state)
                        for key, spec in sorted(changed.items())
                    ],
                )
                await conn.execute(
                    f"UPDATE {S}.aggregate_catalogs SET version = version + 1 WHERE dataset = $1",
                    dataset,
                )
                # Start over from the first profile with every aggregate still to fill.
                await conn.execute(
                    f"INSERT INTO {S}.backfills (dataset, aggregate_ids) VALUES ($1, $2)"
                    " ON CONFLICT (dataset) DO UPDATE SET aggregate_ids = ARRAY("
                    "SELECT DISTINCT unnest(backfills.aggregate_ids || EXCLUDED.aggregate_ids)"
                    " ORDER BY 1), cursor = NULL, done_count = 0, start_time = now()",
                    dataset,
                    sorted(changed),
                )
            return [result[spec.aggregate_id] for spec in specs]

    async def page(self, dataset: str, after: str, limit: int) -> list[profile_pb2.AggregateSpec]:
        rows = await self.pool.fetch(
            f"SELECT spec, state FROM {S}.aggregate_specs WHERE dataset = $1"
            " AND aggregate_id > $2 ORDER BY aggregate_id LIMIT $3",
            dataset,
            after,
            limit,
        )
        specs = []
        for row in rows:
            spec = profile_pb2.AggregateSpec.FromString(row["spec"])
            spec.state = row["state"]
            specs.append(spec)
        return specs

    async def claim(self, conn: asyncpg.Connection) -> Backfill | None:
        """Locks the oldest backfill no other replica holds, if any."""
        row = await conn.fetchrow(
            f"SELECT dataset, aggregate_ids, cursor FROM {S}.backfills"
            " ORDER BY start_time LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
        if row is None:
            return None
        return Backfill(row["dataset"], list(row["aggregate_ids"]), row["cursor"])

    async def backfill_specs(
        self, conn: asyncpg.Connection, dataset: str, ids: Sequence[str]
    ) -> list[profile_pb2.AggregateSpec]:
        rows = await conn.fetch(
            f"SELECT spec FROM {S}.aggregate_specs WHERE dataset = $1"
            " AND aggregate_id = ANY($2::text[]) ORDER BY aggregate_id",
            dataset,
            list(ids),
        )
        return [profile_pb2.AggregateSpec.FromString(row["spec"]) for row in rows]

    async def lock_page(
        self, conn: asyncpg.Connection, dataset: str, cursor: str | None, limit: int
    ) -> list[tuple[str, int]]:
        """Locks the next profiles after ``cursor`` in id order; returns ids and sequences."""
        rows = await conn.fetch(
            f"SELECT profile_id, sequence FROM {S}.profiles WHERE dataset = $1 AND kind = 'user'"
            " AND profile_id > $2 ORDER BY profile_id LIMIT $3 FOR UPDATE",
            dataset,
            cursor or "",
            limit,
        )
        return [(row["profile_id"], row["sequence"]) for row in rows]

    async def history(
        self,
        conn: asyncpg.Connection,
        dataset: str,
        profile_ids: Sequence[str],
        names: Sequence[str] | None,
    ) -> dict[str, list[bytes]]:
        """Profiles' events, oldest first; only those named ``names`` unless it is None."""
        rows = await conn.fetch(
            f"SELECT profile_id, payload FROM {S}.events WHERE dataset = $1"
            " AND profile_id = ANY($2::text[]) AND ($3::text[] IS NULL OR name = ANY($3::text[]))"
            " ORDER BY profile_id, occurred_at, event_id",
            dataset,
            list(profile_ids),
            None if names is None else list(names),
        )
        found: dict[str, list[bytes]] = {}
        for row in rows:
            found.setdefault(row["profile_id"], []).append(row["payload"])
        return found

    async def advance(self, conn: asyncpg.Connection, dataset: str, cursor: str, done: int) -> None:
        await conn.execute(
            f"UPDATE {S}.backfills SET cursor = $2, done_count = done_count + $3"
            " WHERE dataset = $1",
            dataset,
            cursor,
            done,
        )

    async def expiring(self) -> dict[str, list[tuple[str, int]]]:
        """Per dataset, the aggregates whose buckets expire: ``(aggregate_id, retention)``
        in microseconds. All-time aggregates (width 0) never expire."""
        rows = await self.pool.fetch(
            f"SELECT dataset, aggregate_id, spec FROM {S}.aggregate_specs"
            " ORDER BY dataset, aggregate_id"
        )
        found: dict[str, list[tuple[str, int]]] = {}
        for row in rows:
            spec = profile_pb2.AggregateSpec.FromString(row["spec"])
            retention = _micros(spec.retention)
            if retention and _micros(spec.bucket_width):
                found.setdefault(row["dataset"], []).append((row["aggregate_id"], retention))
        return found

    async def sweep_expired(
        self, expiring: Mapping[str, Mapping[str, int]], now: int, limit: int
    ) -> tuple[int, int]:
        """Drops the buckets past retention from up to ``limit`` profiles whose first expiry
        has passed (``aggregates_expire``), and sets it again. Returns how many profiles
        were read and how many buckets were dropped.

        Args:
            expiring: per dataset, the retention of each aggregate whose buckets expire
                (microseconds).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            # Rows a unit holds are left for the next sweep: no waiting, and so no deadlock
            # with units, which lock in key order.
            rows = await conn.fetch(
                f"SELECT dataset, profile_id, aggregates FROM {S}.profiles"
                " WHERE aggregates_expire < $1 ORDER BY aggregates_expire LIMIT $2"
                " FOR UPDATE SKIP LOCKED",
                datetime_from_micros(now),
                limit,
            )
            dropped = 0
            updates: list[tuple[str, str, str, datetime | None]] = []
            for row in rows:
                retentions = expiring.get(row["dataset"], {})
                kept: dict[str, list[Any]] = {}
                expire: int | None = None
                for aggregate_id, buckets in row["aggregates"].items():
                    retention = retentions.get(aggregate_id, 0)
                    if retention:
                        # Buckets are in start order: the first one left expires first.
                        fresh = [b for b in buckets if b[0] + retention >= now]
                        dropped += len(buckets) - len(fresh)
                        if fresh and (expire is None or fresh[0][0] + retention < expire):
                            expire = fresh[0][0] + retention
                        buckets = fresh
                    if buckets:
                        kept[aggregate_id] = buckets
                updates.append(
                    (
                        row["dataset"],
                        row["profile_id"],
                        json.dumps(kept, ensure_ascii=False, separators=(",", ":")),
                        None if expire is None else datetime_from_micros(expire),
                    )
                )
            if updates:
                await conn.execute(
                    f"UPDATE {S}.profiles p SET aggregates = u.document::jsonb,"
                    " aggregates_expire = u.expire"
                    " FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])"
                    " AS u(dataset, profile_id, document, expire)"
                    " WHERE p.dataset = u.dataset AND p.kind = 'user'"
                    " AND p.profile_id = u.profile_id",
                    [update[0] for update in updates],
                    [update[1] for update in updates],
                    [update[2] for update in updates],
                    [update[3] for update in updates],
                )
            return len(rows), dropped

    async def finish(self, conn: asyncpg.Connection, backfill: Backfill) -> None:
        await conn.execute(
            f"UPDATE {S}.aggregate_specs SET state = $3, ready_time = now()"
            " WHERE dataset = $1 AND aggregate_id = ANY($2::text[])",
            backfill.dataset,
            backfill.aggregate_ids,
            AGGREGATE_READY,
        )
        await conn.execute(f"DELETE FROM {S}.backfills WHERE dataset = $1", backfill.dataset)


def _micros(duration: duration_pb2.Duration) -> int:
    return duration.seconds * 1_000_000 + duration.nanos // 1000


def _longer(new: duration_pb2.Duration, old: duration_pb2.Duration) -> bool:
    """Whether retention ``new`` keeps more than ``old`` (zero keeps everything)."""
    new_micros, old_micros = _micros(new), _micros(old)
    if old_micros == 0:
        return False
    return new_micros == 0 or new_micros > old_micros


def _without_state(spec: profile_pb2.AggregateSpec) -> bytes:
    copy = profile_pb2.AggregateSpec()
    copy.CopyFrom(spec)
    copy.ClearField("state")
    return copy.SerializeToString()


class Reader:
    """The reads behind the service's RPCs, outside any unit of work."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def owner(self, dataset: str, kind: str, value: str) -> str | None:
        result: str | None = await self.pool.fetchval(
            f"SELECT profile_id FROM {S}.identities WHERE dataset = $1 AND type = $2"
            " AND value = $3",
            dataset,
            kind,
            value,
        )
        return result

    async def merged_into(self, dataset: str, profile_id: str) -> str | None:
        result: str | None = await self.pool.fetchval(
            f"SELECT target FROM {S}.merges WHERE dataset = $1 AND source = $2"
            " ORDER BY merge_time DESC LIMIT 1",
            dataset,
            profile_id,
        )
        return result

    async def events(
        self,
        dataset: str,
        profile_id: str,
        *,
        limit: int,
        name: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[tuple[datetime, str, bytes]]:
        """A profile's events, newest first: ``(occurred_at, event_id, payload)``."""
        rows = await self.pool.fetch(
            f"SELECT occurred_at, event_id, payload FROM {S}.events"
            " WHERE dataset = $1 AND profile_id = $2"
            " AND ($3::text IS NULL OR name = $3)"
            " AND ($4::timestamptz IS NULL OR occurred_at >= $4)"
            " AND ($5::timestamptz IS NULL OR occurred_at < $5)"
            " AND ($6::timestamptz IS NULL OR (occurred_at, event_id) < ($6, $7::text))"
            " ORDER BY occurred_at DESC, event_id DESC LIMIT $8",
            dataset,
            profile_id,
            name,
            start,
            end,
            None if before is None else before[0],
            None if before is None else before[1],
            limit,
        )
        return [(row["occurred_at"], row["event_id"], row["payload"]) for row in rows]

    async def account_users(
        self, dataset: str, account_id: str, after: str, limit: int
    ) -> list[str]:
        rows = await self.pool.fetch(
            f"SELECT profile_id FROM {S}.profiles WHERE dataset = $1 AND kind = 'user'"
            " AND account_id = $2 AND profile_id > $3 ORDER BY profile_id LIMIT $4",
            dataset,
            account_id,
            after,
            limit,
        )
        return [row["profile_id"] for row in rows]


class Eraser:
    """Erasure (GDPR) and the release of erased identities."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def erase(self, conn: asyncpg.Connection, state: ProfileState, moment: datetime) -> int:
        """Deletes every trace of a locked profile and records its identities as erased;
        returns how many events were deleted."""
        dataset, profile_id = state.dataset, state.profile_id
        identities = set(state.identities)
        identities.update((kind, value) for kind, value in await self._identities(conn, state))
        deleted = await conn.fetchval(
            f"WITH gone AS (DELETE FROM {S}.events WHERE dataset = $1 AND profile_id = $2"
            " RETURNING 1) SELECT count(*) FROM gone",
            dataset,
            profile_id,
        )
        await conn.execute(
            f"DELETE FROM {S}.identities WHERE dataset = $1 AND profile_id = $2",
            dataset,
            profile_id,
        )
        merged = [profile_id, *state.merged_profiles]
        await conn.execute(
            f"DELETE FROM {S}.merges WHERE dataset = $1"
            " AND (source = ANY($2::text[]) OR target = ANY($2::text[]))",
            dataset,
            merged,
        )
        # The aggregates go with the row.
        await conn.execute(
            f"DELETE FROM {S}.profiles WHERE dataset = $1 AND kind = 'user' AND profile_id = $2",
            dataset,
            profile_id,
        )
        hashes = sorted(identity_hash(dataset, kind, value) for kind, value in identities)
        await conn.execute(
            f"INSERT INTO {S}.erased_identities (dataset, identity_hash, erase_time)"
            " SELECT $1, h, $3 FROM unnest($2::bytea[]) AS h"
            " ON CONFLICT (dataset, identity_hash) DO UPDATE SET erase_time = EXCLUDED.erase_time",
            dataset,
            hashes,
            moment,
        )
        await conn.execute(
            f"INSERT INTO {S}.erasures (dataset, erase_time, identity_hashes, deleted_event_count)"
            " VALUES ($1, $2, $3, $4)",
            dataset,
            moment,
            hashes,
            deleted,
        )
        return int(deleted)

    async def _identities(
        self, conn: asyncpg.Connection, state: ProfileState
    ) -> list[tuple[str, str]]:
        rows = await conn.fetch(
            f"SELECT type, value FROM {S}.identities WHERE dataset = $1 AND profile_id = $2",
            state.dataset,
            state.profile_id,
        )
        return [(row["type"], row["value"]) for row in rows]

    async def release(self, dataset: str, hashes: Sequence[bytes]) -> int:
        released = await self.pool.fetchval(
            f"WITH gone AS (DELETE FROM {S}.erased_identities WHERE dataset = $1"
            " AND identity_hash = ANY($2::bytea[]) RETURNING 1) SELECT count(*) FROM gone",
            dataset,
            list(hashes),
        )
        return int(released)
