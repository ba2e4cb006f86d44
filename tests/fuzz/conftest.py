"""The suite the fuzz tests call: the end-to-end tests' own, authentication on."""

from __future__ import annotations

from tests.e2e.conftest import start_suite

__all__ = ["start_suite"]
