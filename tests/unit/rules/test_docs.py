"""Every example in docs/rules.md parses, prints exactly as written, and is valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from audience.rules import format_rule, parse_rule, rule_violations
from audience.v1 import segment_pb2

DOC = Path(__file__).parents[3] / "docs" / "rules.md"


def _examples() -> list[str]:
    """The lines of the plain code blocks; an indented line continues the one before."""
    blocks = re.findall(r"^```\n(.*?)^```", DOC.read_text(), flags=re.MULTILINE | re.DOTALL)
    examples: list[str] = []
    for block in blocks:
        for line in block.splitlines():
            if line.startswith(" ") and examples:
                examples[-1] += " " + line.strip()
            elif line.strip():
                examples.append(line)
    return examples


def test_the_document_has_examples() -> None:
    assert len(_examples()) > 40


@pytest.mark.parametrize("text", _examples())
def test_documented_example_is_canonical_and_valid(text: str) -> None:
    account = "users where" in text
    kind = segment_pb2.SEGMENT_KIND_ACCOUNT if account else segment_pb2.SEGMENT_KIND_USER
    rule = parse_rule(text)
    assert rule_violations(rule, kind) == []
    assert format_rule(rule) == text
