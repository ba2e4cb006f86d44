"""The unit of work: one transaction that applies a batch of events and says what to publish.

Per-profile order and concurrency come from row locks. A unit reads the identity graph,
inserts rows for new profiles, locks every profile it touches in key order, checks that
what it read still holds (else it starts over), and only then reads the aggregate
catalogue and the states. Idempotence comes from the history: an event is applied only if
its row was not there before, in the same transaction. After the commit the caller
publishes the current view of every subject involved, new events or not, so that a crash
between commit and publish is healed by the redelivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from audience.cache import StateCache
from audience.rules.values import datetime_from_micros
from audience.v1 import event_pb2
from services.profile.catalog import Catalog
from services.profile.codec import (
    ACCOUNT,
    USER,
    account_view,
    encode_change,
    profile_view,
)
from services.profile.domain.apply import Settings, event_name, event_time
from services.profile.domain.batch import UserOutcome, apply_accounts, apply_users
from services.profile.domain.identity import EventIdentities, resolve
from services.profile.domain.model import (
    ANONYMOUS_ID,
    USER_ID,
    AccountKey,
    AccountState,
    ChangeType,
    ProfileKey,
    ProfileState,
    account_size,
    normalize_identity,
    profile_size,
)
from services.profile.store import EventRow, ProfileStore, identity_hash

__all__ = [
    "Applied",
    "Applier",
    "ContentionError",
    "Incoming",
    "Published",
    "RetryError",
    "subject_key",
]

_log = logging.getLogger(__name__)

_IDENTIFY = int(event_pb2.EVENT_TYPE_IDENTIFY)
_ATTEMPTS = 20


class RetryError(Exception):
    """What a unit read before locking changed under it: run it again."""


class ContentionError(RuntimeError):
    """A unit kept racing other units; the events are not at fault."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """One event to apply."""

    dataset: str
    event: event_pb2.Event


@dataclass(frozen=True, slots=True)
class Published:
    """An encoded ``ProfileChange`` and the key of the partition it goes to."""

    key: str
    change: bytes


@dataclass(slots=True)
class Applied:
    """What a unit did."""

    changes: list[Published] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    suppressed: int = 0


def subject_key(dataset: str, kind: str, subject_id: str) -> str:
    """The bus partition key of a subject's changes: one subject, one partition."""
    return f"{dataset}/{kind}/{subject_id}"


def _identities(event: event_pb2.Event) -> tuple[tuple[str, str], ...]:
    found = []
    if event.user_id:
        found.append((USER_ID, event.user_id))
    if event.anonymous_id:
        found.append((ANONYMOUS_ID, event.anonymous_id))
    if event.type == _IDENTIFY:
        found.extend(
            normalize_identity(identity.type, identity.value)
            for identity in event.identify.identities
            if identity.type and identity.value
        )
    return tuple(found)


class Applier:
    """Applies units of events; shared by the workers of a process."""

    def __init__(
        self,
        store: ProfileStore,
        settings: Settings,
        *,
        cache_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.catalog = Catalog(store)
        # Accounts are few and small beside their users: a sixteenth of the memory.
        self.profiles: StateCache[ProfileKey, ProfileState] = StateCache(
            cache_bytes - cache_bytes // 16, profile_size
        )
        self.accounts: StateCache[AccountKey, AccountState] = StateCache(
            cache_bytes // 16, account_size
        )
        self._clock = clock

    def now(self) -> int:
        return int(self._clock() * 1_000_000)

    async def apply(self, items: Sequence[Incoming]) -> Applied:
        """Applies events in one transaction, started over when a concurrent unit raced it.

        Raises:
            ValueError: an event cannot be applied (no time, for one).
            asyncpg.PostgresError: anything else from the database.
        """
        moments = [event_time(item.event) for item in items]
        await self.store.ensure_partitions(datetime_from_micros(m) for m in moments)
        for attempt in range(_ATTEMPTS):
            try:
                async with self.store.pool.acquire() as conn, conn.transaction():
                    result, commit = await self._attempt(conn, items, moments)
            except (RetryError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as error:
                _log.debug("unit raced another (%s); attempt %d", error, attempt + 1)
                await asyncio.sleep(min(0.001 * 2**attempt, 0.5))
                continue
            commit()
            return result
        raise ContentionError(f"a unit of {len(items)} events kept racing other units")

    async def _attempt(
        self, conn: asyncpg.Connection, items: Sequence[Incoming], moments: Sequence[int]
    ) -> tuple[Applied, Callable[[], None]]:
        store = self.store
        now = self.now()
        result = Applied()

        # Erased identities: their events are counted, never applied.
        identities = [_identities(item.event) for item in items]
        hashes = [
            [identity_hash(item.dataset, kind, value) for kind, value in found]
            for item, found in zip(items, identities, strict=True)
        ]
        hashed = {
            (item.dataset, digest)
            for item, found in zip(items, hashes, strict=True)
            for digest in found
        }
        names = [
            EventIdentities(
                item.dataset,
                item.event.user_id,
                item.event.anonymous_id,
                tuple(identity for identity in found if identity[0] not in (USER_ID, ANONYMOUS_ID)),
            )
            for item, found in zip(items, identities, strict=True)
        ]
        owners, erased = await store.identify(
            conn, [key for name in names for key in name.identity_keys()], sorted(hashed)
        )
        live: list[int] = []
        suppressed: dict[tuple[str, bytes], int] = {}
        for index, item in enumerate(items):
            hits = [(item.dataset, h) for h in hashes[index] if (item.dataset, h) in erased]
            if hits:
                for hit in hits:
                    suppressed[hit] = suppressed.get(hit, 0) + 1
                result.suppressed += 1
            else:
                live.append(index)
        await store.count_suppressed(conn, suppressed)

        # Deduplicate within the unit: a repeated event in one delivery applies once.
        seen: set[tuple[str, str, int]] = set()
        unique: list[int] = []
        for index in live:
            mark = (items[index].dataset, items[index].event.event_id, moments[index])
            if mark in seen:
                result.duplicates += 1
            else:
                seen.add(mark)
                unique.append(index)
        events = [(items[i].dataset, items[i].event) for i in unique]

        # Resolve over the events kept, then lock every profile involved and check what
        # resolution read.
        if len(unique) < len(items):
            names = [names[i] for i in unique]
            kept = {key for name in names for key in name.identity_keys()}
            owners = {key: owner for key, owner in owners.items() if key in kept}
        resolution = resolve(names, owners)
        await store.create(conn, USER, resolution.created)
        locked = await store.lock(conn, USER, resolution.locked_profiles())
        for key, known in resolution.relied.items():
            if key not in locked or locked[key][1] != known:
                raise RetryError(f"profile {key} changed before it was locked")
        for key in resolution.created:
            if key not in locked:
                raise RetryError(f"profile {key} vanished before it was locked")

        indexes = await self.catalog.indexes(conn, {dataset for dataset, _ in events})
        states = await self._profiles(conn, locked)

        # Record the history; what was there before is a redelivery and changes nothing.
        merged_into = {merge.source: merge.target for merge in resolution.merges}

        def final(key: ProfileKey) -> ProfileKey:
            while key in merged_into:
                key = merged_into[key]
            return key

        rows = []
        for position, (dataset, event) in enumerate(events):
            profile = resolution.profiles[position]
            rows.append(
                EventRow(
                    dataset=dataset,
                    occurred_at=datetime_from_micros(moments[unique[position]]),
                    event_id=event.event_id,
                    profile_id=None if profile is None else final(profile)[1],
                    account_id=event.account_id or None,
                    name=event_name(event),
                    payload=event.SerializeToString(),
                )
            )
        fresh = await store.insert_events(conn, rows)
        new = [(row.dataset, row.event_id, row.occurred_at) in fresh for row in rows]
        result.applied = sum(new)
        result.duplicates += len(new) - result.applied
        if await store.link(conn, resolution.links):
            raise RetryError("an identity was linked to another profile meanwhile")
        # A redelivered event that merged two profiles merges nothing now (its source is
        # gone): the merge's MERGED change may be the publish that was lost.
        remerged = await store.merges_caused_by(
            conn,
            [
                (row.dataset, row.event_id)
                for row, is_new in zip(rows, new, strict=True)
                if not is_new
            ],
        )

        outcome = apply_users(events, new, resolution, states, indexes, self.settings, now)

        commit = await self.settle(conn, outcome, states, now, result.changes, remerged)
        return result, commit

    async def settle(
        self,
        conn: asyncpg.Connection,
        outcome: UserOutcome,
        states: dict[ProfileKey, ProfileState],
        now: int,
        changes: list[Published],
        remerged: Sequence[tuple[ProfileKey, ProfileKey, int]] = (),
    ) -> Callable[[], None]:
        """Finishes a unit whose profiles are changed: raises the sequences, writes the
        users, rolls them up into their accounts (locked last) and writes those. Returns
        what to do once the transaction has committed: encode the changes to publish into
        ``changes`` (with the MERGED changes of ``remerged``, merges made earlier: source,
        target and sequence) and put the states back in the cache.

        Merged-away profiles are deleted here; erased ones must be deleted already.
        """
        store = self.store
        for key, touch in outcome.touches.items():
            if touch.changed():
                states[key].sequence += 1

        await store.record_merges(
            conn,
            [
                (
                    merge.source,
                    merge.target,
                    merge.reason,
                    datetime_from_micros(merge.time),
                    states[merge.source].sequence,
                )
                for merge in outcome.merges
            ],
        )
        await store.retire(
            conn,
            [(key, states[key].sequence) for key in outcome.touches if outcome.gone(key)],
        )
        kept = [key for key in outcome.touches if not outcome.gone(key)]
        # A profile's row carries its aggregates: one statement writes every change.
        await store.write_profiles(
            conn, [states[key] for key in kept if outcome.touches[key].changed()]
        )

        # Accounts last: many units share an account, so its row lock is held only for the
        # unit's final statements (still after the users' locks, the one order of all units).
        account_keys = outcome.accounts(states)
        # An account is never deleted: one in the cache has its row, and creating it again
        # would be a statement (a round trip on every lone event's path) that does nothing.
        created = await store.create(
            conn, ACCOUNT, [key for key in account_keys if key not in self.accounts]
        )
        accounts = await self._accounts(conn, await store.lock(conn, ACCOUNT, account_keys))
        account_touches = apply_accounts(outcome, states, accounts, sorted(created & set(accounts)))
        for account_key, account_touch in account_touches.items():
            if account_touch.changed():
                accounts[account_key].sequence += 1
        await store.write_accounts(
            conn, [accounts[k] for k, touch in account_touches.items() if touch.changed()]
        )

        def commit() -> None:
            # Encoding waits for the commit: the row locks are not held for it. The change
            # time is read now, after the commit, not at the unit's start: the segment
            # engine takes a view dated after a backfill's query began as newer than the
            # query's answer, which holds only for changes committed by their date.
            committed = self.now()
            for key, touch in outcome.touches.items():
                state = states[key]
                target = outcome.merged.get(key)
                change_type = ChangeType.UPDATED
                view: bytes | None = None
                if target is not None:
                    change_type = ChangeType.MERGED
                elif key in outcome.erased:
                    change_type = ChangeType.ERASED
                else:
                    view = profile_view(state)
                change = encode_change(
                    dataset=key[0],
                    kind=USER,
                    subject_id=key[1],
                    sequence=state.sequence,
                    change_type=change_type,
                    event_ids=touch.event_ids,
                    keys=touch.keys if view is not None else (),
                    view=view,
                    change_time=committed,
                    merged_into=target[1] if target is not None else "",
                )
                changes.append(Published(subject_key(key[0], USER, key[1]), change))
            for source, target, sequence in remerged:
                if source in outcome.touches:
                    continue
                change = encode_change(
                    dataset=source[0],
                    kind=USER,
                    subject_id=source[1],
                    sequence=sequence,
                    change_type=ChangeType.MERGED,
                    event_ids=(),
                    keys=(),
                    view=None,
                    change_time=committed,
                    merged_into=target[1],
                )
                changes.append(Published(subject_key(source[0], USER, source[1]), change))
            for account_key, account_touch in account_touches.items():
                account = accounts[account_key]
                change = encode_change(
                    dataset=account_key[0],
                    kind=ACCOUNT,
                    subject_id=account_key[1],
                    sequence=account.sequence,
                    change_type=ChangeType.UPDATED,
                    event_ids=account_touch.event_ids,
                    keys=account_touch.keys,
                    view=account_view(account),
                    change_time=committed,
                )
                key_of = subject_key(account_key[0], ACCOUNT, account_key[1])
                changes.append(Published(key_of, change))
            for key, state in states.items():
                if outcome.gone(key):
                    self.profiles.discard((key,))
                else:
                    self.profiles.put(key, state)
            for account_key, kept_account in accounts.items():
                self.accounts.put(account_key, kept_account)

        return commit

    async def take_profiles(
        self, conn: asyncpg.Connection, keys: Sequence[ProfileKey]
    ) -> dict[ProfileKey, ProfileState]:
        """Locks profiles in key order and loads them (from the cache when it is current);
        missing ones are left out."""
        return await self._profiles(conn, await self.store.lock(conn, USER, keys))

    async def _profiles(
        self, conn: asyncpg.Connection, locked: Mapping[ProfileKey, tuple[int, bool]]
    ) -> dict[ProfileKey, ProfileState]:
        states: dict[ProfileKey, ProfileState] = {}
        missing = []
        for key, (sequence, _) in locked.items():
            cached = self.profiles.take(key, sequence)
            if cached is None:
                missing.append(key)
            else:
                states[key] = cached
        states.update(await self.store.load_profiles(conn, missing))
        return states

    async def _accounts(
        self, conn: asyncpg.Connection, locked: Mapping[AccountKey, tuple[int, bool]]
    ) -> dict[AccountKey, AccountState]:
        accounts: dict[AccountKey, AccountState] = {}
        missing = []
        for key, (sequence, _) in locked.items():
            cached = self.accounts.take(key, sequence)
            if cached is None:
                missing.append(key)
            else:
                accounts[key] = cached
        accounts.update(await self.store.load_accounts(conn, missing))
        return accounts
