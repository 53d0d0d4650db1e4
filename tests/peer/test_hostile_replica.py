"""A hostile replica among a mailbox's candidates, on real processes (1 bootstrap + 5 honest
storage nodes, each bounding a mailbox's tombstones for IDs it did not hold at CAP) and a
real gRPC server in the test (the hostile node) that answers every fetch with blobs it made
up (no proof of work: it needs none to answer) and with an altered copy under the ID of a
real blob, answering before the honest replicas.

The owner's peer deletes a blob everywhere only when it opened (a real envelope for its
mailbox); one that does not open is deleted only at the nodes that returned it, so the
honest replicas store no tombstone for an ID only the hostile node served, and the owner's
real deletes still go through. The altered copy never shadows the honest one: the real
message is shown, and deleted everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cluster import (
    GRPC_PORT,
    UDP_PORT,
    NodeProcess,
    free_ips,
    held_by,
    running,
    sample_value,
    scrape,
    storage_network,
)
from dna_core.crypto import seal
from dna_core.mailbox import FetchState, mailbox_id
from dna_core.mailbox import client as client_module
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.wire.gen.dna.v1 import common_pb2, envelope_pb2, mailbox_pb2, mailbox_pb2_grpc
from dna_peer.keyserver import now_ms
from dna_peer.peer import Peer
from peers import People
from process_mark import starts_processes

ADDRESSES = free_ips(1 + 5 + 1)  # the bootstrap, 5 honest storage nodes, the hostile node
HOSTILE_IP = ADDRESSES[-1]
CAP = 30  # a mailbox's tombstones for IDs a node did not hold (max_tombstones_unheld)
FAKES = CAP + 10  # made-up blobs the hostile node returns: past CAP in one delete
TOML = (
    "repair_interval_s = 1.0\ngc_interval_s = 0.2\n[admission]\npow_base_bits = 8\n"
    f"max_tombstones_unheld = {CAP}\n"
)


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("hostile")
    with running(storage_network(root, 5, TOML, ADDRESSES[:-1])) as nodes:
        yield nodes


class HostileReplica(mailbox_pb2_grpc.MailboxServicer):
    """Answers a fetch with ``fakes`` (they hash to their IDs; nothing else about them is
    true) and, under each ID of ``forged``, an altered copy; keeps the IDs every delete named
    and accepts it, but with ``refuse_deletes`` refuses one naming its fakes (or any, when
    it has none). Serves no sessions (the base class: UNIMPLEMENTED), as an older node."""

    def __init__(self) -> None:
        self.fakes = [os.urandom(200) for _ in range(FAKES)]
        self.forged: list[bytes] = []
        self.deleted: set[bytes] = set()
        self.refuse_deletes = False
        self.delete_calls = 0

    @property
    def fake_ids(self) -> set[bytes]:
        return {hashlib.sha256(f).digest() for f in self.fakes}

    async def Fetch(  # noqa: N802 (gRPC's name)
        self, request: mailbox_pb2.FetchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mailbox_pb2.FetchResponse:
        now = now_ms()
        blobs = [mailbox_pb2.StoredBlob(blob_id=hashlib.sha256(f).digest(), blob=f,
                                        stored_ms=now, expires_ms=now + 86_400_000)
                 for f in self.fakes]  # fmt: skip
        blobs += [mailbox_pb2.StoredBlob(blob_id=real, blob=b"altered" + os.urandom(64),
                                         stored_ms=now, expires_ms=now + 86_400_000)
                  for real in self.forged]  # fmt: skip
        return mailbox_pb2.FetchResponse(blobs=blobs, next_cursor=b"end", more=False)

    async def Delete(  # noqa: N802
        self, request: mailbox_pb2.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mailbox_pb2.DeleteResponse:
        body = mailbox_pb2.DeleteBody.FromString(request.body)
        self.deleted |= set(body.blob_ids)
        self.delete_calls += 1
        if self.refuse_deletes and (set(body.blob_ids) & self.fake_ids or not self.fakes):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused, whatever it is")
        return mailbox_pb2.DeleteResponse(deleted=len(body.blob_ids))


@contextlib.asynccontextmanager
async def serving(replica: HostileReplica) -> AsyncIterator[None]:
    """``replica`` serving gRPC on HOSTILE_IP while the block runs."""
    server = grpc.aio.server()
    mailbox_pb2_grpc.add_MailboxServicer_to_server(replica, server)
    server.add_insecure_port(f"{HOSTILE_IP}:{GRPC_PORT}")
    await server.start()
    try:
        yield
    finally:
        await server.stop(None)


def hostile_contact(ip: str = HOSTILE_IP) -> Contact:
    endpoint = Endpoint(ip, UDP_PORT, GRPC_PORT)
    return Contact(os.urandom(32), b"k" * 32, (endpoint,), common_pb2.NODE_ROLE_STORAGE)


async def put_first(peer: Peer, hostile: Contact) -> None:
    """``hostile`` becomes the first of the peer's own mailbox's candidates (a replica it
    asks first, whose answer is merged first), the honest ones after it."""
    box = mailbox_id(peer.fingerprint)
    honest = await peer.mail.candidates(box)
    assert len(honest) == 5
    peer.mail.replica_sets.put(box, [hostile, *honest], ttl_s=3600)


def text(body: str) -> bytes:
    return envelope_pb2.Payload(text=envelope_pb2.Text(body=body)).SerializeToString()


def unheld_tombstones(network: list[NodeProcess]) -> list[float]:
    """Each honest storage node's tombstones for IDs it held neither way, a GC pass on."""
    time.sleep(1.0)  # gc_interval_s 0.2: the gauges are the latest pass's
    return [sample_value(scrape(n), "dna_storage_tombstones_unheld")
            for n in network if n.role == "storage"]  # fmt: skip


def test_blobs_only_a_hostile_replica_returned_are_deleted_only_there(
    network: list[NodeProcess], tmp_path: Path
) -> None:
    """Without the fix, the 40 made-up blobs' delete went to every candidate: each honest
    replica refused the batch (40 tombstones for IDs it never held, past CAP), so the
    owner's real delete in the same batch failed, and the sync said so."""

    async def scenario() -> None:
        hostile = HostileReplica()  # type: ignore[abstract]  # the base: UNIMPLEMENTED
        async with serving(hostile):
            who = People(tmp_path, [(ADDRESSES[0], UDP_PORT)])
            alice, bob = await who.new("alice", publish=False), await who.new("bob", publish=False)
            envelope = seal(bob.identity, alice.identity.public, text("the real one"),
                            now_ms=now_ms(), include_sender_keys=True)  # fmt: skip
            real = (await bob.mail.put(alice.fingerprint, envelope)).blob_id
            hostile.forged = [real]  # an altered copy under the real blob's ID, answered first
            await put_first(alice, hostile_contact())

            report = await alice.sync()

            assert [m.body for m in report.new_messages] == ["the real one"]
            assert report.cleanup_error is None, report.cleanup_error
            assert {b for b, _ in report.rejected} == hostile.fake_ids  # not the real one
            assert hostile.deleted == hostile.fake_ids | {real}  # only it returned the fakes
            assert report.deleted == FAKES + 1
            assert unheld_tombstones(network) == [0.0] * 5  # no honest node got a fake ID
            # The real blob left every honest replica (a delete of held IDs costs nothing).
            box = mailbox_id(alice.fingerprint)
            alice.mail.replica_sets.forget(box)
            left, _ = await alice.mail.fetch(alice.identity, FetchState())
            assert [b.blob_id for b in left] == []
            await asyncio.gather(alice.close(), bob.close())

    asyncio.run(scenario())


def test_a_hostile_replica_refusing_the_deletes_of_its_blobs_holds_back_nothing(
    network: list[NodeProcess], tmp_path: Path
) -> None:
    """The hostile node refuses the deletes of the blobs it made up: that is its affair,
    not an error the owner sees (which would also hold the clean-up back for
    DELETE_RETRY_S), and they are not sent again at the next clean-up (it makes more up at
    every fetch: the owner would send a longer list every time)."""

    async def scenario() -> None:
        hostile = HostileReplica()  # type: ignore[abstract]  # the base: UNIMPLEMENTED
        hostile.refuse_deletes = True
        async with serving(hostile):
            who = People(tmp_path, [(ADDRESSES[0], UDP_PORT)])
            frank, gina = (
                await who.new("frank", publish=False),
                await who.new("gina", publish=False),
            )
            await gina.send_payload(frank.identity.public, text("hi"), with_keys=True)
            await put_first(frank, hostile_contact())
            report = await frank.sync()
            assert [m.body for m in report.new_messages] == ["hi"]
            assert report.cleanup_error is None, report.cleanup_error
            # The real blob's delete (accepted), then the fakes' (refused), once each.
            assert hostile.deleted - hostile.fake_ids and hostile.deleted >= hostile.fake_ids
            assert hostile.delete_calls == 2
            await put_first(frank, hostile_contact())
            report = await frank.sync()
            assert report.cleanup_error is None and hostile.delete_calls == 2
            assert unheld_tombstones(network) == [0.0] * 5
            await asyncio.gather(frank.close(), gina.close())

    asyncio.run(scenario())


def test_a_delete_refused_for_its_tombstones_says_so(
    network: list[NodeProcess], tmp_path: Path
) -> None:
    """An owner deleting more IDs the nodes never held than CAP: each honest node refuses
    it (its tombstone bound), over the session, and the owner is told that. Before, the
    client sent the refused request again as a unary call, whose nonce the node had spent:
    the owner read "nonce already used (replay)" (and, over unary calls, nothing at all: the
    refusal counted as a node not answering)."""

    async def scenario() -> None:
        who = People(tmp_path, [(ADDRESSES[0], UDP_PORT)])
        carol = await who.new("carol", publish=False)
        result = await carol.mail.delete(carol.identity, [os.urandom(32) for _ in range(CAP + 1)])
        assert result.deleted == []
        assert result.refusals, "the refusal is said"
        assert all("RESOURCE_EXHAUSTED" in r and "tombstones" in r for r in result.refusals), (
            result.refusals
        )
        await carol.close()

    asyncio.run(scenario())


def test_a_node_refusing_a_delete_batch_does_not_stop_the_run_at_the_others(
    network: list[NodeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Candidates: a node refusing every delete, two honest replicas, two down. The first
    batch reaches 2 of W = 3 and one node refused it: before, that stopped the run, and the
    honest replicas never got the next batch; now the refusing node is sent no more and
    the rest go on (still short of W: not counted deleted, retried by the next clean-up)."""
    monkeypatch.setattr(client_module, "DELETE_BATCH_IDS", 2)

    async def scenario() -> None:
        refuser = HostileReplica()  # type: ignore[abstract]  # the base: UNIMPLEMENTED
        refuser.refuse_deletes, refuser.fakes = True, []  # refuses every delete
        async with serving(refuser):
            who = People(tmp_path, [(ADDRESSES[0], UDP_PORT)])
            dave, erin = await who.new("dave", publish=False), await who.new("erin", publish=False)
            ids = []
            for i in range(4):
                envelope = seal(erin.identity, dave.identity.public, text(f"m{i}"),
                                now_ms=now_ms(), include_sender_keys=True)  # fmt: skip
                ids.append((await erin.mail.put(dave.fingerprint, envelope)).blob_id)
            box = mailbox_id(dave.fingerprint)
            honest = (await dave.mail.candidates(box))[:2]
            down = [hostile_contact(ip) for ip in free_ips(2)]  # nothing listens there
            dave.mail.replica_sets.put(box, [hostile_contact(), *honest, *down], ttl_s=3600)

            result = await dave.mail.delete(dave.identity, ids)

            assert result.deleted == []  # 2 of W each time
            assert any("FAILED_PRECONDITION" in r for r in result.refusals), result.refusals
            assert refuser.deleted == set(ids[:2])  # the first batch only
            for replica in honest:  # every batch, the second too
                assert not await held_by(dave.node, dave.identity, replica, strict=True) & set(ids)
            await asyncio.gather(dave.close(), erin.close())

    asyncio.run(scenario())
