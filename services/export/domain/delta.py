"""Delta feeds: the net joins and leaves between two points of the change stream."""

from __future__ import annotations

from dataclasses import dataclass

from services.export.domain.csvrows import DeltaRow
from services.export.domain.model import ChangeKind, MembershipChange

__all__ = ["DeltaAccumulator"]

ERASURE = "erasure"


@dataclass(slots=True)
class _Net:
    first_kind: ChangeKind
    last: MembershipChange


class DeltaAccumulator:
    """Folds a stream of changes into one row per member and segment whose membership differs
    between the start and the end of the stream.

    The stream is at least once: a change of a member whose sequence is not past the last one
    seen for that member and segment is a repeat and is ignored. A member who joined and left
    (or left and joined again) in between has no row. Members whose last change is an erasure
    have no row either: erased profiles never appear in export files.
    """

    def __init__(self) -> None:
        self._net: dict[tuple[str, str], _Net] = {}

    def add(self, change: MembershipChange) -> None:
        key = (change.segment_id, change.member_id)
        net = self._net.get(key)
        if net is None:
            self._net[key] = _Net(change.kind, change)
            return
        sequence = change.member_sequence
        if sequence and sequence <= net.last.member_sequence:
            return
        net.last = change

    def __len__(self) -> int:
        return len(self._net)

    def rows(self) -> list[DeltaRow]:
        """The net changes, by segment and member id."""
        rows: list[DeltaRow] = []
        for (segment_id, member_id), net in sorted(self._net.items()):
            last = net.last
            was_member = net.first_kind is ChangeKind.LEAVE
            is_member = last.kind is ChangeKind.JOIN
            if was_member == is_member or last.cause == ERASURE:
                continue
            rows.append(
                DeltaRow(member_id, segment_id, last.segment_version, last.kind, last.change_time)
            )
        return rows
