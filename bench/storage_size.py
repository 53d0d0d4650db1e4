"""Memory of one storage node through a life of max-size blobs: stored, fetched by many
clients at once, deleted, collected.

``uv run python -m bench.storage_size --blobs 1000 --backend sqlite`` (or ``redis``: a
``redis-server`` is started for the node, AOF ``appendfsync always``, ``noeviction``).

* **Node.** One ``dna-storage-node`` process (no overlay peers) on a loopback address of its
  own; admission limits raised so the bench is not rate limited (8-bit proof of work),
  ``gc_interval_s = 2``.
* **Store.** ``--blobs`` sealed envelopes of ``MAX_PAYLOAD_BYTES`` (192 KiB payload: the
  largest a client sends, ~200 KiB on the wire) to ``--blobs / PER_MAILBOX`` mailboxes,
  ``PutMany`` calls of ``PUT_BATCH`` from ``WRITERS`` clients at once.
* **Fetch.** Every mailbox fetched whole, ``--fetchers`` clients at once (each owner's
  mailbox by ``fetchers / mailboxes`` clients), unary ``Fetch`` pages of ``limit = 1000``.
* **Delete.** Every blob deleted by its owner (signed deletes of 200 IDs).
* **GC.** Wait ``GC_WAIT_S`` (several GC intervals).

After each phase: the node's ``VmRSS`` and ``VmHWM`` (peak so far), from ``/proc``, in MiB
(and Redis's own ``used_memory`` / RSS for the Redis backend). One JSON line per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
from dna_core.crypto import Identity, seal
from dna_core.crypto import pow as pow_
from dna_core.crypto.envelope import MAX_PAYLOAD_BYTES
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_delete, sign_fetch
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_storage.backends.base import StoredBlob
from dna_storage.backends.sqlite import SqliteBackend
from dna_testnet.harness import LOOPBACK
from dna_testnet.network import GRPC_PORT, LocalNode, wait_ready

from bench.harness import memory_mb, now_ms, run_in_scratch, stop_fleet

(NODE_IP,) = LOOPBACK.take(1)
PER_MAILBOX = 200  # 200 x ~200 KiB: within the default 64 MiB mailbox quota
PUT_BATCH = 9  # ~1.8 MiB a PutMany: under the client's 2 MiB batches
WRITERS = 8
GC_WAIT_S = 8.0
HUGE_BLOB = 3_000  # 20,000 of them: 57 MiB, within a raised quota
NODE_TOML = (
    "gc_interval_s = 2.0\nrepair_interval_s = 3600.0\n"
    "[admission]\npow_base_bits = 8\nip_rate_per_s = 100000.0\nip_burst = 100000.0\n"
    "mailbox_rate_per_s = 100000.0\nmailbox_burst = 100000.0\n"
    "pow_target_puts_per_s = 100000.0\n"
)
MIB = 1024 * 1024
CHANNEL = [("grpc.max_receive_message_length", 4 * MIB), ("grpc.use_local_subchannel_pool", 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(root: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A ``redis-server`` on ``port`` (a free one by default) keeping its AOF in ``root``."""
    port = port or free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(root),
         "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def redis_memory(url: str) -> dict[str, float]:
    import redis

    info = redis.Redis.from_url(url).info("memory")
    return {"redis_used": round(info["used_memory"] / MIB, 1),
            "redis_rss": round(info["used_memory_rss"] / MIB, 1)}  # fmt: skip


def put(owner: Identity, sender: Identity, serial: int) -> mailbox_pb2.PutRequest:
    box = mailbox_id(owner.fingerprint)
    payload = serial.to_bytes(8, "big") + os.urandom(MAX_PAYLOAD_BYTES - 8)
    blob = seal(sender, owner.public, payload, now_ms=now_ms())
    proof, _ = pow_.solve(put_pow_hash(box, blob), 8, now_ms=now_ms())
    return mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob, pow=proof.to_proto())


async def store(stub: Any, owners: list[Identity], total: int) -> int:
    sender = Identity.generate()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for start in range(0, total, PUT_BATCH):
        queue.put_nowait(start)
    stored = 0

    async def writer() -> None:
        nonlocal stored
        while not queue.empty():
            start = queue.get_nowait()
            batch = [put(owners[i // PER_MAILBOX], sender, i)
                     for i in range(start, min(start + PUT_BATCH, total))]  # fmt: skip
            reply = await stub.PutMany(mailbox_pb2.PutManyRequest(puts=batch), timeout=60)
            stored += sum(1 for o in reply.outcomes if o.code == 0)

    await asyncio.gather(*(writer() for _ in range(WRITERS)))
    return stored


async def fetch_all(stub: Any, owner: Identity) -> list[bytes]:
    ids: list[bytes] = []
    cursor = b""
    while True:
        raw = sign_fetch(owner, cursor=cursor, limit=1000, now_ms=now_ms())
        page = await stub.Fetch(mailbox_pb2.FetchRequest.FromString(raw), timeout=120)
        ids += [b.blob_id for b in page.blobs]
        cursor = page.next_cursor
        if not page.more:
            return ids


async def fetch_alone(owner: Identity) -> list[bytes]:
    """A client of its own: its own channel (connection), as separate devices have."""
    async with grpc.aio.insecure_channel(f"{NODE_IP}:{GRPC_PORT}", options=CHANNEL) as channel:
        return await fetch_all(mailbox_pb2_grpc.MailboxStub(channel), owner)


async def delete_all(stub: Any, owner: Identity, ids: list[bytes]) -> None:
    for start in range(0, len(ids), 200):
        raw = sign_delete(owner, ids[start : start + 200], now_ms=now_ms())
        await stub.Delete(mailbox_pb2.DeleteRequest.FromString(raw), timeout=60)


def line(phase: str, pid: int, redis_url: str | None, **extra: Any) -> None:
    figures: dict[str, Any] = {"phase": phase, **memory_mb(pid), **extra}
    if redis_url:
        figures |= redis_memory(redis_url)
    print(json.dumps(figures), flush=True)


async def run(args: argparse.Namespace, root: Path) -> None:
    redis_proc, redis_url = (None, None)
    toml = NODE_TOML
    if args.backend == "redis":
        redis_proc, redis_url = start_redis(root)
        toml = f'backend = "redis"\nredis_url = "{redis_url}"\n' + toml
    node = LocalNode("size", NODE_IP, root, [], command="dna-storage-node", extra_toml=toml)
    node.start()
    try:
        await asyncio.to_thread(wait_ready, [node], 60)
        assert node.proc is not None
        pid = node.proc.pid
        line("started", pid, redis_url)
        owners = [Identity.generate() for _ in range(max(1, args.blobs // PER_MAILBOX))]
        async with grpc.aio.insecure_channel(f"{NODE_IP}:{GRPC_PORT}", options=CHANNEL) as channel:
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            t0 = time.perf_counter()
            stored = await store(stub, owners, args.blobs)
            line("stored", pid, redis_url, blobs=stored, s=round(time.perf_counter() - t0, 1))
            t0 = time.perf_counter()
            each = max(1, args.fetchers // len(owners))
            fetched = await asyncio.gather(
                *(fetch_alone(owners[i % len(owners)]) for i in range(len(owners) * each))
            )
            line("fetched", pid, redis_url, fetches=len(fetched),
                 blobs=sum(map(len, fetched)), s=round(time.perf_counter() - t0, 1))  # fmt: skip
            await asyncio.gather(*(delete_all(stub, o, fetched[i]) for i, o in enumerate(owners)))
            line("deleted", pid, redis_url)
            await asyncio.sleep(GC_WAIT_S)
            line("collected", pid, redis_url)
    except Exception:
        print(node.tail(60), flush=True)
        raise
    finally:
        stop_fleet([node], redis_proc)


async def huge_mailbox(args: argparse.Namespace, root: Path) -> None:
    """One mailbox of ``--huge`` blobs of ``HUGE_BLOB`` bytes, filled through the backend
    (not gRPC), fetched whole by one client that sleeps ``--slow-s`` after each page: the
    node's RSS and peak while it reads."""
    owner = Identity.generate()
    box = mailbox_id(owner.fingerprint)
    at = now_ms()
    (root / "size-data").mkdir(parents=True)  # LocalNode's data_dir for "size"
    backend = await SqliteBackend.open(root / "size-data" / "mailboxes.sqlite3")
    for start in range(0, args.huge, 5_000):
        blobs = []
        for _ in range(min(5_000, args.huge - start)):
            data = os.urandom(HUGE_BLOB)
            blobs.append(StoredBlob(box, hashlib.sha256(data).digest(), data, at,
                                    at + 86_400_000))  # fmt: skip
        await backend.put_many(blobs, at)
    await backend.close()
    toml = f"[admission]\nquota_max_blobs = {args.huge}\nquota_max_bytes = 1073741824\n"
    node = LocalNode("size", NODE_IP, root, [], command="dna-storage-node", extra_toml=toml)
    node.start()
    try:
        await asyncio.to_thread(wait_ready, [node], 60)
        assert node.proc is not None
        line("started", node.proc.pid, None)
        async with grpc.aio.insecure_channel(f"{NODE_IP}:{GRPC_PORT}", options=CHANNEL) as ch:
            stub = mailbox_pb2_grpc.MailboxStub(ch)
            cursor, got, pages = b"", 0, 0
            t0 = time.perf_counter()
            while True:
                raw = sign_fetch(owner, cursor=cursor, limit=1000, now_ms=now_ms())
                page = await stub.Fetch(mailbox_pb2.FetchRequest.FromString(raw), timeout=60)
                got, pages, cursor = got + len(page.blobs), pages + 1, page.next_cursor
                await asyncio.sleep(args.slow_s)
                if not page.more:
                    break
        line("fetched slowly", node.proc.pid, None, blobs=got, pages=pages,
             s=round(time.perf_counter() - t0, 1))  # fmt: skip
    finally:
        node.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blobs", type=int, default=1000)
    parser.add_argument("--backend", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--fetchers", type=int, default=100)
    parser.add_argument("--huge", type=int, default=0, help="one mailbox of this many blobs")
    parser.add_argument("--slow-s", type=float, default=0.2, help="pause after each page")
    args = parser.parse_args()
    run_in_scratch("size", lambda root: huge_mailbox(args, root) if args.huge else run(args, root))


if __name__ == "__main__":
    main()
