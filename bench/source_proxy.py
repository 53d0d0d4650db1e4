"""A loopback TCP forwarder whose upstream connections leave from a chosen source address.

gRPC Python cannot bind a client channel to a local address, and on Linux every connection
to 127.0.0.x leaves from 127.0.0.1; a storage node would see all benchmark clients as one
source and rate-limit them together. A client that should look like 127.0.0.192 points its
channel at ``SourceProxy(target, "127.0.0.192").address`` instead: each accepted connection
is relayed over a new upstream connection bound to that source address.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 64 * 1024


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class SourceProxy:
    """Listens on 127.0.0.1 (an ephemeral port); relays to ``target`` from ``source_ip``."""

    def __init__(self, target: tuple[str, int], source_ip: str) -> None:
        self.target, self.source_ip = target, source_ip
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    @property
    def address(self) -> str:
        """The ``host:port`` a gRPC channel should dial instead of the target."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _accept(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target, local_addr=(self.source_ip, 0))
        except OSError:
            down_w.close()
            return
        for task in (_relay(down_r, up_w), _relay(up_r, down_w)):
            running = asyncio.create_task(task)
            self._tasks.add(running)
            running.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop listening and cut every relayed connection (relays first: on Python 3.12+
        ``wait_closed`` waits for open connections)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
