"""A TCP proxy whose connections the fault test cuts: ``python -m tests.faults.proxy``.

The services reach PostgreSQL and Redis through one of these, so the test can break every
open connection at once, mid-query or mid-transaction, without stopping the server: on
``SIGUSR1`` each client and server socket is reset (``SO_LINGER`` 0, so the peers see a
reset rather than an orderly close), and new connections are accepted at once. asyncpg's
own adversity tests do the same with their ``TCPFuzzingProxy``.

It runs in a process of its own so that forwarding never waits on the test's event loop or
its share of the GIL. It prints ``READY`` once listening and exits on ``SIGTERM``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct

_CHUNK = 256 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _reset(writer)
            return
        pair = (writer, upstream_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pump(reader, upstream_writer), self._pump(upstream_reader, writer)
            )
        finally:
            self._pairs.discard(pair)
            for side in pair:
                side.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        for pair in list(self._pairs):
            for side in pair:
                _reset(side)
        self._pairs.clear()


async def _main(listen_port: int, target_host: str, target_port: int) -> None:
    proxy = Proxy(target_host, target_port)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", listen_port)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    print("READY", flush=True)
    async with server:
        await stopped.wait()
    proxy.cut()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--target", required=True, help="host:port to forward to")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    asyncio.run(_main(args.listen, host, int(port)))


if __name__ == "__main__":
    main()
