"""The ``audience`` command: run the suite and talk to it."""

from __future__ import annotations

from audience.cli.main import main

__all__ = ["main"]
