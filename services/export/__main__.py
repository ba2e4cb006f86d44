"""Runs the export service alone: ``python -m services.export``."""

from audience.service import run_alone
from services.export.app import DEFINITION

if __name__ == "__main__":
    run_alone(DEFINITION)
