"""Runs the ingest service alone: ``python -m services.ingest``."""

from audience.service import run_alone
from services.ingest.app import DEFINITION

if __name__ == "__main__":
    run_alone(DEFINITION)
