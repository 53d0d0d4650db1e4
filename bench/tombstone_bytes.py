"""Bytes one replica stores for the tombstones of a mailbox owner deleting N blobs.

``uv run python -m bench.tombstone_bytes [--blobs 10000] [--batch 200] [--redis-url URL]``

The deletes are real: ``sign_delete`` (hybrid ML-DSA-65 + Ed25519) of ``--batch`` IDs each,
stored as the node's ``delete_one`` stores them (one tombstone per ID, each carrying the
serialized request as its authorization) through the backend API, not gRPC. Printed:

* ``authorizations``: the signed deletes' bytes as sent (one copy of each);
* ``sqlite used``: pages in use in the SQLite file (``page_count - freelist_count``), the
  empty schema's subtracted;
* ``redis used``: growth of the server's ``used_memory`` (``--redis-url``, an empty server
  or database: it reads the whole server's figure);
* ``signed deletes held``: the backend's own count (``signed_deletes()``), where it has one.

Run it against an older checkout's backends (``PYTHONPATH=<old>/services/storage-node/src``)
for the figures before signed deletes were shared (docs/storage.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dna_core.crypto import Identity
from dna_core.mailbox import Tombstone, mailbox_id, sign_delete
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend

DAY_MS = 86_400_000


def signed_batches(blobs: int, batch: int, now_ms: int) -> list[list[Tombstone]]:
    """The tombstones of each signed delete, as the node makes them from the request."""
    owner = Identity.generate()
    box = mailbox_id(owner.fingerprint)
    ids = [os.urandom(32) for _ in range(blobs)]
    out = []
    for start in range(0, blobs, batch):
        chunk = ids[start : start + batch]
        auth = sign_delete(owner, chunk, now_ms=now_ms)
        out.append([Tombstone(box, i, now_ms, now_ms + 31 * DAY_MS, auth) for i in chunk])
    return out


def sqlite_used(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        pages, free, size = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_count", "freelist_count", "page_size")
        )
    return int((pages - free) * size)


async def held(backend: Any) -> str:
    """The backend's own figure, if this version of it keeps one."""
    count = getattr(backend, "signed_deletes", None)
    if count is None:
        return "n/a (this backend keeps no count)"
    usage = await count()
    return f"{usage.blobs} signed deletes, {usage.bytes:,} bytes"


async def measure_sqlite(batches: list[list[Tombstone]], now_ms: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tombstones.db"
        backend = await SqliteBackend.open(path)
        try:
            await backend.close()
            empty = sqlite_used(path)
            backend = await SqliteBackend.open(path)
            for tombs in batches:
                await backend.delete(tombs, now_ms)
            print(f"signed deletes held (sqlite): {await held(backend)}")
        finally:
            await backend.close()
        print(f"sqlite used: {sqlite_used(path) - empty:,} bytes")


async def measure_redis(url: str, batches: list[list[Tombstone]], now_ms: int) -> None:
    backend = await RedisBackend.connect(url, prefix=f"tombbench{os.getpid()}:")
    client: Any = backend._r  # the server's memory figure; the backend has no call for it
    try:
        before = (await client.info("memory"))["used_memory"]
        for tombs in batches:
            await backend.delete(tombs, now_ms)
        after = (await client.info("memory"))["used_memory"]
        print(f"signed deletes held (redis): {await held(backend)}")
        print(f"redis used: {after - before:,} bytes")
    finally:
        await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tombstone_bytes")
    parser.add_argument("--blobs", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args(argv)
    now_ms = int(time.time() * 1000)
    batches = signed_batches(args.blobs, args.batch, now_ms)
    sizes = [len(tombs[0].authorization) for tombs in batches]
    print(f"{args.blobs:,} blobs deleted in {len(batches)} signed deletes of {args.batch} IDs")
    print(f"authorizations: {sum(sizes):,} bytes ({sizes[0]:,} per full batch)")
    asyncio.run(measure_sqlite(batches, now_ms))
    if args.redis_url:
        asyncio.run(measure_redis(args.redis_url, batches, now_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
