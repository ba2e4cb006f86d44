"""Resume tokens of the membership change stream (see docs/adr/0003).

A token names a position in one dataset's change log: every change with a log sequence
number at or below ``sequence`` has been delivered. It is opaque to clients: URL-safe
base64 (no padding) of a small versioned struct::

    version  u8   (1)
    sequence u64  the log position
    time     i64  microseconds since the epoch: when the position was read, for retention
    dataset  u32  CRC-32 of the dataset id, so a token is not used on another dataset
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib
from dataclasses import dataclass

from audience.errors import FieldViolation, invalid_argument

__all__ = ["ResumePoint", "decode_token", "encode_token"]

_VERSION = 1
_LAYOUT = struct.Struct(">BQqI")


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """A decoded token: the log position and when it was read."""

    sequence: int
    time: int


def _dataset_tag(dataset: str) -> int:
    return zlib.crc32(dataset.encode())


def encode_token(dataset: str, sequence: int, time: int) -> str:
    packed = _LAYOUT.pack(_VERSION, sequence, time, _dataset_tag(dataset))
    return base64.urlsafe_b64encode(packed).rstrip(b"=").decode()


def decode_token(dataset: str, token: str, field: str = "resume_token") -> ResumePoint:
    """Reads a token made by :func:`encode_token` for ``dataset``.

    Raises:
        AudienceError: ``INVALID_ARGUMENT`` (reason ``INVALID_RESUME_TOKEN``) when the token
            is malformed, of another version, or of another dataset.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, sequence, time, tag = _LAYOUT.unpack(raw)
    except (binascii.Error, ValueError, struct.error):
        raise _bad(field, "is not a resume token of this service.") from None
    if version != _VERSION:
        raise _bad(field, f"has version {version}; this service reads version {_VERSION}.")
    if tag != _dataset_tag(dataset):
        raise _bad(field, "belongs to another dataset.")
    return ResumePoint(sequence, time)


def _bad(field: str, message: str) -> Exception:
    return invalid_argument(
        f"{field} {message}", FieldViolation(field, message), reason="INVALID_RESUME_TOKEN"
    )
