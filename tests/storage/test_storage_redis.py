"""Redis-only behaviour: native TTLs reclaim space; reads survive keys that already vanished;
a server not configured for durable writes is reported at connect."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import pytest
import redis.asyncio as aioredis
from dna_storage.backends.base import StoredBlob, Tombstone, Usage
from dna_storage.backends.redis import RedisBackend, durability_problems

T0 = (int(time.time()) + 10 * 86_400) * 1000  # ahead of the wall clock: TTLs don't fire
M = hashlib.sha256(b"redis mailbox").digest()


def blob(payload: bytes, ttl: int = 1000) -> StoredBlob:
    return StoredBlob(M, hashlib.sha256(payload).digest(), payload, T0, T0 + ttl)


def test_blob_and_tombstone_keys_carry_native_expiry(redis_url: str) -> None:
    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="native:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            a, c = blob(b"a", ttl=1000), blob(b"c", ttl=5000)
            await b.put_many([a, c], T0)
            await b.delete([Tombstone(M, a.blob_id, T0, T0 + 2000, b"auth")], T0)
            blob_key = f"native:b:{M.hex()}:{c.blob_id.hex()}"
            tomb_key = f"native:t:{M.hex()}:{a.blob_id.hex()}"
            assert await raw.pexpiretime(blob_key) == c.expires_ms
            assert await raw.pexpiretime(tomb_key) == T0 + 2000
            assert not await raw.exists(f"native:b:{M.hex()}:{a.blob_id.hex()}")
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_fetch_skips_and_cleans_blobs_whose_key_vanished(redis_url: str) -> None:
    """What a server clock running ahead (or an eviction) looks like: index without payload."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="vanish:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            blobs = [blob(b"blob %d" % i) for i in range(6)]
            await b.put_many(blobs, T0)
            for gone in (blobs[0], blobs[2], blobs[3]):
                await raw.delete(f"vanish:b:{M.hex()}:{gone.blob_id.hex()}")
            page = await b.fetch(M, 0, 2, T0)
            assert [x.seq for x in page.blobs] == [2, 5]
            assert page.more
            assert [x.seq for x in (await b.fetch(M, 5, 2, T0)).blobs] == [6]
            assert await raw.zcard(f"vanish:s:{M.hex()}") == 3  # index cleaned lazily
            assert await b.totals() == Usage(3, sum(len(blobs[i].blob) for i in (1, 4, 5)))
            assert await b.usage(M, T0) == Usage(3, sum(len(blobs[i].blob) for i in (1, 4, 5)))
            assert await raw.zcard("vanish:x") == 3
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_a_server_not_configured_for_durable_writes_is_reported(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's server runs AOF with fsync always; weaken it for a moment."""

    async def main() -> None:
        raw = aioredis.Redis.from_url(redis_url)
        try:
            assert await durability_problems(raw) == []
            await raw.config_set("appendfsync", "everysec")
            try:
                with caplog.at_level(logging.WARNING, logger="dna.storage.redis"):
                    await (await RedisBackend.connect(redis_url, prefix="durable:")).close()
            finally:
                await raw.config_set("appendfsync", "always")
        finally:
            await raw.aclose()

    asyncio.run(main())
    assert "appendfsync is 'everysec', not 'always'" in caplog.text
