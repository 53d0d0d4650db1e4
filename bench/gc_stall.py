"""Put latency on one storage node process while its GC removes a backlog of expired blobs.

``python -m bench.gc_stall --expired 50000 --backend sqlite`` (or ``redis``: a
``redis-server`` is started for the node). ``--expired 0`` is the baseline.

The store is filled before the node starts (through the backend): ``--expired`` blobs of
``EXPIRED_BYTES`` over ``MAILBOXES`` mailboxes, stored an hour ago and expired a minute
ago. The node runs ``gc_interval_s = 1``. From its readiness on, ``WRITERS`` clients put
sealed envelopes (prepared beforehand, 8-bit proofs) to fresh mailboxes, one unary
``Put`` at a time each, for ``--seconds``. One JSON line per second: puts, p50/p99/max of
the puts that ended in that second, and the GC's removals so far (``dna_storage_gc_removed``);
then a summary while GC ran (removals growing) and after.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from dna_core.crypto import Identity, seal
from dna_core.crypto import pow as pow_
from dna_core.mailbox import mailbox_id, put_pow_hash
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_storage.backends.base import StoredBlob
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend
from dna_testnet.network import GRPC_PORT, LocalNode, wait_ready

from bench.harness import now_ms, run_in_scratch, stop_fleet
from bench.storage_size import CHANNEL, NODE_IP, start_redis

EXPIRED_BYTES = 2_000
MAILBOXES = 500
WRITERS = 4
TOML = (
    "gc_interval_s = 1.0\nrepair_interval_s = 3600.0\n"
    "[admission]\npow_base_bits = 8\nip_rate_per_s = 100000.0\nip_burst = 100000.0\n"
    "mailbox_rate_per_s = 100000.0\nmailbox_burst = 100000.0\n"
    "pow_target_puts_per_s = 100000.0\n"
)


async def fill(backend: Any, expired: int) -> None:
    now = now_ms()
    boxes = [os.urandom(32) for _ in range(MAILBOXES)]
    for start in range(0, expired, 5_000):
        blobs = []
        for i in range(start, min(start + 5_000, expired)):
            data = os.urandom(EXPIRED_BYTES)
            blobs.append(StoredBlob(boxes[i % MAILBOXES], hashlib.sha256(data).digest(), data,
                                    now - 3_600_000, now - 60_000))  # fmt: skip
        await backend.put_many(blobs, now - 3_600_000)
    await backend.close()


def prepared(count: int) -> list[mailbox_pb2.PutRequest]:
    sender, out = Identity.generate(), []
    for i in range(count):
        owner = Identity.generate()
        box = mailbox_id(owner.fingerprint)
        blob = seal(sender, owner.public, b"put %d" % i, now_ms=now_ms())
        proof, _ = pow_.solve(put_pow_hash(box, blob), 8, now_ms=now_ms())
        out.append(mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob,
                                          pow=proof.to_proto()))  # fmt: skip
    return out


def gc_removed(node: LocalNode) -> float:
    text = node.http("/metrics").text
    for line in text.splitlines():
        if line.startswith("dna_storage_gc_removed_total "):
            return float(line.split()[1])
    return 0.0


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 1)

    return {"n": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99),
            "max_ms": round(ordered[-1] * 1000, 1)}  # fmt: skip


async def measure(node: LocalNode, puts: list[mailbox_pb2.PutRequest], seconds: float) -> None:
    ended: list[tuple[float, float]] = []  # (end time, latency)
    failed = 0
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"{NODE_IP}:{GRPC_PORT}", options=CHANNEL) as channel:
        stub = mailbox_pb2_grpc.MailboxStub(channel)

        async def writer() -> None:
            nonlocal failed
            while puts and time.monotonic() < deadline:
                request = puts.pop()
                t0 = time.monotonic()
                try:
                    await stub.Put(request, timeout=30)
                except grpc.aio.AioRpcError:
                    failed += 1
                ended.append((time.monotonic(), time.monotonic() - t0))

        async def sampler() -> list[tuple[float, float]]:
            samples = []
            while time.monotonic() < deadline:
                samples.append((time.monotonic(), await asyncio.to_thread(gc_removed, node)))
                await asyncio.sleep(1.0)
            samples.append((time.monotonic(), await asyncio.to_thread(gc_removed, node)))
            return samples

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(writer() for _ in range(WRITERS)))
        samples = await sampling
    # GC ran until the first sample that showed its final count
    final = samples[-1][1]
    gc_end = next(t for t, removed in samples if removed >= final)
    during = [lat for t, lat in ended if t <= gc_end]
    after = [lat for t, lat in ended if t > gc_end]
    print(json.dumps({"gc_removed": final, "gc_s_upto": round(gc_end - samples[0][0], 1),
                      "during_gc": quantiles(during), "after_gc": quantiles(after),
                      "failed": failed}), flush=True)  # fmt: skip


async def run(args: argparse.Namespace, root: Path) -> None:
    redis_proc, redis_url = (None, None)
    toml = TOML
    data_dir = root / "gc-data"
    data_dir.mkdir(parents=True)
    if args.backend == "redis":
        redis_proc, redis_url = start_redis(root)
        toml = f'backend = "redis"\nredis_url = "{redis_url}"\n' + toml
        await fill(await RedisBackend.connect(redis_url), args.expired)
    else:
        await fill(await SqliteBackend.open(data_dir / "mailboxes.sqlite3"), args.expired)
    puts = prepared(args.puts)
    node = LocalNode("gc", NODE_IP, root, [], command="dna-storage-node", extra_toml=toml)
    node.start()
    try:
        await asyncio.to_thread(wait_ready, [node], 60)
        await measure(node, puts, args.seconds)
    except (Exception, httpx.HTTPError):
        print(node.tail(30), flush=True)
        raise
    finally:
        stop_fleet([node], redis_proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expired", type=int, default=50_000)
    parser.add_argument("--backend", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--puts", type=int, default=3_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    run_in_scratch("gc", lambda root: run(args, root))


if __name__ == "__main__":
    main()
