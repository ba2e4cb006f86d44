"""The profile service's consumer on real PostgreSQL and Redis: events in, profiles, history,
aggregates and published changes out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib.resources import files
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from audience import db
from audience.bus.v1 import events_pb2, profile_change_pb2
from audience.channels import Channels, ChannelSettings
from audience.config import CommonConfig
from audience.rules import micros_from_timestamp
from audience.rules.aggregates import HOUR as HOUR_MICROS
from audience.rules.aggregates import aggregate_id, canonical_spec
from audience.streams import Bus, Consumer, Delivery
from audience.v1 import event_pb2, profile_pb2, segment_pb2
from services.profile.applier import Applier, Incoming
from services.profile.backfill import Backfiller
from services.profile.consumer import (
    EVENTS,
    FAILED_EVENTS,
    PROFILE_CHANGES,
    EventWorker,
    Publisher,
    declare_topics,
    is_infrastructure,
)
from services.profile.domain.apply import Settings
from services.profile.memberships import Memberships
from services.profile.operations import Operations
from services.profile.prune import Pruner
from services.profile.store import AGGREGATE_READY, ProfileStore, Registry
from tests.e2e.conftest import new_dataset
from tests.integration.export.peers import eventually
from tests.profile_support import T0, E, batch, changes, count_spec, event, micros

pytestmark = pytest.mark.integration

PARTITIONS = 4
SESSION = Settings(session_timeout=30 * 60 * 1_000_000)
UPDATED = profile_change_pb2.PROFILE_CHANGE_TYPE_UPDATED
MERGED = profile_change_pb2.PROFILE_CHANGE_TYPE_MERGED
ERASED = profile_change_pb2.PROFILE_CHANGE_TYPE_ERASED


@pytest.fixture(scope="session")
async def profile_pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(postgres_dsn, min_size=1, max_size=12)
    await db.migrate(pool, schema="profile", migrations=files("services.profile") / "migrations")
    yield pool
    try:
        await asyncio.wait_for(pool.close(), 10)
    except TimeoutError:
        pool.terminate()


@dataclass
class Rig:
    pool: asyncpg.Pool
    bus: Bus
    store: ProfileStore
    worker: EventWorker
    changes_reader: Consumer
    failures_reader: Consumer

    def new_worker(self, name: str, *, claim_idle: float = 60.0) -> EventWorker:
        return EventWorker.for_partitions(
            Applier(ProfileStore(self.pool), SESSION, cache_bytes=64 << 20),
            Publisher(self.bus),
            name=name,
            partitions=range(PARTITIONS),
            read_count=10,
            unit_events=1000,
            claim_idle=claim_idle,
            block=0.05,
        )

    def operations(self) -> Operations:
        # Nothing answers there: profiles are read without their segments.
        channels = Channels(ChannelSettings.from_env({}, CommonConfig.from_env({})))
        memberships = Memberships(channels, "127.0.0.1:1", 0.1)
        return Operations(self.worker.applier, Publisher(self.bus), memberships)

    async def send(self, dataset: str, *events: event_pb2.Event) -> None:
        await self.bus.publish(EVENTS, dataset, batch(dataset, events))

    async def run(self, worker: EventWorker | None = None) -> None:
        """Has the worker apply everything published so far."""
        active = worker or self.worker
        while deliveries := await active.consumer.read():
            await active.handle(deliveries)

    async def published(self) -> list[profile_change_pb2.ProfileChange]:
        payloads: list[bytes] = []
        while deliveries := await self.changes_reader.read():
            payloads.extend(d.payload for d in deliveries)
            await self.changes_reader.ack(deliveries)
        return changes(payloads)

    async def failures(self) -> list[events_pb2.FailedEventRecord]:
        found: list[events_pb2.FailedEventRecord] = []
        while deliveries := await self.failures_reader.read():
            for delivery in deliveries:
                found.extend(events_pb2.FailedEventBatch.FromString(delivery.payload).failures)
            await self.failures_reader.ack(deliveries)
        return found

    async def profile(self, dataset: str, profile_id: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM profile.profiles WHERE dataset = $1 AND kind = 'user'"
            " AND profile_id = $2",
            dataset,
            profile_id,
        )
        return None if row is None else dict(row)

    async def count(self, table: str, dataset: str, where: str = "true", *args: Any) -> int:
        value = await self.pool.fetchval(
            f"SELECT count(*) FROM profile.{table} WHERE dataset = $1 AND {where}",
            dataset,
            *args,
        )
        return int(value)

    async def buckets(self, dataset: str, profile_id: str) -> dict[str, tuple[int, float]]:
        """Per aggregate of the profile's row, the count and sum over its buckets."""
        rows = await self.pool.fetch(
            "SELECT a.key AS aggregate_id, sum((b.v -> 1)::int8) AS count,"
            " sum((b.v ->> 2)::float8) AS sum FROM profile.profiles p,"
            " jsonb_each(p.aggregates) AS a, jsonb_array_elements(a.value) AS b(v)"
            " WHERE p.dataset = $1 AND p.kind = 'user' AND p.profile_id = $2 GROUP BY a.key",
            dataset,
            profile_id,
        )
        return {row["aggregate_id"]: (int(row["count"]), float(row["sum"])) for row in rows}

    async def bucket_starts(self, dataset: str, aggregate_id: str) -> list[int]:
        """The starts of an aggregate's buckets in the dataset's rows (microseconds)."""
        rows = await self.pool.fetch(
            "SELECT (b.v -> 0)::int8 AS start FROM profile.profiles p,"
            " jsonb_array_elements(p.aggregates -> $2) AS b(v)"
            " WHERE p.dataset = $1 ORDER BY 1",
            dataset,
            aggregate_id,
        )
        return [row["start"] for row in rows]


@pytest.fixture
async def rig(profile_pool: asyncpg.Pool, redis_url: str, key_prefix: str) -> AsyncIterator[Rig]:
    redis = Redis.from_url(redis_url)
    bus = Bus(redis, namespace=key_prefix, partitions=PARTITIONS)
    await declare_topics(bus)
    store = ProfileStore(profile_pool)
    setup = Rig(profile_pool, bus, store, None, None, None)  # type: ignore[arg-type]
    setup.worker = setup.new_worker("w1")
    setup.changes_reader = bus.consumer(PROFILE_CHANGES, "segment_engine", "test", block=0.05)
    setup.failures_reader = bus.consumer(FAILED_EVENTS, "ingest", "test", block=0.05)
    yield setup
    await redis.aclose()


async def register(rig: Rig, dataset: str, *specs: profile_pb2.AggregateSpec) -> list[str]:
    """Registers aggregates and runs their (empty or not) backfill to the end."""
    stored = []
    for spec in specs:
        canonical = canonical_spec(spec)
        canonical.aggregate_id = aggregate_id(spec)
        canonical.retention.CopyFrom(spec.retention)
        stored.append(canonical)
    await Registry(rig.pool).register(dataset, stored)
    backfiller = Backfiller(
        rig.store, Registry(rig.pool), Publisher(rig.bus), SESSION, page_size=50, pause=0
    )
    while await backfiller.step():
        pass
    return [spec.aggregate_id for spec in stored]


async def test_events_build_a_profile_and_publish_its_view(rig: Rig) -> None:
    dataset = new_dataset()
    await rig.send(
        dataset,
        event(anon="a1", kind=E.EVENT_TYPE_PAGE, path="/home", at=T0, source="google"),
        event(
            anon="a1",
            kind=E.EVENT_TYPE_CART_UPDATED,
            cart=[("sku1", 30.0, 2)],
            at=T0 + timedelta(minutes=1),
        ),
    )
    await rig.run()
    published = await rig.published()
    assert [c.profile_id for c in published] == ["a1"]
    change = published[0]
    assert change.sequence == 1
    assert change.type == UPDATED
    assert {"event:page_view", "event:cart_updated", "session", "seen"} <= set(change.changed_keys)
    assert change.view.session.cart.value == 60.0
    assert change.view.session.page_view_count == 1
    assert change.view.session.landing_page == "/home"
    assert change.view.session.source == "google"
    row = await rig.profile(dataset, "a1")
    assert row is not None
    assert (row["cart_value"], row["page_view_count"], row["source"]) == (60.0, 1, "google")
    assert (row["sequence"], row["event_count"], row["visit_count"]) == (1, 2, 1)


async def test_sessions_split_after_thirty_minutes_of_inactivity(rig: Rig) -> None:
    dataset = new_dataset()
    page = E.EVENT_TYPE_PAGE
    await rig.send(
        dataset,
        event(user="u1", kind=page, path="/a", at=T0),
        event(user="u1", kind=page, path="/b", at=T0 + timedelta(minutes=20)),
        event(user="u1", kind=page, path="/c", at=T0 + timedelta(minutes=55)),
        event(user="u1", kind=page, path="/d", at=T0 + timedelta(minutes=70)),
    )
    await rig.run()
    row = await rig.profile(dataset, "u1")
    assert row is not None
    assert row["visit_count"] == 2
    assert row["page_view_count"] == 2
    assert row["landing_page"] == "/c"
    assert row["session_start"] == T0 + timedelta(minutes=55)


async def test_a_new_client_session_id_starts_a_new_visit(rig: Rig) -> None:
    dataset = new_dataset()
    await rig.send(
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, session_id="s1", at=T0),
        event(user="u1", kind=E.EVENT_TYPE_PAGE, session_id="s2", at=T0 + timedelta(minutes=1)),
    )
    await rig.run()
    published = await rig.published()
    assert published[-1].view.session.session_id == "s2"
    assert published[-1].view.visit_count == 2


async def test_a_redelivered_batch_changes_nothing(rig: Rig) -> None:
    dataset = new_dataset()
    [count_id] = await register(rig, dataset, count_spec("page_view"))
    events = [
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(seconds=i)) for i in range(5)
    ]
    await rig.send(dataset, *events, *events[:2])
    await rig.run()
    await rig.send(dataset, *events)
    await rig.run()
    row = await rig.profile(dataset, "u1")
    assert row is not None
    assert (row["event_count"], row["page_view_count"], row["sequence"]) == (5, 5, 1)
    assert (await rig.buckets(dataset, "u1"))[count_id][0] == 5
    published = await rig.published()
    # The second delivery republishes the current view, at the same sequence, naming no
    # event and no key: the segment engine evaluates it in full if the first was lost.
    assert [c.sequence for c in published] == [1, 1]
    assert list(published[1].event_ids) == []
    assert list(published[1].changed_keys) == []


async def test_a_change_is_dated_after_its_commit_not_when_its_unit_began(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A segment backfill takes a view dated before its query began as seen by the query; a
    # unit that began before the query and committed after it would have its event left
    # out of the backfill's answer and kept out by its date (found by tests/faults).
    dataset = new_dataset()
    began = T0 + timedelta(minutes=1)
    now = [began]
    store = ProfileStore(rig.pool)
    applier = Applier(store, SESSION, cache_bytes=64 << 20, clock=lambda: now[0].timestamp())
    worker = EventWorker.for_partitions(
        applier,
        Publisher(rig.bus),
        name="dated",
        partitions=range(PARTITIONS),
        read_count=10,
        unit_events=1000,
        claim_idle=60.0,
        block=0.05,
    )
    write_profiles = store.write_profiles

    async def slow_write(*args: Any, **kwargs: Any) -> None:
        await write_profiles(*args, **kwargs)
        # Time passes while the unit's transaction is still open.
        now[0] = began + timedelta(seconds=5)

    monkeypatch.setattr(store, "write_profiles", slow_write)
    await rig.send(dataset, event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0))
    await rig.run(worker)

    (change,) = await rig.published()
    assert micros_from_timestamp(change.change_time) == micros(began + timedelta(seconds=5))


def test_a_session_the_server_ended_is_the_infrastructure_not_the_event() -> None:
    # What asyncpg raises, instead of a closed connection, when it reads the goodbye of a
    # restarting PostgreSQL before the socket closes: the unit is retried as it is, its
    # events never set aside as poison (found by tests/faults).
    error = asyncpg.InternalClientError(
        "cannot switch to state 11; another operation (2) is in progress"
    )

    assert is_infrastructure(error)


async def _kill_during(
    rig: Rig, worker: EventWorker, hook: str, target: Any, dataset: str, events: list[Any]
) -> None:
    """Starts the worker on the events and cancels it once it reaches ``target.hook``."""
    reached = asyncio.Event()
    original: Callable[..., Awaitable[Any]] = getattr(target, hook)

    async def stall(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        reached.set()
        await asyncio.sleep(3600)
        return result

    setattr(target, hook, stall)
    await rig.send(dataset, *events)
    deliveries = await worker.consumer.read()
    task = asyncio.create_task(worker.handle(deliveries))
    await asyncio.wait_for(reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    "hook",
    ["write_profiles", "publish"],
    ids=["killed-before-commit", "killed-after-commit-before-ack"],
)
async def test_a_batch_redelivered_after_a_consumer_is_killed_leaves_counts_exact(
    rig: Rig, hook: str
) -> None:
    dataset = new_dataset()
    [pages, revenue] = await register(
        rig,
        dataset,
        count_spec("page_view"),
        count_spec("order_completed", function=2, prop="revenue"),
    )
    first = rig.new_worker("doomed", claim_idle=0.2)
    events = [
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(seconds=1)),
        event(
            user="u1",
            kind=E.EVENT_TYPE_ORDER_COMPLETED,
            order=[("sku", 10.0, 3)],
            at=T0 + timedelta(seconds=2),
        ),
        event(anon="a9", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(seconds=3)),
    ]
    if hook == "write_profiles":
        await _kill_during(rig, first, hook, first.applier.store, dataset, events)
        assert await rig.profile(dataset, "u1") is None
    else:
        await _kill_during(rig, first, "changes", first.publisher, dataset, events)
        assert await rig.profile(dataset, "u1") is not None
    rescuer = rig.new_worker("rescuer", claim_idle=0.2)
    await asyncio.sleep(0.3)
    await rig.run(rescuer)
    await rig.run(rescuer)
    row = await rig.profile(dataset, "u1")
    assert row is not None
    assert (row["event_count"], row["order_count"], row["lifetime_value"]) == (3, 1, 30.0)
    assert (row["visit_count"], row["sequence"]) == (1, 1)
    assert await rig.buckets(dataset, "u1") == {pages: (2, 0.0), revenue: (1, 30.0)}
    assert await rig.count("events", dataset) == 4
    assert await rig.bus.backlog(EVENTS, "profile") == 0


async def test_a_merge_whose_publish_was_lost_is_published_again_by_the_redelivery(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redelivered, the identify that merged the visitor merges nothing (the visitor's row is
    # gone): without its MERGED change the segment engine would keep the visitor in its
    # segments for good (found by tests/faults).
    dataset = new_dataset()
    await rig.send(dataset, event(anon="a7", kind=E.EVENT_TYPE_PAGE, at=T0))
    await rig.run()
    [visited] = await rig.published()
    doomed = rig.new_worker("doomed", claim_idle=0.2)
    reached = asyncio.Event()

    async def lost(published: Any) -> None:
        reached.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(doomed.publisher, "changes", lost)
    await rig.send(
        dataset,
        event(user="u7", anon="a7", kind=E.EVENT_TYPE_IDENTIFY, at=T0 + timedelta(minutes=1)),
    )
    task = asyncio.create_task(doomed.handle(await doomed.consumer.read()))
    await asyncio.wait_for(reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await rig.profile(dataset, "a7") is None
    rescuer = rig.new_worker("rescuer", claim_idle=0.2)
    await asyncio.sleep(0.3)
    await rig.run(rescuer)

    published = {change.profile_id: change for change in await rig.published()}
    merged = published["a7"]
    assert (merged.type, merged.merged_into) == (MERGED, "u7")
    assert merged.sequence == visited.sequence + 1
    assert published["u7"].type == UPDATED


async def test_an_anonymous_visitor_merges_into_the_known_user(rig: Rig) -> None:
    dataset = new_dataset()
    [pages] = await register(rig, dataset, count_spec("page_view"))
    await rig.send(
        dataset,
        *[
            event(anon="a2", kind=E.EVENT_TYPE_PAGE, path=f"/p{i}", at=T0 + timedelta(minutes=i))
            for i in range(3)
        ],
        event(
            anon="a2",
            kind=E.EVENT_TYPE_IDENTIFY,
            traits={"plan": "trial"},
            at=T0 + timedelta(minutes=4),
        ),
    )
    await rig.run()
    await rig.send(dataset, event(user="u2", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(days=2)))
    await rig.run()
    await rig.published()
    await rig.send(
        dataset,
        event(
            user="u2",
            anon="a2",
            kind=E.EVENT_TYPE_IDENTIFY,
            traits={"plan": "pro"},
            identities=[("email", "Ada@Example.com")],
            at=T0 + timedelta(days=3),
        ),
    )
    await rig.run()
    assert await rig.profile(dataset, "a2") is None
    user = await rig.profile(dataset, "u2")
    assert user is not None
    assert user["event_count"] == 6
    assert user["first_seen"] == T0
    assert user["attributes"] == {"plan": "pro"}
    assert (await rig.buckets(dataset, "u2"))[pages][0] == 4
    assert await rig.count("events", dataset, "profile_id = 'u2'") == 6
    identities = await rig.pool.fetch(
        "SELECT type, value FROM profile.identities WHERE dataset = $1 AND profile_id = 'u2'"
        " ORDER BY type",
        dataset,
    )
    assert [(r["type"], r["value"]) for r in identities] == [
        ("anonymous_id", "a2"),
        ("email", "ada@example.com"),
        ("user_id", "u2"),
    ]
    assert await rig.count("merges", dataset, "source = 'a2' AND target = 'u2'") == 1
    published = {c.profile_id: c for c in await rig.published()}
    assert published["a2"].type == MERGED
    assert published["a2"].merged_into == "u2"
    assert published["u2"].type == UPDATED
    assert "aggregates" in published["u2"].changed_keys
    assert published["u2"].view.attributes["plan"].string_value == "pro"
    # A later anonymous event of the device lands on the user.
    await rig.send(dataset, event(anon="a2", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(days=4)))
    await rig.run()
    assert await rig.profile(dataset, "a2") is None
    assert (await rig.buckets(dataset, "u2"))[pages][0] == 5


async def test_a_merge_within_one_batch(rig: Rig) -> None:
    dataset = new_dataset()
    await rig.send(
        dataset,
        event(anon="a3", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u3", anon="a3", kind=E.EVENT_TYPE_IDENTIFY, at=T0 + timedelta(seconds=1)),
        event(anon="a3", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(seconds=2)),
    )
    await rig.run()
    assert await rig.profile(dataset, "a3") is None
    user = await rig.profile(dataset, "u3")
    assert user is not None
    assert (user["event_count"], user["page_view_count"], user["visit_count"]) == (3, 2, 1)
    published = {c.profile_id: c for c in await rig.published()}
    assert published["a3"].type == MERGED
    assert published["u3"].sequence == 1


async def test_a_poison_event_is_set_aside_and_the_rest_of_the_batch_applies(rig: Rig) -> None:
    dataset = new_dataset()
    timeless = event(user="u4", kind=E.EVENT_TYPE_PAGE)
    timeless.ClearField("timestamp")
    timeless.ClearField("received_at")
    nul = event(user="u5", name="bad\x00name", at=T0)
    await rig.send(
        dataset,
        event(user="u4", kind=E.EVENT_TYPE_PAGE, at=T0),
        timeless,
        event(user="u5", kind=E.EVENT_TYPE_PAGE, at=T0),
        nul,
        event(user="u6", kind=E.EVENT_TYPE_PAGE, at=T0),
    )
    await rig.run()
    for user in ("u4", "u5", "u6"):
        row = await rig.profile(dataset, user)
        assert row is not None
        assert row["event_count"] == 1
    failures = await rig.failures()
    assert sorted(f.event.event.event_id for f in failures) == sorted(
        [timeless.event_id, nul.event_id]
    )
    by_id = {f.event.event.event_id: f for f in failures}
    assert by_id[timeless.event_id].failure.stage == "profile"
    assert by_id[timeless.event_id].failure.reason == "INVALID_EVENT"
    assert by_id[nul.event_id].failure.reason == "STORE_REJECTED"
    assert by_id[nul.event_id].event.dataset == dataset
    assert await rig.bus.backlog(EVENTS, "profile") == 0


async def test_the_account_rolls_up_its_users(rig: Rig) -> None:
    dataset = new_dataset()
    order = E.EVENT_TYPE_ORDER_COMPLETED
    await rig.send(
        dataset,
        event(
            account="acme",
            kind=E.EVENT_TYPE_ACCOUNT_UPDATE,
            account_traits={"industry": "retail"},
            at=T0,
        ),
        event(user="u1", account="acme", kind=order, order=[("a", 10.0, 1)], at=T0),
        event(user="u2", account="acme", kind=order, order=[("b", 5.0, 2)], at=T0),
        event(user="u2", kind=order, order=[("c", 1.5, 1)], at=T0 + timedelta(hours=1)),
    )
    await rig.run()
    row = await rig.pool.fetchrow(
        "SELECT * FROM profile.profiles WHERE dataset = $1 AND kind = 'account'"
        " AND profile_id = 'acme'",
        dataset,
    )
    assert row is not None
    assert (row["user_count"], row["order_count"], row["lifetime_value"]) == (2, 3, 21.5)
    assert row["attributes"] == {"industry": "retail"}
    assert row["last_seen"] == T0 + timedelta(hours=1)
    published = [c for c in await rig.published() if c.kind == segment_pb2.SEGMENT_KIND_ACCOUNT]
    assert published[-1].profile_id == "acme"
    assert published[-1].view.lifetime_value == 21.5
    # u2 moves to another account: both accounts' roll-ups follow.
    await rig.send(dataset, event(user="u2", account="globex", at=T0 + timedelta(hours=2)))
    await rig.run()
    rows = await rig.pool.fetch(
        "SELECT profile_id, user_count, order_count, lifetime_value FROM profile.profiles"
        " WHERE dataset = $1 AND kind = 'account' ORDER BY profile_id",
        dataset,
    )
    assert [tuple(r) for r in rows] == [("acme", 1, 1, 10.0), ("globex", 1, 2, 11.5)]
    moved = {c.profile_id: c for c in await rig.published()}
    assert "account" in moved["u2"].changed_keys
    assert moved["u2"].view.account_id == "globex"
    assert moved["acme"].view.order_count == 1


async def test_erasure_removes_every_trace_and_suppresses_later_events(rig: Rig) -> None:
    dataset = new_dataset()
    await register(rig, dataset, count_spec("page_view"))
    await rig.send(
        dataset,
        event(anon="a7", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(
            user="u7",
            anon="a7",
            kind=E.EVENT_TYPE_IDENTIFY,
            at=T0 + timedelta(seconds=1),
            identities=[("email", "u7@example.com")],
            account="acme",
        ),
    )
    await rig.run()
    await rig.published()
    operations = rig.operations()
    record = await operations.erase(dataset, "u7")
    assert record.deleted_event_count == 2
    assert sorted(record.identities) == [
        ("anonymous_id", "a7"),
        ("email", "u7@example.com"),
        ("user_id", "u7"),
    ]
    assert await rig.profile(dataset, "u7") is None
    for table in ("events", "identities", "merges"):
        assert await rig.count(table, dataset, "true") == 0, table
    published = {c.profile_id: c for c in await rig.published()}
    assert published["u7"].type == ERASED
    assert "account" in published["acme"].changed_keys
    account = await rig.pool.fetchrow(
        "SELECT user_count FROM profile.profiles WHERE dataset = $1 AND kind = 'account'",
        dataset,
    )
    assert account is not None
    assert account["user_count"] == 0

    # Later events of any erased identity are counted, never applied.
    await rig.send(
        dataset,
        event(user="u7", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(days=1)),
        event(anon="a7", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(days=1)),
        event(user="u8", kind=E.EVENT_TYPE_IDENTIFY, identities=[("email", "U7@example.com")]),
    )
    await rig.run()
    assert await rig.count("profiles", dataset, "kind = 'user'") == 0
    suppressed = await rig.pool.fetchval(
        "SELECT sum(suppressed_count) FROM profile.erased_identities WHERE dataset = $1", dataset
    )
    assert suppressed == 3

    assert await operations.release(dataset, [("user_id", "u7")]) == 1
    await rig.send(dataset, event(user="u7", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(days=2)))
    await rig.run()
    row = await rig.profile(dataset, "u7")
    assert row is not None
    assert row["event_count"] == 1


async def test_an_erasure_committed_after_a_unit_read_the_identities_suppresses_its_events(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = new_dataset()
    await rig.send(dataset, event(user="u9", kind=E.EVENT_TYPE_PAGE, at=T0))
    await rig.run()
    store = rig.worker.applier.store
    operations = rig.operations()
    read = store.identify
    erased: list[str] = []

    async def erase_once_read(*args: Any) -> Any:
        found = await read(*args)
        if not erased:
            record = await operations.erase(dataset, "u9")
            erased.append(record.profile_id)
        return found

    monkeypatch.setattr(store, "identify", erase_once_read)
    await rig.send(dataset, event(user="u9", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(hours=1)))
    await rig.run()
    assert erased == ["u9"]
    # The unit found the owner it read gone, started over and saw the erasure.
    assert await rig.profile(dataset, "u9") is None
    assert await rig.count("events", dataset) == 0
    suppressed = await rig.pool.fetchval(
        "SELECT sum(suppressed_count) FROM profile.erased_identities WHERE dataset = $1", dataset
    )
    assert suppressed == 1


async def test_concurrent_workers_on_the_same_profiles_lose_nothing(rig: Rig) -> None:
    dataset = new_dataset()
    [pages] = await register(rig, dataset, count_spec("page_view"))
    appliers = [Applier(rig.store, SESSION, cache_bytes=8 << 20) for _ in range(4)]
    batches = [
        [
            Incoming(
                dataset,
                event(
                    user=f"u{(worker + i) % 3}",
                    anon=f"d{i % 5}" if i % 7 == 0 else "",
                    kind=E.EVENT_TYPE_PAGE,
                    at=T0 + timedelta(seconds=worker * 100 + i),
                ),
            )
            for i in range(40)
        ]
        for worker in range(4)
    ]

    async def work(applier: Applier, units: list[Incoming]) -> None:
        for start in range(0, len(units), 8):
            await applier.apply(units[start : start + 8])

    await asyncio.gather(*(work(a, b) for a, b in zip(appliers, batches, strict=True)))
    rows = await rig.pool.fetch(
        "SELECT profile_id, event_count, page_view_count FROM profile.profiles"
        " WHERE dataset = $1 AND kind = 'user'",
        dataset,
    )
    assert sum(r["event_count"] for r in rows) == 160
    counted = 0
    for row in rows:
        counted += (await rig.buckets(dataset, row["profile_id"]))[pages][0]
    assert counted == 160
    assert await rig.count("events", dataset) == 160


async def test_units_grow_from_small_after_an_idle_read(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = new_dataset()
    worker = rig.new_worker("growing")
    sizes: list[int] = []
    apply = worker.applier.apply

    async def recording(items: list[Incoming]) -> Any:
        sizes.append(len(items))
        return await apply(items)

    monkeypatch.setattr(worker.applier, "apply", recording)
    reads: list[int] = []
    read = worker.consumer.read

    async def counting() -> list[Delivery]:
        found = await read()
        reads.append(len(found))
        return found

    monkeypatch.setattr(worker.consumer, "read", counting)

    def visits(count: int, first: int) -> list[event_pb2.Event]:
        return [
            event(user=f"u{n}", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(seconds=n))
            for n in range(first, first + count)
        ]

    running = asyncio.create_task(worker.run())
    try:
        await rig.send(dataset, *visits(1300, 0))
        await eventually(lambda: sum(sizes) == 1300)
        # The first events of the burst went out in a small unit, the rest in larger ones.
        assert sizes == [256, 512, 532]
        await eventually(lambda: reads[-1] == 0)  # idle: the next burst starts small
        await rig.send(dataset, *visits(300, 1300))
        await eventually(lambda: sum(sizes) == 1600)
        assert sizes[3:] == [256, 44]
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert await rig.count("events", dataset) == 1600


async def test_a_new_aggregate_is_backfilled_from_the_history(rig: Rig) -> None:
    dataset = new_dataset()
    cart = E.EVENT_TYPE_CART_UPDATED
    await rig.send(
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u1", kind=cart, cart=[("shoe", 50.0, 1)], at=T0 + timedelta(minutes=1)),
        event(
            user="u1",
            kind=cart,
            cart=[("shoe", 50.0, 2), ("hat", 5.0, 1)],
            at=T0 + timedelta(minutes=2),
        ),
        event(user="u2", kind=E.EVENT_TYPE_PAGE, at=T0),
    )
    await rig.run()
    await rig.published()
    added = count_spec("product_added", function=2, prop="quantity")
    [quantity] = await register(rig, dataset, added)
    assert await rig.buckets(dataset, "u1") == {quantity: (3, 3.0)}
    published = await rig.published()
    assert [(c.profile_id, list(c.changed_keys)) for c in published] == [("u1", ["aggregates"])]
    assert published[0].sequence == 2
    specs = await Registry(rig.pool).page(dataset, "", 10)
    assert [spec.state for spec in specs] == [AGGREGATE_READY]
    # From now on the live path maintains it.
    await rig.send(
        dataset,
        event(
            user="u1",
            kind=cart,
            cart=[("shoe", 50.0, 2), ("hat", 5.0, 4)],
            at=T0 + timedelta(minutes=3),
        ),
    )
    await rig.run()
    assert await rig.buckets(dataset, "u1") == {quantity: (4, 6.0)}


async def test_a_registration_starts_its_backfill_at_once_not_at_the_next_poll(rig: Rig) -> None:
    # A segment needing a new aggregate waits for its backfill before it is active.
    dataset = new_dataset()
    await rig.send(dataset, event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0))
    await rig.run()
    backfiller = Backfiller(
        rig.store, Registry(rig.pool), Publisher(rig.bus), SESSION, page_size=50, pause=0, idle=60
    )
    channels = Channels(ChannelSettings.from_env({}, CommonConfig.from_env({})))
    operations = Operations(
        rig.worker.applier,
        Publisher(rig.bus),
        Memberships(channels, "127.0.0.1:1", 0.1),
        backfill_queued=backfiller.wake,
    )
    running = asyncio.create_task(backfiller.run())
    try:
        await asyncio.sleep(0.2)  # its first look found nothing: it sleeps for a minute
        spec = canonical_spec(count_spec("page_view"))
        spec.aggregate_id = aggregate_id(spec)
        [registered] = await operations.register(dataset, [spec])
        assert registered.state == profile_pb2.AggregateSpec.STATE_BACKFILLING

        async def ready() -> bool:
            specs = await Registry(rig.pool).page(dataset, "", 10)
            return [s.state for s in specs] == [AGGREGATE_READY]

        await eventually(ready, within=10)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert await rig.buckets(dataset, "u1") == {spec.aggregate_id: (1, 0.0)}


async def test_buckets_past_retention_are_pruned(rig: Rig) -> None:
    dataset = new_dataset()
    [recent] = await register(
        rig,
        dataset,
        count_spec("page_view", width=timedelta(hours=1), retention=timedelta(days=1)),
    )
    now = T0
    await rig.send(
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=now - timedelta(days=3)),
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=now - timedelta(hours=2)),
    )
    rig.worker.applier._clock = now.timestamp
    await rig.run()
    hours_ago = micros(now - timedelta(hours=2))
    assert await rig.bucket_starts(dataset, recent) == [hours_ago - hours_ago % HOUR_MICROS]
    assert (await rig.buckets(dataset, "u1")) == {recent: (1, 0.0)}


async def test_a_sweep_deletes_expired_buckets_of_silent_profiles(rig: Rig) -> None:
    dataset = new_dataset()
    [hourly, forever] = await register(
        rig,
        dataset,
        count_spec("page_view", width=timedelta(hours=1), retention=timedelta(days=1)),
        count_spec("page_view"),
    )
    rig.worker.applier._clock = T0.timestamp
    await rig.send(
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 - timedelta(hours=3)),
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 - timedelta(minutes=5)),
    )
    await rig.run()
    assert len(await rig.bucket_starts(dataset, hourly)) == 2
    later = T0 + timedelta(hours=23)
    # Other tests' datasets share the database: the sweep may delete their buckets too.
    assert await Pruner(Registry(rig.pool), interval=1, clock=later.timestamp).sweep() >= 1
    assert len(await rig.bucket_starts(dataset, hourly)) == 1
    assert await rig.buckets(dataset, "u1") == {hourly: (1, 0.0), forever: (2, 0.0)}
    # The unit that next touches the profile drops the swept bucket from its cached state.
    rig.worker.applier._clock = later.timestamp
    await rig.send(dataset, event(user="u1", kind=E.EVENT_TYPE_PAGE, at=later))
    await rig.run()
    assert await rig.buckets(dataset, "u1") == {hourly: (2, 0.0), forever: (3, 0.0)}
    change = (await rig.published())[-1]
    counts = {v.aggregate_id: sum(b.count for b in v.buckets) for v in change.view.aggregates}
    assert counts == {hourly: 2, forever: 3}
