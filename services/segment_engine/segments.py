"""Segments as people manage them: create, read, list, update, delete, validate and preview
rules, import members, and statistics."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import asyncpg

from audience.db import session_lock
from audience.errors import (
    FieldViolation,
    aborted,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
)
from audience.v1 import rule_pb2
from services.segment_engine.catalogs import Catalogs
from services.segment_engine.domain.catalog import Catalog
from services.segment_engine.domain.model import (
    Cause,
    Kind,
    SegmentState,
    Source,
    has_control_character,
    segment_id_violation,
    segment_name,
)
from services.segment_engine.domain.segments import (
    Backfill,
    SegmentRecord,
    metadata_violations,
)
from services.segment_engine.processor import Processor
from services.segment_engine.profile_client import ProfileQueries
from services.segment_engine.references import closure, referenced_segments, rule_references
from services.segment_engine.rules import (
    CompiledSegmentRule,
    RuleFacts,
    parse_definition,
    rule_facts,
    validate_definition,
)
from services.segment_engine.store.imports import ImportStore
from services.segment_engine.store.members import MemberStore
from services.segment_engine.store.segments import SegmentStore, bump_catalog, work_lock_key

__all__ = [
    "MAX_IMPORT_CSV_BYTES",
    "MAX_IMPORT_IDS",
    "ImportMode",
    "ImportResult",
    "Preview",
    "SegmentChanges",
    "SegmentStats",
    "Segments",
]

_SEGMENT_TYPE = "audience.dev/Segment"
_DAY = 86_400_000_000
_MAX_ID = 256
MAX_IMPORT_IDS = 100_000
"""Ids in one message of an upload."""
MAX_IMPORT_CSV_BYTES = 4 * 1024 * 1024
"""CSV bytes in one message of an upload."""
_UPDATABLE = frozenset({"display_name", "description", "rule", "rule_text", "labels"})


@dataclass(frozen=True)
class SegmentChanges:
    """The fields of a segment given on create or update (``rule`` as a tree or text)."""

    display_name: str = ""
    description: str = ""
    labels: Mapping[str, str] | None = None
    rule: rule_pb2.Rule | None = None
    rule_text: str = ""
    etag: str = ""


@dataclass(frozen=True)
class Preview:
    estimated_size: int
    sample: list[str]
    scanned: int


@dataclass(frozen=True)
class SegmentStats:
    size: int
    # (day since the epoch, size at its end, joins, leaves), oldest first.
    days: list[tuple[int, int, int, int]]


class ImportMode:
    REPLACE = 1
    ADD = 2
    REMOVE = 3


@dataclass(frozen=True)
class ImportResult:
    segment: SegmentRecord
    joined: int
    left: int
    rejected: int


def _not_found(dataset: str, segment_id: str) -> Exception:
    return not_found(_SEGMENT_TYPE, segment_name(dataset, segment_id))


class Segments:
    """The SegmentService's behaviour."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: SegmentStore,
        members: MemberStore,
        imports: ImportStore,
        catalogs: Catalogs,
        processor: Processor,
        profiles: ProfileQueries,
        *,
        clock: Callable[[], int],
        on_change: Callable[[], None],
        chunk: int,
    ) -> None:
        self._pool = pool
        self._store = store
        self._members = members
        self._imports = imports
        self._catalogs = catalogs
        self._processor = processor
        self._profiles = profiles
        self._clock = clock
        self._on_change = on_change
        self._chunk = chunk

    # Reads.

    async def get(self, dataset: str, segment_id: str) -> SegmentRecord:
        record = await self._store.get(dataset, segment_id)
        if record is None:
            raise _not_found(dataset, segment_id)
        return record

    async def page(
        self,
        dataset: str,
        *,
        after: str,
        limit: int,
        kind: Kind | None,
        state: SegmentState | None,
    ) -> tuple[list[SegmentRecord], bool]:
        records = await self._store.page(
            dataset, after=after, limit=limit + 1, kind=kind, state=state
        )
        return records[:limit], len(records) > limit

    # Rules.

    def _known(self, catalog: Catalog) -> list[tuple[str, Kind, frozenset[str]]]:
        return [
            (s.name, s.kind, s.rule.segments if s.rule is not None else frozenset())
            for s in catalog.segments.values()
        ]

    async def _compile(
        self,
        dataset: str,
        kind: Kind,
        rule: rule_pb2.Rule | None,
        rule_text: str,
        *,
        segment_id: str | None,
        prefix: str,
    ) -> tuple[CompiledSegmentRule, Catalog]:
        tree = parse_definition(rule, rule_text, prefix=prefix)
        catalog = await self._catalogs.current(dataset)
        compiled = validate_definition(
            tree,
            kind,
            dataset=dataset,
            segment_name=segment_name(dataset, segment_id) if segment_id else None,
            known=self._known(catalog),
            field=f"{prefix}rule",
        )
        return compiled, catalog

    async def validate_rule(
        self, dataset: str, kind: Kind, rule: rule_pb2.Rule | None, rule_text: str
    ) -> RuleFacts:
        compiled, catalog = await self._compile(
            dataset, kind, rule, rule_text, segment_id=None, prefix=""
        )
        return rule_facts(compiled, closure(catalog, rule_references(compiled)))

    async def preview(
        self,
        dataset: str,
        kind: Kind,
        rule: rule_pb2.Rule | None,
        rule_text: str,
        sample_size: int,
    ) -> Preview:
        compiled, catalog = await self._compile(
            dataset, kind, rule, rule_text, segment_id=None, prefix=""
        )
        referenced = await referenced_segments(catalog, self._members, rule_references(compiled))
        now = self._clock()
        if compiled.aggregates:
            await self._profiles.register_aggregates(dataset, compiled.aggregates)
        estimated = scanned = 0
        async for chunk in self._profiles.query(
            dataset, kind, compiled.rule, referenced, evaluation_time=now, count_only=True
        ):
            estimated = max(estimated, chunk.matched)
            scanned = max(scanned, chunk.scanned)
        sample: list[str] = []
        if sample_size:
            async for chunk in self._profiles.query(
                dataset,
                kind,
                compiled.rule,
                referenced,
                evaluation_time=now,
                limit=sample_size,
                chunk_size=sample_size,
            ):
                sample.extend(chunk.ids)
        return Preview(estimated, sample[:sample_size], scanned)

    # Changes.

    async def create(
        self,
        dataset: str,
        segment_id: str,
        kind: Kind | None,
        source: Source | None,
        changes: SegmentChanges,
    ) -> SegmentRecord:
        violations: list[FieldViolation] = []
        problem = segment_id_violation(segment_id)
        if problem:
            violations.append(FieldViolation("segment_id", problem))
        if kind is None:
            violations.append(
                FieldViolation("segment.kind", "required: SEGMENT_KIND_USER or _ACCOUNT.")
            )
        if source is None:
            violations.append(
                FieldViolation("segment.source", "required: SEGMENT_SOURCE_RULE or _IMPORTED.")
            )
        labels = dict(changes.labels or {})
        violations.extend(
            metadata_violations("segment.", changes.display_name, changes.description, labels)
        )
        if source is Source.IMPORTED and (
            changes.rule_text or (changes.rule is not None and changes.rule.WhichOneof("node"))
        ):
            violations.append(FieldViolation("segment.rule", "an imported segment has no rule."))
        if violations:
            raise invalid_argument("The segment is not valid.", *violations)
        assert kind is not None
        assert source is not None
        now = self._clock()
        record = SegmentRecord(
            dataset=dataset,
            segment_id=segment_id,
            kind=kind,
            source=source,
            display_name=changes.display_name,
            description=changes.description,
            labels=labels,
            create_time=now,
            update_time=now,
        )
        async with self._pool.acquire() as conn, conn.transaction():
            # The catalog row's lock serialises rule changes of a dataset, so two edits
            # cannot each pass the cycle check and together make a cycle.
            await bump_catalog(conn, dataset)
            if source is Source.RULE:
                compiled, _ = await self._compile(
                    dataset,
                    kind,
                    changes.rule,
                    changes.rule_text,
                    segment_id=segment_id,
                    prefix="segment.",
                )
                record = replace(
                    record,
                    rule=compiled.rule.SerializeToString(),
                    rule_text=rule_facts(compiled, ()).text,
                    state=SegmentState.BACKFILLING,
                    backfill=Backfill(version=1, start_time=now),
                )
            if not await self._store.insert(conn, record):
                raise already_exists(_SEGMENT_TYPE, segment_name(dataset, segment_id))
        self._catalogs.invalidate(dataset)
        self._on_change()
        return await self.get(dataset, segment_id)

    async def update(
        self, dataset: str, segment_id: str, changes: SegmentChanges, paths: Sequence[str]
    ) -> SegmentRecord:
        if not paths:
            raise invalid_argument(
                "update_mask must name the fields to update.",
                FieldViolation("update_mask", "required."),
            )
        unknown = [path for path in paths if path not in _UPDATABLE]
        if unknown:
            raise invalid_argument(
                f"Fields {unknown} cannot be updated.",
                *(
                    FieldViolation(
                        "update_mask", f"{path!r} is not one of {', '.join(sorted(_UPDATABLE))}."
                    )
                    for path in unknown
                ),
            )
        now = self._clock()
        rule_changed = False
        async with self._pool.acquire() as conn, conn.transaction():
            wants_rule = "rule" in paths or "rule_text" in paths
            if wants_rule:
                await bump_catalog(conn, dataset)
            record = await self._store.get(dataset, segment_id, conn=conn, for_update=True)
            if record is None:
                raise _not_found(dataset, segment_id)
            if changes.etag and changes.etag != record.etag:
                raise aborted(
                    "The segment changed since it was read (stale etag); read it again.",
                    reason="STALE_ETAG",
                )
            updated = record
            if "display_name" in paths:
                updated = replace(updated, display_name=changes.display_name)
            if "description" in paths:
                updated = replace(updated, description=changes.description)
            if "labels" in paths:
                updated = replace(updated, labels=dict(changes.labels or {}))
            violations = metadata_violations(
                "segment.", updated.display_name, updated.description, updated.labels
            )
            if violations:
                raise invalid_argument("The segment is not valid.", *violations)
            if wants_rule:
                if record.source is Source.IMPORTED:
                    raise invalid_argument(
                        "An imported segment has no rule.",
                        FieldViolation("update_mask", "an imported segment has no rule."),
                    )
                compiled, _ = await self._compile(
                    dataset,
                    record.kind,
                    changes.rule if "rule" in paths else None,
                    changes.rule_text if "rule_text" in paths else "",
                    segment_id=segment_id,
                    prefix="segment.",
                )
                rule_bytes = compiled.rule.SerializeToString(deterministic=True)
                old = (
                    rule_pb2.Rule.FromString(record.rule).SerializeToString(deterministic=True)
                    if record.rule
                    else b""
                )
                if rule_bytes != old:
                    rule_changed = True
                    version = record.version + 1
                    updated = replace(
                        updated,
                        rule=rule_bytes,
                        rule_text=rule_facts(compiled, ()).text,
                        version=version,
                        state=SegmentState.BACKFILLING,
                        backfill=Backfill(version=version, start_time=now),
                    )
            if updated != record:
                updated = replace(updated, revision=record.revision + 1, update_time=now)
                await self._store.save(conn, updated)
        if rule_changed:
            self._catalogs.invalidate(dataset)
            self._on_change()
        return await self.get(dataset, segment_id)

    async def delete(self, dataset: str, segment_id: str, etag: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await bump_catalog(conn, dataset)
            record = await self._store.get(dataset, segment_id, conn=conn, for_update=True)
            if record is None:
                raise _not_found(dataset, segment_id)
            if etag and etag != record.etag:
                raise aborted(
                    "The segment changed since it was read (stale etag); read it again.",
                    reason="STALE_ETAG",
                )
            catalog = await self._catalogs.current(dataset)
            referrers = catalog.referrers(segment_name(dataset, segment_id))
            if referrers:
                raise failed_precondition(
                    f"Segments {sorted(referrers)} refer to this segment; change them first.",
                    reason="SEGMENT_IN_USE",
                    metadata={"referrers": ",".join(sorted(referrers))[:1000]},
                )
            await self._store.mark_deleting(conn, dataset, segment_id)
        self._catalogs.invalidate(dataset)
        self._on_change()

    # Imports.

    async def import_members(
        self,
        dataset: str,
        segment_id: str,
        mode: int,
        chunks: AsyncIterator[Sequence[str] | bytes],
    ) -> ImportResult:
        """Uploads an imported segment's members; the chunks are id lists or CSV bytes."""
        if mode not in (ImportMode.REPLACE, ImportMode.ADD, ImportMode.REMOVE):
            raise invalid_argument(
                "mode is required.",
                FieldViolation("mode", "IMPORT_MODE_REPLACE, _ADD or _REMOVE."),
            )
        record = await self.get(dataset, segment_id)
        if record.source is not Source.IMPORTED:
            raise failed_precondition(
                "Only an imported segment takes uploaded members.",
                reason="NOT_AN_IMPORTED_SEGMENT",
            )
        import_id = await self._imports.begin(dataset, segment_id)
        try:
            rejected = await self._stage(import_id, chunks)
            # One whole-segment job at a time: not beside a deletion or another import.
            async with session_lock(self._pool, work_lock_key(dataset, segment_id), wait=True):
                version = await self._imports.bump_version(dataset, segment_id, self._clock())
                if version is None:
                    raise _not_found(dataset, segment_id)
                joined, left = await self._apply_upload(
                    dataset, record.kind, segment_id, version, mode, import_id
                )
        finally:
            await self._imports.end(import_id)
        return ImportResult(await self.get(dataset, segment_id), joined, left, rejected)

    async def _apply_upload(
        self, dataset: str, kind: Kind, segment_id: str, version: int, mode: int, import_id: int
    ) -> tuple[int, int]:
        """Joins and leaves of an upload, a page of ids at a time (pages read by index
        range, so a million ids cost a thousand small queries, not a large join)."""
        joined = left = 0
        after = ""
        while True:
            ids = await self._imports.staged(import_id, after=after, limit=self._chunk)
            if not ids:
                break
            after = ids[-1]
            current = await self._imports.members_among(dataset, segment_id, ids)
            if mode == ImportMode.REMOVE:
                decisions = dict.fromkeys((i for i in ids if i in current), False)
            else:
                decisions = dict.fromkeys((i for i in ids if i not in current), True)
            if decisions:
                await self._force(dataset, kind, segment_id, version, decisions)
            joined += sum(decisions.values())
            left += len(decisions) - sum(decisions.values())
        if mode == ImportMode.REPLACE:
            after = ""
            while True:
                members = await self._members.member_ids(
                    dataset, segment_id, after=after, limit=self._chunk
                )
                if not members:
                    break
                after = members[-1]
                kept = await self._imports.staged_among(import_id, members)
                decisions = dict.fromkeys((m for m in members if m not in kept), False)
                if decisions:
                    await self._force(dataset, kind, segment_id, version, decisions)
                left += len(decisions)
        return joined, left

    async def _force(
        self, dataset: str, kind: Kind, segment_id: str, version: int, decisions: dict[str, bool]
    ) -> None:
        await self._processor.force(
            dataset, kind, segment_id, version, Cause.SEGMENT_CHANGED, decisions
        )

    async def _stage(self, import_id: int, chunks: AsyncIterator[Sequence[str] | bytes]) -> int:
        rejected = 0
        reader = _CsvIds()
        async for chunk in chunks:
            if isinstance(chunk, bytes):
                if len(chunk) > MAX_IMPORT_CSV_BYTES:
                    raise invalid_argument(
                        "A CSV chunk is at most 4 MiB.",
                        FieldViolation("csv", "at most 4 MiB a message."),
                    )
                ids, bad = reader.feed(chunk)
            else:
                if len(chunk) > MAX_IMPORT_IDS:
                    raise invalid_argument(
                        f"A chunk holds at most {MAX_IMPORT_IDS:,} ids.",
                        FieldViolation("ids.ids", f"at most {MAX_IMPORT_IDS:,} a message."),
                    )
                ids, bad = _valid(chunk)
            rejected += bad
            if ids:
                await self._imports.stage(import_id, ids)
        ids, bad = reader.finish()
        rejected += bad
        if ids:
            await self._imports.stage(import_id, ids)
        return rejected

    # Statistics.

    async def stats(self, dataset: str, segment_id: str, days: int) -> SegmentStats:
        record = await self.get(dataset, segment_id)
        today = self._clock() // _DAY
        first = today - days + 1
        base, rows = await self._store.days(dataset, segment_id, first)
        by_day = {row.day: row for row in rows}
        size = base
        history: list[tuple[int, int, int, int]] = []
        for day in range(first, today + 1):
            row = by_day.get(day)
            joins, leaves = (row.joins, row.leaves) if row is not None else (0, 0)
            size += joins - leaves
            history.append((day, size, joins, leaves))
        return SegmentStats(record.member_count, history)


def _valid(ids: Sequence[str]) -> tuple[list[str], int]:
    """The ids of an ``ImportedIds`` chunk that can be members, and how many are rejected
    (empty or too long).

    Raises:
        AudienceError: ``INVALID_ARGUMENT`` when an id holds a control character: a client
            sending one has split or decoded its list wrongly, so the upload is refused
            whole.
    """
    if has_control_character("".join(ids)):
        index = next(i for i, value in enumerate(ids) if has_control_character(value))
        raise invalid_argument(
            "A member id holds a control character.",
            FieldViolation(
                f"ids.ids[{index}]", "must not hold control characters (U+0000–U+001F)."
            ),
        )
    good = [value for value in ids if 0 < len(value) <= _MAX_ID]
    return good, len(ids) - len(good)


class _CsvIds:
    """Ids from CSV arriving in chunks that may split lines: the column named
    ``profile_id`` when the first line names one, else the first column."""

    def __init__(self) -> None:
        self._pending = b""
        self._column: int | None = None
        self._first = True

    def feed(self, chunk: bytes) -> tuple[list[str], int]:
        data = self._pending + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._pending = data
            return [], 0
        self._pending = data[cut + 1 :]
        return self._lines(data[: cut + 1])

    def finish(self) -> tuple[list[str], int]:
        data, self._pending = self._pending, b""
        return self._lines(data) if data.strip() else ([], 0)

    def _lines(self, data: bytes) -> tuple[list[str], int]:
        try:
            text = data.decode("utf-8-sig" if self._first else "utf-8")
        except UnicodeDecodeError:
            return [], data.count(b"\n") or 1
        ids: list[str] = []
        rejected = 0
        try:
            rows = list(csv.reader(io.StringIO(text)))
        except csv.Error:
            return [], len(text.splitlines())
        for row in rows:
            if self._first:
                self._first = False
                names = [cell.strip().lower() for cell in row]
                if "profile_id" in names:
                    self._column = names.index("profile_id")
                    continue
                self._column = 0
            if not row or not any(cell.strip() for cell in row):
                continue
            column = self._column or 0
            value = row[column].strip() if column < len(row) else ""
            if 0 < len(value) <= _MAX_ID and not has_control_character(value):
                ids.append(value)
            else:
                rejected += 1
        return ids, rejected
