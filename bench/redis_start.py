"""How long a Redis backed node takes to connect to a store of many mailboxes.

``uv run python -m bench.redis_start --redis-url URL [--mailboxes 200000] [--connects 3]``

Fills a fresh prefix with ``--mailboxes`` mailboxes of one small blob each, directly through
the backend (``RedisBackend.put_many``, ``FILL_BATCH`` a script; not timed), then times
``RedisBackend.connect`` on it ``--connects`` times: what every node start waits for before
serving. The prefix is deleted at the end. Run with
``PYTHONPATH=<old>/services/storage-node/src`` for an older node's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
from collections.abc import Sequence

from dna_core.mailbox import StoredBlob
from dna_storage.backends.redis import RedisBackend

FILL_BATCH = 1000
DAY_MS = 86_400_000


async def fill(url: str, prefix: str, mailboxes: int) -> None:
    backend = await RedisBackend.connect(url, prefix=prefix)
    now = time.time_ns() // 1_000_000
    try:
        for start in range(0, mailboxes, FILL_BATCH):
            batch = []
            for n in range(start, min(start + FILL_BATCH, mailboxes)):
                payload = b"blob %d" % n
                box = hashlib.sha256(b"start mailbox %d" % n).digest()
                batch.append(
                    StoredBlob(box, hashlib.sha256(payload).digest(), payload, now, now + DAY_MS)
                )
            await backend.put_many(batch, now)
    finally:
        await backend.close()


async def timed_connect(url: str, prefix: str) -> float:
    began = time.perf_counter()
    backend = await RedisBackend.connect(url, prefix=prefix)
    took = time.perf_counter() - began
    await backend.close()
    return took


async def drop(url: str, prefix: str) -> None:
    backend = await RedisBackend.connect(url, prefix=prefix)
    client = backend._r  # the bench's own prefix, removed whole; the backend has no call for it
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=10_000)]
        for i in range(0, len(keys), 10_000):
            await client.unlink(*keys[i : i + 10_000])
    finally:
        await backend.close()


async def run(url: str, mailboxes: int, connects: int) -> None:
    prefix = f"start{os.getpid()}:"
    began = time.perf_counter()
    await fill(url, prefix, mailboxes)
    print(f"filled {mailboxes:,} mailboxes in {time.perf_counter() - began:.1f} s")
    try:
        times = [await timed_connect(url, prefix) for _ in range(connects)]
        shown = ", ".join(f"{t:.3f}" for t in times)
        print(f"connect to a store of {mailboxes:,} mailboxes: {shown} s")
    finally:
        await drop(url, prefix)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_start")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--mailboxes", type=int, default=200_000)
    parser.add_argument("--connects", type=int, default=3)
    args = parser.parse_args(argv)
    asyncio.run(run(args.redis_url, args.mailboxes, args.connects))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
