"""Comparisons in SQL, and the evaluation schema the SQL predicates run over.

The SQL predicate of a rule reads the profile service's ``profiles`` table, its
``aggregates`` document included (``evaluation_schema.sql``). Every value of a rule — operands,
attribute paths, aggregate ids, segment member lists, the instant ``now`` — is a bound
parameter; the only identifiers are the schema name (checked against a strict pattern and
quoted) and the fixed column names written here. So no rule can change the statement's
shape.

Each condition compiles to a two-valued boolean (``coalesce(…, false)`` or a ``CASE``
with an ``ELSE``): ``NOT`` of a condition is then its exact negation, as in Python, where a
SQL ``NULL`` would otherwise make ``NOT`` false too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from audience.rules.compare import NEGATIONS, FieldType, scalar_class
from audience.rules.values import Instant, datetime_from_micros, to_json
from audience.v1 import rule_pb2

__all__ = [
    "ImportedMembers",
    "SqlContext",
    "SqlQuery",
    "SqlSegment",
    "evaluation_schema_ddl",
    "quote_schema",
    "sql_test",
]

_O = rule_pb2.Operator
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_ORDERING: Mapping[int, str] = {
    _O.OPERATOR_GREATER_THAN: ">",
    _O.OPERATOR_GREATER_THAN_OR_EQUAL: ">=",
    _O.OPERATOR_LESS_THAN: "<",
    _O.OPERATOR_LESS_THAN_OR_EQUAL: "<=",
}


def quote_schema(schema: str) -> str:
    """The schema name, quoted. Lower-case letters, digits and ``_`` only."""
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"schema name {schema!r} must match {_SCHEMA.pattern}")
    return f'"{schema}"'


def evaluation_schema_ddl(schema: str) -> str:
    """The evaluation schema's DDL (``evaluation_schema.sql``) for the schema ``schema``."""
    text = resources.files("audience.rules").joinpath("evaluation_schema.sql").read_text()
    return text.replace("{schema}", quote_schema(schema))


@dataclass(frozen=True, slots=True)
class SqlQuery:
    """SQL text with positional parameters ``$1…$n`` and their values, in order."""

    text: str
    params: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ImportedMembers:
    """An imported segment for SQL: its member ids, bound as one ``text[]`` parameter."""

    profile_ids: Sequence[str]


class SqlSegment(Protocol):
    """A rule-based segment for SQL: its compiled rule, inlined as a sub-predicate."""

    def predicate_sql(self, ctx: SqlContext, alias: str) -> str: ...


class SqlContext:
    """One statement being built: its parameters, the schema, ``now`` and the segments."""

    def __init__(
        self,
        schema: str,
        now: int,
        segments: Mapping[str, SqlSegment | ImportedMembers],
    ) -> None:
        self.schema = quote_schema(schema)
        self.now = now
        self.segments = segments
        self.params: list[Any] = []
        self._now_param: str | None = None
        self._now_micros_param: str | None = None
        self._aliases = 0
        # Segments being inlined, outermost first: a guard against a cycle slipping through.
        self.inlining: list[str] = []

    def bind(self, value: Any, sql_type: str) -> str:
        self.params.append(value)
        return f"${len(self.params)}::{sql_type}"

    def bind_instant(self, micros: int) -> str:
        return self.bind(datetime_from_micros(micros), "timestamptz")

    @property
    def now_param(self) -> str:
        if self._now_param is None:
            self._now_param = self.bind_instant(self.now)
        return self._now_param

    @property
    def now_micros_param(self) -> str:
        """``now`` as integer microseconds, as the ``aggregates`` document holds instants."""
        if self._now_micros_param is None:
            self._now_micros_param = self.bind(self.now, "int8")
        return self._now_micros_param

    def alias(self, prefix: str) -> str:
        self._aliases += 1
        return f"{prefix}{self._aliases}"

    def table(self, name: str) -> str:
        return f"{self.schema}.{name}"


_SQL_TYPES = {
    FieldType.NUMBER: "float8",
    FieldType.STRING: "text",
    FieldType.BOOL: "boolean",
    FieldType.TIMESTAMP: "timestamptz",
}


def _bind_typed(ctx: SqlContext, value: object, field: FieldType) -> str:
    if field is FieldType.TIMESTAMP:
        assert isinstance(value, int)
        return ctx.bind_instant(value)
    if field is FieldType.NUMBER:
        assert isinstance(value, int | float)
        return ctx.bind(float(value), "float8")
    return ctx.bind(value, _SQL_TYPES[field])


def _bind_json(ctx: SqlContext, value: object) -> str:
    return ctx.bind(json.dumps(to_json(value), allow_nan=False), "jsonb")  # type: ignore[arg-type]


def sql_test(operator: int, operand: object, x: str, field: FieldType, ctx: SqlContext) -> str:
    """A two-valued SQL boolean: the comparison of the expression ``x`` with ``operand``.

    ``x`` is ``jsonb`` for :attr:`FieldType.ANY`, else of the field's SQL type; it may be
    repeated in the result, so it must be free of side effects (columns, paths, subqueries).
    """
    positive = NEGATIONS.get(operator)
    if positive is not None:
        return f"(NOT {sql_test(positive, operand, x, field, ctx)})"
    if field is FieldType.ANY:
        return _dynamic(operator, operand, x, ctx)
    return _typed(operator, operand, x, field, ctx)


def _jsonb_ordered(klass: str | None, x: str) -> tuple[str, str, str]:
    """The guard, the SQL value and its parameter type of a jsonb value of a scalar class."""
    if klass == "s":
        return f"jsonb_typeof({x}) = 'string'", f"({x} #>> '{{}}') COLLATE \"C\"", "text"
    if klass == "t":
        return f"jsonb_typeof({x} -> '$ts') = 'number'", f"({x} ->> '$ts')::bigint", "bigint"
    return f"jsonb_typeof({x}) = 'number'", f"({x})::float8", "float8"


def _ordered_operand(value: object) -> object:
    if isinstance(value, Instant):
        return int(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _dynamic(operator: int, operand: object, x: str, ctx: SqlContext) -> str:
    if operator == _O.OPERATOR_EXISTS:
        return f"coalesce(jsonb_typeof({x}) <> 'null', false)"
    if operator == _O.OPERATOR_IS_EMPTY:
        return f"coalesce({x} IN ('null'::jsonb, '\"\"'::jsonb, '[]'::jsonb, '{{}}'::jsonb), true)"
    if operator == _O.OPERATOR_EQUALS:
        return f"coalesce({x} = {_bind_json(ctx, operand)}, false)"
    if operator == _O.OPERATOR_IN:
        assert isinstance(operand, list)
        items = [json.dumps(to_json(item), allow_nan=False) for item in operand]
        return f"coalesce({x} = ANY({ctx.bind(items, 'jsonb[]')}), false)"
    if operator == _O.OPERATOR_CONTAINS:
        element = (
            f"EXISTS (SELECT 1 FROM jsonb_array_elements({x}) AS e(v) "
            f"WHERE e.v = {_bind_json(ctx, operand)})"
        )
        if isinstance(operand, str):
            text = ctx.bind(operand, "text")
            return (
                f"(CASE jsonb_typeof({x}) WHEN 'string' THEN strpos({x} #>> '{{}}', {text}) > 0"
                f" WHEN 'array' THEN {element} ELSE false END)"
            )
        return f"(CASE WHEN jsonb_typeof({x}) = 'array' THEN {element} ELSE false END)"
    if operator == _O.OPERATOR_STARTS_WITH:
        text = ctx.bind(operand, "text")
        return (
            f"(CASE WHEN jsonb_typeof({x}) = 'string' THEN starts_with({x} #>> '{{}}', {text})"
            " ELSE false END)"
        )
    if operator == _O.OPERATOR_ENDS_WITH:
        text = ctx.bind(operand, "text")
        return (
            f"(CASE WHEN jsonb_typeof({x}) = 'string'"
            f" THEN right({x} #>> '{{}}', length({text})) = {text} ELSE false END)"
        )
    if operator in _ORDERING:
        guard, value, sql_type = _jsonb_ordered(scalar_class(operand), x)
        bound = ctx.bind(_ordered_operand(operand), sql_type)
        return f"(CASE WHEN {guard} THEN {value} {_ORDERING[operator]} {bound} ELSE false END)"
    if operator == _O.OPERATOR_BETWEEN:
        assert isinstance(operand, tuple)
        guard, value, sql_type = _jsonb_ordered(scalar_class(operand[0]), x)
        low = ctx.bind(_ordered_operand(operand[0]), sql_type)
        high = ctx.bind(_ordered_operand(operand[1]), sql_type)
        return f"(CASE WHEN {guard} THEN {value} BETWEEN {low} AND {high} ELSE false END)"
    raise ValueError(f"operator {operator} has no SQL form")


def _typed(operator: int, operand: object, x: str, field: FieldType, ctx: SqlContext) -> str:
    if operator == _O.OPERATOR_EXISTS:
        return f"({x} IS NOT NULL)"
    if operator == _O.OPERATOR_IS_EMPTY:
        if field is FieldType.STRING:
            return f"coalesce({x} = '', true)"
        return f"({x} IS NULL)"
    if operator == _O.OPERATOR_EQUALS:
        return f"coalesce({x} = {_bind_typed(ctx, operand, field)}, false)"
    if operator == _O.OPERATOR_IN:
        assert isinstance(operand, list)
        if field is FieldType.TIMESTAMP:
            items: list[Any] = [datetime_from_micros(item) for item in operand]
        elif field is FieldType.NUMBER:
            items = [float(item) for item in operand]
        else:
            items = list(operand)
        bound = ctx.bind(items, _SQL_TYPES[field] + "[]")
        return f"coalesce({x} = ANY({bound}), false)"
    if operator == _O.OPERATOR_CONTAINS:
        return f"coalesce(strpos({x}, {ctx.bind(operand, 'text')}) > 0, false)"
    if operator == _O.OPERATOR_STARTS_WITH:
        return f"coalesce(starts_with({x}, {ctx.bind(operand, 'text')}), false)"
    if operator == _O.OPERATOR_ENDS_WITH:
        text = ctx.bind(operand, "text")
        return f"coalesce(right({x}, length({text})) = {text}, false)"
    collated = f'({x}) COLLATE "C"' if field is FieldType.STRING else x
    if operator in _ORDERING:
        bound = _bind_typed(ctx, operand, field)
        return f"coalesce({collated} {_ORDERING[operator]} {bound}, false)"
    if operator == _O.OPERATOR_BETWEEN:
        assert isinstance(operand, tuple)
        low = _bind_typed(ctx, operand[0], field)
        high = _bind_typed(ctx, operand[1], field)
        return f"coalesce({collated} BETWEEN {low} AND {high}, false)"
    raise ValueError(f"operator {operator} has no SQL form")
