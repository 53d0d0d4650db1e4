"""Hostile clients of a stream session (docs/protocol.md, "Stream sessions"), shared by the
mailbox's and the overlay's session tests: raw calls that send bytes a client library never
would, a client that reads nothing, and reading a call to the status it was cut with."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
import pytest

OVERSIZED = 5 * 1024 * 1024  # a frame over the nodes' 4 MiB message limit


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
