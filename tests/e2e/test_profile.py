"""ProfileService over gRPC, with ingest in front of it: events sent to ingest become
profiles, accounts, history and aggregates that every RPC reads, merges and erases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import grpc
import grpc.aio
import pytest
from click.testing import CliRunner, Result
from google.protobuf import duration_pb2, timestamp_pb2

from audience.cli.main import cli
from audience.errors import decode
from audience.rules.text import parse_rule
from audience.v1 import (
    common_pb2,
    event_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    profile_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
    rule_pb2,
    segment_pb2,
)
from services.ingest.app import DEFINITION as INGEST
from services.profile.app import DEFINITION as PROFILE
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset
from tests.profile_support import T0, E, count_spec, event

pytestmark = pytest.mark.e2e

FULL = profile_pb2.PROFILE_VIEW_FULL
READY = profile_pb2.AggregateSpec.STATE_READY
FAST = {"AUDIENCE_PROFILE_BACKFILL_PAUSE": "0s"}


@dataclass
class Suite:
    running: RunningSuite
    ingest: ingest_service_pb2_grpc.IngestServiceStub
    profiles: profile_service_pb2_grpc.ProfileServiceStub
    dataset: str

    @property
    def parent(self) -> str:
        return f"datasets/{self.dataset}"

    def name(self, profile_id: str) -> str:
        return f"{self.parent}/profiles/{profile_id}"

    async def send(self, *events: event_pb2.Event) -> None:
        response = await self.ingest.SendEvents(
            ingest_service_pb2.SendEventsRequest(parent=self.parent, events=list(events)),
            timeout=10,
        )
        for result in response.results:
            assert result.status == ingest_service_pb2.EVENT_STATUS_ACCEPTED, result

    async def get(self, profile_id: str, **fields: object) -> profile_pb2.Profile:
        response: profile_service_pb2.GetProfileResponse = await self.profiles.GetProfile(
            profile_service_pb2.GetProfileRequest(name=self.name(profile_id), **fields),  # type: ignore[arg-type]
            timeout=10,
        )
        return response.profile

    async def list_events(self, profile_id: str) -> list[event_pb2.Event]:
        response = await self.profiles.ListProfileEvents(
            profile_service_pb2.ListProfileEventsRequest(parent=self.name(profile_id)),
            timeout=10,
        )
        return list(response.events)

    async def until(
        self, profile_id: str, events: int, within: float = 15.0
    ) -> profile_pb2.Profile:
        """Waits until the profile has applied ``events`` events."""
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                found = await self.get(profile_id)
                if found.event_count >= events:
                    return found
            assert time.monotonic() < deadline, f"{profile_id} did not reach {events} events"
            await asyncio.sleep(0.05)

    async def gone(self, profile_id: str, within: float = 15.0) -> grpc.aio.AioRpcError:
        deadline = time.monotonic() + within
        while True:
            try:
                await self.get(profile_id)
            except grpc.aio.AioRpcError as error:
                return error
            assert time.monotonic() < deadline, f"{profile_id} is still there"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def suite(start_suite: StartSuite) -> AsyncIterator[Suite]:
    async with start_suite([INGEST, PROFILE], FAST) as running:
        yield Suite(
            running,
            ingest_service_pb2_grpc.IngestServiceStub(running.channel),
            profile_service_pb2_grpc.ProfileServiceStub(running.channel),
            new_dataset(),
        )


async def _invalid(call: object) -> list[str]:
    """The fields an INVALID_ARGUMENT names."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    decoded = decode(caught.value)
    assert decoded.code == grpc.StatusCode.INVALID_ARGUMENT, decoded
    return [violation.field for violation in decoded.violations]


async def test_an_event_sent_to_ingest_shows_up_in_the_profile(start_suite: StartSuite) -> None:
    async with suite(start_suite) as s:
        response = await s.profiles.RegisterAggregates(
            profile_service_pb2.RegisterAggregatesRequest(
                parent=s.parent, aggregates=[count_spec("page_view")]
            ),
            timeout=10,
        )
        [spec] = response.aggregates
        assert spec.aggregate_id.startswith("agg_")
        # The visitor's events and the user's go to different partitions: one at a time.
        await s.send(event(anon="d1", kind=E.EVENT_TYPE_PAGE, path="/home", at=T0, country="FR"))
        await s.until("d1", 1)
        await s.send(
            event(
                user="u1",
                anon="d1",
                kind=E.EVENT_TYPE_IDENTIFY,
                traits={"plan": "pro"},
                identities=[("email", "ada@example.com")],
                at=T0 + timedelta(minutes=1),
            ),
        )
        basic = await s.until("u1", 2)
        assert basic.attributes["plan"].string_value == "pro"
        assert {(i.type, i.value) for i in basic.identities} == {
            ("user_id", "u1"),
            ("anonymous_id", "d1"),
            ("email", "ada@example.com"),
        }
        assert basic.last_context.location.country == "FR"
        assert basic.current_session.landing_page == "/home"
        assert basic.merged_profiles == [s.name("d1")]
        assert not basic.aggregates
        assert not basic.recent_events

        full = await s.get("u1", view=FULL)
        assert [e.event_id for e in full.recent_events] == [
            e.event_id for e in await s.list_events("u1")
        ]
        [value] = full.aggregates
        assert value.aggregate_id == spec.aggregate_id
        assert sum(b.count for b in value.buckets) == 1
        assert list(full.segments) == []  # no segment engine in this suite: left out, logged

        by_email = await s.profiles.GetProfile(
            profile_service_pb2.GetProfileRequest(
                dataset=s.parent,
                identity=common_pb2.Identity(type="email", value="ADA@example.com"),
            ),
            timeout=10,
        )
        assert by_email.profile.name == s.name("u1")
        merged = await s.gone("d1")
        assert decode(merged).reason == "PROFILE_MERGED"
        assert decode(merged).metadata["merged_into"] == s.name("u1")


async def test_profile_events_are_paged_newest_first(start_suite: StartSuite) -> None:
    async with suite(start_suite) as s:
        sent = [
            event(
                user="u2",
                kind=E.EVENT_TYPE_PAGE if i % 2 else E.EVENT_TYPE_TRACK,
                name="" if i % 2 else "signup",
                at=T0 + timedelta(seconds=i),
            )
            for i in range(5)
        ]
        await s.send(*sent)
        await s.until("u2", 5)
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            response = await s.profiles.ListProfileEvents(
                profile_service_pb2.ListProfileEventsRequest(
                    parent=s.name("u2"), page_size=2, page_token=token
                ),
                timeout=10,
            )
            seen += [e.event_id for e in response.events]
            pages += 1
            token = response.next_page_token
            if not token:
                break
        assert pages == 3
        assert seen == [e.event_id for e in reversed(sent)]
        pages_only = await s.profiles.ListProfileEvents(
            profile_service_pb2.ListProfileEventsRequest(
                parent=s.name("u2"), event_name="page_view"
            ),
            timeout=10,
        )
        assert [e.event_id for e in pages_only.events] == [sent[3].event_id, sent[1].event_id]
        fields = await _invalid(
            s.profiles.ListProfileEvents(
                profile_service_pb2.ListProfileEventsRequest(
                    parent=s.name("u2"), page_token="garbage"
                ),
                timeout=10,
            )
        )
        assert fields == ["page_token"]


async def test_accounts_roll_up_and_list_their_users(start_suite: StartSuite) -> None:
    async with suite(start_suite) as s:
        await s.send(
            event(
                account="acme",
                kind=E.EVENT_TYPE_ACCOUNT_UPDATE,
                account_traits={"industry": "retail"},
                at=T0,
            ),
            *[
                event(
                    user=f"u{i}",
                    account="acme",
                    kind=E.EVENT_TYPE_ORDER_COMPLETED,
                    order=[("sku", 10.0, i)],
                    at=T0 + timedelta(minutes=i),
                )
                for i in range(1, 4)
            ],
        )
        for i in range(1, 4):
            await s.until(f"u{i}", 1)
        account_name = f"{s.parent}/accounts/acme"
        deadline = time.monotonic() + 10
        while True:
            account = (
                await s.profiles.GetAccount(
                    profile_service_pb2.GetAccountRequest(name=account_name), timeout=10
                )
            ).account
            if account.user_count == 3 and account.attributes:
                break
            assert time.monotonic() < deadline, account
            await asyncio.sleep(0.05)
        assert (account.order_count, account.lifetime_value) == (3, 60.0)
        assert account.attributes["industry"].string_value == "retail"
        first = await s.profiles.ListAccountProfiles(
            profile_service_pb2.ListAccountProfilesRequest(parent=account_name, page_size=2),
            timeout=10,
        )
        rest = await s.profiles.ListAccountProfiles(
            profile_service_pb2.ListAccountProfilesRequest(
                parent=account_name, page_size=2, page_token=first.next_page_token
            ),
            timeout=10,
        )
        assert [p.name for p in (*first.profiles, *rest.profiles)] == [
            s.name(f"u{i}") for i in range(1, 4)
        ]
        assert not rest.next_page_token
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await s.profiles.GetAccount(
                profile_service_pb2.GetAccountRequest(name=f"{s.parent}/accounts/none"),
                timeout=10,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_profiles_merge_explicitly(start_suite: StartSuite) -> None:
    async with suite(start_suite) as s:
        await s.send(
            event(user="crm-1", kind=E.EVENT_TYPE_ORDER_COMPLETED, order=[("a", 7.0, 1)], at=T0),
            event(user="web-1", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(hours=1)),
        )
        await s.until("crm-1", 1)
        await s.until("web-1", 1)
        response = await s.profiles.MergeProfiles(
            profile_service_pb2.MergeProfilesRequest(
                target=s.name("crm-1"), sources=[s.name("web-1")]
            ),
            timeout=10,
        )
        assert response.profile.event_count == 2
        assert response.profile.lifetime_value == 7.0
        [merge] = response.merges
        assert (merge.source, merge.target, merge.reason) == (
            s.name("web-1"),
            s.name("crm-1"),
            "explicit merge",
        )
        assert decode(await s.gone("web-1")).reason == "PROFILE_MERGED"
        await s.send(event(user="web-1", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(hours=2)))
        await s.until("crm-1", 3)
        fields = await _invalid(
            s.profiles.MergeProfiles(
                profile_service_pb2.MergeProfilesRequest(
                    target=s.name("crm-1"), sources=[s.name("crm-1")]
                ),
                timeout=10,
            )
        )
        assert fields == ["sources[0]"]


async def test_erasure_deletes_the_profile_and_suppresses_it_until_released(
    start_suite: StartSuite,
) -> None:
    async with suite(start_suite) as s:
        await s.send(event(user="gdpr", kind=E.EVENT_TYPE_PAGE, at=T0))
        await s.until("gdpr", 1)
        response = await s.profiles.EraseProfile(
            profile_service_pb2.EraseProfileRequest(name=s.name("gdpr")), timeout=10
        )
        assert response.erasure.profile == s.name("gdpr")
        assert response.erasure.deleted_event_count == 1
        assert [(i.type, i.value) for i in response.erasure.identities] == [("user_id", "gdpr")]
        assert (await s.gone("gdpr")).code() == grpc.StatusCode.NOT_FOUND
        await s.send(event(user="gdpr", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(days=1)))
        await s.send(event(user="other", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(days=1)))
        await s.until("other", 1)
        assert (await s.gone("gdpr")).code() == grpc.StatusCode.NOT_FOUND
        released = await s.profiles.ReleaseErasedIdentities(
            profile_service_pb2.ReleaseErasedIdentitiesRequest(
                parent=s.parent, identities=[common_pb2.Identity(type="user_id", value="gdpr")]
            ),
            timeout=10,
        )
        assert released.released_count == 1
        await s.send(event(user="gdpr", kind=E.EVENT_TYPE_PAGE, at=T0 + timedelta(days=2)))
        back = await s.until("gdpr", 1)
        assert back.event_count == 1


async def _query(
    s: Suite, rule: str, **fields: object
) -> list[profile_service_pb2.QueryProfilesResponse]:
    request = profile_service_pb2.QueryProfilesRequest(
        parent=s.parent,
        kind=segment_pb2.SEGMENT_KIND_USER,
        rule=parse_rule(rule),
        **fields,  # type: ignore[arg-type]
    )
    return [response async for response in s.profiles.QueryProfiles(request, timeout=30)]


async def test_query_profiles_streams_matching_ids_in_order(start_suite: StartSuite) -> None:
    async with suite(start_suite) as s:
        plans = {f"q{n:02d}": ("pro" if n % 3 == 0 else "free") for n in range(12)}
        await s.send(
            *[
                event(user=user, kind=E.EVENT_TYPE_IDENTIFY, traits={"plan": plan}, at=T0)
                for user, plan in plans.items()
            ]
        )
        for user in plans:
            await s.until(user, 1)
        pro = sorted(user for user, plan in plans.items() if plan == "pro")
        responses = await _query(s, 'attributes.plan = "pro"', chunk_size=2)
        assert [i for r in responses for i in r.profile_ids] == pro
        assert all(len(r.profile_ids) <= 2 for r in responses)
        last = responses[-1]
        assert (last.scanned_count, last.total_count, last.matched_count) == (12, 12, len(pro))
        [counted] = await _query(s, 'attributes.plan = "pro"', count_only=True)
        assert (counted.matched_count, list(counted.profile_ids)) == (len(pro), [])
        limited = await _query(s, 'attributes.plan = "free"', limit=3)
        assert [i for r in limited for i in r.profile_ids] == sorted(
            user for user, plan in plans.items() if plan == "free"
        )[:3]
        segment = f"{s.parent}/segments/chosen"
        request_rule = f'in segment "{segment}" and attributes.plan = "pro"'
        referenced = profile_service_pb2.ReferencedSegment(
            segment=segment, members=profile_service_pb2.ProfileIdList(profile_ids=pro[:2])
        )
        chosen = await _query(s, request_rule, referenced_segments=[referenced])
        assert [i for r in chosen for i in r.profile_ids] == pro[:2]
        fields = await _invalid(_query(s, request_rule))
        assert fields == ["referenced_segments"]


async def test_aggregates_register_once_and_backfill(start_suite: StartSuite) -> None:
    async with suite(start_suite) as s:
        await s.send(
            *[event(user="b1", name="search", at=T0 + timedelta(seconds=i)) for i in range(3)]
        )
        await s.until("b1", 3)
        spec = count_spec("search", retention=timedelta(days=3650))
        first = await s.profiles.RegisterAggregates(
            profile_service_pb2.RegisterAggregatesRequest(parent=s.parent, aggregates=[spec]),
            timeout=10,
        )
        again = await s.profiles.RegisterAggregates(
            profile_service_pb2.RegisterAggregatesRequest(parent=s.parent, aggregates=[spec]),
            timeout=10,
        )
        assert again.aggregates[0].aggregate_id == first.aggregates[0].aggregate_id
        deadline = time.monotonic() + 15
        while True:
            listed = await s.profiles.ListAggregates(
                profile_service_pb2.ListAggregatesRequest(parent=s.parent), timeout=10
            )
            if [a.state for a in listed.aggregates] == [READY]:
                break
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.05)
        full = await s.get("b1", view=FULL)
        assert sum(b.count for b in full.aggregates[0].buckets) == 3


async def test_bad_input_is_invalid_argument_naming_the_field(start_suite: StartSuite) -> None:
    async with suite(start_suite) as s:
        p = s.profiles
        cases = {
            "name": p.GetProfile(profile_service_pb2.GetProfileRequest(name="profiles/x")),
            "dataset": p.GetProfile(
                profile_service_pb2.GetProfileRequest(
                    identity=common_pb2.Identity(type="email", value="x")
                )
            ),
            "identity.type": p.GetProfile(
                profile_service_pb2.GetProfileRequest(
                    dataset=s.parent, identity=common_pb2.Identity(type="E-mail", value="x")
                )
            ),
            "page_size": p.ListProfileEvents(
                profile_service_pb2.ListProfileEventsRequest(parent=s.name("x"), page_size=-1)
            ),
            "sources": p.MergeProfiles(
                profile_service_pb2.MergeProfilesRequest(target=s.name("x"))
            ),
            "identities": p.ReleaseErasedIdentities(
                profile_service_pb2.ReleaseErasedIdentitiesRequest(parent=s.parent)
            ),
            "parent": p.RegisterAggregates(
                profile_service_pb2.RegisterAggregatesRequest(parent="shop")
            ),
            "aggregates[0].event_name": p.RegisterAggregates(
                profile_service_pb2.RegisterAggregatesRequest(
                    parent=s.parent, aggregates=[count_spec("no spaces allowed")]
                )
            ),
            "kind": p.QueryProfiles(
                profile_service_pb2.QueryProfilesRequest(
                    parent=s.parent, rule=parse_rule('attributes.plan = "pro"')
                )
            ).read(),
            "rule.behavior.function": p.QueryProfiles(
                profile_service_pb2.QueryProfilesRequest(
                    parent=s.parent,
                    kind=segment_pb2.SEGMENT_KIND_USER,
                    rule=rule_pb2.Rule(
                        behavior=rule_pb2.BehaviorCondition(
                            event_name="x",
                            window=rule_pb2.Window(all_time=rule_pb2.AllTime()),
                            comparison=rule_pb2.Comparison(operator=rule_pb2.OPERATOR_EXISTS),
                        )
                    ),
                )
            ).read(),
        }
        for field, call in cases.items():
            assert field in await _invalid(call), field
        # Durations a Duration cannot be: the aggregate's id is a hash of its JSON.
        for name, duration in (
            ("bucket_width", duration_pb2.Duration(nanos=1_000_000_000)),
            ("retention", duration_pb2.Duration(seconds=315_576_000_001)),
        ):
            spec = count_spec("page_view")
            getattr(spec, name).CopyFrom(duration)
            registered = p.RegisterAggregates(
                profile_service_pb2.RegisterAggregatesRequest(parent=s.parent, aggregates=[spec])
            )
            assert await _invalid(registered) == [f"aggregates[0].{name}"]


async def test_event_filters_no_stored_event_could_match_are_invalid_argument(
    start_suite: StartSuite,
) -> None:
    """A name no event may have (NUL, which PostgreSQL cannot even compare, or a space) and
    times outside a Timestamp's range are refused, not sent to the store."""
    async with suite(start_suite) as s:
        await s.send(event(user="u3", name="signup", at=T0))
        await s.until("u3", 1)

        async def listed(**filters: object) -> profile_service_pb2.ListProfileEventsResponse:
            response: profile_service_pb2.ListProfileEventsResponse = (
                await s.profiles.ListProfileEvents(
                    profile_service_pb2.ListProfileEventsRequest(parent=s.name("u3"), **filters),  # type: ignore[arg-type]
                    timeout=10,
                )
            )
            return response

        first, last = -62_135_596_800, 253_402_300_799  # 0001-01-01, 9999-12-31T23:59:59
        refused: list[tuple[str, dict[str, object]]] = [
            ("event_name", {"event_name": "\x00"}),
            ("event_name", {"event_name": "sign up"}),
            ("start_time", {"start_time": timestamp_pb2.Timestamp(seconds=first - 1)}),
            ("end_time", {"end_time": timestamp_pb2.Timestamp(seconds=last + 1)}),
            ("end_time", {"end_time": timestamp_pb2.Timestamp(seconds=2**63 - 1)}),
            ("start_time", {"start_time": timestamp_pb2.Timestamp(seconds=0, nanos=-1)}),
        ]
        for field, filters in refused:
            assert await _invalid(listed(**filters)) == [field], filters
        widest = await listed(
            event_name="signup",
            start_time=timestamp_pb2.Timestamp(seconds=first),
            end_time=timestamp_pb2.Timestamp(seconds=last, nanos=999_999_999),
        )
        assert len(widest.events) == 1


async def _cli(suite: RunningSuite, dataset: str, *args: str, input: str | None = None) -> Result:
    runner = CliRunner()
    # The CLI runs its own event loop: off this one's thread.
    return await asyncio.to_thread(
        runner.invoke,
        cli,
        [args[0], args[1], "--address", suite.address, "--dataset", dataset, *args[2:]],
        input=input,
        env={"AUDIENCE_API_KEY": suite.api_key},
        catch_exceptions=False,
    )


async def test_profiles_and_accounts_from_the_command_line(start_suite: StartSuite) -> None:
    async with suite(start_suite) as s:
        await s.send(
            event(
                user="cli-1",
                account="initech",
                kind=E.EVENT_TYPE_IDENTIFY,
                traits={"plan": "gold"},
                identities=[("email", "cli@example.com")],
                at=T0,
            ),
            event(
                user="cli-1", kind=E.EVENT_TYPE_PAGE, path="/pricing", at=T0 + timedelta(minutes=1)
            ),
        )
        await s.until("cli-1", 2)
        running, dataset = s.running, s.dataset

        shown = await _cli(running, dataset, "profiles", "get", "cli-1")
        assert shown.exit_code == 0, shown.output
        assert "plan" in shown.output
        assert "gold" in shown.output
        assert "/pricing" in shown.output
        as_json = await _cli(
            running, dataset, "profiles", "get", "--identity", "email=cli@example.com", "--json"
        )
        assert as_json.exit_code == 0, as_json.output
        assert json.loads(as_json.stdout)["name"] == s.name("cli-1")

        account = await _cli(running, dataset, "accounts", "get", "initech")
        assert account.exit_code == 0, account.output
        assert "cli-1" in account.output
        assert "users" in account.output

        missing = await _cli(running, dataset, "profiles", "get", "nobody")
        assert missing.exit_code == 1
        assert "NOT_FOUND" in missing.output

        refused = await _cli(running, dataset, "profiles", "erase", "cli-1", input="n\n")
        assert refused.exit_code == 1
        await s.until("cli-1", 2)
        erased = await _cli(running, dataset, "profiles", "erase", "cli-1", "--yes")
        assert erased.exit_code == 0, erased.output
        assert "events deleted" in erased.output
        assert (await s.gone("cli-1")).code() == grpc.StatusCode.NOT_FOUND
