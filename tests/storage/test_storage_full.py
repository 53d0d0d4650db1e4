"""A backend with no room left (issue 10 #7): a write raises StorageFullError (a
CapacityError, RESOURCE_EXHAUSTED on the wire), changes nothing, and reads keep working.
SQLite is filled to its page limit (SQLITE_FULL, what a full disk returns), Redis to its
``maxmemory`` with ``noeviction`` (OOM)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from dna_core.errors import CapacityError
from dna_storage.backends.base import MailboxBackend, StorageFullError, StoredBlob
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend
from storage.storage_harness import integrity_ok

T0 = (int(time.time()) + 10 * 86_400) * 1000
M = hashlib.sha256(b"full mailbox").digest()


def blob(i: int, size: int = 64 * 1024) -> StoredBlob:
    payload = i.to_bytes(4, "big") * (size // 4)
    return StoredBlob(M, hashlib.sha256(payload).digest(), payload, T0, T0 + 60_000)


async def fill_until_full(backend: MailboxBackend) -> tuple[list[StoredBlob], StorageFullError]:
    """Put blobs until one is refused; returns the stored ones and the refusal."""
    stored: list[StoredBlob] = []
    for i in range(1000):
        try:
            await backend.put_many([blob(i)], T0)
        except StorageFullError as exc:
            return stored, exc
        stored.append(blob(i))
    raise AssertionError("never full")


async def check_refusal_changed_nothing(
    backend: MailboxBackend, stored: list[StoredBlob], exc: StorageFullError
) -> None:
    assert isinstance(exc, CapacityError) and exc.grpc_code == "RESOURCE_EXHAUSTED"
    assert "storage is full" in exc.reason
    page = await backend.fetch(M, 0, 1000, T0)
    assert [b.blob_id for b in page.blobs] == [b.blob_id for b in stored]


def test_sqlite_at_its_page_limit_refuses_writes_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "full.db"

    async def main() -> None:
        backend = await SqliteBackend.open(path)
        try:
            # Cap the file at its size now plus ~1 MiB: SQLITE_FULL, as on a full disk.
            await backend._writer.submit(
                lambda c: c.execute(
                    "PRAGMA max_page_count = "
                    + str(c.execute("PRAGMA page_count").fetchone()[0] + 256)
                )
            )
            stored, exc = await fill_until_full(backend)
            assert stored
            await check_refusal_changed_nothing(backend, stored, exc)
            assert integrity_ok(backend.path)
        finally:
            await backend.close()

    asyncio.run(main())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_redis_out_of_memory_refuses_writes_cleanly(redis_url: str) -> None:
    async def main() -> None:
        raw = aioredis.Redis.from_url(redis_url)
        backend = await RedisBackend.connect(redis_url, prefix="full:")
        used = int((await raw.info("memory"))["used_memory"])
        await raw.config_set("maxmemory", str(used + 1024 * 1024))
        try:
            stored, exc = await fill_until_full(backend)
            assert stored
        finally:
            await raw.config_set("maxmemory", "0")
        try:
            await check_refusal_changed_nothing(backend, stored, exc)
        finally:
            await raw.aclose()
            await backend.close()

    asyncio.run(main())


@pytest.mark.parametrize("reply", ["MISCONF Redis is configured to save RDB snapshots"])
def test_redis_refusing_writes_after_a_failed_snapshot_is_no_room(
    redis_url: str, reply: str
) -> None:
    """MISCONF cannot be provoked cheaply on a shared server: a script that replies with
    the same error stands in for the write."""

    async def main() -> None:
        backend = await RedisBackend.connect(redis_url, prefix="misconf:")
        raw = aioredis.Redis.from_url(redis_url)
        script = raw.register_script(f"return redis.error_reply('{reply}')")
        try:
            with pytest.raises(StorageFullError):
                await backend._write(script, [])
        finally:
            await raw.aclose()
            await backend.close()

    asyncio.run(main())
