"""Appends accepted events to the ``events`` topic, de-duplicated, in one script per partition.

For each partition a batch touches, one Lua script runs atomically in Redis:

1. each event's de-dup key is set if it does not exist (``SET NX PX``, expiring after the
   window); an event whose key existed, or was set by an earlier event of the same call, is
   a duplicate;
2. the records of the others, concatenated, become one ``EventBatch`` entry (``XADD``
   with the bus layout: field ``b`` the payload, ``h`` the trace headers);
3. should that ``XADD`` fail, the keys just set are deleted before the script returns the
   error.

So an event is never marked seen without being appended, and the script being atomic, no
other call can slip between the check and the append: no event is appended twice within
the window. Redis refuses a script's write for lack of memory only at its first write (a
``SET``), before anything changed; after that the ``XADD`` can fail only on a key of the
wrong type, which step 3 undoes (``DEL`` is always allowed).

The de-dup key of an event is ``<stream key>:seen:<dataset>:<event_id>``: it shares the
stream's hash tag, so under Redis Cluster the script's keys all live in one slot. Each costs
about 150 bytes of Redis memory (for a 36-character id) for the length of the window.
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

# KEYS[1]: the partition's stream; KEYS[2..n+1]: each event's de-dup key.
# ARGV[1]: the window in milliseconds; ARGV[2]: the headers JSON, '' for none;
# ARGV[3]: the events' EventBatch records, concatenated in the order of the keys;
# ARGV[4]: each record's length, a little-endian uint32 each.
# Returns {entry id or false, positions (1-based) of the duplicates}.
#
# The records travel as one argument: when nothing is a duplicate (the common case) it is
# the payload as is, and one argument instead of one per event halves the client's cost
# of encoding the command.
_APPEND = f"""
local n = #KEYS - 1
local fresh, dups = {{}}, {{}}
for i = 1, n do
  if redis.call('SET', KEYS[i + 1], '1', 'NX', 'PX', ARGV[1]) then
    fresh[#fresh + 1] = KEYS[i + 1]
  else
    dups[#dups + 1] = i
  end
end
if #fresh == 0 then
  return {{false, dups}}
end
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
  redis.call('DEL', unpack(fresh))
  return id
end
return {{id, dups}}
"""


def dedup_prefix(stream: str, dataset: str) -> str:
    """Returns the de-dup key of an event without its event id."""
    return f"{stream}:seen:{dataset}:"


@dataclass(slots=True)
class PartitionBatch:
    """The accepted events of one call that go to one partition, in order.

    Attributes:
        partition: the partition.
        keys: each event's de-dup key (``dedup_prefix`` + event id).
        records: each event's ``EventBatch`` record.
        positions: each event's index in the call, for the caller.
    """

    partition: int
    keys: list[str]
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
        keys, records = batch.keys, batch.records
        stream = self._streams.get(batch.partition)
        if stream is None:
            stream = self._streams[batch.partition] = _bulk(
                self.stream_key(batch.partition).encode()
            )
        payload = b"".join(records)
        return [
            b"*%d\r\n$7\r\nEVALSHA\r\n%s%s%s"
            % (len(keys) + 8, _bulk(self._sha.encode()), _bulk(b"%d" % (len(keys) + 1)), stream),
            _bulks(keys),
            self._window,
            headers,
            b"$%d\r\n" % len(payload),
            payload,
            b"\r\n",
            _bulk(struct.pack(f"<{len(records)}I", *map(len, records))),
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
