"""Many small mailboxes on 5 storage node processes, one of which missed half the puts:
start-up, readiness and the repair that brings that node up to date.

``python -m bench.restart_repair --mailboxes 10000`` (2 blobs each, sealed, with proofs).

Each storage node's SQLite file is written before it starts (through the backend, not
gRPC): every node holds each mailbox's first blob, and nodes 0-3 its second too; node 4
was down while the second ones were put. Then the bootstrap and the 5 nodes start; one
JSON line gives each node's seconds to ready, then lines of node 4's blobs held (from
``/status``) until it holds all, with the seconds since ready and each node's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import time
from pathlib import Path

from dna_core.crypto import Identity, seal
from dna_core.crypto import pow as pow_
from dna_core.mailbox import blob_id, mailbox_id, put_pow_hash
from dna_storage.backends.base import StoredBlob
from dna_storage.backends.sqlite import SqliteBackend
from dna_testnet.harness import LocalNode, local_cluster
from dna_testnet.topology import NodeSpec, Topology

from bench.harness import memory_mb, now_ms, run_in_scratch

DAY_MS = 86_400_000
TOML = "repair_interval_s = 5.0\ngc_interval_s = 2.0\n[admission]\npow_base_bits = 8\n"


def blobs_of(mailboxes: int, cache: Path) -> tuple[list[StoredBlob], list[StoredBlob]]:
    """Each mailbox's first and second blob (cached in ``cache``: making them takes a while)."""
    if cache.exists():
        first, second = pickle.loads(cache.read_bytes())
        return first, second
    sender, now = Identity.generate(), now_ms()
    first, second = [], []
    for i in range(mailboxes):
        owner = Identity.generate()
        box = mailbox_id(owner.fingerprint)
        for n, out in enumerate((first, second)):
            blob = seal(sender, owner.public, b"message %d.%d" % (i, n), now_ms=now)
            proof, _ = pow_.solve(put_pow_hash(box, blob), 8, now_ms=now)
            out.append(StoredBlob(box, blob_id(blob), blob, now, now + DAY_MS, pow=proof))
    cache.write_bytes(pickle.dumps((first, second)))
    return first, second


async def fill(node: LocalNode, blobs: list[StoredBlob]) -> None:
    data_dir = Path(node.disk.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    backend = await SqliteBackend.open(data_dir / "mailboxes.sqlite3")
    for start in range(0, len(blobs), 5_000):
        await backend.put_many(blobs[start : start + 5_000], now_ms())
    await backend.close()


def held(node: LocalNode) -> int:
    status = node.status()
    return int(status.get("storage", status).get("blobs", -1)) if isinstance(status, dict) else -1


async def run(args: argparse.Namespace, root: Path) -> None:
    first, second = blobs_of(args.mailboxes, Path(args.cache))
    topology = Topology((NodeSpec("boot", "bootstrap"),
                         *(NodeSpec(f"store{i}", "storage") for i in range(5))))  # fmt: skip
    nodes = local_cluster(root, topology, storage_toml=TOML).driver.nodes
    boot, stores = nodes[0], nodes[1:]
    t0 = time.perf_counter()
    for i, node in enumerate(stores):
        await fill(node, first + (second if i < 4 else []))
    print(json.dumps({"filled_s": round(time.perf_counter() - t0, 1)}), flush=True)
    boot.start()
    try:
        started = time.monotonic()
        for node in stores:
            node.start()
        ready: dict[str, float] = {}
        while len(ready) < len(stores) and time.monotonic() - started < 120:
            for node in stores:
                if node.name not in ready and node.is_ready():
                    ready[node.name] = round(time.monotonic() - started, 2)
            await asyncio.sleep(0.1)
        print(json.dumps({"ready_s": ready}), flush=True)
        print(json.dumps({"status": stores[4].status()}), flush=True)
        want = 2 * args.mailboxes
        t1 = time.monotonic()
        while time.monotonic() - t1 < args.bound_s:
            count = held(stores[4])
            rss = [memory_mb(n.proc.pid)["VmRSS"] for n in stores if n.proc]
            print(json.dumps({"s": round(time.monotonic() - t1, 1), "held": count, "rss": rss}),
                  flush=True)  # fmt: skip
            if count >= want:
                break
            await asyncio.sleep(5)
        print(json.dumps({"peak": [memory_mb(n.proc.pid)["VmHWM"] for n in stores if n.proc]}))
    finally:
        for node in nodes:
            if node.alive():
                print(node.name, node.tail(3))
                node.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument("--bound-s", type=float, default=300.0)
    parser.add_argument("--cache", default="/tmp/restart_repair_blobs.pickle")
    args = parser.parse_args()
    run_in_scratch("restart", lambda root: run(args, root))


if __name__ == "__main__":
    main()
