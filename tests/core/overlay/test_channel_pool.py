"""The gRPC channel pool stays bounded: the least recently used channel is closed."""

from __future__ import annotations

import asyncio

from dna_core.overlay.aio.records_rpc import ChannelPool


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
