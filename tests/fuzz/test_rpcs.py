"""Bad input, everywhere: every RPC of every service, fuzzed against the real suite.

For each RPC, hypothesis draws requests from the request's descriptor (and valid requests
with fuzzed fields merged in, see :mod:`tests.fuzz.strategies`) and sends them to all four
services hosted on one port with real PostgreSQL and Redis; every answer must satisfy the
oracle of :mod:`tests.fuzz.oracle`. Afterwards every service is still SERVING, a normal
request still goes from ingest to a membership, no accepted event failed later, nothing
logged an error, and the process's memory grew by less than :data:`RSS_GROWTH_BOUND`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from google.protobuf.message import Message
from hypothesis import strategies as st

from services.registry import SERVICES
from tests.e2e.conftest import StartSuite, new_dataset
from tests.fuzz.harness import (
    assert_pipeline_works,
    assert_serving,
    bearer,
    blocking_channel,
    describe,
    failed_events,
    fuzz_rpc,
    fuzz_rpcs,
    logged_errors,
    rss,
    services_of,
)
from tests.fuzz.oracle import Outcome, RawRequests, Requests, Rpc, every_rpc, problems
from tests.fuzz.world import SECRET_VARIABLE, World, seed, valid_requests

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.fuzz,
    # The services run in this process and draw from `random` (retry jitter) while
    # hypothesis generates in another thread; hypothesis takes that for a strategy using
    # `random`, and formats the offending strategy, a repr it finds too large.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

RSS_GROWTH_BOUND = 256 * 1024 * 1024
"""The most the process's memory may grow while one service is fuzzed. Requests reach 8
MiB (the message limit) and a few are in flight at once; a leak of a few kilobytes per
call would pass it within the run."""
SERVICE_NAMES = services_of()
ENVIRON = {
    "AUDIENCE_PROFILE_BACKFILL_PAUSE": "0s",
    SECRET_VARIABLE: "not-a-real-password",
}


def _world_for_shapes() -> World:
    return World(
        dataset="d",
        other_dataset="o",
        profiles=("datasets/d/profiles/a", "datasets/d/profiles/b", "c", "d"),
        account="datasets/d/accounts/x",
        user_segment="datasets/d/segments/u",
        imported_segment="datasets/d/segments/i",
        account_segment="datasets/d/segments/a",
        destination="datasets/d/destinations/x",
        schedule="datasets/d/schedules/x",
        webhook="datasets/d/webhookSubscriptions/x",
        export_job="datasets/d/exportJobs/x",
        export_root="/tmp",
    )


def test_every_rpc_of_every_service_has_valid_requests_to_fuzz_from() -> None:
    """A new service or RPC fails here until the fuzzer knows how to call it."""
    valid = valid_requests(_world_for_shapes())
    rpcs = {rpc.full_name: rpc for rpc in every_rpc()}
    assert set(SERVICE_NAMES) >= {
        "audience.v1.IngestService",
        "audience.v1.ProfileService",
        "audience.v1.SegmentService",
        "audience.v1.MembershipService",
        "audience.v1.ExportService",
    }
    assert sorted(set(rpcs) - set(valid)) == [], "RPCs without valid requests in world.py"
    assert sorted(set(valid) - set(rpcs)) == [], "valid requests for RPCs that do not exist"
    for name, requests in valid.items():
        assert requests, name
        assert all(isinstance(r, rpcs[name].request_class) for r in requests), name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_every_rpc_answers_bad_input_with_a_clear_status(
    service: str, start_suite: StartSuite, tmp_path: Path
) -> None:
    environ = {**ENVIRON, "AUDIENCE_EXPORT_ROOT": str(tmp_path)}
    async with start_suite(SERVICES, environ) as suite:
        world = await seed(suite.channel, new_dataset(), new_dataset(), str(tmp_path))
        before = rss()
        started = time.monotonic()
        with logged_errors() as errors:
            fuzzed = await fuzz_rpcs(
                suite,
                world,
                [rpc for rpc in every_rpc() if rpc.service == service],
                metadata=(bearer(suite.api_key),),
            )
            await assert_serving(suite.channel, SERVICE_NAMES)
            await assert_pipeline_works(suite.channel, world)
        grown = rss() - before
        failed = await failed_events(suite.channel, world)
    print(f"\n{service}: {time.monotonic() - started:.1f} s, RSS {grown / 2**20:+.0f} MiB")
    print("\n".join(fuzzed.lines))
    assert not fuzzed.failures, fuzzed.report()
    assert not failed, "accepted events that failed later:\n" + "\n".join(failed)
    assert not errors.lines(), "errors logged while fuzzing:\n" + "\n".join(errors.lines()[:20])
    assert grown < RSS_GROWTH_BOUND, f"RSS grew {grown / 2**20:.0f} MiB"


def _corrupted(valid: Message) -> st.SearchStrategy[bytes]:
    encoded = valid.SerializeToString()

    def corrupt(position: int, how: str) -> bytes:
        at = position % (len(encoded) + 1)
        if how == "truncate":
            return encoded[:at]
        if how == "bad-utf8":
            return encoded[:at] + b"\xff" + encoded[at + 1 :]
        if how == "huge-length":
            return encoded[:at] + b"\x0a\xff\xff\xff\xff\x0f" + encoded[at:]
        return encoded[:at] + b"\x07" + encoded[at:]

    return st.builds(
        corrupt,
        st.integers(0, 10_000),
        st.sampled_from(["truncate", "bad-utf8", "huge-length", "bad-wire-type"]),
    )


@pytest.mark.timeout(300)
async def test_every_rpc_answers_bytes_that_do_not_parse_with_invalid_argument(
    start_suite: StartSuite, tmp_path: Path
) -> None:
    environ = {**ENVIRON, "AUDIENCE_EXPORT_ROOT": str(tmp_path)}
    async with start_suite(SERVICES, environ) as suite:
        world = await seed(suite.channel, new_dataset(), new_dataset(), str(tmp_path))
        valid = valid_requests(world)
        limit = suite.resources.common.max_message_bytes
        failures: dict[str, str] = {}

        def check(rpc: Rpc, requests: Requests | RawRequests, outcome: Outcome) -> list[str]:
            return problems(rpc, requests, outcome, limit)

        with logged_errors() as errors, blocking_channel(suite) as channel:
            for rpc in every_rpc():
                single = st.one_of(
                    st.binary(max_size=64),
                    *(_corrupted(request) for request in valid[rpc.full_name]),
                )
                strategy = (
                    st.lists(single, min_size=1, max_size=3)
                    if rpc.client_streaming
                    else single.map(lambda data: [data])
                ).map(RawRequests)
                try:
                    await asyncio.to_thread(
                        fuzz_rpc,
                        channel,
                        rpc,
                        strategy,
                        check,
                        examples=15,
                        metadata=(bearer(suite.api_key),),
                    )
                except Exception as error:
                    failures[rpc.full_name] = "\n  ".join(describe(error))
            await assert_serving(suite.channel, SERVICE_NAMES)
    assert not failures, "\n".join(f"{name}: {text}" for name, text in failures.items())
    assert not errors.lines(), "errors logged while fuzzing:\n" + "\n".join(errors.lines()[:20])
