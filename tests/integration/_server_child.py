"""A host in its own process, for the shutdown tests: ``python -m tests.integration._server_child``.

Modes:
    serve: hosts ``audience.test.Slow``; ``Wait`` sleeps for the seconds in its request.
    crash: the same, plus a background task that raises soon after start.

Prints ``PORT <n>`` once listening, ``STARTED`` when a ``Wait`` begins and ``CLOSED`` when
the unit is closed, each on its own line of stdout.
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import grpc.aio

from audience.config import CommonConfig
from audience.server import Host, ServiceUnit
from audience.telemetry import configure_logging, setup_telemetry

SERVICE = "audience.test.Slow"


async def _wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    print("STARTED", flush=True)
    await asyncio.sleep(float(request.decode()))
    return b"done"


def _add(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"Wait": grpc.unary_unary_rpc_method_handler(_wait)}
            ),
        )
    )


async def _idle() -> None:
    await asyncio.Event().wait()


async def _crash() -> None:
    await asyncio.sleep(0.2)
    raise RuntimeError("consumer lost its stream")


async def _close() -> None:
    print("CLOSED", flush=True)


async def main(mode: str) -> int:
    config = CommonConfig.from_env(os.environ)
    configure_logging(config.log_level, config.log_format)
    telemetry = setup_telemetry("audience-test", config.otel, config.otel_endpoint)
    unit = ServiceUnit(
        name="slow",
        service_names=(SERVICE,),
        add_to_server=_add,
        background=(_idle, _crash) if mode == "crash" else (_idle,),
        close=_close,
    )
    host = Host([unit], config, telemetry=telemetry)
    port = await host.start()
    print(f"PORT {port}", flush=True)
    try:
        return await host.run_until_signal()
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
