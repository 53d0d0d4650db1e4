"""A mailbox past the nodes' per-request limits, on real processes (1 bootstrap + 5 storage
nodes with a small quota): an owner cleans more blobs than one delete may
name (`MAX_DELETE_IDS`), a mailbox at its quota takes messages again once its owner synced,
and a delete the nodes refuse is an error the owner sees."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import UDP_PORT, NodeProcess, free_ips, running, storage_network
from dna_core.crypto import Identity, seal
from dna_core.mailbox import client as client_module
from dna_core.mailbox import mailbox_id
from dna_core.mailbox.auth import MAX_DELETE_IDS
from dna_core.mailbox.client import QuorumError
from dna_core.wire.gen.dna.v1 import envelope_pb2
from dna_peer.cache import Contact, Message
from dna_peer.keyserver import now_ms
from dna_peer.peer import Peer
from peers import PASSPHRASE, People
from process_mark import starts_processes

ADDRESSES = free_ips(1 + 5)
QUOTA = MAX_DELETE_IDS + 50  # more than one delete request may name
# Floods from one test process: no rate limits, no adaptive proof of work; the quota stays.
TOML = (
    "repair_interval_s = 1.0\n[admission]\npow_base_bits = 8\n"
    f"quota_max_blobs = {QUOTA}\nip_rate_per_s = 1e6\nip_burst = 1e6\n"
    "mailbox_rate_per_s = 1e6\nmailbox_burst = 1e6\npow_target_puts_per_s = 1e6\n"
)


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("limits")
    with running(storage_network(root, 5, TOML, ADDRESSES)) as nodes:
        yield nodes


def people(tmp_path: Path) -> People:
    return People(tmp_path, [(ADDRESSES[0], UDP_PORT)])


def text(body: str) -> bytes:
    return envelope_pb2.Payload(text=envelope_pb2.Text(body=body)).SerializeToString()


async def fill(sender: Peer, recipient: Peer, count: int) -> None:
    """``count`` distinct messages from ``sender`` in ``recipient``'s mailbox."""
    keys, gate = recipient.identity.public, asyncio.Semaphore(64)
    assert len(await sender.mail.candidates(mailbox_id(keys.fingerprint))) == 5  # one lookup

    async def one(i: int) -> None:
        envelope = seal(sender.identity, keys, text(f"flood {i}"), now_ms=now_ms(),
                        include_sender_keys=True)  # fmt: skip
        async with gate:
            await sender.mail.put(keys.fingerprint, envelope)

    await asyncio.gather(*(one(i) for i in range(count)))


def test_a_full_mailbox_takes_messages_again_once_its_owner_synced(
    network: list[NodeProcess], tmp_path: Path
) -> None:
    async def scenario() -> None:
        who = people(tmp_path)
        alice, bob = await who.new("alice", publish=False), await who.new("bob", publish=False)
        await fill(bob, alice, QUOTA)
        # Every replica is at its quota, and the sender reads so.
        with pytest.raises(QuorumError, match=f"mailbox quota: holds {QUOTA} blobs"):
            await bob.send_payload(alice.identity.public, text("refused"), with_keys=True)

        report = await alice.sync()
        # A refused put may still sit on a replica short of quorum (docs/peer.md, Send): one
        # the flood's quorum left below the quota (seen once in a loaded run: 1,051).
        bodies = [m.body for m in report.new_messages]
        expected = {f"flood {i}" for i in range(QUOTA)}
        assert expected <= set(bodies) <= expected | {"refused"}
        assert len(bodies) == len(set(bodies))
        assert report.deleted == len(bodies)  # in several deletes: one may name 1,000 at most
        assert report.cleanup_error is None
        assert (await alice.mail.fetch(alice.identity))[0] == []
        sent = await bob.send_payload(alice.identity.public, text("after"), with_keys=True)
        assert sent.stored_on >= 3
        assert [m.body for m in (await alice.sync()).new_messages] == ["after"]
        await asyncio.gather(alice.close(), bob.close())

    asyncio.run(scenario())


def test_a_full_mailbox_of_two_devices_drains(network: list[NodeProcess], tmp_path: Path) -> None:
    """With two devices a blob is deleted once both acknowledged it, and acknowledgements
    travel through the own mailbox: at its quota none could be posted, every sync failed
    and the mailbox stayed full for good. A device that finds it full deletes what it holds
    and posts the history instead; both end with every message, and senders get through."""

    async def scenario() -> None:
        who = people(tmp_path)
        phone, bob = await who.new("alice", publish=False), await who.new("bob", publish=False)
        who.profile("laptop").restore(who.profile("alice").keyfile.read_bytes(), PASSPHRASE)
        laptop = await who.open("laptop")
        for device in (phone, laptop, phone, laptop):  # both know both devices
            await device.sync()
        assert len(phone.cache.devices()) == len(laptop.cache.devices()) == 2
        await fill(bob, phone, QUOTA)
        with pytest.raises(QuorumError, match="mailbox quota"):
            await bob.send_payload(phone.identity.public, text("refused"), with_keys=True)

        for device in (phone, laptop, phone, laptop):
            await device.sync()
        # A refused put may still sit on a replica short of quorum (docs/peer.md, Send).
        expected = {f"flood {i}" for i in range(QUOTA)}
        held = {m.body for m in phone.cache.messages()}
        assert expected <= held <= expected | {"refused"}
        assert {m.body for m in laptop.cache.messages()} == held
        sent = await bob.send_payload(phone.identity.public, text("after"), with_keys=True)
        assert sent.stored_on >= 3
        assert "after" in [m.body for m in (await laptop.sync()).new_messages]
        await asyncio.gather(phone.close(), laptop.close(), bob.close())

    asyncio.run(scenario())


def test_a_refused_delete_is_an_error_the_owner_sees(
    network: list[NodeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        who = people(tmp_path)
        alice, bob = await who.new("alice", publish=False), await who.new("bob", publish=False)
        await bob.send_payload(alice.identity.public, text("hello"), with_keys=True)
        # Deletes signed 10 minutes in the past: the nodes refuse them (outside the window).
        real = client_module.sign_delete  # type: ignore[attr-defined]

        def stale(owner: Identity, blob_ids: list[bytes], *, now_ms: int) -> bytes:
            return real(owner, blob_ids, now_ms=now_ms - 600_000)

        monkeypatch.setattr(client_module, "sign_delete", stale)
        report = await alice.sync()
        assert [m.body for m in report.new_messages] == ["hello"]
        assert report.deleted == 0
        assert report.cleanup_error is not None
        assert "timestamp outside the accepted window" in report.cleanup_error
        monkeypatch.setattr(client_module, "sign_delete", real)
        assert (await alice.sync()).deleted == 0  # not retried at once (`watch`: every second)
        alice._deletes_refused_until = 0.0  # DELETE_RETRY_S later
        report = await alice.sync()
        assert report.deleted == 1 and report.cleanup_error is None
        await asyncio.gather(alice.close(), bob.close())

    asyncio.run(scenario())


def fill_cache(peer: Peer, contacts: int, messages: int) -> None:
    """A long-used device: ``contacts`` pinned contacts and ``messages`` messages."""
    people_ = [Identity.generate().public for _ in range(contacts)]
    with peer.cache.transaction():
        for keys in people_:
            peer.cache.pin(Contact(keys.fingerprint, keys, None, False, now_ms(), keys.fingerprint))
        for i in range(messages):
            other = people_[i % contacts].fingerprint
            outgoing = i % 2 == 0
            peer.cache.add_message(Message(
                os.urandom(16), other, peer.fingerprint if outgoing else other,
                other if outgoing else peer.fingerprint, 1_700_000_000_000 + i,
                f"message {i} " + "x" * 100, outgoing=outgoing,
            ))  # fmt: skip


def test_a_long_history_and_many_acknowledgements_reach_a_restored_device(
    network: list[NodeProcess], tmp_path: Path
) -> None:
    """History, acknowledgements and receipts are lists: each goes in payloads under the
    envelope cap, however long (here 80 contacts of 3.2 KB keys, 10,050 messages: more
    than one query of the cache returns; 8,000 acknowledged blobs; 12,000 receipts)."""

    async def scenario() -> None:
        who = people(tmp_path)
        phone = await who.new("alice", publish=False)
        fill_cache(phone, 80, 10_050)
        keyfile = who.profile("alice").keyfile.read_bytes()
        who.profile("laptop").restore(keyfile, PASSPHRASE)
        laptop = await who.open("laptop")  # no cache: asks the phone for the history
        await phone.sync()  # answers with it
        await laptop.sync()
        assert laptop.cache.message_count() == 10_050
        assert len(laptop.cache.contacts()) == 80
        assert len(laptop.cache.devices()) == 2

        held = [os.urandom(32) for _ in range(8_000)]
        await phone._post_acks(held)  # what settling a sync of 8,000 blobs posts
        await laptop.sync()
        acked = laptop.cache._rows(
            "SELECT count(*) FROM acks WHERE device_id = ?", (phone.device.device_id,)
        )
        assert acked[0][0] >= 8_000

        bob = await who.new("bob", publish=False)
        inbox = bob._inbox()
        for _ in range(12_000):  # a sync of 12,000 messages from the phone's identity
            inbox.owe_receipt(phone.identity.public, os.urandom(16))
        before = {b.blob_id for b in (await phone.mail.fetch(phone.identity))[0]}
        await bob._send_receipts(inbox.report.receipts_due)
        after = {b.blob_id for b in (await phone.mail.fetch(phone.identity))[0]}
        assert len(after - before) == 3  # 4,000 IDs each: none was dropped as too big
        await asyncio.gather(phone.close(), laptop.close(), bob.close())

    asyncio.run(scenario())


def test_large_messages_past_a_page_and_through_a_history(
    network: list[NodeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """25 messages of ~188 KB (4.7 MB: more than one gRPC message) reach the recipient and,
    through the history, the recipient's restored device."""

    async def scenario() -> None:
        who = people(tmp_path)
        alice, bob = await who.new("alice", publish=False), await who.new("bob", publish=False)
        bodies = [f"{i:02} " + "y" * 188_000 for i in range(25)]
        for body in bodies:
            await bob.send_payload(alice.identity.public, text(body), with_keys=True)
        # One fetch holds a bounded number of bytes and says there is more; a sync goes on.
        part, state = await alice.mail.fetch(alice.identity, max_bytes=1_000_000)
        assert state.more and 0 < len(part) < 25
        monkeypatch.setattr(client_module, "FETCH_BUDGET_BYTES", 1_000_000)
        assert sorted(m.body for m in (await alice.sync()).new_messages) == bodies
        keyfile = who.profile("alice").keyfile.read_bytes()
        who.profile("laptop").restore(keyfile, PASSPHRASE)
        laptop = await who.open("laptop")
        await alice.sync()  # answers with the history: one large message per chunk
        await laptop.sync()
        assert sorted(m.body for m in laptop.cache.messages()) == bodies
        await asyncio.gather(alice.close(), bob.close(), laptop.close())

    asyncio.run(scenario())
