"""Filling newly registered aggregates from a profile's event history."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from audience.rules.facts import PRODUCT_ADDED, facts_from_event
from audience.v1 import event_pb2
from services.profile.domain.aggregates import AggregateIndex, count_facts, prune
from services.profile.domain.apply import Settings, apply_event
from services.profile.domain.model import AggregateSeries, ProfileState, Touch

__all__ = ["needs_visits", "recompute"]

_log = logging.getLogger(__name__)


def needs_visits(index: AggregateIndex) -> bool:
    """Whether counting these aggregates needs the visits replayed: a ``product_added``
    fact depends on the visit's cart before the update, so on every event of the visit."""
    return PRODUCT_ADDED in index.names()


def recompute(
    profile_id: str,
    events: Iterable[event_pb2.Event],
    index: AggregateIndex,
    settings: Settings,
    now: int,
) -> dict[str, AggregateSeries]:
    """The aggregates of ``index`` over a profile's history, as the live path would have
    counted them.

    Args:
        events: the history, oldest first: every event when :func:`needs_visits`, else at
            least those whose facts the aggregates count.
    """
    scratch = ProfileState(dataset="", profile_id=profile_id)
    touch = Touch()
    replay = needs_visits(index)
    for event in events:
        try:
            if replay:
                apply_event(scratch, event, index, settings, touch, now)
            else:
                count_facts(scratch, facts_from_event(event, None), index, touch, now)
        except ValueError as error:
            _log.warning(
                "backfill skips event %s of profile %s: %s", event.event_id, profile_id, error
            )
    prune(scratch, index, touch, now)
    return scratch.aggregates
