"""Real peers for the export tests: an SFTP server (asyncssh) and an HTTP receiver.

Both run in the test's event loop and listen on 127.0.0.1. Each can be told to fail: the SFTP
server to break off an upload partway, the receiver to answer with given statuses first.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

USERNAME = "feed"
PASSWORD = "correct horse battery staple"


@dataclass
class SftpFaults:
    """Scripted failures: the next ``fail_uploads`` uploads break after ``fail_after`` bytes,
    and every write is slowed by ``write_delay`` seconds."""

    fail_uploads: int = 0
    fail_after: int = 0
    write_delay: float = 0.0
    broken_uploads: list[str] = field(default_factory=list)


class _Sftp(asyncssh.SFTPServer):
    faults: SftpFaults

    def __init__(
        self, chan: asyncssh.SSHServerChannel[bytes], root: Path, faults: SftpFaults
    ) -> None:
        super().__init__(chan, chroot=str(root).encode())
        self.faults = faults
        self._written: dict[int, int] = {}

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        faults = self.faults
        if faults.write_delay:
            await asyncio.sleep(faults.write_delay)
        written = self._written.get(id(file_obj), 0) + len(data)
        self._written[id(file_obj)] = written
        if faults.fail_uploads and written > faults.fail_after:
            faults.fail_uploads -= 1
            faults.broken_uploads.append(str(id(file_obj)))
            raise asyncssh.SFTPFailure("simulated failure: the disk is full")
        result = super().write(file_obj, offset, data)
        return await result if inspect.isawaitable(result) else result


class _Auth(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == USERNAME and password == PASSWORD


@dataclass
class SftpServer:
    root: Path
    port: int
    host_key: asyncssh.SSHKey
    client_key: asyncssh.SSHKey
    faults: SftpFaults

    @property
    def known_host_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key.export_public_key().decode().strip()}"

    @property
    def client_key_pem(self) -> str:
        key: bytes = self.client_key.export_private_key()
        return key.decode()

    def files(self, folder: str = "") -> list[str]:
        path = self.root / folder.lstrip("/")
        return sorted(p.name for p in path.iterdir()) if path.exists() else []

    @classmethod
    @asynccontextmanager
    async def start(cls, root: Path) -> AsyncIterator[SftpServer]:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        faults = SftpFaults()
        listener = await asyncssh.listen(
            "127.0.0.1",
            0,
            server_host_keys=[host_key],
            server_factory=_Auth,
            authorized_client_keys=asyncssh.import_authorized_keys(
                client_key.export_public_key().decode()
            ),
            sftp_factory=lambda chan: _Sftp(chan, root, faults),
            allow_scp=False,
        )
        port: int = listener.sockets[0].getsockname()[1]
        try:
            yield cls(root, port, host_key, client_key, faults)
        finally:
            listener.close()
            await listener.wait_closed()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: str


@dataclass
class HttpReceiver:
    """An HTTP/1.1 server that records requests and answers 200, or the scripted statuses
    in ``statuses`` first (one per request)."""

    port: int
    requests: list[Request] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[Request]:
        """The requests answered with a 2xx."""
        return [r for r, s in zip(self.requests, self._answers, strict=True) if s < 300]

    def __post_init__(self) -> None:
        self._answers: list[int] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self.statuses.pop(0) if self.statuses else 200
                self.requests.append(Request(method, path, headers, body.decode()))
                self._answers.append(status)
                self.received.set()
                reply = b"failed" if status >= 300 else b""
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(reply)}\r\n\r\n".encode() + reply
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @classmethod
    @asynccontextmanager
    async def start(cls) -> AsyncIterator[HttpReceiver]:
        receiver = cls(port=0)
        server = await asyncio.start_server(receiver._serve, "127.0.0.1", 0)
        receiver.port = server.sockets[0].getsockname()[1]
        try:
            yield receiver
        finally:
            server.close()
            await server.wait_closed()


async def eventually(probe: Callable[[], bool | Awaitable[bool]], within: float = 20.0) -> None:
    """Waits until ``probe()`` is true, polling: what it watches is in another system."""

    async def holds() -> bool:
        result = probe()
        return await result if inspect.isawaitable(result) else result

    async with asyncio.timeout(within):
        while not await holds():  # noqa: ASYNC110 (polling a database or a peer)
            await asyncio.sleep(0.02)
