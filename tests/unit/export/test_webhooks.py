"""Webhook signatures, payloads and subscription settings."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest

from audience.errors import AudienceError
from services.export.domain.model import ChangeKind, MembershipChange
from services.export.domain.webhooks import (
    DEFAULT_MAX_ATTEMPTS,
    headers,
    payload,
    sign,
    validate_max_attempts,
    validate_secret,
    validate_url,
    verify,
)

SECRET = "s3cret-s3cret-s3cret"


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = '{"id":"x"}'
    expected = hmac.new(SECRET.encode(), b'1700000000.{"id":"x"}', hashlib.sha256).hexdigest()

    assert sign(SECRET, 1700000000, body) == f"sha256={expected}"
    assert verify(SECRET, "1700000000", body, f"sha256={expected}")
    assert not verify(SECRET, "1700000001", body, f"sha256={expected}")
    assert not verify("another-secret-value", "1700000000", body, f"sha256={expected}")


def test_requests_carry_the_delivery_id_timestamp_and_signature() -> None:
    sent = headers("d1", SECRET, 1700000000, "{}")

    assert sent["Audience-Delivery"] == "d1"
    assert sent["Audience-Timestamp"] == "1700000000"
    assert verify(SECRET, sent["Audience-Timestamp"], "{}", sent["Audience-Signature"])
    assert sent["Content-Type"] == "application/json"


def test_the_payload_describes_the_change() -> None:
    change = MembershipChange(
        resume_token="t",
        member="datasets/d/profiles/p1",
        member_id="p1",
        segment_id="vip",
        segment_version=3,
        kind=ChangeKind.LEAVE,
        change_time=datetime(2024, 5, 1, 9, 0, tzinfo=UTC),
        member_sequence=7,
        cause="event",
        reason={"cause": "event", "event_ids": ["e1"]},
    )

    document = json.loads(
        payload("d1", "datasets/d/webhookSubscriptions/w", "datasets/d/segments/vip", change)
    )

    assert document == {
        "id": "d1",
        "type": "membership.leave",
        "subscription": "datasets/d/webhookSubscriptions/w",
        "member": "datasets/d/profiles/p1",
        "member_id": "p1",
        "segment": "datasets/d/segments/vip",
        "segment_version": 3,
        "kind": "leave",
        "change_time": "2024-05-01T09:00:00.000000Z",
        "member_sequence": 7,
        "reason": {"cause": "event", "event_ids": ["e1"]},
    }


@pytest.mark.parametrize(
    "url",
    ["ftp://x/y", "http://", "example.com/hook", "https://user:pw@example.com/", "http://x:99999/"],
)
def test_urls_other_than_plain_http_or_https_are_refused(url: str) -> None:
    with pytest.raises(AudienceError):
        validate_url(url)


def test_secrets_are_16_to_256_characters() -> None:
    assert validate_secret("x" * 16) == "x" * 16
    for bad in ("x" * 15, "x" * 257):
        with pytest.raises(AudienceError):
            validate_secret(bad)


def test_max_attempts_defaults_to_8_and_is_at_most_20() -> None:
    assert validate_max_attempts(0) == DEFAULT_MAX_ATTEMPTS == 8
    assert validate_max_attempts(20) == 20
    for bad in (-1, 21):
        with pytest.raises(AudienceError):
            validate_max_attempts(bad)
