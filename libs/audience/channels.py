"""The one way to open a client channel: to another service, or from the CLI.

A channel gets the address, TLS when configured, the caller's API key on every call
(``authorization: Bearer <key>``), the telemetry interceptors, and the same message limit
and keepalive as the servers, so neither side refuses the other's messages or pings::

    channel = resources.channels.open(config.profile_address)   # in a service's build()
    stub = profile_service_pb2_grpc.ProfileServiceStub(channel)

The key is added by a client interceptor rather than call credentials: gRPC sends call
credentials only over TLS, and plaintext stays possible inside a trusted network.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio

from audience.auth import INTERNAL_KEY_VARIABLE
from audience.config import Address, CommonConfig, Env, Keepalive
from audience.telemetry import Telemetry
from audience.tls import ClientTls

__all__ = ["ChannelSettings", "Channels", "api_key_interceptors", "open_channel"]


def _milliseconds(duration: timedelta) -> int:
    return round(duration.total_seconds() * 1000)


@dataclass(frozen=True)
class ChannelSettings:
    """How one caller reaches the servers."""

    api_key: str | None = field(repr=False)
    """Sent on every call; ``None`` sends none."""
    tls: ClientTls | None
    """``None`` connects in plaintext."""
    max_message_bytes: int
    keepalive: Keepalive

    @classmethod
    def from_env(cls, environ: Mapping[str, str], common: CommonConfig) -> ChannelSettings:
        """A service's settings: its internal key, client TLS and the common limits."""
        return cls(
            api_key=Env(environ).optional_string(INTERNAL_KEY_VARIABLE),
            tls=ClientTls.from_env(environ),
            max_message_bytes=common.max_message_bytes,
            keepalive=common.keepalive,
        )

    def options(self) -> list[tuple[str, int | str]]:
        keepalive = self.keepalive
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # Never ping more often than the server accepts, or it answers GOAWAY.
            (
                "grpc.keepalive_time_ms",
                _milliseconds(max(keepalive.time, keepalive.min_ping_interval)),
            ),
            ("grpc.keepalive_timeout_ms", _milliseconds(keepalive.timeout)),
            ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self.tls is not None:
            options.extend(self.tls.options())
        return options


def _with_key(details: grpc.aio.ClientCallDetails, header: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(
        *((key, value) for key, value in (details.metadata or ()) if key != "authorization")
    )
    metadata.add("authorization", header)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        self._header = header

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_key(details, self._header), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        self._header = header

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_key(details, self._header), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        self._header = header

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        details: grpc.aio.ClientCallDetails,
        requests: Iterable[Any] | AsyncIterable[Any],
    ) -> Any:
        return await continuation(_with_key(details, self._header), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        self._header = header

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        details: grpc.aio.ClientCallDetails,
        requests: Iterable[Any] | AsyncIterable[Any],
    ) -> Any:
        return await continuation(_with_key(details, self._header), requests)


def api_key_interceptors(api_key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that send ``api_key`` on every call, one per kind of RPC (a ``grpc.aio``
    channel files each interceptor under one kind only)."""
    header = f"Bearer {api_key}"
    return [_UnaryUnary(header), _UnaryStream(header), _StreamUnary(header), _StreamStream(header)]


def open_channel(
    target: str | Address,
    settings: ChannelSettings,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """Opens a channel to ``target`` (``host:port`` or any gRPC target string).

    Args:
        interceptors: run before the API key is added (tracing, for instance).
    """
    chain = [*interceptors]
    if settings.api_key is not None:
        chain.extend(api_key_interceptors(settings.api_key))
    if settings.tls is None:
        return grpc.aio.insecure_channel(
            str(target), options=settings.options(), interceptors=chain or None
        )
    return grpc.aio.secure_channel(
        str(target),
        settings.tls.credentials(),
        options=settings.options(),
        interceptors=chain or None,
    )


class Channels:
    """Opens channels with one process's settings and telemetry (``Resources.channels``)."""

    def __init__(self, settings: ChannelSettings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self._telemetry = telemetry

    def open(self, target: str | Address) -> grpc.aio.Channel:
        """Opens a channel to ``target``; the caller closes it."""
        interceptors = self._telemetry.client_interceptors() if self._telemetry else []
        return open_channel(target, self.settings, interceptors=interceptors)
