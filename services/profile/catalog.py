"""The compiled aggregates of each dataset, reloaded when the catalogue version moves."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import asyncpg

from services.profile.domain.aggregates import AggregateIndex
from services.profile.store import ProfileStore

__all__ = ["Catalog"]

_log = logging.getLogger(__name__)


class Catalog:
    """Compiled aggregate indexes by dataset, shared by the appliers of a process."""

    def __init__(self, store: ProfileStore) -> None:
        self._store = store
        self._indexes: dict[str, AggregateIndex] = {}

    async def indexes(
        self, conn: asyncpg.Connection, datasets: Iterable[str]
    ) -> dict[str, AggregateIndex | None]:
        """Each dataset's current index (``None``: no aggregates), read in ``conn``'s
        transaction.

        Called after the unit's row locks are taken: a backfill registers its aggregates
        before it locks any profile, so a unit that locks a profile after the backfill did
        sees every aggregate the backfill filled.
        """
        wanted = set(datasets)
        versions = await self._store.catalog_versions(conn, wanted)
        result: dict[str, AggregateIndex | None] = {}
        for dataset in wanted:
            version = versions.get(dataset)
            if version is None:
                result[dataset] = None
                continue
            index = self._indexes.get(dataset)
            if index is None or index.version != version:
                version, specs = await self._store.specs(conn, dataset)
                index = AggregateIndex(specs, version)
                self._indexes[dataset] = index
                _log.info(
                    "compiled %d aggregates of dataset %s (catalogue version %d)",
                    len(index),
                    dataset,
                    version,
                )
            result[dataset] = index
        return result
