"""The error helper over a real grpc.aio server: what the domain raises is what clients read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import grpc.aio
import pytest
from redis.asyncio import Redis

from audience import errors
from audience.errors import AudienceError, DecodedError, FieldViolation
from audience.v1 import segment_service_pb2

SERVICE = "audience.test.Errors"

CASES: dict[str, Callable[[], AudienceError]] = {
    "invalid_argument": lambda: errors.invalid_argument(
        "2 events are invalid.",
        FieldViolation("events[3].properties.color", "must be a string"),
        FieldViolation("segment.rule.all.conditions[2].value", "must be a number"),
        reason="EVENT_INVALID",
        metadata={"dataset": "shop"},
    ),
    "not_found": lambda: errors.not_found("audience.dev/Segment", "datasets/shop/segments/cart"),
    "already_exists": lambda: errors.already_exists(
        "audience.dev/Segment", "datasets/shop/segments/cart", reason="SEGMENT_EXISTS"
    ),
    "aborted": lambda: errors.aborted(
        "The segment changed since it was read.", reason="ETAG_MISMATCH"
    ),
    "failed_precondition": lambda: errors.failed_precondition(
        "The segment is being backfilled.", reason="BACKFILL_RUNNING"
    ),
    "out_of_range": lambda: errors.out_of_range(
        "The resume token is older than retention.", reason="RESUME_TOKEN_EXPIRED"
    ),
    "resource_exhausted": lambda: errors.resource_exhausted(
        "Too many events in flight.", timedelta(milliseconds=1500), reason="INGEST_BACKPRESSURE"
    ),
    "permission_denied": lambda: errors.permission_denied("The key cannot read dataset shop."),
    "unauthenticated": lambda: errors.unauthenticated("No API key.", reason="API_KEY_MISSING"),
    "unavailable": lambda: errors.unavailable("The bus is down.", timedelta(seconds=2)),
    "internal": lambda: errors.internal(),
}

EXPECTED: dict[str, DecodedError] = {
    "invalid_argument": DecodedError(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message="2 events are invalid.",
        reason="EVENT_INVALID",
        domain="audience.dev",
        metadata={"dataset": "shop"},
        violations=(
            FieldViolation("events[3].properties.color", "must be a string"),
            FieldViolation("segment.rule.all.conditions[2].value", "must be a number"),
        ),
    ),
    "not_found": DecodedError(
        code=grpc.StatusCode.NOT_FOUND,
        message="audience.dev/Segment 'datasets/shop/segments/cart' not found.",
        reason="NOT_FOUND",
        domain="audience.dev",
        metadata={
            "resource_type": "audience.dev/Segment",
            "resource_name": "datasets/shop/segments/cart",
        },
        resource_type="audience.dev/Segment",
        resource_name="datasets/shop/segments/cart",
    ),
    "already_exists": DecodedError(
        code=grpc.StatusCode.ALREADY_EXISTS,
        message="audience.dev/Segment 'datasets/shop/segments/cart' already exists.",
        reason="SEGMENT_EXISTS",
        domain="audience.dev",
        metadata={
            "resource_type": "audience.dev/Segment",
            "resource_name": "datasets/shop/segments/cart",
        },
        resource_type="audience.dev/Segment",
        resource_name="datasets/shop/segments/cart",
    ),
    "aborted": DecodedError(
        code=grpc.StatusCode.ABORTED,
        message="The segment changed since it was read.",
        reason="ETAG_MISMATCH",
        domain="audience.dev",
    ),
    "failed_precondition": DecodedError(
        code=grpc.StatusCode.FAILED_PRECONDITION,
        message="The segment is being backfilled.",
        reason="BACKFILL_RUNNING",
        domain="audience.dev",
    ),
    "out_of_range": DecodedError(
        code=grpc.StatusCode.OUT_OF_RANGE,
        message="The resume token is older than retention.",
        reason="RESUME_TOKEN_EXPIRED",
        domain="audience.dev",
    ),
    "resource_exhausted": DecodedError(
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        message="Too many events in flight.",
        reason="INGEST_BACKPRESSURE",
        domain="audience.dev",
        retry_delay=timedelta(milliseconds=1500),
    ),
    "permission_denied": DecodedError(
        code=grpc.StatusCode.PERMISSION_DENIED,
        message="The key cannot read dataset shop.",
        reason="PERMISSION_DENIED",
        domain="audience.dev",
    ),
    "unauthenticated": DecodedError(
        code=grpc.StatusCode.UNAUTHENTICATED,
        message="No API key.",
        reason="API_KEY_MISSING",
        domain="audience.dev",
    ),
    "unavailable": DecodedError(
        code=grpc.StatusCode.UNAVAILABLE,
        message="The bus is down.",
        reason="UNAVAILABLE",
        domain="audience.dev",
        retry_delay=timedelta(seconds=2),
    ),
    "internal": DecodedError(
        code=grpc.StatusCode.INTERNAL,
        message="Internal error.",
        reason="INTERNAL",
        domain="audience.dev",
    ),
}


def _fail(case: bytes) -> Exception:
    name = case.decode()
    if name == "unexpected":
        return KeyError("secret-table-name")
    return CASES[name]()


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise _fail(request)


async def _server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise _fail(request)


async def _client_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> bytes:
    received = [request async for request in requests]
    raise _fail(received[-1])


async def _bidi_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield b"echo"
        raise _fail(request)


async def _aborts_itself(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.CANCELLED, "Handler aborted.")
    raise AssertionError("unreachable")


async def _registered(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise errors.not_found("audience.dev/Profile", "datasets/shop/profiles/u1")


async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _echoes_name(
    request: segment_service_pb2.GetSegmentRequest, context: grpc.aio.ServicerContext
) -> segment_service_pb2.GetSegmentResponse:
    raise errors.not_found("audience.dev/Segment", request.name)


async def _careless_import(
    requests: AsyncIterator[segment_service_pb2.ImportSegmentMembersRequest],
    context: grpc.aio.ServicerContext,
) -> segment_service_pb2.ImportSegmentMembersResponse:
    # Ends the upload as if complete when the request stream fails: the client must
    # still learn that a message did not parse.
    received = 0
    try:
        async for _ in requests:
            received += 1
    except AudienceError:
        pass
    return segment_service_pb2.ImportSegmentMembersResponse(joined_count=received)


async def _validates(
    request: segment_service_pb2.ValidateRuleRequest, context: grpc.aio.ServicerContext
) -> segment_service_pb2.ValidateRuleResponse:
    return segment_service_pb2.ValidateRuleResponse(rule_text="ok")


TYPED = "audience.test.Typed"


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[errors.ErrorInterceptor()])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
                    "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
                    "BidiStream": grpc.stream_stream_rpc_method_handler(_bidi_stream),
                    "AbortsItself": grpc.unary_unary_rpc_method_handler(_aborts_itself),
                    "Ok": grpc.unary_unary_rpc_method_handler(_ok),
                },
            ),
        )
    )
    server.add_registered_method_handlers(
        "audience.test.Registered", {"Get": grpc.unary_unary_rpc_method_handler(_registered)}
    )
    server.add_registered_method_handlers(
        TYPED,
        {
            "Get": grpc.unary_unary_rpc_method_handler(
                _echoes_name,
                request_deserializer=segment_service_pb2.GetSegmentRequest.FromString,
                response_serializer=segment_service_pb2.GetSegmentResponse.SerializeToString,
            ),
            "Validate": grpc.unary_unary_rpc_method_handler(
                _validates,
                request_deserializer=segment_service_pb2.ValidateRuleRequest.FromString,
                response_serializer=segment_service_pb2.ValidateRuleResponse.SerializeToString,
            ),
            "Import": grpc.stream_unary_rpc_method_handler(
                _careless_import,
                request_deserializer=segment_service_pb2.ImportSegmentMembersRequest.FromString,
                response_serializer=(
                    segment_service_pb2.ImportSegmentMembersResponse.SerializeToString
                ),
            ),
        },
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


async def _unary_error(channel: grpc.aio.Channel, method: str, request: bytes) -> DecodedError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(method)(request, timeout=10)
    return errors.decode(caught.value)


async def _collect(call: Any, into: list[bytes]) -> None:
    async for message in call:
        into.append(message)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_each_status_reaches_the_client_with_its_details(
    channel: grpc.aio.Channel, case: str
) -> None:
    decoded = await _unary_error(channel, f"/{SERVICE}/Unary", case.encode())

    assert decoded == EXPECTED[case]


async def test_a_server_stream_fails_after_its_first_message(channel: grpc.aio.Channel) -> None:
    call = channel.unary_stream(f"/{SERVICE}/ServerStream")(b"resource_exhausted", timeout=10)
    received: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(call, received)

    assert received == [b"first"]
    assert errors.decode(caught.value) == EXPECTED["resource_exhausted"]


async def test_a_client_stream_error_decodes(channel: grpc.aio.Channel) -> None:
    async def requests() -> AsyncIterator[bytes]:
        yield b"ignored"
        yield b"invalid_argument"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.stream_unary(f"/{SERVICE}/ClientStream")(requests(), timeout=10)

    assert errors.decode(caught.value) == EXPECTED["invalid_argument"]


async def test_a_bidirectional_stream_error_decodes(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream(f"/{SERVICE}/BidiStream")(timeout=10)
    await call.write(b"out_of_range")
    assert await call.read() == b"echo"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()

    assert errors.decode(caught.value) == EXPECTED["out_of_range"]


async def test_an_unexpected_exception_is_internal_and_hides_its_text(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="audience.errors"):
        decoded = await _unary_error(channel, f"/{SERVICE}/Unary", b"unexpected")

    assert decoded == EXPECTED["internal"]
    assert "secret-table-name" not in repr(decoded)
    logged = [r for r in caplog.records if r.name == "audience.errors"]
    assert len(logged) == 1
    assert f"/{SERVICE}/Unary" in logged[0].getMessage()
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], KeyError)


async def test_an_unexpected_exception_in_a_stream_is_internal(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    call = channel.unary_stream(f"/{SERVICE}/ServerStream")(b"unexpected", timeout=10)
    with (
        caplog.at_level(logging.ERROR, logger="audience.errors"),
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        await _collect(call, [])

    assert errors.decode(caught.value) == EXPECTED["internal"]


async def test_a_handler_that_aborts_itself_is_left_alone(channel: grpc.aio.Channel) -> None:
    decoded = await _unary_error(channel, f"/{SERVICE}/AbortsItself", b"")

    assert decoded == DecodedError(
        code=grpc.StatusCode.CANCELLED, message="Handler aborted.", reason="", domain=""
    )


async def test_registered_method_handlers_are_intercepted_too(channel: grpc.aio.Channel) -> None:
    decoded = await _unary_error(channel, "/audience.test.Registered/Get", b"")

    assert decoded.code == grpc.StatusCode.NOT_FOUND
    assert decoded.resource_name == "datasets/shop/profiles/u1"


async def test_a_successful_call_is_untouched(channel: grpc.aio.Channel) -> None:
    assert await channel.unary_unary(f"/{SERVICE}/Ok")(b"hello", timeout=10) == b"hello"


async def test_an_unknown_method_stays_unimplemented(channel: grpc.aio.Channel) -> None:
    decoded = await _unary_error(channel, f"/{SERVICE}/Missing", b"")

    assert decoded.code == grpc.StatusCode.UNIMPLEMENTED
    assert decoded.reason == ""


async def test_an_error_echoing_a_huge_input_reaches_the_client_as_itself(
    channel: grpc.aio.Channel,
) -> None:
    name = "datasets/shop/segments/" + "é" * 50_000
    request = segment_service_pb2.GetSegmentRequest(name=name).SerializeToString()
    decoded = await _unary_error(channel, f"/{TYPED}/Get", request)

    assert decoded.code == grpc.StatusCode.NOT_FOUND
    assert decoded.reason == "NOT_FOUND"
    assert decoded.resource_name is not None
    assert name.startswith(decoded.resource_name.removesuffix("…"))


def _nested_rule_request(depth: int) -> bytes:
    request = segment_service_pb2.ValidateRuleRequest(parent="datasets/shop")
    rule = request.rule
    for _ in range(depth):
        rule = rule.negation
    rule.attribute.path = "plan"
    return request.SerializeToString()


@pytest.mark.parametrize(
    ("request_bytes", "field"),
    [
        (
            segment_service_pb2.GetSegmentRequest(name="ab").SerializeToString()[:-1] + b"\xff",
            "name",
        ),
        (b"\x0a\x02\xc3\x28", "name"),
        (b"\x0a\x05ab", ""),
        (b"\xff\xff\xff", ""),
    ],
    ids=["utf8-at-the-end", "utf8", "truncated", "garbage"],
)
async def test_a_request_that_does_not_parse_is_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel, request_bytes: bytes, field: str
) -> None:
    decoded = await _unary_error(channel, f"/{TYPED}/Get", request_bytes)

    assert (decoded.code, decoded.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert [v.field for v in decoded.violations] == ([field] if field else [])


async def test_nesting_past_the_parser_limit_is_invalid_argument_naming_the_nested_field(
    channel: grpc.aio.Channel,
) -> None:
    decoded = await _unary_error(channel, f"/{TYPED}/Validate", _nested_rule_request(150))

    assert (decoded.code, decoded.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert decoded.violations[0].field.startswith("rule.negation.negation")


async def test_nesting_within_the_parser_limit_reaches_the_handler(
    channel: grpc.aio.Channel,
) -> None:
    response = await channel.unary_unary(f"/{TYPED}/Validate")(_nested_rule_request(90), timeout=10)

    assert segment_service_pb2.ValidateRuleResponse.FromString(response).rule_text == "ok"


async def test_a_malformed_message_in_a_request_stream_fails_the_call_even_if_swallowed(
    channel: grpc.aio.Channel,
) -> None:
    good = segment_service_pb2.ImportSegmentMembersRequest(
        segment="datasets/shop/segments/s"
    ).SerializeToString()

    async def requests() -> AsyncIterator[bytes]:
        yield good
        yield good[:-1] + b"\xff"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.stream_unary(f"/{TYPED}/Import")(requests(), timeout=10)

    decoded = errors.decode(caught.value)
    assert (decoded.code, decoded.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert [v.field for v in decoded.violations] == ["segment"]


# --- a backend out of reach ------------------------------------------------------------------

BACKENDS = "audience.test.Backends"

OUT_OF_REACH = DecodedError(
    code=grpc.StatusCode.UNAVAILABLE,
    message="A server this service depends on is out of reach; retry.",
    reason="BACKEND_UNAVAILABLE",
    domain="audience.dev",
    retry_delay=timedelta(seconds=1),
)


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _holding_the_close(port: int) -> AsyncIterator[int]:
    """A proxy to ``port`` that passes the server's bytes on but not the end of its socket:
    the client reads the server's goodbye to a session before the connection closes, as it
    may over any network. Yields the proxy's port."""
    writers: list[asyncio.StreamWriter] = []

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        writers.extend((writer, upstream_writer))
        with contextlib.suppress(OSError):
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


async def _end_session(admin: asyncpg.Connection, pid: int) -> None:
    """Has the server end a session, and waits until the session is gone."""
    await admin.execute("SELECT pg_terminate_backend($1)", pid)
    deadline = time.monotonic() + 10
    while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
        assert time.monotonic() < deadline, f"session {pid} outlived its termination"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
async def backend_channel(postgres_dsn: str, redis_url: str) -> AsyncIterator[grpc.aio.Channel]:
    """A server whose handlers use PostgreSQL and Redis as the services do, and meet what
    the services meet when a server is down, restarting or drops its connections."""
    nowhere = _unused_port()
    server_address = urlsplit(postgres_dsn)
    assert server_address.port is not None
    closing = contextlib.AsyncExitStack()
    held = await closing.enter_async_context(_holding_the_close(server_address.port))
    held_dsn = server_address._replace(
        netloc=server_address.netloc.replace(f":{server_address.port}", f":{held}")
    ).geturl()
    admin = await asyncpg.connect(postgres_dsn)
    closing.push_async_callback(admin.close)

    async def postgres_refused(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{nowhere}/postgres")
        conn.terminate()
        return b""

    async def postgres_session_ended(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            # The server ends the session mid-statement, as a shutdown or a crash does.
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        finally:
            conn.terminate()
        return b""

    async def postgres_goodbye_read_first(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        conn = await asyncpg.connect(held_dsn)
        try:
            await _end_session(admin, conn.get_server_pid())
            # asyncpg read the goodbye but saw no close: InternalClientError, "cannot switch
            # to state 11; another operation (2) is in progress".
            await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()
        return b""

    async def postgres_query_fails(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.fetchval("SELECT 1 / 0")
        finally:
            conn.terminate()
        return b""

    async def redis_refused(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        client = Redis(host="127.0.0.1", port=nowhere)
        try:
            await client.ping()
        finally:
            await client.aclose()
        return b""

    async def stream_then_postgres_refused(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield b"first"
        await postgres_refused(request, context)

    server = grpc.aio.server(interceptors=[errors.ErrorInterceptor()])
    server.add_registered_method_handlers(
        BACKENDS,
        {
            "PostgresRefused": grpc.unary_unary_rpc_method_handler(postgres_refused),
            "PostgresSessionEnded": grpc.unary_unary_rpc_method_handler(postgres_session_ended),
            "PostgresGoodbyeReadFirst": grpc.unary_unary_rpc_method_handler(
                postgres_goodbye_read_first
            ),
            "PostgresQueryFails": grpc.unary_unary_rpc_method_handler(postgres_query_fails),
            "RedisRefused": grpc.unary_unary_rpc_method_handler(redis_refused),
            "StreamThenPostgresRefused": grpc.unary_stream_rpc_method_handler(
                stream_then_postgres_refused
            ),
        },
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with closing, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
        await server.stop(None)


@pytest.mark.parametrize(
    "method",
    ["PostgresRefused", "PostgresSessionEnded", "PostgresGoodbyeReadFirst", "RedisRefused"],
)
async def test_a_backend_out_of_reach_is_unavailable_with_a_retry_delay_not_internal(
    backend_channel: grpc.aio.Channel, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="audience.errors"):
        decoded = await _unary_error(backend_channel, f"/{BACKENDS}/{method}", b"")

    assert decoded == OUT_OF_REACH
    assert [r.levelno for r in caplog.records if r.name == "audience.errors"] == [logging.WARNING]


async def test_a_stream_whose_backend_goes_out_of_reach_ends_unavailable(
    backend_channel: grpc.aio.Channel,
) -> None:
    call = backend_channel.unary_stream(f"/{BACKENDS}/StreamThenPostgresRefused")(b"", timeout=10)
    received: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(call, received)

    assert received == [b"first"]
    assert errors.decode(caught.value) == OUT_OF_REACH


async def test_a_failing_query_on_a_live_backend_stays_internal(
    backend_channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="audience.errors"):
        decoded = await _unary_error(backend_channel, f"/{BACKENDS}/PostgresQueryFails", b"")

    assert decoded == EXPECTED["internal"]
