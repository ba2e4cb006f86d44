"""Composition root of the ingest service."""

from __future__ import annotations

import functools
from importlib.resources import files

from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.v1 import ingest_service_pb2_grpc


async def build(resources: Resources) -> ServiceUnit:
    return ServiceUnit(
        name="ingest",
        service_names=("audience.v1.IngestService",),
        add_to_server=functools.partial(
            ingest_service_pb2_grpc.add_IngestServiceServicer_to_server,
            ingest_service_pb2_grpc.IngestServiceServicer(),  # type: ignore[abstract]
        ),
    )


DEFINITION = ServiceDefinition(
    name="ingest", schema="ingest", migrations=files("services.ingest") / "migrations", build=build
)
