"""Identity resolution: which profile each event belongs to, and which profiles merge.

A profile's id is the user id once the person is known and the anonymous id before. An
event names its person by ``user_id``, ``anonymous_id`` or both, and an identify event may
add further identities (an email, a CRM id). Resolution walks a batch's events in order
over the identity graph as read from the store, so that an earlier event's links are seen
by the later ones:

- ``user_id`` names the profile that owns it, else a new known profile with that id.
- ``anonymous_id`` alone names its owner, else a new anonymous profile with that id.
- Both: the user's profile is the one. An anonymous id owned by nobody is linked to it; one
  owned by another *anonymous* profile merges that profile into the user's; one owned by
  another *known* profile (a shared device) stays where it is.
- Further identities owned by nobody are linked to the event's profile; one owned by
  another profile is left with it (an explicit merge joins two known people).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.profile.domain.model import (
    ANONYMOUS_ID,
    USER_ID,
    Identity,
    IdentityKey,
    ProfileKey,
)

__all__ = ["EventIdentities", "Owner", "PlannedMerge", "Resolution", "resolve"]


@dataclass(frozen=True, slots=True)
class EventIdentities:
    """What resolution reads of one event."""

    dataset: str
    user_id: str = ""
    anonymous_id: str = ""
    extra: tuple[Identity, ...] = ()

    def identity_keys(self) -> list[IdentityKey]:
        keys: list[IdentityKey] = []
        if self.user_id:
            keys.append((self.dataset, USER_ID, self.user_id))
        if self.anonymous_id:
            keys.append((self.dataset, ANONYMOUS_ID, self.anonymous_id))
        keys.extend((self.dataset, kind, value) for kind, value in self.extra)
        return keys


@dataclass(frozen=True, slots=True)
class Owner:
    """The profile that owns an identity, as read, and whether that profile is known."""

    profile_id: str
    known: bool


@dataclass(frozen=True, slots=True)
class PlannedMerge:
    """Before event ``event_index`` applies, ``source`` merges into ``target``."""

    event_index: int
    source: ProfileKey
    target: ProfileKey


@dataclass(slots=True)
class Resolution:
    """The outcome of resolving a batch.

    Attributes:
        profiles: per event, the profile it applies to (``None`` for an event naming no
            person, such as an account update); merged-away profiles never appear here,
            except for events *before* the merge that consumes them.
        created: profiles that no identity named: new, unless a row already has the id.
        relied: existing profiles the resolution relied on, with the ``known`` flag it
            assumed; the store checks both under the row locks.
        links: identities to link, each to the profile that owns it at the end of the batch.
        merges: the merges, in order.
    """

    profiles: list[ProfileKey | None] = field(default_factory=list)
    created: set[ProfileKey] = field(default_factory=set)
    relied: dict[ProfileKey, bool] = field(default_factory=dict)
    links: dict[IdentityKey, ProfileKey] = field(default_factory=dict)
    merges: list[PlannedMerge] = field(default_factory=list)

    def locked_profiles(self) -> set[ProfileKey]:
        """Every profile the batch touches, merged-away ones included."""
        keys = set(self.created) | set(self.relied)
        keys.update(key for key in self.profiles if key is not None)
        return keys


def resolve(events: Sequence[EventIdentities], owners: Mapping[IdentityKey, Owner]) -> Resolution:
    """Resolves a batch over the identity graph ``owners`` (at least every key it names)."""
    result = Resolution()
    owner: dict[IdentityKey, ProfileKey] = {}
    known: dict[ProfileKey, bool] = {}
    for key, found in owners.items():
        profile = (key[0], found.profile_id)
        owner[key] = profile
        known[profile] = found.known
        result.relied[profile] = found.known
    # Where each merged-away profile went, to give links their final owner.
    merged_into: dict[ProfileKey, ProfileKey] = {}

    def final(profile: ProfileKey) -> ProfileKey:
        while profile in merged_into:
            profile = merged_into[profile]
        return profile

    def create(profile: ProfileKey, is_known: bool) -> None:
        if profile not in known:
            result.created.add(profile)
        known[profile] = known.get(profile, False) or is_known

    links: dict[IdentityKey, ProfileKey] = {}
    for index, event in enumerate(events):
        dataset = event.dataset
        target: ProfileKey | None = None
        if event.user_id:
            key = (dataset, USER_ID, event.user_id)
            target = owner.get(key)
            if target is None:
                target = (dataset, event.user_id)
                create(target, True)
                owner[key] = links[key] = target
        if event.anonymous_id:
            key = (dataset, ANONYMOUS_ID, event.anonymous_id)
            holder = owner.get(key)
            if target is None:
                if holder is None:
                    holder = (dataset, event.anonymous_id)
                    create(holder, False)
                    owner[key] = links[key] = holder
                target = holder
            elif holder is None:
                owner[key] = links[key] = target
            elif holder != target and not known.get(holder, False):
                result.merges.append(PlannedMerge(index, holder, target))
                merged_into[holder] = target
                for moved, profile in owner.items():
                    if profile == holder:
                        owner[moved] = target
        if target is not None:
            for kind, value in event.extra:
                key = (dataset, kind, value)
                if key not in owner:
                    owner[key] = links[key] = target
        result.profiles.append(target)
    result.links = {key: final(profile) for key, profile in links.items()}
    return result
