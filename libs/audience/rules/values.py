"""Values as rules read them: Python forms of ``audience.v1.Value``, instants and JSON.

Both evaluators see the same values: the Python predicate reads the forms below, and the
SQL predicate reads the JSON that :func:`to_json` makes of them (the profile service
writes attributes with :func:`attributes_json`). The correspondence:

============  ======================  =================================
Value         Python                  JSON (``jsonb``)
============  ======================  =================================
null, unset   ``None``                ``null``
string        ``str``                 string
number        ``float``               number (the shortest exact repr)
bool          ``bool``                ``true`` / ``false``
timestamp     :class:`Instant`        ``{"$ts": <microseconds>}``
list          ``list``                array
map           ``dict``                object
============  ======================  =================================

Non-finite numbers are not values (JSON has none): they read as null. Timestamps are whole
microseconds since the Unix epoch, PostgreSQL's precision; finer digits are dropped
(floored), so both evaluators agree at every boundary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from google.protobuf import struct_pb2, timestamp_pb2

from audience.v1 import common_pb2

__all__ = [
    "EPOCH",
    "TIMESTAMP_KEY",
    "AttrValue",
    "Instant",
    "attributes_from_proto",
    "attributes_json",
    "datetime_from_micros",
    "distinct_key",
    "format_instant",
    "is_number",
    "micros_from_datetime",
    "micros_from_timestamp",
    "timestamp_from_micros",
    "to_json",
    "value_from_proto",
    "value_to_proto",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Map keys are letters, digits, `_` and `-` (common.proto), so no real map has this key.
TIMESTAMP_KEY = "$ts"
_MICROSECOND = timedelta(microseconds=1)


class Instant(int):
    """An instant as an attribute or property value: microseconds since the Unix epoch.

    A subclass of ``int`` so that comparisons run at C speed, and a type of its own so that a
    timestamp never equals a number.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Instant({int(self)})"


AttrValue: TypeAlias = (
    "str | float | bool | Instant | list[AttrValue] | dict[str, AttrValue] | None"
)


def is_number(value: object) -> bool:
    """Whether ``value`` is a number (``bool`` and :class:`Instant` are not)."""
    kind = type(value)
    return kind is float or kind is int


def micros_from_timestamp(timestamp: timestamp_pb2.Timestamp) -> int:
    return timestamp.seconds * 1_000_000 + timestamp.nanos // 1000


def timestamp_from_micros(micros: int) -> timestamp_pb2.Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


def datetime_from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def micros_from_datetime(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, exactly."""
    return (moment - EPOCH) // _MICROSECOND


def format_instant(micros: int) -> str:
    """RFC 3339 in UTC, with a fraction only when the instant has one."""
    moment = datetime_from_micros(micros)
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


def value_from_proto(value: common_pb2.Value) -> AttrValue:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return number if math.isfinite(number) else None
    if kind == "bool_value":
        return value.bool_value
    if kind == "timestamp_value":
        return Instant(micros_from_timestamp(value.timestamp_value))
    if kind == "list_value":
        return [value_from_proto(item) for item in value.list_value.values]
    if kind == "map_value":
        return attributes_from_proto(value.map_value.fields)
    return None


def attributes_from_proto(fields: Mapping[str, common_pb2.Value]) -> dict[str, AttrValue]:
    return {key: value_from_proto(item) for key, item in fields.items()}


def value_to_proto(value: AttrValue) -> common_pb2.Value:
    if value is None:
        return common_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, Instant):
        return common_pb2.Value(timestamp_value=timestamp_from_micros(value))
    if isinstance(value, bool):
        return common_pb2.Value(bool_value=value)
    if isinstance(value, int | float):
        return common_pb2.Value(number_value=float(value))
    if isinstance(value, str):
        return common_pb2.Value(string_value=value)
    if isinstance(value, list):
        return common_pb2.Value(
            list_value=common_pb2.ValueList(values=[value_to_proto(item) for item in value])
        )
    return common_pb2.Value(
        map_value=common_pb2.ValueMap(
            fields={key: value_to_proto(item) for key, item in value.items()}
        )
    )


def to_json(value: AttrValue) -> Any:
    """The JSON form of a value, as the SQL predicate reads it from ``jsonb``."""
    if isinstance(value, Instant):
        return {TIMESTAMP_KEY: int(value)}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, list):
        return [to_json(item) for item in value]
    return {key: to_json(item) for key, item in value.items()}


def attributes_json(attributes: Mapping[str, AttrValue]) -> str:
    """The ``attributes`` column's text: what the profile service writes to ``jsonb``.

    Keys are sorted, so equal attributes give equal text whatever order they came in (a
    protobuf map has none).
    """
    return json.dumps(
        {key: to_json(item) for key, item in attributes.items()},
        allow_nan=False,
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )


def distinct_key(value: object) -> str | None:
    """The text a distinct-count aggregate keeps for a scalar value, tagged by type.

    Tagged so that the string ``"1"`` and the number ``1`` count as two values. ``None`` for
    what is not a scalar (null, lists, maps, non-finite numbers).
    """
    if isinstance(value, str):
        return "s:" + value
    if isinstance(value, Instant):
        return f"t:{int(value)}"
    if isinstance(value, bool):
        return "b:true" if value else "b:false"
    if isinstance(value, int | float) and math.isfinite(value):
        # +0.0 for -0.0: they are the same number to every comparison.
        return "n:" + repr(float(value) + 0.0)
    return None
