"""20 real node processes: join, store/find, SIGKILL half, restart, rejoin.

Records are stored and fetched by an in-test client (a real OverlayNode in client
mode, UDP + gRPC) that enters the overlay through one node at a time, so every
node serves as an entry point.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cluster import NodeProcess, client_node, make_cluster, node_process, running, wait_ready
from dna_core.crypto import Identity, sign_record
from dna_core.overlay.aio import RECORD_REPLICAS, OverlayNode
from dna_core.overlay.records import identity_payload, record_key
from dna_core.wire.gen.dna.v1 import common_pb2
from process_mark import starts_processes
from support import seeded_identity

T = TypeVar("T")
NODES = 20
IDENTITY = common_pb2.RECORD_KIND_IDENTITY


@pytest.fixture(scope="module")
@starts_processes
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    nodes = make_cluster(tmp_path_factory.mktemp("cluster"), NODES)
    with running(nodes):
        yield nodes


def _record(who: Identity, seq: int = 1) -> tuple[bytes, bytes]:
    key = record_key(IDENTITY, who.fingerprint)
    now = time.time_ns() // 1_000_000
    payload = identity_payload(who.fingerprint, "test", now_ms=now)
    raw = sign_record(
        who, kind=IDENTITY, key=key, seq=seq, now_ms=now, ttl_ms=3_600_000, payload=payload
    )
    return key, raw


async def _with_client(entry: tuple[str, int], work: Callable[[OverlayNode], Awaitable[T]]) -> T:
    client = await client_node([entry])
    try:
        return await work(client)
    finally:
        await client.stop()


def _store_via(entry: NodeProcess, raw: bytes, key: bytes) -> int:
    return asyncio.run(_with_client(entry.udp, lambda c: c.put_record(raw, key)))


def _majority(stored: int) -> bool:
    """A put reached most of its replicas (every node is up when these run)."""
    return 2 * stored > RECORD_REPLICAS


def _find_via(entry: NodeProcess, keys: list[bytes]) -> list[int | None]:
    async def work(client: OverlayNode) -> list[int | None]:
        found = [await client.get_record(key) for key in keys]
        return [r.body.seq if r else None for r in found]

    return asyncio.run(_with_client(entry.udp, work))


def test_twenty_nodes_join_store_find_survive_sigkill_and_rejoin(
    cluster: list[NodeProcess],
) -> None:
    sizes = {n.name: n.status()["routing_table_size"] for n in cluster}
    assert all(size >= 10 for size in sizes.values()), sizes

    identities = [seeded_identity(f"cluster-{i}") for i in range(NODES)]
    records = [_record(who) for who in identities]
    keys = [key for key, _ in records]
    for node, (key, raw) in zip(cluster, records, strict=True):
        assert _majority(_store_via(node, raw, key)), f"store through {node.name}"
    for node in cluster[::4]:
        assert _find_via(node, keys) == [1] * NODES, f"find through {node.name}"

    killed = cluster[1::2]  # half of them, a bootstrap among them
    for node in killed:
        node.kill()
    survivors = [n for n in cluster if n.alive()]
    for node in survivors[::3]:
        assert _find_via(node, keys) == [1] * NODES, f"after SIGKILL, find through {node.name}"

    for node in killed:
        node.start()  # same key file, same address: the same node comes back
    wait_ready(killed)
    for node in killed:
        status = node.status()
        assert status["routing_table_size"] >= 5, (node.name, status)
    assert _find_via(killed[0], keys) == [1] * NODES


def test_higher_sequence_replaces_and_lower_is_refused(cluster: list[NodeProcess]) -> None:
    who = seeded_identity("cluster-rotating")
    key, first = _record(who, seq=5)
    assert _majority(_store_via(cluster[0], first, key))
    _, older = _record(who, seq=4)
    assert _store_via(cluster[1], older, key) == 0  # every node refuses the rollback
    _, newer = _record(who, seq=6)
    assert _majority(_store_via(cluster[2], newer, key))
    assert _find_via(cluster[3], [key]) == [6]


def test_sigterm_stops_gracefully(cluster: list[NodeProcess], tmp_path: Path) -> None:
    node = node_process("lonely", tmp_path)
    node.start()
    wait_ready([node])
    assert node.terminate() == 0
    assert '"msg": "stopped"' in node.log_path.read_text()
