"""The segment engine's stores on a real PostgreSQL: the change log's ordering under
concurrent writers, pruning, memberships at a past time, and subject locks."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files

import asyncpg
import pytest

from audience import db
from services.segment_engine.domain.model import Cause, Change, ChangeKind, Kind, Reason
from services.segment_engine.store.log import START_TIME_MARGIN, ChangeLog
from services.segment_engine.store.state import StateStore, WriteBatch

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(postgres_dsn, min_size=2, max_size=20)
    try:
        await db.migrate(
            pool,
            schema="segment_engine",
            migrations=files("services.segment_engine") / "migrations",
        )
        yield pool
    finally:
        await pool.close()


def _dataset() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def _change(subject: str, segment: str, time: int, kind: ChangeKind = ChangeKind.JOIN) -> Change:
    return Change(Kind.USER, subject, segment, 1, kind, time, Reason(Cause.EVENT))


async def _write(
    pool: asyncpg.Pool, state: StateStore, dataset: str, changes: list[Change], hold: float
) -> list[int]:
    async with pool.acquire() as conn, conn.transaction():
        batch = WriteBatch(changes=[(dataset, change, b"") for change in changes])
        logged = await state.write(conn, batch)
        # Held open after allocating positions: a later writer must not commit past it.
        await asyncio.sleep(hold)
    return [seq for entry in logged for seq in entry.positions]


async def test_a_tailing_reader_never_skips_a_change_committed_by_concurrent_writers(
    pool: asyncpg.Pool,
) -> None:
    dataset = _dataset()
    state = StateStore("test")
    log = ChangeLog(pool)
    rng = random.Random(7)
    committed: list[int] = []
    seen: list[int] = []
    done = asyncio.Event()

    async def writer(index: int) -> None:
        for round_ in range(15):
            changes = [
                _change(f"p{index}-{round_}-{n}", "s", 1_000 + round_)
                for n in range(rng.randint(1, 4))
            ]
            committed.extend(await _write(pool, state, dataset, changes, rng.random() * 0.01))

    async def reader() -> None:
        position = 0
        while True:
            finished = done.is_set()
            read = await log.read(dataset, position, limit=7)
            seen.extend(row.seq for row in read.rows)
            position = read.position
            if finished and not read.rows and position >= read.head:
                return
            await asyncio.sleep(0)

    tail = asyncio.create_task(reader())
    await asyncio.gather(*(writer(index) for index in range(6)))
    done.set()
    await tail
    assert seen == sorted(committed)
    assert len(seen) == len(set(seen))


async def test_a_rolled_back_writer_leaves_a_gap_and_nothing_is_skipped(
    pool: asyncpg.Pool,
) -> None:
    dataset = _dataset()
    state = StateStore("test")
    log = ChangeLog(pool)
    first = await _write(pool, state, dataset, [_change("a", "s", 1)], 0)
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await state.write(conn, WriteBatch(changes=[(dataset, _change("b", "s", 2), b"")]))
        await transaction.rollback()
    last = await _write(pool, state, dataset, [_change("c", "s", 3)], 0)
    read = await log.read(dataset, 0, limit=10)
    assert [row.seq for row in read.rows] == first + last
    assert [row.subject_id for row in read.rows] == ["a", "c"]


async def test_filters_pass_over_other_changes_and_still_advance_the_position(
    pool: asyncpg.Pool,
) -> None:
    dataset = _dataset()
    state = StateStore("test")
    log = ChangeLog(pool)
    await _write(
        pool,
        state,
        dataset,
        [
            _change("a", "s1", 1),
            _change("b", "s2", 1),
            _change("a", "s1", 2, ChangeKind.LEAVE),
        ],
        0,
    )
    joins = await log.read(dataset, 0, segments=["s1"], change=ChangeKind.JOIN, limit=10)
    assert [(row.subject_id, row.segment_id) for row in joins.rows] == [("a", "s1")]
    assert joins.position == joins.head == 3
    nothing = await log.read(dataset, 0, segments=["s3"], limit=10)
    assert nothing.rows == []
    assert nothing.position == 3


async def test_pruning_moves_the_pruned_position_past_old_changes(pool: asyncpg.Pool) -> None:
    dataset = _dataset()
    state = StateStore("test")
    log = ChangeLog(pool)
    await _write(pool, state, dataset, [_change("old", "s", 1_000_000)], 0)
    kept = await _write(pool, state, dataset, [_change("new", "s", 9_000_000)], 0)
    await log.prune(5_000_000)
    read = await log.read(dataset, 0, limit=10)
    assert read.pruned == kept[0] - 1
    assert [row.subject_id for row in read.rows] == ["new"]


async def test_starting_from_a_time_misses_no_change_timed_later_but_logged_first(
    pool: asyncpg.Pool,
) -> None:
    # Two evaluations timed 10 and 20 ms after the start time; the later one allocated its
    # position first (seen in a CLI test: the first join was skipped).
    dataset = _dataset()
    state = StateStore("test")
    log = ChangeLog(pool)
    start = 1_700_000_000_000_000
    await _write(pool, state, dataset, [_change("too-old", "s", start - 10 * START_TIME_MARGIN)], 0)
    await _write(pool, state, dataset, [_change("later", "s", start + 20_000)], 0)
    await _write(pool, state, dataset, [_change("earlier", "s", start + 10_000)], 0)
    await _write(
        pool, state, dataset, [_change("much-later", "s", start + 2 * START_TIME_MARGIN)], 0
    )

    position = await log.position_at(dataset, start)
    read = await log.read(dataset, position, limit=10)

    assert [row.subject_id for row in read.rows] == ["later", "earlier", "much-later"]
    assert await log.position_at(dataset, start + 4 * START_TIME_MARGIN) == read.head


async def test_memberships_at_a_past_time_undo_later_changes(pool: asyncpg.Pool) -> None:
    dataset = _dataset()
    state = StateStore("test")
    log = ChangeLog(pool)
    await _write(
        pool,
        state,
        dataset,
        [
            _change("p", "kept", 100),
            _change("p", "left", 100),
            _change("p", "left", 300, ChangeKind.LEAVE),
            _change("p", "joined", 300),
        ],
        0,
    )
    past = {
        entry.segment_id: entry.membership
        for entry in await log.memberships_at(dataset, Kind.USER, "p", 200)
    }
    assert past["joined"] is None
    membership = past["left"]
    assert membership is not None
    assert membership.join_time == 100
    assert "kept" not in past


async def test_locking_a_new_subject_from_two_transactions_serialises_them(
    pool: asyncpg.Pool,
) -> None:
    dataset = _dataset()
    state = StateStore("test")
    key = (dataset, int(Kind.USER), "fresh")
    seen: list[int] = []

    async def bump(pause: float) -> None:
        async with pool.acquire() as conn, conn.transaction():
            rows = await state.lock(conn, [key])
            seen.append(rows[key].sequence)
            await asyncio.sleep(pause)
            await conn.execute(
                "UPDATE segment_engine.subjects SET sequence = sequence + 1"
                " WHERE dataset = $1 AND kind = $2 AND subject_id = $3",
                *key,
            )

    await asyncio.gather(bump(0.2), bump(0))
    # Whichever came second waited, and read what the first wrote.
    assert sorted(seen) == [0, 1]


async def test_try_lock_skips_subjects_another_transaction_holds(pool: asyncpg.Pool) -> None:
    dataset = _dataset()
    state = StateStore("test")
    held = (dataset, int(Kind.USER), "held")
    free = (dataset, int(Kind.USER), "free")
    async with pool.acquire() as setup, setup.transaction():
        await state.lock(setup, [held, free])
    async with pool.acquire() as holder, holder.transaction():
        await state.lock(holder, [held])
        async with pool.acquire() as other, other.transaction():
            rows = await state.try_lock(other, [held, free])
    assert set(rows) == {free}
