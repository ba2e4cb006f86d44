"""Hand-written compiled rules for the domain's tests: a view is a plain dict."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.segment_engine.domain.catalog import Catalog, RollupDef, SegmentDef, Threshold
from services.segment_engine.domain.model import Kind, Source, segment_name

DATASET = "d1"

Test = Callable[[Any, int, Container[str], Mapping[str, int]], bool]


@dataclass
class FakeRule:
    """A rule that is one condition: ``test``. Calls are counted."""

    test: Test
    dependencies: frozenset[str]
    segments: frozenset[str] = frozenset()
    time_dependent: bool = False
    timer: Callable[[Any, int], int | None] | None = None
    rollups: Sequence[RollupDef] = ()
    threshold: Threshold | None = None
    calls: list[int] = field(default_factory=list)

    def matches(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> bool:
        self.calls.append(now)
        return self.test(view, now, segments, rollups)

    def leaf_mask(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> int:
        return 1 if self.test(view, now, segments, rollups) else 0

    def flipped_clauses(
        self,
        view: Any,
        now: int,
        segments: Container[str],
        rollups: Mapping[str, int],
        before_mask: int,
    ) -> tuple[Any, ...]:
        after = self.leaf_mask(view, now, segments, rollups)
        return ("the condition",) if after != before_mask else ()

    def next_change(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> int | None:
        return self.timer(view, now) if self.timer is not None else None


def attribute_rule(name: str, test: Callable[[Any], bool]) -> FakeRule:
    return FakeRule(
        lambda view, now, segs, rollups: test(view.get(name)),
        frozenset({f"attribute:{name}"}),
    )


def threshold_rule(name: str, bound: float, *, holds_below: bool = True) -> FakeRule:
    """``attributes.name >= bound``, or ``<= bound`` when not ``holds_below``."""

    def test(view: Any, now: int, segs: Container[str], rollups: Mapping[str, int]) -> bool:
        value = view.get(name)
        if value is None:
            return False
        return bool(value >= bound if holds_below else value <= bound)

    return FakeRule(
        test,
        frozenset({f"attribute:{name}"}),
        threshold=Threshold(("attribute", name), bound, holds_below),
    )


def member_of(segment_id: str, negated: bool = False) -> FakeRule:
    name = segment_name(DATASET, segment_id)
    return FakeRule(
        lambda view, now, segs, rollups: (name in segs) != negated,
        frozenset({f"segment:{name}"}),
        segments=frozenset({name}),
    )


def segment(
    segment_id: str, rule: FakeRule | None, kind: Kind = Kind.USER, version: int = 1
) -> SegmentDef:
    return SegmentDef(
        segment_id=segment_id,
        name=segment_name(DATASET, segment_id),
        kind=kind,
        source=Source.RULE if rule is not None else Source.IMPORTED,
        version=version,
        rule=rule,
    )


def catalog(segments: Iterable[SegmentDef], revision: int = 1) -> Catalog:
    return Catalog(DATASET, revision, segments)
