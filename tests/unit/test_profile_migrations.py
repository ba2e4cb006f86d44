"""The profile service writes every column of the rules package's evaluation schema.

That its migrations give that schema, column for column, is checked on PostgreSQL
(tests/integration/test_profile_schema.py).
"""

from __future__ import annotations

from audience.rules.view import EVALUATION_COLUMNS
from services.profile.store import EVALUATION_COLUMN_TYPES


def test_every_evaluation_column_is_written_with_a_known_type() -> None:
    assert set(EVALUATION_COLUMNS) == set(EVALUATION_COLUMN_TYPES)
