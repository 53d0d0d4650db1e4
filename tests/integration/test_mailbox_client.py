"""What `MailboxClient` costs on real processes (1 bootstrap + 7 storage
nodes): a fetch signs once (per round of pages) and asks the 5 replicas only, a
hand-off candidate only in place of a replica that does not answer; the candidates of a
mailbox are cached (no lookup for repeated puts and fetches) until they expire or one
fails. A storage node serves a fetch signed for several nodes only if it is one of them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from cluster import (
    GRPC_PORT,
    UDP_PORT,
    NodeProcess,
    client_node,
    free_ips,
    held_by,
    now_ms,
    sample_value,
    scrape,
    storage_network_fixture,
    wait_ready,
)
from dna_core.crypto import seal
from dna_core.mailbox import client as client_module
from dna_core.mailbox import fetch_body, mailbox_id, session_fetch, sign_fetch
from dna_core.mailbox.client import MailboxClient
from dna_core.mailbox.planner import SHORT_REPLICA_SET_TTL_S
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from support import seeded_identity

STORAGE = 7
ADDRESSES = free_ips(1 + STORAGE)
SEED = (ADDRESSES[0], UDP_PORT)
ALICE = seeded_identity("client-alice")

network = storage_network_fixture("client", ADDRESSES)


class Counted:
    """Wraps a callable and counts its calls."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


def fetches_served(network: list[NodeProcess]) -> dict[str, float]:
    """Fetches each storage node served so far, by node name."""
    return {
        n.name: sample_value(scrape(n), "dna_storage_requests_total", method="fetch", outcome="ok")
        for n in network
        if n.role == "storage"
    }


def with_client(work: Callable[[MailboxClient], Awaitable[None]], **options: Any) -> None:
    async def go() -> None:
        node = await client_node([SEED])
        try:
            await work(MailboxClient(node, pow_bits=8, **options))
        finally:
            await node.stop()

    asyncio.run(go())


def test_a_fetch_signs_once_and_asks_only_the_replicas(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = seeded_identity("client-bob-healthy")
    by_ip = {n.ip: n.name for n in network}
    signs = Counted(sign_fetch)
    monkeypatch.setattr(client_module, "sign_fetch", signs)

    async def work(mail: MailboxClient) -> None:
        sent = {(await mail.put(bob.fingerprint, seal(ALICE, bob.public, b"hi", now_ms=now_ms())))
                .blob_id}  # fmt: skip
        replicas = await mail.storage_nodes(mailbox_id(bob.fingerprint), 5)
        before = fetches_served(network)
        blobs, _ = await mail.fetch(bob)
        after = fetches_served(network)
        assert {b.blob_id for b in blobs} == sent
        assert signs.calls == 1
        asked = {name for name in after if after[name] > before[name]}
        assert asked == {by_ip[c.endpoint.ip] for c in replicas}

    with_client(work)


def test_a_replica_that_does_not_answer_is_replaced_by_a_hand_off_candidate(
    network: list[NodeProcess],
) -> None:
    bob = seeded_identity("client-bob-one-down")
    by_ip = {n.ip: n for n in network}

    async def work(mail: MailboxClient) -> None:
        sent = set()
        for i in range(3):
            env = seal(ALICE, bob.public, b"m%d" % i, now_ms=now_ms())
            sent.add((await mail.put(bob.fingerprint, env)).blob_id)
        candidates = await mail.candidates(mailbox_id(bob.fingerprint))  # cached by the puts
        down = by_ip[candidates[0].endpoint.ip]
        down.kill()
        try:
            before = fetches_served([n for n in network if n is not down])
            blobs, _ = await mail.fetch(bob)  # the cached set still lists the dead replica
            after = fetches_served([n for n in network if n is not down])
        finally:
            down.start()
            wait_ready([down])
        assert {b.blob_id for b in blobs} == sent
        asked = {name for name in after if after[name] > before[name]}
        assert asked == {by_ip[c.endpoint.ip].name for c in candidates[1:6]}
        assert mail.replica_sets.get(mailbox_id(bob.fingerprint)) is None  # looked up afresh

    with_client(work)


def test_repeated_puts_and_fetches_reuse_the_lookup_until_it_expires(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = seeded_identity("client-bob-cache")

    async def work(mail: MailboxClient) -> None:
        lookups = Counted(mail.node.find_closest)
        monkeypatch.setattr(mail.node, "find_closest", lookups)
        clock = cache_clock(mail)
        for i in range(3):
            await mail.put(bob.fingerprint, seal(ALICE, bob.public, b"%d" % i, now_ms=now_ms()))
        blobs, state = await mail.fetch(bob)
        assert len(blobs) == 3 and lookups.calls == 1
        clock[0] += mail.replica_sets.ttl_s  # expired
        assert (await mail.fetch(bob, state))[0] == []
        assert lookups.calls == 2

    with_client(work)


def cache_clock(mail: MailboxClient) -> list[float]:
    """The client's replica-set cache on a clock the test moves (``clock[0] += s``): on
    the real one, a loaded machine's puts outlasted a 1 s TTL and looked up again."""
    clock = [0.0]
    mail.replica_sets.clock = lambda: clock[0]
    return clock


def test_sends_at_once_to_a_new_mailbox_share_one_lookup(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 sends that miss the cache together make one lookup, not 32: a stampede of
    lookups loads the nodes until lookups come back short and sends fail."""
    bob = seeded_identity("client-bob-stampede")

    async def work(mail: MailboxClient) -> None:
        lookups = Counted(mail.node.find_closest)
        monkeypatch.setattr(mail.node, "find_closest", lookups)
        envs = [seal(ALICE, bob.public, b"%d" % i, now_ms=now_ms()) for i in range(32)]
        results = await asyncio.gather(*(mail.put(bob.fingerprint, env) for env in envs))
        assert all(len(r.stored_on) >= 3 for r in results)
        assert lookups.calls == 1

    with_client(work)


def test_a_lookup_that_missed_nodes_is_made_again_and_a_short_answer_kept_briefly(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 3 of the 7 storage nodes down (still in every routing table), a lookup asks
    them in vain: it is made once more, and its answer, short of the 5 replicas, is kept
    for seconds, not the cache's 30 s, so sends soon look for the nodes again."""
    bob = seeded_identity("client-bob-missed")
    box = mailbox_id(bob.fingerprint)
    down = [n for n in network if n.role == "storage"][:3]

    async def work(mail: MailboxClient) -> None:
        await mail.candidates(box)  # the client's table learns every node while all are up
        mail.replica_sets.clear()
        lookups = Counted(mail.node.find_closest)
        monkeypatch.setattr(mail.node, "find_closest", lookups)
        for node in down:
            node.kill()
        clock = cache_clock(mail)
        try:
            found = await mail.candidates(box)
            assert lookups.calls == 2
            assert {c.endpoint.ip for c in found} == {
                n.ip for n in network if n.role == "storage" and n not in down
            }
            result = await mail.put(bob.fingerprint, seal(ALICE, bob.public, b"x", now_ms=now_ms()))
            assert len(result.stored_on) >= 3 and lookups.calls == 2  # cached meanwhile
            clock[0] += SHORT_REPLICA_SET_TTL_S
            assert mail.replica_sets.get(box) is None
        finally:
            for node in down:
                node.start()
            wait_ready(down)

    with_client(work)


async def _fetch_at(contact: Contact, request: mailbox_pb2.FetchRequest) -> Any:
    async with grpc.aio.insecure_channel(f"{contact.endpoint.ip}:{GRPC_PORT}") as channel:
        try:
            return await mailbox_pb2_grpc.MailboxStub(channel).Fetch(request, timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()


def test_a_node_serves_a_fetch_signed_for_other_nodes_only_if_it_is_named(
    network: list[NodeProcess],
) -> None:
    bob = seeded_identity("client-bob-named")

    async def work(mail: MailboxClient) -> None:
        named, other = (await mail.storage_nodes(mailbox_id(bob.fingerprint), 2))[:2]
        request = mailbox_pb2.FetchRequest.FromString(
            sign_fetch(bob, limit=10, now_ms=now_ms(), node_cursors={named.node_id: b""})
        )
        assert await _fetch_at(other, request) == grpc.StatusCode.PERMISSION_DENIED
        assert isinstance(await _fetch_at(named, request), mailbox_pb2.FetchResponse)
        assert await _fetch_at(named, request) == grpc.StatusCode.ALREADY_EXISTS

    with_client(work)


def test_only_the_first_round_is_signed_then_sessions_carry_the_rest(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = seeded_identity("client-bob-pages")
    signs = Counted(sign_fetch)
    monkeypatch.setattr(client_module, "sign_fetch", signs)

    async def work(mail: MailboxClient) -> None:
        sent = set()
        for i in range(5):
            env = seal(ALICE, bob.public, b"page %d" % i, now_ms=now_ms())
            sent.add((await mail.put(bob.fingerprint, env)).blob_id)
        blobs, state = await mail.fetch(bob, limit=2)
        assert {b.blob_id for b in blobs} == sent
        assert signs.calls == 1  # pages of 2, 2 and 1 blobs: rounds 2 and 3 in sessions
        env = seal(ALICE, bob.public, b"later", now_ms=now_ms())
        late = (await mail.put(bob.fingerprint, env)).blob_id
        assert [b.blob_id for b in (await mail.fetch(bob, state))[0]] == [late]
        assert signs.calls == 1  # polling costs no signature

    with_client(work)


def test_a_node_that_forgot_its_sessions_is_asked_again_signed(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = seeded_identity("client-bob-restart")
    by_ip = {n.ip: n for n in network}
    signs = Counted(sign_fetch)
    monkeypatch.setattr(client_module, "sign_fetch", signs)

    async def work(mail: MailboxClient) -> None:
        env = seal(ALICE, bob.public, b"before", now_ms=now_ms())
        first = (await mail.put(bob.fingerprint, env)).blob_id
        await mail.fetch(bob)  # opens a session with every replica
        replica = (await mail.candidates(mailbox_id(bob.fingerprint)))[0]
        restarted = by_ip[replica.endpoint.ip]
        restarted.kill()
        restarted.start()
        wait_ready([restarted])
        before = fetches_served(network)
        blobs, _ = await mail.fetch(bob)  # from scratch: every replica holds `first`
        after = fetches_served(network)
        assert [b.blob_id for b in blobs] == [first]
        assert signs.calls == 2  # the restarted node alone, signed again
        assert after[restarted.name] == before[restarted.name] + 1  # it was not replaced

    with_client(work)


def test_a_session_serves_only_its_mailbox_its_node_and_an_intact_body(
    network: list[NodeProcess],
) -> None:
    bob, eve = seeded_identity("client-bob-session"), seeded_identity("client-eve-session")

    async def work(mail: MailboxClient) -> None:
        await mail.fetch(bob)
        await mail.fetch(eve)
        box = mailbox_id(bob.fingerprint)
        node, other = (await mail.candidates(box))[:2]
        session = mail._sessions[(box, node.node_id)]

        def request(to: Contact, **changes: Any) -> mailbox_pb2.FetchRequest:
            body = fetch_body(box, limit=10, now_ms=now_ms(), node_cursors={to.node_id: b""})
            req = session_fetch(session, body)
            for field, value in changes.items():
                setattr(req, field, value)
            return req

        good = request(node)
        assert isinstance(await _fetch_at(node, good), mailbox_pb2.FetchResponse)
        assert await _fetch_at(node, good) == grpc.StatusCode.ALREADY_EXISTS  # replay
        assert await _fetch_at(other, request(other)) == grpc.StatusCode.PERMISSION_DENIED
        tampered = request(node)
        tampered.mac = bytes(32)
        assert await _fetch_at(node, tampered) == grpc.StatusCode.PERMISSION_DENIED
        eve_box = mailbox_id(eve.fingerprint)
        eve_body = fetch_body(eve_box, limit=10, now_ms=now_ms(), node_cursors={node.node_id: b""})
        stolen = session_fetch(session, eve_body)  # Bob's session, Eve's mailbox
        assert await _fetch_at(node, stolen) == grpc.StatusCode.PERMISSION_DENIED
        unknown = request(node, session_id=bytes(16))
        assert await _fetch_at(node, unknown) == grpc.StatusCode.PERMISSION_DENIED

    with_client(work)


def test_a_put_can_return_at_the_quorum_and_finish_in_the_background(
    network: list[NodeProcess],
) -> None:
    bob = seeded_identity("client-bob-quorum")

    async def work(client: MailboxClient) -> None:
        blob = seal(ALICE, bob.public, b"early", now_ms=now_ms())
        result = await client.put(bob.fingerprint, blob, return_at_quorum=True)
        assert len(result.stored_on) >= client.write_quorum
        await client.drain()
        replicas = (await client.candidates(mailbox_id(bob.fingerprint)))[: client.replicas]
        holding = [await held_by(client.node, bob, r, strict=True) for r in replicas]
        assert all(result.blob_id in held for held in holding)  # all 5 after the drain

    with_client(work)


def test_a_copy_arriving_after_the_owner_deleted_the_blob_counts_as_delivered(
    network: list[NodeProcess],
) -> None:
    """A subscribed recipient can read and delete a blob before the sender's copies reach
    every replica: those refusals say "deleted by its owner", and the put succeeds."""
    bob = seeded_identity("client-bob-read-first")

    async def work(client: MailboxClient) -> None:
        blob = seal(ALICE, bob.public, b"read at once", now_ms=now_ms())
        first = await client.put(bob.fingerprint, blob)
        assert (await client.delete(bob, [first.blob_id])).deleted == [first.blob_id]
        late = await client.put(bob.fingerprint, blob)  # every replica holds a tombstone
        assert late.blob_id == first.blob_id
        assert len(late.stored_on) >= client.write_quorum
        assert (await client.fetch(bob))[0] == []  # and none stored it again

    with_client(work)


def test_puts_in_flight_to_one_node_travel_together_and_all_land(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = seeded_identity("client-bob-batched")
    batches: list[int] = []
    call = client_module.NodeBatcher._call

    async def counted(self: client_module.NodeBatcher, requests: list[Any]) -> Any:
        batches.append(len(requests))
        return await call(self, requests)

    monkeypatch.setattr(client_module.NodeBatcher, "_call", counted)

    async def work(client: MailboxClient) -> None:
        blob = seal(ALICE, bob.public, b"alone", now_ms=now_ms())
        await client.put(bob.fingerprint, blob)
        assert batches == [1] * client.replicas  # one at a time: one put per call
        # 24: within the nodes' per-source burst (40), so no put waits for a rate limit
        blobs = [seal(ALICE, bob.public, b"%d" % i, now_ms=now_ms()) for i in range(24)]
        results = await asyncio.gather(*(client.put(bob.fingerprint, b) for b in blobs))
        assert all(len(r.stored_on) == client.replicas for r in results)
        assert sum(batches) == client.replicas * 25  # every replica write, once
        assert len(batches) < client.replicas * 25 / 3, batches  # in few calls
        replicas = (await client.candidates(mailbox_id(bob.fingerprint)))[: client.replicas]
        assert len(replicas) == client.replicas  # else the loop below proves less
        for replica in replicas:
            held = await held_by(client.node, bob, replica, strict=True)
            assert {r.blob_id for r in results} <= set(held)

    with_client(work)


def test_a_delete_refused_with_retry_after_is_sent_again_once_it_has_passed(
    network: list[NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node rates the IDs a delete names that it does not hold, per source (20/s, burst
    1,000): past the burst it answers "retry after", and the client waits that long and
    sends the batch again, re-signed (the node spent the first one's nonce). Fails without
    the client's retry (checked: DELETE_ATTEMPTS = 1 left the refused batches refused).

    Six deletes go at once, 1,060 IDs: every node asked admits them within moments of each
    other, so one is over the burst there whatever the machine's load (one after another,
    a loaded machine took over 3 s to spend the burst, which had refilled by then)."""
    bob = seeded_identity("client-bob-deletes-unheld")
    answers = record_delete_answers(monkeypatch)

    async def work(client: MailboxClient) -> None:
        await client.candidates(mailbox_id(bob.fingerprint))  # cached: all six go at once
        # the burst of every node asked, in the client's batches, and 3 s of the rate more:
        # the one refused waits 2 s at most twice
        batches = [[os.urandom(32) for _ in range(n)] for n in (200,) * 5 + (60,)]
        results = await asyncio.gather(*(client.delete(bob, b) for b in batches))
        for batch, result in zip(batches, results, strict=True):
            assert result.deleted == batch and result.refusals == []

    with_client(work)
    refused = {key: sent for key, sent in answers.items() if any(after for _, after in sent)}
    assert refused, answers  # a node refused a batch for its rate at least once

    def took(batch: bytes) -> int:  # nodes that took the batch in the end
        return sum(sent[-1] == (None, 0) for (_, first), sent in answers.items() if first == batch)

    # then took it, unless W others had (a hand-off candidate is not waited for then)
    assert all(sent[-1] == (None, 0) or took(batch) >= 3 for (_, batch), sent in refused.items()), (
        refused
    )


def record_delete_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> dict[tuple[bytes, bytes], list[tuple[str | None, int]]]:
    """What each node answered each delete batch (keyed by node ID and the batch's first
    blob ID), in the order sent: (error or None, retry-after in ms)."""
    answers: dict[tuple[bytes, bytes], list[tuple[str | None, int]]] = {}
    send = MailboxClient._delete_one

    async def recorded(
        self: MailboxClient, contact: Contact, request: mailbox_pb2.DeleteRequest
    ) -> tuple[str | None, int]:
        answer = await send(self, contact, request)
        first_id = mailbox_pb2.DeleteBody.FromString(request.body).blob_ids[0]
        answers.setdefault((contact.node_id, first_id), []).append(answer)
        return answer

    monkeypatch.setattr(MailboxClient, "_delete_one", recorded)
    return answers
