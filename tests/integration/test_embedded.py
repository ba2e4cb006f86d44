"""The embedded PostgreSQL and Redis that ``make run`` uses on a machine with only Python."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from redis.asyncio import Redis

from audience.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedServers

pytestmark = pytest.mark.integration

# Starts the servers and is then killed with SIGKILL, as a crashed `make run` would be.
KILLED_OWNER = """
import asyncio, sys

import asyncpg
from redis.asyncio import Redis

from audience.embedded import EmbeddedServers

async def main() -> None:
    servers = EmbeddedServers(sys.argv[1])
    endpoints = await servers.start()
    conn = await asyncpg.connect(endpoints.postgres_dsn)
    await conn.execute("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept')")
    await conn.close()
    redis = Redis.from_url(endpoints.redis_url)
    await redis.set("note", "kept")
    await redis.aclose()
    print(servers.postgres.pid, servers.redis.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""

# Starts the servers and waits to be interrupted, as `make run` does until Ctrl-C. With
# "context" it holds them in `async with`; with "atexit" it relies on the exit hook alone.
INTERRUPTED_OWNER = """
import asyncio, sys

from audience.embedded import EmbeddedServers

async def main() -> None:
    servers = EmbeddedServers(sys.argv[1])
    if sys.argv[2] == "context":
        async with servers:
            print("ready", flush=True)
            await asyncio.sleep(3600)
    else:
        await servers.start()
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: as root the PostgreSQL user must traverse the parents, and pytest keeps
    # its base directory private.
    with tempfile.TemporaryDirectory(prefix="audience-embedded-") as directory:
        yield Path(directory) / "data"


def processes_using(directory: Path) -> list[psutil.Process]:
    """Processes started in, or naming, ``directory``: what the servers leave if not stopped."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        cwd = process.info["cwd"] or ""
        if (str(directory) in cmdline or cwd.startswith(str(directory))) and alive(process):
            found.append(process)
    return found


def alive(process: psutil.Process) -> bool:
    # An exited server is a zombie until init reaps it (pg_ctl daemonizes the postmaster).
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_processes(servers: EmbeddedServers) -> list[psutil.Process]:
    assert servers.postgres.pid is not None
    assert servers.redis.pid is not None
    postmaster = psutil.Process(servers.postgres.pid)
    return [postmaster, *postmaster.children(recursive=True), psutil.Process(servers.redis.pid)]


async def test_data_survives_a_restart_and_no_process_is_left(data_dir: Path) -> None:
    servers = EmbeddedServers(data_dir)
    async with servers as endpoints:
        conn = await asyncpg.connect(endpoints.postgres_dsn)
        await conn.execute("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept')")
        await conn.close()
        redis = Redis.from_url(endpoints.redis_url)
        await redis.set("note", "kept")
        await redis.aclose()
        running = server_processes(servers)
        assert len(running) > 2

    assert [p for p in running if alive(p)] == []
    assert processes_using(data_dir) == []

    async with EmbeddedServers(data_dir) as endpoints:
        conn = await asyncpg.connect(endpoints.postgres_dsn)
        assert await conn.fetchval("SELECT body FROM notes") == "kept"
        await conn.close()
        redis = Redis.from_url(endpoints.redis_url)
        assert await redis.get("note") == b"kept"
        await redis.aclose()

    assert processes_using(data_dir) == []


async def test_servers_listen_on_the_given_ports(data_dir: Path) -> None:
    postgres_port, redis_port = free_port(), free_port()
    async with EmbeddedServers(
        data_dir, postgres_port=postgres_port, redis_port=redis_port
    ) as endpoints:
        assert endpoints.postgres_dsn == f"postgresql://postgres@127.0.0.1:{postgres_port}/postgres"
        assert endpoints.redis_url == f"redis://127.0.0.1:{redis_port}/0"
        conn = await asyncpg.connect(endpoints.postgres_dsn)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()


async def test_a_second_owner_of_the_data_is_refused_and_the_first_keeps_running(
    data_dir: Path,
) -> None:
    async with EmbeddedServers(data_dir) as endpoints:
        with pytest.raises(EmbeddedError, match=f"is in use by another process .pid {os.getpid()}"):
            await EmbeddedServers(data_dir).start()

        conn = await asyncpg.connect(endpoints.postgres_dsn)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        redis = Redis.from_url(endpoints.redis_url)
        assert await redis.ping()
        await redis.aclose()


async def test_servers_left_by_a_killed_run_are_replaced_on_the_same_data(
    data_dir: Path,
) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_OWNER, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    assert owner.stdout is not None
    line = await owner.stdout.readline()
    owner.send_signal(signal.SIGKILL)
    await owner.wait()
    orphans = [psutil.Process(int(pid)) for pid in line.split()]
    assert all(alive(orphan) for orphan in orphans)

    servers = EmbeddedServers(data_dir)
    async with servers as endpoints:
        assert not any(alive(orphan) for orphan in orphans)
        conn = await asyncpg.connect(endpoints.postgres_dsn)
        assert await conn.fetchval("SELECT body FROM notes") == "kept"
        await conn.close()
        redis = Redis.from_url(endpoints.redis_url)
        assert await redis.get("note") == b"kept"
        await redis.aclose()

    assert processes_using(data_dir) == []


@pytest.mark.parametrize("holder", ["context", "atexit"])
async def test_ctrl_c_leaves_no_server_running(data_dir: Path, holder: str) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        INTERRUPTED_OWNER,
        str(data_dir),
        holder,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert owner.stdout is not None
    assert await owner.stdout.readline() == b"ready\n"
    assert processes_using(data_dir) != []

    owner.send_signal(signal.SIGINT)
    _, stderr = await owner.communicate()

    assert b"KeyboardInterrupt" in stderr
    assert processes_using(data_dir) == []


def test_postgresql_starts_when_a_first_pg_ctl_dies_of_a_signal(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the long fault test once saw: the forked child crashed before running pg_ctl.
    postgres = EmbeddedPostgres(data_dir / "postgres")
    run = EmbeddedPostgres._run
    crashes: list[str] = []

    def crash_first_start(
        self: EmbeddedPostgres, tool: str, *args: str, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        if tool == "pg_ctl" and args[0] == "start" and not crashes:
            crashes.append(tool)
            return subprocess.CompletedProcess([tool], -signal.SIGSEGV, "", "")
        return run(self, tool, *args, timeout=timeout)

    monkeypatch.setattr(EmbeddedPostgres, "_run", crash_first_start)
    dsn = postgres.start()
    try:
        assert crashes == ["pg_ctl"]

        async def select_one() -> int:
            conn = await asyncpg.connect(dsn)
            try:
                return int(await conn.fetchval("SELECT 1"))
            finally:
                await conn.close()

        assert asyncio.run(select_one()) == 1
    finally:
        postgres.stop()
