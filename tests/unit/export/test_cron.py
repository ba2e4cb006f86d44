"""Cron in a time zone: next runs across daylight saving changes."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from audience.errors import AudienceError
from services.export.domain.cron import next_run, validate_cron, validate_time_zone

PARIS = ZoneInfo("Europe/Paris")


def paris(year: int, month: int, day: int, hour: int, minute: int, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=PARIS, fold=fold)


def test_a_nightly_run_is_at_two_in_the_morning_local_time() -> None:
    after = paris(2024, 6, 10, 12, 0)

    assert next_run("0 2 * * *", "Europe/Paris", after) == paris(2024, 6, 11, 2, 0)


def test_the_next_run_is_strictly_after_the_given_instant() -> None:
    at = paris(2024, 6, 11, 2, 0)

    assert next_run("0 2 * * *", "Europe/Paris", at) == paris(2024, 6, 12, 2, 0)


def test_nightly_runs_keep_their_local_hour_across_the_spring_change() -> None:
    # 2024-03-31: Paris moves from UTC+1 to UTC+2 at 02:00 local.
    before = next_run("0 3 * * *", "Europe/Paris", paris(2024, 3, 29, 12, 0))
    after = next_run("0 3 * * *", "Europe/Paris", before)

    assert before.astimezone(UTC).hour == 2
    assert after.astimezone(UTC).hour == 1
    assert after.astimezone(PARIS).hour == 3


def test_a_time_skipped_by_the_spring_change_runs_at_the_change() -> None:
    run = next_run("30 2 * * *", "Europe/Paris", paris(2024, 3, 30, 12, 0))

    assert run == datetime(2024, 3, 31, 1, 0, tzinfo=UTC)
    assert run.astimezone(PARIS).replace(tzinfo=None) == datetime(2024, 3, 31, 3, 0)
    assert next_run("30 2 * * *", "Europe/Paris", run) == paris(2024, 4, 1, 2, 30)


def test_a_time_repeated_by_the_autumn_change_runs_once() -> None:
    # 2024-10-27: Paris goes back from 03:00 CEST to 02:00 CET; 02:30 happens twice.
    first = next_run("30 2 * * *", "Europe/Paris", paris(2024, 10, 26, 12, 0))
    second = next_run("30 2 * * *", "Europe/Paris", first)

    assert first == datetime(2024, 10, 27, 0, 30, tzinfo=UTC)
    assert second == paris(2024, 10, 28, 2, 30)


def test_a_start_inside_the_repeated_hour_does_not_run_it_again() -> None:
    inside = paris(2024, 10, 27, 2, 40, fold=1)

    assert next_run("*/15 * * * *", "Europe/Paris", inside) == paris(2024, 10, 27, 3, 0)


def test_utc_is_the_default_zone() -> None:
    run = next_run("15 4 * * 1", "", datetime(2024, 6, 10, 5, 0, tzinfo=UTC))

    assert run == datetime(2024, 6, 17, 4, 15, tzinfo=UTC)


@pytest.mark.parametrize("expression", ["", "0 2 * *", "0 0 2 * * *", "61 * * * *", "nightly"])
def test_expressions_other_than_five_valid_fields_are_refused(expression: str) -> None:
    with pytest.raises(AudienceError, match="five-field cron"):
        validate_cron(expression)


def test_extra_spaces_in_an_expression_are_normalized() -> None:
    assert validate_cron(" 0  2 * * * ") == "0 2 * * *"


def test_unknown_time_zones_are_refused() -> None:
    assert validate_time_zone("") == "UTC"
    assert validate_time_zone("America/New_York") == "America/New_York"
    with pytest.raises(AudienceError, match="IANA time zone"):
        validate_time_zone("Mars/Olympus")
    with pytest.raises(AudienceError, match="IANA time zone"):
        validate_time_zone("../etc/passwd")


@pytest.mark.parametrize("name", ["America", "a" * 300])
def test_names_the_file_system_cannot_open_as_a_zone_are_refused(name: str) -> None:
    with pytest.raises(AudienceError, match="IANA time zone"):
        validate_time_zone(name)
