"""Fixtures of the export integration tests: the store on a migrated schema, an in-process
SFTP server and a local HTTP receiver, all real."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from audience import db
from services.export.app import DEFINITION
from services.export.store import ExportStore
from tests.integration.export.peers import HttpReceiver, SftpServer


@pytest.fixture(scope="session")
async def export_pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(postgres_dsn, min_size=1, max_size=8)
    try:
        await db.migrate(pool, schema=DEFINITION.schema, migrations=DEFINITION.migrations)
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def store(export_pool: asyncpg.Pool) -> ExportStore:
    return ExportStore(export_pool)


@pytest.fixture
async def sftp_server(tmp_path: Path) -> AsyncIterator[SftpServer]:
    root = tmp_path / "sftp-root"
    root.mkdir()
    async with SftpServer.start(root) as server:
        yield server


@pytest.fixture
async def receiver() -> AsyncIterator[HttpReceiver]:
    async with HttpReceiver.start() as server:
        yield server
