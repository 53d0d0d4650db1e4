"""Anti-entropy on real processes: SIGKILL 4 of a mailbox's 5 replicas and wipe their
data; every acknowledged message stays fetchable; after the restarts, all 5 replicas
hold everything again within the stated bound."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator

import grpc
import pytest
from cluster import UDP_PORT, NodeProcess, client_node, running, wait_ready
from dna_core.crypto import seal
from dna_core.mailbox import mailbox_id, sign_fetch
from dna_core.mailbox.client import MailboxClient
from dna_core.overlay.aio import OverlayNode
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from support import seeded_identity

STORAGE = 7
REPAIR_BOUND_S = 30.0  # repair_interval_s = 1 below; a pass per mailbox takes ~10 ms here
ALICE, BOB = seeded_identity("repair-alice"), seeded_identity("repair-bob")


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("repair")
    seed = f"127.0.0.100:{UDP_PORT}"
    nodes = [NodeProcess("boot", "127.0.0.100", root, [seed])]
    for i in range(STORAGE):
        store = NodeProcess(f"store{i}", f"127.0.0.{101 + i}", root, [seed])
        store.command = "dna-storage-node"
        store.extra_toml = "repair_interval_s = 1.0\n[admission]\npow_base_bits = 8\n"
        nodes.append(store)
    with running(nodes):
        yield nodes


async def _client() -> OverlayNode:
    return await client_node([("127.0.0.100", UDP_PORT)])


async def _held_by(node: OverlayNode, replica: Contact) -> set[bytes]:
    stub = mailbox_pb2_grpc.MailboxStub(node.channels.get(replica.endpoint.grpc_target))
    req = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(BOB, cursor=b"", limit=1000, now_ms=time.time_ns() // 1_000_000)
    )
    try:
        page = await stub.Fetch(req, timeout=3)
    except grpc.aio.AioRpcError:
        return set()
    return {b.blob_id for b in page.blobs}


def test_four_of_five_replicas_lost_then_repaired(network: list[NodeProcess]) -> None:
    async def scenario() -> None:
        client = await _client()
        mail = MailboxClient(client, pow_bits=8)
        replicas = await mail.storage_nodes(mailbox_id(BOB.fingerprint), 5)
        assert len(replicas) == 5
        sent = set()
        for i in range(10):
            env = seal(ALICE, BOB.public, f"message {i}".encode(), now_ms=time.time_ns() // 10**6)
            sent.add((await mail.put(BOB.fingerprint, env)).blob_id)
        await client.stop()

        by_id = {bytes.fromhex(n.status()["node_id"]): n for n in network}
        lost = [by_id[r.node_id] for r in replicas[1:]]
        for node in lost:
            node.kill()
            shutil.rmtree(node.root / f"{node.name}-data")

        client = await _client()
        blobs, _ = await MailboxClient(client, pow_bits=8).fetch(BOB)
        assert {b.blob_id for b in blobs} == sent, "acknowledged messages must stay fetchable"
        await client.stop()

        for node in lost:
            node.start()
        wait_ready(lost)
        client = await _client()
        started = time.monotonic()
        while time.monotonic() - started < REPAIR_BOUND_S:
            holdings = [await _held_by(client, r) for r in replicas]
            if all(h >= sent for h in holdings):
                break
            await asyncio.sleep(0.5)
        took = time.monotonic() - started
        await client.stop()
        assert all(h >= sent for h in holdings), [len(h & sent) for h in holdings]
        print(f"all 5 replicas whole again {took:.1f} s after the restarts")

    asyncio.run(scenario())
