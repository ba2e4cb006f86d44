"""Translation between the domain and the ``audience.v1`` messages, shared by the gRPC layer
and the writers that persist reasons as protobuf bytes."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from audience.rules import timestamp_from_micros
from audience.v1 import membership_pb2, rule_pb2, segment_pb2
from services.segment_engine.domain.model import (
    ChangeKind,
    Kind,
    Membership,
    Reason,
    member_name,
    segment_name,
)
from services.segment_engine.domain.segments import SegmentRecord
from services.segment_engine.store.log import LogRow

__all__ = [
    "change_message",
    "encode_reason",
    "membership_message",
    "segment_message",
    "timestamp",
]


def timestamp(micros: int) -> timestamp_pb2.Timestamp:
    return timestamp_from_micros(micros)


def encode_reason(dataset: str, reason: Reason) -> bytes:
    """The serialized ``ChangeReason`` of a domain reason; flipped clauses are
    ``RuleExplanation`` messages made by the rules adapter."""
    message = membership_pb2.ChangeReason(
        cause=membership_pb2.ChangeCause.ValueType(reason.cause),
        event_ids=reason.event_ids,
        dependency_segment=(
            segment_name(dataset, reason.dependency_segment) if reason.dependency_segment else ""
        ),
    )
    for clause in reason.flipped:
        if isinstance(clause, rule_pb2.RuleExplanation):
            message.flipped_clauses.append(clause)
    return message.SerializeToString()


def change_message(dataset: str, row: LogRow, token: str) -> membership_pb2.MembershipChange:
    message = membership_pb2.MembershipChange(
        resume_token=token,
        member=member_name(dataset, row.kind, row.subject_id),
        segment=segment_name(dataset, row.segment_id),
        segment_version=row.segment_version,
        kind=(
            membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN
            if row.change is ChangeKind.JOIN
            else membership_pb2.MEMBERSHIP_CHANGE_KIND_LEAVE
        ),
        change_time=timestamp(row.time),
        member_sequence=row.seq,
    )
    # Parsed in place: a parsed reason passed in would be copied.
    message.reason.MergeFromString(row.reason)
    return message


def membership_message(
    dataset: str, kind: Kind, subject_id: str, segment_id: str, membership: Membership
) -> membership_pb2.Membership:
    message = membership_pb2.Membership(
        member=member_name(dataset, kind, subject_id),
        segment=segment_name(dataset, segment_id),
        segment_version=membership.version,
    )
    if membership.join_time:
        message.join_time.CopyFrom(timestamp(membership.join_time))
    return message


def segment_message(record: SegmentRecord) -> segment_pb2.Segment:
    message = segment_pb2.Segment(
        name=segment_name(record.dataset, record.segment_id),
        display_name=record.display_name,
        description=record.description,
        kind=segment_pb2.SegmentKind.ValueType(record.kind),
        source=segment_pb2.SegmentSource.ValueType(record.source),
        rule_text=record.rule_text,
        version=record.version,
        state=segment_pb2.SegmentState.ValueType(record.state),
        member_count=record.member_count,
        labels=dict(record.labels),
        etag=record.etag,
    )
    if record.rule is not None:
        message.rule.ParseFromString(record.rule)
    backfill = record.backfill
    if backfill.version:
        progress = message.backfill
        progress.version = backfill.version
        progress.profiles_done = backfill.done
        progress.profiles_total = backfill.total
        progress.percent = backfill.percent
        progress.error = backfill.error
        if backfill.start_time is not None:
            progress.start_time.CopyFrom(timestamp(backfill.start_time))
        if backfill.end_time is not None:
            progress.end_time.CopyFrom(timestamp(backfill.end_time))
    if record.create_time:
        message.create_time.CopyFrom(timestamp(record.create_time))
    if record.update_time:
        message.update_time.CopyFrom(timestamp(record.update_time))
    return message
