"""The bus encoding of accepted events, built by concatenation.

An ``audience.bus.v1.EventBatch`` is ``repeated IngestedEvent events = 1``, whose encoding
is the concatenation of one field-1 record per event: the tag byte ``0x0A``, the varint
length of the ``IngestedEvent`` encoding, then that encoding. So each event is encoded
once, as a record, and any subset of records joined in order is a valid batch: the
append script drops the duplicates' records without decoding anything.

An ``IngestedEvent`` is itself encoded by hand, field by field in field-number order as
protobuf serialises it (``dataset`` = 1, ``event`` = 2, ``replay_count`` = 3, zero
omitted), so the bytes equal ``IngestedEvent.SerializeToString()``.

What ingest sets on every event of a call, the receipt time, is encoded once per call and
appended to each event's encoding (:func:`receipt_fields`): protobuf parsers take the last
occurrence of a field and merge repeated occurrences of a message field, and the appended
``Timestamp`` writes both its fields explicitly, so the parsed event has exactly these
times whatever the client sent. What validation sets on one event (its skew-corrected
``timestamp``, the fixed ``name`` of its type) is appended the same way
(:class:`EventFields`), to the event's encoding as the client sent it. That saves setting
message fields and encoding each event again; the price is that such an encoding is valid
but not canonical (fields out of order, or twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import add
from typing import cast

__all__ = ["DatasetRecords", "EventFields", "receipt_fields", "varint"]

# Lengths below 2**14 (two varint bytes) cover every event under the 64 KiB limit but the
# largest; a table lookup is several times faster than computing them.
_SMALL = 1 << 14
_VARINTS = tuple(
    bytes((n,)) if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7)) for n in range(_SMALL)
)

# The low 14 bits of a longer varint: two bytes, each with its continuation bit set.
_LOW_BITS = tuple(bytes((n & 0x7F | 0x80, n >> 7 | 0x80)) for n in range(_SMALL))

_BATCH_EVENTS_TAG = b"\x0a"  # EventBatch.events, field 1, length-delimited
_DATASET_TAG = b"\x0a"  # IngestedEvent.dataset, field 1, length-delimited
_EVENT_TAG = b"\x12"  # IngestedEvent.event, field 2, length-delimited
_REPLAY_COUNT_TAG = b"\x18"  # IngestedEvent.replay_count, field 3, varint
_NAME_TAG = b"\x1a"  # Event.name, field 3, length-delimited
_TIMESTAMP_TAG = b"\x3a"  # Event.timestamp, field 7, length-delimited
_RECEIVED_AT_TAG = b"\x4a"  # Event.received_at, field 9, length-delimited
_NS = 1_000_000_000


def varint(value: int) -> bytes:
    """Returns the protobuf varint encoding of a non-negative integer."""
    if value < _SMALL:
        if value < 0:
            raise ValueError(f"varint of a negative number: {value}")
        return _VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def receipt_fields(received_at_ns: int, *, timestamp: bool) -> bytes:
    """Returns ``Event`` fields to append to an event's encoding: ``received_at`` and, with
    ``timestamp``, ``timestamp`` too, both set to the receipt time.

    Args:
        received_at_ns: the receipt time, nanoseconds since the epoch.
        timestamp: also set the event's time (for an event that has none).
    """
    seconds, nanos = divmod(received_at_ns, _NS)
    # Both fields explicit (a zero included), so they replace whatever the event had.
    value = b"\x08" + varint(seconds) + b"\x10" + varint(nanos)
    field = varint(len(value)) + value
    received = _RECEIVED_AT_TAG + field
    return _TIMESTAMP_TAG + field + received if timestamp else received


class EventFields:
    """Encodes ``Event`` fields to append to events' encodings, replacing the client's;
    each method encodes one field for all the events of a call."""

    __slots__ = ("_names",)

    def __init__(self) -> None:
        self._names: dict[str, bytes] = {"": b""}

    def timestamps(self, seconds: Sequence[int], nanos: Sequence[int]) -> list[bytes]:
        """Returns ``timestamp`` set to each time: seconds since the epoch (≥ 0) and nanos.

        Both fields are written (a zero included), so they replace whatever the event had.
        ``nanos`` always takes five bytes, the last groups of seven bits perhaps zero: a
        longer varint than protobuf writes, which every parser reads.
        """
        count = len(seconds)
        if count > 1 and seconds.count(seconds[0]) == count == nanos.count(nanos[0]):
            # One time for all (their receipt time): encoded once.
            return self.timestamps(seconds[:1], nanos[:1]) * count
        # The events of a call are seconds apart at most: each distinct second is encoded
        # once, with the tags and length around it.
        heads = {
            second: _TIMESTAMP_TAG + _VARINTS[len(value) + 7] + b"\x08" + value + b"\x10"
            for second in set(seconds)
            for value in (varint(second),)
        }
        low, top = _LOW_BITS, _VARINTS
        return [
            heads[second] + low[nano & 0x3FFF] + low[nano >> 14 & 0x3FFF] + top[nano >> 28]
            for second, nano in zip(seconds, nanos, strict=True)
        ]

    def names(self, names: Sequence[str]) -> list[bytes]:
        """Returns ``name`` set to each name, or nothing for an empty one."""
        cached = list(map(self._names.get, names))
        if None in cached:
            return [
                self._name(name) if field is None else field
                for field, name in zip(cached, names, strict=True)
            ]
        return cast("list[bytes]", cached)

    def _name(self, name: str) -> bytes:
        if len(self._names) >= _SMALL:
            self._names.clear()
            self._names[""] = b""
        encoded = name.encode()
        field = self._names[name] = _NAME_TAG + varint(len(encoded)) + encoded
        return field


class DatasetRecords:
    """Encodes the events of one dataset as ``EventBatch`` records."""

    __slots__ = ("_heads", "_prefix", "_prefix_length")

    def __init__(self, dataset: str) -> None:
        encoded = dataset.encode()
        self._prefix = _DATASET_TAG + varint(len(encoded)) + encoded if encoded else b""
        self._prefix_length = len(self._prefix) + 1
        # What precedes an event of each size in its record; events' sizes are few.
        self._heads: dict[int, bytes] = {}

    def record(self, event: bytes, suffix: bytes = b"", replay_count: int = 0) -> bytes:
        """Returns the record of one event.

        Args:
            event: the ``audience.v1.Event`` encoding.
            suffix: more ``Event`` fields, appended to ``event`` (see
                :func:`receipt_fields`).
            replay_count: the ``IngestedEvent.replay_count``.
        """
        size = len(event) + len(suffix)
        size_varint = _VARINTS[size] if size < _SMALL else varint(size)
        inner = self._prefix_length + len(size_varint) + size
        if replay_count:
            tail = _REPLAY_COUNT_TAG + varint(replay_count)
            inner += len(tail)
            return b"".join(
                (
                    _BATCH_EVENTS_TAG,
                    varint(inner),
                    self._prefix,
                    _EVENT_TAG,
                    size_varint,
                    event,
                    suffix,
                    tail,
                )
            )
        inner_varint = _VARINTS[inner] if inner < _SMALL else varint(inner)
        return b"".join(
            (_BATCH_EVENTS_TAG, inner_varint, self._prefix, _EVENT_TAG, size_varint, event, suffix)
        )

    def records(
        self, events: Sequence[bytes], suffixes: Sequence[Sequence[bytes]], tail: bytes = b""
    ) -> list[bytes]:
        """Returns the record of each event (see :meth:`record`).

        Args:
            events: each event's encoding.
            suffixes: columns of ``Event`` fields, each appended to each event in turn.
            tail: ``Event`` fields appended last to every event.
        """
        sizes = list(map(len, events))
        for column in suffixes:
            sizes = list(map(add, sizes, map(len, column)))
        if tail:
            sizes = list(map(add, sizes, repeat(len(tail))))
        heads = list(map(self._heads.get, sizes))
        if None in heads:
            heads = [
                self._head(size) if head is None else head
                for head, size in zip(heads, sizes, strict=True)
            ]
        return list(map(b"".join, zip(heads, events, *suffixes, repeat(tail), strict=False)))

    def _head(self, size: int) -> bytes:
        """The record's bytes before an event whose encoding, suffixes included, is
        ``size`` bytes long: the record's tag and length, the dataset, the event's tag and
        length."""
        if len(self._heads) >= _SMALL:
            self._heads.clear()
        size_varint = varint(size)
        inner = self._prefix_length + len(size_varint) + size
        head = self._heads[size] = b"".join(
            (_BATCH_EVENTS_TAG, varint(inner), self._prefix, _EVENT_TAG, size_varint)
        )
        return head
