from __future__ import annotations

from datetime import timedelta

import google.rpc.error_details_pb2 as error_details_pb2
import grpc
import pytest

from audience import errors
from audience.errors import AudienceError, FieldViolation


@pytest.mark.parametrize("reason", ["not_found", "Not_Found", "NOT_FOUND_", "1_FAILED", "A" * 64])
def test_a_reason_must_be_upper_snake_case(reason: str) -> None:
    with pytest.raises(ValueError, match="UPPER_SNAKE_CASE"):
        AudienceError(grpc.StatusCode.NOT_FOUND, reason, "Missing.")


def test_an_error_cannot_be_ok() -> None:
    with pytest.raises(ValueError, match="OK"):
        AudienceError(grpc.StatusCode.OK, "FINE", "Fine.")


def test_the_status_holds_one_error_info_then_the_details_the_code_calls_for() -> None:
    status = errors.invalid_argument(
        "Bad rule.",
        FieldViolation("segment.rule.all.conditions[2].value", "must be a number"),
        reason="RULE_INVALID",
    ).to_status()

    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "Bad rule."
    assert [detail.TypeName() for detail in status.details] == [
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
    ]
    info = error_details_pb2.ErrorInfo.FromString(status.details[0].value)
    assert (info.reason, info.domain) == ("RULE_INVALID", "audience.dev")


def test_retry_info_rides_with_resource_exhausted() -> None:
    status = errors.resource_exhausted("Slow down.", timedelta(seconds=3)).to_status()

    retry = error_details_pb2.RetryInfo.FromString(status.details[1].value)
    assert retry.retry_delay.ToTimedelta() == timedelta(seconds=3)


def test_the_exception_reads_as_its_message() -> None:
    error = errors.aborted("Stale etag.", reason="ETAG_MISMATCH")

    assert str(error) == "Stale etag."
    assert repr(error) == "AudienceError(ABORTED, 'ETAG_MISMATCH', 'Stale etag.')"
