"""One unit of work over a batch of events: the pure steps between the store's reads and
writes.

The consumer resolves identities (:func:`~services.profile.domain.identity.resolve`), has
the store lock and load every profile involved, then calls :func:`apply_users`; it locks
and loads the accounts :meth:`UserOutcome.accounts` names and calls :func:`apply_accounts`;
then it writes and publishes what the touches say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from audience.v1 import event_pb2
from services.profile.domain.aggregates import AggregateIndex
from services.profile.domain.apply import (
    Settings,
    apply_account_event,
    apply_event,
    finish,
)
from services.profile.domain.identity import Resolution
from services.profile.domain.merge import merge_into
from services.profile.domain.model import (
    AccountKey,
    AccountState,
    ProfileKey,
    ProfileState,
    Touch,
)

__all__ = [
    "MergeRecord",
    "Standing",
    "UserOutcome",
    "apply_accounts",
    "apply_users",
    "erase_profile",
    "merge_profiles",
    "roll_up",
    "standing",
]

_ACCOUNT_UPDATE = int(event_pb2.EVENT_TYPE_ACCOUNT_UPDATE)


@dataclass(frozen=True, slots=True)
class Standing:
    """What an account rolls up of one user."""

    account_id: str
    lifetime_value: float
    order_count: int
    first_seen: int | None
    last_seen: int | None


NOBODY = Standing("", 0.0, 0, None, None)


def standing(state: ProfileState) -> Standing:
    return Standing(
        state.account_id, state.lifetime_value, state.order_count, state.first_seen, state.last_seen
    )


@dataclass(frozen=True, slots=True)
class MergeRecord:
    """A merge that happened: ``reason`` names the event that linked the two, if any."""

    source: ProfileKey
    target: ProfileKey
    reason: str
    time: int


@dataclass(slots=True)
class UserOutcome:
    """What applying a batch did to its profiles.

    Attributes:
        touches: every profile the batch involved (merged-away ones too), with its changes.
        merged: merged-away profiles, each with the profile it went into.
        erased: erased profiles.
        merges: the merges, in order.
        before: each involved profile's standing before the batch, for the roll-ups.
        account_events: the new events that update an account, in order.
    """

    touches: dict[ProfileKey, Touch] = field(default_factory=dict)
    merged: dict[ProfileKey, ProfileKey] = field(default_factory=dict)
    erased: set[ProfileKey] = field(default_factory=set)
    merges: list[MergeRecord] = field(default_factory=list)
    before: dict[ProfileKey, Standing] = field(default_factory=dict)
    account_events: list[tuple[str, event_pb2.Event]] = field(default_factory=list)

    def gone(self, key: ProfileKey) -> bool:
        """Whether the profile no longer exists after the work: merged away or erased."""
        return key in self.merged or key in self.erased

    def accounts(self, states: Mapping[ProfileKey, ProfileState]) -> set[AccountKey]:
        """The accounts the batch changes: updated ones and those of involved users."""
        keys = {(dataset, event.account_id) for dataset, event in self.account_events}
        for key, before in self.before.items():
            if before.account_id:
                keys.add((key[0], before.account_id))
            state = states.get(key)
            if state is not None and not self.gone(key) and state.account_id:
                keys.add((key[0], state.account_id))
        return keys


def apply_users(
    events: Sequence[tuple[str, event_pb2.Event]],
    new: Sequence[bool],
    resolution: Resolution,
    states: Mapping[ProfileKey, ProfileState],
    indexes: Mapping[str, AggregateIndex | None],
    settings: Settings,
    now: int,
) -> UserOutcome:
    """Applies a resolved batch to its (locked, loaded) profiles.

    Args:
        events: ``(dataset, event)`` in the order received.
        new: per event, whether it was never applied before; old ones change nothing.
        resolution: the batch's resolution; its links and merges happen whatever ``new``
            says, as they follow from the identity graph as it stands.
        states: every profile of ``resolution.locked_profiles()``; changed in place.
        indexes: each dataset's aggregates.
        now: the wall-clock instant, for aggregate retention.

    Raises:
        ValueError: an event cannot be applied.
    """
    outcome = UserOutcome()

    def touch(key: ProfileKey) -> Touch:
        found = outcome.touches.get(key)
        if found is None:
            found = outcome.touches[key] = Touch()
            outcome.before[key] = standing(states[key])
        return found

    for key in resolution.created:
        touch(key).row = True
    merges_at: dict[int, list[tuple[ProfileKey, ProfileKey]]] = {}
    for merge in resolution.merges:
        merges_at.setdefault(merge.event_index, []).append((merge.source, merge.target))
    for index, ((dataset, event), is_new) in enumerate(zip(events, new, strict=True)):
        for source, target in merges_at.get(index, ()):
            touch(source).row = True
            merge_into(states[target], states[source], touch(target))
            outcome.merged[source] = target
            outcome.merges.append(MergeRecord(source, target, event.event_id, now))
        owner = resolution.profiles[index]
        if owner is not None:
            mine = touch(owner)
            if is_new:
                apply_event(states[owner], event, indexes.get(dataset), settings, mine, now)
        if is_new and event.type == _ACCOUNT_UPDATE and event.account_id:
            outcome.account_events.append((dataset, event))
    for identity_key, owner in resolution.links.items():
        if states[owner].add_identity((identity_key[1], identity_key[2])):
            touch(owner).row = True
    for key, mine in outcome.touches.items():
        if key not in outcome.merged:
            finish(states[key], indexes.get(key[0]), mine, now)
    return outcome


def roll_up(
    account: AccountState | None,
    other: AccountState | None,
    before: Standing,
    after: Standing,
    touches: dict[AccountKey, Touch],
) -> None:
    """Moves one user's contribution from ``account`` (its account before) to ``other``
    (its account after); either may be the same account or ``None``."""

    def touch(state: AccountState) -> Touch:
        found = touches.get(state.key)
        if found is None:
            found = touches[state.key] = Touch()
        return found

    if account is not None and account is other:
        if after.lifetime_value != before.lifetime_value or after.order_count != before.order_count:
            account.lifetime_value += after.lifetime_value - before.lifetime_value
            account.order_count += after.order_count - before.order_count
            change = touch(account)
            change.keys.add("lifetime")
            change.row = True
    else:
        if account is not None:
            account.user_count -= 1
            account.lifetime_value -= before.lifetime_value
            account.order_count -= before.order_count
            change = touch(account)
            change.keys.add("account")
            if before.lifetime_value or before.order_count:
                change.keys.add("lifetime")
            change.row = True
        if other is not None:
            other.user_count += 1
            other.lifetime_value += after.lifetime_value
            other.order_count += after.order_count
            change = touch(other)
            change.keys.add("account")
            if after.lifetime_value or after.order_count:
                change.keys.add("lifetime")
            change.row = True
    if other is not None and after.last_seen is not None:
        change = touch(other)
        if other.last_seen is None or after.last_seen > other.last_seen:
            other.last_seen = after.last_seen
            change.keys.add("seen")
            change.row = True
        if after.first_seen is not None and (
            other.first_seen is None or after.first_seen < other.first_seen
        ):
            other.first_seen = after.first_seen
            change.keys.add("seen")
            change.row = True


def apply_accounts(
    outcome: UserOutcome,
    states: Mapping[ProfileKey, ProfileState],
    accounts: Mapping[AccountKey, AccountState],
    created: Sequence[AccountKey] = (),
) -> dict[AccountKey, Touch]:
    """Applies account updates and rolls the batch's users up into their accounts.

    Args:
        accounts: every account of ``outcome.accounts(states)``, locked and loaded.
        created: accounts that did not exist before.
    """
    touches: dict[AccountKey, Touch] = {key: Touch(row=True) for key in created}
    for dataset, event in outcome.account_events:
        key = (dataset, event.account_id)
        change = touches.get(key)
        if change is None:
            change = touches[key] = Touch()
        apply_account_event(accounts[key], event, change)
    for key, before in outcome.before.items():
        after = NOBODY if outcome.gone(key) else standing(states[key])
        old = accounts[(key[0], before.account_id)] if before.account_id else None
        new = accounts[(key[0], after.account_id)] if after.account_id else None
        roll_up(old, new, before, after, touches)
    return touches


def merge_profiles(
    target: ProfileKey,
    sources: Sequence[ProfileKey],
    states: Mapping[ProfileKey, ProfileState],
    reason: str,
    now: int,
) -> UserOutcome:
    """Merges ``sources`` into ``target`` explicitly, in order (all locked and loaded)."""
    outcome = UserOutcome()
    for key in (target, *sources):
        outcome.touches[key] = Touch(row=True)
        outcome.before[key] = standing(states[key])
    for source in sources:
        merge_into(states[target], states[source], outcome.touches[target])
        outcome.merged[source] = target
        outcome.merges.append(MergeRecord(source, target, reason, now))
    return outcome


def erase_profile(key: ProfileKey, states: Mapping[ProfileKey, ProfileState]) -> UserOutcome:
    """The outcome of erasing a (locked, loaded) profile: its account loses it."""
    outcome = UserOutcome()
    outcome.touches[key] = Touch(row=True)
    outcome.before[key] = standing(states[key])
    outcome.erased.add(key)
    return outcome
