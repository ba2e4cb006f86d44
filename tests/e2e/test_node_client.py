"""A client in another language: clients/node's `node --test` against the whole suite.

The Node.js test creates `cart.value < 100`, sends the $100 example's two carts through
ingest and hears the join and the leave on the change stream, through @grpc/grpc-js with
the protos loaded from protos/, calling with the suite's API key. Its dependencies come
from `make node-deps`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from services.registry import SERVICES
from tests.e2e.conftest import StartSuite, new_dataset

pytestmark = pytest.mark.e2e

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
NODE_DEADLINE = 100.0


async def test_node_client_hears_the_join_and_leave_of_the_100_dollar_cart(
    start_suite: StartSuite,
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is not installed: the Node.js client test needs Node.js 20 or later on PATH",
            pytrace=False,
        )
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(
            f"{CLIENT}/node_modules lacks the client's dependencies: run `make node-deps`",
            pytrace=False,
        )
    async with start_suite(SERVICES) as suite:
        environ = {
            key: value for key, value in os.environ.items() if not key.startswith("AUDIENCE_")
        }
        environ |= {
            "AUDIENCE_ADDRESS": suite.address,
            "AUDIENCE_DATASET": new_dataset(),
            "AUDIENCE_API_KEY": suite.api_key,
        }
        # The services are in this process's event loop, so node must run beside it,
        # not block it.
        process = await asyncio.create_subprocess_exec(
            node,
            "--test",
            "--test-reporter=spec",
            cwd=CLIENT,
            env=environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), NODE_DEADLINE)
        except TimeoutError:
            process.kill()
            output, _ = await process.communicate()
            pytest.fail(
                f"node --test did not finish in {NODE_DEADLINE:.0f} s:\n{output.decode()}",
                pytrace=False,
            )
    if process.returncode != 0:
        pytest.fail(f"node --test failed:\n{output.decode()}", pytrace=False)
