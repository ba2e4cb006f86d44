"""The profile service's schema keeps the rules package's evaluation schema to the letter."""

from __future__ import annotations

from importlib.resources import files

from audience.rules.sql import evaluation_schema_ddl
from audience.rules.view import EVALUATION_COLUMNS
from services.profile.store import EVALUATION_COLUMN_TYPES


def test_the_first_migration_opens_with_the_evaluation_schema_verbatim() -> None:
    first = (files("services.profile") / "migrations" / "0001_profiles.sql").read_text()
    assert first.startswith(evaluation_schema_ddl("profile"))


def test_every_evaluation_column_is_written_with_a_known_type() -> None:
    assert set(EVALUATION_COLUMNS) == set(EVALUATION_COLUMN_TYPES)
