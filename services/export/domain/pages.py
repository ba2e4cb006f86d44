"""Page tokens and page sizes of the List methods."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from audience.errors import FieldViolation, invalid_argument

__all__ = ["decode_token", "encode_token", "page_size"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def encode_token(kind: str, position: list[Any]) -> str:
    """An opaque token for the page after ``position``; ``kind`` ties it to one method."""
    raw = json.dumps([kind, position], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, kind: str, field: str = "page_token") -> list[Any] | None:
    """The position in ``token``, or None for the first page; rejects foreign tokens."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or decoded[0] != kind
        or not isinstance(decoded[1], list)
    ):
        description = "not a page token of this method; pass a next_page_token unchanged"
        raise invalid_argument(f"{field}: {description}", FieldViolation(field, description))
    position: list[Any] = decoded[1]
    return position


def page_size(value: int, field: str = "page_size") -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        description = f"from 1 to {MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}"
        raise invalid_argument(f"{field}: {description}", FieldViolation(field, description))
    return value
