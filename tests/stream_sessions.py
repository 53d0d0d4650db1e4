"""Hostile clients of a stream session (docs/protocol.md, "Stream sessions"), shared by the
mailbox's and the overlay's session tests: raw calls that send bytes a client library never
would, a client that reads nothing, and reading a call to the status it was cut with."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import grpc
import pytest
from dna_core.ops.grpc_gate import GrpcGate
from dna_core.overlay.aio.records_rpc import OverlayService
from dna_core.overlay.aio.server import OVERLAY_DESCRIPTOR
from dna_core.overlay.contact import Contact
from dna_core.overlay.records import RecordStore
from prometheus_client import CollectorRegistry

OVERSIZED = 5 * 1024 * 1024  # a frame over the nodes' 4 MiB message limit


def overlay_server(registry: CollectorRegistry) -> tuple[grpc.aio.Server, OverlayService]:
    """An in-process Overlay service with an empty store, behind the gRPC gate, on a server
    with no port yet: its sessions and calls alone (it knows no other node)."""
    service = OverlayService(
        store=RecordStore(), closest=lambda key, k: [], local=_no_overlay, registry=registry
    )
    server = grpc.aio.server()
    GrpcGate(max_message=4 << 20).add(server, service, OVERLAY_DESCRIPTOR)
    return server, service


def _no_overlay() -> Contact:
    raise AssertionError("not asked")


def raw_session(channel: grpc.aio.Channel, method: str) -> Any:
    """A session call that sends and receives raw bytes (to send what a client must not)."""
    call: Any = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    return call()


def slow_reader(target: str, method: str) -> tuple[grpc.aio.Channel, Any]:
    """A raw session on a connection of its own that buffers little of what it does not
    read (no window growth), as a client on a slow link, or one that stopped reading."""
    channel = grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)])
    call: Any = channel.stream_stream(method)
    return channel, call()


async def send_oversized(target: str, method: str) -> tuple[grpc.StatusCode, str]:
    """Send one frame over the message limit on a connection allowed to send it: the
    status the session ends with."""
    channel = grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", 2 * OVERSIZED)]
    )
    try:
        call: Any = channel.stream_stream(method)()
        await call.write(os.urandom(OVERSIZED))
        return await status_of(call)
    finally:
        await channel.close()


async def status_of(call: Any, timeout_s: float = 30.0) -> tuple[grpc.StatusCode, str]:
    """Read a raw session to its end: its status and details (it must end in an error,
    within ``timeout_s``: a node that never cuts it fails the test instead of hanging it)."""

    async def drain() -> None:
        async for _ in call:
            pass

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(drain(), timeout_s)
    return failed.value.code(), failed.value.details() or ""


class StallingProxy:
    """A TCP proxy in front of a node that passes both ways until `stall`, then stops
    reading what the node sends: to the node, a client that never reads (grpcio's client
    always reads its unary answers). Its socket to the node takes in little
    (``SO_RCVBUF``), so what the node sends waits in the node, not in this kernel."""

    RCVBUF = 64 * 1024

    def __init__(self, node: tuple[str, int]) -> None:
        self.node = node
        self.stalled = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> StallingProxy:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def stall(self) -> None:
        self.stalled.set()

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, self.node)
        node_r, node_w = await asyncio.open_connection(sock=sock, limit=self.RCVBUF)
        for pump in (self._pump(client_r, node_w, False), self._pump(node_r, client_w, True)):
            task = asyncio.create_task(pump)
            self.tasks.add(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_node: bool
    ) -> None:
        try:
            while data := await reader.read(16 * 1024):
                writer.write(data)
                await writer.drain()
                if from_node and self.stalled.is_set():
                    await asyncio.Event().wait()  # read nothing more, ever
        finally:
            writer.close()
