"""One mailbox of many small blobs on one storage node, through gRPC: put, paged fetch,
delete, fetch again.

``python -m bench.big_mailbox --blobs 30000 --backend sqlite`` (or ``redis``: a
``redis-server`` is started for the node). The mailbox quota is raised to hold them.

Phases (one JSON line each): ``stored`` (``PutMany`` calls of ``PUT_BATCH`` from
``WRITERS`` clients; puts/s and p99 of a call), ``fetched`` (one client, unary ``Fetch``
pages of ``limit = 1000``: pages, seconds, the slowest page, blobs fetched twice, blobs
missing), ``deleted`` (signed deletes of 200 IDs: seconds, the slowest batch, the first
and last tenth's mean), ``refetched`` (what a fetch from the start still returns). Each
line carries the node's ``VmRSS``/``VmHWM`` and the client's own, in MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
from dna_core.crypto import Identity, seal
from dna_core.crypto import pow as pow_
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_delete, sign_fetch
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_testnet.network import GRPC_PORT, LocalNode, wait_ready

from bench.harness import memory_mb, now_ms, run_in_scratch, stop_fleet
from bench.storage_size import CHANNEL, NODE_IP, NODE_TOML, redis_memory, start_redis

PUT_BATCH = 64
WRITERS = 4
PAYLOAD = 200


def put(box: bytes, owner: Identity, sender: Identity, serial: int) -> mailbox_pb2.PutRequest:
    payload = serial.to_bytes(8, "big") + os.urandom(PAYLOAD)
    blob = seal(sender, owner.public, payload, now_ms=now_ms())
    proof, _ = pow_.solve(put_pow_hash(box, blob), 8, now_ms=now_ms())
    return mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob, pow=proof.to_proto())


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1)


async def store(stub: Any, owner: Identity, total: int) -> dict[str, Any]:
    box = mailbox_id(owner.fingerprint)
    sender = Identity.generate()
    starts = list(range(0, total, PUT_BATCH))
    stored = 0
    refused: list[str] = []
    waits: list[float] = []

    async def writer() -> None:
        nonlocal stored
        while starts:
            start = starts.pop(0)
            stop = min(start + PUT_BATCH, total)
            batch = [put(box, owner, sender, i) for i in range(start, stop)]
            t0 = time.perf_counter()
            reply = await stub.PutMany(mailbox_pb2.PutManyRequest(puts=batch), timeout=120)
            waits.append(time.perf_counter() - t0)
            stored += sum(1 for o in reply.outcomes if o.code == 0)
            refused.extend(o.reason for o in reply.outcomes if o.code != 0)

    t0 = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(WRITERS)))
    return {"blobs": stored, "refused": len(refused), "first_refusal": refused[:1],
            "s": round(time.perf_counter() - t0, 1), "call_p99_ms": p99(waits)}  # fmt: skip


async def fetch_all(stub: Any, owner: Identity) -> tuple[list[bytes], dict[str, Any]]:
    ids: list[bytes] = []
    cursor, pages, times = b"", 0, []
    t0 = time.perf_counter()
    while True:
        raw = sign_fetch(owner, cursor=cursor, limit=1000, now_ms=now_ms())
        t1 = time.perf_counter()
        page = await stub.Fetch(mailbox_pb2.FetchRequest.FromString(raw), timeout=120)
        times.append(time.perf_counter() - t1)
        ids += [b.blob_id for b in page.blobs]
        cursor, pages = page.next_cursor, pages + 1
        if not page.more:
            break
    figures = {"pages": pages, "s": round(time.perf_counter() - t0, 1),
               "slowest_page_ms": round(max(times) * 1000, 1),
               "first_page_ms": round(times[0] * 1000, 1),
               "last_page_ms": round(times[-1] * 1000, 1)}  # fmt: skip
    return ids, figures


async def delete_all(stub: Any, owner: Identity, ids: list[bytes]) -> dict[str, Any]:
    times = []
    t0 = time.perf_counter()
    for start in range(0, len(ids), 200):
        raw = sign_delete(owner, ids[start : start + 200], now_ms=now_ms())
        t1 = time.perf_counter()
        await stub.Delete(mailbox_pb2.DeleteRequest.FromString(raw), timeout=120)
        times.append(time.perf_counter() - t1)
    tenth = max(1, len(times) // 10)
    return {"batches": len(times), "s": round(time.perf_counter() - t0, 1),
            "slowest_ms": round(max(times) * 1000, 1),
            "first_tenth_ms": round(sum(times[:tenth]) / tenth * 1000, 1),
            "last_tenth_ms": round(sum(times[-tenth:]) / tenth * 1000, 1)}  # fmt: skip


def line(phase: str, pid: int, redis_url: str | None, **extra: Any) -> None:
    figures: dict[str, Any] = {"phase": phase, "node": memory_mb(pid),
                               "client": memory_mb(), **extra}  # fmt: skip
    if redis_url:
        figures |= redis_memory(redis_url)
    print(json.dumps(figures), flush=True)


async def run(args: argparse.Namespace, root: Path) -> None:
    redis_proc, redis_url = (None, None)
    toml = NODE_TOML.replace("[admission]\n", f"[admission]\nquota_max_blobs = {args.blobs}\n"
                             "quota_max_bytes = 1073741824\n")  # fmt: skip
    if args.backend == "redis":
        redis_proc, redis_url = start_redis(root)
        toml = f'backend = "redis"\nredis_url = "{redis_url}"\n' + toml
    node = LocalNode("big", NODE_IP, root, [], command="dna-storage-node", extra_toml=toml)
    node.start()
    try:
        await asyncio.to_thread(wait_ready, [node], 60)
        assert node.proc is not None
        pid = node.proc.pid
        line("started", pid, redis_url)
        owner = Identity.generate()
        async with grpc.aio.insecure_channel(f"{NODE_IP}:{GRPC_PORT}", options=CHANNEL) as channel:
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            line("stored", pid, redis_url, **await store(stub, owner, args.blobs))
            ids, figures = await fetch_all(stub, owner)
            line("fetched", pid, redis_url, blobs=len(ids), twice=len(ids) - len(set(ids)),
                 **figures)  # fmt: skip
            line("deleted", pid, redis_url, **await delete_all(stub, owner, list(set(ids))))
            left, figures = await fetch_all(stub, owner)
            line("refetched", pid, redis_url, blobs=len(left), **figures)
    except Exception:
        print(node.tail(60), flush=True)
        raise
    finally:
        stop_fleet([node], redis_proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blobs", type=int, default=20_000)
    parser.add_argument("--backend", choices=("sqlite", "redis"), default="sqlite")
    args = parser.parse_args()
    run_in_scratch("big", lambda root: run(args, root))


if __name__ == "__main__":
    main()
