"""Five-field cron expressions evaluated on a time zone's wall clock, DST included.

Each wall-clock time the expression matches runs once:

- a time skipped by a spring-forward change (02:30 on the night clocks jump from 02:00 to
  03:00) runs at the change itself, the first instant after it;
- a time repeated by a fall-back change runs at its first occurrence only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from audience.errors import FieldViolation, invalid_argument

__all__ = ["next_run", "validate_cron", "validate_time_zone", "zone"]

# Wider than any DST shift in the tz database, so a start inside a repeated hour still sees
# the wall times of the first occurrence.
_LOOKBACK = timedelta(hours=3)
_MAX_STEPS = 100_000
_MAX_EXPRESSION = 256


def validate_cron(expression: str, field: str = "cron") -> str:
    expression = " ".join(expression.split())
    if (
        len(expression) > _MAX_EXPRESSION
        or len(expression.split(" ")) != 5
        or not croniter.is_valid(expression)
    ):
        description = (
            "a five-field cron expression (minute hour day-of-month month day-of-week), "
            f"such as '0 2 * * *'; got {expression!r}"
        )
        raise invalid_argument(f"{field}: {description}", FieldViolation(field, description))
    return expression


def validate_time_zone(name: str, field: str = "time_zone") -> str:
    """Returns the zone name, ``UTC`` for empty; rejects names the tz database lacks."""
    if not name:
        return "UTC"
    try:
        ZoneInfo(name)
    # A name the database lacks, one outside it, or one the file system cannot open (a
    # folder of zones such as "America", a name too long for a file).
    except (ZoneInfoNotFoundError, ValueError, OSError):
        description = f"an IANA time zone such as Europe/Paris; got {name!r}"
        raise invalid_argument(
            f"{field}: {description}", FieldViolation(field, description)
        ) from None
    return name


def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name or "UTC")


def _first_instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The first instant at which the clock of ``tz`` reads ``wall`` or later."""
    early = wall.replace(tzinfo=tz, fold=0)
    if early.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall:
        return early.astimezone(UTC)
    # ``wall`` falls in a gap. PEP 495 maps it with the offset before the change, which lands
    # as far past the change as ``wall`` is past the gap's start; find the change instead.
    low = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = early.astimezone(UTC)
    if low > high:
        low, high = high, low
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)


def next_run(expression: str, time_zone: str, after: datetime) -> datetime:
    """The first run of ``expression`` strictly after ``after`` (aware), in UTC."""
    tz = zone(time_zone)
    start = after.astimezone(tz).replace(tzinfo=None) - _LOOKBACK
    walls = croniter(expression, start)
    for _ in range(_MAX_STEPS):
        wall: datetime = walls.get_next(datetime)
        instant = _first_instant(wall, tz)
        if instant > after:
            return instant
    raise ValueError(f"cron {expression!r} has no run after {after.isoformat()}")
