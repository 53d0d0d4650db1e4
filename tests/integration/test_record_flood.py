"""Issue 10 defect 4: a record store flooded by fresh identities, on a real node process.

The flood comes from one source address (127.0.0.1) with a fresh identity per record, as in
the report; a legitimate publish comes from another address through a TCP relay bound to that
address, so the node sees two real sources (both through the node's connection guard: the
rate limit must see the client behind it, not the guard). The store must stay bounded in
records and bytes, refuse or evict fairly (counted in metrics), and still take the real
user's identity record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cluster import GRPC_PORT, NodeProcess, free_ips, sample_value, scrape, wait_ready
from dna_core.crypto import Identity, sign_record
from dna_core.ops.relay import TcpRelay
from dna_core.overlay.records import identity_payload, record_key
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc

pytestmark = pytest.mark.process  # every test starts nodes

IDENTITY = common_pb2.RECORD_KIND_IDENTITY
POW_BITS = 4  # the nodes below require this much of identity records (kept small for speed)
FLOOD = 240
BIG_NAME = "x" * 7_000  # ~8 KiB records, as in the report


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def identity_record(who: Identity, display: str) -> common_pb2.SignedRecord:
    now = _now_ms()
    payload = identity_payload(who.fingerprint, display, pow_bits=POW_BITS, now_ms=now)
    raw = sign_record(
        who, kind=IDENTITY, key=record_key(IDENTITY, who.fingerprint), seq=now,
        now_ms=now, ttl_ms=3 * 86_400_000, payload=payload,
    )  # fmt: skip
    return common_pb2.SignedRecord.FromString(raw)


async def store_all(target: str, records: list[common_pb2.SignedRecord]) -> int:
    """Store every record on ``target`` (32 calls in flight); returns how many were taken."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = overlay_pb2_grpc.OverlayStub(channel)
        gate = asyncio.Semaphore(32)

        async def one(rec: common_pb2.SignedRecord) -> bool:
            async with gate:
                try:
                    await stub.Store(overlay_pb2.StoreRequest(record=rec), timeout=10)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                    return False
                return True

        return sum(await asyncio.gather(*(one(r) for r in records)))


def rss_kib(node: NodeProcess) -> int:
    assert node.proc is not None
    status = Path(f"/proc/{node.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


@contextlib.contextmanager
def one_node(root: Path, ip: str, extra: str) -> Iterator[NodeProcess]:
    node = NodeProcess("flooded", ip, root, [], records_toml=extra)
    node.start()
    try:
        wait_ready([node])
        yield node
    finally:
        node.kill()


def flood_and_publish(node: NodeProcess, legit: Identity) -> tuple[int, bool, float]:
    flood = [identity_record(Identity.generate(), BIG_NAME) for _ in range(FLOOD)]

    async def run() -> tuple[int, bool, float]:
        started = time.monotonic()
        taken = await store_all(f"{node.ip}:{GRPC_PORT}", flood)
        elapsed = time.monotonic() - started
        async with TcpRelay((node.ip, GRPC_PORT), upstream_source=free_ips(1)[0]) as via:
            ok = await store_all(via.address, [identity_record(legit, "real user")])
        return taken, ok == 1, elapsed

    return asyncio.run(run())


def test_one_source_is_rate_limited_and_a_real_user_still_publishes(tmp_path: Path) -> None:
    extra = f"identity_pow_bits = {POW_BITS}\n"  # the public defaults otherwise
    with one_node(tmp_path, free_ips(1)[0], extra) as node:
        taken, legit_ok, elapsed = flood_and_publish(node, Identity.generate())
        status = node.status()
        rejected = sample_value(scrape(node), "dna_overlay_rejected_total",
                                reason="record_RateLimited")  # fmt: skip
    # the defaults: a burst of 30, then 1 record a second per source
    assert taken <= 30 + elapsed + 2, f"{taken} of {FLOOD} flood records taken in {elapsed:.1f} s"
    assert legit_ok, "the real user's identity record was refused"
    assert status["records"] == taken + 1
    assert rejected == FLOOD - taken


def test_a_full_store_stays_bounded_and_evicts_the_biggest_holder(tmp_path: Path) -> None:
    extra = (
        f"identity_pow_bits = {POW_BITS}\nmax_records = 50\nmax_bytes = 1000000\n"
        "source_rate_per_s = 10000.0\nsource_burst = 10000.0\n"
    )
    with one_node(tmp_path, free_ips(1)[0], extra) as node:
        rss_before = rss_kib(node)
        taken, legit_ok, _ = flood_and_publish(node, Identity.generate())
        status = node.status()
        metrics = scrape(node)
        rss_after = rss_kib(node)
    assert legit_ok, "the real user's identity record was refused by a full store"
    assert status["records"] <= 50
    assert status["record_bytes"] <= 1_000_000
    assert sample_value(metrics, "dna_overlay_records_evicted_total") >= 1
    refused = sample_value(metrics, "dna_overlay_rejected_total", reason="record_CapacityError")
    assert taken + refused == FLOOD
    assert rss_after - rss_before < 40_000, f"RSS grew {rss_after - rss_before} KiB"
