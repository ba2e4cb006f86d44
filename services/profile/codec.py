"""Translation between the domain's state and what leaves the service: rows, bus messages
and API resources.

The published ``EvaluationView`` is assembled from encoded pieces: protobuf messages are
the concatenation of their fields, so a profile's attributes and each of its aggregates
are encoded once and kept (``ProfileState.attributes_encoded``, ``AggregateSeries.encoded``)
until they change, and a change re-encodes only what it touched. The row's ``aggregates``
document (JSON, ``audience.rules.aggregates_json``) is assembled the same way, from each
aggregate's text (``AggregateSeries.document``) and each bucket's (``AggregateSeries.texts``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from audience.bus.v1 import profile_change_pb2
from audience.rules.aggregates import (
    BucketState,
    bucket_from_json,
    bucket_json,
    document_json,
    series_json,
)
from audience.rules.values import (
    TIMESTAMP_KEY,
    AttrValue,
    Instant,
    attributes_json,
    micros_from_datetime,
    timestamp_from_micros,
    value_to_proto,
)
from audience.rules.view import evaluation_row_from_parts
from audience.v1 import common_pb2, profile_pb2, segment_pb2
from services.profile.domain.model import (
    AccountState,
    AggregateSeries,
    ChangeType,
    ProfileState,
    encoded_context,
)

__all__ = [
    "ACCOUNT",
    "USER",
    "account_from_row",
    "account_message",
    "account_name",
    "account_view",
    "aggregate_values",
    "aggregates_document",
    "attributes_from_json",
    "bucket_bytes",
    "change_batch",
    "encode_change",
    "evaluation_columns",
    "length_delimited",
    "profile_from_parts",
    "profile_message",
    "profile_name",
    "profile_view",
    "state_blob",
]

USER = "user"
ACCOUNT = "account"

_CHANGE_TYPES = {
    ChangeType.UPDATED: profile_change_pb2.PROFILE_CHANGE_TYPE_UPDATED,
    ChangeType.ERASED: profile_change_pb2.PROFILE_CHANGE_TYPE_ERASED,
    ChangeType.MERGED: profile_change_pb2.PROFILE_CHANGE_TYPE_MERGED,
}
_KINDS = {USER: segment_pb2.SEGMENT_KIND_USER, ACCOUNT: segment_pb2.SEGMENT_KIND_ACCOUNT}

# Tags (field number << 3 | wire type 2) of the length-delimited fields assembled by hand.
_VIEW_ATTRIBUTES = 1
_VIEW_SESSION = 2
_VIEW_CONTEXT = 3
_VIEW_AGGREGATES = 9
_PROFILE_SESSION = 5
_PROFILE_CONTEXT = 6
_CHANGE_VIEW = 8
_BATCH_CHANGES = 1


def profile_name(dataset: str, profile_id: str) -> str:
    return f"datasets/{dataset}/profiles/{profile_id}"


def account_name(dataset: str, account_id: str) -> str:
    return f"datasets/{dataset}/accounts/{account_id}"


_SMALL = [bytes((n,)) for n in range(128)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    # Up to five bytes, unrolled: lengths, counts and the seconds and nanos of our times.
    # Each event's time is encoded afresh (the instants' memos miss on a new time), and a
    # loop over a bytearray took twice as long.
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    if value < 0x10000000:
        return bytes(
            (value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80, value >> 21)
        )
    if value < 0x800000000:
        return bytes(
            (
                value & 0x7F | 0x80,
                value >> 7 & 0x7F | 0x80,
                value >> 14 & 0x7F | 0x80,
                value >> 21 & 0x7F | 0x80,
                value >> 28,
            )
        )
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_TAGS = [_varint(number << 3 | 2) for number in range(16)]
_VIEW_AGGREGATES_TAG = _TAGS[_VIEW_AGGREGATES]


def length_delimited(field_number: int, data: bytes) -> bytes:
    """The encoding of a length-delimited field (a message, bytes or a string)."""
    tag = _TAGS[field_number] if field_number < 16 else _varint(field_number << 3 | 2)
    return tag + _varint(len(data)) + data


# --- Attributes -------------------------------------------------------------------------


def _from_json(value: Any) -> AttrValue:
    if isinstance(value, dict):
        if len(value) == 1 and TIMESTAMP_KEY in value:
            return Instant(int(value[TIMESTAMP_KEY]))
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    # jsonb keeps numbers as numerics: a whole one comes back as an int.
    number = float(value)
    return number if math.isfinite(number) else None


def attributes_from_json(value: Mapping[str, Any]) -> dict[str, AttrValue]:
    """Attributes as ``audience.rules.attributes_json`` wrote them, read back."""
    return {key: _from_json(item) for key, item in value.items()}


def _attributes_bytes(attributes: Mapping[str, AttrValue]) -> bytes:
    message = profile_change_pb2.EvaluationView()
    for key, value in attributes.items():
        message.attributes[key].CopyFrom(value_to_proto(value))
    return message.SerializeToString()


# --- Aggregates -------------------------------------------------------------------------


def _aggregate_value(aggregate_id: str, series: AggregateSeries) -> profile_pb2.AggregateValue:
    return profile_pb2.AggregateValue(
        aggregate_id=aggregate_id, buckets=[bucket.to_proto() for bucket in series.ordered()]
    )


def aggregate_values(
    aggregates: Mapping[str, AggregateSeries],
) -> list[profile_pb2.AggregateValue]:
    """The non-empty aggregates, by id."""
    return [
        _aggregate_value(aggregate_id, aggregates[aggregate_id])
        for aggregate_id in sorted(aggregates)
        if aggregates[aggregate_id].buckets
    ]


_DOUBLE = struct.Struct("<d").pack
_INT64 = 1 << 64


# Each instant encoded as a bucket's start (field 1), first time (6) or last time (7),
# tag and length included, by value: a bucket's start is shared by every profile with a
# bucket there, and an event's time by every bucket it lands in. Each is cleared when it
# grows too big.
_STARTS: dict[int, bytes] = {}
_FIRSTS: dict[int, bytes] = {}
_LASTS: dict[int, bytes] = {}
_INSTANTS_LIMIT = 200_000


def _time_field(memo: dict[int, bytes], tag: bytes, micros: int) -> bytes:
    if len(memo) >= _INSTANTS_LIMIT:
        memo.clear()
    body = _encode_timestamp(micros)
    found = memo[micros] = tag + _varint(len(body)) + body
    return found


def _encode_timestamp(micros: int) -> bytes:
    seconds, rest = divmod(micros, 1_000_000)
    if rest:
        if seconds:
            return b"\x08" + _varint(seconds % _INT64) + b"\x10" + _varint(rest * 1000)
        return b"\x10" + _varint(rest * 1000)
    return b"\x08" + _varint(seconds % _INT64) if seconds else b""


def bucket_bytes(bucket: BucketState) -> bytes:
    """The encoding of ``bucket.to_proto()``, written directly: a change re-encodes only the
    buckets it touched, and this is the hot path of every published view."""
    start, count, total, low, high, first, last, distinct = bucket
    data = _STARTS.get(start) or _time_field(_STARTS, b"\x0a", start)
    if count:
        data += b"\x10" + (_SMALL[count] if 0 < count < 128 else _varint(count % _INT64))
    if total or math.copysign(1.0, total) < 0:
        data += b"\x19" + _DOUBLE(total)
    if low is not None:
        data += b"\x21" + _DOUBLE(low)
    if high is not None:
        data += b"\x29" + _DOUBLE(high)
    if first is not None:
        data += _FIRSTS.get(first) or _time_field(_FIRSTS, b"\x32", first)
    if last is not None:
        data += _LASTS.get(last) or _time_field(_LASTS, b"\x3a", last)
    for value in distinct:
        data += length_delimited(8, value.encode())
    return data


# An aggregate's id as field 1 of its AggregateValue, by id (the registered ones).
_AGGREGATE_IDS: dict[str, bytes] = {}


def _series_bytes(aggregate_id: str, series: AggregateSeries) -> bytes:
    if series.encoded is None:
        pieces = series.pieces
        if pieces is None:
            pieces = series.pieces = {}
        head = _AGGREGATE_IDS.get(aggregate_id)
        if head is None:
            if len(_AGGREGATE_IDS) >= _INSTANTS_LIMIT:
                _AGGREGATE_IDS.clear()
            head = _AGGREGATE_IDS[aggregate_id] = length_delimited(1, aggregate_id.encode())
        parts = [head]
        buckets = series.buckets
        for start in sorted(buckets) if len(buckets) > 1 else buckets:
            piece = pieces.get(start)
            if piece is None:
                # Kept with its tag and length as field 2 of the AggregateValue.
                piece = pieces[start] = length_delimited(2, bucket_bytes(buckets[start]))
            parts.append(piece)
        body = b"".join(parts)
        series.encoded = _VIEW_AGGREGATES_TAG + _varint(len(body)) + body
    return series.encoded


def _series_document(aggregate_id: str, series: AggregateSeries) -> str:
    if series.document is None:
        texts = series.texts
        if texts is None:
            texts = series.texts = {}
        parts = []
        buckets = series.buckets
        for start in sorted(buckets) if len(buckets) > 1 else buckets:
            text = texts.get(start)
            if text is None:
                text = texts[start] = bucket_json(buckets[start])
            parts.append(text)
        series.document = series_json(aggregate_id, parts)
    return series.document


def aggregates_document(aggregates: Mapping[str, AggregateSeries]) -> str:
    """The ``aggregates`` column of a profile (``audience.rules.aggregates_json``, to the
    letter), re-encoding only what changed."""
    # A profile has dozens of series and a unit changes a few: the loop stays inline and
    # calls out only for a series whose text is stale (a kept text implies buckets).
    parts = []
    for aggregate_id in sorted(aggregates):
        series = aggregates[aggregate_id]
        text = series.document
        if text is None:
            if not series.buckets:
                continue
            text = _series_document(aggregate_id, series)
        parts.append(text)
    return document_json(parts)


# --- Views --------------------------------------------------------------------------------


def _set_time(message: Any, name: str, micros: int | None) -> None:
    if micros is not None:
        getattr(message, name).CopyFrom(timestamp_from_micros(micros))


def profile_view(state: ProfileState) -> bytes:
    """The encoded ``EvaluationView`` of a profile."""
    view = profile_change_pb2.EvaluationView(
        lifetime_value=state.lifetime_value,
        order_count=state.order_count,
        visit_count=state.visit_count,
        account_id=state.account_id,
    )
    _set_time(view, "first_seen_time", state.first_seen)
    _set_time(view, "last_seen_time", state.last_seen)
    if state.attributes_encoded is None:
        state.attributes_encoded = _attributes_bytes(state.attributes)
    parts = [view.SerializeToString(), state.attributes_encoded]
    if state.session is not None:
        parts.append(length_delimited(_VIEW_SESSION, state.session.SerializeToString()))
    context = encoded_context(state)
    if context is not None:
        parts.append(length_delimited(_VIEW_CONTEXT, context))
    for aggregate_id, series in state.aggregates.items():
        # Inline, as in `aggregates_document`: most series are unchanged.
        encoded = series.encoded
        if encoded is None:
            if not series.buckets:
                continue
            encoded = _series_bytes(aggregate_id, series)
        parts.append(encoded)
    return b"".join(parts)


def account_view(account: AccountState) -> bytes:
    """The encoded ``EvaluationView`` of an account."""
    view = profile_change_pb2.EvaluationView(
        lifetime_value=account.lifetime_value, order_count=account.order_count
    )
    _set_time(view, "first_seen_time", account.first_seen)
    _set_time(view, "last_seen_time", account.last_seen)
    if account.attributes_encoded is None:
        account.attributes_encoded = _attributes_bytes(account.attributes)
    return view.SerializeToString() + account.attributes_encoded


def encode_change(
    *,
    dataset: str,
    kind: str,
    subject_id: str,
    sequence: int,
    change_type: ChangeType,
    event_ids: Sequence[str],
    keys: Iterable[str],
    view: bytes | None,
    change_time: int,
    merged_into: str = "",
) -> bytes:
    """The encoded ``ProfileChange``; ``view`` None leaves it empty (an erasure, a merge)."""
    change = profile_change_pb2.ProfileChange(
        dataset=dataset,
        kind=_KINDS[kind],
        profile_id=subject_id,
        sequence=sequence,
        type=_CHANGE_TYPES[change_type],
        event_ids=event_ids,
        changed_keys=sorted(keys),
        merged_into=merged_into,
        change_time=timestamp_from_micros(change_time),
    )
    data = change.SerializeToString()
    if view is not None:
        data += length_delimited(_CHANGE_VIEW, view)
    return data


def change_batch(changes: Iterable[bytes]) -> bytes:
    """The encoded ``ProfileChangeBatch`` of encoded changes."""
    return b"".join(length_delimited(_BATCH_CHANGES, change) for change in changes)


# --- Rows ---------------------------------------------------------------------------------


def evaluation_columns(state: ProfileState | AccountState) -> dict[str, Any]:
    """The columns of ``profiles`` the rules read (``audience.rules.evaluation_row``)."""
    if isinstance(state, ProfileState):
        return evaluation_row_from_parts(
            attributes=attributes_json(state.attributes),
            aggregates=aggregates_document(state.aggregates),
            session=state.session,
            context=state.context,
            first_seen=state.first_seen,
            last_seen=state.last_seen,
            lifetime_value=state.lifetime_value,
            order_count=state.order_count,
            visit_count=state.visit_count,
            account_id=state.account_id,
        )
    return evaluation_row_from_parts(
        attributes=attributes_json(state.attributes),
        aggregates="{}",
        first_seen=state.first_seen,
        last_seen=state.last_seen,
        lifetime_value=state.lifetime_value,
        order_count=state.order_count,
    )


def _identities(identities: Iterable[tuple[str, str]]) -> list[common_pb2.Identity]:
    return [common_pb2.Identity(type=kind, value=value) for kind, value in identities]


def state_blob(state: ProfileState) -> bytes:
    """What of a profile has no column: identities, the visit, the context, the merges."""
    blob = profile_pb2.Profile(
        identities=_identities(state.identities),
        merged_profiles=state.merged_profiles,
    )
    data = blob.SerializeToString()
    if state.session is not None:
        data += length_delimited(_PROFILE_SESSION, state.session.SerializeToString())
    context = encoded_context(state)
    if context is not None:
        data += length_delimited(_PROFILE_CONTEXT, context)
    return data


def _micros(moment: datetime | None) -> int | None:
    return None if moment is None else micros_from_datetime(moment)


def profile_from_parts(
    dataset: str,
    profile_id: str,
    row: Mapping[str, Any],
    document: Mapping[str, Sequence[Sequence[Any]]] | None,
) -> ProfileState:
    """A profile from its row (the columns ``store`` reads) and its ``aggregates`` document
    as ``json.loads`` reads it (``None``: left unread)."""
    blob = profile_pb2.Profile.FromString(row["state"] or b"")
    aggregates: dict[str, AggregateSeries] = {}
    for aggregate_id, items in (document or {}).items():
        buckets = [bucket_from_json(item) for item in items]
        if buckets:
            aggregates[aggregate_id] = AggregateSeries({bucket.start: bucket for bucket in buckets})
    expire = row["aggregates_expire"]
    return ProfileState(
        dataset=dataset,
        profile_id=profile_id,
        sequence=row["sequence"],
        attributes=attributes_from_json(row["attributes"] or {}),
        identities=[(identity.type, identity.value) for identity in blob.identities],
        account_id=row["account_id"] or "",
        session=blob.current_session if blob.HasField("current_session") else None,
        context=blob.last_context if blob.HasField("last_context") else None,
        first_seen=_micros(row["first_seen"]),
        last_seen=_micros(row["last_seen"]),
        lifetime_value=row["lifetime_value"],
        order_count=row["order_count"],
        visit_count=row["visit_count"],
        event_count=row["event_count"],
        merged_profiles=list(blob.merged_profiles),
        aggregates=aggregates,
        expire=None if expire is None else micros_from_datetime(expire),
    )


def account_from_row(dataset: str, account_id: str, row: Mapping[str, Any]) -> AccountState:
    return AccountState(
        dataset=dataset,
        account_id=account_id,
        sequence=row["sequence"],
        attributes=attributes_from_json(row["attributes"] or {}),
        user_count=row["user_count"],
        first_seen=_micros(row["first_seen"]),
        last_seen=_micros(row["last_seen"]),
        lifetime_value=row["lifetime_value"],
        order_count=row["order_count"],
    )


# --- API resources ------------------------------------------------------------------------


def profile_message(state: ProfileState) -> profile_pb2.Profile:
    """The ``PROFILE_VIEW_BASIC`` resource of a profile."""
    dataset = state.dataset
    message = profile_pb2.Profile(
        name=profile_name(dataset, state.profile_id),
        identities=_identities(state.identities),
        account=account_name(dataset, state.account_id) if state.account_id else "",
        lifetime_value=state.lifetime_value,
        order_count=state.order_count,
        visit_count=state.visit_count,
        event_count=state.event_count,
        merged_profiles=[profile_name(dataset, merged) for merged in state.merged_profiles],
        sequence=state.sequence,
    )
    for key, value in state.attributes.items():
        message.attributes[key].CopyFrom(value_to_proto(value))
    if state.session is not None:
        message.current_session.CopyFrom(state.session)
    if state.context is not None:
        message.last_context.CopyFrom(state.context)
    _set_time(message, "first_seen_time", state.first_seen)
    _set_time(message, "last_seen_time", state.last_seen)
    return message


def account_message(account: AccountState) -> profile_pb2.Account:
    message = profile_pb2.Account(
        name=account_name(account.dataset, account.account_id),
        user_count=account.user_count,
        lifetime_value=account.lifetime_value,
        order_count=account.order_count,
        sequence=account.sequence,
    )
    for key, value in account.attributes.items():
        message.attributes[key].CopyFrom(value_to_proto(value))
    _set_time(message, "first_seen_time", account.first_seen)
    _set_time(message, "last_seen_time", account.last_seen)
    return message
