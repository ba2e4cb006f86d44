"""What the service's RPCs do, in terms of the domain, the store and the bus.

``grpc.py`` parses and checks requests, then calls these with plain values; errors are
``AudienceError``s, which the host turns into rich statuses.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from audience import errors
from audience.errors import FieldViolation
from audience.rules.compiler import CompiledRule, compile_rule
from audience.rules.sql import ImportedMembers, SqlSegment
from audience.rules.values import datetime_from_micros, micros_from_datetime
from audience.v1 import event_pb2, profile_pb2, rule_pb2, segment_pb2
from services.profile.applier import Applied, Applier
from services.profile.codec import USER, account_name, profile_name
from services.profile.consumer import Publisher
from services.profile.domain.batch import MergeRecord, erase_profile, merge_profiles
from services.profile.domain.model import (
    AccountState,
    Identity,
    ProfileKey,
    ProfileState,
    normalize_identity,
)
from services.profile.memberships import Memberships
from services.profile.outbox import Outbox
from services.profile.query import ProfileQuery, QueryProgress
from services.profile.store import Eraser, Reader, Registry, identity_hash

__all__ = [
    "ErasureRecord",
    "Operations",
    "ProfileRead",
    "decode_token",
    "encode_token",
]

RECENT_EVENTS = 20


@dataclass(frozen=True, slots=True)
class ProfileRead:
    """A profile as read, with what the ``FULL`` view adds (empty in ``BASIC``).

    ``segments`` is ``None`` when the segment engine did not answer.
    """

    state: ProfileState
    recent_events: list[event_pb2.Event]
    segments: list[str] | None


@dataclass(frozen=True, slots=True)
class ErasureRecord:
    dataset: str
    profile_id: str
    identities: list[Identity]
    time: int
    deleted_event_count: int


def encode_token(payload: Mapping[str, Any]) -> str:
    """An opaque page token."""
    raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, expected: Mapping[str, Any]) -> dict[str, Any]:
    """Reads a page token; it must carry ``expected`` (the request's filters) unchanged.

    Raises:
        AudienceError: ``INVALID_ARGUMENT`` naming ``page_token``.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        payload = None
    if not isinstance(payload, dict) or any(payload.get(k) != v for k, v in expected.items()):
        raise errors.invalid_argument(
            "The page token is not one this call returned for the same request.",
            FieldViolation(
                "page_token", "must be a next_page_token from a call with the same filters"
            ),
            reason="INVALID_PAGE_TOKEN",
        )
    return payload


class Operations:
    """The application layer behind ``ProfileService``."""

    def __init__(
        self,
        applier: Applier,
        publisher: Publisher,
        memberships: Memberships,
        *,
        backfill_queued: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``backfill_queued`` is called when a registration queued a backfill."""
        pool = applier.store.pool
        self.applier = applier
        self.store = applier.store
        self.reader = Reader(pool)
        self.eraser = Eraser(pool)
        self.registry = Registry(pool)
        self.query = ProfileQuery(pool)
        self.outbox = Outbox(self.store, publisher, clock=clock)
        self.memberships = memberships
        self._backfill_queued = backfill_queued
        self._clock = clock

    def now(self) -> int:
        return int(self._clock() * 1_000_000)

    # --- Reads ----------------------------------------------------------------------------

    async def _missing(self, dataset: str, profile_id: str) -> errors.AudienceError:
        name = profile_name(dataset, profile_id)
        target = await self.reader.merged_into(dataset, profile_id)
        if target is not None:
            return errors.not_found(
                "audience.dev/Profile",
                name,
                message=f"Profile {name!r} was merged into {profile_name(dataset, target)!r}.",
                reason="PROFILE_MERGED",
                metadata={"merged_into": profile_name(dataset, target)},
            )
        return errors.not_found("audience.dev/Profile", name)

    async def profile(self, dataset: str, profile_id: str, *, full: bool) -> ProfileRead:
        found = await self.store.load_profiles(
            self.store.pool, [(dataset, profile_id)], aggregates=full
        )
        state = found.get((dataset, profile_id))
        if state is None:
            raise await self._missing(dataset, profile_id)
        if not full:
            return ProfileRead(state, [], [])
        rows = await self.reader.events(dataset, profile_id, limit=RECENT_EVENTS)
        segments = await self.memberships.segments(profile_name(dataset, profile_id))
        return ProfileRead(
            state, [event_pb2.Event.FromString(payload) for _, _, payload in rows], segments
        )

    async def owner(self, dataset: str, identity: Identity) -> str:
        kind, value = normalize_identity(*identity)
        owner = await self.reader.owner(dataset, kind, value)
        if owner is None:
            raise errors.not_found(
                "audience.dev/Profile",
                f"datasets/{dataset}/identities/{kind}:{value}",
                message=f"No profile of dataset {dataset!r} has the identity {kind} {value!r}.",
            )
        return owner

    async def events(
        self,
        dataset: str,
        profile_id: str,
        *,
        page_size: int,
        page_token: str,
        name: str,
        start: int | None,
        end: int | None,
    ) -> tuple[list[event_pb2.Event], str]:
        await self.profile(dataset, profile_id, full=False)
        filters = {"p": profile_id, "n": name, "s": start, "e": end}
        before: tuple[datetime, str] | None = None
        if page_token:
            payload = decode_token(page_token, filters)
            before = (datetime_from_micros(int(payload["t"])), str(payload["i"]))
        rows = await self.reader.events(
            dataset,
            profile_id,
            limit=page_size + 1,
            name=name or None,
            start=None if start is None else datetime_from_micros(start),
            end=None if end is None else datetime_from_micros(end),
            before=before,
        )
        token = ""
        if len(rows) > page_size:
            rows = rows[:page_size]
            moment, event_id, _ = rows[-1]
            token = encode_token({**filters, "t": micros_from_datetime(moment), "i": event_id})
        return [event_pb2.Event.FromString(payload) for _, _, payload in rows], token

    async def account(self, dataset: str, account_id: str) -> tuple[AccountState, list[str]]:
        found = await self.store.load_accounts(self.store.pool, [(dataset, account_id)])
        account = found.get((dataset, account_id))
        if account is None:
            raise errors.not_found("audience.dev/Account", account_name(dataset, account_id))
        segments = await self.memberships.segments(account_name(dataset, account_id))
        return account, segments or []

    async def account_profiles(
        self, dataset: str, account_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[ProfileState], str]:
        await self.account_exists(dataset, account_id)
        after = ""
        if page_token:
            after = str(decode_token(page_token, {"a": account_id})["k"])
        ids = await self.reader.account_users(dataset, account_id, after, page_size + 1)
        token = ""
        if len(ids) > page_size:
            ids = ids[:page_size]
            token = encode_token({"a": account_id, "k": ids[-1]})
        states = await self.store.load_profiles(
            self.store.pool, [(dataset, pid) for pid in ids], aggregates=False
        )
        return [states[(dataset, pid)] for pid in ids if (dataset, pid) in states], token

    async def account_exists(self, dataset: str, account_id: str) -> None:
        found = await self.store.load_accounts(self.store.pool, [(dataset, account_id)])
        if not found:
            raise errors.not_found("audience.dev/Account", account_name(dataset, account_id))

    # --- Changes --------------------------------------------------------------------------

    async def merge(
        self, dataset: str, target: str, sources: Sequence[str]
    ) -> tuple[ProfileState, list[MergeRecord]]:
        """Merges profiles into ``target``; every one must exist and differ from it."""
        target_key = (dataset, target)
        source_keys = [(dataset, source) for source in sources]
        now = self.now()
        applied = Applied()
        async with self.store.pool.acquire() as conn, conn.transaction():
            states = await self.applier.take_profiles(conn, [target_key, *source_keys])
            missing = [
                (field, key)
                for field, key in [("target", target_key)]
                + [(f"sources[{i}]", key) for i, key in enumerate(source_keys)]
                if key not in states
            ]
            if missing:
                field, key = missing[0]
                error = await self._missing(*key)
                raise errors.AudienceError(
                    error.code,
                    error.reason,
                    error.message,
                    metadata={**error.metadata, "field": field},
                    resource_type=error.resource_type,
                    resource_name=error.resource_name,
                )
            outcome = merge_profiles(target_key, source_keys, states, "explicit merge", now)
            commit = await self.applier.settle(conn, outcome, states, now, applied.changes)
            recorded = await self.outbox.record_outcome(conn, outcome, states)
        commit()
        await self.outbox.publish(applied.changes, recorded)
        return states[target_key], outcome.merges

    async def erase(self, dataset: str, profile_id: str) -> ErasureRecord:
        key: ProfileKey = (dataset, profile_id)
        now = self.now()
        applied = Applied()
        async with self.store.pool.acquire() as conn, conn.transaction():
            states = await self.applier.take_profiles(conn, [key])
            if key not in states:
                raise await self._missing(dataset, profile_id)
            state = states[key]
            identities = list(state.identities)
            deleted = await self.eraser.erase(conn, state, datetime_from_micros(now))
            outcome = erase_profile(key, states)
            commit = await self.applier.settle(conn, outcome, states, now, applied.changes)
            recorded = await self.outbox.record_outcome(conn, outcome, states)
        commit()
        await self.outbox.publish(applied.changes, recorded)
        return ErasureRecord(dataset, profile_id, identities, now, deleted)

    async def release(self, dataset: str, identities: Sequence[Identity]) -> int:
        hashes = sorted(
            {identity_hash(dataset, *normalize_identity(*identity)) for identity in identities}
        )
        return await self.eraser.release(dataset, hashes)

    async def register(
        self, dataset: str, specs: Sequence[profile_pb2.AggregateSpec]
    ) -> list[profile_pb2.AggregateSpec]:
        registered = await self.registry.register(dataset, specs)
        if any(spec.state == profile_pb2.AggregateSpec.STATE_BACKFILLING for spec in registered):
            self._backfill_queued()
        return registered

    async def aggregates(
        self, dataset: str, *, page_size: int, page_token: str
    ) -> tuple[list[profile_pb2.AggregateSpec], str]:
        after = str(decode_token(page_token, {"d": dataset})["k"]) if page_token else ""
        specs = await self.registry.page(dataset, after, page_size + 1)
        token = ""
        if len(specs) > page_size:
            specs = specs[:page_size]
            token = encode_token({"d": dataset, "k": specs[-1].aggregate_id})
        return specs, token

    # --- Queries --------------------------------------------------------------------------

    def compile(
        self,
        kind: int,
        rule: rule_pb2.Rule,
        referenced: Sequence[tuple[str, rule_pb2.Rule | None, Sequence[str]]],
    ) -> tuple[CompiledRule, dict[str, SqlSegment | ImportedMembers]]:
        """Compiles a query's rule and the segments it refers to.

        Args:
            referenced: ``(segment name, rule or None, member ids)`` per referenced segment.

        Raises:
            AudienceError: ``INVALID_ARGUMENT`` naming the faulty field.
        """
        compiled = compile_rule(rule, kind)
        definitions = {name: (index, r, m) for index, (name, r, m) in enumerate(referenced)}

        def compile_referenced(name: str, segment_kind: int) -> SqlSegment | ImportedMembers:
            index, segment_rule, members = definitions[name]
            if segment_rule is None:
                return ImportedMembers(list(members))
            try:
                return compile_rule(segment_rule, segment_kind)
            except errors.AudienceError as error:
                raise errors.invalid_argument(
                    f"The rule of referenced segment {name!r} is not valid.",
                    *(
                        FieldViolation(f"referenced_segments[{index}].{v.field}", v.description)
                        for v in error.violations
                    ),
                    reason=error.reason,
                ) from error

        # Each segment the rule reaches is compiled for its own kind: the segments an
        # account rule's roll-ups count users of are user segments, as is all they reach.
        segments: dict[str, SqlSegment | ImportedMembers] = {}
        missing: set[str] = set()
        stack = _references(compiled, kind)
        while stack:
            name, segment_kind = stack.pop()
            if name in segments or name in missing:
                continue
            if name not in definitions:
                missing.add(name)
                continue
            found = segments[name] = compile_referenced(name, segment_kind)
            if isinstance(found, CompiledRule):
                stack.extend(_references(found, segment_kind))
        for name in definitions:
            if name not in segments:
                segments[name] = compile_referenced(name, kind)
        if missing:
            first = sorted(missing)[0]
            raise errors.invalid_argument(
                "The rule refers to segments the request does not define:"
                f" {', '.join(sorted(missing))}.",
                FieldViolation(
                    "referenced_segments",
                    f"must define every segment the rule refers to; missing {first}",
                ),
            )
        return compiled, segments

    def run_query(
        self,
        dataset: str,
        kind: int,
        compiled: CompiledRule,
        segments: Mapping[str, SqlSegment | ImportedMembers],
        *,
        now: int | None,
        limit: int,
        count_only: bool,
        chunk_size: int,
    ) -> AsyncIterator[QueryProgress]:
        kind_name = "account" if kind == segment_pb2.SEGMENT_KIND_ACCOUNT else USER
        return self.query.run(
            dataset,
            kind_name,
            compiled,
            segments,
            now=self.now() if now is None else now,
            limit=limit,
            count_only=count_only,
            chunk_size=chunk_size,
        )


def _references(rule: CompiledRule, kind: int) -> list[tuple[str, int]]:
    """The segments a rule names, each with its kind: the rule's own kind, and users for
    those its roll-ups' user rules name."""
    found = [(name, kind) for name in sorted(rule.segments)]
    for rollup in rule.rollups:
        found.extend(
            (name, segment_pb2.SEGMENT_KIND_USER) for name in sorted(rollup.predicate.segments)
        )
    return found
