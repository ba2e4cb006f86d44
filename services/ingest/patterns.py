"""Patterns over encodings that prove the common case of a validation limit in bulk.

Each pattern matches the encoding of one small message (a map entry, a cart item, an
identity, a campaign interaction) that needs no further check: every field it
requires is written exactly once, in field order, with a length of one byte, and holds a
valid value. That is how protobuf writes such a message; anything else (a longer string, a
nested value, a field written twice, which a parser reads as its last occurrence, a value
out of range) does not match, and the caller falls back to the full check.

:func:`all_match` checks a whole column of encodings (see :mod:`services.ingest.wire`) in
one call, joined by 0xFF: a byte that never starts a field (it would be wire type 7) and
that valid UTF-8 never holds, so the pattern cannot match across two encodings. Numbers
and varints, which may hold it, are matched by their length.

A regular expression cannot compare a length with what follows, so each possible length is
an alternative of its own (the engine tests an alternative's first byte before entering it).
"""

from __future__ import annotations

import re
from typing import Any

from audience.v1 import common_pb2, event_pb2

__all__ = [
    "CAMPAIGN",
    "IDENTITY",
    "ITEM",
    "KEY_CHARACTER",
    "SIMPLE_ENTRY",
    "SMALLEST",
    "all_match",
]

KEY_CHARACTER = rb"[A-Za-z0-9_\-]"
"""The characters of a property, trait or nested map key."""

_SEPARATOR = b"\xff"
# A byte of the UTF-8 of a string that is not the NUL character (no other character has a
# zero byte), and one that is no control character U+0000–U+001F, which ids may not hold.
_TEXT = rb"[^\x00]"
_ID = rb"[^\x00-\x1f]"
_VARINT_MORE = rb"[\x80-\xff]"
# A double whose 11 exponent bits are not all set (NaN and infinities have them set): in
# little-endian order, the high nibble of byte 6 and the low 7 bits of byte 7.
_FINITE = rb".{6}(?:[\x00-\xef].|[\xf0-\xff][^\x7f\xff])"
# The same with the sign bit (the top of byte 7) clear: at least 0.
_FINITE_NOT_NEGATIVE = rb".{6}(?:[\x00-\xef][\x00-\x7f]|[\xf0-\xff][\x00-\x7e])"
# A varint of a positive int64: at most 9 bytes, the last not zero.
_POSITIVE = _VARINT_MORE + b"{0,8}" + rb"[\x01-\x7f]"


def _tag(message: Any, field: str, wire_type: int) -> bytes:
    number: int = message.DESCRIPTOR.fields_by_name[field].number
    return re.escape(bytes((number << 3 | wire_type,)))


def _length_delimited(tag: bytes, character: bytes, low: int, high: int) -> bytes:
    """A field of ``low``–``high`` (at most 127) bytes, each matching ``character``."""
    sizes = b"|".join(
        re.escape(bytes((size,))) + character + b"{%d}" % size for size in range(low, high + 1)
    )
    return tag + b"(?:" + sizes + b")"


def _enum(tag: bytes, values: frozenset[int]) -> bytes:
    """A field holding one of ``values`` (each below 128, a one-byte varint)."""
    return tag + b"[" + b"".join(re.escape(bytes((v,))) for v in sorted(values)) + b"]"


def _simple_entry() -> bytes:
    # A map entry is a message of the key (field 1) and the value (field 2); each kind of
    # value starts with the value's length: 2 for a null or a boolean, 9 for a number, and
    # for a string two more than the string's own.
    value = common_pb2.Value
    string = _tag(value, "string_value", 2)
    strings = b"|".join(
        re.escape(bytes((size + 2,))) + string + re.escape(bytes((size,))) + _TEXT + b"{%d}" % size
        for size in range(126)
    )
    kinds = b"|".join(
        (
            rb"\x02" + _tag(value, "null_value", 0) + rb"\x00",
            rb"\x09" + _tag(value, "number_value", 1) + _FINITE,
            rb"\x02" + _tag(value, "bool_value", 0) + rb"[\x00\x01]",
            strings,
        )
    )
    return _length_delimited(rb"\x0a", KEY_CHARACTER, 1, 127) + rb"\x12(?:" + kinds + b")"


SIMPLE_ENTRY = _simple_entry()
"""A ``map<string, Value>`` entry: a key of 1–127 key characters and a null, boolean (0 or
1), finite number or string of at most 125 bytes without NUL."""


def _item() -> bytes:
    item = event_pb2.CartItem
    optional_strings = b"".join(
        b"(?:" + _length_delimited(_tag(item, name, 2), _TEXT, 0, 127) + b")?"
        for name in ("name", "category", "brand")
    )
    return (
        _length_delimited(_tag(item, "product_id", 2), _ID, 1, 127)
        + optional_strings
        + b"(?:"
        + _tag(item, "price", 1)
        + _FINITE_NOT_NEGATIVE
        + b")?"
        + _tag(item, "quantity", 0)
        + _POSITIVE
    )


ITEM = _item()
"""A cart or order item: a product id of 1–127 bytes without control characters, a name,
category and brand without NUL, a price that is a finite number of at least 0 (or none: 0),
a quantity of at least 1."""


def _identity() -> bytes:
    identity = common_pb2.Identity
    return _length_delimited(_tag(identity, "type", 2), rb"[a-z0-9_]", 1, 64) + _length_delimited(
        _tag(identity, "value", 2), _TEXT, 1, 127
    )


IDENTITY = _identity()
"""An identity: a type of 1–64 lower-case letters, digits and ``_``, a value of 1–127 bytes
without NUL."""


def _campaign() -> bytes:
    campaign = event_pb2.CampaignInteraction
    known = (
        frozenset(event_pb2.CampaignChannel.values()) - {0},
        frozenset(event_pb2.CampaignAction.values()) - {0},
    )
    return (
        _length_delimited(_tag(campaign, "campaign_id", 2), _ID, 1, 127)
        + _enum(_tag(campaign, "channel", 0), known[0])
        + _enum(_tag(campaign, "action", 0), known[1])
        + b"(?:"
        + _length_delimited(_tag(campaign, "creative_id", 2), _ID, 0, 127)
        + b")?"
    )


CAMPAIGN = _campaign()
"""A campaign interaction: a campaign id of 1–127 bytes, a known channel and action, a
creative id of at most 127 bytes; the ids without control characters."""


SMALLEST = {SIMPLE_ENTRY: 9, ITEM: 7, IDENTITY: 8}
"""The fewest bytes a match takes in the message that holds it (with its tag and length),
so that an encoding of ``n`` bytes holds at most ``n // SMALLEST[pattern]`` of them."""

_COMPILED: dict[bytes, re.Pattern[bytes]] = {}


def all_match(pattern: bytes, encodings: list[bytes]) -> bool:
    """Whether every encoding matches ``pattern`` whole (true of none)."""
    if not encodings:
        return True
    compiled = _COMPILED.get(pattern)
    if compiled is None:
        # Not optional as a whole: one empty encoding joins to the empty string.
        compiled = _COMPILED[pattern] = re.compile(
            pattern + b"(?:" + re.escape(_SEPARATOR) + pattern + b")*", re.DOTALL
        )
    return compiled.fullmatch(_SEPARATOR.join(encodings)) is not None
