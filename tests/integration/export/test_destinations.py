"""Folder and SFTP destinations against a real file system and a real SFTP server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.export.adapters.folder import FolderSink
from services.export.adapters.sftp import SftpSink
from services.export.domain.model import SftpTarget
from services.export.ports import DestinationError
from tests.integration.export.peers import PASSWORD, USERNAME, SftpServer

pytestmark = pytest.mark.integration

SECRET = "AUDIENCE_SECRET_PARTNER"


def target(server: SftpServer, *, known_host_key: str = "", folder: str = "/in") -> SftpTarget:
    return SftpTarget("127.0.0.1", server.port, folder, USERNAME, SECRET, known_host_key)


def read(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture
def local_file(tmp_path: Path) -> Path:
    path = tmp_path / "spool.csv"
    path.write_bytes(b"profile_id\r\n" + b"p\r\n" * 50_000)
    return path


async def test_a_file_is_uploaded_with_a_password_then_renamed_into_place(
    sftp_server: SftpServer, local_file: Path
) -> None:
    seen: list[int] = []
    sink = SftpSink(target(sftp_server), {SECRET: PASSWORD}, timeout=10)

    async with sink:
        await sink.upload(local_file, ".feed.csv.part", seen.append)
        await sink.write_text(".feed.csv.sha256.part", "abc  feed.csv\n")
        assert sftp_server.files("in") == [".feed.csv.part", ".feed.csv.sha256.part"]
        await sink.rename(".feed.csv.part", "feed.csv")
        await sink.rename(".feed.csv.sha256.part", "feed.csv.sha256")

    assert sftp_server.files("in") == ["feed.csv", "feed.csv.sha256"]
    assert read(sftp_server.root / "in" / "feed.csv") == read(local_file)
    assert seen[-1] == len(read(local_file))
    assert sink.path_of("feed.csv") == "/in/feed.csv"


async def test_a_private_key_secret_and_a_pinned_host_key_are_used(
    sftp_server: SftpServer, local_file: Path
) -> None:
    environ = {SECRET: sftp_server.client_key_pem}
    sink = SftpSink(
        target(sftp_server, known_host_key=sftp_server.known_host_line), environ, timeout=10
    )

    async with sink:
        await sink.upload(local_file, "a.csv", lambda _: None)
        await sink.rename("a.csv", "b.csv")
        await sink.remove("missing.csv")

    assert sftp_server.files("in") == ["b.csv"]


async def test_renaming_replaces_a_file_of_a_previous_run(
    sftp_server: SftpServer, local_file: Path
) -> None:
    (sftp_server.root / "in").mkdir()
    (sftp_server.root / "in" / "feed.csv").write_text("old")
    sink = SftpSink(target(sftp_server), {SECRET: PASSWORD}, timeout=10)

    async with sink:
        await sink.upload(local_file, ".new.part", lambda _: None)
        await sink.rename(".new.part", "feed.csv")

    assert read(sftp_server.root / "in" / "feed.csv") == read(local_file)


async def test_a_host_key_that_does_not_match_is_refused_for_good(
    sftp_server: SftpServer,
) -> None:
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"

    with pytest.raises(DestinationError) as raised:
        async with SftpSink(target(sftp_server, known_host_key=other), {SECRET: PASSWORD}, 10):
            pass

    assert not raised.value.retryable
    assert "refused" in str(raised.value)


async def test_a_wrong_password_is_refused_for_good(sftp_server: SftpServer) -> None:
    with pytest.raises(DestinationError) as raised:
        async with SftpSink(target(sftp_server), {SECRET: "wrong"}, 10):
            pass

    assert not raised.value.retryable


async def test_a_missing_secret_names_the_variable_and_is_not_retried(
    sftp_server: SftpServer,
) -> None:
    with pytest.raises(DestinationError, match=SECRET) as raised:
        async with SftpSink(target(sftp_server), {}, 10):
            pass

    assert not raised.value.retryable


async def test_an_unreachable_server_is_worth_retrying(tmp_path: Path) -> None:
    closed = SftpTarget("127.0.0.1", 1, "/in", USERNAME, SECRET, "")

    with pytest.raises(DestinationError) as raised:
        async with SftpSink(closed, {SECRET: PASSWORD}, 5):
            pass

    assert raised.value.retryable


async def test_an_upload_broken_off_leaves_nothing_under_the_final_name(
    sftp_server: SftpServer, local_file: Path
) -> None:
    sftp_server.faults.fail_uploads = 1
    sftp_server.faults.fail_after = 64 * 1024
    sink = SftpSink(target(sftp_server), {SECRET: PASSWORD}, timeout=10)

    async with sink:
        with pytest.raises(DestinationError, match="disk is full") as raised:
            await sink.upload(local_file, ".feed.csv.part", lambda _: None)
        assert raised.value.retryable
        await sink.remove(".feed.csv.part")

    assert "feed.csv" not in sftp_server.files("in")


async def test_a_folder_sink_writes_durably_and_renames_into_place(
    tmp_path: Path, local_file: Path
) -> None:
    root = tmp_path / "exports"
    sink = FolderSink(root, str(root / "shop" / "daily"))

    async with sink:
        await sink.upload(local_file, ".x.part", lambda _: None)
        await sink.write_text(".m.part", "{}")
        await sink.rename(".x.part", "x.csv")
        await sink.rename(".m.part", "x.csv.manifest.json")
        await sink.remove("missing")

    folder = root / "shop" / "daily"
    assert sorted(os.listdir(folder)) == ["x.csv", "x.csv.manifest.json"]
    assert read(folder / "x.csv") == read(local_file)


async def test_a_folder_that_escapes_the_root_through_a_link_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)

    with pytest.raises(DestinationError, match="outside the export root") as raised:
        async with FolderSink(root, str(root / "escape")):
            pass

    assert not raised.value.retryable
