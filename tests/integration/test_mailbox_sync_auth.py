"""Replica sync is between a mailbox's replicas, on real processes (issue 10, defect 2).

1 bootstrap + 7 storage nodes, and an outsider on an address of its own: a real overlay
node that calls itself a storage node, with a valid node key (ground to be the farthest
node from the victim's mailbox), joined to the network. With 8 storage nodes in all, the
outsider is outside R + 2 = 7 (in a network of at most R + 2, every node is a replica).
It must not read a mailbox through `SyncList`/`SyncPull`, list what a node holds
(`SyncDigest` is gone), or store in it through `SyncPush` what a client put could not
store (no proof of work).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TypeVar

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
    running,
    storage_network,
)
from dna_core.crypto import seal
from dna_core.crypto.node import NodeIdentity
from dna_core.mailbox import blob_id, mailbox_id
from dna_core.mailbox.client import MailboxClient
from dna_core.overlay.aio import OverlayNode
from dna_core.overlay.aio.node import NodeConfig
from dna_core.overlay.contact import distance
from dna_core.wire.gen.dna.v1 import common_pb2, mailbox_pb2, mailbox_pb2_grpc
from dna_storage.replication import sign_proof
from process_mark import starts_processes
from support import seeded_identity

ADDRESSES = free_ips(1 + 7 + 1)  # the bootstrap, 7 storage nodes, the outsider
SEED = (ADDRESSES[0], UDP_PORT)
ALICE, BOB = seeded_identity("syncauth-alice"), seeded_identity("syncauth-bob")
BOX = mailbox_id(BOB.fingerprint)


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("syncauth")
    with running(storage_network(root, 7, FAST_REPAIR, ADDRESSES[:-1])) as nodes:
        yield nodes


def far_identity(target: bytes, network: list[NodeProcess]) -> NodeIdentity:
    """A testnet node key (4 puzzle bits) whose ID is farther from ``target`` than every
    node of the network (about 8 tries of 16 keys)."""
    ids = [bytes.fromhex(n.status()["node_id"]) for n in network]
    farthest = max(distance(i, target) for i in ids)
    while True:
        identity, _ = NodeIdentity.generate(4)
        if distance(identity.node_id, target) > farthest:
            return identity


async def outsider(network: list[NodeProcess]) -> OverlayNode:
    config = NodeConfig(
        host=ADDRESSES[-1], role=common_pb2.NODE_ROLE_STORAGE, puzzle_bits=4,
        allow_loopback=True,
    )  # fmt: skip
    node = OverlayNode(far_identity(BOX, network), config)
    await node.start()
    await node.join([SEED])
    return node


def denied(call: object) -> None:
    assert isinstance(call, grpc.aio.AioRpcError), f"expected a refusal, got {call}"
    assert call.code() == grpc.StatusCode.PERMISSION_DENIED, (call.code(), call.details())


async def attempt(coro: object) -> object:
    try:
        return await coro  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err


def test_a_node_outside_the_replica_set_can_neither_read_nor_fill_a_mailbox(
    network: list[NodeProcess],
) -> None:
    async def scenario() -> None:
        client = await client_node([SEED])
        mail = MailboxClient(client, pow_bits=8)
        env = seal(ALICE, BOB.public, b"for bob only", now_ms=time.time_ns() // 10**6)
        sent = (await mail.put(BOB.fingerprint, env)).blob_id
        replicas = await mail.storage_nodes(BOX, 5)
        assert len(replicas) == 5  # each must refuse the outsider below

        node = await outsider(network)
        assert node.contact is not None
        for replica in replicas:
            stub = mailbox_pb2_grpc.MailboxStub(node.channels.get(replica.endpoint.grpc_target))

            def proof(method: str, subject: bytes = BOX) -> mailbox_pb2.NodeProof:
                assert node.contact is not None
                return sign_proof(node.identity, node.contact, method, subject)

            listed = await attempt(
                stub.SyncList(
                    with_proof(mailbox_pb2.SyncListRequest(mailbox_id=BOX), proof("SyncList")),
                    timeout=5,
                )
            )
            denied(listed)
            pulled = await attempt(
                stub.SyncPull(
                    with_proof(
                        mailbox_pb2.SyncPullRequest(mailbox_id=BOX, blob_ids=[sent]),
                        proof("SyncPull"),
                    ),
                    timeout=5,
                )
            )
            denied(pulled)
            # A push is judged like a client's put: without proof of work nothing is stored.
            junk = [
                seal(ALICE, BOB.public, f"junk {i}".encode(), now_ms=time.time_ns() // 10**6)
                for i in range(20)
            ]
            now = time.time_ns() // 10**6
            pushed = await attempt(
                stub.SyncPush(
                    with_proof(
                        mailbox_pb2.SyncPushRequest(
                            mailbox_id=BOX,
                            blobs=[
                                mailbox_pb2.StoredBlob(
                                    blob_id=blob_id(j),
                                    blob=j,
                                    stored_ms=now,
                                    expires_ms=now + 86_400_000,
                                )
                                for j in junk
                            ],
                        ),
                        proof("SyncPush"),
                    ),
                    timeout=5,
                )
            )
            if not isinstance(pushed, grpc.aio.AioRpcError):
                assert isinstance(pushed, mailbox_pb2.SyncPushResponse)
                assert pushed.stored == 0
            held = await held_by(client, BOB, replica, strict=True)
            assert held == {sent}, "an outsider's push must store nothing"
        await node.stop()
        await client.stop()

    asyncio.run(scenario())


Req = TypeVar("Req", mailbox_pb2.SyncListRequest, mailbox_pb2.SyncPullRequest,
              mailbox_pb2.SyncPushRequest)  # fmt: skip


def with_proof(request: Req, proof: mailbox_pb2.NodeProof) -> Req:
    """Set the `from` field (a Python keyword, so not a constructor argument)."""
    getattr(request, "from").CopyFrom(proof)
    return request


def varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def test_no_node_lists_every_mailbox_it_holds(network: list[NodeProcess]) -> None:
    """`SyncDigest` (every mailbox a node holds, with counts) served nobody's need: gone.
    Called raw, as an attacker would (field 1 = a valid NodeProof)."""

    async def scenario() -> None:
        node = await outsider(network)
        assert node.contact is not None
        proof = sign_proof(node.identity, node.contact, "SyncDigest", b"").SerializeToString()
        request = b"\x0a" + varint(len(proof)) + proof
        target = f"{ADDRESSES[1]}:{GRPC_PORT}"
        digest: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = node.channels.get(
            target
        ).unary_unary("/dna.v1.Mailbox/SyncDigest")
        answer = await attempt(digest(request, timeout=5))
        assert isinstance(answer, grpc.aio.AioRpcError), "SyncDigest answered"
        assert answer.code() == grpc.StatusCode.UNIMPLEMENTED, answer.code()
        await node.stop()

    asyncio.run(scenario())
