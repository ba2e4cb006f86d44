"""Composition root of the export service."""

from __future__ import annotations

import functools
from importlib.resources import files

from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.v1 import export_service_pb2_grpc


async def build(resources: Resources) -> ServiceUnit:
    return ServiceUnit(
        name="export",
        service_names=("audience.v1.ExportService",),
        add_to_server=functools.partial(
            export_service_pb2_grpc.add_ExportServiceServicer_to_server,
            export_service_pb2_grpc.ExportServiceServicer(),  # type: ignore[abstract]
        ),
    )


DEFINITION = ServiceDefinition(
    name="export", schema="export", migrations=files("services.export") / "migrations", build=build
)
