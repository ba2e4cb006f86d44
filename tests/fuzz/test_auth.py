"""Bad input with authentication on, as production runs: every RPC fuzzed through the
authentication interceptor with a key confined to one dataset, and calls whose metadata
is missing, garbage, doubled, oversized or carries a key that may not do the call.

Beyond the oracle of :mod:`tests.fuzz.oracle`: a call that carries no valid key is
UNAUTHENTICATED, a read-only key never writes, and a key of another dataset never gets an
answer about this one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audience.auth import RPC_SCOPES
from services.registry import SERVICES
from tests.e2e.conftest import StartSuite, SuiteKey, new_dataset
from tests.fuzz.harness import (
    EXAMPLES,
    assert_pipeline_works,
    assert_serving,
    bearer,
    blocking_channel,
    describe,
    fuzz_rpcs,
    logged_errors,
    services_of,
    strategy_for,
)
from tests.fuzz.oracle import Requests, Rpc, call, every_rpc, problems
from tests.fuzz.world import SECRET_VARIABLE, seed, valid_requests

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.fuzz,
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

OWNER = "aud_fuzz-owner-0123456789abcdefghijklmnopqrstuvwxyz"
READER = "aud_fuzz-reader-0123456789abcdefghijklmnopqrstuvwxy"
STRANGER = "aud_fuzz-stranger-0123456789abcdefghijklmnopqrstuvw"
# gRPC's default limit on the metadata a server accepts; past it gRPC refuses the call.
METADATA_LIMIT = 8 * 1024
# A few calls of every shape: unary reads and writes, an admin call, and each kind of stream.
METADATA_RPCS = (
    "audience.v1.SegmentService.GetSegment",
    "audience.v1.SegmentService.ValidateRule",
    "audience.v1.SegmentService.DeleteSegment",
    "audience.v1.IngestService.SendEvent",
    "audience.v1.ExportService.CreateDestination",
    "audience.v1.SegmentService.ImportSegmentMembers",
    "audience.v1.IngestService.StreamEvents",
    "audience.v1.ProfileService.QueryProfiles",
    "audience.v1.MembershipService.WatchMembershipChanges",
    "audience.v1.ExportService.ExportSegmentCsv",
)


def _keys(dataset: str) -> list[SuiteKey]:
    """Keys beside the suite's own: each known to the fuzzer, so that it can put them in
    metadata."""
    return [
        SuiteKey("owner", (dataset,), ("read", "write", "admin"), key=OWNER),
        SuiteKey("reader", (dataset,), ("read",), key=READER),
        SuiteKey("stranger", (f"{dataset}-elsewhere",), ("read", "write", "admin"), key=STRANGER),
    ]


def _environ(root: Path) -> dict[str, str]:
    return {
        "AUDIENCE_PROFILE_BACKFILL_PAUSE": "0s",
        "AUDIENCE_EXPORT_ROOT": str(root),
        SECRET_VARIABLE: "not-a-real-password",
    }


@pytest.mark.timeout(300)
async def test_every_rpc_answers_bad_input_through_the_authentication_interceptor(
    start_suite: StartSuite, tmp_path: Path
) -> None:
    dataset = new_dataset()
    owner = (bearer(OWNER),)
    async with (
        start_suite(SERVICES, _environ(tmp_path), _keys(dataset)) as suite,
        suite.open_channel(None) as keyless,
    ):
        world = await seed(keyless, dataset, new_dataset(), str(tmp_path), owner)
        with logged_errors() as errors:
            fuzzed = await fuzz_rpcs(
                suite, world, every_rpc(), metadata=owner, examples=max(EXAMPLES // 6, 3)
            )
            await assert_serving(keyless, services_of(), owner)
            await assert_pipeline_works(keyless, world, owner)
    print("\n" + "\n".join(fuzzed.lines))
    assert not fuzzed.failures, fuzzed.report()
    assert not errors.lines(), "errors logged while fuzzing:\n" + "\n".join(errors.lines()[:20])


_GARBAGE_VALUES = (
    "",
    "Bearer",
    "Bearer ",
    "Bearer x",
    "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
    "Bearer aud_" + "x" * 600,
    "Bearer " + "y" * 20_000,
    "Bearer aud_fuzz-owner-",
    "Bearer%20" + OWNER,
    OWNER,
)


def _metadata() -> st.SearchStrategy[tuple[tuple[str, str | bytes], ...]]:
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    value = st.one_of(
        st.sampled_from(_GARBAGE_VALUES),
        printable,
        printable.map(lambda text: f"Bearer {text}"),
        st.sampled_from([OWNER, READER, STRANGER]).map(lambda key: f"Bearer {key}"),
        st.sampled_from([OWNER, READER]).map(lambda key: f"bearer   {key}"),
        st.sampled_from([OWNER, READER]).map(lambda key: f"Bearer {key} trailing"),
    )
    entry: st.SearchStrategy[tuple[str, str | bytes]] = st.one_of(
        st.tuples(st.just("authorization"), value),
        st.tuples(st.sampled_from(["x-api-key", "x-dataset", "grpc-timeout-ish"]), printable),
        st.tuples(st.just("authorization-bin"), st.binary(max_size=16)),
    )
    return st.lists(entry, max_size=3).map(tuple)


def _size(metadata: Sequence[tuple[str, str | bytes]]) -> int:
    return sum(len(key) + len(value) for key, value in metadata)


def _metadata_problems(
    rpc: Rpc,
    metadata: Sequence[tuple[str, str | bytes]],
    requests: Requests,
    code: grpc.StatusCode,
    general: list[str],
) -> list[str]:
    if _size(metadata) > METADATA_LIMIT and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return []
    found = list(general)
    values = [value for key, value in metadata if key == "authorization"]
    carried = {key for key in (OWNER, READER, STRANGER) if any(key in str(v) for v in values)}
    if not carried and code != grpc.StatusCode.UNAUTHENTICATED:
        found.append(f"no valid key, yet {code.name}")
    scope = RPC_SCOPES[rpc.path]
    if carried == {READER} and scope != "read" and code == grpc.StatusCode.OK:
        found.append(f"a read-only key did a {scope} call")
    if carried == {STRANGER} and code == grpc.StatusCode.OK:
        found.append("a key of another dataset got an answer")
    return found


def _fuzz_metadata(
    channel: grpc.Channel,
    rpc: Rpc,
    strategy: st.SearchStrategy[Requests],
    limit: int,
    seen: Counter[str],
) -> None:
    @settings(
        max_examples=max(EXAMPLES // 2, 5),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(metadata=_metadata(), requests=strategy)
    def refuses_what_it_should(
        metadata: tuple[tuple[str, str | bytes], ...], requests: Requests
    ) -> None:
        outcome = call(channel, rpc, requests, metadata)
        seen[outcome.code.name] += 1
        general = problems(rpc, requests, outcome, limit)
        found = _metadata_problems(rpc, metadata, requests, outcome.code, general)
        shown = [(key, value[:80]) for key, value in metadata]
        assert not found, f"{'; '.join(found)}\n    metadata: {shown}\n    request: {requests!r}"

    refuses_what_it_should()


@pytest.mark.timeout(300)
async def test_calls_with_missing_garbage_or_wrong_keys_are_refused_clearly(
    start_suite: StartSuite, tmp_path: Path
) -> None:
    dataset = new_dataset()
    owner = (bearer(OWNER),)
    rpcs = {rpc.full_name: rpc for rpc in every_rpc()}
    failures: dict[str, list[str]] = {}
    lines: list[str] = []
    async with (
        start_suite(SERVICES, _environ(tmp_path), _keys(dataset)) as suite,
        suite.open_channel(None) as keyless,
    ):
        world = await seed(keyless, dataset, new_dataset(), str(tmp_path), owner)
        valid = valid_requests(world)
        pools = world.pools()
        limit = suite.resources.common.max_message_bytes
        with logged_errors() as errors, blocking_channel(suite) as channel:
            for name in METADATA_RPCS:
                rpc = rpcs[name]
                seen: Counter[str] = Counter()
                try:
                    await asyncio.to_thread(
                        _fuzz_metadata,
                        channel,
                        rpc,
                        strategy_for(rpc, valid[name], pools),
                        limit,
                        seen,
                    )
                except Exception as error:
                    failures[name] = describe(error)
                lines.append(f"{name}: " + ", ".join(f"{n} {k}" for k, n in seen.most_common()))
            await assert_serving(suite.channel, services_of())
    print("\n" + "\n".join(lines))
    assert not failures, "\n".join(
        f"{name}:\n  " + "\n  ".join(found) for name, found in failures.items()
    )
    assert not errors.lines(), "errors logged while fuzzing:\n" + "\n".join(errors.lines()[:20])
