"""Merging one profile into another: what the person becomes when two profiles are one."""

from __future__ import annotations

from audience.rules.values import micros_from_timestamp
from services.profile.domain.aggregates import merge_series
from services.profile.domain.model import ProfileState, Touch

__all__ = ["merge_into"]


def merge_into(target: ProfileState, source: ProfileState, touch: Touch) -> None:
    """Merges ``source`` into ``target``; ``touch`` records the target's changes.

    The target's attributes win and the source's fill the gaps; identities, history
    counts, lifetime figures and visits add up; first seen is the earlier and last seen the
    later; the current visit and last context are those of whichever was seen last; the
    target keeps its account unless it has none; aggregates combine bucket by bucket.
    """
    touch.row = True
    for name, value in source.attributes.items():
        if name not in target.attributes:
            target.attributes[name] = value
            touch.keys.add(f"attribute:{name}")
            target.attributes_encoded = None
    for identity in source.identities:
        target.add_identity(identity)
    if not target.account_id and source.account_id:
        target.account_id = source.account_id
        touch.keys.add("account")
    if source.first_seen is not None and (
        target.first_seen is None or source.first_seen < target.first_seen
    ):
        target.first_seen = source.first_seen
        touch.keys.add("seen")
    source_later = source.last_seen is not None and (
        target.last_seen is None or source.last_seen > target.last_seen
    )
    if source_later:
        target.last_seen = source.last_seen
        touch.keys.add("seen")
        if source.context is not None:
            target.context = source.context
            touch.keys.add("context")
    if source.session is not None and (
        target.session is None
        or micros_from_timestamp(source.session.last_activity_time)
        > micros_from_timestamp(target.session.last_activity_time)
    ):
        target.session = source.session
    if source.visit_count:
        target.visit_count += source.visit_count
        if target.session is not None:
            # The visit kept is the latest of all, so its number counts every visit.
            target.session.visit_number = target.visit_count
        touch.keys.add("session")
    if source.order_count or source.lifetime_value:
        target.order_count += source.order_count
        target.lifetime_value += source.lifetime_value
        touch.keys.add("lifetime")
    target.event_count += source.event_count
    target.merged_profiles.append(source.profile_id)
    target.merged_profiles.extend(source.merged_profiles)
    if source.aggregates:
        merge_series(target.aggregates, source.aggregates, touch)
        touch.keys.add("aggregates")
        if source.expire is not None:
            target.expires_by(source.expire)
