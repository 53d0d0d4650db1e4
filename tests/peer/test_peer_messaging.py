"""Seed scenarios 2 and 3 and the trust rules, with real peers on a real local testnet."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from cluster import sample_value, scrape
from dna_core.crypto import Identity, seal
from dna_core.overlay.records import record_key
from dna_core.wire.gen.dna.v1 import envelope_pb2
from dna_peer import keyserver
from dna_peer.cache import RECOVERING, Contact, Message
from dna_peer.inbox import SyncReport
from dna_peer.keyserver import now_ms
from dna_peer.link import accept_link, offer_link
from dna_peer.peer import (
    DAY_MS,
    MAX_RECEIPTS_PER_ROUND,
    OFFERED,
    PRESENCE_LOOKUPS_AT_ONCE,
    PUBLISHED,
    RECOVERY_WAIT_MS,
    REPUBLISH_AFTER_MS,
    RETIRED,
    KeyChangedError,
    Peer,
    UnknownContactError,
)
from dna_testnet.network import Testnet
from peers import PASSPHRASE, People

Scenario = Callable[[People], Coroutine[Any, Any, None]]


def run(testnet: Testnet, tmp_path: Path, scenario: Scenario) -> None:
    asyncio.run(scenario(People(tmp_path, testnet.seeds)))


def history(peer: Peer) -> list[tuple[bytes, bool, str]]:
    return [(m.message_id, m.outgoing, m.body) for m in peer.cache.messages()]


async def mailbox_size(peer: Peer) -> int:
    blobs, _ = await peer.mail.fetch(peer.identity)
    return len(blobs)


def test_offline_recipient_receives_and_the_sender_gets_a_receipt(
    testnet: Testnet, tmp_path: Path
) -> None:
    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        await bob.close()  # bob is offline
        contact = await alice.add_contact(people.name("bob"))
        assert contact.fingerprint == bob.fingerprint
        with pytest.raises(UnknownContactError, match="that is you"):
            await alice.add_contact(people.name("alice"))
        sent = await alice.send(contact, "hello while you were away")
        assert sent.stored_on >= 3
        bob = await people.open("bob")
        report = await bob.sync()
        assert [m.body for m in report.new_messages] == ["hello while you were away"]
        assert report.new_messages[0].sender == alice.fingerprint
        assert report.deleted == 1  # bob is his only device: read means deletable
        assert (await bob.sync()).new_messages == []  # nothing twice
        assert await mailbox_size(bob) == 0
        receipts = await alice.sync()
        assert receipts.receipts == 1 and alice.cache.messages()[0].delivered
        # bob has alice's keys now (his receipt proved it): they stop riding along
        assert alice.cache.has_our_keys(bob.fingerprint)
        await alice.send(contact, "short one")
        (stored,) = (await bob.mail.fetch(bob.identity))[0]
        assert len(stored.blob) < 5_000  # ~4.7 KB without the 3.2 KB key set
        assert [m.body for m in (await bob.sync()).new_messages] == ["short one"]
        await asyncio.gather(alice.close(), bob.close())

    run(testnet, tmp_path, scenario)


def test_the_same_text_sent_twice_at_once_by_one_process_is_two_messages(
    testnet: Testnet, tmp_path: Path
) -> None:
    """The outbox hands a queued envelope to a later send of the same text only when no
    send has it under way: an app that sends "ok" twice at once sent two messages."""

    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        contact = await alice.add_contact(people.name("bob"))
        first, second = await asyncio.gather(alice.send(contact, "ok"), alice.send(contact, "ok"))
        assert first.message_id != second.message_id
        assert alice.cache.outgoing() == []  # both went, nothing left queued
        assert [m.body for m in (await bob.sync()).new_messages] == ["ok", "ok"]
        await asyncio.gather(alice.close(), bob.close())

    run(testnet, tmp_path, scenario)


def test_a_linked_device_converges_and_read_state_syncs(testnet: Testnet, tmp_path: Path) -> None:
    async def scenario(people: People) -> None:
        alice, phone = await people.new("alice"), await people.new("bob")
        to_bob = await alice.add_contact(people.name("bob"))
        await alice.send(to_bob, "before the laptop")
        await phone.sync()
        offer = await offer_link(phone, "laptop")
        laptop = await accept_link(people.profile("laptop"), offer.code, PASSPHRASE,
                                   people.seeds)  # fmt: skip
        assert laptop.fingerprint == phone.fingerprint
        assert laptop.device.device_id == offer.device_id
        await laptop.sync()
        assert [b for _, _, b in history(laptop)] == ["before the laptop"]  # from history

        await alice.send(to_bob, "to both devices")
        to_alice = laptop.find_contact(alice.fingerprint.hex()[:16])
        await laptop.sync()
        await laptop.send(to_alice, "sent from the laptop")
        await phone.sync()
        assert await phone.mark_read(phone.find_contact(alice.fingerprint.hex()))
        for device in (laptop, phone, laptop, phone):  # acknowledgements travel both ways
            await device.sync()
        assert history(phone) == history(laptop)
        assert [b for _, _, b in history(phone)] == [
            "before the laptop", "to both devices", "sent from the laptop",
        ]  # fmt: skip
        assert phone.cache.read_state() == laptop.cache.read_state() != {}
        assert set(phone.cache.devices()) == set(laptop.cache.devices())
        assert len(phone.cache.devices()) == 2
        assert await mailbox_size(phone) == 0  # every blob reached both, then was deleted
        got = await alice.sync()
        assert [m.body for m in got.new_messages] == ["sent from the laptop"]
        await asyncio.gather(alice.close(), phone.close(), laptop.close())

    run(testnet, tmp_path, scenario)


REPAIR_SESSIONS_SLACK = 2


def test_a_linked_device_keeps_no_session_of_the_code_s_mailbox(
    testnet: Testnet, tmp_path: Path
) -> None:
    """`accept_link` fetches the offer with a mailbox client of its own (the code's
    throwaway mailbox), which it never closed: the new device kept its sessions to those
    replicas open, as long as it ran. Now the storage nodes' open sessions, once the link
    is done, are the new device's own. Fails without the fix (checked: the storage nodes
    held the throwaway client's sessions beside the new device's)."""
    storage = [n for n in testnet.nodes if n.role == "storage"]

    def sessions_open() -> int:
        return round(sum(sample_value(scrape(n), "dna_storage_sessions_open") for n in storage))

    async def scenario(people: People) -> None:
        phone = await people.new("bob")
        offer = await offer_link(phone, "laptop")
        await phone.mail.drain()
        before = sessions_open()
        laptop = await accept_link(people.profile("laptop"), offer.code, PASSPHRASE,
                                   people.seeds)  # fmt: skip
        await laptop.mail.drain()
        own = len(laptop.mail.session_pool or [])
        assert own > 0
        deadline = time.monotonic() + 10
        while sessions_open() - before > own and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # a stream's end reaches the node a moment later
        # The gauge also counts the storage nodes' sessions to each other (repair), which
        # open on their own schedule: one opened meanwhile failed CI (7 against 6). The
        # code's client held a session to each of its mailbox's 5 replicas.
        assert sessions_open() - before <= own + REPAIR_SESSIONS_SLACK
        await asyncio.gather(phone.close(), laptop.close())

    run(testnet, tmp_path, scenario)


@pytest.mark.parametrize("loss", ["deleted", "emptied"])
def test_a_lost_cache_is_rebuilt_from_another_device(
    testnet: Testnet, tmp_path: Path, loss: str
) -> None:
    """Gone, or an empty file in its place (a crash before its first write reached the
    disk): either is a lost cache, never an empty history taken for the truth."""

    async def scenario(people: People) -> None:
        alice, phone = await people.new("alice"), await people.new("bob")
        to_bob = await alice.add_contact(people.name("bob"))
        offer = await offer_link(phone, "laptop")
        laptop = await accept_link(people.profile("laptop"), offer.code, PASSPHRASE,
                                   people.seeds)  # fmt: skip
        for text in ("one", "two", "three"):
            await alice.send(to_bob, text)
        for device in (laptop, phone, laptop, phone):
            await device.sync()
        assert await mailbox_size(phone) == 0
        expected = history(laptop)
        await laptop.close()
        cache_path = people.profile("laptop").cache_path
        if loss == "deleted":  # the laptop's disk lost the cache
            cache_path.unlink()
        else:
            os.truncate(cache_path, 0)

        laptop = await people.open("laptop")
        assert laptop.cache.get_state(RECOVERING) is not None
        assert (await laptop.sync()).deleted == 0  # knows no device list yet: deletes nothing
        await phone.sync()  # answers the request with its history
        await laptop.sync()
        assert history(laptop) == expected
        assert laptop.cache.get_state(RECOVERING) is None
        assert len(laptop.cache.devices()) == 2
        await asyncio.gather(alice.close(), phone.close(), laptop.close())

    run(testnet, tmp_path, scenario)


def test_a_lone_device_with_a_lost_cache_cleans_up_after_a_week(
    testnet: Testnet, tmp_path: Path
) -> None:
    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        to_bob = await alice.add_contact(people.name("bob"))
        await bob.close()
        people.profile("bob").cache_path.unlink()
        bob = await people.open("bob")  # asks for a history nobody will send
        await alice.send(to_bob, "anyone there?")
        report = await bob.sync()
        assert [m.body for m in report.new_messages] == ["anyone there?"]
        assert report.deleted == 0  # another device might still need it
        week_ago = now_ms() - RECOVERY_WAIT_MS - 1
        bob.cache.set_state(RECOVERING, str(week_ago).encode())
        assert (await bob.sync()).deleted >= 2  # the message and bob's own request
        assert bob.cache.get_state(RECOVERING) is None
        assert await mailbox_size(bob) == 0
        await asyncio.gather(alice.close(), bob.close())

    run(testnet, tmp_path, scenario)


def test_a_changed_key_is_refused_and_a_signed_rotation_followed(
    testnet: Testnet, tmp_path: Path
) -> None:
    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        mallory = Identity.generate()
        # alice once pinned "bob-…" to another key (e.g. before an attack or a mix-up)
        name = people.name("bob")
        alice.cache.pin(Contact(mallory.fingerprint, mallory.public, name, False, now_ms(),
                                mallory.fingerprint))  # fmt: skip
        with pytest.raises(KeyChangedError, match="without a rotation signed by the old key"):
            await alice.add_contact(name)
        assert alice.cache.contact_named(name).fingerprint == mallory.fingerprint  # type: ignore[union-attr]
        # after checking with bob out of band, alice forgets the old pin and adds again
        assert alice.cache.forget_contact(mallory.fingerprint)
        assert (await alice.add_contact(name)).fingerprint == bob.fingerprint
        alice.cache.forget_contact(bob.fingerprint)
        alice.cache.pin(Contact(bob.fingerprint, bob.identity.public, None, False, now_ms(),
                                bob.fingerprint))  # fmt: skip
        contact = alice.cache.contact(bob.fingerprint)
        assert contact is not None

        new_bob = Identity.generate()
        await keyserver.publish_rotation(bob.node, bob.identity, new_bob, "new phone")
        followed = await alice.refresh_contact(contact)
        assert followed.fingerprint == new_bob.fingerprint
        assert followed.conversation == contact.conversation  # same conversation
        assert alice.cache.contact(bob.fingerprint).replaced_by == new_bob.fingerprint  # type: ignore[union-attr]
        # a rotation statement by anyone but the pinned key is not followed
        assert await alice.refresh_contact(followed) == followed
        # bob's name still points at his old key (claims are first come, first served):
        # adding him by name finds the old key, follows its rotation, no KEY CHANGED
        carol_view = await people.new("carol")
        via_name = await carol_view.add_contact(people.name("bob"))
        assert via_name.fingerprint == new_bob.fingerprint and via_name.name == people.name("bob")
        assert await carol_view.add_contact(people.name("bob")) == via_name
        await carol_view.close()
        await asyncio.gather(alice.close(), bob.close())

    run(testnet, tmp_path, scenario)


def test_a_retired_identity_s_mailbox_client_is_closed_when_its_grace_period_ends(
    testnet: Testnet, tmp_path: Path
) -> None:
    """A rotation keeps the old identity's `MailboxClient` (its sessions to the replicas)
    aside; it stayed open until the peer closed, so a `dna watch` running across rotations
    kept every one's sessions for good. Now it is closed at the first round after its
    grace period ends, while the old mailboxes still in theirs are drained as before, by
    the live client: here, and after a restart (which holds no retired client at all).
    Fails without the fix (checked: the first rotation's client still held its sessions)."""

    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        first = bob.identity
        await bob.rotate("one")
        second = bob.identity
        await bob.rotate("two")
        retired = dict(bob._retired_mail)
        assert set(retired) == {first.fingerprint, second.fingerprint}
        sessions = {fp: list(mail.session_pool._sessions.values())  # type: ignore[union-attr]
                    for fp, mail in retired.items()}  # fmt: skip
        assert all(sessions.values())  # the notices went through each one's sessions

        entries = json.loads(bob.cache.get_state(RETIRED) or b"")
        ended = [{**e, "until_ms": now_ms()} if e["seeds"] == first.seeds().hex() else e
                 for e in entries]  # fmt: skip
        bob.cache.set_state(RETIRED, json.dumps(ended).encode())
        await alice.mail.put(second.fingerprint, to_old_keys(alice, second, "still read"))
        report = await bob.sync()
        assert "still read" in [m.body for m in report.new_messages]  # by the live client
        assert set(bob._retired_mail) == {second.fingerprint}
        assert len(retired[first.fingerprint].session_pool or []) == 0
        assert all(s._call.done() for s in sessions[first.fingerprint])  # streams ended
        assert not any(s._call.done() for s in sessions[second.fingerprint])

        await bob.close()  # a restart inside the second one's grace period
        bob = await people.open("bob")
        assert bob._retired_mail == {}  # nothing to close: the live client drains
        await alice.mail.put(second.fingerprint, to_old_keys(alice, second, "after a restart"))
        assert [m.body for m in (await bob.sync()).new_messages] == ["after a restart"]
        await asyncio.gather(alice.close(), bob.close())

    run(testnet, tmp_path, scenario)


def to_old_keys(sender: Peer, to: Identity, body: str) -> bytes:
    payload = envelope_pb2.Payload(text=envelope_pb2.Text(body=body)).SerializeToString()
    return seal(sender.identity, to.public, payload, now_ms=now_ms(), include_sender_keys=True)


def test_a_message_over_the_lookup_budget_is_held_in_the_cache_until_handled(
    testnet: Testnet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two senders bob's cache does not know write without keys inside, one lookup a round
    (MAX_SENDER_LOOKUPS made 1 for the test: the rule at a small size): the second was
    dropped as 'not looked up', acknowledged and deleted from the replicas, its message
    lost. Then it stayed on the replicas, deferred, holding the mailbox's quota until its
    turn (a flood of them kept bob's mailbox full, refusing his contacts). Now it is kept
    in bob's cache, deferred, and deleted from the replicas with the round's other blobs;
    the next round shows it (here a `watch` round with nothing new pushed: the deferred
    blob alone, from the cache)."""
    monkeypatch.setattr("dna_peer.inbox.MAX_SENDER_LOOKUPS", 1)

    async def scenario(people: People) -> None:
        alice, bob, carol = [await people.new(who) for who in ("alice", "bob", "carol")]
        for sender, body in ((alice, "one"), (carol, "two")):
            blob = seal(sender.identity, bob.identity.public, text(body), now_ms=now_ms(),
                        include_sender_keys=False)  # fmt: skip
            await sender.mail.put(bob.fingerprint, blob)
        first = await bob.sync()
        # both wait for their lookup; the round makes one (the budget), the other waits on
        assert len(first.new_messages) == 1 and first.deferred == 2 and first.rejected == []
        assert first.deleted == 2 and await mailbox_size(bob) == 0  # the deferred one too
        assert bob.cache.deferred_count(bob.fingerprint) == 1  # ...held here
        pushed = await bob.subscribe()
        assert pushed is not None
        second = await bob.receive_pushed(pushed, 0.2)
        await pushed.close()
        bodies = {m.body for m in first.new_messages + second.new_messages}
        assert bodies == {"one", "two"} and second.deferred == 0 and second.deleted == 0
        assert bob.cache.deferred_count(bob.fingerprint) == 0
        await asyncio.gather(alice.close(), bob.close(), carol.close())

    run(testnet, tmp_path, scenario)


def test_a_flood_needing_lookups_does_not_delay_a_contact_s_message(
    testnet: Testnet, tmp_path: Path
) -> None:
    """A stranger puts 70 envelopes from unpublished senders without keys inside in bob's
    mailbox, then alice (a contact) writes. Bob's sync handled them in mailbox order,
    looking each flood sender up (a DHT query each) before alice's message: it waited
    behind 64 lookups. Now the round handles what needs no lookup first: alice's message
    is told before any lookup; the flood costs 64 lookups this round, the rest the next."""

    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        to_bob = await alice.add_contact(people.name("bob"))
        await alice.send(to_bob, "hello")
        await bob.sync()  # alice is bob's contact now
        flood = [seal(Identity.generate(), bob.identity.public, text("flood"),
                      now_ms=now_ms(), include_sender_keys=False) for _ in range(70)]  # fmt: skip
        for blob in flood:
            await alice.mail.put(bob.fingerprint, blob)
        await alice.send(to_bob, "not behind the flood")
        looked_up: list[bytes] = []
        lookup = bob.lookup_keys

        async def counted(fingerprint: bytes) -> Any:
            looked_up.append(fingerprint)
            return await lookup(fingerprint)

        bob.lookup_keys = counted  # type: ignore[method-assign]
        told: list[tuple[str, int]] = []
        told_after: list[float] = []
        started = time.monotonic()

        def hear(msg: Message) -> None:
            told.append((msg.body, len(looked_up)))
            told_after.append(time.monotonic() - started)

        bob.on_message = hear
        first = await bob.sync()
        took = time.monotonic() - started
        assert told == [("not behind the flood", 0)], told
        assert len(looked_up) == 64 and first.deferred == 70 and len(first.rejected) == 64
        second = await bob.sync()
        assert len(second.rejected) == 6 and bob.cache.deferred_count(bob.fingerprint) == 0
        print(f"flood round: {took:.2f} s for 71 blobs and 64 lookups; the contact's"
              f" message told after {told_after[0]:.2f} s")  # fmt: skip
        await asyncio.gather(alice.close(), bob.close())

    run(testnet, tmp_path, scenario)


def test_bad_envelopes_are_dropped_with_a_reason(
    testnet: Testnet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        carol = await people.new("carol", publish=False)  # never published her keys
        to_bob = await alice.add_contact(people.name("bob"))
        good = seal(alice.identity, bob.identity.public, text("real"), now_ms=now_ms(),
                    include_sender_keys=True)  # fmt: skip
        tampered = bytearray(good)
        tampered[-40] ^= 0x01
        stranger = seal(carol.identity, bob.identity.public, text("who am I"), now_ms=now_ms())
        sync_from_alice = seal(alice.identity, bob.identity.public, read_marker(),
                               now_ms=now_ms(), include_sender_keys=True)  # fmt: skip
        for blob in (good, bytes(tampered), stranger, sync_from_alice):
            await alice.mail.put(bob.fingerprint, blob)
        with caplog.at_level(logging.WARNING, logger="dna.peer.inbox"):
            report = await bob.sync()
        assert [m.body for m in report.new_messages] == ["real"]
        reasons = sorted(reason for _, reason in report.rejected)
        assert len(reasons) == 3
        assert any("authentication failed" in r for r in reasons)
        assert any("unknown sender" in r for r in reasons)
        assert any("read is not accepted from another identity" in r for r in reasons)
        assert sum("dropped mailbox blob" in r.message for r in caplog.records) == 3

        # what only a storage node could do: hand back the same envelope under another
        # ID (a replay), or an envelope for someone else
        inbox = bob._inbox()
        await inbox.handle_blob(b"\x01" * 32, good)
        for_alice = seal(carol.identity, alice.identity.public, text("misrouted"),
                         now_ms=now_ms(), include_sender_keys=True)  # fmt: skip
        await inbox.handle_blob(b"\x02" * 32, for_alice)
        assert [r for _, r in inbox.report.rejected] == [
            "envelope: message ID already received (replay)",
            "envelope: addressed to another identity",
        ]
        assert [m.body for m in bob.cache.messages()] == ["real"]
        assert to_bob.fingerprint == bob.fingerprint
        await asyncio.gather(alice.close(), bob.close(), carol.close())

    run(testnet, tmp_path, scenario)


def test_a_flood_from_throwaway_identities_costs_a_bounded_number_of_receipts(
    testnet: Testnet, tmp_path: Path
) -> None:
    """Anyone can fill a mailbox with messages from as many throwaway identities (keys
    inside, all valid): bob's sync sealed and put a receipt to each, one signed put with
    proof of work apiece, to mailboxes the flooder chose. Now a round sends at most
    MAX_RECEIPTS_PER_ROUND, the contacts bob knows first: alice, whose message came last,
    still gets hers; every message is kept."""

    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        await bob.add_contact(people.name("alice"))
        to_bob = await alice.add_contact(people.name("bob"))
        flooders = [Identity.generate() for _ in range(MAX_RECEIPTS_PER_ROUND + 16)]
        for n, flooder in enumerate(flooders):
            blob = seal(flooder, bob.identity.public, text(f"flood {n}"), now_ms=now_ms(),
                        include_sender_keys=True)  # fmt: skip
            await alice.mail.put(bob.fingerprint, blob)  # anyone's put: a mailbox is open
        await alice.send(to_bob, "the real one")
        receipts_to: list[bytes] = []
        send_payload = bob.send_payload

        async def counted(to: Any, payload: bytes, **kw: Any) -> Any:
            receipts_to.append(to.fingerprint)
            return await send_payload(to, payload, **kw)

        bob.send_payload = counted  # type: ignore[method-assign]
        started = time.monotonic()
        report = await bob.sync()
        print(f"sync of {len(flooders) + 1} messages: {time.monotonic() - started:.1f} s,"
              f" {len(receipts_to)} receipts")  # fmt: skip
        assert len(report.new_messages) == len(flooders) + 1
        assert len(receipts_to) == MAX_RECEIPTS_PER_ROUND
        assert receipts_to[0] == alice.fingerprint  # the known contact first
        assert (await alice.sync()).receipts == 1
        await asyncio.gather(alice.close(), bob.close())

    run(testnet, tmp_path, scenario)


def test_presence_of_every_contact_is_looked_up_a_few_at_a_time(
    testnet: Testnet, tmp_path: Path
) -> None:
    """`dna contacts list --online` looked every pinned contact's presence up at once:
    anyone who writes is pinned, so thousands of overlay queries together. Now at most
    PRESENCE_LOOKUPS_AT_ONCE are in flight, and every contact gets its answer, in order."""

    async def scenario(people: People) -> None:
        bob = await people.new("bob")
        for _ in range(3 * PRESENCE_LOOKUPS_AT_ONCE):
            keys = Identity.generate().public
            bob.cache.pin(Contact(keys.fingerprint, keys, None, False, now_ms(), keys.fingerprint))
        in_flight, most = 0, 0
        lookup = bob.presence_of

        async def counted(contact: Contact) -> Any:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                return await lookup(contact)
            finally:
                in_flight -= 1

        bob.presence_of = counted  # type: ignore[method-assign]
        found = await bob.presence_of_all(bob.cache.contacts())
        assert found == [None] * 3 * PRESENCE_LOOKUPS_AT_ONCE  # nobody is online
        assert 1 < most <= PRESENCE_LOOKUPS_AT_ONCE, most
        await bob.close()

    run(testnet, tmp_path, scenario)


def test_a_link_code_nobody_used_leaves_no_device(testnet: Testnet, tmp_path: Path) -> None:
    """`dna identity link` registered the new device at once and told the other devices,
    so a code nobody used left a phantom in every device list (and deletes waited for it a
    day, on the other devices forever). Now the device is listed only once it linked (its
    own hello); an offer is only waited for by deletes, and only while its code may be
    used. A cache from before (its offer registered at once) still drops the phantom."""

    async def scenario(people: People) -> None:
        phone, alice = await people.new("bob"), await people.new("alice")
        used = await offer_link(phone, "laptop")
        laptop = await accept_link(people.profile("laptop"), used.code, PASSPHRASE, people.seeds)
        unused = await offer_link(phone, "never")  # its code expires unused
        for device in (laptop, phone, laptop):
            await device.sync()
        both = {phone.device.device_id, used.device_id}
        assert set(phone.cache.devices()) == set(laptop.cache.devices()) == both
        await alice.send(await alice.add_contact(people.name("bob")), "for both devices")
        for device in (phone, laptop, phone, laptop, phone):
            await device.sync()
        assert await mailbox_size(phone) > 0  # the offer may still be used: kept for it
        for device in (phone, laptop):  # the hold runs out (2 h after the offer)
            device.cache.add_offered(unused.device_id, 0, now_ms())
        for device in (phone, laptop, phone):
            await device.sync()
        assert await mailbox_size(phone) == 0
        assert [m.body for m in laptop.cache.messages()] == ["for both devices"]

        # A phantom a dna from before left: dropped after a day without a word.
        phone.cache.add_device(b"p" * 16, "phantom", now_ms())
        phone.cache.set_state(OFFERED, json.dumps({(b"p" * 16).hex(): now_ms() - DAY_MS}).encode())
        await phone.sync()
        assert set(phone.cache.devices()) == both
        await asyncio.gather(phone.close(), alice.close(), laptop.close())

    run(testnet, tmp_path, scenario)


def text(body: str) -> bytes:
    return envelope_pb2.Payload(text=envelope_pb2.Text(body=body)).SerializeToString()


def read_marker() -> bytes:
    marker = envelope_pb2.ReadMarker(conversation_id=b"x" * 32, read_up_to_ms=1)
    return envelope_pb2.Payload(read=marker).SerializeToString()


def test_records_are_republished_before_they_expire(testnet: Testnet, tmp_path: Path) -> None:
    async def scenario(people: People) -> None:
        alice = await people.new("alice")
        key = record_key(keyserver.IDENTITY, alice.fingerprint)
        first = await alice.node.get_record(key)
        assert first is not None and not await alice.republish_if_due()  # fresh: nothing due
        state = json.loads(alice.cache.get_state(PUBLISHED) or b"{}")
        day_old = {**state, "ms": state["ms"] - REPUBLISH_AFTER_MS}
        alice.cache.set_state(PUBLISHED, json.dumps(day_old).encode())
        await alice.sync()
        again = await alice.node.get_record(key)
        assert again is not None and again.body.seq > first.body.seq
        assert again.body.expires_ms > first.body.expires_ms
        assert await keyserver.lookup_name(alice.node, people.name("alice")) == alice.fingerprint
        await alice.close()

    run(testnet, tmp_path, scenario)


def test_three_devices_converge_whatever_their_offline_periods(
    testnet: Testnet, tmp_path: Path
) -> None:
    """A seeded random schedule: alice and bob's devices send, sync, go offline and come
    back in any order; at the end every device holds the same history, once each."""

    async def scenario(people: People) -> None:
        rng = random.Random(2026)
        alice, phone = await people.new("alice"), await people.new("bob")
        devices: dict[str, Peer | None] = {"bob": phone}  # by profile name
        for name in ("laptop", "tablet"):
            offer = await offer_link(phone, name)
            devices[name] = await accept_link(people.profile(name), offer.code, PASSPHRASE,
                                              people.seeds)  # fmt: skip
        to_bob = await alice.add_contact(people.name("bob"))
        sent = []
        for step in range(40):
            name = rng.choice(sorted(devices))
            device, action = devices[name], rng.random()
            if device is None:  # offline: maybe come back
                if action < 0.5:
                    devices[name] = await people.open(name)
            elif action < 0.25:
                await device.close()
                devices[name] = None
            elif action < 0.55:
                sent.append(f"alice {step}")
                await alice.send(to_bob, sent[-1])
            elif action < 0.75:
                sent.append(f"{name} {step}")
                await device.send(await device.add_contact(alice.fingerprint.hex()), sent[-1])
            else:
                await device.sync()
        online = [await people.open(n) if d is None else d for n, d in devices.items()]
        for _ in range(2):  # two rounds: transcripts, then the acknowledgements
            for device in online:
                await device.sync()
        histories = [history(d) for d in online]
        assert all(h == histories[0] for h in histories), [[b for _, _, b in h] for h in histories]
        assert sorted(b for _, _, b in histories[0]) == sorted(sent)
        assert await mailbox_size(online[0]) == 0
        await asyncio.gather(alice.close(), *(d.close() for d in online))

    run(testnet, tmp_path, scenario)


def test_a_pushed_round_commits_once_for_its_bookkeeping_and_copies_commit_nothing(
    testnet: Testnet, tmp_path: Path
) -> None:
    """Every replica pushes its copy of a blob. The round that handles it commits the blob,
    then its cursors and acknowledgement together; the rounds that take only the other
    replicas' copies write nothing (each commit is an fsync on the device's loop, in the
    way of the next message). Nothing is received twice after that either."""

    async def scenario(people: People) -> None:
        alice, bob = await people.new("alice"), await people.new("bob")
        contact = await alice.add_contact(people.name("bob"))
        pushed = await bob.subscribe()
        assert pushed is not None
        keep: Callable[[SyncReport], None] = lambda report: None  # noqa: E731  settle later
        sent = await alice.send(contact, "pushed")
        await alice.mail.drain()  # every replica has stored it, so every copy comes
        await bob.daily_upkeep()  # its first run prunes the cache (commits of its own)
        commits = bob.cache.commits
        report = await bob.receive_pushed(pushed, 10.0, settle=keep)
        assert [m.message_id for m in report.new_messages] == [sent.message_id]
        assert bob.cache.commits == commits + 2
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while pushed.copies < len(pushed.feeds) and loop.time() < deadline:
            copies = await bob.receive_pushed(pushed, 0.5, settle=keep)
            assert copies.new_messages == [] and copies.held == []
        assert pushed.copies == len(pushed.feeds) > 1
        assert bob.cache.commits == commits + 2
        await pushed.close()
        assert (await bob.sync()).new_messages == []  # from the saved cursors: nothing twice
        await asyncio.gather(alice.close(), bob.close())

    run(testnet, tmp_path, scenario)
