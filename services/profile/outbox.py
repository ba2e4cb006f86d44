"""The outbox of changes committed outside the bus consumer's path.

The consumer acknowledges its bus entries only after publishing, so a publish lost after
the commit is made again by the redelivery (ADR 9). An explicit merge, an erasure or a
backfill page has no redelivery: a retried merge or erasure finds its source gone, and a
backfill page is never read again. So such a transaction records a row per change it is
about to publish (:meth:`Outbox.record`), and once it has committed and published, the
caller deletes them (:meth:`Outbox.publish`). The :class:`Relay` publishes the rows still
there after a grace period, rebuilt from what the store holds now:

- a MERGED or ERASED change as recorded (no view, its sequence, the merge's target);
- an UPDATED one with the subject's current view and sequence, with no event ids and no
  keys (the segment engine evaluates such a change against every segment when its sequence
  is new there), or not at all when the subject no longer exists (its own merge or erasure
  says what happened to it).

A change can be published twice (a relay slower than the grace period, a caller that
publishes late): the engine drops a sequence it has passed, so that is harmless, where a
lost one is not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from redis.exceptions import RedisError

from audience.db import LOOP_FAILURES
from services.profile.applier import Published, subject_key
from services.profile.codec import ACCOUNT, USER, account_view, encode_change, profile_view
from services.profile.consumer import Publisher, is_infrastructure
from services.profile.domain.batch import UserOutcome
from services.profile.domain.model import ChangeType, ProfileKey, ProfileState
from services.profile.store import ProfileStore, S

__all__ = ["Outbox", "Pending", "Relay"]

_log = logging.getLogger(__name__)

# Redis as well as PostgreSQL: the relay publishes.
_FAILURES: tuple[type[Exception], ...] = (RedisError, *LOOP_FAILURES)

_RECORD = (
    f"INSERT INTO {S}.outbox (dataset, kind, subject_id, sequence, change_type, merged_into)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[],"
    " $6::text[]) RETURNING outbox_id"
)
# One statement, so its own short transaction: rows another relay holds are skipped, and
# a claimed row waits another grace period before any relay takes it again (its claimer
# may have died before deleting it).
_CLAIM = (
    f"UPDATE {S}.outbox AS o SET claim_time = clock_timestamp()"
    f" FROM (SELECT outbox_id FROM {S}.outbox"
    "  WHERE coalesce(claim_time, record_time) < clock_timestamp() - $1::interval"
    "  ORDER BY outbox_id LIMIT $2 FOR UPDATE SKIP LOCKED) AS due"
    " WHERE o.outbox_id = due.outbox_id"
    " RETURNING o.outbox_id, o.dataset, o.kind, o.subject_id, o.sequence, o.change_type,"
    " o.merged_into"
)
_FORGET = f"DELETE FROM {S}.outbox WHERE outbox_id = ANY($1::int8[])"


@dataclass(frozen=True, slots=True)
class Pending:
    """A change a transaction is about to commit, to publish should its publish be lost."""

    dataset: str
    kind: str
    subject_id: str
    sequence: int
    change_type: ChangeType
    merged_into: str = ""


class Outbox:
    """Records the changes of a transaction and publishes them once it has committed."""

    def __init__(
        self, store: ProfileStore, publisher: Publisher, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.publisher = publisher
        self._clock = clock

    async def record(self, conn: asyncpg.Connection, pending: Sequence[Pending]) -> list[int]:
        """Records changes in the caller's transaction; returns their rows' ids."""
        if not pending:
            return []
        rows = await conn.fetch(
            _RECORD,
            [p.dataset for p in pending],
            [p.kind for p in pending],
            [p.subject_id for p in pending],
            [p.sequence for p in pending],
            [p.change_type.name.lower() for p in pending],
            [p.merged_into or None for p in pending],
        )
        return [row["outbox_id"] for row in rows]

    async def record_outcome(
        self,
        conn: asyncpg.Connection,
        outcome: UserOutcome,
        states: Mapping[ProfileKey, ProfileState],
    ) -> list[int]:
        """Records what :meth:`Applier.settle` will publish for ``outcome``: called after
        it, in its transaction, with the states it raised the sequences of."""
        pending = []
        for key in outcome.touches:
            target = outcome.merged.get(key)
            change_type = ChangeType.UPDATED
            if target is not None:
                change_type = ChangeType.MERGED
            elif key in outcome.erased:
                change_type = ChangeType.ERASED
            pending.append(
                Pending(
                    key[0],
                    USER,
                    key[1],
                    states[key].sequence,
                    change_type,
                    target[1] if target is not None else "",
                )
            )
        # Settle locked and wrote these accounts; the lock is this transaction's already.
        accounts = await self.store.lock(conn, ACCOUNT, outcome.accounts(states))
        pending.extend(
            Pending(dataset, ACCOUNT, account_id, sequence, ChangeType.UPDATED)
            for (dataset, account_id), (sequence, _) in sorted(accounts.items())
        )
        return await self.record(conn, pending)

    async def publish(self, published: Sequence[Published], recorded: Sequence[int]) -> None:
        """Publishes a committed transaction's changes, then deletes the rows it recorded.

        Raises:
            Exception: the publish failed; the rows stay for the relay.
        """
        await self.publisher.changes(published)
        if not recorded:
            return
        try:
            await self.store.pool.execute(_FORGET, list(recorded))
        except Exception as error:
            if not is_infrastructure(error):
                raise
            # Published already: the caller's work is done, and the relay publishing the
            # rows again is harmless.
            _log.warning(
                "outbox: %d published changes not deleted: %s: %s",
                len(recorded),
                type(error).__name__,
                error,
            )

    async def relay(self, grace: timedelta, limit: int) -> int:
        """Publishes up to ``limit`` changes recorded more than ``grace`` ago (or claimed
        by a relay that long ago), then deletes their rows; returns how many it took."""
        pool = self.store.pool
        rows = await pool.fetch(_CLAIM, grace, limit)
        if not rows:
            return 0
        updated = {
            (row["kind"], row["dataset"], row["subject_id"])
            for row in rows
            if row["change_type"] == "updated"
        }
        users = await self.store.load_profiles(
            pool, [(dataset, subject) for kind, dataset, subject in updated if kind == USER]
        )
        accounts = await self.store.load_accounts(
            pool, [(dataset, subject) for kind, dataset, subject in updated if kind == ACCOUNT]
        )
        # Dated after the states were read, which were committed by then (see the
        # applier's change times).
        now = int(self._clock() * 1_000_000)
        published = []
        done: set[tuple[str, str, str]] = set()
        for row in rows:
            dataset, kind, subject_id = row["dataset"], row["kind"], row["subject_id"]
            change_type = ChangeType[row["change_type"].upper()]
            sequence = row["sequence"]
            view: bytes | None = None
            if change_type is ChangeType.UPDATED:
                if (kind, dataset, subject_id) in done:
                    continue
                done.add((kind, dataset, subject_id))
                if kind == USER:
                    user = users.get((dataset, subject_id))
                    if user is None:
                        continue
                    view, sequence = profile_view(user), user.sequence
                else:
                    account = accounts.get((dataset, subject_id))
                    if account is None:
                        continue
                    view, sequence = account_view(account), account.sequence
            change = encode_change(
                dataset=dataset,
                kind=kind,
                subject_id=subject_id,
                sequence=sequence,
                change_type=change_type,
                event_ids=(),
                keys=(),
                view=view,
                change_time=now,
                merged_into=row["merged_into"] or "",
            )
            published.append(Published(subject_key(dataset, kind, subject_id), change))
        await self.publisher.changes(published)
        # Only the rows taken: a concurrent writer may have recorded more meanwhile.
        await pool.execute(_FORGET, [row["outbox_id"] for row in rows])
        _log.info("outbox: published %d changes left in the outbox", len(published))
        return len(rows)


class Relay:
    """Publishes what the outbox still holds after ``grace``, looking every ``grace``."""

    def __init__(self, outbox: Outbox, *, grace: timedelta, page_size: int = 500) -> None:
        self.outbox = outbox
        self.grace = grace
        self.page_size = page_size

    async def run(self) -> None:
        """Relays until cancelled, waiting out infrastructure failures."""
        while True:
            busy = False
            try:
                busy = await self.outbox.relay(self.grace, self.page_size) == self.page_size
            except _FAILURES as error:
                _log.warning("outbox relay: %s: %s; retrying", type(error).__name__, error)
            if not busy:
                await asyncio.sleep(self.grace.total_seconds())
