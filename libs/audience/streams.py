"""The bus: partitioned topics on Redis Streams, consumed through consumer groups.

A message is opaque bytes (a protobuf batch of many events: per-entry overhead dominates
otherwise) plus trace-context headers. Delivery is at least once, so handlers are idempotent.

Layout, which anything appending entries itself (the ingest Lua script) must keep:

- A topic has ``partitions`` streams. The stream of ``(namespace, topic, partition)`` is
  the key ``namespace:{topic:partition}``. The namespace leads, so key patterns (ACLs,
  cleanup) select an environment by prefix; the braces are a Redis Cluster hash tag, so a
  partition's stream and any key named ``<stream key>:<suffix>`` (de-dup sets, for
  instance) live in one slot and one Lua script may touch them all.
- An entry has field ``b``, the payload, and field ``h``, the headers as compact JSON
  (``{"traceparent":"00-..."}``), omitted when there are none. A new layout would take new
  field names, never a new meaning for these.
- The partition of a profile key is its 8-byte BLAKE2b digest (``digest_size=8``) read
  big-endian, modulo the partition count: stable across processes, machines and Python
  versions (``hash()`` is salted per process).

Trimming keeps every entry that some group has not acknowledged or not yet read, so it is
safe to run from any number of replicas of any service.

The bus takes a plain (not cluster) client: one ``XREADGROUP`` serves all of a consumer's
partitions, which Redis Cluster allows only within one slot. Under Cluster, each consumer
would read one partition, with a cluster client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT, KeyT, StreamIdT

__all__ = [
    "HEADERS_FIELD",
    "PAYLOAD_FIELD",
    "Bus",
    "Consumer",
    "ConsumerLag",
    "Delivery",
    "Message",
    "decode_entry",
    "entry_fields",
    "partition_of",
    "run_to_end",
    "stream_key",
]

PAYLOAD_FIELD = "b"
"""Entry field holding the message payload."""

HEADERS_FIELD = "h"
"""Entry field holding the headers as compact JSON; absent when there are none."""

_log = logging.getLogger(__name__)

# Counts the entries after an id without sending them to the client. XINFO GROUPS reports
# this as `lag` from Redis 7.0 only; Redis 6.2 (the embedded server) has nothing cheaper.
_COUNT_AFTER = """
local n, cursor = 0, ARGV[1]
while true do
  local batch = redis.call('XRANGE', KEYS[1], '(' .. cursor, '+', 'COUNT', 1000)
  if #batch == 0 then return n end
  n = n + #batch
  cursor = batch[#batch][1]
end
"""

_MAX_SEQ = 2**64 - 1

_EntryId = tuple[int, int]

# KEYS[1]: a stream; ARGV[1]: a group on it; ARGV[2]: milliseconds.
# Deletes the group's consumers that hold no pending entry and have not read for ARGV[2]
# ms; returns how many. In one script, so a consumer cannot read between the check and the
# delete (a deleted consumer's pending entries would be dropped with it).
_FORGET_CONSUMERS = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do
    info[consumer[i]] = consumer[i + 1]
  end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""

# Seconds between a cancelled read's CLIENT UNBLOCKs: one sent before Redis started the
# read's wait does nothing, so it is sent again until the read ends.
_UNBLOCK_RETRY = 0.05

_T = TypeVar("_T")


def stream_key(namespace: str, topic: str, partition: int) -> str:
    """Returns the stream key of one partition of a topic; see the module docstring."""
    _check_name(namespace)
    _check_name(topic)
    if partition < 0:
        raise ValueError(f"partition must not be negative, got {partition}")
    return f"{namespace}:{{{topic}:{partition}}}"


def partition_of(key: str | bytes, partitions: int) -> int:
    """Returns the partition of a profile key, the same in every process."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    data = key.encode() if isinstance(key, str) else key
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def entry_fields(payload: bytes, headers: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """Returns the fields of the stream entry that carries a message, in order.

    Flattened (``[f for pair in fields.items() for f in pair]``) these are the field/value
    arguments of an ``XADD`` issued from a Lua script.
    """
    fields = {PAYLOAD_FIELD: payload}
    if headers:
        fields[HEADERS_FIELD] = json.dumps(
            dict(headers), separators=(",", ":"), ensure_ascii=False
        ).encode()
    return fields


def decode_entry(fields: Mapping[bytes, bytes]) -> tuple[bytes, dict[str, str]]:
    """Returns the payload and headers of an entry written as ``entry_fields`` writes them.

    Raises:
        ValueError: the entry does not have the bus layout.
    """
    try:
        payload = fields[PAYLOAD_FIELD.encode()]
    except KeyError:
        raise ValueError(f"entry has no {PAYLOAD_FIELD!r} field") from None
    raw = fields.get(HEADERS_FIELD.encode())
    if raw is None:
        return payload, {}
    headers = json.loads(raw)
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError(f"entry field {HEADERS_FIELD!r} is not a JSON object of strings")
    return payload, headers


@dataclass(frozen=True, slots=True)
class Message:
    """A message to publish to one partition of a topic."""

    topic: str
    partition: int
    payload: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as a consumer receives it.

    Attributes:
        delivery_count: how many times the group has handed this entry out, this time
            included; None when Redis no longer reports it (another consumer claimed it
            meanwhile).
    """

    topic: str
    partition: int
    entry_id: str
    payload: bytes
    headers: Mapping[str, str]
    delivery_count: int | None


def _raise_if_cancelled() -> None:
    """Raises the current task's cancellation if it was requested but not raised.

    :meth:`Consumer.read` returns what it read when cancelled, and Python 3.11's
    ``asyncio.wait_for``, which redis-py sends commands through when a socket timeout is
    set (as by default), can swallow a cancellation that arrives as the command completes
    (CPython gh-86296, fixed in 3.12): either way a loop around the bus would never stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def run_to_end(step: Awaitable[_T]) -> _T:
    """Awaits ``step`` to its end even if the calling task is cancelled meanwhile, then
    raises the cancellation.

    A consumer handles and acknowledges what it read this way. Cancelled halfway, at a
    SIGTERM, it would leave those entries pending under its own consumer name; the process
    that replaces it (a new pod, a new name) does not resume them but takes them over
    only after ``claim_idle``, behind the entries read since. :meth:`Consumer.read` keeps
    the same promise for the read itself.
    """
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            _log.warning("a step finished after cancellation failed", exc_info=task.exception())
        raise


def _check_name(name: str) -> None:
    if not name or "{" in name or "}" in name:
        raise ValueError(f"bus names must be non-empty and brace-free, got {name!r}")


def _parse_id(entry_id: str | bytes) -> _EntryId:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: _EntryId) -> _EntryId:
    ms, seq = entry_id
    return (ms + 1, 0) if seq == _MAX_SEQ else (ms, seq + 1)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_entries(response: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """Returns the (stream, entries) pairs of an XREADGROUP reply; none when it timed out."""
    return [(stream, entries) for stream, entries in response or []]


class Bus:
    """Publishes to, declares and trims the partitioned topics of one namespace.

    The caller owns the Redis client and its pool. A consumer's read holds a pooled
    connection for up to its block time, so size the pool for the consumers plus the
    concurrent publishers.
    """

    def __init__(self, redis: Redis, *, namespace: str, partitions: int) -> None:
        """Binds the bus to a client.

        Args:
            redis: a client giving redis-py's default replies: bytes (``decode_responses``
                off) in the RESP2 shapes (no ``protocol=3``, no ``legacy_responses=False``).
            namespace: prefixes every key, so environments and tests can share a server.
            partitions: the partition count of every topic. Changing it moves profiles
                between partitions, so it is fixed for the life of the data.
        """
        options = redis.connection_pool.connection_kwargs
        if options.get("decode_responses"):
            raise ValueError("the bus needs a Redis client with decode_responses=False")
        if str(options.get("protocol") or 2) != "2" or not options.get("legacy_responses", True):
            raise ValueError("the bus needs a Redis client with the default RESP2 replies")
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        _check_name(namespace)
        self.redis = redis
        self.namespace = namespace
        self.partitions = partitions
        self._count_after = redis.register_script(_COUNT_AFTER)
        self._forget_consumers = redis.register_script(_FORGET_CONSUMERS)

    def stream_key(self, topic: str, partition: int) -> str:
        """Returns the stream key of one of this bus's partitions."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} is not in [0, {self.partitions})")
        return stream_key(self.namespace, topic, partition)

    def partition_of(self, key: str | bytes) -> int:
        """Returns the partition of a profile key."""
        return partition_of(key, self.partitions)

    async def declare(self, topic: str, groups: Iterable[str]) -> None:
        """Creates every partition stream of a topic and the groups that consume it.

        Groups start at the beginning of the stream. Declaring again is harmless, so every
        service declares what it publishes and consumes at start, before publishing.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for group in groups:
                for partition in range(self.partitions):
                    pipe.xgroup_create(self.stream_key(topic, partition), group, "0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, ResponseError) and not str(result).startswith("BUSYGROUP"):
                raise result

    async def publish(
        self,
        topic: str,
        key: str | bytes,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Appends a message to the partition of a profile key; returns its entry id."""
        fields: dict[FieldT, EncodableT] = dict(entry_fields(payload, headers).items())
        entry_id = await self.redis.xadd(self.stream_key(topic, self.partition_of(key)), fields)
        return _text(entry_id)

    async def publish_batch(self, messages: Iterable[Message]) -> list[str]:
        """Appends messages to their partitions in one round trip; returns their entry ids.

        Each append is atomic but the batch is not: after an error some messages may have
        been appended, and retrying the batch publishes those again (at least once).
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for message in messages:
                fields: dict[FieldT, EncodableT] = dict(
                    entry_fields(message.payload, message.headers).items()
                )
                pipe.xadd(self.stream_key(message.topic, message.partition), fields)
            entry_ids = await pipe.execute()
        return [_text(entry_id) for entry_id in entry_ids]

    def consumer(
        self,
        topic: str,
        group: str,
        name: str,
        *,
        partitions: Collection[int] | None = None,
        count: int = 100,
        block: float = 2.0,
        claim_idle: float = 60.0,
        claim_interval: float = 10.0,
    ) -> Consumer:
        """Returns a consumer of a topic's partitions, all of them by default.

        Args:
            topic: the topic to read.
            group: the consumer group, declared beforehand.
            name: the consumer's name in the group; a consumer started again under the
                same name resumes the entries it held unacknowledged.
            partitions: the partitions to read, for replicas that own partitions statically.
            count: the most entries a read returns per partition.
            block: seconds a read waits for new entries.
            claim_idle: seconds an entry stays unacknowledged before another consumer
                takes it over.
            claim_interval: seconds between looks for entries to take over.
        """
        return Consumer(
            self,
            topic,
            group,
            name,
            partitions=range(self.partitions) if partitions is None else partitions,
            count=count,
            block=block,
            claim_idle=claim_idle,
            claim_interval=claim_interval,
        )

    async def backlog(self, topic: str, group: str) -> int:
        """Returns how many entries of a topic the group has not acknowledged yet.

        Exact: entries handed out and not acknowledged plus entries not yet read. Redis
        7 reports the unread part; on Redis 6.2 it is counted in the server, in time
        proportional to it.

        Raises:
            LookupError: the group is not declared on some partition.
        """
        return sum(await self.partition_backlogs(topic, group))

    async def partition_backlogs(self, topic: str, group: str) -> list[int]:
        """Returns :meth:`backlog` per partition, by partition number: the group's lag.

        Raises:
            LookupError: the group is not declared on some partition.
        """
        keys = [self.stream_key(topic, p) for p in range(self.partitions)]
        backlogs: list[int] = []
        to_count: list[tuple[int, str, bytes]] = []
        for partition, (key, groups) in enumerate(
            zip(keys, await self._group_infos(keys), strict=True)
        ):
            info = groups.get(group) if groups is not None else None
            if info is None:
                raise LookupError(f"group {group!r} is not declared on {key}")
            backlogs.append(int(info["pending"]))
            if info.get("lag") is not None:
                backlogs[partition] += int(info["lag"])
            else:
                to_count.append((partition, key, info["last-delivered-id"]))
        if to_count:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, key, last_delivered in to_count:
                    await self._count_after(keys=[key], args=[last_delivered], client=pipe)
                counted = await pipe.execute()
            for (partition, _, _), unread in zip(to_count, counted, strict=True):
                backlogs[partition] += int(unread)
        return backlogs

    async def trim(self, topic: str, groups: Collection[str]) -> int:
        """Drops the entries of a topic that every group has acknowledged.

        A partition is trimmed up to the oldest entry any group on it still needs: that
        group's oldest pending entry, or the first after its last-delivered one. A
        partition missing one of ``groups``, or having no group at all, is left alone.

        Returns:
            The number of entries removed.
        """
        keys = [self.stream_key(topic, p) for p in range(self.partitions)]
        needed: dict[str, list[_EntryId]] = {}
        # Groups with pending entries: their oldest pending id takes an XPENDING to learn.
        pending: list[tuple[str, str, _EntryId]] = []
        for key, found in zip(keys, await self._group_infos(keys), strict=True):
            if not found or any(group not in found for group in groups):
                continue
            needed[key] = []
            for name, info in found.items():
                after_last = _next_id(_parse_id(info["last-delivered-id"]))
                if int(info["pending"]):
                    pending.append((key, name, after_last))
                else:
                    needed[key].append(after_last)
        if pending:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, name, _ in pending:
                    pipe.xpending(key, name)
                summaries = await pipe.execute()
            # A group that acknowledged everything meanwhile has no oldest pending entry;
            # its last-delivered id read above stays a safe bound, as groups only advance.
            for (key, _, after_last), summary in zip(pending, summaries, strict=True):
                oldest = summary["min"]
                needed[key].append(after_last if oldest is None else _parse_id(oldest))
        if not needed:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, points in needed.items():
                ms, seq = min(points)
                pipe.xtrim(key, minid=f"{ms}-{seq}", approximate=False)
            return sum(int(n) for n in await pipe.execute())

    async def forget_consumers(self, topic: str, groups: Collection[str], idle: float) -> int:
        """Deletes the consumers of a topic's groups that hold no pending entry and have
        not read for ``idle`` seconds; returns how many.

        Every replica that ever started left its consumer names in the groups (a new pod
        has a new name), and Redis keeps a consumer until it is deleted. A live consumer
        reads every few seconds, and one holding entries is never deleted, so an ``idle``
        of an hour takes only the dead; one that reads again is made anew by its read.
        """
        keys = [self.stream_key(topic, p) for p in range(self.partitions)]
        removed = 0
        for key, found in zip(keys, await self._group_infos(keys), strict=True):
            for group in groups:
                if found is not None and group in found:
                    forgotten = await self._forget_consumers(
                        keys=[key], args=[group, round(idle * 1000)]
                    )
                    removed += int(forgotten)
        return removed

    async def trim_forever(
        self,
        topics: Mapping[str, Collection[str]],
        *,
        interval: float = 30.0,
        forget_after: float = 3600.0,
    ) -> NoReturn:
        """Trims topics every ``interval`` seconds until cancelled, and forgets their dead
        consumers (:meth:`forget_consumers` after ``forget_after`` seconds); Redis errors
        are logged.

        Args:
            topics: each topic with the groups declared on it.
            interval: seconds between passes.
            forget_after: seconds a consumer with nothing pending may go without reading
                before it is deleted.
        """
        while True:
            for topic, groups in topics.items():
                try:
                    removed = await self.trim(topic, groups)
                    forgotten = await self.forget_consumers(topic, groups, forget_after)
                except RedisError:
                    _log.warning("trimming topic %s failed; will retry", topic, exc_info=True)
                else:
                    _log.debug(
                        "trimmed %d entries from topic %s; forgot %d consumers",
                        removed,
                        topic,
                        forgotten,
                    )
                _raise_if_cancelled()
            await asyncio.sleep(interval)

    async def _group_infos(self, keys: Sequence[str]) -> list[dict[str, dict[str, Any]] | None]:
        """Returns XINFO GROUPS of each stream by group name; None for a missing stream."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xinfo_groups(key)
            results = await pipe.execute(raise_on_error=False)
        infos: list[dict[str, dict[str, Any]] | None] = []
        for result in results:
            if isinstance(result, ResponseError):
                if "no such key" not in str(result).lower():
                    raise result
                infos.append(None)
            else:
                infos.append({_text(g["name"]): g for g in result})
        return infos


class Consumer:
    """A named member of a consumer group, reading a set of a topic's partitions.

    ``read`` returns, in this order of preference:

    1. on start, the entries this consumer name was handed before and never acknowledged,
       so a restarted consumer resumes its own work;
    2. every ``claim_interval`` seconds, entries any consumer of the group has held for
       ``claim_idle`` seconds without acknowledging them (``XAUTOCLAIM``): the work of a
       consumer that died;
    3. new entries, waiting up to ``block`` seconds for some.

    ``claim_idle`` must exceed the longest time a live consumer takes over a batch, or its
    batches are handed out twice. ``block`` must stay under the client's ``socket_timeout``
    (5 seconds unless configured, in redis-py), or reads time out.
    """

    def __init__(
        self,
        bus: Bus,
        topic: str,
        group: str,
        name: str,
        *,
        partitions: Collection[int],
        count: int,
        block: float,
        claim_idle: float,
        claim_interval: float,
    ) -> None:
        if not partitions:
            raise ValueError("a consumer needs at least one partition")
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if min(block, claim_idle, claim_interval) <= 0:
            raise ValueError("block, claim_idle and claim_interval must be positive seconds")
        self.bus = bus
        self.topic = topic
        self.group = group
        self.name = name
        self.count = count
        self.block = block
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval
        self._partition_of_key = {bus.stream_key(topic, p).encode(): p for p in sorted(partitions)}
        self._keys = [key.decode() for key in self._partition_of_key]
        # Cursor through this consumer's own pending entries, per stream not yet exhausted.
        self._history: dict[str, str] = dict.fromkeys(self._keys, "0-0")
        # XAUTOCLAIM cursor per stream still being swept; empty between sweeps.
        self._claiming: dict[str, str] = {}
        self._next_sweep = 0.0
        # Redis's id for the connection of a read waiting for new entries; None otherwise.
        self._waiting_client: int | None = None

    @property
    def partitions(self) -> list[int]:
        return list(self._partition_of_key.values())

    async def read(self) -> list[Delivery]:
        """Returns the next deliveries, up to ``count`` per partition; empty if none came.

        Cancelled, a read still returns what Redis handed it, and the caller's next read
        raises the cancellation: entries Redis assigned to this consumer as the read was
        cancelled would otherwise stay pending under a name that a stopping process never
        uses again, until another consumer took them over after ``claim_idle``. A read
        waiting for new entries is ended at once (``CLIENT UNBLOCK``), so stopping does not
        wait out ``block``. Cancelled again while it finishes, the read gives up and its
        entries are left to ``claim_idle``.
        """
        _raise_if_cancelled()
        step = asyncio.ensure_future(self._next())
        try:
            return await asyncio.shield(step)
        except asyncio.CancelledError:
            while not step.done():
                if self._waiting_client is not None:
                    with contextlib.suppress(RedisError):
                        await self.bus.redis.client_unblock(self._waiting_client)
                await asyncio.wait([step], timeout=_UNBLOCK_RETRY)
            return step.result()

    async def _next(self) -> list[Delivery]:
        if self._history:
            deliveries = await self._read_history()
            if deliveries:
                return deliveries
        if not self._claiming and time.monotonic() >= self._next_sweep:
            self._claiming = dict.fromkeys(self._keys, "0-0")
        if self._claiming:
            deliveries = await self._claim()
            if deliveries:
                return deliveries
        return await self._read_new()

    async def _read_new(self) -> list[Delivery]:
        """``XREADGROUP`` of new entries, waiting up to ``block``, on a connection whose
        Redis client id :meth:`read` knows while it waits, to end the wait if cancelled.

        The id is asked in the same round trip (``CLIENT ID`` ahead of the read), as a
        reconnection changes it.
        """
        command = [
            ("CLIENT", "ID"),
            (
                "XREADGROUP",
                "GROUP",
                self.group,
                self.name,
                "COUNT",
                self.count,
                "BLOCK",
                max(1, round(self.block * 1000)),
                "STREAMS",
                *self._keys,
                *[">"] * len(self._keys),
            ),
        ]
        pool = self.bus.redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:

            async def exchange() -> Any:
                await connection.send_packed_command(connection.pack_commands(command))
                try:
                    self._waiting_client = await connection.read_response()
                    return await connection.read_response()
                except BaseException:
                    # The read's reply may still be on its way: no other command may
                    # take this connection and read it as its own.
                    await connection.disconnect()
                    raise
                finally:
                    self._waiting_client = None

            async def disconnect(error: Exception) -> None:
                await connection.disconnect()

            # Retried as redis-py retries a command: on a lost connection, anew.
            response = await connection.retry.call_with_retry(exchange, disconnect)
        finally:
            await pool.release(connection)
        # Raw, the reply is a map of streams under RESP3 (redis-py 8 speaks it when it can)
        # and a list of pairs under RESP2.
        streams = response.items() if isinstance(response, dict) else response or []
        return [
            self._delivery(stream, entry_id, dict(zip(fields[::2], fields[1::2], strict=True)), 1)
            for stream, entries in streams
            for entry_id, fields in entries
        ]

    async def ack(self, deliveries: Iterable[Delivery]) -> int:
        """Acknowledges deliveries in one round trip; returns how many were still pending."""
        by_key: defaultdict[str, list[str]] = defaultdict(list)
        for delivery in deliveries:
            key = self.bus.stream_key(delivery.topic, delivery.partition)
            by_key[key].append(delivery.entry_id)
        return await self._ack(by_key)

    async def _ack(self, by_key: Mapping[str, Sequence[str | bytes]]) -> int:
        if not by_key:
            return 0
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for key, entry_ids in by_key.items():
                pipe.xack(key, self.group, *entry_ids)
            return sum(int(n) for n in await pipe.execute())

    async def _read_history(self) -> list[Delivery]:
        streams: dict[KeyT, StreamIdT] = dict(self._history.items())
        response = await self.bus.redis.xreadgroup(self.group, self.name, streams, count=self.count)
        found: list[tuple[bytes, bytes, dict[bytes, bytes]]] = []
        # Entries deleted from under the group come back without fields; they can never be
        # handled, and left pending they would hold back trimming for good.
        gone: defaultdict[str, list[bytes]] = defaultdict(list)
        exhausted = set(self._history)
        for stream, entries in _stream_entries(response):
            key = stream.decode()
            if len(entries) == self.count:
                exhausted.discard(key)
                self._history[key] = entries[-1][0].decode()
            for entry_id, fields in entries:
                if fields:
                    found.append((stream, entry_id, fields))
                else:
                    gone[key].append(entry_id)
        for key in exhausted:
            del self._history[key]
        if gone:
            _log.warning("acknowledging pending entries deleted outside the bus: %s", dict(gone))
            await self._ack(gone)
        return await self._with_delivery_counts(found)

    async def _claim(self) -> list[Delivery]:
        idle_ms = round(self.claim_idle * 1000)
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for key, cursor in self._claiming.items():
                pipe.xautoclaim(key, self.group, self.name, idle_ms, cursor, count=self.count)
            replies = await pipe.execute()
        found: list[tuple[bytes, bytes, dict[bytes, bytes]]] = []
        for key, reply in zip(list(self._claiming), replies, strict=True):
            cursor = _text(reply[0])
            if cursor == "0-0":
                del self._claiming[key]
            else:
                self._claiming[key] = cursor
            for entry_id, fields in reply[1]:
                if entry_id is None:
                    # Redis 6.2 hands out an entry deleted from under the group as nil and
                    # leaves it pending (7.0 drops it); reading our own pending entries
                    # again finds its id, to acknowledge it.
                    self._history.setdefault(key, "0-0")
                else:
                    found.append((key.encode(), entry_id, fields))
        if not self._claiming:
            self._next_sweep = time.monotonic() + self.claim_interval
        return await self._with_delivery_counts(found)

    async def _with_delivery_counts(
        self, found: Sequence[tuple[bytes, bytes, dict[bytes, bytes]]]
    ) -> list[Delivery]:
        """Makes deliveries of entries handed out before, asking Redis how many times."""
        if not found:
            return []
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for stream, entry_id, _ in found:
                pipe.xpending_range(stream, self.group, entry_id, entry_id, 1, self.name)
            details = await pipe.execute()
        return [
            self._delivery(stream, entry_id, fields, int(d[0]["times_delivered"]) if d else None)
            for (stream, entry_id, fields), d in zip(found, details, strict=True)
        ]

    def _delivery(
        self,
        stream: bytes,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        delivery_count: int | None,
    ) -> Delivery:
        payload, headers = decode_entry(fields)
        return Delivery(
            topic=self.topic,
            partition=self._partition_of_key[stream],
            entry_id=entry_id.decode(),
            payload=payload,
            headers=headers,
            delivery_count=delivery_count,
        )


class ConsumerLag:
    """Reports how far a consumer group is behind on a topic, per partition.

    The gauge ``audience.bus.consumer.lag`` (entries not yet acknowledged: handed out or
    not yet read) is observed from the figures :meth:`run` measures every ``interval``,
    since a metric reader observes from its own thread and cannot ask Redis.

    Args:
        bus: the bus the group consumes.
        meter: the consuming service's meter.
        topic: the topic consumed.
        group: the consumer group.
        interval: seconds between measurements.
    """

    def __init__(
        self, bus: Bus, meter: Meter, *, topic: str, group: str, interval: float = 10.0
    ) -> None:
        self._bus = bus
        self._topic = topic
        self._group = group
        self._interval = interval
        self._attributes = [
            {
                "messaging.destination.name": topic,
                "messaging.consumer.group.name": group,
                "messaging.destination.partition.id": str(partition),
            }
            for partition in range(bus.partitions)
        ]
        self._lags: list[int] = []
        meter.create_observable_gauge(
            "audience.bus.consumer.lag",
            callbacks=[self._observe],
            unit="{entry}",
            description="Entries of a topic partition the consumer group has not acknowledged.",
        )

    def _observe(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(lag, attributes)
            for lag, attributes in zip(self._lags, self._attributes, strict=False)
        ]

    async def measure(self) -> list[int]:
        """Measures the lag of every partition now and keeps the figures."""
        self._lags = await self._bus.partition_backlogs(self._topic, self._group)
        return self._lags

    async def run(self) -> NoReturn:
        """Measures every interval until cancelled; a failed measurement keeps the last."""
        while True:
            try:
                await self.measure()
            except (RedisError, OSError, LookupError) as error:
                _log.warning(
                    "measuring the lag of %s on %s failed: %s", self._group, self._topic, error
                )
            _raise_if_cancelled()
            await asyncio.sleep(self._interval)
