"""Comparisons in Python: operators and operands turned into source for generated code.

Rules compile to Python source (see ``compiler``) so that a predicate runs as fast as a hand
written one. Nothing from a rule is ever spliced into that source: every operand, path and
aggregate id becomes a constant in the namespace the code runs in (:class:`Namespace`), and
the source holds only fixed templates and generated names.

The semantics here and in ``sql`` are one definition, tested to agree:

- A comparison is typed: a value of one type never equals or orders with another (the
  number ``1`` is not the string ``"1"``, nor ``true``, nor a timestamp).
- A missing or null value is false for every operator except ``NOT_EXISTS`` and
  ``IS_EMPTY``; the negative operators (``NOT_EQUALS``, ``NOT_IN``, ``NOT_CONTAINS``,
  ``NOT_EXISTS``, ``IS_NOT_EMPTY``) are the exact negations of the positive ones.
- Strings compare exactly, and order by code point.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from audience.rules.values import AttrValue, Instant, value_from_proto
from audience.v1 import rule_pb2

__all__ = [
    "NEGATIONS",
    "FieldType",
    "Namespace",
    "Var",
    "comparison_operand",
    "is_empty",
    "list_has",
    "lookup",
    "scalar_class",
    "test_source",
]

_O = rule_pb2.Operator

# Each negative operator and the positive one it negates.
NEGATIONS: Mapping[int, int] = {
    _O.OPERATOR_NOT_EQUALS: _O.OPERATOR_EQUALS,
    _O.OPERATOR_NOT_IN: _O.OPERATOR_IN,
    _O.OPERATOR_NOT_CONTAINS: _O.OPERATOR_CONTAINS,
    _O.OPERATOR_NOT_EXISTS: _O.OPERATOR_EXISTS,
    _O.OPERATOR_IS_NOT_EMPTY: _O.OPERATOR_IS_EMPTY,
}

_ORDERING: Mapping[int, str] = {
    _O.OPERATOR_GREATER_THAN: ">",
    _O.OPERATOR_GREATER_THAN_OR_EQUAL: ">=",
    _O.OPERATOR_LESS_THAN: "<",
    _O.OPERATOR_LESS_THAN_OR_EQUAL: "<=",
}


_NO_OPERAND = frozenset(
    {
        _O.OPERATOR_EXISTS,
        _O.OPERATOR_NOT_EXISTS,
        _O.OPERATOR_IS_EMPTY,
        _O.OPERATOR_IS_NOT_EMPTY,
    }
)


def comparison_operand(comparison: rule_pb2.Comparison) -> tuple[int, object]:
    """The operator and its operand in Python form (see ``test_source``)."""
    operator = comparison.operator
    if operator in _NO_OPERAND:
        return operator, None
    if operator in (_O.OPERATOR_IN, _O.OPERATOR_NOT_IN):
        return operator, [value_from_proto(item) for item in comparison.value.list_value.values]
    if operator == _O.OPERATOR_BETWEEN:
        low, high = comparison.value.list_value.values
        return operator, (value_from_proto(low), value_from_proto(high))
    return operator, value_from_proto(comparison.value)


class FieldType(enum.Enum):
    """What a compared field holds."""

    # An attribute or event property: any value, its type known only when read.
    ANY = "any"
    NUMBER = "number"
    STRING = "string"
    BOOL = "bool"
    # Microseconds since the epoch (a plain int; Instant only inside attributes).
    TIMESTAMP = "timestamp"


def scalar_class(value: object) -> str | None:
    """``s``, ``n``, ``b`` or ``t`` for a string, number, bool or instant; else ``None``."""
    kind = type(value)
    if kind is str:
        return "s"
    if kind is float or kind is int:
        return "n"
    if kind is bool:
        return "b"
    if kind is Instant:
        return "t"
    return None


def lookup(mapping: Mapping[str, AttrValue], keys: tuple[str, ...]) -> AttrValue:
    """The value at a dotted path, through maps only (a list is never indexed)."""
    value: object = mapping.get(keys[0])
    for key in keys[1:]:
        if type(value) is not dict:
            return None
        value = value.get(key)
    result: AttrValue = value  # type: ignore[assignment]  # maps hold attribute values
    return result


def is_empty(value: object) -> bool:
    return value is None or value == "" or (type(value) in (list, dict) and not value)


def list_has(values: list[AttrValue], operand: object) -> bool:
    """Whether a list holds a scalar equal to ``operand`` and of its type."""
    wanted = scalar_class(operand)
    return any(scalar_class(item) == wanted and item == operand for item in values)


class Namespace:
    """The constants and helpers generated code refers to, by generated name."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {
            "Instant": Instant,
            "_lookup": lookup,
            "_is_empty": is_empty,
            "_list_has": list_has,
        }
        self._count = 0

    def const(self, value: object) -> str:
        name = f"_c{self._count}"
        self._count += 1
        self.values[name] = value
        return name

    def helper(self, name: str, function: Callable[..., Any]) -> str:
        self.values[name] = function
        return name

    def fresh(self, prefix: str) -> str:
        name = f"{prefix}{self._count}"
        self._count += 1
        return name


class Var:
    """A value read once: the first use in the source binds it, later uses read the name.

    Templates write the variable in evaluation order, so the binding runs before any read.
    """

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self._bound = False

    def __str__(self) -> str:
        if self._bound:
            return self.name
        self._bound = True
        return f"({self.name} := {self.source})"


_GUARDS: Mapping[str, Callable[[Var], str]] = {
    "s": lambda x: f"type({x}) is str",
    "n": lambda x: f"(type({x}) is float or type({x}) is int)",
    "b": lambda x: f"type({x}) is bool",
    "t": lambda x: f"type({x}) is Instant",
}


def _classes(values: Sequence[object]) -> dict[str, list[object]]:
    grouped: dict[str, list[object]] = {}
    for value in values:
        grouped.setdefault(scalar_class(value) or "?", []).append(value)
    return grouped


def test_source(operator: int, operand: object, x: Var, field: FieldType, ns: Namespace) -> str:
    """A Python boolean expression: the comparison of ``x`` with ``operand``.

    ``operand`` is a scalar, a list (``IN``, ``NOT_IN``), a ``(low, high)`` pair
    (``BETWEEN``) or ``None`` (the existence operators); the rule was validated, so its type
    suits ``field`` and ``operator``.
    """
    positive = NEGATIONS.get(operator)
    if positive is not None:
        return f"not ({test_source(positive, operand, x, field, ns)})"
    if field is FieldType.ANY:
        return _dynamic(operator, operand, x, ns)
    return _typed(operator, operand, x, field, ns)


def _dynamic(operator: int, operand: object, x: Var, ns: Namespace) -> str:
    if operator == _O.OPERATOR_EXISTS:
        return f"{x} is not None"
    if operator == _O.OPERATOR_IS_EMPTY:
        return f"_is_empty({x.source})"
    if operator == _O.OPERATOR_EQUALS:
        c = ns.const(operand)
        klass = scalar_class(operand)
        if klass == "s":
            return f"{x} == {c}"
        if klass == "b":
            return f"{x} is {c}"
        return f"({_GUARDS[klass or 'n'](x)} and {x} == {c})"
    if operator == _O.OPERATOR_IN:
        assert isinstance(operand, list)
        parts = []
        for klass, members in _classes(operand).items():
            group = ns.const(frozenset(members))
            parts.append(f"({_GUARDS[klass](x)} and {x} in {group})")
        return "(" + " or ".join(parts) + ")" if parts else "False"
    if operator == _O.OPERATOR_CONTAINS:
        c = ns.const(operand)
        if isinstance(operand, str):
            # A substring of a string, or an element of a list: a string equals only a string.
            return f"((type({x}) is str or type({x}) is list) and {c} in {x})"
        return f"(type({x}) is list and _list_has({x}, {c}))"
    if operator in (_O.OPERATOR_STARTS_WITH, _O.OPERATOR_ENDS_WITH):
        c = ns.const(operand)
        method = "startswith" if operator == _O.OPERATOR_STARTS_WITH else "endswith"
        return f"(type({x}) is str and {x}.{method}({c}))"
    if operator in _ORDERING:
        c = ns.const(operand)
        return f"({_GUARDS[scalar_class(operand) or 'n'](x)} and {x} {_ORDERING[operator]} {c})"
    if operator == _O.OPERATOR_BETWEEN:
        assert isinstance(operand, tuple)
        low, high = ns.const(operand[0]), ns.const(operand[1])
        return f"({_GUARDS[scalar_class(operand[0]) or 'n'](x)} and {low} <= {x} <= {high})"
    raise ValueError(f"operator {operator} has no Python form")


def _typed(operator: int, operand: object, x: Var, field: FieldType, ns: Namespace) -> str:
    if operator == _O.OPERATOR_EXISTS:
        return f"{x} is not None"
    if operator == _O.OPERATOR_IS_EMPTY:
        return f"not {x}" if field is FieldType.STRING else f"{x} is None"
    if operator == _O.OPERATOR_EQUALS:
        c = ns.const(operand)
        return f"{x} is {c}" if field is FieldType.BOOL else f"{x} == {c}"
    if operator == _O.OPERATOR_IN:
        assert isinstance(operand, list)
        return f"{x} in {ns.const(frozenset(operand))}"
    if operator == _O.OPERATOR_CONTAINS:
        return f"({x} is not None and {ns.const(operand)} in {x})"
    if operator in (_O.OPERATOR_STARTS_WITH, _O.OPERATOR_ENDS_WITH):
        method = "startswith" if operator == _O.OPERATOR_STARTS_WITH else "endswith"
        return f"({x} is not None and {x}.{method}({ns.const(operand)}))"
    if operator in _ORDERING:
        return f"({x} is not None and {x} {_ORDERING[operator]} {ns.const(operand)})"
    if operator == _O.OPERATOR_BETWEEN:
        assert isinstance(operand, tuple)
        low, high = ns.const(operand[0]), ns.const(operand[1])
        return f"({x} is not None and {low} <= {x} <= {high})"
    raise ValueError(f"operator {operator} has no Python form")
