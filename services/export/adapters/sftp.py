"""SFTP destinations, through asyncssh.

Credentials come from the service's environment (``AUDIENCE_SECRET_<NAME>``): a private
key in OpenSSH or PEM form (unencrypted), or else a password. The user's own SSH
configuration, agent and keys are never consulted.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh

from services.export.domain.destinations import read_secret
from services.export.domain.model import SftpTarget
from services.export.ports import DestinationError

__all__ = ["SftpSink"]


def _credentials(target: SftpTarget, secret: str) -> dict[str, Any]:
    if secret.lstrip().startswith("-----BEGIN"):
        try:
            key = asyncssh.import_private_key(secret.strip())
        except (asyncssh.KeyImportError, ValueError) as error:
            raise DestinationError(
                f"the secret {target.credential_secret} looks like a private key but cannot "
                f"be read: {error}",
                retryable=False,
            ) from None
        return {"client_keys": [key], "password": None}
    return {"client_keys": None, "password": secret}


def _known_hosts(target: SftpTarget) -> Any:
    if not target.known_host_key:
        return None
    fields = target.known_host_key.split()
    try:
        key = asyncssh.import_public_key(" ".join(fields[-2:]))
    except (asyncssh.KeyImportError, ValueError) as error:
        raise DestinationError(
            f"the destination's known_host_key cannot be read: {error}", retryable=False
        ) from None
    return ([key], [], [])


class SftpSink:
    def __init__(self, target: SftpTarget, environ: Mapping[str, str], timeout: float) -> None:
        self._target = target
        self._environ = environ
        self._timeout = timeout
        self._connection: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None

    def _where(self) -> str:
        target = self._target
        return f"sftp://{target.username}@{target.host}:{target.port}"

    async def __aenter__(self) -> SftpSink:
        target = self._target
        secret = read_secret(self._environ, target.credential_secret)
        if secret is None:
            raise DestinationError(
                f"the secret {target.credential_secret} is not set in the export service's "
                "environment",
                retryable=False,
            )
        try:
            self._connection = await asyncio.wait_for(
                asyncssh.connect(
                    target.host,
                    target.port,
                    username=target.username,
                    known_hosts=_known_hosts(target),
                    agent_path=None,
                    config=None,
                    connect_timeout=self._timeout,
                    **_credentials(target, secret),
                ),
                self._timeout,
            )
            self._sftp = await self._connection.start_sftp_client()
            await self._sftp.makedirs(target.path, exist_ok=True)
        except (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable) as error:
            await self._close()
            raise DestinationError(
                f"{self._where()} refused the connection: {error.reason}", retryable=False
            ) from None
        except (asyncssh.Error, OSError, TimeoutError) as error:
            await self._close()
            raise DestinationError(f"cannot connect to {self._where()}: {_text(error)}") from None
        return self

    async def _close(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        if self._connection is not None:
            self._connection.close()
            await self._connection.wait_closed()
            self._connection = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._close()

    def path_of(self, name: str) -> str:
        return posixpath.join(self._target.path, name)

    def _client(self) -> asyncssh.SFTPClient:
        if self._sftp is None:
            raise RuntimeError("the SFTP sink is not open")
        return self._sftp

    async def upload(self, local: Path, name: str, progress: Callable[[int], None]) -> None:
        def report(source: bytes, destination: bytes, copied: int, total: int) -> None:
            progress(copied)

        try:
            await self._client().put(str(local), self.path_of(name), progress_handler=report)
        except (asyncssh.Error, OSError) as error:
            raise DestinationError(
                f"uploading {self.path_of(name)} to {self._where()} failed: {_text(error)}"
            ) from None

    async def write_text(self, name: str, text: str) -> None:
        try:
            async with self._client().open(self.path_of(name), "w", encoding="utf-8") as file:
                await file.write(text)
        except (asyncssh.Error, OSError) as error:
            raise DestinationError(
                f"writing {self.path_of(name)} to {self._where()} failed: {_text(error)}"
            ) from None

    async def exists(self, name: str) -> bool:
        try:
            return bool(await self._client().exists(self.path_of(name)))
        except (asyncssh.Error, OSError) as error:
            raise DestinationError(
                f"looking for {self.path_of(name)} on {self._where()} failed: {_text(error)}"
            ) from None

    async def rename(self, source: str, target: str) -> None:
        client = self._client()
        old, new = self.path_of(source), self.path_of(target)
        try:
            try:
                await client.posix_rename(old, new)
            except asyncssh.SFTPOpUnsupported:
                # Plain SFTPv3 rename refuses to replace: the old file goes first, leaving a
                # moment with neither, but never one with a partial file under the name.
                await self.remove(target)
                await client.rename(old, new)
        except (asyncssh.Error, OSError) as error:
            raise DestinationError(
                f"renaming {old} to {new} on {self._where()} failed: {_text(error)}"
            ) from None

    async def remove(self, name: str) -> None:
        try:
            await self._client().remove(self.path_of(name))
        except asyncssh.SFTPNoSuchFile:
            return
        except (asyncssh.Error, OSError) as error:
            raise DestinationError(
                f"removing {self.path_of(name)} on {self._where()} failed: {_text(error)}"
            ) from None


def _text(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return str(reason or error or type(error).__name__)
