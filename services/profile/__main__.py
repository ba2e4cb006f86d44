"""Runs the profile service alone: ``python -m services.profile``."""

from audience.service import run_alone
from services.profile.app import DEFINITION

if __name__ == "__main__":
    run_alone(DEFINITION)
