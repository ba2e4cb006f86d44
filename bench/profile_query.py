"""Benchmark: QueryProfiles (a rule's SQL predicate) over a million profiles.

    python -m bench.profile_query [--profiles 1000000] [--other-aggregates 8] [--quick]

The profile service's schema is migrated into a scratch database and filled straight from
SQL with ``--profiles`` user profiles: an attribute ``score`` (0–99), a country (half
``US``), a cart value (0–199) and, for every other profile, three hourly buckets of a
7-day page-view count and three of a 30-day product-view count, plus ``--other-aggregates``
further aggregates of three buckets each (so a profile carries what a busy catalogue of
aggregates leaves, not only what the rule reads). Then each rule below runs through the
service's own query path (``ProfileQuery``, in this process): once counting only, once
streaming the matching ids in chunks of 10,000 as QueryProfiles does.

PostgreSQL is ``AUDIENCE_POSTGRES_DSN`` (a superuser DSN: a scratch database is made and
dropped), or an embedded server when unset. The last line printed is JSON with each rule's
seconds, and ``profiles_per_s`` of the slowest rule streamed. Goal: every rule over
1,000,000 profiles in ≤ 10 s (the segment engine's backfill budget), i.e. ≥ 100,000
profiles/s whatever ``--profiles`` is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from audience import db
from audience.rules import compile_rule, parse_rule
from audience.rules.aggregates import HOUR
from bench._suite import log, parse_options, scratch_database, servers
from services.profile.query import ProfileQuery

DATASET = "bench"
RULES = {
    "attribute": "attributes.score >= 70",
    "cart_and_country": 'cart.value < 100 and location.country = "US"',
    "count_7_days": 'count(event "page_view", last 7 days) >= 6',
    "country_then_count_30_days": (
        'location.country = "US" and count(event "product_view", last 30 days) >= 2'
    ),
    "sum_30_days": 'sum(price, event "product_view", last 30 days) > 9',
}


def _spec_id(text: str) -> str:
    (spec,) = compile_rule(parse_rule(text)).aggregates
    return spec.aggregate_id


async def _seed(pool: Any, profiles: int, others: int, now: int) -> None:
    page_views = _spec_id(RULES["count_7_days"])
    product_views = _spec_id('count(event "product_view", last 30 days) >= 2')
    prices = _spec_id(RULES["sum_30_days"])
    await pool.execute(
        "INSERT INTO profile.profiles (dataset, kind, profile_id, attributes, country,"
        " cart_value, last_seen)"
        " SELECT $1, 'user', 'p' || lpad(n::text, 7, '0'),"
        " jsonb_build_object('score', (n::bigint * 7919 % 100)::float8),"
        " CASE WHEN n % 2 = 0 THEN 'US' ELSE 'FR' END, (n % 200)::float8, now()"
        " FROM generate_series(0, $2 - 1) AS n",
        DATASET,
        profiles,
    )
    # Three hourly buckets per aggregate, the newest in the current hour: `a` numbers the
    # aggregate, `j` the bucket; each bucket as `audience.rules.aggregates_json` writes it.
    await pool.execute(
        "UPDATE profile.profiles AS p SET aggregates = d.document FROM ("
        " SELECT n, jsonb_object_agg(CASE a WHEN 0 THEN $3 WHEN 1 THEN $4 WHEN 2 THEN $5"
        "  ELSE 'agg_other_' || lpad(((n + a) % 1000)::text, 14, '0') END,"
        "  (SELECT jsonb_agg(jsonb_build_array(s - s % $7::int8, c,"
        "    CASE a WHEN 2 THEN 1.25 * c ELSE 0.0 END, CASE a WHEN 2 THEN 1.25 END,"
        "    CASE a WHEN 2 THEN 1.25 END, s, s) ORDER BY s)"
        "   FROM (SELECT $6::int8 - j * $7::int8 AS s, 1 + (n / 2 + j * j) % 3 AS c"
        "         FROM generate_series(0, 2) AS j) AS b)) AS document"
        " FROM generate_series(0, $2 - 1, 2) AS n, generate_series(0, $8 + 2) AS a"
        " GROUP BY n) AS d"
        " WHERE p.dataset = $1 AND p.kind = 'user'"
        " AND p.profile_id = 'p' || lpad(d.n::text, 7, '0')",
        DATASET,
        profiles,
        page_views,
        product_views,
        prices,
        now,
        HOUR,
        others,
    )
    await pool.execute("VACUUM ANALYZE profile.profiles")


async def _time(query: ProfileQuery, text: str, now: int, count_only: bool) -> tuple[int, float]:
    compiled = compile_rule(parse_rule(text))
    started = time.perf_counter()
    matched = 0
    async for step in query.run(
        DATASET,
        "user",
        compiled,
        {},
        now=now,
        limit=0,
        count_only=count_only,
        chunk_size=10_000,
    ):
        matched = step.matched
    return matched, time.perf_counter() - started


async def _run(options: argparse.Namespace) -> dict[str, Any]:
    now = int(time.time()) * 1_000_000
    with tempfile.TemporaryDirectory(prefix="audience-bench-") as folder:
        async with servers(Path(folder)) as (admin_dsn, _), scratch_database(admin_dsn) as dsn:
            pool = await db.create_pool(dsn, min_size=1, max_size=2, command_timeout=None)
            try:
                await db.migrate(
                    pool, schema="profile", migrations=files("services.profile") / "migrations"
                )
                started = time.perf_counter()
                await _seed(pool, options.profiles, options.other_aggregates, now)
                size = await pool.fetchval(
                    "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid)))"
                    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'profile' AND c.relkind = 'r'"
                )
                log(
                    f"seeded {options.profiles:,} profiles in"
                    f" {time.perf_counter() - started:.0f} s ({size})"
                )
                query = ProfileQuery(pool)
                results: dict[str, Any] = {}
                slowest = 0.0
                for name, text in RULES.items():
                    counted, count_seconds = await _time(query, text, now, True)
                    streamed, stream_seconds = await _time(query, text, now, False)
                    if counted != streamed:
                        raise RuntimeError(f"{name}: counted {counted}, streamed {streamed}")
                    log(
                        f"  {name:28s} {counted:9,} matches: count {count_seconds:5.2f} s,"
                        f" stream {stream_seconds:5.2f} s"
                    )
                    slowest = max(slowest, stream_seconds)
                    results[name] = {
                        "matched": counted,
                        "count_seconds": round(count_seconds, 2),
                        "stream_seconds": round(stream_seconds, 2),
                    }
            finally:
                await pool.close()
    return {
        "profiles": options.profiles,
        "rules": results,
        "slowest_stream_seconds": round(slowest, 2),
        "profiles_per_s": round(options.profiles / slowest),
        "goal_seconds": 10.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_query", description=__doc__)
    parser.add_argument("--profiles", type=int, default=1_000_000)
    parser.add_argument("--other-aggregates", type=int, default=8)
    options = parse_options(parser, {"profiles": 100_000})
    print(json.dumps(asyncio.run(_run(options))))


if __name__ == "__main__":
    main()
