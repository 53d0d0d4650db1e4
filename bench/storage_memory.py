"""Memory of a storage node holding 1,000,000 small blobs (SQLite), and its fetch latency then.

``uv run python -m bench.storage --sections memory [--memory-blobs N] [--memory-blob-bytes B]``
(opt-in: filling a million blobs takes about a minute here).

* **Setup, not timed.** Two data directories are filled *directly through the backend API*
  (``SqliteBackend.put_many``, mailbox after mailbox, ``FILL_BATCH`` blobs a transaction),
  not through gRPC: a million puts with proof of work to 5 replicas would take hours here.

  - big: ``N`` blobs of ``B`` random bytes, ``BLOBS_PER_MAILBOX`` per mailbox; among the
    mailboxes, ``OWNERS`` belong to identities of this process (fetches must be signed);
  - small (the baseline): only those ``OWNERS`` mailboxes, with the same blobs.

  Then one ``dna-storage-node`` process is started on each directory (on ``BIG_IP`` and
  ``SMALL_IP``, from the harness's allocator; ``repair_interval_s = 5``) and measuring waits
  until each has finished a repair pass (which walks every mailbox held).
* **Fetch latency**: a ``Fetch`` of one measured mailbox from cursor 0 (all its blobs; the
  request signed before timing), on the big and the small node in alternating chunks,
  ``--rounds`` rounds; p50/p99 are medians of the rounds' percentiles.
* **Memory**: ``VmRSS`` (now) and ``VmHWM`` (peak) of each node process, from ``/proc``,
  after the fetches.

Figures (BENCH.md): ``storage.memory.rss`` in MiB and ``storage.memory.fetch.p50``/``.p99``
in ms, each with the small node as baseline (``ratio`` = small / big: 1.0 means holding a
million blobs costs nothing extra).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from dna_core.crypto import Identity
from dna_core.mailbox import mailbox_id, sign_fetch
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_storage.backends.base import StoredBlob
from dna_storage.backends.sqlite import SqliteBackend
from dna_testnet.harness import LOOPBACK
from dna_testnet.network import GRPC_PORT, LocalNode, wait_ready
from prometheus_client.parser import text_string_to_metric_families

from bench import harness
from bench.harness import now_ms, percentile

BIG_IP, SMALL_IP = LOOPBACK.take(2)
BLOBS_PER_MAILBOX = 50
OWNERS = 20
FILL_BATCH = 5_000
DAY_MS = 86_400_000
CHUNK = 10  # fetches on one node before switching to the other
NODE_TOML = "repair_interval_s = 5.0\n"
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class MemoryConfig:
    blobs: int
    blob_bytes: int
    ops: int  # fetches per node and round
    rounds: int


def blobs_of(box: bytes, count: int, size: int, at_ms: int) -> list[StoredBlob]:
    out = []
    for _ in range(count):
        data = os.urandom(size)
        out.append(StoredBlob(box, hashlib.sha256(data).digest(), data, at_ms, at_ms + 30 * DAY_MS))
    return out


async def fill(path: Path, boxes: list[bytes], owned: dict[bytes, list[StoredBlob]],
               cfg: MemoryConfig) -> None:  # fmt: skip
    """Every mailbox in ``boxes`` (sorted: B-tree inserts stay local), owned ones with
    their given blobs, the others with fresh random blobs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = await SqliteBackend.open(path)
    try:
        batch: list[StoredBlob] = []
        at = now_ms()
        for box in boxes:
            batch += owned.get(box) or blobs_of(box, BLOBS_PER_MAILBOX, cfg.blob_bytes, at)
            if len(batch) >= FILL_BATCH:
                await backend.put_many(batch, at)
                batch = []
        await backend.put_many(batch, at)
    finally:
        await backend.close()


async def build(root: Path, cfg: MemoryConfig) -> tuple[list[Identity], dict[str, Any]]:
    """Both data directories; the owners of the measured mailboxes and setup details."""
    owners = [Identity.generate() for _ in range(OWNERS)]
    at = now_ms()
    owned = {
        mailbox_id(o.fingerprint): blobs_of(
            mailbox_id(o.fingerprint), BLOBS_PER_MAILBOX, cfg.blob_bytes, at
        )
        for o in owners
    }
    fillers = max(0, cfg.blobs // BLOBS_PER_MAILBOX - OWNERS)
    big_boxes = sorted([*owned, *(os.urandom(32) for _ in range(fillers))])
    started = time.perf_counter()
    await fill(root / "big-data" / "mailboxes.sqlite3", big_boxes, owned, cfg)
    fill_s = time.perf_counter() - started
    await fill(root / "small-data" / "mailboxes.sqlite3", sorted(owned), owned, cfg)
    big_db = root / "big-data" / "mailboxes.sqlite3"
    setup = {
        "fill": "SqliteBackend.put_many directly (not gRPC), then the node started on it",
        "fill_s": round(fill_s, 1), "big_blobs": len(big_boxes) * BLOBS_PER_MAILBOX,
        "big_mailboxes": len(big_boxes), "small_blobs": OWNERS * BLOBS_PER_MAILBOX,
        "big_db_bytes": sum(p.stat().st_size for p in big_db.parent.iterdir()),
    }  # fmt: skip
    return owners, setup


def node_process(root: Path, name: str, ip: str) -> LocalNode:
    """A standalone storage node whose data directory is ``root / f"{name}-data"``."""
    return LocalNode(name, ip, root, [], command="dna-storage-node", extra_toml=NODE_TOML)


def repair_passes(node: LocalNode) -> float:
    for family in text_string_to_metric_families(node.http("/metrics").text):
        for sample in family.samples:
            if sample.name == "dna_storage_repair_passes_total":
                return float(sample.value)
    return 0.0


async def until_repaired(nodes: list[LocalNode], timeout_s: float) -> None:
    """Wait until every node finished a repair pass over all it holds."""
    deadline = time.monotonic() + timeout_s
    while not all(repair_passes(n) >= 1 for n in nodes):
        if time.monotonic() > deadline:
            raise TimeoutError("no repair pass finished")
        await asyncio.sleep(0.5)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    fields = harness.proc_status(pid)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


async def fetch_chunk(
    stub: Any, owners: list[Identity], count: int, offset: int, samples: list[float]
) -> int:
    """``count`` fetches of whole measured mailboxes; returns how many came back short."""
    failures = 0
    for i in range(count):
        owner = owners[(offset + i) % len(owners)]
        raw = sign_fetch(owner, limit=BLOBS_PER_MAILBOX + 1, now_ms=now_ms())
        request = mailbox_pb2.FetchRequest.FromString(raw)
        t0 = time.perf_counter()
        page = await stub.Fetch(request, timeout=10)
        samples.append(time.perf_counter() - t0)
        failures += len(page.blobs) != BLOBS_PER_MAILBOX
    return failures


async def measure_fetches(
    owners: list[Identity], cfg: MemoryConfig
) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Per node ("big", "small"), the p50 and p99 (ms) of every round; and failures."""
    channels = {
        name: grpc.aio.insecure_channel(f"{ip}:{GRPC_PORT}")
        for name, ip in (("big", BIG_IP), ("small", SMALL_IP))
    }
    stubs = {name: mailbox_pb2_grpc.MailboxStub(ch) for name, ch in channels.items()}
    rounds: dict[str, dict[str, list[float]]] = {n: {"p50": [], "p99": []} for n in stubs}
    failures = 0
    try:
        for stub in stubs.values():  # warm-up
            failures += await fetch_chunk(stub, owners, CHUNK, 0, [])
        for r in range(cfg.rounds):
            samples: dict[str, list[float]] = {n: [] for n in stubs}
            order = list(stubs) if r % 2 == 0 else list(stubs)[::-1]
            for done in range(0, cfg.ops, CHUNK):
                for name in order:
                    count = min(CHUNK, cfg.ops - done)
                    failures += await fetch_chunk(stubs[name], owners, count, done, samples[name])
            for name, values in samples.items():
                values.sort()
                rounds[name]["p50"].append(percentile(values, 0.50) * 1000)
                rounds[name]["p99"].append(percentile(values, 0.99) * 1000)
    finally:
        for channel in channels.values():
            await channel.close()
    return rounds, failures


def report(
    rounds: dict[str, dict[str, list[float]]],
    memory: dict[str, dict[str, int]],
    setup: dict[str, Any],
    cfg: MemoryConfig,
    failures: int,
) -> None:
    params = {
        **setup, "blob_bytes": cfg.blob_bytes, "blobs_per_mailbox": BLOBS_PER_MAILBOX,
        "fetch": f"one mailbox from cursor 0 ({BLOBS_PER_MAILBOX} blobs)", "rounds": cfg.rounds,
        "memory_kib": memory, "failures": failures,
    }  # fmt: skip
    big_mib, small_mib = memory["big"]["VmRSS"] / 1024, memory["small"]["VmRSS"] / 1024
    harness.report("storage.memory.rss", "MiB", big_mib, {"small_node": small_mib}, 1, params,
                   kind="latency")  # fmt: skip
    for pct in ("p50", "p99"):
        ours = statistics.median(rounds["big"][pct])
        base = statistics.median(rounds["small"][pct])
        harness.report(f"storage.memory.fetch.{pct}", "ms", ours, {"small_node": base}, cfg.ops,
                       params, kind="latency")  # fmt: skip


async def run(root: Path, cfg: MemoryConfig) -> int:
    owners, setup = await build(root, cfg)
    nodes = [node_process(root, "big", BIG_IP), node_process(root, "small", SMALL_IP)]
    try:
        started = time.perf_counter()
        for node in nodes:
            node.start()
        await asyncio.to_thread(wait_ready, nodes, READY_TIMEOUT_S)
        await until_repaired(nodes, READY_TIMEOUT_S)
        setup["ready_and_repaired_s"] = round(time.perf_counter() - started, 1)
        rounds, failures = await measure_fetches(owners, cfg)
        memory = {}
        for node in nodes:
            assert node.proc is not None
            memory[node.name] = memory_kib(node.proc.pid)
        report(rounds, memory, setup, cfg, failures)
        return 1 if failures else 0
    finally:
        for node in nodes:
            if node.alive():
                node.kill()
