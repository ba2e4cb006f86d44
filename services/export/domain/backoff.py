"""Exponential backoff with jitter, for upload and webhook retries."""

from __future__ import annotations

from datetime import timedelta

__all__ = ["backoff"]


def backoff(attempt: int, base: timedelta, cap: timedelta, jitter: float) -> timedelta:
    """The wait after failed attempt number ``attempt`` (from 1): ``base`` doubled per
    attempt, at most ``cap``, scaled into its upper half by ``jitter`` (0 to 1) so that
    receivers that failed together are not retried together.
    """
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter is from 0 to 1, got {jitter}")
    # Capped before multiplying: 2**attempt overflows timedelta long before it matters.
    delay = min(cap, base * (1 << min(attempt - 1, 40)))
    return delay * (0.5 + jitter / 2)
