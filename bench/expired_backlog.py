"""A fetch of a mailbox whose older blobs expired and GC has not reached yet.

``uv run python -m bench.expired_backlog [--expired 100000] [--live 5] [--limit 100]
[--redis-url URL]``

One mailbox gets ``--expired`` blobs of 256 bytes with a one-hour lifetime, then ``--live``
blobs with a day's, directly through the backend (not timed); the fetches are made two hours
on (the backlog expired, GC not run): ``--rounds`` fetches from cursor 0 with ``--limit``,
each timed; printed: the median and the worst, and what a page held. Run with
``PYTHONPATH=<old>/services/storage-node/src`` for an older node's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dna_core.mailbox import StoredBlob
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend

HOUR_MS = 3_600_000
FILL_BATCH = 1000


async def fill(backend: Any, expired: int, live: int, at: int) -> bytes:
    box = hashlib.sha256(b"backlog %d" % at).digest()
    for start in range(0, expired + live, FILL_BATCH):
        batch = []
        for n in range(start, min(start + FILL_BATCH, expired + live)):
            payload = os.urandom(256)
            ttl = HOUR_MS if n < expired else 24 * HOUR_MS
            batch.append(StoredBlob(box, hashlib.sha256(payload).digest(), payload, at, at + ttl))
        await backend.put_many(batch, at)
    return box


async def measure(name: str, backend: Any, args: argparse.Namespace) -> None:
    at = time.time_ns() // 1_000_000
    box = await fill(backend, args.expired, args.live, at)
    later = at + 2 * HOUR_MS
    times, held = [], 0
    for _ in range(args.rounds):
        began = time.perf_counter()
        page = await backend.fetch(box, 0, args.limit, later, 2 * 1024 * 1024)
        times.append(time.perf_counter() - began)
        held = len(page.blobs)
    print(
        f"{name}: fetch from cursor 0, limit {args.limit}, past {args.expired:,} expired "
        f"blobs GC has not reached: {held} live blobs, median "
        f"{statistics.median(times) * 1000:.1f} ms, worst {max(times) * 1000:.1f} ms "
        f"({args.rounds} fetches)"
    )


async def on_sqlite(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = await SqliteBackend.open(Path(tmp) / "backlog.db")
        try:
            await measure("sqlite", backend, args)
        finally:
            await backend.close()


async def on_redis(args: argparse.Namespace) -> None:
    prefix = f"backlog{os.getpid()}:"
    backend = await RedisBackend.connect(args.redis_url, prefix=prefix)
    try:
        await measure("redis", backend, args)
    finally:
        client = backend._r  # the bench's own prefix, removed whole
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=10_000)]
        for i in range(0, len(keys), 10_000):
            await client.unlink(*keys[i : i + 10_000])
        await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.expired_backlog")
    parser.add_argument("--expired", type=int, default=100_000)
    parser.add_argument("--live", type=int, default=5)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args(argv)
    asyncio.run(on_sqlite(args))
    if args.redis_url:
        asyncio.run(on_redis(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
