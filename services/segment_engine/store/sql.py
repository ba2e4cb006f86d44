"""SQL fragments shared by the stores.

Instants cross the wire as bigint microseconds since the epoch and are converted in SQL,
exactly: the pool is shared with other services, so no type codec is changed on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

__all__ = ["DEADLOCK_RETRIES", "from_micros", "micros", "transaction"]

DEADLOCK_RETRIES = 5
"""How many times a transaction that lost a deadlock (or a serialisation) is run again."""


def from_micros(expression: str) -> str:
    """SQL turning bigint microseconds into a timestamptz."""
    return f"(timestamptz 'epoch' + ({expression}) * interval '1 microsecond')"


def micros(expression: str) -> str:
    """SQL turning a timestamptz into bigint microseconds since the epoch."""
    return f"(extract(epoch FROM {expression}) * 1000000)::bigint"


@contextlib.asynccontextmanager
async def transaction(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction whose statements are planned for the values they are given, with the
    engine's rows costed as the cached rows they are.

    asyncpg prepares every statement; after a few runs PostgreSQL may keep a generic plan,
    costed when it was made. The engine's tables grow from nothing (a new dataset, a
    backfill) and its statements take arrays of ids: a generic plan made while a table was
    tiny keeps scanning it whole as it grows. Custom plans cost a little planning and
    never do that.

    At the default ``random_page_cost`` (4, pages on spinning disks), PostgreSQL joins a
    few hundred keys to a table of tens of thousands of rows by hashing the whole table:
    reading the memberships and timers of 300 subjects took 26-35 ms that way against
    5-6 ms by index, and the read was the engine's costliest statement in ``bench.e2e``.
    At 1.1 (the usual value for memory and SSDs) it looks keys up by index, and still
    hashes where that is cheaper (thousands of keys). ``SET LOCAL`` rides with ``BEGIN``
    in one round trip, and holds for this transaction only.
    """
    await conn.execute(
        "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL random_page_cost = 1.1"
    )
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")
