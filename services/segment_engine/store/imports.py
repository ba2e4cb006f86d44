"""Uploads to imported segments: staged ids, and the joins and leaves they make."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from services.segment_engine.store.sql import transaction

__all__ = ["ImportStore"]


class ImportStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def begin(self, dataset: str, segment_id: str) -> int:
        import_id: int = await self.pool.fetchval(
            "INSERT INTO segment_engine.imports (dataset, segment_id) VALUES ($1, $2)"
            " RETURNING import_id",
            dataset,
            segment_id,
        )
        return import_id

    async def stage(self, import_id: int, ids: Sequence[str]) -> None:
        await self.pool.execute(
            "INSERT INTO segment_engine.import_ids (import_id, subject_id)"
            " SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
            import_id,
            list(ids),
        )

    async def end(self, import_id: int) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM segment_engine.import_ids WHERE import_id = $1", import_id
            )
            await conn.execute("DELETE FROM segment_engine.imports WHERE import_id = $1", import_id)

    async def forget_older(self, seconds: float) -> None:
        """Drops staged uploads abandoned by a process that died mid-upload."""
        async with self.pool.acquire() as conn, conn.transaction():
            stale = await conn.fetch(
                "DELETE FROM segment_engine.imports"
                " WHERE start_time < now() - $1 * interval '1 second'"
                " RETURNING import_id",
                seconds,
            )
            if stale:
                await conn.execute(
                    "DELETE FROM segment_engine.import_ids WHERE import_id = ANY($1::bigint[])",
                    [r[0] for r in stale],
                )

    async def staged(self, import_id: int, *, after: str, limit: int) -> list[str]:
        """A page of the upload's ids, by id."""
        records = await self.pool.fetch(
            "SELECT subject_id FROM segment_engine.import_ids"
            " WHERE import_id = $1 AND subject_id > $2 ORDER BY subject_id LIMIT $3",
            import_id,
            after,
            limit,
        )
        return [r[0] for r in records]

    async def staged_among(self, import_id: int, subject_ids: Sequence[str]) -> set[str]:
        """Which of the ids the upload holds."""
        async with self.pool.acquire() as conn, transaction(conn):
            records = await conn.fetch(
                "SELECT subject_id FROM segment_engine.import_ids"
                " WHERE import_id = $1 AND subject_id = ANY($2::text[])",
                import_id,
                list(subject_ids),
            )
        return {r[0] for r in records}

    async def members_among(
        self, dataset: str, segment_id: str, subject_ids: Sequence[str]
    ) -> set[str]:
        """Which of the ids are members of the segment."""
        async with self.pool.acquire() as conn, transaction(conn):
            records = await conn.fetch(
                "SELECT subject_id FROM segment_engine.memberships"
                " WHERE dataset = $1 AND segment_id = $2 AND subject_id = ANY($3::text[])",
                dataset,
                segment_id,
                list(subject_ids),
            )
        return {r[0] for r in records}

    async def bump_version(self, dataset: str, segment_id: str, update_time: int) -> int | None:
        """Raises an imported segment's version; None when it is gone."""
        async with self.pool.acquire() as conn, conn.transaction():
            version = await conn.fetchval(
                "UPDATE segment_engine.segments SET version = version + 1, revision = revision + 1,"
                " update_time = timestamptz 'epoch' + $3 * interval '1 microsecond'"
                " WHERE dataset = $1 AND segment_id = $2 AND NOT deleting RETURNING version",
                dataset,
                segment_id,
                update_time,
            )
            if version is not None:
                await conn.execute(
                    "INSERT INTO segment_engine.catalogs AS c (dataset, revision) VALUES ($1, 1)"
                    " ON CONFLICT (dataset) DO UPDATE SET revision = c.revision + 1",
                    dataset,
                )
        return None if version is None else int(version)
