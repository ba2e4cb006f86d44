"""SQL fragments shared by the stores.

Instants cross the wire as bigint microseconds since the epoch and are converted in SQL,
exactly: the pool is shared with other services, so no type codec is changed on it.
"""

from __future__ import annotations

__all__ = ["DEADLOCK_RETRIES", "from_micros", "micros"]

DEADLOCK_RETRIES = 5
"""How many times a transaction that lost a deadlock (or a serialisation) is run again."""


def from_micros(expression: str) -> str:
    """SQL turning bigint microseconds into a timestamptz."""
    return f"(timestamptz 'epoch' + ({expression}) * interval '1 microsecond')"


def micros(expression: str) -> str:
    """SQL turning a timestamptz into bigint microseconds since the epoch."""
    return f"(extract(epoch FROM {expression}) * 1000000)::bigint"
