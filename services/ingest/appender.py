"""Appends accepted events to the ``events`` topic, de-duplicated, in one script per partition.

For each partition a batch touches, one Lua script runs atomically in Redis:

1. the event ids are looked up, with one ``HMGET`` each, in the two de-dup hashes that can
   hold an id seen within the window (below); an id found there, or earlier in the same
   call, is a duplicate;
2. the others are written to the current hash (one ``HSET``) with Redis's time;
3. their records, concatenated, become one ``EventBatch`` entry (``XADD`` with the bus
   layout: field ``b`` the payload, ``h`` the trace headers);
4. should that ``XADD`` fail, the ids just written are deleted (``HDEL``) before the
   script returns the error.

So an event is never marked seen without being appended, and the script being atomic, no
other call can slip between the check and the append: no event is appended twice within
the window. Redis refuses a script's write for lack of memory only at its first write (the
``HSET``), before anything changed; after that the ``XADD`` can fail only on a key of the
wrong type, which step 4 undoes (``HDEL`` is always allowed).

The de-dup hashes of a dataset on a partition are ``<stream key>:dedup:<dataset>:<slice>``,
the slice being Redis's time in milliseconds divided by the window, rounded down: each id
accepted during one slice is a field of its hash, its value the time it was accepted. An
id accepted less than a window ago is in the current slice's hash or the previous one's,
with its time, so the window is exact: an id found in the previous slice's hash is a
duplicate only if its time is within the window. Once a slice is two behind, none of its
ids can be within the window: the next script on that hash's partition and dataset
unlinks it (Redis frees a large value in the background on ``UNLINK``, where an expiry
would free it in the main thread, a few tenths of a second per million ids, unless Redis
runs with ``lazyfree-lazy-expire``); an expiry at the end of the third slice is there for
a dataset that stopped sending. One field costs about 100 bytes of Redis memory for a
36-character id, against 165 for a key of its own with an expiry, and one command per call
writes them all. The keys share the stream's hash tag, so under Redis Cluster they live in
the script's slot (the script names them from its own clock, so only the stream is
declared).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain
from typing import cast

from redis.exceptions import NoScriptError, RedisError, ResponseError

from audience import errors
from audience.streams import HEADERS_FIELD, PAYLOAD_FIELD, Bus

__all__ = ["EVENTS_TOPIC", "Appender", "PartitionBatch", "dedup_prefix"]

EVENTS_TOPIC = "events"

_log = logging.getLogger(__name__)

# Bounds the cache of encoded de-dup keys by partition and dataset.
_CACHE_LIMIT = 100_000

# KEYS[1]: the partition's stream.
# ARGV[1]: the window in milliseconds; ARGV[2]: the headers JSON, '' for none;
# ARGV[3]: the events' EventBatch records, concatenated in the order of the ids;
# ARGV[4]: each record's length, a little-endian uint32 each;
# ARGV[5]: the de-dup hashes' key without the slice (dedup_prefix);
# ARGV[6..n+5]: the events' ids.
# Returns {entry id or false, positions (1-based) of the duplicates}.
#
# The records travel as one argument: when nothing is a duplicate (the common case) it is
# the payload as is, and one argument instead of one per event halves the client's cost
# of encoding the command. Times are Redis's (TIME), one clock for every ingest process;
# Redis 6.2 replicates a script that reads it only by its effects, once asked to.
_APPEND = f"""
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local window = tonumber(ARGV[1])
local slice = math.floor(now / window)
local bucket = ARGV[5] .. string.format('%d', slice)
local n = #ARGV - 5
local current = redis.call('HMGET', bucket, unpack(ARGV, 6))
local previous = redis.call('HMGET', ARGV[5] .. string.format('%d', slice - 1), unpack(ARGV, 6))
local oldest = now - window
local fresh, dups = {{}}, {{}}
for i = 1, n do
  local seen = previous[i]
  if current[i] or (seen and tonumber(seen) >= oldest) then
    dups[#dups + 1] = i
  else
    fresh[#fresh + 1] = i
  end
end
if #fresh == 0 then
  return {{false, dups}}
end
local stamp = string.format('%d', now)
local fields = {{}}
for j, i in ipairs(fresh) do
  fields[2 * j - 1] = ARGV[i + 5]
  fields[2 * j] = stamp
end
if redis.call('HSET', bucket, unpack(fields)) < #fresh then
  -- An id came more than once in this call: its copies after the first are duplicates.
  local first, again = {{}}, {{}}
  for _, i in ipairs(fresh) do
    if first[ARGV[i + 5]] then
      again[i] = true
    else
      first[ARGV[i + 5]] = true
    end
  end
  local kept, merged, next_dup = {{}}, {{}}, 1
  for i = 1, n do
    if dups[next_dup] == i then
      merged[#merged + 1] = i
      next_dup = next_dup + 1
    elseif again[i] then
      merged[#merged + 1] = i
    else
      kept[#kept + 1] = i
    end
  end
  fresh, dups = kept, merged
end
redis.call('PEXPIREAT', bucket, string.format('%d', (slice + 3) * window))
local payload = ARGV[3]
if #dups > 0 then
  local parts, next_dup, offset = {{}}, 1, 1
  for i = 1, n do
    local size = struct.unpack('<I4', ARGV[4], 4 * i - 3)
    if dups[next_dup] == i then
      next_dup = next_dup + 1
    else
      parts[#parts + 1] = string.sub(payload, offset, offset + size - 1)
    end
    offset = offset + size
  end
  payload = table.concat(parts)
end
local id
if ARGV[2] == '' then
  id = redis.pcall('XADD', KEYS[1], '*', '{PAYLOAD_FIELD}', payload)
else
  id = redis.pcall('XADD', KEYS[1], '*', '{PAYLOAD_FIELD}', payload, '{HEADERS_FIELD}', ARGV[2])
end
if type(id) == 'table' and id.err then
  local ids = {{}}
  for j, i in ipairs(fresh) do
    ids[j] = ARGV[i + 5]
  end
  redis.call('HDEL', bucket, unpack(ids))
  return id
end
redis.call('UNLINK', ARGV[5] .. string.format('%d', slice - 2))
return {{id, dups}}
"""


def dedup_prefix(stream: str, dataset: str) -> str:
    """Returns the key of a dataset's de-dup hashes on a stream, without the slice."""
    return f"{stream}:dedup:{dataset}:"


@dataclass(slots=True)
class PartitionBatch:
    """The accepted events of one call that go to one partition, in order.

    Attributes:
        partition: the partition.
        dataset: the dataset the events go to, whose ids they are de-duplicated among.
        event_ids: each event's id.
        records: each event's ``EventBatch`` record.
        positions: each event's index in the call, for the caller.
    """

    partition: int
    dataset: str
    event_ids: list[str]
    records: list[bytes]
    positions: list[int]


@dataclass(frozen=True, slots=True)
class Appended:
    """What the script did with one partition batch."""

    entry_id: str | None
    """The stream entry holding the appended events; None when all were duplicates."""
    duplicates: list[int]
    """Indexes (into the batch's lists) of the events that were duplicates."""


class Appender:
    """Runs the append script on a bus's ``events`` partitions."""

    def __init__(self, bus: Bus, *, window: timedelta) -> None:
        self._bus = bus
        self._redis = bus.redis
        self._script = bus.redis.register_script(_APPEND)
        self._sha = self._script.sha
        self._window = _bulk(str(max(1, round(window.total_seconds() * 1000))).encode())
        self._streams: dict[int, bytes] = {}
        self._prefixes: dict[tuple[int, str], bytes] = {}

    def stream_key(self, partition: int) -> str:
        return self._bus.stream_key(EVENTS_TOPIC, partition)

    async def append(self, batches: Sequence[PartitionBatch], headers_json: str) -> list[Appended]:
        """Appends each batch to its partition in one round trip; returns what happened.

        Raises:
            AudienceError: ``UNAVAILABLE`` when Redis cannot be reached. Some partitions may
                have been appended by then; a retry reports those events as duplicates.
        """
        try:
            replies = await self._run(batches, headers_json, range(len(batches)))
            missing = [i for i, reply in replies.items() if isinstance(reply, NoScriptError)]
            if missing:
                # A restarted or failed-over Redis lost its script cache: the script did not
                # run for these, so running them again is safe.
                await self._redis.script_load(_APPEND)
                replies.update(await self._run(batches, headers_json, missing))
        except RedisError as error:
            _log.warning("appending to the events topic failed: %s", error)
            raise errors.unavailable(
                "The event bus is unavailable; retry.",
                timedelta(seconds=1),
                reason="BUS_UNAVAILABLE",
            ) from error
        results: list[Appended] = []
        for index in range(len(batches)):
            reply = replies[index]
            if isinstance(reply, Exception):
                _log.error("the append script failed: %s", reply)
                raise errors.unavailable(
                    "The event bus refused the events; retry.",
                    timedelta(seconds=1),
                    reason="BUS_UNAVAILABLE",
                ) from reply
            entry_id, duplicates = cast("tuple[bytes | None, list[int]]", reply)
            results.append(
                Appended(
                    entry_id.decode() if entry_id else None,
                    [position - 1 for position in duplicates],
                )
            )
        return results

    async def _run(
        self, batches: Sequence[PartitionBatch], headers_json: str, indexes: Sequence[int]
    ) -> dict[int, object]:
        # The commands are encoded here rather than by redis-py, whose encoder spends about
        # 0.7 µs on each argument, and a call has one per event (its de-dup key).
        headers = _bulk(headers_json.encode())
        packed: list[bytes] = []
        for index in indexes:
            packed += self._command(batches[index], headers)
        pool = self._redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:

            async def exchange() -> dict[int, object]:
                await connection.send_packed_command(packed)
                replies: dict[int, object] = {}
                for index in indexes:
                    try:
                        replies[index] = await connection.read_response()
                    except ResponseError as error:
                        replies[index] = error
                return replies

            async def disconnect(error: Exception) -> None:
                await connection.disconnect()

            # Retried as redis-py retries a pipeline: on a lost connection, anew.
            replies: dict[int, object] = await connection.retry.call_with_retry(
                exchange, disconnect
            )
            return replies
        finally:
            await pool.release(connection)

    def _command(self, batch: PartitionBatch, headers: bytes) -> list[bytes]:
        """``EVALSHA`` of the script for one batch, in the Redis protocol (RESP)."""
        event_ids, records = batch.event_ids, batch.records
        stream = self._streams.get(batch.partition)
        if stream is None:
            stream = self._streams[batch.partition] = _bulk(
                self.stream_key(batch.partition).encode()
            )
        prefix = self._prefixes.get((batch.partition, batch.dataset))
        if prefix is None:
            if len(self._prefixes) >= _CACHE_LIMIT:
                self._prefixes.clear()
            prefix = self._prefixes[batch.partition, batch.dataset] = _bulk(
                dedup_prefix(self.stream_key(batch.partition), batch.dataset).encode()
            )
        payload = b"".join(records)
        return [
            b"*%d\r\n$7\r\nEVALSHA\r\n%s$1\r\n1\r\n%s"
            % (len(event_ids) + 9, _bulk(self._sha.encode()), stream),
            self._window,
            headers,
            b"$%d\r\n" % len(payload),
            payload,
            b"\r\n",
            _bulk(struct.pack(f"<{len(records)}I", *map(len, records))),
            prefix,
            _bulks(event_ids),
        ]


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _bulks(values: list[str]) -> bytes:
    """RESP bulk strings of ``values``, encoded in UTF-8."""
    if not values:
        return b""
    if "".join(values).isascii():
        sizes = set(map(len, values))
        if len(sizes) == 1:
            # Event ids of one length (UUIDs, say): one join for the lot.
            size = sizes.pop()
            separator = f"\r\n${size}\r\n"
            return (separator[2:] + separator.join(values) + "\r\n").encode()
        template = "$%d\r\n%s\r\n" * len(values)
        return (
            template % tuple(chain.from_iterable(zip(map(len, values), values, strict=True)))
        ).encode()
    encoded = list(map(str.encode, values))
    return b"".join(map(_BULK.__mod__, zip(map(len, encoded), encoded, strict=True)))


_BULK = b"$%d\r\n%s\r\n"
