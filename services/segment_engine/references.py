"""The definitions of the segments a rule refers to, for the profile service's rule query
(which evaluates segment conditions without the engine's tables)."""

from __future__ import annotations

from collections.abc import Iterable

from services.segment_engine.domain.catalog import Catalog, CompiledRule
from services.segment_engine.profile_client import ReferencedSegment
from services.segment_engine.rules import CompiledSegmentRule
from services.segment_engine.store.members import MemberStore

__all__ = ["closure", "referenced_segments", "rule_references"]

_PAGE = 10_000


def rule_references(rule: CompiledRule) -> set[str]:
    """The segments a rule names: in its own conditions and in its roll-ups' user rules
    (an account rule counting the users of a user segment)."""
    names = set(rule.segments)
    for rollup in rule.rollups:
        names |= rollup.rule.segments
    return names


def closure(catalog: Catalog, names: Iterable[str]) -> list[str]:
    """Every segment reachable from ``names`` through rule references, in reach order."""
    seen: dict[str, None] = {}
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen[name] = None
        segment = catalog.by_name.get(name)
        if segment is not None and segment.rule is not None:
            stack.extend(sorted(rule_references(segment.rule)))
    return list(seen)


async def referenced_segments(
    catalog: Catalog, members: MemberStore, names: Iterable[str]
) -> list[ReferencedSegment]:
    """Definitions of every segment reachable from ``names``: rules, or imported members."""
    found: list[ReferencedSegment] = []
    for name in closure(catalog, names):
        segment = catalog.by_name.get(name)
        if segment is None:
            continue
        if isinstance(segment.rule, CompiledSegmentRule):
            found.append(ReferencedSegment(name, rule=segment.rule.rule))
            continue
        ids: list[str] = []
        after = ""
        while True:
            page = await members.member_ids(
                catalog.dataset, segment.segment_id, after=after, limit=_PAGE
            )
            ids.extend(page)
            if len(page) < _PAGE:
                break
            after = page[-1]
        found.append(ReferencedSegment(name, members=ids))
    return found
