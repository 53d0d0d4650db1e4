"""Rotation notices in the inbox (issue 11 item 12), on a real peer (real cache, a real
overlay node that joined no network): a contact's properly cross-signed statement moves
the pin with no key-change warning; anything else is dropped with a reason and changes
nothing; the own identity's notice moves this device; the old mailbox is forgotten
after the grace period."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from dna_core.crypto import Identity, keystore, seal
from dna_core.crypto.node import NodeIdentity
from dna_core.errors import DnaError
from dna_core.files import write_atomic
from dna_core.overlay.aio import NodeConfig, OverlayNode
from dna_core.wire.gen.dna.v1 import envelope_pb2
from dna_peer import keyserver
from dna_peer.cache import DEFERRED_DROPPED, Contact, cache_key
from dna_peer.inbox import Inbox
from dna_peer.keyserver import now_ms
from dna_peer.peer import RETIRED, Peer
from dna_peer.profile import Profile


@asynccontextmanager
async def bob_peer(tmp_path: Path, bob: Identity) -> AsyncIterator[Peer]:
    profile = Profile(tmp_path / "bob")
    profile.create(bob, "pw")
    node = OverlayNode(NodeIdentity.generate(0)[0], NodeConfig(host="127.0.0.1",
                                                               client_mode=True))  # fmt: skip
    await node.start()
    peer = Peer(bob, profile.open_cache(bob), node, profile.device())
    peer.save_identity = lambda new, rekey: profile.replace_identity(new, "pw", rekey)
    try:
        yield peer
    finally:
        await peer.close()


def pin(peer: Peer, who: Identity, name: str) -> None:
    peer.cache.pin(Contact(who.fingerprint, who.public, name, True, now_ms(), who.fingerprint))


def notice(sender: Identity, to: Identity, statement: bytes, seeds: bytes = b"") -> bytes:
    rotation = envelope_pb2.IdentityRotation(statement=statement, new_seeds=seeds)
    payload = envelope_pb2.Payload(rotation=rotation).SerializeToString()
    return seal(sender, to.public, payload, now_ms=now_ms(), include_sender_keys=True)


async def handle(peer: Peer, blob: bytes) -> Inbox:
    inbox = peer._inbox()
    await inbox.handle_blob(hashlib.sha256(blob).digest(), blob)
    return inbox


def test_a_cross_signed_rotation_moves_the_pin(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            pin(peer, alice, "alice")
            new = Identity.generate()
            inbox = await handle(peer, notice(alice, bob, keyserver.rotation_record(alice, new)))
            assert inbox.report.rejected == []
            moved = peer.cache.contact_named("alice")
            assert moved is not None and moved.fingerprint == new.fingerprint
            assert moved.conversation == alice.fingerprint and not moved.verified
            added = await peer.add_contact(new.fingerprint.hex())  # no warning, no new pin
            assert added == dataclasses.replace(moved, chosen=True)  # now added by us

    asyncio.run(go())


Forge = Callable[[Identity, Identity, Identity], bytes]  # (alice, bob, mallory) -> blob
FORGED: dict[str, tuple[Forge, str]] = {
    "statement signed by another key": (
        lambda a, b, m: notice(a, b, keyserver.rotation_record(m, Identity.generate())),
        "rotation: the statement is not signed by the rotating key",
    ),
    "not a record": (lambda a, b, m: notice(a, b, b"\x00garbage"), ""),
}


def test_a_rotation_from_someone_not_pinned_here_changes_nothing_without_a_warning(
    tmp_path: Path, alice: Identity, bob: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """A device restored with `dna identity import` has no pins yet: every contact's
    rotation still in the mailbox was refused with a WARNING each ("not from a pinned
    contact"), though nothing was wrong. Now it is handled as what it is: nothing to move
    (no pin made, nothing refused), counted for one line in `dna inbox`; and acknowledged
    like any blob, so another device that has the pin still gets it (deletes wait for
    every device's acknowledgement)."""

    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            blob = notice(alice, bob, keyserver.rotation_record(alice, Identity.generate()))
            with caplog.at_level("WARNING"):
                inbox = await handle(peer, blob)
            assert inbox.report.rejected == [] and inbox.report.unpinned_rotations == 1
            assert peer.cache.contacts() == [] and caplog.records == []
            assert inbox.report.held == [hashlib.sha256(blob).digest()]

    asyncio.run(go())


def test_forged_rotation_notices_are_dropped_and_change_nothing(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            pin(peer, alice, "alice")
            mallory = Identity.generate()
            before = peer.cache.contacts()
            for case, (forge, reason) in FORGED.items():
                inbox = await handle(peer, forge(alice, bob, mallory))
                ((_, got),) = inbox.report.rejected
                assert reason in got, case
                assert peer.cache.contacts() == before, case

    asyncio.run(go())


def test_the_own_notice_moves_this_device_and_a_wrong_one_is_dropped(
    tmp_path: Path, bob: Identity
) -> None:
    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            new, other = Identity.generate(), Identity.generate()
            statement = keyserver.rotation_record(bob, new)
            wrong = await handle(peer, notice(bob, bob, statement, other.seeds()))
            assert wrong.report.rotated_to is None
            assert "not the ones the statement names" in wrong.report.rejected[0][1]
            assert peer.identity == bob and peer.retired() == []
            right = await handle(peer, notice(bob, bob, statement, new.seeds()))
            assert right.report.rotated_to is not None
            peer._adopt(right.report.rotated_to)
            assert peer.fingerprint == new.fingerprint
            assert [old.fingerprint for old in peer.retired()] == [bob.fingerprint]
            unlocked = Profile(tmp_path / "bob").unlock("pw")
            assert unlocked.fingerprint == new.fingerprint  # the key file moved too

    asyncio.run(go())


def test_the_old_mailbox_is_forgotten_after_the_grace_period(tmp_path: Path, bob: Identity) -> None:
    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            peer._adopt(Identity.generate())
            assert len(peer.retired()) == 1
            (entry,) = json.loads(peer.cache.get_state(RETIRED) or b"")
            peer.cache.set_state(RETIRED, json.dumps([{**entry, "until_ms": now_ms()}]).encode())
            peer.cache.defer_blob(bob.fingerprint, b"b" * 32, b"blob", b"s" * 32, now_ms())
            assert peer.retired() == []
            assert json.loads(peer.cache.get_state(RETIRED) or b"") == []  # old seeds gone
            assert peer.cache.deferred_count(bob.fingerprint) == 0  # and what waited there
            assert peer.cache.blob_outcome(b"b" * 32) == DEFERRED_DROPPED  # not left waiting

    asyncio.run(go())


def text_to(sender: Identity, to: Identity, body: str) -> bytes:
    payload = envelope_pb2.Payload(text=envelope_pb2.Text(body=body)).SerializeToString()
    return seal(sender, to.public, payload, now_ms=now_ms(), include_sender_keys=True)


def ack_from(device_id: bytes, to: Identity, blob_ids: list[bytes]) -> bytes:
    ack = envelope_pb2.DeviceAck(device_id=device_id, blob_ids=blob_ids)
    payload = envelope_pb2.Payload(ack=ack).SerializeToString()
    return seal(to, to.public, payload, now_ms=now_ms(), include_sender_keys=True)


async def handle_in(peer: Peer, blob: bytes, mailbox: Identity | None = None) -> bytes:
    """One blob of the own mailbox (acknowledged, as a sync does) or of ``mailbox``'s."""
    blob_id = hashlib.sha256(blob).digest()
    inbox = peer._inbox(mailbox, acknowledge=mailbox is None)
    await inbox.handle_blob(blob_id, blob)
    return blob_id


def test_what_served_only_the_old_mailbox_goes_at_the_grace_period_s_end(
    tmp_path: Path, alice: Identity, bob: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation with a second device: the old mailbox's blobs that device had not
    acknowledged yet, those drained from it during the grace period, and what waited there
    stayed in the cache forever: nothing is deleted in the old mailbox, so they were never
    deleted, never pruned, and an acknowledgement blob in the new mailbox that covered one
    of them was never deletable either. Now at the grace period's end they count as
    deleted (one transaction with forgetting the old keys: a crash part way keeps the keys'
    entry and the next call does it all), and the daily prune forgets them; the new
    mailbox's rows are untouched. Fails without it (checked: the old blobs stayed
    undeleted after the grace period)."""
    laptop = b"L" * 16

    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            pin(peer, alice, "alice")
            peer.cache.add_device(laptop, "laptop", now_ms())  # deletes wait for it too
            before = await handle_in(peer, text_to(alice, bob, "before the rotation"))
            new = Identity.generate()
            peer._adopt(new)  # this device's switch (`rotate`, step 4)
            during = await handle_in(peer, text_to(alice, bob, "to the old keys"), bob)
            peer.cache.defer_blob(bob.fingerprint, b"d" * 32, b"blob", b"s" * 32, now_ms())
            ack = await handle_in(peer, ack_from(laptop, new, [during]))  # in the new mailbox
            kept = await handle_in(peer, text_to(alice, new, "to the new keys"))
            old_rows = {before, during, b"d" * 32}
            assert old_rows | {kept, ack} <= set(peer.cache.undeleted_blobs())
            assert ack not in peer.cache.deletable_blobs(now_ms())  # waits on `during`

            (entry,) = json.loads(peer.cache.get_state(RETIRED) or b"")
            peer.cache.set_state(RETIRED, json.dumps([{**entry, "until_ms": now_ms()}]).encode())
            real = peer.cache.drop_deferred

            def crash(mailbox: bytes) -> int:
                real(mailbox)
                raise KeyboardInterrupt  # killed part way through the prune

            monkeypatch.setattr(peer.cache, "drop_deferred", crash)
            with pytest.raises(KeyboardInterrupt):
                peer.retired()
            assert json.loads(peer.cache.get_state(RETIRED) or b"") != []  # the keys kept
            assert peer.cache.deferred_count(bob.fingerprint) == 1  # nothing half done
            monkeypatch.undo()

            assert peer.retired() == []
            undeleted = set(peer.cache.undeleted_blobs())
            assert not old_rows & undeleted and kept in undeleted
            assert peer.cache.deletable_blobs(now_ms()) == [ack]  # it covered only `during`
            peer.cache.mark_deleted([ack])
            peer.cache.prune(envelopes_before_ms=0, deleted_blobs_before_ms=now_ms() + 1)
            assert [peer.cache.blob_outcome(b) for b in (*old_rows, ack)] == [None] * 4
            assert peer.cache.blob_outcome(kept) is not None
            assert not peer.cache.acked_by(laptop)  # its acknowledgements went with them

    asyncio.run(go())


def test_the_old_keys_write_no_more_to_the_new_mailbox(tmp_path: Path, bob: Identity) -> None:
    """After the rotation, a text signed by bob's old keys in his new mailbox (whoever
    holds them: a stolen device, a leaked backup) was shown as a stranger's: pinned, a
    receipt owed. Refused now, by name. In the old mailbox, which the device still
    drains, the old keys are its own devices' (a read marker is applied)."""

    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            new = Identity.generate()
            peer._adopt(new)
            body = envelope_pb2.Payload(text=envelope_pb2.Text(body="it's me, your old key"))
            forged = seal(bob, new.public, body.SerializeToString(), now_ms=now_ms(),
                          include_sender_keys=True)  # fmt: skip
            inbox = await handle(peer, forged)
            ((_, reason),) = inbox.report.rejected
            assert "own former key" in reason and inbox.report.receipts_due == []
            assert peer.cache.message_count() == 0 and peer.cache.contacts() == []
            marker = envelope_pb2.Payload(read=envelope_pb2.ReadMarker(
                conversation_id=b"c" * 32, read_up_to_ms=5))  # fmt: skip
            drained = peer._inbox(bob)  # the old mailbox
            own = seal(bob, bob.public, marker.SerializeToString(), now_ms=now_ms())
            await drained.handle_blob(hashlib.sha256(own).digest(), own)
            assert drained.report.rejected == []

    asyncio.run(go())


def test_a_rotation_cut_short_is_finished_or_undone_at_the_next_unlock(
    tmp_path: Path, alice: Identity
) -> None:
    """The key file and the cache move to the new keys in two steps; whichever step a
    crash interrupts, the next unlock gives an identity whose cache opens."""
    for rekeyed in (True, False):
        profile = Profile(tmp_path / f"alice-{rekeyed}")
        profile.create(alice, "pw")
        new = Identity.generate()
        cache = profile.open_cache(alice)
        write_atomic(profile.fresh_keyfile, keystore.lock(new, "pw"))  # crashed after this
        if rekeyed:  # ...or after this
            cache.rekey(cache_key(new, profile.device().device_id))
        cache.close()
        unlocked = profile.unlock("pw")
        assert unlocked.fingerprint == (new if rekeyed else alice).fingerprint
        assert not profile.fresh_keyfile.exists()
        profile.open_cache(unlocked).close()
        assert profile.unlock("pw").fingerprint == unlocked.fingerprint


def test_a_message_from_the_new_keys_before_the_notice_joins_the_conversation(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    """Blobs come in any order: the new keys' first message may be handled before the
    notice (a stranger then); the notice merges it into the named conversation."""

    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            pin(peer, alice, "alice")
            new = Identity.generate()
            text = envelope_pb2.Payload(text=envelope_pb2.Text(body="from the new keys"))
            first = seal(new, bob.public, text.SerializeToString(), now_ms=now_ms(),
                         include_sender_keys=True)  # fmt: skip
            await handle(peer, first)
            await handle(peer, notice(alice, bob, keyserver.rotation_record(alice, new)))
            moved = peer.cache.contact_named("alice")
            assert moved is not None and moved.fingerprint == new.fingerprint
            assert [m.body for m in peer.cache.messages(moved.conversation)] == [
                "from the new keys"
            ]
            assert [c.peer for c in peer.cache.conversations()] == [new.fingerprint]

    asyncio.run(go())


@pytest.mark.timeout(20)
def test_a_rotation_cycle_does_not_hang_the_client(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    """A contact controls both ends of its rotation statements, so it can rotate A -> B
    and then B -> A: following `replaced_by` must stop, not loop for ever."""
    later = Identity.generate()

    async def main() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            pin(peer, alice, "alice")
            first = peer.cache.contact(alice.fingerprint)
            assert first is not None
            moved = peer.cache.replace_contact(first, later.public, now_ms())
            peer.cache.replace_contact(moved, alice.public, now_ms())  # and back again
            found = peer.cache.current_contact(alice.fingerprint)
            assert found is not None
            assert found.fingerprint in (alice.fingerprint, later.fingerprint)

    asyncio.run(main())


def test_a_rotation_cut_short_finishes_with_the_keys_its_notices_named(
    tmp_path: Path, alice: Identity, bob: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dna identity rotate` publishes the statement and notifies every contact (a sealed
    put each: a minute for a thousand contacts) before this device switches. Cut short in
    between (Ctrl-C, a kill, the own mailbox unreachable), the new keys were lost with the
    process, and running it again drew others: the contacts notified the first time were
    pinned to keys nobody held (their messages unreadable, bob's refused as from a key he
    rotated away from). Now the new keys are kept in the cache before anything goes out,
    and the next try (sync warns until then) finishes with them."""

    async def go() -> None:
        async with bob_peer(tmp_path, bob) as peer:
            pin(peer, alice, "alice")
            statements: list[bytes] = []
            notified: list[bytes] = []

            async def put_record(record: bytes, key: bytes) -> int:
                statements.append(record)
                return 1

            async def send_payload(to: object, payload: bytes, **_: object) -> None:
                notified.append(payload)

            async def unreachable(payload: object) -> None:
                raise DnaError("own mailbox: no quorum")

            async def nothing(*_: object) -> tuple[int, None]:
                return 0, None

            monkeypatch.setattr(peer.node, "put_record", put_record)
            monkeypatch.setattr(peer, "send_payload", send_payload)
            monkeypatch.setattr(peer, "post_to_devices", unreachable)
            monkeypatch.setattr(peer, "_clean_up", nothing)
            monkeypatch.setattr(peer, "_publish_after_rotation", nothing)
            with pytest.raises(DnaError, match="no quorum"):
                await peer.rotate("yearly")
            told = envelope_pb2.Payload.FromString(notified[0]).rotation.statement
            named = keyserver.rotation_statement_target(told, bob.fingerprint, now_ms=now_ms())
            assert peer.fingerprint == bob.fingerprint and peer.rotation_cut_short()

            monkeypatch.setattr(peer, "post_to_devices", nothing)
            new = await peer.rotate("another reason")
            assert new.fingerprint == named.fingerprint == peer.fingerprint
            again = keyserver.rotation_statement_target(statements[-1], bob.fingerprint,
                                                        now_ms=now_ms())  # fmt: skip
            assert again.fingerprint == named.fingerprint and not peer.rotation_cut_short()
            assert Profile(tmp_path / "bob").unlock("pw").fingerprint == named.fingerprint

    asyncio.run(go())
