"""Export file names, temporary names, manifests and checksum files."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from audience.errors import AudienceError
from services.export.domain.files import (
    DEFAULT_TEMPLATE,
    Manifest,
    SegmentStats,
    checksum_file,
    checksum_name,
    manifest_name,
    render_file_name,
    temporary_name,
    unclaimed_name,
    validate_template,
)
from services.export.domain.model import ExportField, ExportMode, FieldColumn, IdentityColumn

MOMENT = datetime(2024, 7, 1, 0, 30, 15, tzinfo=UTC)


def test_the_default_file_name_has_the_date_and_time() -> None:
    assert validate_template("") == DEFAULT_TEMPLATE
    assert render_file_name(DEFAULT_TEMPLATE, ["s"], MOMENT, "UTC") == (
        "audience-2024-07-01-003015.csv"
    )


def test_date_and_time_are_read_in_the_schedule_time_zone() -> None:
    name = render_file_name("{segment}-{date}-{time}.csv", ["vip", "churn"], MOMENT, "Asia/Tokyo")

    assert name == "vip+churn-2024-07-01-093015.csv"


@pytest.mark.parametrize(
    "template",
    [
        "../up.csv",
        "a/b.csv",
        "{user}.csv",
        "{date!r}.csv",
        "{date:%Y}.csv",
        ".hidden",
        "a{",
        "x\x00",
    ],
)
def test_templates_that_could_escape_the_folder_or_hide_are_refused(template: str) -> None:
    with pytest.raises(AudienceError):
        validate_template(template)


def test_partial_files_are_hidden_and_never_end_like_the_final_name() -> None:
    temporary = temporary_name("feed.csv", "job-1")

    assert temporary.startswith(".")
    assert not temporary.endswith(".csv")
    assert temporary != temporary_name("feed.csv", "job-2")


def test_the_checksum_file_is_what_sha256sum_checks() -> None:
    assert checksum_name("feed.csv") == "feed.csv.sha256"
    assert checksum_file("feed.csv", "ab" * 32) == f"{'ab' * 32}  feed.csv\n"


def test_the_manifest_has_row_counts_versions_columns_and_time_range() -> None:
    manifest = Manifest(
        job="datasets/d/exportJobs/j",
        schedule="datasets/d/schedules/nightly",
        file_name="feed.csv",
        sha256="00" * 32,
        size_bytes=120,
        mode=ExportMode.DELTA,
        columns=[FieldColumn(ExportField.PROFILE_ID, "id"), IdentityColumn("email", "mail")],
        segments=[
            SegmentStats("datasets/d/segments/a", rows=3, joins=2, leaves=1, versions={2, 1}),
            SegmentStats("datasets/d/segments/b"),
        ],
        start_time=datetime(2024, 6, 30, tzinfo=UTC),
        end_time=MOMENT,
        snapshot=False,
    )

    document = json.loads(manifest.to_json())

    assert manifest_name("feed.csv") == "feed.csv.manifest.json"
    assert document["rows"] == 3
    assert document["mode"] == "delta"
    assert document["segments"][0] == {
        "segment": "datasets/d/segments/a",
        "rows": 3,
        "joins": 2,
        "leaves": 1,
        "versions": [1, 2],
    }
    assert document["columns"] == [
        {"header": "id", "source": "profile_id"},
        {"header": "mail", "source": "identity:email"},
    ]
    assert document["time_range"] == {
        "start": "2024-06-30T00:00:00.000000Z",
        "end": "2024-07-01T00:30:15.000000Z",
    }


def test_a_name_already_taken_gets_the_job_id_before_its_extension() -> None:
    assert unclaimed_name("buyers-2026-11-28.csv", "j1") == "buyers-2026-11-28-j1.csv"
    assert unclaimed_name("members", "j1") == "members-j1"
