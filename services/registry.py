"""Every service of the suite, in the order a host starts them."""

from __future__ import annotations

from audience.service import ServiceDefinition
from services.export.app import DEFINITION as EXPORT
from services.ingest.app import DEFINITION as INGEST
from services.profile.app import DEFINITION as PROFILE
from services.segment_engine.app import DEFINITION as SEGMENT_ENGINE

SERVICES: tuple[ServiceDefinition, ...] = (INGEST, PROFILE, SEGMENT_ENGINE, EXPORT)
