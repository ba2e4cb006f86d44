"""Test doubles for authentication and TLS: stand-in services on the real generated bases,
keys, a host that requires them, and certificates made on the spot.

The stand-ins implement only the RPCs the tests call; the others answer UNIMPLEMENTED from
the generated base classes (hence the ``abstract`` ignores).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from audience import errors
from audience.auth import hash_api_key
from audience.config import CommonConfig
from audience.security import Security
from audience.server import Host, ServiceUnit
from audience.v1 import (
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    membership_service_pb2,
    membership_service_pb2_grpc,
    segment_pb2,
    segment_service_pb2,
    segment_service_pb2_grpc,
)

SHOP_WRITER = "aud_shop-writer-0123456789abcdefghijklmnopqrstuv"
SHOP_READER = "aud_shop-reader-0123456789abcdefghijklmnopqrstuv"
ADMIN = "aud_admin-every-dataset-0123456789abcdefghijklmnop"
INTERNAL = "aud_internal-0123456789abcdefghijklmnopqrstuvwxyz"

API_KEYS = json.dumps(
    [
        {
            "name": "shop-writer",
            "sha256": hash_api_key(SHOP_WRITER),
            "datasets": ["shop"],
            "scopes": ["read", "write"],
        },
        {
            "name": "shop-reader",
            "sha256": hash_api_key(SHOP_READER),
            "datasets": ["shop"],
            "scopes": ["read"],
        },
        {"name": "admin", "sha256": hash_api_key(ADMIN), "datasets": ["*"], "scopes": ["admin"]},
        {
            "name": "internal",
            "sha256": hash_api_key(INTERNAL),
            "datasets": ["*"],
            "scopes": ["read", "write"],
        },
    ]
)

AUTH_ENVIRONMENT = {"AUDIENCE_API_KEYS": API_KEYS, "AUDIENCE_INTERNAL_API_KEY": INTERNAL}


@dataclass
class Seen:
    """What the stand-in handlers received, to show refused requests never reach them."""

    requests: list[Any] = field(default_factory=list)


class Ingest(ingest_service_pb2_grpc.IngestServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def SendEvent(  # noqa: N802
        self, request: ingest_service_pb2.SendEventRequest, context: grpc.aio.ServicerContext
    ) -> ingest_service_pb2.SendEventResponse:
        self.seen.requests.append(request)
        return ingest_service_pb2.SendEventResponse()

    async def StreamEvents(  # noqa: N802
        self,
        request_iterator: AsyncIterator[ingest_service_pb2.StreamEventsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_service_pb2.StreamEventsResponse]:
        async for request in request_iterator:
            self.seen.requests.append(request)
            yield ingest_service_pb2.StreamEventsResponse(
                results=[
                    ingest_service_pb2.EventResult(event_id=e.event_id) for e in request.events
                ]
            )


class Memberships(membership_service_pb2_grpc.MembershipServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def WatchMembershipChanges(  # noqa: N802
        self,
        request: membership_service_pb2.WatchMembershipChangesRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[membership_service_pb2.WatchMembershipChangesResponse]:
        self.seen.requests.append(request)
        for token in ("t1", "t2"):
            yield membership_service_pb2.WatchMembershipChangesResponse(
                heartbeat=membership_service_pb2.Heartbeat(resume_token=token)
            )


class Segments(segment_service_pb2_grpc.SegmentServiceServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def GetSegment(  # noqa: N802
        self, request: segment_service_pb2.GetSegmentRequest, context: grpc.aio.ServicerContext
    ) -> segment_service_pb2.GetSegmentResponse:
        self.seen.requests.append(request)
        return segment_service_pb2.GetSegmentResponse(
            segment=segment_pb2.Segment(name=request.name, display_name="From the stand-in")
        )

    async def DeleteSegment(  # noqa: N802
        self, request: segment_service_pb2.DeleteSegmentRequest, context: grpc.aio.ServicerContext
    ) -> segment_service_pb2.DeleteSegmentResponse:
        self.seen.requests.append(request)
        return segment_service_pb2.DeleteSegmentResponse()

    async def ImportSegmentMembers(  # noqa: N802
        self,
        request_iterator: AsyncIterator[segment_service_pb2.ImportSegmentMembersRequest],
        context: grpc.aio.ServicerContext,
    ) -> segment_service_pb2.ImportSegmentMembersResponse:
        # Careless on purpose: a failing request stream ends the upload as if it were
        # complete. The refusal must reach the client all the same.
        try:
            async for request in request_iterator:
                self.seen.requests.append(request)
        except errors.AudienceError:
            pass
        return segment_service_pb2.ImportSegmentMembersResponse(
            joined_count=len(self.seen.requests)
        )


def _add_segments(seen: Seen) -> Callable[[grpc.aio.Server], None]:
    def add(server: grpc.aio.Server) -> None:
        segment_service_pb2_grpc.add_SegmentServiceServicer_to_server(
            Segments(seen),  # type: ignore[abstract]
            server,
        )
        membership_service_pb2_grpc.add_MembershipServiceServicer_to_server(
            Memberships(seen),  # type: ignore[abstract]
            server,
        )

    return add


def units(seen: Seen) -> list[ServiceUnit]:
    return [
        ServiceUnit(
            "ingest",
            ("audience.v1.IngestService",),
            functools.partial(
                ingest_service_pb2_grpc.add_IngestServiceServicer_to_server,
                Ingest(seen),  # type: ignore[abstract]
            ),
        ),
        ServiceUnit(
            "segments",
            ("audience.v1.SegmentService", "audience.v1.MembershipService"),
            _add_segments(seen),
        ),
    ]


@asynccontextmanager
async def secured_host(
    environ: Mapping[str, str], seen: Seen | None = None
) -> AsyncIterator[tuple[Host, Security]]:
    """A host of the stand-ins, secured as ``environ`` says (keys, TLS), on a free port."""
    settings = {"AUDIENCE_LISTEN": "127.0.0.1:0", "AUDIENCE_SHUTDOWN_GRACE": "0s", **environ}
    common = CommonConfig.from_env(settings)
    security = Security.from_env(settings, common, embedded=False)
    hosted = units(seen or Seen())
    services = [name for unit in hosted for name in unit.service_names]
    async with Host(
        hosted,
        common,
        interceptors=security.server_interceptors(services),
        credentials=security.server_credentials(),
    ) as host:
        yield host, security


# --- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    """A CA that signs certificates for a test."""

    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, certificate)

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}-ca.pem"
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(
        self, directory: Path, name: str, *, hosts: tuple[str, ...] = (), client: bool = False
    ) -> tuple[Path, Path]:
        """Signs a server certificate for ``hosts`` (or a client certificate); returns the
        certificate and key files."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([usage]),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        cert_path = directory / f"{name}.pem"
        key_path = directory / f"{name}-key.pem"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path
