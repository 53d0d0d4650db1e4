"""One mailbox of many blobs on 5 storage node processes, read and emptied by its owner's
``MailboxClient``: fetches until nothing is left, then one ``delete`` of every ID.

``python -m bench.client_big_mailbox --blobs 20000``

Each node's SQLite file is written before it starts (through the backend): the same
``--blobs`` random blobs of ``BLOB_BYTES`` on every node, each node in an order of its own
(so the nodes' cursors differ), node 4 lacking ``--missing`` of them. One JSON line per
phase: ``fetched`` (fetch calls, blobs returned, returned twice across calls, distinct,
seconds, the client's RSS and peak), ``deleted`` (IDs deleted, refusals, seconds, RSS),
``refetched`` (a fetch from no cursor after the delete: blobs left), and each node's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from dna_core.crypto import Identity
from dna_core.mailbox import FetchState, MailboxClient, blob_id, mailbox_id
from dna_storage.backends.base import StoredBlob
from dna_storage.backends.sqlite import SqliteBackend
from dna_testnet.harness import LocalNode, local_cluster, wait_ready
from dna_testnet.network import UDP_PORT, client_node
from dna_testnet.topology import NodeSpec, Topology

from bench.harness import memory_mb, now_ms, run_in_scratch

BLOB_BYTES = 3_000
DAY_MS = 86_400_000


def toml(blobs: int) -> str:
    return (f"repair_interval_s = 3600.0\n[admission]\npow_base_bits = 8\n"
            f"quota_max_blobs = {blobs}\nquota_max_bytes = 1073741824\n")  # fmt: skip


async def fill(node: LocalNode, blobs: list[StoredBlob], seed: int) -> None:
    order = list(blobs)
    random.Random(seed).shuffle(order)
    data_dir = Path(node.disk.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    backend = await SqliteBackend.open(data_dir / "mailboxes.sqlite3")
    for start in range(0, len(order), 5_000):
        await backend.put_many(order[start : start + 5_000], now_ms())
    await backend.close()


def line(phase: str, stores: list[LocalNode], **extra: object) -> None:
    nodes = [memory_mb(n.proc.pid) for n in stores if n.proc]
    figures = {"phase": phase, "client": memory_mb(), "nodes_rss": [n["VmRSS"] for n in nodes],
               "nodes_peak": [n["VmHWM"] for n in nodes], **extra}  # fmt: skip
    print(json.dumps(figures), flush=True)


async def run(args: argparse.Namespace, root: Path) -> None:
    owner = Identity.generate()
    box, now = mailbox_id(owner.fingerprint), now_ms()
    blobs = []
    for _ in range(args.blobs):
        data = os.urandom(BLOB_BYTES)
        blobs.append(StoredBlob(box, blob_id(data), data, now, now + DAY_MS))
    topology = Topology((NodeSpec("boot", "bootstrap"),
                         *(NodeSpec(f"store{i}", "storage") for i in range(5))))  # fmt: skip
    nodes = local_cluster(root, topology, storage_toml=toml(args.blobs)).driver.nodes
    stores = nodes[1:]
    for i, node in enumerate(stores):
        await fill(node, blobs[args.missing :] if i == 4 else blobs, seed=i)
    try:
        for node in nodes:
            node.start()
        await asyncio.to_thread(wait_ready, nodes, 120)
        client = await client_node([(nodes[0].ip, UDP_PORT)])
        mail = MailboxClient(client, pow_bits=8, timeout=30.0)
        state, seen, returned, calls = FetchState(), set(), 0, 0
        t0 = time.perf_counter()
        while True:
            got, state = await mail.fetch(owner, state, limit=1000)
            calls += 1
            returned += len(got)
            seen |= {b.blob_id for b in got}
            if not state.more:
                break
        line("fetched", stores, calls=calls, returned=returned, distinct=len(seen),
             twice=returned - len(seen), missing=args.blobs - len(seen),
             s=round(time.perf_counter() - t0, 1))  # fmt: skip
        t0 = time.perf_counter()
        result = await mail.delete(owner, sorted(seen))
        line("deleted", stores, deleted=len(result.deleted), refusals=result.refusals[:2],
             s=round(time.perf_counter() - t0, 1))  # fmt: skip
        left, _ = await mail.fetch(owner, FetchState(), limit=1000)
        line("refetched", stores, left=len(left))
        await mail.close()
        await client.stop()
    finally:
        for node in nodes:
            if node.alive():
                node.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blobs", type=int, default=20_000)
    parser.add_argument("--missing", type=int, default=2_000)
    args = parser.parse_args()
    run_in_scratch("client-big", lambda root: run(args, root))


if __name__ == "__main__":
    main()
