"""A minimal TCP forwarder, run as its own process to inject network faults in tests.

``python benchmarks/tcpproxy.py LISTEN_PORT TARGET_PORT`` forwards every connection to
``127.0.0.1:LISTEN_PORT`` to ``127.0.0.1:TARGET_PORT``. Killing the process resets every connection
and refuses new ones (the backend is unreachable but keeps its data); SIGSTOP makes every connection
hang (a network partition), SIGCONT lets them go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(listen_port: int, target_port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
    asyncio.run(_serve(listen_port, target_port))


if __name__ == "__main__":
    main()
