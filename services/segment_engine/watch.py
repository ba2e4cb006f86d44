"""The membership change stream: each subscriber tails the log at its own pace.

A subscriber keeps a log position, reads what follows it (filtered), sends it, and waits
for a wake-up when it has caught up. Nothing is pushed to subscribers, so a slow one only
falls behind in the log and holds up no one (DESIGN.md: a slow subscriber cannot stall the
engine or the others); one that falls behind the retention is told its position expired.

Wake-ups (docs/adr/0003): a commit in this process wakes its subscribers at once; a commit
in another replica reaches them through PostgreSQL ``LISTEN``/``NOTIFY``, which is
delivered only after the commit, so a woken subscriber finds the changes committed. A
subscriber also reads every second whatever happens, so a wake-up lost while the listening
connection reconnects delays changes by at most that long.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import asyncpg

from audience.db import LOOP_FAILURES
from audience.errors import out_of_range
from audience.waiting import wait_woken
from services.segment_engine.domain.model import ChangeKind
from services.segment_engine.domain.tokens import decode_token, encode_token
from services.segment_engine.store.log import ChangeLog, LogRow
from services.segment_engine.store.state import NOTIFY_CHANNEL, parse_notify_payload

__all__ = [
    "ChangeNotifier",
    "Heartbeat",
    "StartPoint",
    "StreamedChange",
    "watch_changes",
]

_log = logging.getLogger(__name__)

_SAFETY_POLL = 1.0

ForeignCommit = Callable[[str, list[tuple[int, str]] | None], None]


class ChangeNotifier:
    """Wakes the subscribers of a dataset when changes of it commit.

    Args:
        origin: this process's origin in commit notifications (see ``StateStore``).
    """

    def __init__(self, origin: str) -> None:
        self._origin = origin
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._foreign: list[ForeignCommit] = []

    def subscribe(self, dataset: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters[dataset].add(event)
        return event

    def unsubscribe(self, dataset: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(dataset)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[dataset]

    def notify(self, datasets: Iterable[str]) -> None:
        for dataset in datasets:
            for event in self._waiters.get(dataset, ()):
                event.set()

    def on_foreign_commit(self, callback: ForeignCommit) -> None:
        """Calls ``callback(dataset, members or None)`` for each commit of another process."""
        self._foreign.append(callback)

    def _received(self, _: object, pid: int, channel: str, payload: str) -> None:
        origin, dataset, members = parse_notify_payload(payload)
        if origin == self._origin:
            # This process woke its subscribers at commit.
            return
        self.notify([dataset])
        for callback in self._foreign:
            callback(dataset, members)

    async def listen(self, pool: asyncpg.Pool) -> NoReturn:
        """Listens for other processes' commits until cancelled, reconnecting as needed."""
        while True:
            try:
                async with pool.acquire() as conn:
                    closed = asyncio.Event()

                    def terminated(_: object, done: asyncio.Event = closed) -> None:
                        done.set()

                    conn.add_termination_listener(terminated)
                    await conn.add_listener(NOTIFY_CHANNEL, self._received)
                    try:
                        # Whatever committed while no one listened: everyone reads again.
                        self._all_changed()
                        await closed.wait()
                    finally:
                        conn.remove_termination_listener(terminated)
                        # Not handed back to the pool with its LISTEN (the pool does not
                        # reset sessions, audience.db.create_pool).
                        conn.terminate()
            except LOOP_FAILURES:
                _log.warning("change listener lost its connection; reconnecting", exc_info=True)
            self._all_changed()
            await asyncio.sleep(1.0)

    def _all_changed(self) -> None:
        self.notify(list(self._waiters))
        for callback in self._foreign:
            callback("", None)


@dataclass(frozen=True, slots=True)
class StartPoint:
    """Where a stream starts: a resume token, a time (microseconds), or now (neither)."""

    token: str | None = None
    time: int | None = None


@dataclass(frozen=True, slots=True)
class StreamedChange:
    row: LogRow
    token: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    token: str
    time: int


def _expired(message: str) -> Exception:
    return out_of_range(
        message + " Read the memberships again, then watch from now.",
        reason="RESUME_POINT_EXPIRED",
    )


async def _start(
    log: ChangeLog, dataset: str, start: StartPoint, retention: int
) -> tuple[int, int | None]:
    """The position to read after, and the least change time to deliver (a start time)."""
    head, pruned, now = await log.head(dataset)
    if start.token is not None:
        point = decode_token(dataset, start.token)
        if point.time < now - retention or point.sequence < pruned:
            raise _expired("The resume token is older than the change log's retention.")
        if point.sequence > head:
            raise _expired("The resume token is ahead of the change log (it was reset).")
        return point.sequence, None
    if start.time is not None:
        if start.time < now - retention:
            raise _expired("The start time is older than the change log's retention.")
        position = await log.position_at(dataset, start.time)
        if position < pruned:
            raise _expired("The start time is older than the change log's retention.")
        return position, start.time
    return head, None


async def watch_changes(
    log: ChangeLog,
    notifier: ChangeNotifier,
    dataset: str,
    start: StartPoint,
    *,
    segments: Sequence[str],
    change: ChangeKind | None,
    heartbeat: float,
    retention: int,
    batch: int,
    clock: Callable[[], float],
) -> AsyncIterator[list[StreamedChange] | Heartbeat]:
    """Streams a dataset's changes from ``start``, with heartbeats when idle: the changes
    of each log read together, in order (never an empty list).

    Args:
        segments: only changes of these segment ids; all when empty.
        change: only joins or only leaves; both when None.
        heartbeat: seconds without a change after which a heartbeat is sent.
        retention: microseconds of log kept; older start points are refused.
        batch: the most changes per log read.
        clock: monotonic seconds.

    Raises:
        AudienceError: ``OUT_OF_RANGE`` (``RESUME_POINT_EXPIRED``) when the start point, or
            the subscriber's position later on, is older than the retention.
    """
    position, min_time = await _start(log, dataset, start, retention)
    event = notifier.subscribe(dataset)
    try:
        last_sent = clock()
        while True:
            event.clear()
            read = await log.read(
                dataset,
                position,
                segments=segments,
                change=change,
                min_time=min_time,
                limit=batch,
            )
            if position < read.pruned:
                raise _expired("The subscriber fell behind the change log's retention.")
            if read.rows:
                yield [
                    StreamedChange(row, encode_token(dataset, row.seq, row.time))
                    for row in read.rows
                ]
                last_sent = clock()
            position = read.position
            if len(read.rows) >= batch or position < read.head:
                continue
            idle = clock() - last_sent
            if idle >= heartbeat:
                yield Heartbeat(encode_token(dataset, position, read.time), read.time)
                last_sent = clock()
                continue
            await wait_woken(event, min(heartbeat - idle, _SAFETY_POLL))
    finally:
        notifier.unsubscribe(dataset, event)
