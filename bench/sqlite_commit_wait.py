"""How long a small put waits for SQLite's writer while large batches are written.

``uv run python -m bench.sqlite_commit_wait [--writers 32] [--batch 64] [--blob-bytes 65536]
[--seconds 10]``

``--writers`` tasks each put batches of ``--batch`` blobs of ``--blob-bytes`` (a full
``PutMany`` of large blobs: 4 MiB) back to back into their own mailbox, while one probe
puts a single 100-byte blob every 20 ms and times each put (the writer's group commit takes
whatever is queued into one transaction, so a probe waits for the whole group before and
the one it joins). Printed: the probe's median, p99 and longest wait, and the large
batches written. Run with ``PYTHONPATH=<old>/services/storage-node/src`` for an older
node's figures.
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

from dna_core.mailbox import StoredBlob
from dna_storage.backends.sqlite import SqliteBackend

DAY_MS = 86_400_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def blobs(box: bytes, n: int, size: int) -> list[StoredBlob]:
    at = now_ms()
    out = []
    for _ in range(n):
        payload = os.urandom(size)
        out.append(StoredBlob(box, hashlib.sha256(payload).digest(), payload, at, at + DAY_MS))
    return out


async def writer(backend: SqliteBackend, n: int, args: argparse.Namespace, end: float) -> int:
    box = hashlib.sha256(b"writer %d" % n).digest()
    written = 0
    while time.perf_counter() < end:
        await backend.put_many(blobs(box, args.batch, args.blob_bytes), now_ms())
        written += 1
    return written


async def probe(backend: SqliteBackend, end: float) -> list[float]:
    box = hashlib.sha256(b"probe").digest()
    waits = []
    while time.perf_counter() < end:
        batch = blobs(box, 1, 100)
        began = time.perf_counter()
        await backend.put_many(batch, now_ms())
        waits.append(time.perf_counter() - began)
        await asyncio.sleep(0.02)
    return waits


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = await SqliteBackend.open(Path(tmp) / "wait.db")
        try:
            end = time.perf_counter() + args.seconds
            writers = [writer(backend, n, args, end) for n in range(args.writers)]
            written, waits = await asyncio.gather(asyncio.gather(*writers), probe(backend, end))
        finally:
            await backend.close()
    waits.sort()
    p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
    print(
        f"{args.writers} writers of {args.batch} x {args.blob_bytes:,} B batches "
        f"({sum(written)} written in {args.seconds:g} s): a 100 B put waited median "
        f"{statistics.median(waits) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, longest "
        f"{waits[-1] * 1000:.0f} ms ({len(waits)} puts)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sqlite_commit_wait")
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--blob-bytes", type=int, default=65_536)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
