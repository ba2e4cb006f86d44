"""The oracle: who should be in each segment, and what the change stream says happened.

Both are computed here from scratch, knowing nothing of the segment engine: memberships by
evaluating every rule (compiled by ``audience.rules``) over the final profiles and
accounts at one instant, segments that refer to others in dependency order, roll-ups by
counting the account's users that satisfy the user rule; the stream by replaying every
join and leave the subscriber received, in the order received.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from audience.rules import CompiledRule, View
from audience.v1 import segment_pb2
from tests.faults.subscriber import SeenChange
from tests.faults.workload import PARENT

__all__ = [
    "OracleSegment",
    "Replay",
    "account_member",
    "evaluate",
    "order_segments",
    "referenced",
    "replay",
    "user_member",
]

_USER = segment_pb2.SEGMENT_KIND_USER

Membership = dict[str, set[str]]
"""Segment name → member names."""


def user_member(profile_id: str) -> str:
    return f"{PARENT}/profiles/{profile_id}"


def account_member(account_id: str) -> str:
    return f"{PARENT}/accounts/{account_id}"


@dataclass(frozen=True)
class OracleSegment:
    name: str
    kind: int
    compiled: CompiledRule

    def references(self) -> set[str]:
        names = set(self.compiled.segments)
        for rollup in self.compiled.rollups:
            names |= rollup.predicate.segments
        return names


def order_segments(segments: Iterable[OracleSegment]) -> list[OracleSegment]:
    """User segments, then account segments (their roll-ups read user memberships), each
    after every segment it refers to."""
    pending = {segment.name: segment for segment in segments}
    ordered: list[OracleSegment] = []
    done: set[str] = set()
    for kind_first in (True, False):
        while True:
            ready = sorted(
                name
                for name, segment in pending.items()
                if (segment.kind == _USER) == kind_first
                and segment.references() <= done | (segment.references() - set(pending))
            )
            if not ready:
                break
            for name in ready:
                ordered.append(pending.pop(name))
                done.add(name)
    if pending:
        raise ValueError(f"segments in a cycle or of no kind: {sorted(pending)}")
    return ordered


def referenced(segment: OracleSegment, by_name: Mapping[str, OracleSegment]) -> list[str]:
    """Every segment ``segment`` refers to, directly or through others."""
    found: list[str] = []
    stack = sorted(segment.references())
    while stack:
        name = stack.pop()
        if name in found or name not in by_name:
            continue
        found.append(name)
        stack.extend(sorted(by_name[name].references()))
    return found


def evaluate(
    segments: Sequence[OracleSegment],
    users: Mapping[str, View],
    accounts: Mapping[str, View],
    now: int,
) -> Membership:
    """Each segment's members at ``now`` (µs); ``segments`` as ``order_segments`` gives them."""
    belongs: defaultdict[str, set[str]] = defaultdict(set)
    members: Membership = {}
    for segment in segments:
        rule = segment.compiled
        found: set[str] = set()
        if segment.kind == _USER:
            for profile_id, view in users.items():
                member = user_member(profile_id)
                if rule.matches(view, now, belongs[member]):
                    found.add(member)
        else:
            counts: defaultdict[str, dict[str, int]] = defaultdict(dict)
            for rollup in rule.rollups:
                for profile_id, view in users.items():
                    if view.account_id is None:
                        continue
                    if rollup.predicate.matches(view, now, belongs[user_member(profile_id)]):
                        per_account = counts[view.account_id]
                        per_account[rollup.key] = per_account.get(rollup.key, 0) + 1
            for account_id, view in accounts.items():
                member = account_member(account_id)
                if rule.matches(view, now, belongs[member], counts.get(account_id, {})):
                    found.add(member)
        for member in found:
            belongs[member].add(segment.name)
        members[segment.name] = found
    return members


@dataclass
class Replay:
    """The memberships the stream leads to, and what was wrong with it on the way.

    Attributes:
        state: (segment, member) → in, after the last change received.
        duplicates: changes received more than once.
        order_violations: changes of a member received after a later change of the same
            member (by ``member_sequence``).
        kind_repeats: a join of a member already in, or a leave of one already out: the
            change between them never arrived.
    """

    state: dict[tuple[str, str], bool] = field(default_factory=dict)
    duplicates: int = 0
    order_violations: int = 0
    kind_repeats: int = 0
    examples: list[str] = field(default_factory=list)

    def members(self) -> Membership:
        result: defaultdict[str, set[str]] = defaultdict(set)
        for (segment, member), inside in self.state.items():
            if inside:
                result[segment].add(member)
        return dict(result)


def replay(changes: Iterable[SeenChange]) -> Replay:
    outcome = Replay()
    seen: set[tuple[str, str, int, bool]] = set()
    last: dict[str, int] = {}
    for change in changes:
        key = (change.member, change.segment, change.sequence, change.join)
        if key in seen:
            outcome.duplicates += 1
            continue
        seen.add(key)
        if change.sequence <= last.get(change.member, -1):
            outcome.order_violations += 1
            if len(outcome.examples) < 10:
                outcome.examples.append(f"order: {change}")
        last[change.member] = max(change.sequence, last.get(change.member, -1))
        pair = (change.segment, change.member)
        if outcome.state.get(pair, False) == change.join:
            outcome.kind_repeats += 1
            if len(outcome.examples) < 10:
                outcome.examples.append(f"repeat: {change}")
        outcome.state[pair] = change.join
    return outcome
