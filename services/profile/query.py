"""QueryProfiles: the subjects of a dataset for which a rule is true, streamed by id.

The rule's SQL predicate (``audience.rules``) runs over the evaluation schema through a
server-side cursor in one read-only, repeatable-read transaction, so the whole answer
comes from one snapshot. The cursor returns every subject of the dataset in id order
(the primary key's order) with its id only when it matches, so progress is exact
(``scanned`` counts rows seen) while little more than the matches crosses the wire.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from audience.rules.compiler import CompiledRule
from audience.rules.sql import ImportedMembers, SqlQuery, SqlSegment

__all__ = ["ProfileQuery", "QueryProgress"]

SCHEMA = "profile"
# Rows per FETCH: large enough to amortise the round trip, small enough for steady progress.
_FETCH = 20_000
_JSON_PARAM = re.compile(r"\$(\d+)::jsonb(\[\])?")


@dataclass(frozen=True, slots=True)
class QueryProgress:
    """One step of a query: ids matched since the last step, and counts so far."""

    profile_ids: list[str] = field(default_factory=list)
    scanned: int = 0
    total: int = 0
    matched: int = 0


def _for_pool(query: SqlQuery) -> list[Any]:
    """The query's parameters as the pool's json codecs take them.

    The SQL compiler binds ``jsonb`` parameters as JSON text; the service's pool encodes
    Python values into JSON itself, so text would arrive as a JSON string. Those parameters
    are decoded here, to be encoded once by the pool.
    """
    params = list(query.params)
    for match in _JSON_PARAM.finditer(query.text):
        index = int(match.group(1)) - 1
        value = params[index]
        if match.group(2):
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                params[index] = [json.loads(item) for item in value]
        elif isinstance(value, str):
            params[index] = json.loads(value)
    return params


class ProfileQuery:
    """Runs compiled rules over the ``profiles`` table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def run(
        self,
        dataset: str,
        kind: str,
        compiled: CompiledRule,
        segments: Mapping[str, SqlSegment | ImportedMembers],
        *,
        now: int,
        limit: int,
        count_only: bool,
        chunk_size: int,
    ) -> AsyncIterator[QueryProgress]:
        """Yields matches in increasing id order, at most ``chunk_size`` per step, ending
        with a step whose ``scanned`` is the total when the whole dataset was read.

        Raises:
            ValueError: the rule refers to a segment ``segments`` lacks.
        """
        predicate = compiled.to_sql(now, schema=SCHEMA, segments=segments, alias="p")
        params = _for_pool(predicate)
        base = len(params)
        params += [dataset, kind]
        scope = f"p.dataset = ${base + 1}::text AND p.kind = ${base + 2}::text"
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            total = await conn.fetchval(
                f'SELECT count(*) FROM "{SCHEMA}".profiles AS p'
                " WHERE p.dataset = $1::text AND p.kind = $2::text",
                dataset,
                kind,
            )
            if count_only:
                matched = await conn.fetchval(
                    f'SELECT count(*) FROM "{SCHEMA}".profiles AS p'
                    f" WHERE {scope} AND {predicate.text}",
                    *params,
                )
                if limit:
                    matched = min(matched, limit)
                yield QueryProgress([], total, total, matched)
                return
            cursor = await conn.cursor(
                f"SELECT CASE WHEN {predicate.text} THEN p.profile_id END"
                f' FROM "{SCHEMA}".profiles AS p WHERE {scope} ORDER BY p.profile_id',
                *params,
            )
            scanned = matched = 0
            pending: list[str] = []
            while True:
                rows = await cursor.fetch(_FETCH)
                for row in rows:
                    scanned += 1
                    profile_id = row[0]
                    if profile_id is None:
                        continue
                    pending.append(profile_id)
                    matched += 1
                    if len(pending) >= chunk_size or (limit and matched >= limit):
                        yield QueryProgress(pending, scanned, max(total, scanned), matched)
                        pending = []
                    if limit and matched >= limit:
                        return
                # A step per fetch, matches or not, so a sparse rule still shows progress.
                yield QueryProgress(pending, scanned, max(total, scanned), matched)
                pending = []
                if len(rows) < _FETCH:
                    return
