"""Backoff, resource names, page tokens and destination settings."""

from __future__ import annotations

from datetime import timedelta

import pytest

from audience.errors import AudienceError
from services.export.domain.backoff import backoff
from services.export.domain.destinations import normalize_secret_reference, validate_target
from services.export.domain.model import FolderTarget, SftpTarget
from services.export.domain.names import (
    DESTINATIONS,
    check_new_id,
    parse_child,
    parse_dataset,
    parse_delivery,
    parse_segment,
)
from services.export.domain.pages import decode_token, encode_token, page_size

SECOND = timedelta(seconds=1)


def test_backoff_doubles_per_attempt_up_to_the_cap() -> None:
    waits = [backoff(n, SECOND, timedelta(seconds=10), 1.0) for n in range(1, 7)]

    assert waits == [SECOND * s for s in (1, 2, 4, 8, 10, 10)]


def test_jitter_spreads_waits_over_the_upper_half() -> None:
    assert backoff(3, SECOND, timedelta(hours=1), 0.0) == 2 * SECOND
    assert backoff(3, SECOND, timedelta(hours=1), 1.0) == 4 * SECOND
    assert backoff(1000, SECOND, timedelta(hours=1), 1.0) == timedelta(hours=1)


def test_names_are_parsed_and_must_belong_to_the_dataset() -> None:
    assert parse_dataset("datasets/shop") == "shop"
    assert parse_segment("datasets/shop/segments/vip", "s") == ("shop", "vip")
    assert parse_child("datasets/shop/destinations/sftp-1", DESTINATIONS) == ("shop", "sftp-1")
    delivery = "datasets/shop/webhookSubscriptions/w/deliveries/" + "a" * 32
    assert parse_delivery(delivery, "n") == ("shop", "w", "a" * 32)
    with pytest.raises(AudienceError):
        parse_segment("datasets/other/segments/vip", "s", dataset="shop")
    with pytest.raises(AudienceError):
        parse_child("datasets/shop/schedules/x", DESTINATIONS)
    with pytest.raises(AudienceError):
        parse_dataset("datasets/a/b")


@pytest.mark.parametrize("bad", ["", "1abc", "Abc", "a_b", "a" * 64])
def test_new_ids_are_lower_case_letters_digits_and_dashes(bad: str) -> None:
    with pytest.raises(AudienceError):
        check_new_id(bad, "id")


def test_page_tokens_round_trip_and_foreign_ones_are_refused() -> None:
    token = encode_token("jobs", ["2024-01-01T00:00:00+00:00", "j1"])

    assert decode_token(token, "jobs") == ["2024-01-01T00:00:00+00:00", "j1"]
    assert decode_token("", "jobs") is None
    with pytest.raises(AudienceError):
        decode_token(token, "schedules")
    with pytest.raises(AudienceError):
        decode_token("not base64!", "jobs")
    assert page_size(0) == 100
    with pytest.raises(AudienceError):
        page_size(1001)


def test_folders_must_lie_under_the_export_root() -> None:
    assert validate_target(FolderTarget("/exports/shop/"), "/exports", "d") == FolderTarget(
        "/exports/shop"
    )
    for bad in ("/etc", "/exports/../etc", "relative", "/exportsx"):
        with pytest.raises(AudienceError):
            validate_target(FolderTarget(bad), "/exports", "d")
    with pytest.raises(AudienceError, match="disabled"):
        validate_target(FolderTarget("/exports/a"), None, "d")


def test_sftp_settings_are_normalized_and_never_hold_the_credential() -> None:
    target = validate_target(
        SftpTarget("sftp.example.com", 0, "/in", "feed", "PARTNER_KEY", ""), None, "d"
    )

    assert target == SftpTarget(
        "sftp.example.com", 22, "/in", "feed", "AUDIENCE_SECRET_PARTNER_KEY", ""
    )
    assert normalize_secret_reference("AUDIENCE_SECRET_X", "f") == "AUDIENCE_SECRET_X"
    for bad in ("lower", "AUDIENCE_SECRET_", "HOME WORK"):
        with pytest.raises(AudienceError):
            normalize_secret_reference(bad, "f")


def test_host_keys_must_be_in_known_hosts_form() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxQ"
    base = SftpTarget("h", 22, "/in", "u", "AUDIENCE_SECRET_S", key)

    assert validate_target(base, None, "d") == base
    with_host = SftpTarget("h", 22, "/in", "u", "S", f"[h]:22 {key}")
    checked = validate_target(with_host, None, "d")
    assert isinstance(checked, SftpTarget)
    assert checked.known_host_key == f"[h]:22 {key}"
    for bad in ("garbage", "ssh-ed25519 !!!", "a b c d"):
        with pytest.raises(AudienceError):
            validate_target(SftpTarget("h", 22, "/in", "u", "S", bad), None, "d")
