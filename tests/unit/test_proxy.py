"""The proxy the fault tests lean on (tests/support/proxy.py): each mode does what it says.

Against an echo server of the test's own, over 127.0.0.1: no services.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.support.proxy import Proxy


async def test_the_proxy_modes() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Proxy("127.0.0.1", port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"a")
            assert await reader.read(10) == b"a"
            proxy.slow(0.2)
            started = asyncio.get_running_loop().time()
            writer.write(b"b")
            assert await reader.read(10) == b"b"
            assert asyncio.get_running_loop().time() - started >= 0.4  # both ways
            proxy.blackhole()
            writer.write(b"c")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(10), 0.3)
            proxy.passthrough()  # bytes were lost: the stream cannot go on, it is reset
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 1)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            proxy.hold_when(lambda direction, data: direction == "down" and b"d" in data)
            writer.write(b"d")
            await asyncio.wait_for(proxy.held.wait(), 1)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(10), 0.2)
            proxy.release()
            assert await reader.read(10) == b"d"
            proxy.cut()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 1)
            writer.close()
            proxy.reset()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 1)
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
