"""Range compare on real processes (1 bootstrap + 5 storage nodes, every one a replica of
every mailbox): once replicas agree, a repair pass asks each peer one `SyncCompare` for the
mailboxes it shares and makes no per-mailbox exchange; a mailbox that differs (a replica
was down while it got a message) is exchanged and repaired. A bad `SyncCompare` is refused
with a clear status, counted, and answers nothing."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from cluster import (
    free_ips,
    held_by,
    now_ms,
    sample_value,
    scrape,
    storage_network_fixture,
    until_whole,
    wait_ready,
)
from dna_core.crypto import Identity, seal
from dna_core.crypto.node import NodeIdentity
from dna_core.mailbox import mailbox_id
from dna_core.mailbox.client import MailboxClient
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_storage.backends.common import mailbox_digest
from dna_storage.replication import MAX_COMPARE, compare_subject, sign_proof
from dna_testnet.harness import LocalNode
from dna_testnet.network import UDP_PORT, client_node
from support import seeded_identity, until_async

ADDRESSES = free_ips(1 + 5)
SEED = (ADDRESSES[0], UDP_PORT)
ALICE = seeded_identity("compare-alice")
OWNERS = [seeded_identity(f"compare-owner-{i}") for i in range(4)]
REPAIR_BOUND_S = 30.0  # repair_interval_s = 1
network = storage_network_fixture("repair-compare", ADDRESSES)


def storage(network: list[LocalNode]) -> list[LocalNode]:
    return [n for n in network if n.role == "storage"]


def counter(node: LocalNode, name: str, **labels: str) -> float:
    return sample_value(scrape(node), f"{name}_total", **labels)


async def passes_end(nodes: list[LocalNode], count: int) -> None:
    """Until each node has finished ``count`` more repair passes (counted at a pass's end:
    two mean the pass under way now has ended and a whole one ran after it). Counted, not
    slept: on a loaded machine a pass takes longer than its 1 s interval."""
    since = {n.name: counter(n, "dna_storage_repair_passes") for n in nodes}
    await until_async(
        lambda: all(counter(n, "dna_storage_repair_passes") >= since[n.name] + count
                    for n in nodes),
        f"{count} repair passes of each node", every_s=0.2,
    )  # fmt: skip


def exchanges(node: LocalNode) -> float:
    """SyncList calls the node's repair made (the first call of every exchange)."""
    return sum(counter(node, "dna_storage_repair_calls", method="SyncList", via=via)
               for via in ("session", "unary"))  # fmt: skip


async def send(
    owner: Identity, texts: list[bytes], replicas: int = 5
) -> tuple[set[bytes], list[Contact]]:
    """Messages to ``owner``; their IDs and the mailbox's replicas (``replicas`` up)."""
    client = await client_node([SEED])
    mail = MailboxClient(client, pow_bits=8)
    found = await mail.storage_nodes(mailbox_id(owner.fingerprint), 5)
    assert len(found) == replicas
    sent = set()
    for text in texts:
        env = seal(ALICE, owner.public, text, now_ms=now_ms())
        sent.add((await mail.put(owner.fingerprint, env)).blob_id)
    await mail.close()
    await client.stop()
    return sent, found


def test_in_sync_mailboxes_are_skipped_and_a_differing_one_is_repaired(
    network: list[LocalNode],
) -> None:
    nodes = storage(network)

    async def scenario() -> None:
        for owner in OWNERS:
            sent, replicas = await send(owner, [b"one", b"two"])
            await until_whole(SEED, owner, replicas, sent, REPAIR_BOUND_S)
        everywhere = replicas  # the last owner's: every storage node
        await passes_end(nodes, 2)  # passes that started before the last put have ended
        before = {n.name: (exchanges(n), counter(n, "dna_storage_repair_compared",
                                                 outcome="same")) for n in nodes}  # fmt: skip
        await passes_end(nodes, 3)
        for node in nodes:
            listed, same = before[node.name]
            assert exchanges(node) == listed, f"{node.name} exchanged in-sync mailboxes"
            # each pass: every mailbox held, with each of its 4 peers
            grown = counter(node, "dna_storage_repair_compared", outcome="same") - same
            assert grown >= 2 * len(OWNERS) * 4, (node.name, grown)
            assert counter(node, "dna_storage_repair_calls", method="SyncCompare", via="unary")

        # One replica misses a message: it was down when it came.
        down = nodes[-1]
        down.kill()
        sent, _ = await send(OWNERS[-1], [b"while one replica was down"], replicas=4)
        differ_before = {n.name: counter(n, "dna_storage_repair_compared", outcome="differ")
                         for n in nodes[:-1]}  # fmt: skip
        down.start()
        await asyncio.to_thread(wait_ready, [down])
        took = await until_whole(SEED, OWNERS[-1], everywhere, sent, REPAIR_BOUND_S)
        print(f"the differing mailbox was whole {took:.1f} s after the restart")
        # Found by one of the others, or by the restarted replica's own first pass (its
        # counters start again from 0), whichever compared first.
        differ = counter(down, "dna_storage_repair_compared", outcome="differ") + sum(
            counter(n, "dna_storage_repair_compared", outcome="differ") - differ_before[n.name]
            for n in nodes[:-1]
        )
        assert differ > 0, "no compare found the mailbox the restarted replica lacked"

        # Whole again: no exchanges at all.
        await passes_end(nodes, 2)
        steady = {n.name: exchanges(n) for n in nodes}
        await passes_end(nodes, 3)
        assert {n.name: exchanges(n) for n in nodes} == steady

    asyncio.run(scenario())


def node_key(node: LocalNode) -> NodeIdentity:
    return NodeIdentity(Path(node.disk.key_file).read_bytes())


def entry(box: bytes, digest: bytes) -> mailbox_pb2.MailboxDigest:
    return mailbox_pb2.MailboxDigest(mailbox_id=box, digest=digest)


def test_a_bad_sync_compare_is_refused_and_counted(network: list[LocalNode]) -> None:
    """Signed with a real replica's key (store1), sent to store0, so only the fault named
    makes the refusal; the control calls show what a good one answers."""
    target, signer_node = storage(network)[:2]
    signer = node_key(signer_node)
    owner = seeded_identity("compare-dave")
    box = mailbox_id(owner.fingerprint)

    async def scenario() -> None:
        sent, replicas = await send(owner, [b"for dave"])
        await until_whole(SEED, owner, replicas, sent, REPAIR_BOUND_S)
        client = await client_node([SEED])
        signer_contact = next(r for r in replicas if r.node_id == signer.node_id)
        here = next(r for r in replicas if r.node_id == node_key(target).node_id)
        stub = mailbox_pb2_grpc.MailboxStub(client.channels.get(here.endpoint.grpc_target))

        def signed(entries: list[Any], subject: bytes | None = None) -> Any:
            request = mailbox_pb2.SyncCompareRequest(mailboxes=entries)
            proof = sign_proof(
                signer,
                signer_contact,
                "SyncCompare",
                compare_subject(entries) if subject is None else subject,
            )
            getattr(request, "from").CopyFrom(proof)
            return request  # fmt: skip

        held = await held_by(client, owner, here, strict=True)
        right = entry(box, mailbox_digest(box, held, []).digest)
        wrong = entry(box, hashlib.sha256(b"not what it holds").digest())
        unknown = entry(hashlib.sha256(b"a mailbox nobody holds").digest(), bytes(32))
        many = sorted(hashlib.sha256(b"%d" % i).digest() for i in range(MAX_COMPARE + 1))
        tampered = signed([right])
        getattr(tampered, "from").signature = bytes(len(getattr(tampered, "from").signature))
        invalid, denied = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
        bad = [
            (mailbox_pb2.SyncCompareRequest(mailboxes=[right]), invalid),  # unsigned
            (tampered, denied),
            (signed([right], compare_subject([wrong])), denied),  # signed for other digests
            (signed([]), invalid),  # nothing to compare
            (signed([entry(m, bytes(32)) for m in many]), invalid),  # over MAX_COMPARE
            (signed([entry(box, bytes(31))]), invalid),  # not a digest
            (signed([entry(box[:31], bytes(32))]), invalid),  # not a mailbox ID
            (signed([right, right]), invalid),  # not strictly increasing
        ]
        refused = counter(target, "dna_storage_requests", method="sync", outcome="refused")
        for request, code in bad:
            try:
                answer = await stub.SyncCompare(request, timeout=5)
            except grpc.aio.AioRpcError as err:
                assert err.code() == code, (err.code(), err.details())
                assert err.details(), "a refusal says why"
                continue
            raise AssertionError(f"answered {answer} to a bad SyncCompare")
        now = counter(target, "dna_storage_requests", method="sync", outcome="refused")
        assert now - refused == len(bad)

        assert (await stub.SyncCompare(signed([right]), timeout=5)).differ == []
        assert (await stub.SyncCompare(signed([wrong]), timeout=5)).differ == [box]
        in_order = sorted([right, unknown], key=lambda e: e.mailbox_id)
        answer = await stub.SyncCompare(signed(in_order), timeout=5)
        assert answer.differ == [unknown.mailbox_id]
        await client.stop()

    asyncio.run(scenario())


@pytest.fixture(autouse=True)
def _network_whole(network: list[LocalNode]) -> None:
    """Every test starts from a running network (the first restarts a node)."""
    wait_ready(storage(network))
