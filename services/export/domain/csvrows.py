"""CSV encoding: RFC 4180 quoting, formula-injection escaping, and whole pages of rows.

Rows end with CRLF (RFC 4180). A cell beginning with ``=``, ``+``, ``-``, ``@``, tab, CR or
NUL gets a leading ``'`` so that spreadsheets show it as text instead of evaluating it
(OWASP's CSV injection advice); a cell holding ``"``, ``,``, CR or LF is quoted, with
inner quotes doubled.

Pages are encoded column by column: a segment's id is escaped once per page, join times
are formatted once per distinct second, and a column of ids is checked in one regular
expression pass before any per-cell work. Exports of millions of rows depend on it.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat

from audience.errors import FieldViolation, invalid_argument
from services.export.domain.model import (
    AttributeColumn,
    AttributeValue,
    ChangeKind,
    Column,
    ExportField,
    ExportMode,
    FieldColumn,
    IdentityColumn,
    MemberPage,
    ProfileData,
)

__all__ = [
    "MAX_COLUMNS",
    "CsvLayout",
    "DeltaRow",
    "TimeFormatter",
    "default_columns",
    "encode_row",
    "escape_cell",
    "escape_column",
    "format_attribute",
    "lookup_attribute",
    "rfc3339",
    "validate_columns",
]

FORMULA_TRIGGERS = frozenset("=+-@\t\r\x00")
MAX_COLUMNS = 100
MAX_HEADER_LENGTH = 256
CRLF = "\r\n"

_NEEDS_QUOTES = re.compile(r'[",\r\n]')
# Over a column joined with "\n": a trigger at the start of any cell, or a character that
# needs quoting anywhere. Cells holding "\n" themselves are caught by counting lines.
_COLUMN_NEEDS_WORK = re.compile(r'(?m)^[=+\-@\t\r\x00]|[",\r]')
_IDENTITY_TYPE = re.compile(r"[a-z0-9_]{1,64}")
_ATTRIBUTE_PATH = re.compile(r"[A-Za-z0-9_-]{1,128}(?:\.[A-Za-z0-9_-]{1,128}){0,7}")


def escape_cell(value: str) -> str:
    """Returns ``value`` as one CSV cell: formula-escaped, then quoted when needed."""
    if value and value[0] in FORMULA_TRIGGERS:
        value = "'" + value
    if _NEEDS_QUOTES.search(value):
        return '"' + value.replace('"', '""') + '"'
    return value


def escape_column(values: Sequence[str]) -> Sequence[str]:
    """Escapes many cells; returns ``values`` itself when none needs escaping."""
    joined = "\n".join(values)
    if joined.count("\n") == len(values) - 1 and not _COLUMN_NEEDS_WORK.search(joined):
        return values
    return [escape_cell(value) for value in values]


def encode_row(cells: Iterable[str]) -> str:
    """Returns one CSV record, with its CRLF."""
    escaped = [escape_cell(cell) for cell in cells]
    if escaped == [""]:
        # A lone empty cell would be an empty line, which readers take for no record at all.
        return '""' + CRLF
    return ",".join(escaped) + CRLF


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, such as ``2024-05-01T12:00:00.000000Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class TimeFormatter:
    """Formats instants in microseconds since the Unix epoch as :func:`rfc3339` does.

    The part down to the second is cached (members imported or backfilled together share
    their join second), so a page's times cost a dictionary look-up and two integer
    operations each, all done in C.
    """

    _LIMIT = 65536

    def __init__(self) -> None:
        self._seconds: dict[int, str] = {}

    def _base(self, seconds: int) -> str:
        base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        self._seconds[seconds] = base
        return base

    def format(self, micros: int) -> str:
        seconds, fraction = divmod(micros, 1_000_000)
        base = self._seconds.get(seconds) or self._base(seconds)
        return f"{base}.{fraction:06d}Z"

    def columns(self, micros: Sequence[int]) -> tuple[list[str], list[int]]:
        """``YYYY-MM-DDTHH:MM:SS`` of each instant, and its microseconds past the second."""
        seconds = list(map(operator.floordiv, micros, repeat(1_000_000)))
        cache = self._seconds
        if len(cache) >= self._LIMIT:
            cache.clear()
        for missing in set(seconds).difference(cache):
            self._base(missing)
        return (
            list(map(cache.__getitem__, seconds)),
            list(map(operator.mod, micros, repeat(1_000_000))),
        )


def lookup_attribute(attributes: Mapping[str, AttributeValue], path: str) -> AttributeValue:
    """The attribute at ``path``: a key as written (``address.city``), else nested maps."""
    if path in attributes:
        return attributes[path]
    head, *rest = path.split(".")
    value: object = attributes.get(head)
    for part in rest:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value  # type: ignore[return-value]


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def format_attribute(value: AttributeValue) -> str:
    """An attribute as cell text: numbers without a needless ``.0``, lists and maps as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return rfc3339(value)
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=_json_default
    )


def default_columns(mode: ExportMode) -> tuple[Column, ...]:
    fields = [ExportField.PROFILE_ID, ExportField.SEGMENT_ID, ExportField.JOIN_TIME]
    if mode is ExportMode.DELTA:
        fields += [ExportField.CHANGE, ExportField.CHANGE_TIME]
    return tuple(FieldColumn(field, field.value) for field in fields)


def validate_columns(columns: Sequence[Column], field: str = "columns") -> None:
    violations: list[FieldViolation] = []
    if len(columns) > MAX_COLUMNS:
        violations.append(FieldViolation(field, f"at most {MAX_COLUMNS} columns"))
    for index, column in enumerate(columns):
        path = f"{field}[{index}]"
        if len(column.header) > MAX_HEADER_LENGTH:
            violations.append(
                FieldViolation(f"{path}.header", f"at most {MAX_HEADER_LENGTH} characters")
            )
        if isinstance(column, IdentityColumn) and not _IDENTITY_TYPE.fullmatch(
            column.identity_type
        ):
            violations.append(
                FieldViolation(
                    f"{path}.identity_type",
                    "1-64 lower-case letters, digits and '_', such as email or crm_id",
                )
            )
        if isinstance(column, AttributeColumn) and not _ATTRIBUTE_PATH.fullmatch(column.path):
            violations.append(
                FieldViolation(
                    f"{path}.attribute_path",
                    "names of letters, digits, '_' and '-' joined by '.', at most 8 deep",
                )
            )
    if violations:
        raise invalid_argument("The export columns are not valid.", *violations)


@dataclass(frozen=True, slots=True)
class DeltaRow:
    """One line of a delta file: the net change of one member in one segment."""

    member_id: str
    segment_id: str
    segment_version: int
    kind: ChangeKind
    change_time: datetime


def _lone(cells: Sequence[str]) -> list[str]:
    """Cells of a one-column file: an empty one is written ``""`` so the line is not blank."""
    return [cell or '""' for cell in cells]


def _profile_cells(
    column: IdentityColumn | AttributeColumn, profiles: Sequence[ProfileData]
) -> Sequence[str]:
    if isinstance(column, IdentityColumn):
        kind = column.identity_type
        return escape_column([profile.identities.get(kind, "") for profile in profiles])
    path = column.path
    return escape_column(
        [format_attribute(lookup_attribute(profile.attributes, path)) for profile in profiles]
    )


class CsvLayout:
    """Turns pages of memberships, or delta rows, into CSV text with a fixed set of columns.

    Full exports fill ``change`` with ``join`` and ``change_time`` with the join time, so a
    full snapshot (the first run of a delta feed) reads like a delta of joins.
    """

    def __init__(self, columns: Sequence[Column], mode: ExportMode) -> None:
        self.columns: tuple[Column, ...] = tuple(columns) or default_columns(mode)
        self.mode = mode
        self.needs_profiles = any(
            isinstance(column, IdentityColumn | AttributeColumn) for column in self.columns
        )
        self._times = TimeFormatter()

    def header(self) -> str:
        return encode_row(column.header for column in self.columns)

    @property
    def needs_versions(self) -> bool:
        return any(
            isinstance(column, FieldColumn) and column.field is ExportField.SEGMENT_VERSION
            for column in self.columns
        )

    def _lines(self, cells: list[Sequence[str]], count: int) -> str:
        if count == 0:
            return ""
        if len(cells) == 1:
            only = cells[0]
            return CRLF.join(cell or '""' for cell in only) + CRLF
        return CRLF.join(map(",".join, zip(*cells, strict=True))) + CRLF

    def encode_members(
        self, page: MemberPage, profiles: Mapping[str, ProfileData | None] | None = None
    ) -> tuple[str, int]:
        """Returns the CSV lines of ``page`` and their count.

        With ``profiles`` (needed when :attr:`needs_profiles`), members without a profile
        (erased since the page was read) are left out.

        The page is formatted in one ``%`` operation over a row template repeated once per
        member: constant cells (the segment, ``join``) are written into the template, and
        the varying ones are laid out column by column into one flat tuple.
        """
        ids = page.member_ids
        versions = page.versions
        join_micros = page.join_micros
        found: list[ProfileData] = []
        if self.needs_profiles:
            if profiles is None:
                raise ValueError("this layout needs the members' profiles")
            keep = [i for i, member in enumerate(ids) if profiles.get(member) is not None]
            if len(keep) != len(ids):
                ids = [ids[i] for i in keep]
                versions = [versions[i] for i in keep] if versions is not None else None
                join_micros = [join_micros[i] for i in keep]
            found = [profiles[member] for member in ids]  # type: ignore[misc]
        count = len(ids)
        if count == 0:
            return "", 0
        lone = len(self.columns) == 1
        template: list[str] = []
        slots: list[Sequence[object]] = []
        times: tuple[list[str], list[int]] | None = None
        for column in self.columns:
            if isinstance(column, FieldColumn):
                field = column.field
                if field is ExportField.PROFILE_ID:
                    template.append("%s")
                    slots.append(_lone(escape_column(ids)) if lone else escape_column(ids))
                elif field is ExportField.SEGMENT_ID:
                    template.append(escape_cell(page.segment_id).replace("%", "%%"))
                elif field in (ExportField.JOIN_TIME, ExportField.CHANGE_TIME):
                    if times is None:
                        times = self._times.columns(join_micros)
                    template.append("%s.%06dZ")
                    slots.extend(times)
                elif field is ExportField.CHANGE:
                    template.append(ChangeKind.JOIN.value)
                else:
                    if versions is None:
                        raise ValueError("this layout needs the members' segment versions")
                    template.append("%d")
                    slots.append(versions)
            else:
                cells = _profile_cells(column, found)
                template.append("%s")
                slots.append(_lone(cells) if lone else cells)
        row = ",".join(template) + CRLF
        if not slots:
            return row * count, count
        width = len(slots)
        flat: list[object] = [None] * (width * count)
        for index, values in enumerate(slots):
            flat[index::width] = values
        return (row * count) % tuple(flat), count

    def encode_changes(
        self,
        rows: Sequence[DeltaRow],
        profiles: Mapping[str, ProfileData | None] | None = None,
    ) -> tuple[str, int]:
        """Returns the CSV lines of delta ``rows`` and their count.

        With ``profiles`` (needed when :attr:`needs_profiles`), rows of members without a
        profile (erased) are left out.
        """
        kept: list[DeltaRow] = list(rows)
        found: list[ProfileData] = []
        if self.needs_profiles:
            if profiles is None:
                raise ValueError("this layout needs the members' profiles")
            kept = [row for row in rows if profiles.get(row.member_id) is not None]
            found = [profiles[row.member_id] for row in kept]  # type: ignore[misc]
        cells: list[Sequence[str]] = []
        for column in self.columns:
            if isinstance(column, FieldColumn):
                field = column.field
                if field is ExportField.PROFILE_ID:
                    cells.append(escape_column([row.member_id for row in kept]))
                elif field is ExportField.SEGMENT_ID:
                    cells.append([escape_cell(row.segment_id) for row in kept])
                elif field is ExportField.JOIN_TIME:
                    cells.append(
                        [
                            rfc3339(row.change_time) if row.kind is ChangeKind.JOIN else ""
                            for row in kept
                        ]
                    )
                elif field is ExportField.CHANGE:
                    cells.append([row.kind.value for row in kept])
                elif field is ExportField.CHANGE_TIME:
                    cells.append([rfc3339(row.change_time) for row in kept])
                else:
                    cells.append([str(row.segment_version) for row in kept])
            else:
                cells.append(_profile_cells(column, found))
        return self._lines(cells, len(kept)), len(kept)
