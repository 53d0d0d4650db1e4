"""Replicated mailboxes on real processes: 1 bootstrap + 7 storage nodes.

The client writes each blob to the 5 storage nodes closest to the mailbox and
succeeds at W = 3; with replicas down, the next-closest nodes take the writes
(hinted hand-off); a fetch merges every replica without duplicates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
from cluster import (
    UDP_PORT,
    NodeProcess,
    client_node,
    free_ips,
    running,
    storage_network,
    wait_ready,
)
from dna_core.crypto import seal
from dna_core.mailbox.client import MailboxClient, QuorumError
from dna_core.mailbox.ids import blob_id, mailbox_id
from process_mark import starts_processes
from support import seeded_identity

T = TypeVar("T")
STORAGE = 7
ADDRESSES = free_ips(1 + STORAGE)
SEED = (ADDRESSES[0], UDP_PORT)
ALICE = seeded_identity("replication-alice")
BOBS = [seeded_identity(f"replication-bob-{i}") for i in range(3)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("replication")
    nodes = storage_network(root, STORAGE, "[admission]\npow_base_bits = 8\n", ADDRESSES)
    with running(nodes):
        yield nodes


def with_client(work: Callable[[MailboxClient], Awaitable[T]]) -> T:
    async def go() -> T:
        node = await client_node([SEED])
        try:
            return await work(MailboxClient(node, pow_bits=8))
        finally:
            await node.stop()

    return asyncio.run(go())


def test_put_reaches_five_replicas_and_fetch_merges(network: list[NodeProcess]) -> None:
    async def work(client: MailboxClient) -> None:
        for bob in BOBS:
            sent = [seal(ALICE, bob.public, bytes([i]) * 8, now_ms=now_ms()) for i in range(5)]
            for env in sent:
                result = await client.put(bob.fingerprint, env)
                assert len(result.stored_on) == 5
            blobs, state = await client.fetch(bob)
            assert sorted(b.blob_id for b in blobs) == sorted(blob_id(e) for e in sent)
            again, _ = await client.fetch(bob, state)
            assert again == []  # cursors moved past everything on every replica

    with_client(work)


def test_writes_survive_two_dead_replicas_by_hand_off(network: list[NodeProcess]) -> None:
    bob = seeded_identity("replication-handoff")

    async def replicas(client: MailboxClient) -> list[bytes]:
        return [c.node_id for c in await client.storage_nodes(mailbox_id(bob.fingerprint), 5)]

    closest = with_client(replicas)
    by_id = {bytes.fromhex(n.status()["node_id"]): n for n in network}
    down = [by_id[node_id] for node_id in closest[:2]]
    for node in down:
        node.kill()
    try:

        async def work(client: MailboxClient) -> None:
            env = seal(ALICE, bob.public, b"while two replicas are down", now_ms=now_ms())
            result = await client.put(bob.fingerprint, env)
            assert len(result.stored_on) >= 3
            assert not set(result.stored_on) & set(closest[:2])
            blobs, _ = await client.fetch(bob)
            assert [b.blob for b in blobs] == [env]
            assert (await client.delete(bob, [blob_id(env)])).deleted == [blob_id(env)]
            assert (await client.fetch(bob))[0] == []

        with_client(work)
    finally:
        for node in down:
            node.start()
        wait_ready(down)


def test_too_few_storage_nodes_is_a_clear_error(network: list[NodeProcess]) -> None:
    async def work(client: MailboxClient) -> None:
        client.write_quorum = STORAGE + 1
        with pytest.raises(QuorumError, match=r"storage nodes|replicas"):
            await client.put(
                BOBS[0].fingerprint, seal(ALICE, BOBS[0].public, b"x", now_ms=now_ms())
            )

    with_client(work)
