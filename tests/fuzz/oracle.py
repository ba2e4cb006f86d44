"""Calling any RPC of the suite with generated requests, and judging the answer.

The oracle: every call ends within its deadline with a status a client can act on (never
INTERNAL, UNKNOWN, UNIMPLEMENTED or DEADLINE_EXCEEDED); a failure carries a
``google.rpc.Status`` with an ``ErrorInfo`` of the domain ``audience.dev``, and an
``INVALID_ARGUMENT`` a field violation naming a field of the request. The one status
without details is gRPC's own refusal of a request larger than the server's message
limit, which the caller can predict from the request's size.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor, text_format
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

import audience.v1
from audience.errors import DOMAIN, DecodedError, decode

__all__ = [
    "ALLOWED",
    "CALL_DEADLINE",
    "Outcome",
    "RawRequests",
    "Requests",
    "Rpc",
    "call",
    "every_rpc",
    "problems",
]

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
CALL_DEADLINE = 10.0
# A server stream is read this far, then cancelled: enough to see it work, bounded.
MAX_RESPONSES = 3
# A long-lived stream (a watch) that has sent nothing for this long is healthy and idle.
IDLE_SECONDS = 1.0
LONG_LIVED = frozenset({"audience.v1.MembershipService.WatchMembershipChanges"})

_FIELD_HEAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Rpc:
    """One method of a public service, with its message classes."""

    method: descriptor.MethodDescriptor

    @property
    def full_name(self) -> str:
        name: str = self.method.full_name
        return name

    @property
    def service(self) -> str:
        name: str = self.method.containing_service.full_name
        return name

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def request_class(self) -> type[Message]:
        return GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return GetMessageClass(self.method.output_type)

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)


def every_rpc() -> list[Rpc]:
    """Every method of every service in the ``audience.v1.*_service_pb2`` modules."""
    found: list[Rpc] = []
    for module_info in pkgutil.iter_modules(audience.v1.__path__):
        if not module_info.name.endswith("_service_pb2"):
            continue
        module = importlib.import_module(f"audience.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            found.extend(Rpc(method) for method in service.methods)
    return found


class Requests(tuple[Message, ...]):
    """The messages of one call, printed short: a fuzzed request may hold megabytes."""

    def __repr__(self) -> str:
        return "Requests(" + ", ".join(summary(message) for message in self) + ")"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints a failing example through this, rather than as the calls
        # that built it (which would print every message in full).
        printer.text(repr(self))


class RawRequests(tuple[bytes, ...]):
    """The encoded messages of one call, sent as they are, printed short."""

    def __repr__(self) -> str:
        return "RawRequests(" + ", ".join(repr(data[:200]) for data in self) + ")"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def summary(message: Message, limit: int = 600) -> str:
    try:
        text = text_format.MessageToString(message, as_one_line=True, print_unknown_fields=True)
    except DecodeError:
        # Printing a map entry copies it, which protobuf refuses past 100 levels of nesting.
        text = f"nested past 100 levels ({message.ByteSize():,} bytes)"
    if len(text) > limit:
        text = f"{text[:limit]}… ({message.ByteSize():,} bytes)"
    return f"{type(message).__name__}<{text}>"


@dataclass
class Outcome:
    """How a call ended."""

    code: grpc.StatusCode
    error: DecodedError | None = None
    responses: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def call(
    channel: grpc.Channel,
    rpc: Rpc,
    requests: Sequence[Message] | Sequence[bytes],
    metadata: Sequence[tuple[str, str | bytes]] = (),
) -> Outcome:
    """Makes one call: the first request for a unary request, all of them for a stream.
    Requests given as bytes are sent as they are.

    A blocking channel, called from a worker thread: the asyncio client can report
    INTERNAL for a request stream that the server ended early, instead of the server's
    status (grpc/grpc#36066), which would hide what the server said.
    """
    serialize: Callable[[Any], bytes] = (
        _as_is
        if requests and isinstance(requests[0], bytes)
        else rpc.request_class.SerializeToString
    )
    deserialize = rpc.response_class.FromString
    started = time.monotonic()
    outcome = Outcome(grpc.StatusCode.OK)
    md = tuple(metadata)
    cancelled = threading.Event()
    try:
        if rpc.client_streaming and rpc.server_streaming:
            stream = channel.stream_stream(rpc.path, serialize, deserialize)(
                iter(requests), timeout=CALL_DEADLINE, metadata=md
            )
            for _ in stream:
                outcome.responses += 1
        elif rpc.client_streaming:
            channel.stream_unary(rpc.path, serialize, deserialize)(
                iter(requests), timeout=CALL_DEADLINE, metadata=md
            )
        elif rpc.server_streaming:
            stream = channel.unary_stream(rpc.path, serialize, deserialize)(
                requests[0], timeout=CALL_DEADLINE, metadata=md
            )
            _read_bounded(stream, rpc, outcome, cancelled)
        else:
            channel.unary_unary(rpc.path, serialize, deserialize)(
                requests[0], timeout=CALL_DEADLINE, metadata=md
            )
    except grpc.RpcError as error:
        if not (cancelled.is_set() and error.code() == grpc.StatusCode.CANCELLED):
            outcome.code = error.code()
            outcome.error = decode(error)
    outcome.seconds = time.monotonic() - started
    return outcome


def _as_is(data: bytes) -> bytes:
    return data


def _read_bounded(stream: Any, rpc: Rpc, outcome: Outcome, cancelled: threading.Event) -> None:
    def cancel(why: str) -> None:
        cancelled.set()
        outcome.notes.append(why)
        stream.cancel()

    # A watch that has sent nothing for a while is idle, not hung: stop waiting.
    idle = (
        threading.Timer(IDLE_SECONDS, cancel, ("idle, cancelled",))
        if rpc.full_name in LONG_LIVED
        else None
    )
    if idle is not None:
        idle.start()
    try:
        # A watch has shown it works with its first message.
        bound = 1 if idle is not None else MAX_RESPONSES
        for _ in stream:
            outcome.responses += 1
            if outcome.responses >= bound:
                if idle is not None:
                    idle.cancel()
                cancel(f"cancelled after {bound} responses")
                break
    finally:
        if idle is not None:
            idle.cancel()


def _field_names(rpc: Rpc) -> set[str]:
    return {fd.name for fd in rpc.method.input_type.fields}


def _size(request: Message | bytes) -> int:
    return len(request) if isinstance(request, bytes) else request.ByteSize()


def problems(
    rpc: Rpc,
    requests: Sequence[Message] | Sequence[bytes],
    outcome: Outcome,
    max_message_bytes: int,
) -> list[str]:
    """What is wrong with how the call ended; empty when the oracle holds.

    A request that does not parse is refused naming the field that failed, or, when no
    field can be blamed (the framing itself is broken), with no field violation.
    """
    found: list[str] = []
    code, error = outcome.code, outcome.error
    if code == grpc.StatusCode.OK:
        return found
    assert error is not None
    said = f"{code.name} {error.reason or '(no reason)'}: {error.message[:300]!r}"
    if code not in ALLOWED:
        found.append(f"status {said}")
        return found
    too_large = any(_size(request) > max_message_bytes for request in requests)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and too_large and not error.reason:
        # gRPC refused the message before any handler saw it, as the limit says.
        return found
    if not error.reason or error.domain != DOMAIN:
        found.append(f"no ErrorInfo of domain {DOMAIN!r}: {said}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if not error.violations and error.reason != "MALFORMED_REQUEST":
            found.append(f"INVALID_ARGUMENT without a field violation: {said}")
        fields = _field_names(rpc)
        for violation in error.violations:
            head = _FIELD_HEAD.match(violation.field)
            if head is None or head.group() not in fields:
                found.append(
                    f"field violation {violation.field!r} names no field of "
                    f"{rpc.method.input_type.name} ({sorted(fields)}): {said}"
                )
    return found
