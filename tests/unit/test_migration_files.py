"""Checks on a service's migration directory made before any database is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from audience.db import MigrationError, load_migrations


def write(directory: Path, *names: str) -> Path:
    for name in names:
        (directory / name).write_text(f"-- {name}\n")
    return directory


def test_migrations_are_ordered_by_version_and_other_files_ignored(tmp_path: Path) -> None:
    write(tmp_path, "0002_b.sql", "0001_a.sql", "__init__.py", "README.md")

    migrations = load_migrations(tmp_path)

    assert [(m.version, m.name) for m in migrations] == [(1, "0001_a.sql"), (2, "0002_b.sql")]
    assert migrations[0].sql == "-- 0001_a.sql\n"
    assert len(migrations[0].checksum) == 64


def test_a_gap_in_versions_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "0003_c.sql")

    with pytest.raises(MigrationError, match=r"0003_c\.sql .*should be version 0002"):
        load_migrations(tmp_path)


def test_versions_start_at_one(tmp_path: Path) -> None:
    write(tmp_path, "0000_zero.sql")

    with pytest.raises(MigrationError, match=r"0000_zero\.sql .*should be version 0001"):
        load_migrations(tmp_path)


def test_a_repeated_version_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "0002_b.sql", "0002_c.sql")

    with pytest.raises(MigrationError, match=r"0002_b\.sql and 0002_c\.sql .*share version 2"):
        load_migrations(tmp_path)


@pytest.mark.parametrize("name", ["1_short.sql", "0001-dash.sql", "0001_Upper.sql", "0001_.sql"])
def test_a_malformed_file_name_is_refused(tmp_path: Path, name: str) -> None:
    write(tmp_path, name)

    with pytest.raises(MigrationError, match=r"NNNN_description\.sql"):
        load_migrations(tmp_path)


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        load_migrations(tmp_path / "nowhere")
