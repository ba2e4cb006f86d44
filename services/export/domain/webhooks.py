"""Webhook payloads, their signature, and subscription settings."""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import urlsplit

from audience.errors import FieldViolation, invalid_argument
from services.export.domain.csvrows import rfc3339
from services.export.domain.model import MembershipChange

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "MAX_ATTEMPTS",
    "headers",
    "payload",
    "sign",
    "validate_max_attempts",
    "validate_secret",
    "validate_url",
    "verify",
]

DEFAULT_MAX_ATTEMPTS = 8
MAX_ATTEMPTS = 20
MIN_SECRET = 16
MAX_SECRET = 256
MAX_URL = 2048
SIGNATURE_PREFIX = "sha256="


def sign(secret: str, timestamp: int, body: str) -> str:
    """``sha256=`` + hex HMAC-SHA256 of ``{timestamp}.{body}`` keyed with ``secret``."""
    message = f"{timestamp}.{body}".encode()
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, body: str, signature: str) -> bool:
    """Checks a signature as a receiver would, in constant time."""
    if not timestamp.isdigit():
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


def headers(delivery_id: str, secret: str, timestamp: int, body: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Audience-Delivery": delivery_id,
        "Audience-Timestamp": str(timestamp),
        "Audience-Signature": sign(secret, timestamp, body),
    }


def payload(delivery_id: str, subscription: str, segment: str, change: MembershipChange) -> str:
    """The JSON body POSTed for ``change``; ``subscription`` and ``segment`` are resource
    names."""
    document = {
        "id": delivery_id,
        "type": f"membership.{change.kind.value}",
        "subscription": subscription,
        "member": change.member,
        "member_id": change.member_id,
        "segment": segment,
        "segment_version": change.segment_version,
        "kind": change.kind.value,
        "change_time": rfc3339(change.change_time),
        "member_sequence": change.member_sequence,
        "reason": change.reason,
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def _bad(field: str, description: str) -> Exception:
    return invalid_argument(f"{field}: {description}", FieldViolation(field, description))


def validate_url(url: str, field: str = "url") -> str:
    if len(url) > MAX_URL:
        raise _bad(field, f"at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port rejects a port out of range
    except ValueError as error:
        raise _bad(field, f"not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise _bad(field, f"an http:// or https:// URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise _bad(field, "must not hold credentials; the signature authenticates requests")
    return url


def validate_secret(secret: str, field: str = "secret") -> str:
    if not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise _bad(field, f"{MIN_SECRET}-{MAX_SECRET} characters")
    return secret


def validate_max_attempts(value: int, field: str = "max_attempts") -> int:
    if value == 0:
        return DEFAULT_MAX_ATTEMPTS
    if not 1 <= value <= MAX_ATTEMPTS:
        raise _bad(field, f"from 1 to {MAX_ATTEMPTS}, or 0 for {DEFAULT_MAX_ATTEMPTS}")
    return value
