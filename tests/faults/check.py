"""The fault test's verdict, read from the suite once the faults stop and the pipeline drains.

- **lost**: acknowledged events that no profile's history holds (an account update, which
  has no history, counts as lost when its account lacks the trait only it sets).
- **mismatches**: (segment, member) pairs where the membership the engine keeps differs
  from the oracle: every rule evaluated from scratch over the final profiles
  (``GetProfile``, full view) and accounts. Windows make the answer depend on the instant,
  so the oracle is evaluated over the span of the reads (from ``LAG`` before the first
  membership read to the last), and a pair whose oracle answer or membership changes over
  that span is read again in a later round, after the boundary has passed; a pair still
  moving after every round counts as a mismatch.
- **gaps**: pairs where the subscriber's stream, replayed, ends elsewhere than the
  membership (read before and after waiting for the stream to catch up, the same both
  times), plus joins of members already in and leaves of members already out.
- **order_violations**, **duplicates**: from the replay (``oracle.replay``).
- **sql_disagreements**: pairs where ``QueryProfiles`` (the rule in SQL over the profile
  service's tables, at one instant) differs from the Python oracle at the same instant.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
import grpc.aio
from redis.asyncio import Redis

from audience.rules import View, compile_rule, parse_rule, timestamp_from_micros, view_from_parts
from audience.streams import Bus
from audience.v1 import (
    membership_service_pb2,
    membership_service_pb2_grpc,
    profile_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
    rule_pb2,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from tests.faults.oracle import (
    Membership,
    OracleSegment,
    account_member,
    evaluate,
    order_segments,
    referenced,
    replay,
    user_member,
)
from tests.faults.subscriber import Subscriber
from tests.faults.workload import PARENT

__all__ = ["LAG", "Verdict", "drain", "judge"]

LAG = 2_000_000
"""µs: how long after a window boundary the engine may still hold the old answer (timers
fire at least 100 ms after it and the timer loop looks every 250 ms)."""

_ROUNDS = 8
_CONCURRENCY = 16
_TIMEOUT = 30.0
_T = TypeVar("_T")


def _now() -> int:
    return time.time_ns() // 1000


async def _retry(call: Callable[[], Awaitable[_T]]) -> _T:
    for attempt in range(60):
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
    return await call()


async def _gather(calls: Sequence[Callable[[], Awaitable[_T]]]) -> list[_T]:
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def one(call: Callable[[], Awaitable[_T]]) -> _T:
        async with limit:
            return await _retry(call)

    return await asyncio.gather(*(one(call) for call in calls))


class _Reader:
    def __init__(self, profile: grpc.aio.Channel, engine: grpc.aio.Channel) -> None:
        self.profiles = profile_service_pb2_grpc.ProfileServiceStub(profile)
        self.segments = segment_service_pb2_grpc.SegmentServiceStub(engine)
        self.memberships = membership_service_pb2_grpc.MembershipServiceStub(engine)

    async def query(
        self,
        kind: int,
        rule: rule_pb2.Rule,
        references: Sequence[profile_service_pb2.ReferencedSegment] = (),
        at: int | None = None,
    ) -> set[str]:
        async def call() -> set[str]:
            request = profile_service_pb2.QueryProfilesRequest(
                parent=PARENT,
                kind=kind,  # type: ignore[arg-type]
                rule=rule,
                referenced_segments=references,
            )
            if at is not None:
                request.evaluation_time.CopyFrom(timestamp_from_micros(at))
            ids: set[str] = set()
            async for chunk in self.profiles.QueryProfiles(request, timeout=_TIMEOUT):
                ids.update(chunk.profile_ids)
            return ids

        return await _retry(call)

    async def segment_list(self) -> list[segment_pb2.Segment]:
        async def page(token: str) -> segment_service_pb2.ListSegmentsResponse:
            reply: segment_service_pb2.ListSegmentsResponse = await self.segments.ListSegments(
                segment_service_pb2.ListSegmentsRequest(
                    parent=PARENT, page_size=1000, page_token=token
                ),
                timeout=_TIMEOUT,
            )
            return reply

        return [s for reply in await _pages(page) for s in reply.segments]

    async def members(self, segment: str) -> set[str]:
        async def page(token: str) -> membership_service_pb2.ListSegmentMembersResponse:
            reply: membership_service_pb2.ListSegmentMembersResponse = (
                await self.memberships.ListSegmentMembers(
                    membership_service_pb2.ListSegmentMembersRequest(
                        parent=segment, page_size=10_000, page_token=token
                    ),
                    timeout=_TIMEOUT,
                )
            )
            return reply

        try:
            replies = await _pages(page)
        except grpc.aio.AioRpcError as error:
            # A deleted segment has no members.
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return set()
            raise
        return {m.member for reply in replies for m in reply.memberships}

    async def profile(self, profile_id: str) -> profile_pb2.Profile:
        reply: profile_service_pb2.GetProfileResponse = await self.profiles.GetProfile(
            profile_service_pb2.GetProfileRequest(
                name=user_member(profile_id), view=profile_pb2.PROFILE_VIEW_FULL
            ),
            timeout=_TIMEOUT,
        )
        return reply.profile

    async def account(self, account_id: str) -> profile_pb2.Account:
        reply: profile_service_pb2.GetAccountResponse = await self.profiles.GetAccount(
            profile_service_pb2.GetAccountRequest(name=account_member(account_id)),
            timeout=_TIMEOUT,
        )
        return reply.account

    async def history(self, profile_id: str) -> list[str]:
        async def page(token: str) -> profile_service_pb2.ListProfileEventsResponse:
            reply: profile_service_pb2.ListProfileEventsResponse = (
                await self.profiles.ListProfileEvents(
                    profile_service_pb2.ListProfileEventsRequest(
                        parent=user_member(profile_id), page_size=1000, page_token=token
                    ),
                    timeout=_TIMEOUT,
                )
            )
            return reply

        return [event.event_id for reply in await _pages(page) for event in reply.events]

    async def aggregates(self) -> list[profile_pb2.AggregateSpec]:
        async def page(token: str) -> profile_service_pb2.ListAggregatesResponse:
            reply: profile_service_pb2.ListAggregatesResponse = await self.profiles.ListAggregates(
                profile_service_pb2.ListAggregatesRequest(
                    parent=PARENT, page_size=10_000, page_token=token
                ),
                timeout=_TIMEOUT,
            )
            return reply

        return [spec for reply in await _pages(page) for spec in reply.aggregates]


class _Paged(Protocol):
    @property
    def next_page_token(self) -> str: ...


_P = TypeVar("_P", bound=_Paged)


async def _pages(fetch: Callable[[str], Awaitable[_P]]) -> list[_P]:
    """Every page of a List call, each page retried while the service is unavailable."""
    replies: list[_P] = []
    token = ""
    while True:
        reply = await _retry(functools.partial(fetch, token))
        replies.append(reply)
        token = reply.next_page_token
        if not token:
            return replies


def _user_view(profile: profile_pb2.Profile) -> View:
    profile_id = profile.name.rsplit("/", 1)[1]
    return view_from_parts(
        profile_id,
        attributes=profile.attributes,
        session=profile.current_session if profile.HasField("current_session") else None,
        context=profile.last_context if profile.HasField("last_context") else None,
        first_seen_time=profile.first_seen_time if profile.HasField("first_seen_time") else None,
        last_seen_time=profile.last_seen_time if profile.HasField("last_seen_time") else None,
        lifetime_value=profile.lifetime_value,
        order_count=profile.order_count,
        visit_count=profile.visit_count,
        aggregates=profile.aggregates,
        account_id=profile.account.rsplit("/", 1)[1] if profile.account else "",
    )


def _account_view(account: profile_pb2.Account) -> View:
    return view_from_parts(
        account.name.rsplit("/", 1)[1],
        attributes=account.attributes,
        first_seen_time=account.first_seen_time if account.HasField("first_seen_time") else None,
        last_seen_time=account.last_seen_time if account.HasField("last_seen_time") else None,
        lifetime_value=account.lifetime_value,
        order_count=account.order_count,
    )


async def drain(
    redis: Redis,
    profile: grpc.aio.Channel,
    engine: grpc.aio.Channel,
    say: Callable[[str], None],
    within: float,
) -> float:
    """Waits until every bus backlog is zero, no aggregate or segment is backfilling, and
    that has held for two looks a second apart; returns how long it took."""
    bus = Bus(redis, namespace="faults", partitions=8)
    reader = _Reader(profile, engine)
    started = time.monotonic()
    quiet = 0
    last = ""
    while quiet < 2:
        if time.monotonic() - started > within:
            raise TimeoutError(f"the pipeline did not drain in {within:.0f} s: {last}")
        await asyncio.sleep(1.0)
        try:
            backlogs = {
                "events": await bus.backlog("events", "profile"),
                "profile-changes": await bus.backlog("profile-changes", "segment_engine"),
                "failed-events": await bus.backlog("failed-events", "ingest"),
            }
            segments = await reader.segment_list()
            aggregates = await reader.aggregates()
        except (grpc.aio.AioRpcError, OSError, LookupError) as error:
            quiet = 0
            last = f"{type(error).__name__}: {error}"
            continue
        busy = [
            segment.name.rsplit("/", 1)[1]
            for segment in segments
            if segment.state != segment_pb2.SEGMENT_STATE_ACTIVE
            or segment.backfill.version != segment.version
        ]
        filling = sum(
            1 for spec in aggregates if spec.state != profile_pb2.AggregateSpec.STATE_READY
        )
        last = f"backlogs {backlogs}, segments not active {busy}, aggregates filling {filling}"
        quiet = quiet + 1 if not any(backlogs.values()) and not busy and not filling else 0
    elapsed = time.monotonic() - started
    say(f"  drained in {elapsed:.1f} s")
    return elapsed


@dataclass
class Verdict:
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    double_applied: int = 0
    erasure_leaks: int = 0
    erasure_leak_examples: list[str] = field(default_factory=list)
    mismatches: int = 0
    mismatch_examples: list[str] = field(default_factory=list)
    gaps: int = 0
    kind_repeats: int = 0
    order_violations: int = 0
    duplicates: int = 0
    stream_examples: list[str] = field(default_factory=list)
    sql_disagreements: int = 0
    sql_examples: list[str] = field(default_factory=list)
    rounds: int = 0
    deferred_pairs: int = 0
    stream_skipped: int = 0
    profiles: int = 0
    accounts: int = 0
    segments: int = 0
    members: int = 0
    changes_received: int = 0
    causes: Counter[str] = field(default_factory=Counter)


def _pairs(members: Membership, segments: Sequence[str]) -> set[tuple[str, str]]:
    return {(segment, member) for segment in segments for member in members.get(segment, ())}


async def judge(
    profile: grpc.aio.Channel,
    engine: grpc.aio.Channel,
    subscriber: Subscriber,
    acknowledged: set[str],
    erased: set[str],
    account_markers: Mapping[str, set[str]],
    deleted: Sequence[str],
    say: Callable[[str], None],
) -> Verdict:
    verdict = Verdict()
    reader = _Reader(profile, engine)
    user_ids = sorted(await reader.query(segment_pb2.SEGMENT_KIND_USER, parse_rule("all()")))
    account_ids = sorted(await reader.query(segment_pb2.SEGMENT_KIND_ACCOUNT, parse_rule("all()")))
    verdict.profiles, verdict.accounts = len(user_ids), len(account_ids)
    say(f"  reading {len(user_ids)} profiles and {len(account_ids)} accounts")
    profiles = await _gather([functools.partial(reader.profile, i) for i in user_ids])
    accounts = await _gather([functools.partial(reader.account, i) for i in account_ids])
    histories = await _gather([functools.partial(reader.history, i) for i in user_ids])
    users = {p.name.rsplit("/", 1)[1]: _user_view(p) for p in profiles}
    account_views = {a.name.rsplit("/", 1)[1]: _account_view(a) for a in accounts}

    # Lost and twice-applied events.
    applied: Counter[str] = Counter(event_id for history in histories for event_id in history)
    verdict.double_applied = sum(1 for count in applied.values() if count > 1)
    leaks = sorted(erased.intersection(applied))
    verdict.erasure_leaks = len(leaks)
    verdict.erasure_leak_examples = leaks[:10]
    markers_seen = {a.name.rsplit("/", 1)[1]: set(a.attributes) for a in accounts}
    marker_events = {
        marker.removeprefix("update_"): account
        for account, markers in account_markers.items()
        for marker in markers
    }
    for event_id in sorted(acknowledged):
        account = marker_events.get(event_id)
        if account is not None:
            found = f"update_{event_id}" in markers_seen.get(account, set())
        else:
            found = event_id in applied
        if not found:
            verdict.lost += 1
            if len(verdict.lost_examples) < 10:
                verdict.lost_examples.append(event_id)

    # The oracle.
    listed = await reader.segment_list()
    oracle_segments = order_segments(
        OracleSegment(s.name, s.kind, compile_rule(s.rule, s.kind)) for s in listed
    )
    by_name = {segment.name: segment for segment in oracle_segments}
    names = [*by_name, *deleted]
    verdict.segments = len(by_name)

    async def snapshot() -> Membership:
        found = await asyncio.gather(*(reader.members(name) for name in names))
        return dict(zip(names, found, strict=True))

    # Python against SQL, both at one instant over the same (drained) data.
    instant = _now()
    python = evaluate(oracle_segments, users, account_views, instant)
    for segment in oracle_segments:
        references = [
            profile_service_pb2.ReferencedSegment(segment=name, rule=by_name[name].compiled.rule)
            for name in referenced(segment, by_name)
        ]
        ids = await reader.query(segment.kind, segment.compiled.rule, references, instant)
        member = user_member if segment.kind == segment_pb2.SEGMENT_KIND_USER else account_member
        sql = {member(i) for i in ids}
        differing = sql ^ python[segment.name]
        verdict.sql_disagreements += len(differing)
        for one in sorted(differing)[:3]:
            if len(verdict.sql_examples) < 10:
                side = "SQL only" if one in sql else "Python only"
                verdict.sql_examples.append(f"{segment.name} {one}: {side}")

    # Memberships against the oracle, and the stream against the memberships.
    def check_stream(before: Membership, after: Membership, moving: set[tuple[str, str]]) -> None:
        replayed = replay(subscriber.changes)
        verdict.duplicates = replayed.duplicates
        verdict.order_violations = replayed.order_violations
        verdict.kind_repeats = replayed.kind_repeats
        verdict.stream_examples.extend(replayed.examples)
        streamed = _pairs(replayed.members(), names)
        held = _pairs(before, names)
        universe = held | _pairs(after, names) | streamed
        verdict.stream_skipped = len(universe & moving)
        for pair in sorted(universe - moving):
            if (pair in streamed) != (pair in held):
                verdict.gaps += 1
                if len(verdict.stream_examples) < 20:
                    state = "in" if pair in held else "out"
                    verdict.stream_examples.append(f"gap: {pair[0]} {pair[1]} is {state}")
        verdict.gaps += verdict.kind_repeats
        verdict.changes_received = len(subscriber.changes)
        verdict.causes = Counter(str(change.cause) for change in subscriber.changes)
        verdict.members = len(held)

    unsettled: set[tuple[str, str]] | None = None
    last: tuple[Membership, Membership, set[tuple[str, str]], bool] | None = None
    for round_number in range(1, _ROUNDS + 1):
        verdict.rounds = round_number
        first_read = _now()
        before = await snapshot()
        heard = await subscriber.caught_up(_now(), within=30.0)
        after = await snapshot()
        last_read = _now()
        instants = [first_read - LAG, first_read, (first_read + last_read) // 2, last_read]
        answers = [evaluate(oracle_segments, users, account_views, t) for t in instants]
        universe = _pairs(before, names) | _pairs(after, names)
        for answer in answers:
            universe |= _pairs(answer, names)
        moving = {
            pair
            for pair in universe
            if len({pair[1] in before.get(pair[0], ()), pair[1] in after.get(pair[0], ())}) > 1
            or len({pair[1] in answer.get(pair[0], ()) for answer in answers}) > 1
        }
        todo = universe if unsettled is None else unsettled
        judged = todo - moving
        for pair in sorted(judged):
            held = pair[1] in before.get(pair[0], ())
            wanted = pair[1] in answers[1].get(pair[0], ())
            if held != wanted:
                verdict.mismatches += 1
                if len(verdict.mismatch_examples) < 10:
                    verdict.mismatch_examples.append(
                        f"{pair[0]} {pair[1]}: member={held}, oracle={wanted}"
                    )
        unsettled = todo - judged
        last = (before, after, moving, heard)
        if not unsettled and heard:
            break
        verdict.deferred_pairs += len(unsettled)
        say(f"  round {round_number}: {len(unsettled)} pairs at a window's edge; reading again")
        await asyncio.sleep(LAG / 1_000_000)
    if unsettled:
        verdict.mismatches += len(unsettled)
        for pair in sorted(unsettled)[:5]:
            verdict.mismatch_examples.append(f"{pair[0]} {pair[1]}: never settled")
    assert last is not None
    before, after, moving, heard = last
    if heard:
        check_stream(before, after, moving)
    else:
        verdict.gaps += 1
        verdict.stream_examples.append("the subscriber never caught up")
    return verdict
