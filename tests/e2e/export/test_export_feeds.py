"""Export files and downloads made from the real segment engine's memberships and change
stream: CSV escaping, nightly delta feeds to SFTP, interrupted uploads, retries and cancel."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from audience.v1 import export_pb2, export_service_pb2
from tests.e2e.export.conftest import Feeds
from tests.integration.export.peers import SftpServer, eventually

pytestmark = pytest.mark.e2e


def rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


async def download(
    feeds: Feeds, *segments: str, columns: list[export_pb2.ExportColumn] | None = None
) -> tuple[bytes, list[export_service_pb2.ExportSegmentCsvResponse]]:
    chunks = [
        chunk
        async for chunk in feeds.api.ExportSegmentCsv(
            export_service_pb2.ExportSegmentCsvRequest(segments=list(segments), columns=columns)
        )
    ]
    return b"".join(chunk.data for chunk in chunks), chunks


async def test_a_download_lists_the_members_with_formula_cells_escaped(feeds: Feeds) -> None:
    segment = await feeds.imported_segment("vip")
    await feeds.join(segment, "plain", '=HYPERLINK("http://x")', "+33", "-1", "@sum", 'a,b"c')

    data, chunks = await download(feeds, segment)

    table = rows(data)
    assert table[0] == ["profile_id", "segment_id", "join_time"]
    assert sorted(row[0] for row in table[1:]) == sorted(
        ["plain", '\'=HYPERLINK("http://x")', "'+33", "'-1", "'@sum", 'a,b"c']
    )
    assert {row[1] for row in table[1:]} == {"vip"}
    assert all(row[2].endswith("Z") for row in table[1:])
    assert chunks[-1].rows_sent == chunks[-1].rows_total == 6
    assert all(chunk.data.endswith(b"\r\n") for chunk in chunks)


async def test_a_download_of_several_segments_with_chosen_columns(feeds: Feeds) -> None:
    first = await feeds.imported_segment("first")
    second = await feeds.imported_segment("second")
    await feeds.join(first, "a", "b")
    await feeds.join(second, "c")
    columns = [
        export_pb2.ExportColumn(field=export_pb2.EXPORT_FIELD_SEGMENT_ID, header="Segment"),
        export_pb2.ExportColumn(field=export_pb2.EXPORT_FIELD_PROFILE_ID, header="Id"),
        export_pb2.ExportColumn(field=export_pb2.EXPORT_FIELD_SEGMENT_VERSION),
    ]

    data, _ = await download(feeds, first, second, columns=columns)

    assert rows(data) == [
        ["Segment", "Id", "segment_version"],
        ["first", "a", "2"],
        ["first", "b", "2"],
        ["second", "c", "2"],
    ]


def read_feed(server: SftpServer, folder: str, name: str) -> tuple[list[list[str]], dict[str, Any]]:
    path = server.root / folder / name
    data = path.read_bytes()
    checksum = (server.root / folder / f"{name}.sha256").read_text()
    assert checksum == f"{hashlib.sha256(data).hexdigest()}  {name}\n"
    manifest = json.loads((server.root / folder / f"{name}.manifest.json").read_text())
    return rows(data), manifest


async def test_a_nightly_delta_feed_contains_exactly_the_joins_and_leaves_since_the_last_run(
    feeds: Feeds, sftp_server: SftpServer
) -> None:
    segment = await feeds.imported_segment("buyers")
    await feeds.join(segment, "ann", "bob", "cat")
    destination = await feeds.sftp_destination(sftp_server)
    created = await feeds.api.CreateSchedule(
        export_service_pb2.CreateScheduleRequest(
            parent=feeds.parent,
            schedule_id="nightly",
            schedule=export_pb2.Schedule(
                cron="0 2 * * *",
                time_zone="Europe/Paris",
                job_template=export_pb2.ExportJob(
                    segments=[segment],
                    mode=export_pb2.EXPORT_MODE_DELTA,
                    destination=destination,
                    file_name_template="{segment}-{date}-{time}.csv",
                ),
            ),
        )
    )
    schedule = created.schedule.name

    first = await feeds.api.RunSchedule(export_service_pb2.RunScheduleRequest(name=schedule))
    first_job = await feeds.finished(first.export_job.name)
    assert first_job.state == export_pb2.EXPORT_JOB_STATE_SUCCEEDED, first_job.error

    # Between runs: two joins, one leave, and a member who came and went.
    await feeds.join(segment, "dan", "eve")
    await feeds.leave(segment, "ann")
    await feeds.join(segment, "fay")
    await feeds.leave(segment, "fay")

    second = await feeds.api.RunSchedule(export_service_pb2.RunScheduleRequest(name=schedule))
    second_job = await feeds.finished(second.export_job.name)
    assert second_job.state == export_pb2.EXPORT_JOB_STATE_SUCCEEDED, second_job.error

    first_rows, first_manifest = read_feed(sftp_server, "incoming", Path(first_job.file_path).name)
    assert [(row[0], row[3]) for row in first_rows[1:]] == [
        ("ann", "join"),
        ("bob", "join"),
        ("cat", "join"),
    ]
    assert first_manifest["snapshot"] is True

    second_rows, manifest = read_feed(sftp_server, "incoming", Path(second_job.file_path).name)
    assert second_rows[0] == ["profile_id", "segment_id", "join_time", "change", "change_time"]
    assert sorted((row[0], row[3]) for row in second_rows[1:]) == [
        ("ann", "leave"),
        ("dan", "join"),
        ("eve", "join"),
    ]
    assert manifest["snapshot"] is False
    assert manifest["rows"] == 3
    (stats,) = manifest["segments"]
    assert (stats["segment"], stats["rows"], stats["joins"], stats["leaves"]) == (segment, 3, 2, 1)
    assert stats["versions"]
    assert manifest["time_range"]["start"] is not None
    assert second_job.HasField("delta_start_time")
    assert (
        second_job.sha256
        == hashlib.sha256(
            (sftp_server.root / "incoming" / Path(second_job.file_path).name).read_bytes()
        ).hexdigest()
    )
    assert not [name for name in sftp_server.files("incoming") if name.startswith(".")]

    listed = await feeds.api.ListExportJobs(
        export_service_pb2.ListExportJobsRequest(parent=feeds.parent, schedule=schedule)
    )
    assert [job.name for job in listed.export_jobs] == [second_job.name, first_job.name]


async def start_job(feeds: Feeds, segment: str, destination: str) -> str:
    response = await feeds.api.CreateExportJob(
        export_service_pb2.CreateExportJobRequest(
            parent=feeds.parent,
            export_job=export_pb2.ExportJob(
                segments=[segment],
                mode=export_pb2.EXPORT_MODE_FULL,
                destination=destination,
                file_name_template="members.csv",
            ),
        )
    )
    name: str = response.export_job.name
    return name


async def test_a_run_never_replaces_the_file_an_earlier_run_delivered(
    feeds: Feeds, sftp_server: SftpServer
) -> None:
    segment = await feeds.imported_segment("repeat")
    await feeds.join(segment, "ann")
    destination = await feeds.sftp_destination(sftp_server)
    first = await feeds.finished(await start_job(feeds, segment, destination))
    await feeds.join(segment, "bob")
    second = await feeds.finished(await start_job(feeds, segment, destination))

    assert Path(first.file_path).name == "members.csv"
    second_name = Path(second.file_path).name
    assert second_name == f"members-{second.name.rsplit('/', 1)[1]}.csv"
    first_rows, _ = read_feed(sftp_server, "incoming", "members.csv")
    second_rows, manifest = read_feed(sftp_server, "incoming", second_name)
    assert [row[0] for row in first_rows[1:]] == ["ann"]
    assert sorted(row[0] for row in second_rows[1:]) == ["ann", "bob"]
    assert manifest["file"] == second_name


async def test_an_upload_broken_off_is_retried_and_never_leaves_a_partial_file(
    feeds: Feeds, sftp_server: SftpServer
) -> None:
    segment = await feeds.imported_segment("big")
    await feeds.join(segment, *(f"member-{i:05d}" for i in range(20_000)))
    destination = await feeds.sftp_destination(sftp_server)
    sftp_server.faults.fail_uploads = 2
    sftp_server.faults.fail_after = 32 * 1024

    job = await feeds.finished(await start_job(feeds, segment, destination))

    assert job.state == export_pb2.EXPORT_JOB_STATE_SUCCEEDED, job.error
    assert job.attempt_count == 3
    assert job.rows_written == 20_000
    assert len(sftp_server.faults.broken_uploads) == 2
    assert sftp_server.files("incoming") == [
        "members.csv",
        "members.csv.manifest.json",
        "members.csv.sha256",
    ]
    table, _ = read_feed(sftp_server, "incoming", "members.csv")
    assert len(table) == 20_001


async def test_uploads_that_keep_failing_fail_the_job_with_the_reason(
    feeds: Feeds, sftp_server: SftpServer
) -> None:
    segment = await feeds.imported_segment("vip")
    await feeds.join(segment, *(f"member-{i:05d}" for i in range(5_000)))
    destination = await feeds.sftp_destination(sftp_server)
    sftp_server.faults.fail_uploads = 100
    sftp_server.faults.fail_after = 1024

    job = await feeds.finished(await start_job(feeds, segment, destination))

    assert job.state == export_pb2.EXPORT_JOB_STATE_FAILED
    assert job.attempt_count == 3
    assert "gave up after 3 upload attempts" in job.error
    assert "disk is full" in job.error
    assert sftp_server.files("incoming") == []


async def test_cancel_stops_an_upload_and_removes_its_temporary_file(
    feeds: Feeds, sftp_server: SftpServer
) -> None:
    segment = await feeds.imported_segment("slow")
    await feeds.join(segment, *(f"member-{i:05d}" for i in range(20_000)))
    destination = await feeds.sftp_destination(sftp_server)
    sftp_server.faults.write_delay = 0.2
    name = await start_job(feeds, segment, destination)

    async def uploading() -> bool:
        return any(file.endswith(".part") for file in sftp_server.files("incoming"))

    await eventually(uploading)
    cancelled = await feeds.api.CancelExportJob(
        export_service_pb2.CancelExportJobRequest(name=name)
    )
    assert cancelled.export_job.state == export_pb2.EXPORT_JOB_STATE_CANCELLED

    async def cleaned() -> bool:
        return sftp_server.files("incoming") == []

    await eventually(cleaned)
    assert (await feeds.job(name)).state == export_pb2.EXPORT_JOB_STATE_CANCELLED


async def test_a_job_writes_to_a_folder_with_its_manifest_and_checksum(feeds: Feeds) -> None:
    segment = await feeds.imported_segment("vip")
    await feeds.join(segment, "a", "b")
    folder = feeds.root / "exports" / "vip"
    response = await feeds.api.CreateDestination(
        export_service_pb2.CreateDestinationRequest(
            parent=feeds.parent,
            destination_id="local",
            destination=export_pb2.Destination(folder=export_pb2.FolderTarget(path=str(folder))),
        )
    )

    job = await feeds.finished(await start_job(feeds, segment, response.destination.name))

    assert job.state == export_pb2.EXPORT_JOB_STATE_SUCCEEDED, job.error
    assert job.file_path == str(folder / "members.csv")
    assert job.percent == 100
    data = (folder / "members.csv").read_bytes()
    assert [r[0] for r in rows(data)[1:]] == ["a", "b"]
    assert job.sha256 == hashlib.sha256(data).hexdigest()
    manifest = json.loads((folder / "members.csv.manifest.json").read_text())
    assert manifest["rows"] == 2
    assert manifest["mode"] == "full"
