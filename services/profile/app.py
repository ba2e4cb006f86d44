"""Composition root of the profile service."""

from __future__ import annotations

import functools
from importlib.resources import files

from audience.server import ServiceUnit
from audience.service import Resources, ServiceDefinition
from audience.v1 import profile_service_pb2_grpc


async def build(resources: Resources) -> ServiceUnit:
    return ServiceUnit(
        name="profile",
        service_names=("audience.v1.ProfileService",),
        add_to_server=functools.partial(
            profile_service_pb2_grpc.add_ProfileServiceServicer_to_server,
            profile_service_pb2_grpc.ProfileServiceServicer(),  # type: ignore[abstract]
        ),
    )


DEFINITION = ServiceDefinition(
    name="profile",
    schema="profile",
    migrations=files("services.profile") / "migrations",
    build=build,
)
