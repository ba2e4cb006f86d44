"""Delta feeds: net joins and leaves from an at-least-once change stream."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.export.domain.delta import DeltaAccumulator
from services.export.domain.model import ChangeKind, MembershipChange

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def change(
    member: str, kind: ChangeKind, sequence: int, *, segment: str = "s", cause: str = "event"
) -> MembershipChange:
    return MembershipChange(
        resume_token=f"t{sequence}",
        member=f"datasets/d/profiles/{member}",
        member_id=member,
        segment_id=segment,
        segment_version=2,
        kind=kind,
        change_time=T0 + timedelta(seconds=sequence),
        member_sequence=sequence,
        cause=cause,
        reason={"cause": cause},
    )


JOIN, LEAVE = ChangeKind.JOIN, ChangeKind.LEAVE


def net(*changes: MembershipChange) -> list[tuple[str, str, ChangeKind]]:
    accumulator = DeltaAccumulator()
    for item in changes:
        accumulator.add(item)
    return [(row.segment_id, row.member_id, row.kind) for row in accumulator.rows()]


def test_joins_and_leaves_since_the_last_run_are_listed_by_segment_and_member() -> None:
    assert net(
        change("b", JOIN, 1),
        change("a", LEAVE, 2),
        change("c", JOIN, 3, segment="r"),
    ) == [("r", "c", JOIN), ("s", "a", LEAVE), ("s", "b", JOIN)]


def test_a_member_who_joined_and_left_again_has_no_row() -> None:
    assert net(change("a", JOIN, 1), change("a", LEAVE, 2)) == []
    assert net(change("a", LEAVE, 1), change("a", JOIN, 2)) == []


def test_the_last_change_wins_after_several_flips() -> None:
    rows = net(change("a", JOIN, 1), change("a", LEAVE, 2), change("a", JOIN, 3))

    assert rows == [("s", "a", JOIN)]


def test_repeated_changes_from_an_at_least_once_stream_are_ignored() -> None:
    assert (
        net(
            change("a", JOIN, 1),
            change("a", LEAVE, 2),
            change("a", JOIN, 1),
            change("a", LEAVE, 2),
        )
        == []
    )


def test_the_row_carries_the_time_and_version_of_the_last_change() -> None:
    accumulator = DeltaAccumulator()
    accumulator.add(change("a", LEAVE, 4))

    (row,) = accumulator.rows()

    assert (row.change_time, row.segment_version) == (T0 + timedelta(seconds=4), 2)


def test_members_whose_last_change_is_an_erasure_never_appear() -> None:
    assert net(change("a", LEAVE, 1, cause="erasure")) == []
    assert net(change("b", JOIN, 1), change("b", LEAVE, 2, cause="erasure")) == []
