"""Benchmark: events applied per second by the profile service, from the bus to PostgreSQL.

    python -m bench.profile [--events 200000] [--visitors 20000] [--aggregates 1000]
                            [--replicas 1] [--quick]

The profile service runs as its own process (``python -m services.profile``), as deployed.
Before it starts, the dataset gets ``--aggregates`` registered aggregates (a mix like the
segment engine registers: counts, sums and distinct counts of page views, product views,
cart additions, purchases, searches and campaign interactions, filtered by path, category,
brand or campaign, over all time, the visit, and sliding windows), and the ``events`` topic
is filled with ``--events`` events as ingest appends them: calls of ``--batch`` events, each
split into one ``EventBatch`` entry per partition.

The traffic is ``--visitors`` visits, interleaved in time: each visitor lands from a source,
views pages and products, fills a cart, and sometimes orders, logs in (an anonymous
visitor merged into a known user) or interacts with a campaign; some users belong to an
account.

The service runs with its defaults but a 2 GiB cache, room for every profile (``--env
NAME=VALUE`` overrides any setting), as ``--replicas`` processes (1 unless given) sharing
the consumer group, as replicas of a deployment do. The figure is events over the time
from the service's first acknowledgement to an empty backlog; the run checks that the
history holds every event. Over the same span it reports the CPU time per event of the service's
processes, of the PostgreSQL backends serving the scratch database and of Redis (steadier
than the rate on a shared machine). With ``--profile FILE``, py-spy samples the service's
first replica into ``FILE`` (raw stacks, for ``py-spy``'s flame graph tools or a grep).
PostgreSQL and Redis are ``AUDIENCE_POSTGRES_DSN`` / ``AUDIENCE_REDIS_URL`` (a superuser
DSN: a scratch database is made and dropped), or embedded servers when unset. The last
line printed is JSON with ``events_per_s``. Goal: ≥ 25,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from importlib.resources import files
from pathlib import Path
from typing import Any

import asyncpg
from google.protobuf import duration_pb2
from redis.asyncio import Redis

from audience import db
from audience.bus.v1 import events_pb2
from audience.rules.aggregates import make_spec, plan_window
from audience.rules.values import AttrValue, timestamp_from_micros, value_to_proto
from audience.streams import Bus, Message
from audience.v1 import common_pb2, event_pb2, profile_pb2, rule_pb2
from bench._suite import (
    bench_keys,
    free_port,
    log,
    parse_options,
    redis_namespace,
    scratch_database,
    servers,
    service,
    wait_serving,
)
from services.ingest.validation import partition_key
from services.profile.consumer import EVENTS, GROUP, declare_topics
from services.profile.store import Registry

GOAL = 25_000
DATASET = "bench"
PARTITIONS = 8

SECTIONS = ("shop", "blog", "help", "docs", "deals")
PATHS = [f"/{section}/{n}" for section in SECTIONS for n in range(20)]
CATEGORIES = [f"category-{n}" for n in range(30)]
BRANDS = [f"brand-{n}" for n in range(25)]
CAMPAIGNS = [f"campaign-{n}" for n in range(20)]
SEARCHES = ["shoes", "hats", "socks", "gift", "sale", "blue", "red", "kids"]
SOURCES = ["google", "newsletter", "facebook", "", "", "bing", "partner"]
COUNTRIES = ["US", "FR", "DE", "GB", "ES", "IT", "NL", "JP"]

_F = rule_pb2.AggregateFunction
_E = event_pb2.EventType


def _equals(path: str, value: str) -> rule_pb2.PropertyFilter:
    return rule_pb2.PropertyFilter(
        path=path,
        comparison=rule_pb2.Comparison(
            operator=rule_pb2.OPERATOR_EQUALS, value=common_pb2.Value(string_value=value)
        ),
    )


def _above(path: str, value: float) -> rule_pb2.PropertyFilter:
    return rule_pb2.PropertyFilter(
        path=path,
        comparison=rule_pb2.Comparison(
            operator=rule_pb2.OPERATOR_GREATER_THAN, value=common_pb2.Value(number_value=value)
        ),
    )


def _windows() -> list[rule_pb2.Window]:
    return [
        rule_pb2.Window(all_time=rule_pb2.AllTime()),
        rule_pb2.Window(this_session=rule_pb2.ThisSession()),
        *(
            rule_pb2.Window(last=duration_pb2.Duration(seconds=seconds))
            for seconds in (3600, 86_400, 7 * 86_400, 30 * 86_400, 90 * 86_400)
        ),
    ]


def aggregate_specs(count: int, seed: int = 7) -> list[profile_pb2.AggregateSpec]:
    """``count`` distinct aggregates, like those compiled from a large set of segments."""
    rng = random.Random(seed)
    windows = _windows()
    families: list[tuple[str, list[rule_pb2.PropertyFilter], int, str]] = []
    for path in PATHS:
        families.append(("page_view", [_equals("path", path)], _F.AGGREGATE_FUNCTION_COUNT, ""))
    for category in CATEGORIES:
        for fact in ("product_view", "product_added", "product_purchased"):
            families.append(
                (fact, [_equals("category", category)], _F.AGGREGATE_FUNCTION_COUNT, "")
            )
        families.append(
            (
                "product_purchased",
                [_equals("category", category)],
                _F.AGGREGATE_FUNCTION_SUM,
                "price",
            )
        )
    for brand in BRANDS:
        families.append(
            ("product_view", [_equals("brand", brand)], _F.AGGREGATE_FUNCTION_COUNT, "")
        )
        families.append(
            ("product_added", [_equals("brand", brand)], _F.AGGREGATE_FUNCTION_COUNT, "")
        )
    for campaign in CAMPAIGNS:
        for action in ("received", "opened", "clicked"):
            families.append(
                (
                    "campaign_interaction",
                    [_equals("campaign_id", campaign), _equals("action", action)],
                    _F.AGGREGATE_FUNCTION_COUNT,
                    "",
                )
            )
    for term in SEARCHES:
        families.append(("search", [_equals("query", term)], _F.AGGREGATE_FUNCTION_COUNT, ""))
    families += [
        ("page_view", [], _F.AGGREGATE_FUNCTION_COUNT, ""),
        ("product_view", [], _F.AGGREGATE_FUNCTION_DISTINCT_COUNT, "product_id"),
        ("product_view", [_above("price", 100.0)], _F.AGGREGATE_FUNCTION_COUNT, ""),
        ("order_completed", [], _F.AGGREGATE_FUNCTION_SUM, "revenue"),
        ("order_completed", [_above("revenue", 200.0)], _F.AGGREGATE_FUNCTION_COUNT, ""),
        ("cart_updated", [], _F.AGGREGATE_FUNCTION_SUM, "value"),
        ("search", [], _F.AGGREGATE_FUNCTION_COUNT, ""),
        ("signup", [], _F.AGGREGATE_FUNCTION_COUNT, ""),
    ]
    # Windows that share a bucket width share an aggregate (the id leaves retention out).
    specs: dict[str, profile_pb2.AggregateSpec] = {}
    for name, filters, function, prop in families:
        for window in windows:
            spec = make_spec(name, filters, function, prop, plan_window(window))
            specs.setdefault(spec.aggregate_id, spec)
    if len(specs) < count:
        raise ValueError(f"the mix has {len(specs)} distinct aggregates, fewer than {count}")
    return rng.sample(sorted(specs.values(), key=lambda spec: spec.aggregate_id), count)


class Traffic:
    """Visits, as events, interleaved in time."""

    def __init__(self, events: int, visitors: int, seed: int = 11) -> None:
        self.rng = random.Random(seed)
        self.start = int(time.time() * 1_000_000) - 3_600_000_000
        self.total = events
        self.visitors = visitors

    def _base(self, kind: int, visitor: dict[str, Any], at: int) -> event_pb2.Event:
        event = event_pb2.Event(
            event_id=uuid.uuid4().hex,
            type=kind,  # type: ignore[arg-type]
            anonymous_id=visitor["anon"],
            user_id=visitor["user"],
            account_id=visitor["account"] if visitor["user"] else "",
            timestamp=timestamp_from_micros(at),
            received_at=timestamp_from_micros(at),
        )
        context = event.context
        context.channel = event_pb2.CHANNEL_WEB
        context.location.country = visitor["country"]
        context.device.type = event_pb2.DEVICE_TYPE_MOBILE
        context.device.browser = "Safari"
        if visitor["source"]:
            context.source = visitor["source"]
        return event

    def _visit(self, number: int, length: int) -> list[event_pb2.Event]:
        rng = self.rng
        known = rng.random() < 0.3
        visitor: dict[str, Any] = {
            "anon": f"anon-{number}",
            "user": f"user-{number}" if known else "",
            "account": f"account-{number % 500}" if rng.random() < 0.4 else "",
            "country": rng.choice(COUNTRIES),
            "source": rng.choice(SOURCES),
        }
        at = self.start + rng.randrange(3_000_000_000)
        cart: list[tuple[str, str, str, float, int]] = []
        events = []
        for step in range(length):
            at += rng.randrange(5_000_000, 90_000_000)
            roll = rng.random()
            if step == 0 or roll < 0.35:
                event = self._base(_E.EVENT_TYPE_PAGE, visitor, at)
                event.name = "page_view"
                path = rng.choice(PATHS)
                event.context.page.path = path
                event.context.page.url = f"https://shop.example{path}"
                if step == 0:
                    event.context.page.referrer = "https://www.google.com/"
            elif roll < 0.65:
                event = self._base(_E.EVENT_TYPE_TRACK, visitor, at)
                event.name = "product_view"
                product = f"sku-{rng.randrange(2000)}"
                props: dict[str, AttrValue] = {
                    "product_id": product,
                    "category": rng.choice(CATEGORIES),
                    "brand": rng.choice(BRANDS),
                    "price": float(rng.randrange(5, 300)),
                }
                for key, value in props.items():
                    event.properties[key].CopyFrom(value_to_proto(value))
            elif roll < 0.80:
                event = self._base(_E.EVENT_TYPE_CART_UPDATED, visitor, at)
                event.name = "cart_updated"
                cart.append(
                    (
                        f"sku-{rng.randrange(2000)}",
                        rng.choice(CATEGORIES),
                        rng.choice(BRANDS),
                        float(rng.randrange(5, 300)),
                        rng.randrange(1, 3),
                    )
                )
                event.cart.currency = "USD"
                for product, category, brand, price, quantity in cart:
                    event.cart.items.add(
                        product_id=product,
                        category=category,
                        brand=brand,
                        price=price,
                        quantity=quantity,
                    )
            elif roll < 0.86:
                event = self._base(_E.EVENT_TYPE_TRACK, visitor, at)
                event.name = "search"
                event.properties["query"].string_value = rng.choice(SEARCHES)
            elif roll < 0.90 and cart:
                event = self._base(_E.EVENT_TYPE_ORDER_COMPLETED, visitor, at)
                event.name = "order_completed"
                event.order.order_id = uuid.uuid4().hex
                event.order.currency = "USD"
                for product, category, brand, price, quantity in cart:
                    event.order.items.add(
                        product_id=product,
                        category=category,
                        brand=brand,
                        price=price,
                        quantity=quantity,
                    )
                cart = []
            elif roll < 0.95:
                event = self._base(_E.EVENT_TYPE_CAMPAIGN_INTERACTION, visitor, at)
                event.name = "campaign_interaction"
                interaction = event.campaign_interaction
                interaction.campaign_id = rng.choice(CAMPAIGNS)
                interaction.channel = event_pb2.CAMPAIGN_CHANNEL_EMAIL
                interaction.action = rng.choice(
                    [
                        event_pb2.CAMPAIGN_ACTION_RECEIVED,
                        event_pb2.CAMPAIGN_ACTION_OPENED,
                        event_pb2.CAMPAIGN_ACTION_CLICKED,
                    ]
                )
            else:
                # A login: an anonymous visitor becomes a known user (a merge from then on).
                if not visitor["user"]:
                    visitor["user"] = f"user-{number}"
                event = self._base(_E.EVENT_TYPE_IDENTIFY, visitor, at)
                event.name = "identify"
                event.identify.traits["plan"].string_value = rng.choice(["free", "pro", "team"])
                event.identify.traits["visits"].number_value = float(rng.randrange(1, 50))
            events.append(event)
        return events

    def events(self) -> list[event_pb2.Event]:
        """Every event, ordered by time."""
        per_visit = max(1, self.total // self.visitors)
        timeline: list[event_pb2.Event] = []
        number = 0
        while len(timeline) < self.total:
            length = max(1, min(self.total - len(timeline), int(self.rng.gauss(per_visit, 3))))
            timeline.extend(self._visit(number, length))
            number += 1
        timeline.sort(key=lambda e: (e.timestamp.seconds, e.timestamp.nanos))
        return timeline


async def _prefill(bus: Bus, events: list[event_pb2.Event], call_size: int) -> int:
    """Appends the events as ingest does; returns the number of entries."""
    entries = 0
    for start in range(0, len(events), call_size):
        by_partition: defaultdict[int, list[events_pb2.IngestedEvent]] = defaultdict(list)
        for event in events[start : start + call_size]:
            by_partition[bus.partition_of(partition_key(event))].append(
                events_pb2.IngestedEvent(dataset=DATASET, event=event)
            )
        await bus.publish_batch(
            Message(EVENTS, partition, events_pb2.EventBatch(events=batch).SerializeToString())
            for partition, batch in by_partition.items()
        )
        entries += len(by_partition)
    return entries


async def _register(dsn: str, count: int) -> None:
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        await db.migrate(
            pool, schema="profile", migrations=files("services.profile") / "migrations"
        )
        registry = Registry(pool)
        await registry.register(DATASET, aggregate_specs(count))
        # No profile exists yet: the backfill ends at once.
        async with pool.acquire() as conn, conn.transaction():
            backfill = await registry.claim(conn)
            if backfill is not None:
                await registry.finish(conn, backfill)
    finally:
        await pool.close()


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process on this machine; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuMeter:
    """CPU seconds of the service (its replicas together), of the database's backends and
    of Redis, since a mark."""

    def __init__(self, service_pids: list[int], monitor: asyncpg.Connection, redis: Redis) -> None:
        self.service_pids = service_pids
        self.monitor = monitor
        self.redis = redis
        self._start: dict[str, float] = {}
        self._backends: dict[int, float] = {}

    async def _backend_pids(self) -> list[int]:
        rows = await self.monitor.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
        return [row["pid"] for row in rows]

    async def _redis(self) -> float:
        info: Any = await self.redis.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    async def mark(self) -> None:
        self._backends = {pid: _cpu_seconds(pid) for pid in await self._backend_pids()}
        self._start = {"service": self._service(), "redis": await self._redis()}

    def _service(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self.service_pids)

    async def spent(self) -> dict[str, float]:
        # Backends opened after the mark count from zero; one closed meanwhile is lost.
        postgres = sum(
            _cpu_seconds(pid) - self._backends.get(pid, 0.0) for pid in await self._backend_pids()
        )
        return {
            "service": self._service() - self._start["service"],
            "postgres": postgres,
            "redis": await self._redis() - self._start["redis"],
        }


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


async def _history(dsn: str) -> dict[str, int]:
    connection = await asyncpg.connect(dsn)
    try:
        row = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM profile.events) AS events,"
            " (SELECT count(*) FROM profile.profiles WHERE kind = 'user') AS profiles,"
            " (SELECT count(*) FROM profile.profiles WHERE kind = 'account') AS accounts,"
            " (SELECT coalesce(sum(jsonb_array_length(a.value)), 0)::int8"
            " FROM profile.profiles p, jsonb_each(p.aggregates) AS a) AS buckets,"
            " (SELECT count(*) FROM profile.merges) AS merges"
        )
        assert row is not None
        return dict(row)
    finally:
        await connection.close()


async def _run(options: argparse.Namespace) -> dict[str, Any]:
    log(f"generating {options.events:,} events of {options.visitors:,} visits")
    events = Traffic(options.events, options.visitors).events()
    with tempfile.TemporaryDirectory(prefix="audience-bench-") as folder:
        directory = Path(folder)
        async with (
            servers(directory) as (admin_dsn, redis_url),
            scratch_database(admin_dsn) as dsn,
            redis_namespace(redis_url) as namespace,
        ):
            await _register(dsn, options.aggregates)
            redis = Redis.from_url(redis_url)
            bus = Bus(redis, namespace=namespace, partitions=PARTITIONS)
            try:
                await declare_topics(bus)
                entries = await _prefill(bus, events, options.batch)
                log(f"{entries:,} entries on the bus; {options.aggregates:,} aggregates")
                environ = {
                    "PATH": "/usr/bin:/bin",
                    "AUDIENCE_POSTGRES_DSN": dsn,
                    "AUDIENCE_REDIS_URL": redis_url,
                    "AUDIENCE_REDIS_NAMESPACE": namespace,
                    "AUDIENCE_BUS_PARTITIONS": str(PARTITIONS),
                    "AUDIENCE_LOG_LEVEL": "warning",
                    # Room for every visitor of the run (about 70 KB each).
                    "AUDIENCE_PROFILE_CACHE_MB": "2048",
                    # Authentication on, as deployed (nothing here calls the service but its
                    # health, which needs no key).
                    **bench_keys().environ,
                    **dict(item.split("=", 1) for item in options.env),
                }
                total = await bus.backlog(EVENTS, GROUP)
                monitor = await asyncpg.connect(dsn)
                profiler: asyncio.subprocess.Process | None = None
                labels = [f"profile-{n}" for n in range(options.replicas)]
                async with contextlib.AsyncExitStack() as replicas:
                    processes = []
                    for label in labels:
                        address = f"127.0.0.1:{free_port()}"
                        replica = {
                            **environ,
                            "AUDIENCE_LISTEN": address,
                            "AUDIENCE_PROFILE_CONSUMER_NAME": label,
                        }
                        process = await replicas.enter_async_context(
                            service(["-m", "services.profile"], replica, directory, label)
                        )
                        await wait_serving(address, label, process)
                        processes.append(process)
                    p = processes[0]
                    meter = CpuMeter([process.pid for process in processes], monitor, redis)
                    if options.profile:
                        profiler = await asyncio.create_subprocess_exec(
                            _py_spy(),
                            "record",
                            "--pid",
                            str(p.pid),
                            "--format",
                            "raw",
                            "--rate",
                            "100",
                            "--output",
                            str(options.profile),
                            stdout=asyncio.subprocess.DEVNULL,
                            stderr=asyncio.subprocess.DEVNULL,
                        )
                    first: float | None = None
                    last_report = time.perf_counter()
                    while True:
                        backlog = await bus.backlog(EVENTS, GROUP)
                        now = time.perf_counter()
                        if first is None and backlog < total:
                            first, done_at_first = now, total - backlog
                            await meter.mark()
                        if backlog == 0:
                            break
                        if now - last_report > 5:
                            log(f"  {total - backlog:,}/{total:,} entries applied")
                            last_report = now
                        if any(process.returncode is not None for process in processes):
                            raise RuntimeError("a profile replica exited; see its log")
                        await asyncio.sleep(0.02)
                    finished = time.perf_counter()
                    cpu = await meter.spent()
                    if profiler is not None:
                        profiler.send_signal(2)
                        await asyncio.wait_for(profiler.wait(), 60)
                await monitor.close()
                for label in labels:
                    for line in (directory / f"{label}.log").read_text().splitlines()[-10:]:
                        log(f"{label}: {line}")
            finally:
                await redis.aclose()
            counts = await _history(dsn)
    if counts["events"] != len(events):
        raise RuntimeError(f"the history holds {counts['events']} of {len(events)} events")
    assert first is not None
    # The entries acknowledged in the first measurement are outside the timed span.
    timed_events = len(events) * (total - done_at_first) / total
    seconds = finished - first
    return {
        "events_per_s": round(timed_events / seconds),
        "events": len(events),
        "seconds": round(seconds, 2),
        **{
            f"{name}_cpu_us_per_event": round(1e6 * spent / timed_events, 1)
            for name, spent in cpu.items()
        },
        **{f"{name}_cpu_cores": round(spent / seconds, 2) for name, spent in cpu.items()},
        "entries": total,
        "aggregates": options.aggregates,
        "replicas": options.replicas,
        **{f"{name}_rows": value for name, value in counts.items()},
        "goal_events_per_s": GOAL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--visitors", type=int, default=20_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000, help="Events per ingest call.")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the service (repeatable)."
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="Profile service processes sharing the work."
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy the service (its first replica) into this file"
    )
    options = parse_options(parser, {"events": 20_000, "visitors": 2_000})
    print(json.dumps(asyncio.run(_run(options))))


if __name__ == "__main__":
    main()
