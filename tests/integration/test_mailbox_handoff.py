"""Replica counts and hand-off copies on real processes: 1 bootstrap + 7 storage nodes,
repair every second.

* Every repair pass observes, per mailbox a node holds, how many of the replica set hold
  its least-replicated item (`dna_storage_mailbox_replicas`, buckets 0..5).
* A node outside a mailbox's replica set that took writes by hinted hand-off pushes them to
  the rightful replicas and drops its own copy once all 5 of them hold it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cluster import (
    FAST_REPAIR,
    GRPC_PORT,
    UDP_PORT,
    NodeProcess,
    client_node,
    free_ips,
    held_by,
    now_ms,
    running,
    sample_value,
    scrape,
    storage_network,
    storage_network_fixture,
    wait_ready,
)
from dna_core.crypto import Identity, pow, seal
from dna_core.mailbox import mailbox_id, put_pow_hash
from dna_core.mailbox.client import MailboxClient
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from process_mark import starts_processes
from support import seeded_identity

STORAGE = 7
ADDRESSES = free_ips(1 + STORAGE)
SEED = (ADDRESSES[0], UDP_PORT)
BOUND_S = 30.0  # repair_interval_s = 1: a pass over a few mailboxes takes milliseconds
ALICE = seeded_identity("handoff-alice")
HISTOGRAM = "dna_storage_mailbox_replicas"

network = storage_network_fixture("handoff", ADDRESSES)
# The histogram test needs nodes that never held a mailbox (every observation its own
# mailbox's): a network of its own, which no other test writes to, whatever the order.
FRESH_ADDRESSES = free_ips(1 + STORAGE)
FRESH_SEED = (FRESH_ADDRESSES[0], UDP_PORT)


@pytest.fixture
@starts_processes
def fresh_network(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """The histogram test's network, stopped when it ends (not with the module)."""
    with running(storage_network(tmp_path, STORAGE, FAST_REPAIR, FRESH_ADDRESSES)) as nodes:
        yield nodes


def by_node_id(network: list[NodeProcess]) -> dict[bytes, NodeProcess]:
    return {bytes.fromhex(n.status()["node_id"]): n for n in network}


def replica_histogram(node: NodeProcess) -> dict[str, float]:
    """The node's `dna_storage_mailbox_replicas` histogram: cumulative counts per bucket
    bound ("0.0".."5.0") and "count", from one scrape."""
    samples = scrape(node)
    out = {f"{le}.0": sample_value(samples, f"{HISTOGRAM}_bucket", le=f"{le}.0") for le in range(6)}
    out["count"] = sample_value(samples, f"{HISTOGRAM}_count")
    return out


def observed_five(histogram: dict[str, float]) -> float:
    """Observations of exactly 5 (the buckets are cumulative)."""
    return histogram["5.0"] - histogram["4.0"]


async def put_on_one_node(replica: Contact, owner: Identity) -> None:
    """A raw Put to a single node: nobody else holds the blob until repair spreads it."""
    box = mailbox_id(owner.fingerprint)
    env = seal(ALICE, owner.public, b"on one node first", now_ms=now_ms())
    proof, _ = pow.solve(put_pow_hash(box, env), 8, now_ms=now_ms())
    request = mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=env, pow=proof.to_proto())
    async with grpc.aio.insecure_channel(f"{replica.endpoint.ip}:{GRPC_PORT}") as channel:
        await mailbox_pb2_grpc.MailboxStub(channel).Put(request, timeout=5)


async def closest_storage(
    owner: Identity, count: int = 5, seed: tuple[str, int] = SEED
) -> list[Contact]:
    client = await client_node([seed])
    try:
        return await MailboxClient(client).storage_nodes(mailbox_id(owner.fingerprint), count)
    finally:
        await client.stop()


def until(check: Callable[[], bool], what: str) -> float:
    """Poll ``check()`` until true, within BOUND_S; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < BOUND_S, f"not within {BOUND_S} s: {what}"
        time.sleep(0.5)
    return time.monotonic() - started


def test_replica_histogram_counts_the_replicas_holding_each_mailbox(
    fresh_network: list[NodeProcess],
) -> None:
    """Fresh network: no node held a mailbox yet, so every observation is this mailbox's."""
    bob = seeded_identity("handoff-histogram-bob")
    storage = asyncio.run(closest_storage(bob, STORAGE, FRESH_SEED))
    assert len(storage) == STORAGE
    nodes = by_node_id(fresh_network)
    replicas = [nodes[c.node_id] for c in storage[:5]]
    outside = [nodes[c.node_id] for c in storage[5:]]
    assert all(replica_histogram(n)["count"] == 0 for n in replicas + outside)

    asyncio.run(put_on_one_node(storage[0], bob))
    took = until(
        lambda: all(observed_five(replica_histogram(n)) >= 1 for n in replicas),
        "every replica observed 5 replicas holding the mailbox",
    )
    first = replica_histogram(replicas[0])
    assert first["1.0"] >= 1, f"the only holder first saw itself alone: {first}"
    assert first["0.0"] == 0  # a replica always counts itself
    for node in outside:  # repair pushes to the replica set only, never to a sixth node
        assert replica_histogram(node)["count"] == 0, node.name
    print(f"mailbox on 1 node -> 5 replicas observed after {took:.1f} s")


def test_hand_off_copies_reach_the_replicas_and_are_dropped(network: list[NodeProcess]) -> None:
    bob = seeded_identity("handoff-bob")
    closest = asyncio.run(closest_storage(bob))
    nodes = by_node_id(network)
    down = [nodes[c.node_id] for c in closest[:2]]
    for node in down:
        node.kill()

    async def write() -> tuple[set[bytes], list[bytes]]:
        client = await client_node([SEED])
        mail = MailboxClient(client, pow_bits=8)
        sent, stored_on = set(), set()
        for i in range(3):
            env = seal(ALICE, bob.public, f"hand-off {i}".encode(), now_ms=now_ms())
            result = await mail.put(bob.fingerprint, env)
            sent.add(result.blob_id)
            stored_on |= set(result.stored_on)
        await client.stop()
        return sent, sorted(stored_on - {c.node_id for c in closest})

    try:
        sent, handoff_ids = asyncio.run(write())
    finally:
        for node in down:
            node.start()
        wait_ready(down)
    assert handoff_ids, "with 2 replicas down, nodes outside the replica set took the writes"
    handoff = [c for c in asyncio.run(closest_storage(bob, STORAGE)) if c.node_id in handoff_ids]

    async def settled() -> bool:
        client = await client_node([SEED])
        try:
            on_replicas = [await held_by(client, bob, c, strict=True) for c in closest]
            on_handoff = [await held_by(client, bob, c, strict=True) for c in handoff]
        finally:
            await client.stop()
        return all(h == sent for h in on_replicas) and not any(on_handoff)

    took = until(lambda: asyncio.run(settled()), "replicas whole and hand-off copies dropped")
    for contact in handoff:
        node = nodes[contact.node_id]
        assert sample_value(scrape(node), "dna_storage_handoff_dropped_total") >= len(sent), node
    print(f"hand-off copies on {len(handoff)} nodes dropped {took:.1f} s after the restarts")
