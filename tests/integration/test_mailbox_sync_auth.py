"""Replica sync is between a mailbox's replicas, on real processes (issue 10, defect 2).

1 bootstrap + 7 storage nodes, and an outsider on an address of its own: a real overlay
node that calls itself a storage node, with a valid node key (ground to be the farthest
node from the victim's mailbox), joined to the network. With 8 storage nodes in all, the
outsider is outside R + 2 = 7 (in a network of at most R + 2, every node is a replica).
It must not read a mailbox through `SyncList`/`SyncPull`, list what a node holds
(`SyncDigest` is gone), or store in it through `SyncPush` what a client put could not
store (no proof of work). The same holds on a mailbox session, which carries the sync
calls between nodes: a refusal there is the unary call's, status and reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

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
    until_whole,
)
from dna_core.crypto import pow as pow_
from dna_core.crypto import seal
from dna_core.crypto.node import NodeIdentity
from dna_core.mailbox import blob_id, mailbox_id, put_pow_hash
from dna_core.mailbox.client import MailboxClient
from dna_core.mailbox.session import NodeSession
from dna_core.overlay.aio import OverlayNode
from dna_core.overlay.aio.node import NodeConfig
from dna_core.overlay.contact import distance
from dna_core.wire.gen.dna.v1 import common_pb2, mailbox_pb2, mailbox_pb2_grpc
from dna_storage.backends.common import mailbox_digest
from dna_storage.replication import compare_subject, sign_proof
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
            # BOX also holds what the module's other tests put (and repair spreads),
            # so "nothing stored" is: none of the junk, and the message still there
            held = await held_by(client, BOB, replica, strict=True)
            assert sent in held and not held & {blob_id(j) for j in junk}, (
                "an outsider's push must store nothing"
            )
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


def test_a_node_outside_the_replica_set_cannot_compare_a_mailbox(
    network: list[NodeProcess],
) -> None:
    """`SyncCompare` would tell whether a node holds what the caller names: refused, and
    counted, to a caller that is a replica of none of the mailboxes it names."""

    async def scenario() -> None:
        client = await client_node([SEED])
        replicas = await MailboxClient(client, pow_bits=8).storage_nodes(BOX, 5)
        node = await outsider(network)
        assert node.contact is not None
        entries = [mailbox_pb2.MailboxDigest(mailbox_id=BOX, digest=bytes(32))]
        for replica in replicas:
            target = process_of(network, replica.node_id)
            refused = sample_value(
                scrape(target), "dna_storage_requests_total", method="sync", outcome="refused"
            )
            request = mailbox_pb2.SyncCompareRequest(mailboxes=entries)
            proof = sign_proof(node.identity, node.contact, "SyncCompare", compare_subject(entries))
            getattr(request, "from").CopyFrom(proof)
            stub = mailbox_pb2_grpc.MailboxStub(node.channels.get(replica.endpoint.grpc_target))
            denied(await attempt(stub.SyncCompare(request, timeout=5)))
            assert (
                sample_value(
                    scrape(target), "dna_storage_requests_total", method="sync", outcome="refused"
                )
                == refused + 1
            )
        await node.stop()
        await client.stop()

    asyncio.run(scenario())


def test_a_compare_answers_nothing_about_mailboxes_the_caller_is_no_replica_of(
    network: list[NodeProcess],
) -> None:
    """The outsider is the closest node to a mailbox of its own ID, so a compare naming
    that mailbox is served; BOX, named beside it with the digest the callee holds, is
    still answered as differing: the outsider is none of BOX's replicas."""

    async def scenario() -> None:
        client = await client_node([SEED])
        mail = MailboxClient(client, pow_bits=8, sessions=False)
        env = seal(ALICE, BOB.public, b"to compare", now_ms=time.time_ns() // 10**6)
        sent = (await mail.put(BOB.fingerprint, env)).blob_id
        replicas = await mail.storage_nodes(BOX, 5)
        await until_whole(SEED, BOB, replicas, {sent}, 30.0)
        node = await outsider(network)
        assert node.contact is not None
        own = node.node_id  # a mailbox ID the outsider is the first replica of
        for replica in replicas:
            held = await held_by(client, BOB, replica, strict=True)
            assert held, "BOX holds the message put above"
            entries = sorted(
                [
                    mailbox_pb2.MailboxDigest(
                        mailbox_id=BOX, digest=mailbox_digest(BOX, held, []).digest
                    ),
                    mailbox_pb2.MailboxDigest(
                        mailbox_id=own, digest=mailbox_digest(own, [], []).digest
                    ),
                ],
                key=lambda e: e.mailbox_id,
            )
            request = mailbox_pb2.SyncCompareRequest(mailboxes=entries)
            proof = sign_proof(node.identity, node.contact, "SyncCompare", compare_subject(entries))
            getattr(request, "from").CopyFrom(proof)
            stub = mailbox_pb2_grpc.MailboxStub(node.channels.get(replica.endpoint.grpc_target))
            answer = await stub.SyncCompare(request, timeout=5)
            assert list(answer.differ) == [BOX], replica.short()
        await node.stop()
        await client.stop()

    asyncio.run(scenario())


def process_of(network: list[NodeProcess], node_id: bytes) -> NodeProcess:
    return next(n for n in network if bytes.fromhex(n.status()["node_id"]) == node_id)


# -- the same calls on a mailbox session (the repair loop's transport) ---------------------


async def refusals_match(
    session: NodeSession, unary: Any, op: str, request: Any
) -> mailbox_pb2.RequestStatus:
    """Send ``request`` as the unary call and as the session op ``op``: both refuse it with
    the same status and reason; returns the session's refusal."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await unary(request, timeout=5)
    answer = await session.exchange({op: request})
    assert answer.WhichOneof("result") == "error", (op, answer)
    assert answer.error.code == refused.value.code().value[0], (op, answer.error)
    assert answer.error.reason == refused.value.details(), (op, answer.error)
    return answer.error


def session_sync_ops(node: NodeProcess) -> float:
    samples = scrape(node)
    return sum(
        sample_value(samples, "dna_storage_session_requests_total", op=op)
        for op in ("sync_list", "sync_pull", "sync_push")
    )


def test_on_a_session_a_node_outside_the_replica_set_is_refused_as_on_the_unary_calls(
    network: list[NodeProcess],
) -> None:
    async def scenario() -> None:
        client = await client_node([SEED])
        mail = MailboxClient(client, pow_bits=8, sessions=False)
        env = seal(ALICE, BOB.public, b"for bob, over sessions", now_ms=now_ms())
        sent = (await mail.put(BOB.fingerprint, env)).blob_id
        replicas = await mail.storage_nodes(BOX, 5)
        await until_whole(SEED, BOB, replicas, {sent}, 30.0)
        by_id = {bytes.fromhex(n.status()["node_id"]): n for n in network}
        node = await outsider(network)
        assert node.contact is not None
        for replica in replicas:
            held = await held_by(client, BOB, replica, strict=True)
            target = replica.endpoint.grpc_target
            stub = mailbox_pb2_grpc.MailboxStub(node.channels.get(target))
            session = NodeSession(node.channels.get(target), timeout=5.0)
            await session.open()
            served_before = session_sync_ops(by_id[replica.node_id])
            requests: list[tuple[str, Any, Any]] = [
                ("sync_list", stub.SyncList, mailbox_pb2.SyncListRequest(mailbox_id=BOX)),
                ("sync_pull", stub.SyncPull,
                 mailbox_pb2.SyncPullRequest(mailbox_id=BOX, blob_ids=sorted(held))),
            ]  # fmt: skip
            for op, unary, request in requests:
                signed = with_proof(request, sign_proof(node.identity, node.contact,
                                                        SYNC_METHODS[op], BOX))  # fmt: skip
                refusal = await refusals_match(session, unary, op, signed)
                assert refusal.code == grpc.StatusCode.PERMISSION_DENIED.value[0], refusal
            # A push is taken from anyone by a replica (a hand-off holder's), each blob
            # judged as a put: without proof of work, nothing is stored.
            junk = valid_blob(b"outsider junk")
            junk.ClearField("pow")
            push = mailbox_pb2.SyncPushRequest(mailbox_id=BOX, blobs=[junk])
            signed_push = with_proof(push, sign_proof(node.identity, node.contact, "SyncPush", BOX))
            pushed = await session.request(sync_push=signed_push)
            assert pushed.sync_push.stored == 0
            assert pushed.sync_push == await stub.SyncPush(signed_push, timeout=5)
            # ours, and whatever the replicas' own repair sent it meanwhile (over sessions)
            assert session_sync_ops(by_id[replica.node_id]) >= served_before + 3
            stored_nothing(await held_by(client, BOB, replica, strict=True), held, junk.blob_id)
            await session.close()
        await node.stop()
        await client.stop()

    asyncio.run(scenario())


SYNC_METHODS = {"sync_list": "SyncList", "sync_pull": "SyncPull", "sync_push": "SyncPush"}


def valid_blob(text: bytes) -> mailbox_pb2.StoredBlob:
    """A blob for BOB's mailbox that passes every rule of a put (proof of work at the
    network's 8 bits): what a signed push from a replica would store."""
    blob = seal(ALICE, BOB.public, text, now_ms=now_ms())
    proof, _ = pow_.solve(put_pow_hash(BOX, blob), 8, now_ms=now_ms())
    return mailbox_pb2.StoredBlob(
        blob_id=blob_id(blob), blob=blob, stored_ms=now_ms(),
        expires_ms=now_ms() + 86_400_000, pow=proof.to_proto(),
    )  # fmt: skip


def test_a_malformed_or_unsigned_sync_op_on_a_session_is_refused_and_stores_nothing(
    network: list[NodeProcess],
) -> None:
    """Signed with a real replica's node key (so only the fault named makes the refusal),
    each bad sync request is refused on a session exactly as by the unary call
    (INVALID_ARGUMENT, PERMISSION_DENIED; FAILED_PRECONDITION for a stale proof) and stores
    nothing; the same push signed properly is stored (the control)."""

    async def scenario() -> None:
        client = await client_node([SEED])
        mail = MailboxClient(client, pow_bits=8, sessions=False)
        replica, signer_contact = (await mail.storage_nodes(BOX, 2))[:2]
        process = {node_id_of(n): n for n in network}
        signer = NodeIdentity(Path(process[signer_contact.node_id].disk.key_file).read_bytes())
        assert signer.node_id == signer_contact.node_id
        held = await held_by(client, BOB, replica, strict=True)
        target = replica.endpoint.grpc_target
        stub = mailbox_pb2_grpc.MailboxStub(client.channels.get(target))
        session = NodeSession(client.channels.get(target), timeout=5.0)
        await session.open()
        blob = valid_blob(b"pushed by a replica")

        def signed(request: Any, method: str, subject: bytes = BOX) -> Any:
            return with_proof(request, sign_proof(signer, signer_contact, method, subject))

        def push(**fields: Any) -> mailbox_pb2.SyncPushRequest:
            return mailbox_pb2.SyncPushRequest(mailbox_id=BOX, blobs=[blob], **fields)

        tampered = signed(push(), "SyncPush")
        getattr(tampered, "from").signature = bytes(len(getattr(tampered, "from").signature))
        stale = push()
        getattr(stale, "from").CopyFrom(sign_proof(signer, signer_contact, "SyncPush", BOX))
        getattr(stale, "from").timestamp_ms -= 10 * 60_000  # the signature no longer fits
        bad: list[tuple[str, Any, Any, grpc.StatusCode]] = [
            ("sync_push", stub.SyncPush, push(), grpc.StatusCode.INVALID_ARGUMENT),  # unsigned
            ("sync_push", stub.SyncPush, signed(push(), "SyncList"),
             grpc.StatusCode.PERMISSION_DENIED),  # signed for another method
            ("sync_push", stub.SyncPush, signed(push(), "SyncPush", bytes(32)),
             grpc.StatusCode.PERMISSION_DENIED),  # signed for another mailbox
            ("sync_push", stub.SyncPush, tampered, grpc.StatusCode.PERMISSION_DENIED),
            ("sync_push", stub.SyncPush, stale, grpc.StatusCode.FAILED_PRECONDITION),
            ("sync_push", stub.SyncPush,
             signed(push(tombstones=[mailbox_pb2.Tombstone()] * 501), "SyncPush"),
             grpc.StatusCode.INVALID_ARGUMENT),  # over the item limit
            ("sync_push", stub.SyncPush,
             signed(mailbox_pb2.SyncPushRequest(mailbox_id=BOX[:31], blobs=[blob]), "SyncPush",
                    BOX[:31]), grpc.StatusCode.INVALID_ARGUMENT),  # not a mailbox ID
            ("sync_list", stub.SyncList,
             signed(mailbox_pb2.SyncListRequest(mailbox_id=BOX, after=b"short"), "SyncList"),
             grpc.StatusCode.INVALID_ARGUMENT),
            ("sync_pull", stub.SyncPull,
             signed(mailbox_pb2.SyncPullRequest(mailbox_id=BOX), "SyncPull"),
             grpc.StatusCode.INVALID_ARGUMENT),  # no IDs
        ]  # fmt: skip
        for op, unary, request, code in bad:
            refusal = await refusals_match(session, unary, op, request)
            assert refusal.code == code.value[0], (op, refusal)
            now = await held_by(client, BOB, replica, strict=True)
            stored_nothing(now, held, blob.blob_id, refusal.reason)
        good = await session.request(sync_push=signed(push(), "SyncPush"))
        assert good.sync_push.stored == 1
        assert await held_by(client, BOB, replica, strict=True) >= held | {blob.blob_id}
        await session.close()
        await client.stop()

    asyncio.run(scenario())


def stored_nothing(now: set[bytes], before: set[bytes], refused: bytes, why: str = "") -> None:
    """A refused push stored nothing and removed nothing: the replica holds what it held
    before, maybe more (the replicas' repair brings it what the module's other tests put
    to BOX, at its own pace), but not the refused blob."""
    assert now >= before, ("a refusal removed blobs", why)
    assert refused not in now, ("a refusal stored", why)


def node_id_of(node: NodeProcess) -> bytes:
    return bytes.fromhex(node.status()["node_id"])
