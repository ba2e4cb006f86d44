"""The rule language as the engine uses it: parsing, validation with reference checks,
compilation into the domain's :class:`~services.segment_engine.domain.catalog.CompiledRule`,
explanations, and evaluation views from the bus's bytes."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from audience import rules
from audience.bus.v1 import profile_change_pb2
from audience.errors import AudienceError, FieldViolation, invalid_argument
from audience.v1 import profile_pb2, rule_pb2
from services.segment_engine.domain.catalog import RollupDef, Threshold
from services.segment_engine.domain.model import Kind

__all__ = [
    "CompiledSegmentRule",
    "RuleFacts",
    "compile_segment_rule",
    "empty_view",
    "parse_definition",
    "rule_facts",
    "validate_definition",
    "view_from_bytes",
]


# Comparisons that hold for bounds up to the observed value.
_HOLDS_BELOW = frozenset({rule_pb2.OPERATOR_GREATER_THAN, rule_pb2.OPERATOR_GREATER_THAN_OR_EQUAL})


class CompiledSegmentRule:
    """A compiled rule, as the domain's ``CompiledRule`` port."""

    __slots__ = (
        "_ages",
        "_aggregate_ids",
        "_compiled",
        "dependencies",
        "matches",
        "rollups",
        "rule",
        "segments",
        "threshold",
        "time_dependent",
    )

    def __init__(self, compiled: rules.CompiledRule) -> None:
        self._compiled = compiled
        self.rule: rule_pb2.Rule = compiled.rule
        self.dependencies: frozenset[str] = compiled.dependencies
        self.segments: frozenset[str] = compiled.segments
        self.time_dependent: bool = compiled.time_dependent
        found = compiled.threshold
        self.threshold: Threshold | None = (
            None
            if found is None
            else Threshold(
                (found.observed, found.operator), found.bound, found.operator in _HOLDS_BELOW
            )
        )
        # Timers come from windows, which read their aggregate (a window over an aggregate
        # the view does not hold never moves), and from days-since conditions (key `seen`).
        self._aggregate_ids = frozenset(spec.aggregate_id for spec in compiled.aggregates)
        self._ages = "seen" in compiled.dependencies
        self.rollups: tuple[RollupDef, ...] = tuple(
            RollupDef(rollup.key, CompiledSegmentRule(rollup.predicate))
            for rollup in compiled.rollups
        )
        # The generated predicate itself: the hot path pays no extra call.
        self.matches: Callable[[Any, int, Container[str], Mapping[str, int]], bool] = (
            compiled.predicate
        )

    @property
    def aggregates(self) -> tuple[profile_pb2.AggregateSpec, ...]:
        return self._compiled.aggregates

    def leaf_mask(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> int:
        return self._compiled.leaf_mask(view, now, segments, rollups)

    def flipped_clauses(
        self,
        view: Any,
        now: int,
        segments: Container[str],
        rollups: Mapping[str, int],
        before_mask: int,
    ) -> tuple[rule_pb2.RuleExplanation, ...]:
        compiled = self._compiled
        changed = before_mask ^ compiled.leaf_mask(view, now, segments, rollups)
        if not changed:
            return ()
        flipped = [index for index in range(changed.bit_length()) if changed >> index & 1]
        return compiled.explain_conditions(flipped, view, now, segments, rollups)

    def next_change(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> int | None:
        if not self._ages and self._aggregate_ids.isdisjoint(view.aggregates):
            # Most subjects hold few of the dataset's aggregates: the tree walk is skipped.
            return None
        return self._compiled.next_change(view, now, segments, rollups)

    def explain(
        self, view: Any, now: int, segments: Container[str], rollups: Mapping[str, int]
    ) -> rule_pb2.RuleExplanation:
        return self._compiled.explain(view, now, segments, rollups)


def compile_segment_rule(rule: rule_pb2.Rule | bytes, kind: Kind) -> CompiledSegmentRule:
    """Compiles a stored (already validated) rule."""
    message = rule_pb2.Rule.FromString(rule) if isinstance(rule, bytes) else rule
    return CompiledSegmentRule(rules.compile_rule(message, int(kind)))


def parse_definition(
    rule: rule_pb2.Rule | None, rule_text: str, *, prefix: str = ""
) -> rule_pb2.Rule:
    """The rule tree from a request's ``rule`` or, when that is empty, its ``rule_text``."""
    if rule is not None and rule.WhichOneof("node") is not None:
        return rule
    if not rule_text:
        raise invalid_argument(
            "A rule segment needs a rule.",
            FieldViolation(f"{prefix}rule", "required: give rule or rule_text."),
            reason="INVALID_RULE",
        )
    return rules.parse_rule(rule_text, field=f"{prefix}rule_text")


@dataclass(frozen=True)
class _Resolver:
    known: Mapping[str, rules.SegmentInfo]

    def resolve(self, segment: str) -> rules.SegmentInfo | None:
        return self.known.get(segment)


def validate_definition(
    rule: rule_pb2.Rule,
    kind: Kind,
    *,
    dataset: str,
    segment_name: str | None,
    known: Iterable[tuple[str, Kind, frozenset[str]]],
    field: str = "rule",
) -> CompiledSegmentRule:
    """Validates a rule for saving (references exist, are of the right kind, form no
    cycle) and compiles it.

    Args:
        known: every segment of the dataset: (name, kind, names its rule refers to).
    """
    resolver = _Resolver(
        {name: rules.SegmentInfo(int(k), tuple(sorted(refs))) for name, k, refs in known}
    )
    rules.validate_rule(
        rule,
        int(kind),
        resolver=resolver,
        segment_name=segment_name,
        dataset=dataset,
        field=field,
    )
    try:
        return CompiledSegmentRule(rules.compile_rule(rule, int(kind)))
    except AudienceError:
        raise
    except ValueError as error:
        raise invalid_argument(
            f"The rule cannot be compiled: {error}",
            FieldViolation(field, str(error)),
            reason="INVALID_RULE",
        ) from None


@dataclass(frozen=True)
class RuleFacts:
    """What a rule depends on, for people."""

    rule: rule_pb2.Rule
    text: str
    event_names: tuple[str, ...]
    attribute_paths: tuple[str, ...]
    segments: tuple[str, ...]
    time_dependent: bool


def rule_facts(compiled: CompiledSegmentRule, closure: Iterable[str]) -> RuleFacts:
    """The rule's facts; ``closure`` names every segment it refers to, directly or not."""
    events = sorted(
        key.removeprefix("event:") for key in compiled.dependencies if key.startswith("event:")
    )
    attributes = sorted(
        key.removeprefix("attribute:")
        for key in compiled.dependencies
        if key.startswith("attribute:")
    )
    return RuleFacts(
        rule=compiled.rule,
        text=rules.format_rule(compiled.rule),
        event_names=tuple(events),
        attribute_paths=tuple(attributes),
        segments=tuple(sorted(set(closure))),
        time_dependent=compiled.time_dependent
        or any(rollup.rule.time_dependent for rollup in compiled.rollups),
    )


def view_from_bytes(data: bytes | None, subject_id: str) -> rules.View | rules.LazyView:
    """The evaluation view of a stored ``EvaluationView``; an empty one when there is none."""
    if not data:
        return rules.View(subject_id=subject_id)
    return rules.LazyView(profile_change_pb2.EvaluationView.FromString(data), subject_id)


def empty_view(subject_id: str) -> rules.View:
    return rules.View(subject_id=subject_id)
