"""Compiled catalogs per dataset, reloaded when the dataset's catalog revision moves.

A rule is compiled once and reused across catalog revisions, so editing one segment of a
thousand recompiles one rule. Compiled rules are known by what they compile (kind and rule),
not by segment and version: a segment deleted and made again under its id starts again at
version 1, and a replica that never loaded the catalog without it must not take its new rule
for the old one.
"""

from __future__ import annotations

import asyncio
import logging

from audience.errors import AudienceError
from services.segment_engine.domain.catalog import Catalog, SegmentDef
from services.segment_engine.domain.model import Kind, Source, segment_name
from services.segment_engine.domain.segments import SegmentRecord
from services.segment_engine.rules import CompiledSegmentRule, compile_segment_rule
from services.segment_engine.store.segments import SegmentStore

__all__ = ["Catalogs"]

_log = logging.getLogger(__name__)


class Catalogs:
    """Hands out each dataset's :class:`Catalog` at (at least) a given revision."""

    def __init__(self, store: SegmentStore) -> None:
        self._store = store
        self._catalogs: dict[str, Catalog] = {}
        # (dataset, kind, serialized rule) → compiled.
        self._rules: dict[tuple[str, int, bytes], CompiledSegmentRule] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, dataset: str, revision: int | None = None) -> Catalog:
        """The dataset's catalog, reloaded when older than ``revision`` (or unknown)."""
        catalog = self._catalogs.get(dataset)
        if catalog is not None and (revision is None or catalog.revision >= revision):
            return catalog
        lock = self._locks.setdefault(dataset, asyncio.Lock())
        async with lock:
            catalog = self._catalogs.get(dataset)
            if catalog is not None and (revision is None or catalog.revision >= revision):
                return catalog
            return await self._load(dataset)

    async def current(self, dataset: str) -> Catalog:
        """The dataset's catalog at the revision the database holds now."""
        return await self.get(dataset, await self._store.revision(dataset))

    def invalidate(self, dataset: str) -> None:
        self._catalogs.pop(dataset, None)

    async def _load(self, dataset: str) -> Catalog:
        revision, records = await self._store.catalog(dataset)
        definitions = [self._definition(record) for record in records]
        live = {_rule_key(record) for record in records}
        for key in [key for key in self._rules if key[0] == dataset and key not in live]:
            del self._rules[key]
        catalog = Catalog(dataset, revision, definitions)
        self._catalogs[dataset] = catalog
        return catalog

    def _definition(self, record: SegmentRecord) -> SegmentDef:
        rule: CompiledSegmentRule | None = None
        if record.source is Source.RULE and record.rule is not None:
            key = _rule_key(record)
            rule = self._rules.get(key)
            if rule is None:
                try:
                    rule = compile_segment_rule(record.rule, record.kind)
                except (AudienceError, ValueError):
                    # A stored rule that no longer compiles (the language changed under it)
                    # must not stop every other segment: this one stops being evaluated.
                    _log.exception(
                        "segment %s/%s version %d does not compile; not evaluating it",
                        record.dataset,
                        record.segment_id,
                        record.version,
                    )
                else:
                    self._rules[key] = rule
        return SegmentDef(
            segment_id=record.segment_id,
            name=segment_name(record.dataset, record.segment_id),
            kind=Kind(record.kind),
            source=record.source,
            version=record.version,
            rule=rule,
        )


def _rule_key(record: SegmentRecord) -> tuple[str, int, bytes]:
    return (record.dataset, int(record.kind), record.rule or b"")
