"""Composition root of the segment engine."""

from __future__ import annotations

from importlib.resources import files

import grpc.aio

from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.v1 import membership_service_pb2_grpc, segment_service_pb2_grpc


def _add_servicers(server: grpc.aio.Server) -> None:
    segment_service_pb2_grpc.add_SegmentServiceServicer_to_server(
        segment_service_pb2_grpc.SegmentServiceServicer(),  # type: ignore[abstract]
        server,
    )
    membership_service_pb2_grpc.add_MembershipServiceServicer_to_server(
        membership_service_pb2_grpc.MembershipServiceServicer(),  # type: ignore[abstract]
        server,
    )


async def build(resources: Resources) -> ServiceUnit:
    return ServiceUnit(
        name="segment_engine",
        service_names=("audience.v1.SegmentService", "audience.v1.MembershipService"),
        add_to_server=_add_servicers,
    )


DEFINITION = ServiceDefinition(
    name="segment_engine",
    schema="segment_engine",
    migrations=files("services.segment_engine") / "migrations",
    build=build,
)
