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


def test_a_status_echoing_an_oversized_input_stays_small_enough_for_the_trailers() -> None:
    huge = "é" * 100_000
    status = errors.AudienceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "ECHOED",
        f"Bad name {huge!r}.",
        metadata={"name": huge},
        violations=tuple(FieldViolation(f"names[{i}]", f"bad: {huge}") for i in range(1_000)),
        resource_type="audience.dev/Segment",
        resource_name=huge,
    ).to_status()

    assert len(status.message.encode()) <= errors.MAX_MESSAGE_BYTES
    assert status.message.endswith("more field violations left out.)")
    assert sum(detail.ByteSize() for detail in status.details) <= errors.MAX_DETAILS_BYTES + 64
    bad_request = error_details_pb2.BadRequest.FromString(status.details[1].value)
    assert bad_request.field_violations[0].field == "names[0]"
    assert bad_request.field_violations[0].description.endswith("…")
    info = error_details_pb2.ErrorInfo.FromString(status.details[0].value)
    assert len(info.metadata["name"].encode()) <= errors.MAX_TEXT_BYTES


def test_a_status_within_the_limits_is_sent_as_it_is() -> None:
    name = "datasets/shop/profiles/" + "p" * 256
    status = errors.not_found("audience.dev/Profile", name).to_status()

    info = error_details_pb2.ErrorInfo.FromString(status.details[0].value)
    assert info.metadata["resource_name"] == name
    assert status.message == f"audience.dev/Profile {name!r} not found."
