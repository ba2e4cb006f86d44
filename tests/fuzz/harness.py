"""Running hypothesis against the live suite, one RPC at a time, and the checks after.

Hypothesis runs in a worker thread and calls the suite through a blocking channel, while
the test's event loop serves the suite: a failing example is shrunk like any other.
Runs are repeatable: hypothesis is derandomized and keeps no example database.
``AUDIENCE_FUZZ_EXAMPLES`` sets the examples per RPC (default :data:`EXAMPLES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
import psutil
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audience.v1 import (
    event_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_service_pb2,
    membership_service_pb2_grpc,
    profile_service_pb2,
    profile_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from tests.e2e.conftest import RunningSuite
from tests.fuzz.oracle import (
    CALL_DEADLINE,
    Outcome,
    RawRequests,
    Requests,
    Rpc,
    call,
    every_rpc,
    problems,
)
from tests.fuzz.strategies import Pools, messages, mutations
from tests.fuzz.world import USER_RULE, World, valid_requests

__all__ = [
    "EXAMPLES",
    "Checker",
    "Fuzzed",
    "LoggedErrors",
    "assert_pipeline_works",
    "assert_serving",
    "bearer",
    "blocking_channel",
    "describe",
    "failed_events",
    "fuzz_rpc",
    "fuzz_rpcs",
    "logged_errors",
    "rss",
    "services_of",
    "strategy_for",
]

# Examples per RPC. At 100 the whole of tests/fuzz takes about a minute on a 2-core machine
# shared with other work, well inside the few minutes CI allows it even on a slower runner,
# and each RPC's strategy (a handful of branches: requests from scratch, valid ones with
# fuzzed fields, streams) gets each branch some twenty times. 30 missed bugs that 200 found
# (a page token decoding to NUL, a far-future read_time), and 600 found more still (a time
# zone too long for a file name): set AUDIENCE_FUZZ_EXAMPLES higher for a longer hunt.
EXAMPLES = int(os.environ.get("AUDIENCE_FUZZ_EXAMPLES", "100"))
# Calls that delete or merge run last, so that the others find the seeded resources.
_DESTRUCTIVE = ("Delete", "Erase", "Merge", "Cancel")
# Errors the services log on purpose while fuzzing: export jobs upload to a closed port.
_EXPECTED_LOGS = (("services.export.jobs", "Export job "),)

Checker = Callable[[Rpc, Requests | RawRequests, Outcome], list[str]]
"""What is wrong with how a call ended; empty when it is right."""


def strategy_for(rpc: Rpc, valid: Sequence[Message], pools: Pools) -> st.SearchStrategy[Requests]:
    """The requests of one call: one message, or a bounded stream of them."""
    mutated = mutations(valid, pools)
    # Mostly valid requests with a few bad fields, which reach past the first checks.
    single = st.one_of(messages(rpc.request_class, pools), mutated, mutated, mutated)
    if not rpc.client_streaming:
        return single.map(lambda message: Requests((message,)))
    # Streams: empty, or a first message (often valid) and later ones that may disagree.
    return st.one_of(
        st.just(Requests(())),
        st.tuples(mutated, st.lists(single, max_size=3)).map(
            lambda parts: Requests((parts[0], *parts[1])),
        ),
        st.lists(single, min_size=1, max_size=4).map(Requests),
    )


def fuzz_rpc(
    channel: grpc.Channel,
    rpc: Rpc,
    strategy: st.SearchStrategy[Requests] | st.SearchStrategy[RawRequests],
    check: Checker,
    *,
    examples: int = EXAMPLES,
    metadata: Sequence[tuple[str, str | bytes]] = (),
    seen: Counter[str] | None = None,
) -> None:
    """Runs hypothesis for one RPC (in a worker thread, while the event loop serves);
    counts the statuses, with their reasons, in ``seen``."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(requests=strategy)
    def answers_clearly(requests: Requests | RawRequests) -> None:
        outcome = call(channel, rpc, requests, metadata)
        if seen is not None:
            reason = outcome.error.reason if outcome.error else ""
            seen[f"{outcome.code.name} {reason}".strip()] += 1
        found = check(rpc, requests, outcome)
        assert not found, f"{'; '.join(found)}\n    request: {requests!r}"

    answers_clearly()


def describe(error: BaseException) -> list[str]:
    """The failures hypothesis found, one line each (its own report would print the
    requests in full, which may be megabytes)."""
    if isinstance(error, BaseExceptionGroup):
        return [line for inner in error.exceptions for line in describe(inner)]
    if isinstance(error, AssertionError):
        return [str(error).split("\nassert ")[0]]
    return [f"{type(error).__name__}: {error}"]


def bearer(api_key: str) -> tuple[str, str]:
    """The metadata entry that presents ``api_key``."""
    return ("authorization", f"Bearer {api_key}")


@contextlib.contextmanager
def blocking_channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    """A blocking channel to the suite that receives whatever the server may send; it
    sends no key: a call carries one in its metadata."""
    limit = suite.resources.common.max_message_bytes
    channel = grpc.insecure_channel(
        suite.address, options=[("grpc.max_receive_message_length", limit)]
    )
    try:
        yield channel
    finally:
        channel.close()


def rss(*, settled: bool = True) -> int:
    """The process's resident memory; ``settled``, once garbage is collected and the C
    allocator has handed free pages back: what the services still hold, not what they
    once touched (a fraction of a second on a large heap)."""
    if settled:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


@dataclass
class Fuzzed:
    """What fuzzing some RPCs found."""

    failures: dict[str, list[str]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    """A line per RPC: memory and statuses, shown with ``pytest -s``."""

    def report(self) -> str:
        return "\n".join(
            f"{name}:\n  " + "\n  ".join(lines) for name, lines in self.failures.items()
        )


def _ordered(rpcs: Sequence[Rpc]) -> list[Rpc]:
    return sorted(rpcs, key=lambda rpc: rpc.method.name.startswith(_DESTRUCTIVE))


async def fuzz_rpcs(
    suite: RunningSuite,
    world: World,
    rpcs: Sequence[Rpc],
    *,
    check: Checker | None = None,
    metadata: Sequence[tuple[str, str | bytes]] = (),
    examples: int = EXAMPLES,
) -> Fuzzed:
    """Fuzzes each RPC in turn (destructive ones last) under ``check`` (the oracle by
    default)."""
    pools = world.pools()
    valid = valid_requests(world)
    limit = suite.resources.common.max_message_bytes

    def oracle(rpc: Rpc, requests: Requests | RawRequests, outcome: Outcome) -> list[str]:
        return problems(rpc, requests, outcome, limit)

    fuzzed = Fuzzed()
    with blocking_channel(suite) as channel:
        for rpc in _ordered(rpcs):
            strategy = strategy_for(rpc, valid[rpc.full_name], pools)
            seen: Counter[str] = Counter()
            before = rss(settled=False)
            started = time.monotonic()
            try:
                await asyncio.to_thread(
                    fuzz_rpc,
                    channel,
                    rpc,
                    strategy,
                    check or oracle,
                    examples=examples,
                    metadata=metadata,
                    seen=seen,
                )
            except Exception as error:
                # Every RPC's failures are reported together, at the end.
                fuzzed.failures[rpc.full_name] = describe(error)
            fuzzed.lines.append(
                f"{rpc.full_name} ({time.monotonic() - started:.1f} s, "
                f"{(rss(settled=False) - before) / 2**20:+.0f} MiB): "
                + ", ".join(f"{n} {k}" for k, n in seen.most_common())
            )
    return fuzzed


def services_of(rpcs: Sequence[Rpc] | None = None) -> list[str]:
    return sorted({rpc.service for rpc in (rpcs or every_rpc())})


class LoggedErrors(logging.Handler):
    """Keeps the ERROR records logged while the fuzzer runs (an unhandled exception in a
    handler, a callback or a background loop), apart from those expected."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not any(
            record.name == logger and message.startswith(start) for logger, start in _EXPECTED_LOGS
        ):
            self.records.append(record)

    def lines(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]


@contextlib.contextmanager
def logged_errors() -> Iterator[LoggedErrors]:
    handler = LoggedErrors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


async def assert_serving(
    channel: grpc.aio.Channel, services: Sequence[str], metadata: Sequence[tuple[str, str]] = ()
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in services:
        response = await health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=CALL_DEADLINE,
            metadata=tuple(metadata),
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


async def assert_pipeline_works(
    channel: grpc.aio.Channel, world: World, metadata: Sequence[tuple[str, str]] = ()
) -> None:
    """A normal request through every service: an event becomes a profile, which joins a
    new imported segment, and the rule language still validates."""
    md = tuple(metadata)
    user = f"after-{time.monotonic_ns()}"
    ingest = ingest_service_pb2_grpc.IngestServiceStub(channel)
    sent = await ingest.SendEvent(
        ingest_service_pb2.SendEventRequest(
            parent=world.parent,
            event=event_pb2.Event(
                event_id=user, type=event_pb2.EVENT_TYPE_TRACK, name="signup", user_id=user
            ),
        ),
        timeout=CALL_DEADLINE,
        metadata=md,
    )
    assert sent.result.status == ingest_service_pb2.EVENT_STATUS_ACCEPTED
    profiles = profile_service_pb2_grpc.ProfileServiceStub(channel)
    name = f"{world.parent}/profiles/{user}"
    deadline = time.monotonic() + 30
    while True:
        try:
            await profiles.GetProfile(
                profile_service_pb2.GetProfileRequest(name=name),
                timeout=CALL_DEADLINE,
                metadata=md,
            )
            break
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, f"{name} never appeared"
        await asyncio.sleep(0.1)
    segments = segment_service_pb2_grpc.SegmentServiceStub(channel)
    created = await segments.CreateSegment(
        segment_service_pb2.CreateSegmentRequest(
            parent=world.parent,
            segment_id=f"after-{time.monotonic_ns() % 10**9}",
            segment=segment_pb2.Segment(
                kind=segment_pb2.SEGMENT_KIND_USER, source=segment_pb2.SEGMENT_SOURCE_IMPORTED
            ),
        ),
        timeout=CALL_DEADLINE,
        metadata=md,
    )
    await segments.ImportSegmentMembers(
        iter(
            [
                segment_service_pb2.ImportSegmentMembersRequest(
                    segment=created.segment.name,
                    mode=segment_service_pb2.IMPORT_MODE_ADD,
                    ids=segment_service_pb2.ImportedIds(ids=[user]),
                )
            ]
        ),
        timeout=CALL_DEADLINE,
        metadata=md,
    )
    memberships = membership_service_pb2_grpc.MembershipServiceStub(channel)
    checked = await memberships.CheckMembership(
        membership_service_pb2.CheckMembershipRequest(member=name, segment=created.segment.name),
        timeout=CALL_DEADLINE,
        metadata=md,
    )
    assert checked.is_member
    validated = await segments.ValidateRule(
        segment_service_pb2.ValidateRuleRequest(
            parent=world.parent, kind=segment_pb2.SEGMENT_KIND_USER, rule_text=USER_RULE
        ),
        timeout=CALL_DEADLINE,
        metadata=md,
    )
    assert validated.rule_text


async def failed_events(channel: grpc.aio.Channel, world: World) -> list[str]:
    """The events ingest accepted that could not be applied later, with their reasons."""
    ingest = ingest_service_pb2_grpc.IngestServiceStub(channel)
    response = await ingest.ListFailedEvents(
        ingest_service_pb2.ListFailedEventsRequest(parent=world.parent, page_size=20),
        timeout=CALL_DEADLINE,
    )
    return [
        f"{failed.event.event_id!r}: {failed.stage} {failed.reason} {failed.message[:200]}"
        for failed in response.failed_events
    ]
