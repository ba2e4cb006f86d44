"""Folder destinations: a local or mounted folder under the service's export root."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from services.export.ports import DestinationError

__all__ = ["FolderSink"]

_CHUNK = 4 * 1024 * 1024


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class FolderSink:
    """Writes into ``folder``, which must resolve (symbolic links followed) under ``root``.

    Files are fsynced before they are renamed and the folder after, so a file under its
    final name is complete even after a power cut.
    """

    def __init__(self, root: Path | None, folder: str) -> None:
        self._root = root
        self._folder = Path(folder)

    def _check(self) -> None:
        if self._root is None:
            raise DestinationError(
                "folder destinations are disabled: AUDIENCE_EXPORT_ROOT is not set",
                retryable=False,
            )
        root = self._root.resolve()
        folder = self._folder.resolve()
        if not folder.is_relative_to(root):
            raise DestinationError(
                f"{self._folder} resolves to {folder}, outside the export root {root}",
                retryable=False,
            )
        folder.mkdir(parents=True, exist_ok=True)

    async def __aenter__(self) -> FolderSink:
        try:
            await asyncio.to_thread(self._check)
        except OSError as error:
            raise DestinationError(f"cannot use folder {self._folder}: {error}") from error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def path_of(self, name: str) -> str:
        return str(self._folder / name)

    def _target(self, name: str) -> Path:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        return self._folder / name

    async def upload(self, local: Path, name: str, progress: Callable[[int], None]) -> None:
        target = self._target(name)
        try:
            with local.open("rb") as source, target.open("wb") as destination:
                copied = 0
                while chunk := await asyncio.to_thread(source.read, _CHUNK):
                    await asyncio.to_thread(destination.write, chunk)
                    copied += len(chunk)
                    progress(copied)
                await asyncio.to_thread(destination.flush)
                await asyncio.to_thread(os.fsync, destination.fileno())
        except OSError as error:
            raise DestinationError(f"writing {target} failed: {error}") from error

    async def write_text(self, name: str, text: str) -> None:
        target = self._target(name)

        def write() -> None:
            with target.open("w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())

        try:
            await asyncio.to_thread(write)
        except OSError as error:
            raise DestinationError(f"writing {target} failed: {error}") from error

    async def exists(self, name: str) -> bool:
        try:
            return await asyncio.to_thread(self._target(name).exists)
        except OSError as error:
            raise DestinationError(f"looking for {name} failed: {error}") from error

    async def rename(self, source: str, target: str) -> None:
        def rename() -> None:
            os.replace(self._target(source), self._target(target))
            _fsync_directory(self._folder)

        try:
            await asyncio.to_thread(rename)
        except OSError as error:
            raise DestinationError(f"renaming {source} to {target} failed: {error}") from error

    async def remove(self, name: str) -> None:
        try:
            await asyncio.to_thread(self._target(name).unlink, missing_ok=True)
        except OSError as error:
            raise DestinationError(f"removing {name} failed: {error}") from error
