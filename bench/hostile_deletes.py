"""What a node stores for hostile deletes, and what the owner's cleanup takes.

``uv run python -m bench.hostile_deletes [--deletes 20] [--ids 1000] [--cleanup 10000]
[--sources 1] [--node-max N] [--redis-url URL]``

Through the node's own delete path (``MailboxService.delete_one``, as the unary `Delete`
and sessions call it; no gRPC) with the default admission, over a real backend:

* hostile: ``--deletes`` signed deletes of ``--ids`` random IDs (IDs the node never held),
  each from a fresh identity (a mailbox costs nothing to make), sent back to back from one
  source address, none retried; printed: the bytes sent (the requests), those admitted,
  and what the store grew by (SQLite pages in use; Redis ``used_memory``);
* many mailboxes: the same with ``--sources`` N, each delete from the next of N source
  addresses (an attacker with many addresses, each within its rate, and many mailboxes,
  each within its bound): only the node's bound (``node_max_tombstones_unheld``, set
  with ``--node-max``) stops it;
* cleanup: ``--cleanup`` blobs put into one mailbox, then deleted by their owner in
  batches of 200 (``DELETE_BATCH_IDS``) from one source, timed.

Run with ``PYTHONPATH=<old>/services/storage-node/src`` for an older node's figures
(its ``delete_one`` takes no source address).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from dna_core.crypto import Identity
from dna_core.errors import ProtocolError
from dna_core.mailbox import StoredBlob, mailbox_id, sign_delete
from dna_core.wire import mailbox_pb2
from dna_storage.admission import Admission, AdmissionConfig
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend
from dna_storage.mailbox_service import MailboxService

from bench.tombstone_bytes import sqlite_used

DAY_MS = 86_400_000
SOURCE = "203.0.113.7"
BATCH = 200


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def admission(node_max: int) -> Admission:
    """The default admission, with the node's bound for tombstones of IDs not held set to
    ``node_max`` when given (0: the default; an older node has none)."""
    if not node_max:
        return Admission()
    return Admission(AdmissionConfig(node_max_tombstones_unheld=node_max))


async def delete(
    service: MailboxService, request: mailbox_pb2.DeleteRequest, source: str = SOURCE
) -> int:
    """``delete_one`` of this node version (with the source address if it takes one)."""
    takes_source = "source_ip" in inspect.signature(service.delete_one).parameters
    call: Any = service.delete_one
    args = (request, source, now_ms()) if takes_source else (request, now_ms())
    answer = await call(*args)
    return int(answer.deleted)


async def hostile(
    backend: Any, deletes: int, ids: int, sources: int, node_max: int
) -> tuple[int, int, int]:
    """(bytes sent, deletes admitted, refused)."""
    service = MailboxService(backend, admission(node_max))
    sent = admitted = refused = 0
    for i in range(deletes):
        owner = Identity.generate()
        raw = sign_delete(owner, [os.urandom(32) for _ in range(ids)], now_ms=now_ms())
        sent += len(raw)
        source = SOURCE if sources <= 1 else f"198.51.{i % sources // 256}.{i % sources % 256}"
        try:
            await delete(service, mailbox_pb2.DeleteRequest.FromString(raw), source)
            admitted += 1
        except ProtocolError:
            refused += 1
    return sent, admitted, refused


async def cleanup(backend: Any, blobs: int) -> tuple[float, int]:
    """(seconds the deletes took, blobs deleted)."""
    owner = Identity.generate()
    box = mailbox_id(owner.fingerprint)
    at = now_ms()
    payloads = [os.urandom(256) for _ in range(blobs)]
    stored = [StoredBlob(box, hashlib.sha256(p).digest(), p, at, at + DAY_MS) for p in payloads]
    for i in range(0, blobs, 500):
        await backend.put_many(stored[i : i + 500], at)
    service = MailboxService(backend, Admission())
    requests = [
        mailbox_pb2.DeleteRequest.FromString(
            sign_delete(owner, [b.blob_id for b in stored[i : i + BATCH]], now_ms=now_ms())
        )
        for i in range(0, blobs, BATCH)
    ]
    start = time.perf_counter()
    deleted = 0
    for request in requests:
        deleted += await delete(service, request)
    return time.perf_counter() - start, deleted


async def on_sqlite(run: Callable[[Any], Awaitable[Any]]) -> tuple[Any, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "node.db"
        backend = await SqliteBackend.open(path)
        await backend.close()
        empty = sqlite_used(path)
        backend = await SqliteBackend.open(path)
        try:
            result = await run(backend)
        finally:
            await backend.close()
        return result, sqlite_used(path) - empty


async def on_redis(url: str, run: Callable[[Any], Awaitable[Any]]) -> tuple[Any, int]:
    backend = await RedisBackend.connect(url, prefix=f"hostile{os.getpid()}{time.time_ns()}:")
    client: Any = backend._r  # the server's memory figure; the backend has no call for it
    try:
        before = (await client.info("memory"))["used_memory"]
        result = await run(backend)
        after = (await client.info("memory"))["used_memory"]
    finally:
        await backend.close()
    return result, after - before


Store = Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[tuple[Any, int]]]


async def report(name: str, store: Store, args: argparse.Namespace) -> None:
    (sent, ok, refused), grew = await store(
        lambda b: hostile(b, args.deletes, args.ids, args.sources, args.node_max)
    )
    print(
        f"{name} hostile: {args.deletes} deletes x {args.ids} random IDs from "
        f"{max(args.sources, 1)} source(s), node bound {args.node_max or 'default'}: "
        f"{sent:,} bytes sent, {ok} admitted, {refused} refused; store grew {grew:,} bytes "
        f"({grew / sent:.1f}x what was sent)"
    )
    (seconds, deleted), _ = await store(lambda b: cleanup(b, args.cleanup))
    print(
        f"{name} cleanup: {deleted:,} held blobs deleted in batches of {BATCH}: "
        f"{seconds:.2f} s ({seconds / (args.cleanup / BATCH) * 1000:.1f} ms a batch)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_deletes")
    parser.add_argument("--deletes", type=int, default=20)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--cleanup", type=int, default=10_000)
    parser.add_argument("--sources", type=int, default=1, help="source addresses, in turn")
    parser.add_argument("--node-max", type=int, default=0, help="node_max_tombstones_unheld")
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args(argv)
    asyncio.run(report("sqlite", on_sqlite, args))
    if args.redis_url:
        asyncio.run(report("redis", lambda run: on_redis(args.redis_url, run), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
