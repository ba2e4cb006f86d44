"""The profile service's outbox on real PostgreSQL and Redis: a merge, an erasure or a
backfill page whose publish failed after the commit is published by the relay."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from audience import errors
from audience.rules.aggregates import aggregate_id, canonical_spec
from audience.streams import Bus
from audience.v1 import event_pb2
from services.profile.backfill import Backfiller
from services.profile.consumer import Publisher, is_infrastructure
from services.profile.operations import Operations
from services.profile.outbox import Outbox
from services.profile.store import Registry
from tests.e2e.conftest import new_dataset
from tests.integration import test_profile_consumer as consumer_tests
from tests.integration.test_profile_consumer import (
    ERASED,
    MERGED,
    PARTITIONS,
    SESSION,
    UPDATED,
    Rig,
)
from tests.profile_support import T0, E, count_spec, event

pytestmark = pytest.mark.integration

# The consumer tests' fixtures: the profile schema's pool and the rig built on it.
profile_pool = consumer_tests.profile_pool
rig = consumer_tests.rig

NOW = timedelta(0)


@pytest.fixture
async def dead_publisher(key_prefix: str) -> AsyncIterator[Publisher]:
    """A publisher whose Redis is a port nothing listens on: every publish fails to
    connect."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    yield Publisher(Bus(redis, namespace=key_prefix, partitions=PARTITIONS))
    await redis.aclose()


async def applied(rig: Rig, dataset: str, *events: event_pb2.Event) -> None:
    """Has the unit apply ``events`` and takes what it published off the stream."""
    await rig.send(dataset, *events)
    await rig.run()
    await rig.published()


def relay_outbox(rig: Rig) -> Outbox:
    return Outbox(rig.store, Publisher(rig.bus))


async def relay_all(rig: Rig) -> int:
    """Relays everything recorded so far, whatever its age; returns how many rows."""
    outbox = relay_outbox(rig)
    total = 0
    while taken := await outbox.relay(NOW, 500):
        total += taken
    return total


async def outbox_rows(rig: Rig, dataset: str) -> list[tuple[str, str, int, str, str | None]]:
    rows = await rig.pool.fetch(
        "SELECT kind, subject_id, sequence, change_type, merged_into FROM profile.outbox"
        " WHERE dataset = $1 ORDER BY outbox_id",
        dataset,
    )
    return [tuple(row) for row in rows]


def failing_operations(rig: Rig, publisher: Publisher) -> Operations:
    healthy = rig.operations()
    return Operations(rig.worker.applier, publisher, healthy.memberships)


async def sequence_of(rig: Rig, dataset: str, profile_id: str) -> int:
    row = await rig.profile(dataset, profile_id)
    assert row is not None
    return int(row["sequence"])


async def account_sequence(rig: Rig, dataset: str) -> int:
    return int(
        await rig.pool.fetchval(
            "SELECT sequence FROM profile.profiles WHERE dataset = $1 AND kind = 'account'",
            dataset,
        )
    )


async def test_a_merge_whose_publish_failed_is_published_by_the_relay(
    rig: Rig, dead_publisher: Publisher
) -> None:
    dataset = new_dataset()
    await applied(
        rig,
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u2", kind=E.EVENT_TYPE_PAGE, at=T0, account="acme"),
    )
    source_before = await sequence_of(rig, dataset, "u2")

    with pytest.raises(RedisError) as raised:
        await failing_operations(rig, dead_publisher).merge(dataset, "u1", ["u2"])

    assert is_infrastructure(raised.value)
    assert await rig.profile(dataset, "u2") is None
    assert await rig.published() == []
    target_sequence = await sequence_of(rig, dataset, "u1")
    assert await outbox_rows(rig, dataset) == [
        ("user", "u1", target_sequence, "updated", None),
        ("user", "u2", source_before + 1, "merged", "u1"),
        ("account", "acme", 2, "updated", None),
    ]
    # A retried call cannot publish it: the source is gone.
    with pytest.raises(errors.AudienceError) as retried:
        await rig.operations().merge(dataset, "u1", ["u2"])
    assert retried.value.reason == "PROFILE_MERGED"
    # Too recent for the relay while its caller may still be publishing.
    assert await relay_outbox(rig).relay(timedelta(hours=1), 500) == 0

    assert await relay_all(rig) >= 3

    published = {c.profile_id: c for c in await rig.published() if c.dataset == dataset}
    merged = published["u2"]
    assert (merged.type, merged.sequence, merged.merged_into) == (MERGED, source_before + 1, "u1")
    assert not merged.HasField("view")
    target = published["u1"]
    assert (target.type, target.sequence) == (UPDATED, target_sequence)
    assert (list(target.event_ids), list(target.changed_keys)) == ([], [])
    row = await rig.profile(dataset, "u1")
    assert row is not None
    assert (target.view.visit_count, target.view.account_id) == (row["visit_count"], "acme")
    account = published["acme"]
    assert (account.type, account.sequence) == (UPDATED, await account_sequence(rig, dataset))
    assert account.view.last_seen_time == target.view.last_seen_time
    assert await outbox_rows(rig, dataset) == []


async def test_an_erasure_whose_publish_failed_is_published_by_the_relay(
    rig: Rig, dead_publisher: Publisher
) -> None:
    dataset = new_dataset()
    await applied(rig, dataset, event(user="u7", kind=E.EVENT_TYPE_PAGE, at=T0, account="acme"))
    before = await sequence_of(rig, dataset, "u7")

    with pytest.raises(RedisError) as raised:
        await failing_operations(rig, dead_publisher).erase(dataset, "u7")

    assert is_infrastructure(raised.value)
    assert await rig.profile(dataset, "u7") is None
    with pytest.raises(errors.AudienceError) as retried:
        await rig.operations().erase(dataset, "u7")
    assert retried.value.code == grpc.StatusCode.NOT_FOUND
    await relay_all(rig)

    published = {c.profile_id: c for c in await rig.published() if c.dataset == dataset}
    erased = published["u7"]
    assert (erased.type, erased.sequence, erased.merged_into) == (ERASED, before + 1, "")
    assert not erased.HasField("view")
    account = published["acme"]
    assert (account.type, account.sequence) == (UPDATED, await account_sequence(rig, dataset))
    assert account.HasField("view")
    assert await outbox_rows(rig, dataset) == []


async def test_a_merge_that_publishes_leaves_the_outbox_empty_and_publishes_once(
    rig: Rig,
) -> None:
    dataset = new_dataset()
    await applied(
        rig,
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u2", kind=E.EVENT_TYPE_PAGE, at=T0),
    )

    await rig.operations().merge(dataset, "u1", ["u2"])

    assert await outbox_rows(rig, dataset) == []
    published = [c for c in await rig.published() if c.dataset == dataset]
    assert sorted((c.profile_id, c.type) for c in published) == [("u1", UPDATED), ("u2", MERGED)]
    await relay_all(rig)
    assert [c for c in await rig.published() if c.dataset == dataset] == []


async def test_a_backfill_page_whose_publish_failed_is_published_with_the_current_view(
    rig: Rig, dead_publisher: Publisher
) -> None:
    dataset = new_dataset()
    await applied(
        rig,
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(minutes=1)),
        event(user="u2", name="signup", at=T0),
    )
    spec = canonical_spec(count_spec("page_view"))
    spec.aggregate_id = aggregate_id(spec)
    await Registry(rig.pool).register(dataset, [spec])
    failing = Backfiller(
        rig.store, Registry(rig.pool), dead_publisher, SESSION, page_size=50, pause=0
    )

    with pytest.raises(RedisError) as raised:
        await failing.step()

    assert is_infrastructure(raised.value)
    # Only u1 has page views: u2's aggregates did not move.
    assert await outbox_rows(rig, dataset) == [("user", "u1", 2, "updated", None)]
    # The page is done: the backfill goes on past it and never publishes it again.
    healthy = Backfiller(
        rig.store, Registry(rig.pool), Publisher(rig.bus), SESSION, page_size=50, pause=0
    )
    while await healthy.step():
        pass
    assert [c for c in await rig.published() if c.dataset == dataset] == []
    # Meanwhile u1 moves on: the relay publishes its view as it is now.
    await applied(
        rig, dataset, event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(hours=1))
    )

    await relay_all(rig)

    [change] = [c for c in await rig.published() if c.dataset == dataset]
    assert (change.profile_id, change.type, change.sequence) == ("u1", UPDATED, 3)
    assert (list(change.event_ids), list(change.changed_keys)) == ([], [])
    counts = {v.aggregate_id: sum(b.count for b in v.buckets) for v in change.view.aggregates}
    assert counts == {spec.aggregate_id: 3}
    assert await outbox_rows(rig, dataset) == []


async def test_an_updated_subject_gone_since_is_not_published(
    rig: Rig, dead_publisher: Publisher
) -> None:
    dataset = new_dataset()
    await applied(
        rig,
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u2", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u3", kind=E.EVENT_TYPE_PAGE, at=T0),
    )
    with pytest.raises(RedisError) as raised:
        await failing_operations(rig, dead_publisher).merge(dataset, "u1", ["u2"])
    assert is_infrastructure(raised.value)
    # The target is merged away in turn before the relay runs.
    await rig.operations().merge(dataset, "u3", ["u1"])
    await rig.published()

    await relay_all(rig)

    published = [(c.profile_id, c.type) for c in await rig.published() if c.dataset == dataset]
    assert published == [("u2", MERGED)]
    assert await outbox_rows(rig, dataset) == []


async def test_replicas_relay_each_change_once_and_take_over_a_dead_relays_rows(
    rig: Rig, dead_publisher: Publisher
) -> None:
    dataset = new_dataset()
    await applied(
        rig,
        dataset,
        event(user="u1", kind=E.EVENT_TYPE_PAGE, at=T0),
        event(user="u2", kind=E.EVENT_TYPE_PAGE, at=T0),
    )
    with pytest.raises(RedisError):
        await failing_operations(rig, dead_publisher).merge(dataset, "u1", ["u2"])
    backdate = "UPDATE profile.outbox SET record_time = record_time - interval '1 hour'"
    await rig.pool.execute(backdate + " WHERE dataset = $1", dataset)
    grace = timedelta(minutes=1)

    # A relay that claims the rows and cannot publish them: they stay, and other relays
    # leave them alone for a grace period.
    with pytest.raises(RedisError):
        await Outbox(rig.store, dead_publisher).relay(grace, 500)
    assert len(await outbox_rows(rig, dataset)) == 2
    assert await relay_outbox(rig).relay(grace, 500) == 0
    await rig.pool.execute(
        "UPDATE profile.outbox SET claim_time = claim_time - interval '1 hour' WHERE dataset = $1",
        dataset,
    )

    taken = await asyncio.gather(*(relay_outbox(rig).relay(grace, 500) for _ in range(4)))

    assert sum(taken) >= 2
    published = [(c.profile_id, c.type) for c in await rig.published() if c.dataset == dataset]
    assert sorted(published) == [("u1", UPDATED), ("u2", MERGED)]
    assert await outbox_rows(rig, dataset) == []
