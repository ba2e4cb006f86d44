"""The one error helper: rich ``google.rpc.Status`` errors, raised by domain code.

Domain code raises :class:`AudienceError` (through the constructors below) and knows
nothing of gRPC; :class:`ErrorInterceptor` turns it into a status with one ``ErrorInfo``
(domain ``audience.dev``), a ``BadRequest`` for bad fields, a ``RetryInfo`` when retrying
later helps and a ``ResourceInfo`` for a missing or clashing resource. Clients read all of
it back with :func:`decode`.

A status travels in the call's trailers, which clients refuse past 8 KiB (gRPC's default
metadata limit), so every text in it is clipped and field violations are kept within a
budget: an error that echoes an oversized input still reaches the client as itself. A
request that does not parse (bad UTF-8, nesting past protobuf's 100 levels, a broken wire
format) is ``INVALID_ARGUMENT`` with the reason ``MALFORMED_REQUEST``, naming the field
that failed when one can be told.

A call that fails because PostgreSQL or Redis is out of reach (a lost or refused
connection, a server shutting down, starting or recovering) is ``UNAVAILABLE`` with the
reason ``BACKEND_UNAVAILABLE`` and a ``RetryInfo``, not ``INTERNAL``: the same call succeeds
once the server is back, and clients retry ``UNAVAILABLE`` only.

Handlers are ``async def`` functions, or ``async def`` generators for streamed responses.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn, cast

import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
import grpc.aio
from google.protobuf import any_pb2, descriptor, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_status import rpc_status
from redis import exceptions as redis_exceptions

from audience.db import SERVER_GONE

__all__ = [
    "DOMAIN",
    "AudienceError",
    "Behavior",
    "DecodedError",
    "ErrorInterceptor",
    "FieldViolation",
    "aborted",
    "already_exists",
    "decode",
    "failed_precondition",
    "internal",
    "invalid_argument",
    "malformed_request",
    "not_found",
    "out_of_range",
    "permission_denied",
    "resource_exhausted",
    "unauthenticated",
    "unavailable",
    "wrap_handler",
]

DOMAIN = "audience.dev"

_log = logging.getLogger(__name__)

# AIP-193: at most 63 characters of [A-Z0-9_], starting with a letter, not ending with "_".
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,61}[A-Z0-9]")
_INTERNAL_MESSAGE = "Internal error."

# What one status may carry, in UTF-8 bytes. The message travels percent-encoded (up to
# three times its size) and the details base64-encoded (four thirds): together well under
# the 8 KiB that clients accept in trailers.
MAX_MESSAGE_BYTES = 512
MAX_TEXT_BYTES = 512
"""A metadata value, a violation's description, a resource name."""
MAX_FIELD_BYTES = 256
"""A violation's field path."""
MAX_DETAILS_BYTES = 3072
"""The serialized details; field violations past it are counted in the message."""
_ELLIPSIS = "…"


def _clip(text: str, limit: int) -> str:
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    cut = limit - len(_ELLIPSIS.encode())
    return encoded[:cut].decode(errors="ignore") + _ELLIPSIS


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: a path such as ``events[3].properties.color`` and what is wrong."""

    field: str
    description: str


class AudienceError(Exception):
    """An error that reaches the client as a rich status.

    Build one with the constructors of this module (``invalid_argument``, ``not_found``, …),
    which fill the code and the details each code calls for.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: tuple[FieldViolation, ...] = (),
        retry_delay: timedelta | None = None,
        resource_type: str | None = None,
        resource_name: str | None = None,
    ) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("an error cannot have status OK")
        if not _REASON.fullmatch(reason):
            raise ValueError(f"reason must be UPPER_SNAKE_CASE, got {reason!r}")
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations = violations
        self.retry_delay = retry_delay
        self.resource_type = resource_type
        self.resource_name = resource_name

    def __repr__(self) -> str:
        return f"AudienceError({self.code.name}, {self.reason!r}, {self.message!r})"

    def to_status(self) -> status_pb2.Status:
        """Returns the ``google.rpc.Status`` sent to the client, within the size limits."""
        message = _clip(self.message, MAX_MESSAGE_BYTES)
        info = error_details_pb2.ErrorInfo(
            reason=self.reason,
            domain=DOMAIN,
            metadata={
                _clip(key, MAX_FIELD_BYTES): _clip(value, MAX_TEXT_BYTES)
                for key, value in self.metadata.items()
            },
        )
        later: list[Message] = []
        if self.retry_delay is not None:
            delay = duration_pb2.Duration()
            delay.FromTimedelta(self.retry_delay)
            later.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.resource_type is not None:
            later.append(
                error_details_pb2.ResourceInfo(
                    resource_type=_clip(self.resource_type, MAX_FIELD_BYTES),
                    resource_name=_clip(self.resource_name or "", MAX_TEXT_BYTES),
                    description=_clip(message, MAX_TEXT_BYTES),
                )
            )
        details: list[Message] = [info]
        if self.violations:
            bad_request = error_details_pb2.BadRequest()
            budget = MAX_DETAILS_BYTES - sum(detail.ByteSize() for detail in (info, *later))
            for violation in self.violations:
                bounded = error_details_pb2.BadRequest.FieldViolation(
                    field=_clip(violation.field, MAX_FIELD_BYTES),
                    description=_clip(violation.description, MAX_TEXT_BYTES),
                )
                # The first violation always goes: an INVALID_ARGUMENT names a field.
                if bad_request.field_violations and bounded.ByteSize() + 4 > budget:
                    break
                bad_request.field_violations.append(bounded)
                budget -= bounded.ByteSize() + 4
            left_out = len(self.violations) - len(bad_request.field_violations)
            if left_out:
                note = f" ({left_out} more field violations left out.)"
                message = _clip(self.message, MAX_MESSAGE_BYTES - len(note)) + note
            details.append(bad_request)
        packed = []
        for detail in (*details, *later):
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(code=self.code.value[0], message=message, details=packed)


def invalid_argument(
    message: str,
    *violations: FieldViolation,
    reason: str = "INVALID_ARGUMENT",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    return AudienceError(
        grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata=metadata, violations=violations
    )


def not_found(
    resource_type: str,
    name: str,
    *,
    message: str | None = None,
    reason: str = "NOT_FOUND",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    """A resource does not exist; ``resource_type`` is e.g. ``audience.dev/Segment``."""
    return AudienceError(
        grpc.StatusCode.NOT_FOUND,
        reason,
        message or f"{resource_type} {name!r} not found.",
        metadata={"resource_type": resource_type, "resource_name": name, **(metadata or {})},
        resource_type=resource_type,
        resource_name=name,
    )


def already_exists(
    resource_type: str,
    name: str,
    *,
    message: str | None = None,
    reason: str = "ALREADY_EXISTS",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    return AudienceError(
        grpc.StatusCode.ALREADY_EXISTS,
        reason,
        message or f"{resource_type} {name!r} already exists.",
        metadata={"resource_type": resource_type, "resource_name": name, **(metadata or {})},
        resource_type=resource_type,
        resource_name=name,
    )


def aborted(
    message: str, *, reason: str = "ABORTED", metadata: Mapping[str, str] | None = None
) -> AudienceError:
    """A concurrent change won, e.g. a stale ``etag``; the client re-reads and retries."""
    return AudienceError(grpc.StatusCode.ABORTED, reason, message, metadata=metadata)


def failed_precondition(
    message: str,
    *violations: FieldViolation,
    reason: str = "FAILED_PRECONDITION",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    return AudienceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        reason,
        message,
        metadata=metadata,
        violations=violations,
    )


def out_of_range(
    message: str,
    *violations: FieldViolation,
    reason: str = "OUT_OF_RANGE",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    return AudienceError(
        grpc.StatusCode.OUT_OF_RANGE, reason, message, metadata=metadata, violations=violations
    )


def resource_exhausted(
    message: str,
    retry_after: timedelta | None = None,
    *,
    reason: str = "RESOURCE_EXHAUSTED",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    return AudienceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        reason,
        message,
        metadata=metadata,
        retry_delay=retry_after,
    )


def permission_denied(
    message: str,
    *,
    reason: str = "PERMISSION_DENIED",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    return AudienceError(grpc.StatusCode.PERMISSION_DENIED, reason, message, metadata=metadata)


def unauthenticated(
    message: str, *, reason: str = "UNAUTHENTICATED", metadata: Mapping[str, str] | None = None
) -> AudienceError:
    return AudienceError(grpc.StatusCode.UNAUTHENTICATED, reason, message, metadata=metadata)


def unavailable(
    message: str,
    retry_after: timedelta | None = None,
    *,
    reason: str = "UNAVAILABLE",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    return AudienceError(
        grpc.StatusCode.UNAVAILABLE, reason, message, metadata=metadata, retry_delay=retry_after
    )


def internal(
    message: str = _INTERNAL_MESSAGE,
    *,
    reason: str = "INTERNAL",
    metadata: Mapping[str, str] | None = None,
) -> AudienceError:
    return AudienceError(grpc.StatusCode.INTERNAL, reason, message, metadata=metadata)


async def _abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> NoReturn:
    grpc_status = rpc_status.to_status(status)
    # context.abort rather than abort_with_status: the tracing interceptor wraps the context
    # and records the span's status only in abort; abort_with_status bypasses the wrapper.
    await context.abort(grpc_status.code, grpc_status.details, grpc_status.trailing_metadata)
    raise AssertionError("context.abort returned")


# What a connection to PostgreSQL or Redis raises while the server is out of reach or not
# taking work (a query the server cancelled, SQLSTATE 57014, is not among them).
_OUTAGES: tuple[type[BaseException], ...] = (
    ConnectionError,
    *SERVER_GONE,
    redis_exceptions.ConnectionError,
    redis_exceptions.TimeoutError,
)
_OUTAGE_RETRY = timedelta(seconds=1)


def _outage(error: BaseException) -> BaseException | None:
    """The connection failure that ``error`` is, or was raised from."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, _OUTAGES):
            return cause
        cause = cause.__cause__
    return None


async def _abort_for(context: grpc.aio.ServicerContext, method: str, error: Exception) -> NoReturn:
    if isinstance(error, AudienceError):
        await _abort(context, error.to_status())
    outage = _outage(error)
    if outage is not None:
        _log.warning("%s failed: a backend is out of reach: %r", method, outage)
        await _abort(
            context,
            unavailable(
                "A server this service depends on is out of reach; retry.",
                _OUTAGE_RETRY,
                reason="BACKEND_UNAVAILABLE",
            ).to_status(),
        )
    # The client sees a fixed message: exception text may hold data or internals.
    _log.error("Unhandled exception in %s", method, exc_info=error)
    await _abort(context, internal().to_status())


Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
"""A handler's behaviour: ``async def (request or request iterator, context)``."""


# --- requests that do not parse ------------------------------------------------------------

_MAX_BLAME_DEPTH = 6
"""How deep a field path names the part of a malformed request that failed."""


@dataclass(frozen=True)
class _Malformed:
    """Stands in for a request message that did not parse, so that the guard can refuse
    the call with a rich status (a deserializer that raises makes gRPC answer UNKNOWN with
    the parser's text)."""

    error: AudienceError


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[position]
        result |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return result, position
        shift += 7


def _length_delimited(data: bytes) -> list[tuple[int, bytes]]:
    """The (field number, payload) of the length-delimited fields at the top of ``data``;
    raises ValueError when the framing itself is broken."""
    found: list[tuple[int, bytes]] = []
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError("truncated field")
            found.append((number, data[position : position + length]))
            position += length
        else:
            raise ValueError(f"wire type {wire_type}")
    if position > len(data):
        raise ValueError("truncated field")
    return found


_NOT_UTF8 = "is not valid UTF-8"
_NOT_PARSED = "does not parse: nested deeper than 100 levels, or a broken wire format"


def _blame(
    message_type: descriptor.Descriptor, data: bytes, path: str, depth: int
) -> tuple[str, str]:
    """The path of the field of ``data`` that fails to parse, as deep as can be told, and
    what is wrong with it."""
    try:
        fields = _length_delimited(data)
    except ValueError:
        return path, _NOT_PARSED
    seen: dict[int, int] = {}
    # Each part may parse alone yet the whole not: protobuf counts nesting from the top.
    nested = path
    for number, payload in fields:
        fd = message_type.fields_by_number.get(number)
        index = seen.get(number, 0)
        seen[number] = index + 1
        if fd is None:
            continue
        inner = fd.message_type
        here = f"{path}.{fd.name}" if path else fd.name
        if fd.is_repeated and not (inner is not None and inner.GetOptions().map_entry):
            here = f"{here}[{index}]"
        if fd.type == fd.TYPE_STRING:
            try:
                payload.decode()
            except UnicodeDecodeError:
                return here, _NOT_UTF8
        elif inner is not None:
            if nested == path:
                nested = here
            try:
                GetMessageClass(inner).FromString(payload)
            except DecodeError:
                if depth >= _MAX_BLAME_DEPTH:
                    return here, _NOT_PARSED
                return _blame(inner, payload, here, depth + 1)
    return nested, _NOT_PARSED


def malformed_request(message_type: descriptor.Descriptor, data: bytes) -> AudienceError:
    """The error for request bytes that do not parse as ``message_type``: the field that
    fails, when one can be told."""
    where, description = _blame(message_type, data, "", 0)
    if not where:
        return invalid_argument(
            f"The request is not a valid {message_type.full_name}: it {description}.",
            reason="MALFORMED_REQUEST",
        )
    return invalid_argument(
        f"The request is not a valid {message_type.full_name}: {where} {description}.",
        FieldViolation(where, description),
        reason="MALFORMED_REQUEST",
    )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    message_class = getattr(deserializer, "__self__", None)
    if deserializer is None or not (
        isinstance(message_class, type) and issubclass(message_class, Message)
    ):
        return deserializer
    message_type = cast(descriptor.Descriptor, message_class.DESCRIPTOR)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Malformed(malformed_request(message_type, data))

    return deserialize


async def _parsed(
    requests: AsyncIterator[Any], refusals: list[AudienceError]
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            refusals.append(request.error)
            raise request.error
        yield request


def _outcome(error: Exception, refusals: list[AudienceError]) -> Exception:
    # A handler saw a malformed message only as its request stream failing; whatever it
    # made of that, the client learns why.
    return refusals[0] if refusals else error


def _guard(behavior: Behavior, method: str, streaming_requests: bool) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            refusals: list[AudienceError] = []
            try:
                if streaming_requests:
                    request = _parsed(request, refusals)
                elif isinstance(request, _Malformed):
                    raise request.error
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort_for(context, method, _outcome(error, refusals))
            if refusals:
                await _abort_for(context, method, refusals[0])

        return guarded_stream

    if inspect.iscoroutinefunction(behavior):

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refusals: list[AudienceError] = []
            try:
                if streaming_requests:
                    request = _parsed(request, refusals)
                elif isinstance(request, _Malformed):
                    raise request.error
                result = await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort_for(context, method, _outcome(error, refusals))
            if refusals:
                await _abort_for(context, method, refusals[0])
            return result

        return guarded

    # A plain function runs in grpc's thread pool, where the aio context cannot abort.
    return behavior


def wrap_handler(
    handler: grpc.RpcMethodHandler | None,
    wrap: Callable[[Behavior], Behavior],
    *,
    wrap_deserializer: Callable[
        [Callable[[bytes], Any] | None], Callable[[bytes], Any] | None
    ] = lambda deserializer: deserializer,
) -> grpc.RpcMethodHandler | None:
    """Returns ``handler`` with its behaviour replaced by ``wrap(behaviour)`` (and its
    request deserializer by ``wrap_deserializer(deserializer)``).

    For server interceptors that act around a call (this one, and authentication).
    """
    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    return factory(
        wrap(behavior),
        request_deserializer=wrap_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns :class:`AudienceError` into its rich status, anything else into INTERNAL, and
    a request that does not parse into INVALID_ARGUMENT (reason ``MALFORMED_REQUEST``)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        streaming_requests = bool(handler.request_streaming)
        return wrap_handler(
            handler,
            lambda behavior: _guard(behavior, method, streaming_requests),
            wrap_deserializer=_tolerant,
        )


@dataclass(frozen=True)
class DecodedError:
    """What a client learns from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str
    """The ``ErrorInfo`` reason; empty when the status came from gRPC itself (a deadline,
    a message too large) rather than from a service."""
    domain: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: tuple[FieldViolation, ...] = ()
    retry_delay: timedelta | None = None
    resource_type: str | None = None
    resource_name: str | None = None


def decode(error: grpc.RpcError) -> DecodedError:
    """Reads the rich status of a failed call (``grpc.aio.AioRpcError`` or a sync error)."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:
        # The details disagree with the call's own status (a proxy rewrote it): trust the call.
        status = None
    if status is None:
        return DecodedError(code=code, message=message, reason="", domain="")
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_delay: timedelta | None = None
    resource_type: str | None = None
    resource_name: str | None = None
    for detail in status.details:
        kind = detail.TypeName()
        if kind == error_details_pb2.ErrorInfo.DESCRIPTOR.full_name:
            info = error_details_pb2.ErrorInfo.FromString(detail.value)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif kind == error_details_pb2.BadRequest.DESCRIPTOR.full_name:
            bad_request = error_details_pb2.BadRequest.FromString(detail.value)
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
        elif kind == error_details_pb2.RetryInfo.DESCRIPTOR.full_name:
            retry = error_details_pb2.RetryInfo.FromString(detail.value)
            retry_delay = retry.retry_delay.ToTimedelta()
        elif kind == error_details_pb2.ResourceInfo.DESCRIPTOR.full_name:
            resource = error_details_pb2.ResourceInfo.FromString(detail.value)
            resource_type, resource_name = resource.resource_type, resource.resource_name
    return DecodedError(
        code=code,
        message=message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        violations=tuple(violations),
        retry_delay=retry_delay,
        resource_type=resource_type,
        resource_name=resource_name,
    )
