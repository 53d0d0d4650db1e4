"""The gRPC channel pool stays bounded: the least recently used channel is closed."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from dna_core.errors import ClosedError
from dna_core.overlay.aio.records_rpc import MAX_RECONNECT_BACKOFF_MS, ChannelPool
from dna_core.wire.gen.dna.v1 import overlay_pb2, overlay_pb2_grpc


def test_the_pool_keeps_at_most_its_size_and_drops_the_least_recently_used() -> None:
    async def go() -> None:
        pool = ChannelPool(size=2)
        a, b = pool.get("127.0.0.1:1"), pool.get("127.0.0.1:2")
        assert pool.get("127.0.0.1:1") is a  # reused, and now the most recent
        pool.get("127.0.0.1:3")  # evicts :2, the least recently used
        assert len(pool) == 2
        assert pool.get("127.0.0.1:1") is a
        assert pool.get("127.0.0.1:2") is not b  # a fresh channel: b was closed
        await pool.close()
        assert len(pool) == 0

    asyncio.run(go())


def test_a_reset_pool_opens_fresh_channels_and_a_closed_one_opens_none() -> None:
    """`close` served as a reset too (`Peer.reconnect`): a `get` after it opened a channel
    that nothing would close. Now `reset` drops the channels and the pool goes on, and
    after `close` a `get` raises ClosedError."""

    async def go() -> None:
        pool, target = ChannelPool(), "127.0.0.1:1"
        before = pool.get(target)
        await pool.reset()
        assert len(pool) == 0
        after = pool.get(target)
        assert after is not before and pool.get(target) is after
        await pool.close()
        with pytest.raises(ClosedError):
            pool.get(target)
        assert len(pool) == 0
        await pool.close()  # twice is fine

    asyncio.run(go())


class _Pong(overlay_pb2_grpc.OverlayServicer):
    async def Ping(  # noqa: N802
        self, request: overlay_pb2.OverlayPingRequest, context: object
    ) -> overlay_pb2.OverlayPingResponse:
        return overlay_pb2.OverlayPingResponse()


async def _serve(target: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    overlay_pb2_grpc.add_OverlayServicer_to_server(_Pong(), server)  # type: ignore[abstract]
    server.add_insecure_port(target)
    await server.start()
    return server


def test_a_node_back_from_an_outage_is_reachable_within_seconds() -> None:
    """A pooled channel whose node was down for 10 s (calls failing every second, as
    `dna watch` makes them) reaches it again within the capped backoff, not after
    gRPC's default one (~6 s here, up to 2 minutes after longer outages)."""

    async def go() -> float:
        target, pool = "127.0.0.9:7999", ChannelPool()
        ping = overlay_pb2.OverlayPingRequest()
        server = await _serve(target)
        await overlay_pb2_grpc.OverlayStub(pool.get(target)).Ping(ping, timeout=2)
        await server.stop(0)
        end = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < end:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await overlay_pb2_grpc.OverlayStub(pool.get(target)).Ping(ping, timeout=2)
            await asyncio.sleep(1)
        server = await _serve(target)
        back = time.monotonic()
        try:
            while True:
                try:
                    await overlay_pb2_grpc.OverlayStub(pool.get(target)).Ping(ping, timeout=2)
                    return time.monotonic() - back
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
        finally:
            await server.stop(0)
            await pool.close()

    waited = asyncio.run(go())
    assert waited < MAX_RECONNECT_BACKOFF_MS / 1000 * 1.2 + 0.5, waited
