"""Runs the segment_engine service alone: ``python -m services.segment_engine``."""

from audience.service import run_alone
from services.segment_engine.app import DEFINITION

if __name__ == "__main__":
    run_alone(DEFINITION)
