"""A delete batch W nodes took is not held up by the nodes refusing it for their rate of IDs
not held (a hand-off candidate holds none of the mailbox; a replica that missed puts), while
one short of W still waits their retry-after out and is sent again.

7 storage nodes: a mailbox's 5 replicas and 2 hand-off candidates, each rating IDs not held
at 1 per 5 s after a burst of 2 (`delete_ip_rate_per_s`, `delete_ip_burst`) so that a few
IDs reach it (a delete larger than the burst passes a full bucket, spending it)."""

from __future__ import annotations

import asyncio
import os

import pytest
from cluster import (
    FAST_REPAIR,
    UDP_PORT,
    NodeProcess,
    client_node,
    free_ips,
    now_ms,
    storage_network_fixture,
)
from dna_core.crypto import seal
from dna_core.mailbox import mailbox_id
from dna_core.mailbox.client import DELETE_ATTEMPTS, MailboxClient
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import mailbox_pb2
from support import seeded_identity

STORAGE = 7
ADDRESSES = free_ips(1 + STORAGE)
SEED = (ADDRESSES[0], UDP_PORT)
ALICE = seeded_identity("delete-quorum-alice")
TOML = FAST_REPAIR + "delete_ip_rate_per_s = 0.2\ndelete_ip_burst = 2.0\n"

network = storage_network_fixture("delete-quorum", ADDRESSES, TOML)

Sent = dict[bytes, list[tuple[str | None, int]]]  # node ID -> its answers, in order


def record_answers(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """Each node's answers to the deletes sent to it (error or None, retry-after ms)."""
    sent: Sent = {}
    send = MailboxClient._delete_one

    async def recorded(
        self: MailboxClient, contact: Contact, request: mailbox_pb2.DeleteRequest
    ) -> tuple[str | None, int]:
        answer = await send(self, contact, request)
        sent.setdefault(contact.node_id, []).append(answer)
        return answer

    monkeypatch.setattr(MailboxClient, "_delete_one", recorded)
    return sent


def run(work: object) -> None:
    async def go() -> None:
        node = await client_node([SEED])
        try:
            await work(MailboxClient(node, pow_bits=8))  # type: ignore[operator]
        finally:
            await node.stop()

    asyncio.run(go())


def test_a_batch_the_replicas_took_is_not_held_up_by_hand_off_refusals(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 blobs on the 5 replicas: they take their deletes (held IDs cost nothing); the 2
    hand-off candidates hold none, so the first delete (1 ID) spends one of their 2
    tokens and the second (2 IDs) is refused there ("retry after ~5 s"). That batch is
    deleted at once, each hand-off candidate asked once. Fails without the fix (checked:
    each asked 3 times, the batch 4 s later)."""
    bob = seeded_identity("delete-quorum-bob")
    sent = record_answers(monkeypatch)

    async def work(client: MailboxClient) -> None:
        blobs = [seal(ALICE, bob.public, b"%d" % i, now_ms=now_ms()) for i in range(3)]
        ids = [(await client.put(bob.fingerprint, b)).blob_id for b in blobs]
        candidates = await client.candidates(mailbox_id(bob.fingerprint))
        assert len(candidates) == STORAGE  # 5 replicas, 2 hand-off candidates
        assert (await client.delete(bob, ids[:1])).deleted == ids[:1]
        sent.clear()
        result = await client.delete(bob, ids[1:])
        assert result.deleted == ids[1:] and result.refusals == []
        hand_off = [sent[c.node_id] for c in candidates[client.replicas :]]
        assert all(len(answers) == 1 and answers[0][1] > 0 for answers in hand_off), hand_off
        assert (await client.fetch(bob))[0] == []

    run(work)


def test_a_batch_short_of_w_waits_out_the_retry_after_and_is_sent_again(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 IDs no node holds spend every node's burst; 2 more at once are refused by all 7
    ("retry after ~10 s"): fewer than W took them, so the client waits (2 s at most) and
    sends them again, re-signed, up to ``DELETE_ATTEMPTS`` sends."""
    carol = seeded_identity("delete-quorum-carol")
    sent = record_answers(monkeypatch)

    async def work(client: MailboxClient) -> None:
        first = await client.delete(carol, [os.urandom(32) for _ in range(2)])
        assert first.refusals == []
        sent.clear()
        await client.delete(carol, [os.urandom(32) for _ in range(2)])

    run(work)
    refused = [answers for answers in sent.values() if answers[0][1] > 0]
    assert len(refused) > STORAGE - 3, sent  # fewer than W took the first send
    assert all(2 <= len(answers) <= DELETE_ATTEMPTS for answers in refused), sent
