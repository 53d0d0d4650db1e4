"""Crash-test writer (run as a script by test_storage_sqlite.py, never imported by pytest).

Opens the SQLite backend at argv[1] and writes forever from several concurrent tasks (so group
commit batches them), printing each blob ID only after ``put_many`` acknowledged it. The test
SIGKILLs this process at an arbitrary moment: every ID printed must survive.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path

from dna_storage.backends.base import PutOutcome, StoredBlob
from dna_storage.backends.sqlite import SqliteBackend

TASKS = 8
PER_PUT = 3
DAY_MS = 86_400_000


def make_blob(tag: bytes, size: int) -> StoredBlob:
    """A blob of ``size`` bytes in one of four mailboxes (sizes vary: overflow pages too)."""
    payload = (tag * (size // len(tag) + 1))[:size]
    mailbox = hashlib.sha256(b"crash mailbox %d" % (payload[-1] % 4)).digest()
    now = int(time.time() * 1000)
    return StoredBlob(mailbox, hashlib.sha256(payload).digest(), payload, now, now + 30 * DAY_MS)


async def writer(backend: SqliteBackend, task: int, run: bytes) -> None:
    n = 0
    while True:
        batch = [
            make_blob(b"%s/%d/%d/%d:" % (run, task, n, j), 100 + (n * 997 + j * 331) % 6000)
            for j in range(PER_PUT)
        ]
        outcomes = await backend.put_many(batch, int(time.time() * 1000))
        assert outcomes == [PutOutcome.STORED] * PER_PUT, outcomes
        sys.stdout.write("".join(f"{b.mailbox_id.hex()} {b.blob_id.hex()}\n" for b in batch))
        sys.stdout.flush()
        n += 1


async def main(path: Path) -> None:
    backend = await SqliteBackend.open(path)
    print("READY", flush=True)
    run = os.urandom(4).hex().encode()
    await asyncio.gather(*(writer(backend, t, run) for t in range(TASKS)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
