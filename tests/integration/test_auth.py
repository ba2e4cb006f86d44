"""The authentication interceptor on a real server: keys, scopes and datasets, for unary,
server-streaming, client-streaming and bidirectional RPCs; and the client channel that
sends the key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from audience import errors
from audience.auth import AuthInterceptor, KeyRing, parse_api_keys
from audience.channels import ChannelSettings, open_channel
from audience.config import CommonConfig
from audience.server import Host
from audience.v1 import (
    event_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_service_pb2,
    membership_service_pb2_grpc,
    segment_service_pb2,
    segment_service_pb2_grpc,
)
from tests.auth_support import (
    ADMIN,
    API_KEYS,
    AUTH_ENVIRONMENT,
    INTERNAL,
    SHOP_READER,
    SHOP_WRITER,
    Seen,
    secured_host,
    units,
)

pytestmark = pytest.mark.integration

UNKNOWN_KEY = "aud_nobody-knows-this-key-0123456789abcdefghij"


def _settings(api_key: str | None) -> ChannelSettings:
    common = CommonConfig.from_env({})
    return ChannelSettings(api_key, None, common.max_message_bytes, common.keepalive)


@pytest.fixture
async def seen() -> Seen:
    return Seen()


@pytest.fixture
async def address(seen: Seen) -> AsyncIterator[str]:
    async with secured_host(AUTH_ENVIRONMENT, seen) as (host, _):
        yield f"127.0.0.1:{host.port}"


def _channel(address: str, api_key: str | None) -> grpc.aio.Channel:
    return open_channel(address, _settings(api_key))


def _send(parent: str) -> ingest_service_pb2.SendEventRequest:
    return ingest_service_pb2.SendEventRequest(
        parent=parent, event=event_pb2.Event(event_id="e1", name="view")
    )


async def _finish(call: Any) -> None:
    if isinstance(call, grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall):
        async for _ in call:
            pass
    else:
        await call


async def _refusal(call: Any) -> errors.DecodedError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _finish(call)
    return errors.decode(caught.value)


@pytest.mark.parametrize(
    ("api_key", "code", "reason"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING"),
        (
            "aud_nobody-knows-this-key-0123456789abcdefghij",
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_INVALID",
        ),
        (SHOP_READER, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"),
    ],
)
async def test_a_unary_call_without_a_valid_key_or_scope_is_refused_before_the_handler(
    address: str, seen: Seen, api_key: str | None, code: grpc.StatusCode, reason: str
) -> None:
    async with _channel(address, api_key) as channel:
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        refused = await _refusal(stub.SendEvent(_send("datasets/shop"), timeout=5))

    assert (refused.code, refused.reason, refused.domain) == (code, reason, errors.DOMAIN)
    assert seen.requests == []


@pytest.mark.parametrize(
    ("api_key", "code"),
    [(None, grpc.StatusCode.UNAUTHENTICATED), (SHOP_READER, grpc.StatusCode.PERMISSION_DENIED)],
)
async def test_a_refused_call_is_refused_without_its_request_being_read(
    address: str, api_key: str | None, code: grpc.StatusCode
) -> None:
    """Not INVALID_ARGUMENT for bytes that do not parse: the request of a call refused for
    its key is never parsed."""
    not_a_request = b"\x12\xff\xff\xff\xff\x0f"  # field 2, a length past the end
    async with _channel(address, api_key) as channel:
        call = channel.unary_unary(
            "/audience.v1.IngestService/SendEvent",
            request_serializer=bytes,
            response_deserializer=ingest_service_pb2.SendEventResponse.FromString,
        )(not_a_request, timeout=5)
        refused = await _refusal(call)
    assert refused.code == code


async def test_a_malformed_authorization_header_is_an_invalid_key(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        for header in (f"Basic {SHOP_WRITER}", SHOP_WRITER, "Bearer "):
            refused = await _refusal(
                stub.SendEvent(
                    _send("datasets/shop"), metadata=[("authorization", header)], timeout=5
                )
            )
            assert refused.reason == "API_KEY_INVALID", header


async def test_a_unary_call_on_another_dataset_is_refused_and_one_on_its_own_served(
    address: str, seen: Seen
) -> None:
    async with _channel(address, SHOP_WRITER) as channel:
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        refused = await _refusal(stub.SendEvent(_send("datasets/rival"), timeout=5))
        assert seen.requests == []
        await stub.SendEvent(_send("datasets/shop"), timeout=5)

    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.reason == "DATASET_FORBIDDEN"
    assert refused.metadata == {"key": "shop-writer", "dataset": "rival", "field": "parent"}
    assert [request.parent for request in seen.requests] == ["datasets/shop"]


async def test_a_request_with_a_name_outside_any_dataset_or_none_at_all_is_invalid(
    address: str, seen: Seen
) -> None:
    async with _channel(address, SHOP_WRITER) as channel:
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        malformed = await _refusal(stub.SendEvent(_send("shop"), timeout=5))
        missing = await _refusal(stub.SendEvent(_send(""), timeout=5))

    assert (malformed.code, malformed.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_RESOURCE_NAME",
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_REQUIRED")
    assert [violation.field for violation in missing.violations] == ["parent"]
    assert seen.requests == []


async def test_a_server_stream_is_refused_for_another_dataset_anywhere_in_the_request(
    address: str, seen: Seen
) -> None:
    async with _channel(address, SHOP_READER) as channel:
        stub = membership_service_pb2_grpc.MembershipServiceStub(channel)
        foreign_segment = await _refusal(
            stub.WatchMembershipChanges(
                membership_service_pb2.WatchMembershipChangesRequest(
                    parent="datasets/shop", segments=["datasets/rival/segments/vip"]
                ),
                timeout=5,
            )
        )
        assert seen.requests == []
        served = [
            response.heartbeat.resume_token
            async for response in stub.WatchMembershipChanges(
                membership_service_pb2.WatchMembershipChangesRequest(parent="datasets/shop"),
                timeout=5,
            )
        ]
    async with _channel(address, None) as anonymous:
        unauthenticated = await _refusal(
            membership_service_pb2_grpc.MembershipServiceStub(anonymous).WatchMembershipChanges(
                membership_service_pb2.WatchMembershipChangesRequest(parent="datasets/shop"),
                timeout=5,
            )
        )

    assert (foreign_segment.code, foreign_segment.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "DATASET_FORBIDDEN",
    )
    assert foreign_segment.metadata["field"] == "segments[0]"
    assert served == ["t1", "t2"]
    assert unauthenticated.code == grpc.StatusCode.UNAUTHENTICATED


def _chunk(segment: str, *ids: str) -> segment_service_pb2.ImportSegmentMembersRequest:
    return segment_service_pb2.ImportSegmentMembersRequest(
        segment=segment,
        mode=segment_service_pb2.IMPORT_MODE_ADD,
        ids=segment_service_pb2.ImportedIds(ids=list(ids)),
    )


async def test_a_client_stream_is_checked_message_by_message_even_if_the_handler_swallows_it(
    address: str, seen: Seen
) -> None:
    async with _channel(address, SHOP_WRITER) as channel:
        stub = segment_service_pb2_grpc.SegmentServiceStub(channel)
        later = await _refusal(
            stub.ImportSegmentMembers(
                iter(
                    [
                        _chunk("datasets/shop/segments/vip", "a"),
                        _chunk("", "b"),
                        _chunk("datasets/rival/segments/vip", "c"),
                    ]
                ),
                timeout=5,
            )
        )
        handled = len(seen.requests)
        first = await _refusal(
            stub.ImportSegmentMembers(iter([_chunk("datasets/rival/segments/vip", "a")]), timeout=5)
        )
        unnamed = await _refusal(stub.ImportSegmentMembers(iter([_chunk("", "a")]), timeout=5))
        response = await stub.ImportSegmentMembers(
            iter([_chunk("datasets/shop/segments/vip", "a"), _chunk("", "b")]), timeout=5
        )
    async with _channel(address, SHOP_READER) as reader:
        unscoped = await _refusal(
            segment_service_pb2_grpc.SegmentServiceStub(reader).ImportSegmentMembers(
                iter([_chunk("datasets/shop/segments/vip", "a")]), timeout=5
            )
        )

    assert (later.code, later.reason) == (grpc.StatusCode.PERMISSION_DENIED, "DATASET_FORBIDDEN")
    assert later.metadata["dataset"] == "rival"
    # The two messages before the foreign one reached the handler; the foreign one did not.
    assert handled == 2
    assert first.reason == "DATASET_FORBIDDEN"
    assert unnamed.reason == "DATASET_REQUIRED"
    assert [violation.field for violation in unnamed.violations] == ["segment"]
    assert response.joined_count == 4
    assert unscoped.reason == "SCOPE_MISSING"


async def test_a_bidirectional_stream_answers_until_a_batch_names_another_dataset(
    address: str, seen: Seen
) -> None:
    def batch(parent: str, event_id: str) -> ingest_service_pb2.StreamEventsRequest:
        return ingest_service_pb2.StreamEventsRequest(
            parent=parent, events=[event_pb2.Event(event_id=event_id, name="view")]
        )

    requests: asyncio.Queue[ingest_service_pb2.StreamEventsRequest | None] = asyncio.Queue()

    async def send() -> AsyncIterator[ingest_service_pb2.StreamEventsRequest]:
        while (request := await requests.get()) is not None:
            yield request

    async with _channel(address, SHOP_WRITER) as channel:
        call = ingest_service_pb2_grpc.IngestServiceStub(channel).StreamEvents(send(), timeout=5)
        await requests.put(batch("datasets/shop", "e1"))
        first = await call.read()
        await requests.put(batch("", "e2"))
        second = await call.read()
        await requests.put(batch("datasets/rival", "e3"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        await requests.put(None)

    assert [result.event_id for result in first.results] == ["e1"]
    assert [result.event_id for result in second.results] == ["e2"]
    refused = errors.decode(caught.value)
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "DATASET_FORBIDDEN",
    )
    assert [request.events[0].event_id for request in seen.requests] == ["e1", "e2"]


async def test_admin_rpcs_need_the_admin_scope_and_a_key_for_every_dataset_passes(
    address: str, seen: Seen
) -> None:
    request = segment_service_pb2.DeleteSegmentRequest(name="datasets/shop/segments/vip")
    async with _channel(address, SHOP_WRITER) as channel:
        refused = await _refusal(
            segment_service_pb2_grpc.SegmentServiceStub(channel).DeleteSegment(request, timeout=5)
        )
    async with _channel(address, ADMIN) as channel:
        stub = segment_service_pb2_grpc.SegmentServiceStub(channel)
        await stub.DeleteSegment(request, timeout=5)
        await stub.DeleteSegment(
            segment_service_pb2.DeleteSegmentRequest(name="datasets/any/segments/x"), timeout=5
        )
        lacking_read = await _refusal(
            stub.GetSegment(
                segment_service_pb2.GetSegmentRequest(name="datasets/any/segments/x"), timeout=5
            )
        )

    assert (refused.reason, refused.metadata["scope"]) == ("SCOPE_MISSING", "admin")
    assert len(seen.requests) == 2
    # Scopes do not imply one another: admin alone does not read.
    assert lacking_read.reason == "SCOPE_MISSING"


async def test_the_channel_sends_its_key_on_every_kind_of_call(address: str) -> None:
    async with _channel(address, INTERNAL) as channel:
        ingest = ingest_service_pb2_grpc.IngestServiceStub(channel)
        segments = segment_service_pb2_grpc.SegmentServiceStub(channel)
        memberships = membership_service_pb2_grpc.MembershipServiceStub(channel)
        await ingest.SendEvent(_send("datasets/a"), timeout=5)
        watched = [
            response
            async for response in memberships.WatchMembershipChanges(
                membership_service_pb2.WatchMembershipChangesRequest(parent="datasets/b"),
                timeout=5,
            )
        ]
        imported = await segments.ImportSegmentMembers(
            iter([_chunk("datasets/c/segments/s", "x")]), timeout=5
        )
        streamed = [
            response
            async for response in ingest.StreamEvents(
                iter(
                    [
                        ingest_service_pb2.StreamEventsRequest(
                            parent="datasets/d", events=[event_pb2.Event(event_id="e")]
                        )
                    ]
                ),
                timeout=5,
            )
        ]

    assert len(watched) == 2
    assert imported.joined_count >= 1
    assert len(streamed) == 1


async def test_health_and_reflection_need_no_key(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="audience.v1.IngestService"), timeout=5
        )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = [
            response
            async for response in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        ]

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "audience.v1.IngestService" in {
        service.name for service in listed[0].list_services_response.service
    }


async def test_a_host_refuses_to_start_with_an_rpc_that_has_no_scope() -> None:
    keys = KeyRing(parse_api_keys(API_KEYS, "AUDIENCE_API_KEYS"))
    interceptor = AuthInterceptor(keys, scopes={"/audience.v1.IngestService/SendEvent": "write"})

    with pytest.raises(ValueError, match=r"/audience\.v1\.IngestService/SendEvents") as caught:
        interceptor.require_policies(["audience.v1.IngestService"])
    assert "/audience.v1.IngestService/SendEvent," not in str(caught.value)
    with pytest.raises(ValueError, match=r"audience\.test\.Unknown is not a known"):
        AuthInterceptor(keys).require_policies(["audience.test.Unknown"])


async def test_an_rpc_hosted_without_a_scope_is_refused(seen: Seen) -> None:
    keys = KeyRing(parse_api_keys(API_KEYS, "AUDIENCE_API_KEYS"))
    interceptor = AuthInterceptor(keys, scopes={})
    common = CommonConfig.from_env({"AUDIENCE_LISTEN": "127.0.0.1:0"})
    async with Host(units(seen), common, interceptors=[interceptor]) as host:
        async with _channel(f"127.0.0.1:{host.port}", ADMIN) as channel:
            refused = await _refusal(
                ingest_service_pb2_grpc.IngestServiceStub(channel).SendEvent(
                    _send("datasets/shop"), timeout=5
                )
            )
        await host.stop(timedelta(0))

    assert (refused.code, refused.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "METHOD_NOT_ALLOWED",
    )
    assert seen.requests == []
