"""Hypothesis strategies for any request message, built from its descriptor.

Every scalar type has a pool of boundary and hostile values beside random ones: strings
empty, over every documented limit, with NUL, path traversal, SQL, CSV formulas and
non-ASCII; numbers at their type's ends, NaN and infinities; enums at 0 and numbers no
enum defines. Repeated fields and maps are empty, small or over their limits; the
recursive messages (``Value``, ``Rule``) come deeper and wider than the limits as well as
well-formed; ``Timestamp`` and ``Duration`` out of range; every oneof is tried each way.

A :class:`Pools` names the resources of a seeded dataset, so that string fields are often
real names and requests get past the first check. :func:`mutations` merges fuzzed fields
into a valid request for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from google.protobuf import descriptor, duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

import tests.unit.rules.strategies as rules_gen
from audience.v1 import common_pb2, rule_pb2

__all__ = [
    "HOSTILE_TEXT",
    "OVER_LIMIT_SIZES",
    "Pools",
    "deep_rule",
    "deep_value",
    "messages",
    "mutations",
    "wide_rule",
]

FD = descriptor.FieldDescriptor

# Lengths just past the documented limits (ids 63, names 128, identities 256, rule strings
# 1,024, values 8,192), and far past them.
OVER_LIMIT_LENGTHS = (64, 129, 257, 1_025, 8_193, 70_000, 1_100_000)
# Counts just past the documented limits of repeated fields (segments 50, groups and
# merges 100, batches 1,000, aggregates 10,000, imported ids 100,000).
OVER_LIMIT_SIZES = (51, 101, 201, 1_001, 10_001)
_HUGE_LIST = 100_001

HOSTILE_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t",
    "\r\n",
    "datasets/../x",
    "datasets/x/../../y",
    "../../../etc/passwd",
    "/etc/passwd",
    "datasets/",
    "datasets//segments/",
    "datasets/x/segments/",
    "datasets/X_Y",
    "x'; DROP TABLE profiles; --",
    '" OR 1=1 --',
    "%_\\",
    "$1",
    '=HYPERLINK("http://x")',
    "+1",
    "-1",
    "@SUM(A1)",
    'a,"b"\nc',
    "{date}/{segment}/{time}/{nope}",
    "${jndi:ldap://x/a}",
    "%s%n%x",
    "\u202eevil",
    "\ufeff",
    "é",
    "日本語",
    "🙂",
    "*",
    "0",
    "-",
    "_",
    "a.b.c.d.e.f.g.h.i",
    "`",
    "\\",
)

_INT32 = (0, 1, -1, 2, 10, 50, 51, 100, 101, 366, 367, 1_000, 1_001, 10_000, 10_001, 100_001)
_INT32_ENDS = (2**31 - 1, -(2**31))
_INT64_ENDS = (2**63 - 1, -(2**63), 2**53 + 1, -(2**53) - 1)
_UINT32_ENDS = (2**32 - 1,)
_UINT64_ENDS = (2**64 - 1,)
_DOUBLES = (
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1.0,
    -1.0,
    1e308,
    -1e308,
    5e-324,
    1e-300,
    90.000001,
    -180.000001,
    20_000.000001,
    2.0**53 + 1,
)
_ENUM_UNKNOWN = (-1, 99, 1_000, 2**31 - 1, -(2**31))

# Timestamps: the epoch, both ends of 0001..9999, one past each, and the ends of int64.
_SECONDS = (
    0,
    -1,
    1_700_000_000,
    -62_135_596_800,
    -62_135_596_801,
    253_402_300_799,
    253_402_300_800,
    2**63 - 1,
    -(2**63),
)
_NANOS = (0, 1, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31))
# Durations: zero, a minute, the window limits (3,650 days), past the protobuf limit.
_DURATION_SECONDS = (0, 1, -1, 59, 60, 600, 601, 315_360_000, 315_360_060, 315_576_000_001)
_MAP_KEYS = (
    "",
    "a",
    "plan",
    "a.b",
    "a b",
    "$ts",
    "__proto__",
    "constructor",
    "\x00",
    "é",
    "k" * 129,
    "x'; DROP TABLE t; --",
    "`",
)
_MAX_DEPTH = 4
_MAX_PATCH_DEPTH = 4
# Messages patched as a whole, never field by field.
_OPAQUE = frozenset(
    {
        timestamp_pb2.Timestamp.DESCRIPTOR.full_name,
        duration_pb2.Duration.DESCRIPTOR.full_name,
        field_mask_pb2.FieldMask.DESCRIPTOR.full_name,
        common_pb2.Value.DESCRIPTOR.full_name,
    }
)
# Nesting past the documented limits (values 8 levels, rules 16), and past protobuf's own
# 100 levels once inside a request. A message nested deeper than about 100 levels cannot
# even be copied into a request on this side.
_VALUE_DEPTHS = (8, 9, 30, 96, 101)
_RULE_DEPTHS = (16, 17, 40, 96, 101)


@dataclass(frozen=True)
class Pools:
    """Real values of a seeded dataset, mixed into generated strings.

    Attributes:
        names: resource names and parents that exist (``datasets/d``,
            ``datasets/d/segments/s``, …) and near misses of them.
        words: ids, event names, attribute paths and other short words that exist.
        by_field: values for string fields of a given name (``cron``, ``url``, …),
            offered beside the generic ones.
        rule_segments: segment names for generated rules to refer to.
    """

    names: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    by_field: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rule_segments: tuple[str, ...] = ()


def _text(pools: Pools, field_name: str, *, small: bool = False) -> st.SearchStrategy[str]:
    options: list[st.SearchStrategy[str]] = [
        st.sampled_from(HOSTILE_TEXT),
        st.text(max_size=12),
    ]
    if not small:
        options += [
            st.sampled_from(OVER_LIMIT_LENGTHS).map(lambda n: "a" * n),
            st.tuples(st.sampled_from(OVER_LIMIT_LENGTHS[:4]), st.sampled_from("é\x00/,")).map(
                lambda pair: pair[1] * pair[0]
            ),
        ]
    if pools.names:
        options.append(st.sampled_from(pools.names))
        # A real name with something hostile appended.
        options.append(
            st.tuples(st.sampled_from(pools.names), st.sampled_from(HOSTILE_TEXT)).map("".join)
        )
    if pools.words:
        options.append(st.sampled_from(pools.words))
    special = pools.by_field.get(field_name)
    if special:
        # Twice, so that a field with values of its own gets them often.
        options += [st.sampled_from(special)] * 2
    return st.one_of(options)


def _bytes(*, small: bool = False) -> st.SearchStrategy[bytes]:
    if small:
        return st.binary(max_size=16)
    return st.one_of(
        st.binary(max_size=32),
        st.sampled_from(
            [
                b"",
                b"profile_id\nu1\nu2\n",
                b"id,profile_id\n1,u1\n",
                b'"unterminated\nu1\n',
                b"\x00\xff\xfe",
                b"\xef\xbb\xbfprofile_id\r\nu1\r\n",
                b"=cmd|' /C calc'!A0\n",
                b"a," * 10_000,
                b"u" * 300 + b"\n",
                b"\n" * 10_000,
            ]
        ),
        # Lines of CSV one byte past the 4 MiB a message may hold, and past gRPC's limit.
        st.sampled_from([4 * 1024 * 1024 + 1, 9 * 1024 * 1024]).map(
            lambda n: (b"x\n" * (n // 2 + 1))[:n]
        ),
    )


def _integers(kind: int) -> st.SearchStrategy[int]:
    ends: tuple[int, ...]
    if kind in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        low, high, ends = -(2**31), 2**31 - 1, _INT32 + _INT32_ENDS
    elif kind in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        low, high, ends = 0, 2**32 - 1, tuple(n for n in _INT32 if n >= 0) + _UINT32_ENDS
    elif kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        low, high, ends = 0, 2**64 - 1, tuple(n for n in _INT32 if n >= 0) + _UINT64_ENDS
    else:
        low, high, ends = -(2**63), 2**63 - 1, _INT32 + _INT32_ENDS + _INT64_ENDS
    return st.sampled_from(ends) | st.integers(low, high)


def _doubles(width: Literal[32, 64]) -> st.SearchStrategy[float]:
    pool = _DOUBLES if width == 64 else tuple(d for d in _DOUBLES if not 3.4e38 < abs(d) < math.inf)
    return st.sampled_from(pool) | st.floats(width=width)


def _enums(enum: descriptor.EnumDescriptor) -> st.SearchStrategy[int]:
    return st.sampled_from([value.number for value in enum.values]) | st.sampled_from(
        [n for n in _ENUM_UNKNOWN if n not in enum.values_by_number]
    )


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    return st.builds(
        lambda seconds, nanos: timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
        st.sampled_from(_SECONDS) | st.integers(-(2**63), 2**63 - 1),
        st.sampled_from(_NANOS),
    )


def durations() -> st.SearchStrategy[duration_pb2.Duration]:
    return st.builds(
        lambda seconds, nanos: duration_pb2.Duration(seconds=seconds, nanos=nanos),
        st.sampled_from(_DURATION_SECONDS) | st.integers(-(2**63), 2**63 - 1),
        st.sampled_from((0, 1, 999_999_999, 1_000_000_000, -1, -999_999_999)),
    )


def _field_masks(paths: Sequence[str]) -> st.SearchStrategy[field_mask_pb2.FieldMask]:
    words = [*paths, "*", "", "name", "etag", "create_time", "nope", "a.b", "rule.all", "x" * 300]
    return st.builds(
        lambda chosen: field_mask_pb2.FieldMask(paths=chosen),
        st.lists(st.sampled_from(words), max_size=4),
    )


def deep_value(depth: int, *, as_map: bool) -> common_pb2.Value:
    """A ``Value`` nested ``depth`` levels of lists (or maps), built in place: protobuf
    copies (and re-parses, refusing past 100 levels) a message passed to a constructor."""
    root = common_pb2.Value()
    current = root
    for _ in range(depth):
        current = current.map_value.fields["k"] if as_map else current.list_value.values.add()
    current.string_value = "leaf"
    return root


def deep_rule(depth: int, *, group: str = "negation") -> rule_pb2.Rule:
    """A rule ``depth`` levels of ``not`` (or one-child ``all``/``any``) above one leaf."""
    root = rule_pb2.Rule()
    current = root
    for _ in range(depth):
        current = current.negation if group == "negation" else getattr(current, group).rules.add()
    current.attribute.path = "plan"
    current.attribute.comparison.operator = rule_pb2.OPERATOR_EXISTS
    return root


def wide_rule(children: int) -> rule_pb2.Rule:
    """An ``any`` of ``children`` leaves."""
    root = rule_pb2.Rule()
    for index in range(children):
        leaf = root.any.rules.add().attribute
        leaf.path = f"a{index}"
        leaf.comparison.operator = rule_pb2.OPERATOR_EXISTS
    return root


def _values(pools: Pools, *, small: bool = False) -> st.SearchStrategy[common_pb2.Value]:
    scalars: st.SearchStrategy[common_pb2.Value] = st.one_of(
        st.just(common_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
        _text(pools, "", small=small).map(lambda s: common_pb2.Value(string_value=s)),
        _doubles(64).map(lambda d: common_pb2.Value(number_value=d)),
        st.booleans().map(lambda b: common_pb2.Value(bool_value=b)),
        timestamps().map(lambda t: common_pb2.Value(timestamp_value=t)),
        st.just(common_pb2.Value()),
    )

    def nest(children: st.SearchStrategy[common_pb2.Value]) -> st.SearchStrategy[common_pb2.Value]:
        return st.one_of(
            st.lists(children, max_size=3).map(
                lambda items: common_pb2.Value(list_value=common_pb2.ValueList(values=items))
            ),
            st.dictionaries(st.sampled_from(_MAP_KEYS), children, max_size=3).map(
                lambda entries: common_pb2.Value(map_value=common_pb2.ValueMap(fields=entries))
            ),
        )

    nested = st.recursive(scalars, nest, max_leaves=6)
    if small:
        return nested
    return st.one_of(
        nested,
        st.builds(deep_value, st.sampled_from(_VALUE_DEPTHS), as_map=st.booleans()),
        st.sampled_from([1_001, 5_000]).map(
            lambda n: common_pb2.Value(
                list_value=common_pb2.ValueList(values=[common_pb2.Value(number_value=1)] * n)
            )
        ),
        st.sampled_from([201, 2_000]).map(
            lambda n: common_pb2.Value(
                map_value=common_pb2.ValueMap(
                    fields={f"k{i}": common_pb2.Value(bool_value=True) for i in range(n)}
                )
            )
        ),
    )


def _rules(
    pools: Pools, generic: st.SearchStrategy[Message], *, small: bool
) -> st.SearchStrategy[rule_pb2.Rule]:
    segments = list(pools.rule_segments) or [rules_gen.SEGMENT_USER]
    well_formed = rules_gen.user_rules(segments) | rules_gen.account_rules(segments, segments)
    if small:
        return well_formed | generic.map(_as_rule)
    return st.one_of(
        well_formed,
        st.builds(
            deep_rule,
            st.sampled_from(_RULE_DEPTHS),
            group=st.sampled_from(["negation", "all", "any"]),
        ),
        st.sampled_from([101, 501, 2_000]).map(wide_rule),
        generic.map(_as_rule),
    )


def _as_rule(message: Message) -> rule_pb2.Rule:
    assert isinstance(message, rule_pb2.Rule)
    return message


class _Builder:
    """Builds (and caches) one strategy per message type and depth.

    A small builder makes the elements of over-limit lists and maps: no huge strings,
    lists or nesting inside them, so that ten thousand of them stay a few megabytes.
    """

    def __init__(self, pools: Pools, *, small: bool = False) -> None:
        self.pools = pools
        self.small = small
        self._cache: dict[tuple[str, int], st.SearchStrategy[Message]] = {}
        self._small_builder: _Builder | None = None

    @property
    def _smaller(self) -> _Builder:
        if self.small:
            return self
        if self._small_builder is None:
            self._small_builder = _Builder(self.pools, small=True)
        return self._small_builder

    def message(
        self, message_type: descriptor.Descriptor, depth: int = 0
    ) -> st.SearchStrategy[Message]:
        key = (message_type.full_name, depth)
        if key not in self._cache:
            # Recursive types refer to themselves through the cache while being built.
            self._cache[key] = st.deferred(lambda: self._build(message_type, depth))
        return self._cache[key]

    def _build(self, message_type: descriptor.Descriptor, depth: int) -> st.SearchStrategy[Message]:
        name = message_type.full_name
        if name == timestamp_pb2.Timestamp.DESCRIPTOR.full_name:
            return timestamps()
        if name == duration_pb2.Duration.DESCRIPTOR.full_name:
            return durations()
        if name == common_pb2.Value.DESCRIPTOR.full_name:
            return _values(self.pools, small=self.small)
        cls = GetMessageClass(message_type)
        if depth > _MAX_DEPTH:
            return st.just(cls())
        optional = {
            fd.name: self._field(fd, message_type, depth)
            for fd in message_type.fields
            if fd.containing_oneof is None
        }
        # Each oneof unset or set one way (a proto3 `optional` is a oneof of one field).
        oneofs = [
            st.one_of(
                st.none(),
                *(
                    st.tuples(st.just(fd.name), self._field(fd, message_type, depth))
                    for fd in oneof.fields
                ),
            )
            for oneof in message_type.oneofs
        ]
        return st.builds(
            _make,
            st.just(cls),
            st.fixed_dictionaries({}, optional=optional),
            st.tuples(*oneofs) if oneofs else st.just(()),
        )

    def _field(
        self, fd: descriptor.FieldDescriptor, owner: descriptor.Descriptor, depth: int
    ) -> st.SearchStrategy[Any]:
        if _is_map(fd):
            entry = _message_type(fd)
            key_fd = entry.fields_by_name["key"]
            value_fd = entry.fields_by_name["value"]
            keys = st.sampled_from(_MAP_KEYS) | _text(self.pools, key_fd.name, small=True)
            values = self._single(value_fd, owner, depth)
            few_entries = st.dictionaries(keys, values, max_size=3)
            if self.small:
                return few_entries
            return few_entries | st.builds(
                _many_entries,
                self._smaller._single(value_fd, owner, depth),
                st.sampled_from([201, 1_001]),
            )
        single = self._single(fd, owner, depth)
        if not fd.is_repeated:
            return single
        few = st.lists(single, max_size=3)
        if self.small:
            return few
        sizes = OVER_LIMIT_SIZES if fd.type == FD.TYPE_MESSAGE else (*OVER_LIMIT_SIZES, _HUGE_LIST)
        return few | st.builds(
            _many_items, self._smaller._single(fd, owner, depth), st.sampled_from(sizes)
        )

    def _single(
        self, fd: descriptor.FieldDescriptor, owner: descriptor.Descriptor, depth: int
    ) -> st.SearchStrategy[Any]:
        kind = fd.type
        if kind == FD.TYPE_MESSAGE:
            message_type = _message_type(fd)
            if message_type.full_name == field_mask_pb2.FieldMask.DESCRIPTOR.full_name:
                return _field_masks(_sibling_paths(owner))
            inner = self.message(message_type, depth + 1)
            rule = rule_pb2.Rule.DESCRIPTOR
            if message_type.full_name == rule.full_name and owner.file != rule.file:
                # A rule where a request holds one: well-formed rules, rules past the
                # limits, and (through `inner`) any tree the descriptor allows.
                return _rules(self.pools, inner, small=self.small)
            return inner
        if kind == FD.TYPE_STRING:
            return _text(self.pools, fd.name, small=self.small)
        if kind == FD.TYPE_BYTES:
            return _bytes(small=self.small)
        if kind == FD.TYPE_BOOL:
            return st.booleans()
        if kind == FD.TYPE_ENUM:
            assert fd.enum_type is not None
            return _enums(fd.enum_type)
        if kind == FD.TYPE_DOUBLE:
            return _doubles(64)
        if kind == FD.TYPE_FLOAT:
            return _doubles(32)
        return _integers(kind)


def _message_type(fd: descriptor.FieldDescriptor) -> descriptor.Descriptor:
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


def _descriptor(cls: type[Message]) -> descriptor.Descriptor:
    return cast(descriptor.Descriptor, cls.DESCRIPTOR)


def _is_map(fd: descriptor.FieldDescriptor) -> bool:
    return (
        fd.type == FD.TYPE_MESSAGE
        and fd.is_repeated
        and bool(_message_type(fd).GetOptions().map_entry)
    )


def _many_entries(value: Any, count: int) -> dict[str, Any]:
    return {f"k{index}": value for index in range(count)}


def _many_items(item: Any, count: int) -> list[Any]:
    return [item] * count


def _sibling_paths(owner: descriptor.Descriptor) -> list[str]:
    """Field names of the resource an update mask applies to (the owner's message fields)."""
    paths: list[str] = []
    for fd in owner.fields:
        if fd.type == FD.TYPE_MESSAGE:
            paths += [inner.name for inner in _message_type(fd).fields]
    return paths


def _make(cls: type[Message], fields: dict[str, Any], oneofs: tuple[Any, ...]) -> Message:
    message = cls()
    chosen = dict(fields)
    for choice in oneofs:
        if choice is not None:
            chosen[choice[0]] = choice[1]
    for name, value in chosen.items():
        _assign(message, name, value)
    return message


def _copied(target: Message, value: Message) -> bool:
    """Copies ``value`` into ``target``; False when it cannot go that deep: copying
    re-parses, which protobuf refuses past 100 levels of nesting."""
    try:
        target.CopyFrom(value)
    except DecodeError:
        return False
    return True


def _assign(message: Message, name: str, value: Any) -> None:
    """Sets a field in place (a constructor would copy nested messages, see deep_value); a
    nested message that cannot go that deep is left out."""
    fd = _descriptor(type(message)).fields_by_name[name]
    target = getattr(message, name)
    if _is_map(fd):
        for key, item in value.items():
            if not isinstance(item, Message):
                target[key] = item
            elif not _copied(target[key], item):
                del target[key]
    elif fd.is_repeated:
        if fd.type == FD.TYPE_MESSAGE:
            for item in value:
                if not _copied(target.add(), item):
                    del target[-1]
        else:
            target.extend(value)
    elif fd.type == FD.TYPE_MESSAGE:
        if _copied(target, value):
            target.SetInParent()
    else:
        setattr(message, name, value)


def messages(cls: type[Message], pools: Pools) -> st.SearchStrategy[Message]:
    """Any message of ``cls``, fields set or not, from the pools and the hostile values."""
    return _Builder(pools).message(_descriptor(cls))


def _patches(
    builder: _Builder, message_type: descriptor.Descriptor, depth: int
) -> st.SearchStrategy[Message]:
    """Messages with one field set, at the top or (through a message field) deeper."""
    cls = GetMessageClass(message_type)
    options: list[st.SearchStrategy[Message]] = []
    for fd in message_type.fields:
        options.append(
            st.builds(_only, st.just(cls), st.just(fd.name), builder._field(fd, message_type, 0))
        )
        inner = fd.message_type
        if (
            inner is not None
            and not fd.is_repeated
            and depth < _MAX_PATCH_DEPTH
            and inner.full_name not in _OPAQUE
        ):
            options.append(
                st.builds(
                    _only,
                    st.just(cls),
                    st.just(fd.name),
                    _deeper_patches(builder, inner, depth + 1),
                )
            )
    return st.one_of(options)


def _deeper_patches(
    builder: _Builder, message_type: descriptor.Descriptor, depth: int
) -> st.SearchStrategy[Message]:
    # Deferred: a recursive message would otherwise build its patches forever.
    return st.deferred(lambda: _patches(builder, message_type, depth))


def _only(cls: type[Message], name: str, value: Any) -> Message:
    return _make(cls, {name: value}, ())


def mutations(valid: Sequence[Message], pools: Pools) -> st.SearchStrategy[Message]:
    """A valid request, as is or with a few fields replaced, at any depth, by fuzzed ones:
    most of the request stays valid, so the handler gets past its first checks."""
    if not valid:
        raise ValueError("no valid request to mutate")
    builder = _Builder(pools)
    cls = type(valid[0])

    def merge(base: Message, patches: Sequence[Message], clear: Sequence[str]) -> Message:
        merged = type(base)()
        merged.CopyFrom(base)
        for name in clear:
            merged.ClearField(name)
        for patch in patches:
            try:
                merged.MergeFrom(patch)
            except DecodeError:
                # Merging re-parses, which fails past 100 levels of nesting: send the patch.
                return patch
        return merged

    top_level = [fd.name for fd in _descriptor(cls).fields]
    return st.one_of(
        st.sampled_from(list(valid)),
        st.builds(
            merge,
            st.sampled_from(list(valid)),
            st.lists(_patches(builder, _descriptor(cls), 0), min_size=1, max_size=3),
            st.lists(st.sampled_from(top_level), max_size=1),
        ),
    )
