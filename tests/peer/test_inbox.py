"""The inbox on its own (issue 12 item 1): a real cache, real envelopes, and for the device
it works for only what `inbox.Owner` asks (identity, device, a keyserver held in a dict), with
the clock given; no overlay node, no network. What a sync owes others comes back in the
report; nothing is sent."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dna_core.crypto import Identity, PublicKeySet, seal
from dna_core.errors import UnavailableError
from dna_core.wire.gen.dna.v1 import envelope_pb2 as pb
from dna_peer import inbox, keyserver
from dna_peer.cache import (
    DEFERRED,
    DEFERRED_EXPIRED,
    RECOVERING,
    Cache,
    Contact,
    Message,
    Outgoing,
)
from dna_peer.inbox import (
    MAX_PEER_LOOKUPS,
    MAX_SENDER_LOOKUPS,
    RECEIPT_BATCH_IDS,
    Inbox,
    ReceiptDue,
)
from dna_peer.keyserver import now_ms
from dna_peer.profile import Device
from support import single_byte_tampers

DAY_MS = 86_400_000


@dataclass
class Owner:
    """The device the inbox works for: an identity, a device, a keyserver in a dict."""

    identity: Identity
    device: Device = field(default_factory=lambda: Device(os.urandom(16), "this one"))
    published: dict[bytes, PublicKeySet] = field(default_factory=dict)
    lookups: list[bytes] = field(default_factory=list)
    former: dict[bytes, PublicKeySet] = field(default_factory=dict)  # rotated away from
    offline: bool = False  # no overlay node answers a lookup

    @property
    def fingerprint(self) -> bytes:
        return self.identity.fingerprint

    async def lookup_keys(self, fingerprint: bytes) -> PublicKeySet | None:
        self.lookups.append(fingerprint)
        if self.offline:
            raise UnavailableError("UNAVAILABLE", "find-value: none of the 5 nodes asked answered")
        return self.published.get(fingerprint)

    def former_keys(self) -> dict[bytes, PublicKeySet]:
        return self.former


@dataclass
class Clock:
    now: int = field(default_factory=now_ms)

    def __call__(self) -> int:
        return self.now


@dataclass
class Setup:
    inbox: Inbox
    cache: Cache
    owner: Owner
    clock: Clock
    cache_key: bytes = b""

    async def handle(self, blob: bytes, *, look_up: bool = True) -> bytes:
        blob_id = hashlib.sha256(blob).digest()
        await self.inbox.handle_blob(blob_id, blob, look_up=look_up)
        return blob_id

    def reasons(self) -> list[str]:
        return [reason for _, reason in self.inbox.report.rejected]

    def next_round(self) -> Inbox:
        """A new round's inbox (a sync: its own lookup budgets), which retries first."""
        self.inbox = Inbox(self.cache, self.owner, clock=self.clock)
        return self.inbox


@pytest.fixture
def bob_inbox(tmp_path: Path, bob: Identity) -> Setup:
    key = os.urandom(32)
    cache = Cache.open(tmp_path / "cache.db", key)
    owner, clock = Owner(bob), Clock()
    cache.add_device(owner.device.device_id, owner.device.name, clock())
    return Setup(Inbox(cache, owner, clock=clock), cache, owner, clock, key)


def payload(**kind: Any) -> bytes:
    return pb.Payload(**kind).SerializeToString()


def text(body: str) -> bytes:
    return payload(text=pb.Text(body=body))


def sealed(sender: Identity, to: Identity, raw: bytes, now: int, *, keys: bool = True) -> bytes:
    return seal(sender, to.public, raw, now_ms=now, include_sender_keys=keys)


def imported_modules(source: str) -> set[str]:
    tree = ast.parse(source)
    froms = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return froms | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


@pytest.mark.process  # a fresh interpreter, so no earlier import hides one
def test_the_inbox_does_not_import_the_peer() -> None:
    """Not at run time (the issue's check, in a fresh interpreter), and not for the type
    checker either: the cycle used to hide behind ``TYPE_CHECKING``."""
    code = "import sys, dna_peer.inbox; assert 'dna_peer.peer' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "dna_peer.peer" not in imported_modules(Path(inbox.__file__).read_text())


def test_a_stranger_s_text_is_pinned_stored_and_owes_a_receipt(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        s = bob_inbox
        blob_id = await s.handle(sealed(alice, bob, text("hi"), s.clock()))
        report = s.inbox.report
        assert [m.body for m in report.new_messages] == ["hi"] and report.rejected == []
        pinned = s.cache.contact(alice.fingerprint)
        assert pinned is not None and pinned.pinned_ms == s.clock.now  # the given clock
        message_id = report.new_messages[0].message_id
        assert report.receipts_due == [ReceiptDue(alice.public, bob, [message_id])]
        assert report.held == [blob_id] and s.owner.lookups == []
        await s.handle(sealed(alice, bob, text("hi"), s.clock()))  # handled: no new receipt
        assert s.cache.message_count() == 2 and len(report.receipts_due[0].message_ids) == 2

    asyncio.run(go())


def test_strangers_are_message_requests_kept_at_most_max_strangers(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """Each stranger's first message pinned it and opened a conversation, with no bound: a
    put with proof of work apiece grew bob's contacts and conversations without end. Now at
    ``max_strangers`` requests the one idle longest is forgotten (pin, conversation,
    messages) before the next is pinned; a contact bob added, one he wrote to, and one with
    a message of his still queued are never requests, however old. A forgotten stranger that
    writes again is a request again. Fails without the bound (checked: 6 strangers kept)."""

    async def go() -> None:
        s = bob_inbox
        s.inbox = Inbox(s.cache, s.owner, clock=s.clock, max_strangers=3)
        added, written, queued = Identity.generate(), Identity.generate(), Identity.generate()
        s.cache.pin(Contact(added.fingerprint, added.public, None, False, s.clock(),
                            added.fingerprint, chosen=True))  # fmt: skip
        for peer in (written, queued):
            await s.handle(sealed(peer, bob, text("hello bob"), s.clock()))
        reply = Message(os.urandom(32), written.fingerprint, bob.fingerprint,
                        written.fingerprint, s.clock(), "hi!", outgoing=True)  # fmt: skip
        s.cache.add_message(reply)
        s.cache.queue_outgoing(Outgoing(os.urandom(32), queued.fingerprint, "hi!", b"sealed",
                                        s.clock(), os.getpid()))  # fmt: skip
        strangers = [Identity.generate() for _ in range(6)]
        for stranger in strangers:
            s.clock.now += 1_000
            await s.handle(sealed(stranger, bob, text("buy now"), s.clock()))
        kept = [x.fingerprint for x in strangers if s.cache.contact(x.fingerprint)]
        assert kept == [x.fingerprint for x in strangers[3:]] and s.cache.strangers() == 3
        for peer in (added, written, queued):  # old, but not requests: never forgotten
            assert s.cache.contact(peer.fingerprint) is not None
        senders = {m.sender for m in s.cache.messages()}
        assert not senders & {x.fingerprint for x in strangers[:3]}  # their messages too
        assert s.cache.search_count("buy") == 3  # and their text from the search index
        assert {c.id for c in s.cache.conversations()} == {
            added.fingerprint, written.fingerprint, queued.fingerprint, *kept}  # fmt: skip
        s.clock.now += 1_000
        await s.handle(sealed(strangers[0], bob, text("again"), s.clock()))
        assert s.cache.contact(strangers[0].fingerprint) is not None  # a request again
        assert s.cache.contact(strangers[3].fingerprint) is None  # the one idle longest now
        # The daily upkeep: requests idle past the replay window go, whatever their number.
        gone = s.cache.forget_strangers(keep=10, idle_before_ms=s.clock.now + 1)
        assert gone == 3 and s.cache.strangers() == 0
        assert len(s.cache.contacts()) == 3 and s.cache.message_count() == 3

    asyncio.run(go())


def test_a_sender_without_keys_inside_is_looked_up_once(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        s = bob_inbox
        s.owner.published[alice.fingerprint] = alice.public
        await s.handle(sealed(alice, bob, text("hi"), s.clock(), keys=False))
        assert s.owner.lookups == [alice.fingerprint]
        assert [m.body for m in s.cache.messages()] == ["hi"]

    asyncio.run(go())


def test_a_flood_of_unknown_senders_costs_a_bounded_number_of_lookups(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """Anyone may fill bob's mailbox with envelopes, each naming another unpublished sender
    without keys inside: every one was a DHT lookup (34 ms each on a local testnet: 10,000
    blobs, minutes of sync). Now a sender is looked up once per round, and at most
    MAX_SENDER_LOOKUPS senders are: the rest are deferred to the next round (kept in the
    cache, and acknowledged: they hold no mailbox quota), which takes them first. A
    published sender looked up first still gets through, all its envelopes for one lookup."""

    async def go() -> None:
        s = bob_inbox
        s.owner.published[alice.fingerprint] = alice.public
        for body in ("one", "two"):
            await s.handle(sealed(alice, bob, text(body), s.clock(), keys=False))
        strangers = [Identity.generate() for _ in range(MAX_SENDER_LOOKUPS + 10)]
        for stranger in strangers:
            await s.handle(sealed(stranger, bob, text("flood"), s.clock(), keys=False))
        assert s.owner.lookups[0] == alice.fingerprint
        assert len(s.owner.lookups) == MAX_SENDER_LOOKUPS == len(set(s.owner.lookups))
        assert len(s.reasons()) == MAX_SENDER_LOOKUPS - 1 and all(
            "unknown sender, cannot verify" in r for r in s.reasons()
        )
        assert s.inbox.report.deferred == 11 and s.cache.deferred_count(bob.fingerprint) == 11
        assert len(s.inbox.report.held) == 2 + MAX_SENDER_LOOKUPS - 1 + 11  # held here
        assert sorted(m.body for m in s.cache.messages()) == ["one", "two"]  # same time
        assert [c.fingerprint for c in s.cache.contacts()] == [alice.fingerprint]
        await s.next_round().retry_deferred()  # the 11 looked up, then dropped
        assert len(s.owner.lookups) == MAX_SENDER_LOOKUPS + 11 and len(s.reasons()) == 11
        assert s.inbox.report.held == []  # acknowledged when they were deferred
        assert s.cache.deferred_count(bob.fingerprint) == 0

    asyncio.run(go())


def test_a_lookup_nobody_answered_keeps_the_envelope_for_a_later_round(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """An unknown sender's lookup that no node answered read as "not published": the
    envelope was refused ("cannot verify"), acknowledged and so deleted from the replicas,
    and an honest message lost to a moment of network trouble. Now it waits."""

    async def go() -> None:
        s = bob_inbox
        s.owner.published[alice.fingerprint] = alice.public
        s.owner.offline = True
        blob_id = await s.handle(sealed(alice, bob, text("through the outage"), s.clock(),
                                        keys=False))  # fmt: skip
        assert s.reasons() == [] and s.inbox.report.deferred == 1
        assert s.inbox.report.held == [blob_id] and s.cache.blob_outcome(blob_id) == DEFERRED
        s.owner.offline = False
        await s.next_round().retry_deferred()
        assert [m.body for m in s.cache.messages()] == ["through the outage"]
        assert s.cache.blob_outcome(blob_id) == "message" and s.inbox.report.held == []
        assert s.cache.deferred_count(bob.fingerprint) == 0

    asyncio.run(go())


def test_an_envelope_over_the_lookup_budget_is_kept_for_the_next_round(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """An honest sender without keys inside (a contact whose keys bob's lost cache forgot),
    writing after MAX_SENDER_LOOKUPS others in one round, was dropped as 'not looked up',
    acknowledged and so deleted from the replicas: its message lost. Now it is deferred:
    kept in the cache (so acknowledged: held lists what a sync acknowledges, and the
    replicas may delete it), and handled by the next round."""

    async def go() -> None:
        s = bob_inbox
        for _ in range(MAX_SENDER_LOOKUPS):
            await s.handle(sealed(Identity.generate(), bob, text("x"), s.clock(), keys=False))
        s.owner.published[alice.fingerprint] = alice.public
        blob_id = await s.handle(sealed(alice, bob, text("still here"), s.clock(), keys=False))
        assert blob_id in s.inbox.report.held and s.cache.blob_outcome(blob_id) == DEFERRED
        assert s.cache.message_count() == 0
        await s.next_round().retry_deferred()
        assert [m.body for m in s.cache.messages()] == ["still here"]
        assert s.inbox.report.held == [] and s.cache.deferred_count(bob.fingerprint) == 0
        await s.next_round().retry_deferred()  # handled: nothing left, nothing looked up
        assert s.owner.lookups.count(alice.fingerprint) == 1 and s.inbox.report.held == []

    asyncio.run(go())


def test_an_own_history_does_not_starve_strangers_and_a_flood_drains_in_bounded_rounds(
    bob_inbox: Setup, bob: Identity
) -> None:
    """One round with a history naming 1,000 unknown peers (its 150 KiB chunks can) and
    envelopes from 10 unknown senders without keys inside: the history's lookups took the
    round's whole budget (they shared MAX_SENDER_LOOKUPS), so the 10 were 'not looked up'
    and dropped. Now the peers have a budget of their own: the 10 arrive in that round.
    Then a flood of 1,000 unpublished senders ahead of 10 more honest ones: every honest
    message arrives within ceil(1,010 / MAX_SENDER_LOOKUPS) rounds, none lost, each round
    MAX_SENDER_LOOKUPS lookups at most."""

    async def go() -> None:
        s = bob_inbox
        sent = [pb.SyncTranscript(original_recipient=os.urandom(32),
                                  original_message_id=os.urandom(16), original_timestamp_ms=5,
                                  payload=text(f"to stranger {i}"))
                for i in range(1_000)]  # fmt: skip
        for start in range(0, len(sent), 500):  # two chunks of ~60 KB
            chunk = pb.History(messages=sent[start : start + 500])
            await s.handle(sealed(bob, bob, payload(history=chunk), s.clock()))
        honest = [Identity.generate() for _ in range(10)]
        for who in honest:
            s.owner.published[who.fingerprint] = who.public
            await s.handle(sealed(who, bob, text(f"from {who.fingerprint.hex()}"), s.clock(),
                                  keys=False))  # fmt: skip
        assert s.reasons() == [] and s.inbox.report.deferred == 0
        assert len(s.owner.lookups) == MAX_PEER_LOOKUPS + 10
        assert s.cache.message_count() == 1_000 + 10

        flood = [Identity.generate() for _ in range(1_000)]
        late = [Identity.generate() for _ in range(10)]
        s.next_round()
        for who in flood:
            await s.handle(sealed(who, bob, text("flood"), s.clock(), keys=False))
        for who in late:
            s.owner.published[who.fingerprint] = who.public
            await s.handle(sealed(who, bob, text("late"), s.clock(), keys=False))
        rounds, bound = 1, -(-(len(flood) + len(late)) // MAX_SENDER_LOOKUPS)
        while s.cache.deferred_count(bob.fingerprint):
            before = len(s.owner.lookups)
            await s.next_round().retry_deferred()
            rounds += 1
            assert len(s.owner.lookups) - before <= MAX_SENDER_LOOKUPS
        assert rounds <= bound
        assert sum(m.body == "late" for m in s.cache.messages()) == len(late)

    asyncio.run(go())


def test_deferred_blobs_are_bounded_held_here_and_expire(
    bob_inbox: Setup, alice: Identity, bob: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Who fills `deferred_blobs`: anyone who can seal to bob, naming a new unpublished
    sender in each envelope (the sender is what is not authenticated yet), through the
    replicas (their quota bounds it) or as a storage node making envelopes up (nothing
    bounds it). The table grew without limit, each blob stayed on the replicas holding the
    mailbox's quota until its turn (10,000 flood blobs: a full mailbox refusing bob's
    contacts for 157 rounds), and a blob whose turn never came was never dropped. Now a
    deferred blob is acknowledged at once (held: the cache has it), what waits is bounded
    in all (beyond it a blob is dropped, as before deferring), and the daily prune drops
    what waited past the replay window. A contact's message is never deferred."""
    monkeypatch.setattr(inbox, "DEFERRED_MAX_BLOBS", 20)

    async def go() -> None:
        s = bob_inbox
        s.cache.pin(Contact(alice.fingerprint, alice.public, "alice", False, s.clock(),
                            alice.fingerprint))  # fmt: skip
        stranger = Identity.generate()
        for _ in range(30):  # every one a new unpublished "sender": a made-up fingerprint
            blob = sealed(Identity.generate(), bob, text("flood"), s.clock(), keys=False)
            await s.handle(blob, look_up=False)
        await s.handle(sealed(alice, bob, text("from a contact"), s.clock(), keys=False),
                       look_up=False)  # fmt: skip
        await s.handle(sealed(stranger, bob, text("first contact"), s.clock()), look_up=False)
        report = s.inbox.report
        assert report.deferred == 20 and s.cache.deferred_count(bob.fingerprint) == 20
        assert len(report.rejected) == 10 and all("at their limit" in r for r in s.reasons())
        assert len(report.held) == 30 + 2  # every blob acknowledged: none holds the quota
        assert sorted(m.body for m in s.cache.messages()) == ["first contact",
                                                              "from a contact"]  # fmt: skip
        s.next_round()  # the bound counts what earlier rounds left
        await s.handle(sealed(Identity.generate(), bob, text("more"), s.clock(), keys=False),
                       look_up=False)  # fmt: skip
        assert len(s.reasons()) == 1 and s.cache.deferred_count(bob.fingerprint) == 20

        waiting = [blob_id for blob_id, _ in s.cache.deferred_blobs(bob.fingerprint, 100)]
        s.cache.prune(envelopes_before_ms=s.clock() - 1, deleted_blobs_before_ms=0)
        assert s.cache.deferred_count(bob.fingerprint) == 20  # deferred at the window's edge
        s.cache.prune(envelopes_before_ms=s.clock() + 1, deleted_blobs_before_ms=0)
        assert s.cache.deferred_count(bob.fingerprint) == 0
        assert all(s.cache.blob_outcome(b) == DEFERRED_EXPIRED for b in waiting)
        await s.next_round().retry_deferred()
        assert s.owner.lookups == [] and s.inbox.report.held == []

    asyncio.run(go())


def test_one_hostile_storage_node_fills_only_its_share_and_takes_only_its_turn(
    bob_inbox: Setup, bob: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage node can make envelopes up, each naming a new sender, and return them in
    every fetch: they were deferred (and acknowledged) up to the bound of all deferred
    blobs, so one node filled it each round (an honest stranger's key-less message was then
    dropped) and, first in first out, its senders took every round's lookups. Now a blob one
    node alone returned is deferred within that node's share, beyond it left on the nodes
    (not recorded, not acknowledged: a replica that holds it returns it again); the other
    nodes' blobs have the rest of the bound; and each round's lookups are taken
    from each source in turn. Fails without the shares (checked: the honest messages are
    dropped at the bound and wait behind the hostile node's senders)."""
    monkeypatch.setattr(inbox, "DEFERRED_MAX_BLOBS", 6)
    monkeypatch.setattr(inbox, "DEFERRED_NODE_BLOBS", 4)
    monkeypatch.setattr(inbox, "MAX_SENDER_LOOKUPS", 2)
    hostile, honest, other = os.urandom(32), os.urandom(32), os.urandom(32)

    async def go() -> None:
        s = bob_inbox
        fakes = [sealed(Identity.generate(), bob, text("made up"), s.clock(), keys=False)
                 for _ in range(7)]  # fmt: skip
        for blob in fakes:
            blob_id = hashlib.sha256(blob).digest()
            await s.inbox.handle_blob(blob_id, blob, look_up=False, returned_by={hostile})
        assert s.inbox.report.deferred == 4 and s.inbox.report.left == 3
        left = [hashlib.sha256(b).digest() for b in fakes[4:]]
        assert all(s.cache.blob_outcome(b) is None for b in left)  # not recorded
        assert not set(left) & set(s.inbox.report.held)  # nor acknowledged: on the nodes
        strangers = [Identity.generate() for _ in range(2)]
        s.owner.published |= {x.fingerprint: x.public for x in strangers}
        for stranger, nodes in zip(strangers, [{honest, other}, {honest}], strict=True):
            blob = sealed(stranger, bob, text("hello, keys not inside"), s.clock(), keys=False)
            await s.inbox.handle_blob(hashlib.sha256(blob).digest(), blob, look_up=False,
                                      returned_by=nodes)  # fmt: skip
        assert s.inbox.report.deferred == 6 and s.reasons() == []  # within the bound
        await s.inbox.retry_deferred()  # 2 lookups: one per source, not the 2 oldest fakes
        assert len(s.owner.lookups) == 2 and strangers[0].fingerprint in s.owner.lookups
        await s.next_round().retry_deferred()
        bodies = [m.body for m in s.cache.messages()]
        assert bodies == ["hello, keys not inside"] * 2  # both strangers' messages arrived

    asyncio.run(go())


def test_colluding_storage_nodes_hold_their_fair_share_not_the_whole_bound(
    bob_inbox: Setup, bob: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three hostile nodes, each within its own share, made envelopes up until together
    they held the whole bound of the deferred blobs: then an honest stranger's key-less
    message, returned by two nodes, was dropped (`at their limit`), and an honest node's
    own left on the nodes. Now when full a newcomer evicts the oldest blob of the source
    holding the most, if it holds two more (`deferral`): both honest messages are
    deferred, looked up and arrive, and each hostile node keeps its fair share. Fails
    without it (checked: the stranger's message dropped at the limit)."""
    monkeypatch.setattr(inbox, "DEFERRED_MAX_BLOBS", 6)
    monkeypatch.setattr(inbox, "DEFERRED_NODE_BLOBS", 2)
    hostile = [os.urandom(32) for _ in range(3)]
    honest, other = os.urandom(32), os.urandom(32)

    async def go() -> None:
        s = bob_inbox
        for node in hostile:
            for _ in range(3):  # the third is past its share: left on the nodes
                blob = sealed(Identity.generate(), bob, text("made up"), s.clock(), keys=False)
                await s.inbox.handle_blob(hashlib.sha256(blob).digest(), blob, look_up=False,
                                          returned_by={node})  # fmt: skip
        assert s.inbox.report.deferred == 6 and s.cache.deferred_count(bob.fingerprint) == 6
        strangers = [Identity.generate() for _ in range(2)]
        s.owner.published |= {x.fingerprint: x.public for x in strangers}
        for stranger, nodes in zip(strangers, [{honest}, {honest, other}], strict=True):
            blob = sealed(stranger, bob, text("hello, keys not inside"), s.clock(), keys=False)
            await s.inbox.handle_blob(hashlib.sha256(blob).digest(), blob, look_up=False,
                                      returned_by=nodes)  # fmt: skip
        assert not [r for r in s.reasons() if "at their limit" in r]
        assert s.inbox.report.deferred == 8 and s.cache.deferred_count(bob.fingerprint) == 6
        evicted = [r for r in s.reasons() if "evicted" in r]
        assert len(evicted) == 2  # one each from two of the fullest hostile nodes
        for _ in range(3):
            await s.next_round().retry_deferred()
        bodies = [m.body for m in s.cache.messages()]
        assert bodies == ["hello, keys not inside"] * 2  # both honest messages arrived

    asyncio.run(go())


def test_hostile_nodes_returning_the_same_made_up_blobs_hold_only_their_shares(
    bob_inbox: Setup, bob: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two hostile replicas return the same made-up envelopes, each naming a new sender:
    counted as "several nodes", one source with the honest blobs several nodes returned,
    they filled the whole bound, and then an honest stranger's key-less message, which
    the hostile nodes returned too beside three honest ones, was dropped (`at their
    limit`). Now a blob counts against the node holding the least among those that
    returned it: the made-up ones fill the two hostile shares and no more (the rest are
    left on the nodes that made them up), and the honest messages are counted against
    the honest nodes, deferred, looked up and arrive. Fails without it (checked: the
    flood took the bound and the honest messages were dropped at the limit)."""
    monkeypatch.setattr(inbox, "DEFERRED_MAX_BLOBS", 10)
    monkeypatch.setattr(inbox, "DEFERRED_NODE_BLOBS", 2)
    hostile = {os.urandom(32), os.urandom(32)}
    honest = {os.urandom(32) for _ in range(3)}

    async def go() -> None:
        s = bob_inbox
        for _ in range(12):
            blob = sealed(Identity.generate(), bob, text("made up"), s.clock(), keys=False)
            await s.inbox.handle_blob(hashlib.sha256(blob).digest(), blob, look_up=False,
                                      returned_by=hostile)  # fmt: skip
        assert s.cache.deferred_count(bob.fingerprint) == 4  # 2 shares of 2
        assert s.inbox.report.left == 8 and s.reasons() == []  # left on their makers
        strangers = [Identity.generate() for _ in range(3)]
        s.owner.published |= {x.fingerprint: x.public for x in strangers}
        for stranger in strangers:
            blob = sealed(stranger, bob, text("hello, keys not inside"), s.clock(), keys=False)
            await s.inbox.handle_blob(hashlib.sha256(blob).digest(), blob, look_up=False,
                                      returned_by=hostile | honest)  # fmt: skip
        assert s.cache.deferred_count(bob.fingerprint) == 7 and s.reasons() == []
        for _ in range(4):
            await s.next_round().retry_deferred()
        bodies = [m.body for m in s.cache.messages()]
        assert bodies == ["hello, keys not inside"] * 3  # every honest message arrived

    asyncio.run(go())


def test_a_flood_needing_lookups_never_delays_a_contact_s_message(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """A stranger fills bob's mailbox with envelopes from unpublished senders without keys
    inside, ahead of alice's text. A round (`Peer._read_mailbox`) handles the new blobs
    without lookups, then the deferred ones: alice's message is told before the first
    lookup (it waited behind 64 of them, a DHT query each: seconds on a local testnet,
    a minute or more over the internet), and the round makes 64 lookups at most."""

    async def go() -> None:
        s = bob_inbox
        s.cache.pin(Contact(alice.fingerprint, alice.public, "alice", False, s.clock(),
                            alice.fingerprint))  # fmt: skip
        lookups_when_told: list[int] = []
        s.inbox.on_message = lambda msg: lookups_when_told.append(len(s.owner.lookups))
        flood = [sealed(Identity.generate(), bob, text("flood"), s.clock(), keys=False)
                 for _ in range(2 * MAX_SENDER_LOOKUPS)]  # fmt: skip
        for blob in [*flood, sealed(alice, bob, text("hi"), s.clock(), keys=False)]:
            await s.handle(blob, look_up=False)
        assert lookups_when_told == [0] and s.owner.lookups == []
        assert s.inbox.report.deferred == len(flood)
        assert await s.inbox.retry_deferred() == MAX_SENDER_LOOKUPS  # dropped: unpublished
        assert len(s.owner.lookups) == MAX_SENDER_LOOKUPS
        assert s.cache.deferred_count(bob.fingerprint) == MAX_SENDER_LOOKUPS  # next round's

    asyncio.run(go())


def test_a_text_from_the_own_former_key_is_refused_not_a_stranger_s(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """After `dna identity rotate`, whoever holds the old key (a stolen device, a leaked
    backup) could write to the new mailbox: the old keys are published (the rotation
    statement), so the text was shown as a new stranger's, pinned and answered with a
    receipt. Now refused by name, without a lookup, with or without keys inside."""

    async def go() -> None:
        s = bob_inbox
        s.owner.former[alice.fingerprint] = alice.public  # bob's keys before the rotation
        s.owner.published[alice.fingerprint] = alice.public
        for keys in (True, False):
            await s.handle(sealed(alice, bob, text("it's me"), s.clock(), keys=keys))
        card = pb.History(contacts=[pb.ContactCard(keys=alice.public.to_proto())])
        await s.handle(sealed(alice, bob, payload(history=card), s.clock()))
        assert len(s.reasons()) == 3 and all("own former key" in r for r in s.reasons())
        assert s.cache.message_count() == 0 and s.cache.contacts() == []
        assert s.owner.lookups == [] and s.inbox.report.receipts_due == []

    asyncio.run(go())


def test_the_envelope_is_checked_against_the_given_clock(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        s = bob_inbox
        blob = sealed(alice, bob, text("old"), s.clock())
        s.clock.now += 32 * DAY_MS  # past the 31 days an envelope is accepted
        await s.handle(blob)
        assert len(s.reasons()) == 1 and s.cache.message_count() == 0

    asyncio.run(go())


def test_tampered_and_random_blobs_are_dropped_and_store_nothing(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """Whatever a storage node hands over, the inbox drops it with a reason and stores
    nothing: every sampled single-byte tamper of a real envelope, and random bytes."""

    async def go() -> None:
        s = bob_inbox
        good = sealed(alice, bob, text("hi"), s.clock(), keys=False)  # keys unpublished
        blobs = [good, *single_byte_tampers(good, limit=150, seed=5)]
        blobs += [os.urandom(n) for n in (0, 1, 59, 4_700, 70_000)]
        for blob in blobs:
            await s.inbox.handle_blob(hashlib.sha256(blob).digest(), blob)
        assert len(s.reasons()) == len(blobs) and all(s.reasons())
        assert s.reasons()[0] == "sealed content: unknown sender, cannot verify"
        assert s.inbox.report.new_messages == [] and s.cache.message_count() == 0
        assert s.cache.contacts() == [] and s.inbox.report.receipts_due == []

    asyncio.run(go())


REFUSED = {  # payload -> (from the own identity?, the reason)
    "text from an own device": (text("x"), True, "payload: text is not accepted from own device"),
    "receipt from an own device": (
        payload(receipt=pb.DeliveryReceipt(message_ids=[b"m" * 16])), True,
        "payload: receipt is not accepted from own device",
    ),
    "read state from a contact": (
        payload(read=pb.ReadMarker(conversation_id=b"c" * 32, read_up_to_ms=1)), False,
        "payload: read is not accepted from another identity",
    ),
    "a device from a contact": (
        payload(device=pb.DeviceHello(device_id=b"d" * 16, device_name="evil")), False,
        "payload: device is not accepted from another identity",
    ),
    "an ack from a contact": (
        payload(ack=pb.DeviceAck(device_id=b"d" * 16, blob_ids=[b"b" * 32])), False,
        "payload: ack is not accepted from another identity",
    ),
    "a history from a contact": (
        payload(history=pb.History(devices=[pb.DeviceHello(device_id=b"d" * 16)])), False,
        "payload: history is not accepted from another identity",
    ),
    "a link in the inbox": (
        payload(link=pb.DeviceLink(device_id=b"d" * 16)), True,
        "payload: link is not accepted from own device",
    ),
    "nothing": (b"", False, "payload: no kind this version knows (none set, or one a newer"
                " dna added)"),
    "a kind a newer dna added": (bytes([0x52, 2, 8, 1]), True, "payload: no kind this version"
                                 " knows (none set, or one a newer dna added)"),
}  # fmt: skip


def test_a_newer_device_s_hello_is_taken_for_what_this_version_knows(
    bob_inbox: Setup, bob: Identity
) -> None:
    """A device running a newer dna announces itself with a field this version does not
    know (as `offered_until_ms` was to the dna before it): the hello was refused whole, so
    the newer device was never a device here and deletes did not wait for it. Now the
    hello is taken (its signature covers the exact bytes, the new field included), and
    the field is ignored."""

    async def go() -> None:
        s = bob_inbox
        hello = pb.DeviceHello(device_id=b"n" * 16, device_name="newer", wants_history=True)
        fields = hello.SerializeToString() + bytes([0xF8, 0x07, 1])  # + field 127 = 1
        newer = bytes([6 << 3 | 2, len(fields)]) + fields  # Payload.device (field 6)
        await s.handle(sealed(bob, bob, newer, s.clock()))
        assert s.reasons() == [] and s.cache.devices()[b"n" * 16] == "newer"
        assert s.inbox.report.history_wanted

    asyncio.run(go())


@pytest.mark.parametrize("case", list(REFUSED))
def test_who_may_send_what(case: str, bob_inbox: Setup, alice: Identity, bob: Identity) -> None:
    raw, own, reason = REFUSED[case]

    async def go() -> None:
        s = bob_inbox
        devices = s.cache.devices()
        await s.handle(sealed(bob if own else alice, bob, raw, s.clock()))
        assert s.reasons() == [reason]
        assert s.cache.message_count() == 0 and s.cache.contacts() == []
        assert s.cache.devices() == devices and s.inbox.report.receipts_due == []

    asyncio.run(go())


def test_a_device_that_lost_its_cache_asks_for_the_history(bob_inbox: Setup, bob: Identity) -> None:
    async def go() -> None:
        s = bob_inbox
        own = s.owner.device.device_id  # its own announcement comes back: no history due
        hello = pb.DeviceHello(device_id=own, device_name="this one", wants_history=True)
        await s.handle(sealed(bob, bob, payload(device=hello), s.clock()))
        assert not s.inbox.report.history_wanted
        hello = pb.DeviceHello(device_id=b"l" * 16, device_name="laptop", wants_history=True)
        await s.handle(sealed(bob, bob, payload(device=hello), s.clock()))
        assert s.inbox.report.history_wanted and s.reasons() == []
        assert s.cache.devices()[b"l" * 16] == "laptop"

    asyncio.run(go())


def test_a_history_restores_contacts_messages_and_ends_the_recovery(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        s = bob_inbox
        s.cache.set_state(RECOVERING, b"1")
        card = pb.ContactCard(keys=alice.public.to_proto(), name="alice")
        sent = pb.SyncTranscript(original_recipient=alice.fingerprint,
                                 original_message_id=b"m" * 16, original_timestamp_ms=5,
                                 payload=text("from my phone"))  # fmt: skip
        phone = pb.DeviceHello(device_id=b"p" * 16, device_name="phone")
        history = pb.History(messages=[sent], contacts=[card], devices=[phone])
        await s.handle(sealed(bob, bob, payload(history=history), s.clock()))
        assert s.reasons() == [] and s.cache.get_state(RECOVERING) is None
        pinned = s.cache.contact_named("alice")
        assert pinned is not None and pinned.keys == alice.public
        (msg,) = s.cache.messages()
        assert (msg.body, msg.outgoing, msg.sender) == ("from my phone", True, bob.fingerprint)
        assert s.owner.lookups == []  # the card carried the keys

    asyncio.run(go())


def test_a_card_verifies_on_every_device_and_never_un_verifies(
    bob_inbox: Setup, alice: Identity, carol: Identity, bob: Identity
) -> None:
    """`contacts verify --confirm` on another device arrives as a card saying verified: it
    verifies the pinned keys here (or pins them verified); a card that does not say so (an
    older history, arriving late) leaves a verified contact verified."""

    async def go() -> None:
        s = bob_inbox
        s.cache.pin(Contact(alice.fingerprint, alice.public, "alice", False, 1, alice.fingerprint))

        async def cards(*items: tuple[Identity, str, bool]) -> None:
            history = pb.History(
                contacts=[
                    pb.ContactCard(keys=who.public.to_proto(), name=name, verified=v)
                    for who, name, v in items
                ]
            )
            await s.handle(sealed(bob, bob, payload(history=history), s.clock()))

        await cards((alice, "alice", True), (carol, "carol", True))
        await cards((alice, "alice", False), (carol, "carol", False))  # late, older
        assert s.reasons() == []
        verified = sorted((c.name or "", c.verified) for c in s.cache.contacts())
        assert verified == [("alice", True), ("carol", True)]

    asyncio.run(go())


def test_a_history_naming_many_unknown_peers_costs_a_bounded_number_of_lookups(
    bob_inbox: Setup, bob: Identity
) -> None:
    """Every transcript's peer without a card was looked up, one DHT query each, in
    turn: a history chunk naming 1,000 strangers was 1,000 queries (34 ms each on a local
    testnet). Now the round's MAX_SENDER_LOOKUPS, and every message is still kept."""

    async def go() -> None:
        s = bob_inbox
        sent = [pb.SyncTranscript(original_recipient=os.urandom(32),
                                  original_message_id=os.urandom(16), original_timestamp_ms=5,
                                  payload=text(f"to stranger {i}"))
                for i in range(3 * MAX_SENDER_LOOKUPS)]  # fmt: skip
        await s.handle(sealed(bob, bob, payload(history=pb.History(messages=sent)), s.clock()))
        assert s.reasons() == [] and s.cache.message_count() == len(sent)
        assert len(s.owner.lookups) == MAX_SENDER_LOOKUPS

    asyncio.run(go())


def test_the_own_rotation_is_reported_not_adopted(bob_inbox: Setup, bob: Identity) -> None:
    async def go() -> None:
        s = bob_inbox
        new = Identity.generate()
        statement = keyserver.rotation_record(bob, new)
        rotation = pb.IdentityRotation(statement=statement, new_seeds=new.seeds())
        await s.handle(sealed(bob, bob, payload(rotation=rotation), s.clock()))
        moved = s.inbox.report.rotated_to
        assert moved is not None and moved.fingerprint == new.fingerprint
        assert s.owner.identity is bob and s.reasons() == []

    asyncio.run(go())


def test_a_contact_s_rotation_moves_the_pin(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        s = bob_inbox
        s.cache.pin(Contact(alice.fingerprint, alice.public, "alice", True, 1, alice.fingerprint))
        new = Identity.generate()
        rotation = pb.IdentityRotation(statement=keyserver.rotation_record(alice, new))
        await s.handle(sealed(alice, bob, payload(rotation=rotation), s.clock()))
        moved = s.cache.contact_named("alice")
        assert moved is not None and moved.fingerprint == new.fingerprint

    asyncio.run(go())


def test_a_key_its_contact_rotated_away_from_writes_no_more(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """Once the rotation is seen, the old key (a stolen device, a leaked backup) is refused
    for messages, whatever time it signs; the new key is accepted, and a receipt from the
    old key still marks delivered what was sent to that key (the old mailbox's drain)."""

    async def go() -> None:
        s = bob_inbox
        s.cache.pin(Contact(alice.fingerprint, alice.public, "alice", True, 1, alice.fingerprint))
        new = Identity.generate()
        rotation = pb.IdentityRotation(statement=keyserver.rotation_record(alice, new))
        before = sealed(alice, bob, text("sent before the rotation"), s.clock.now - 1_000)
        await s.handle(sealed(alice, bob, payload(rotation=rotation), s.clock()))
        await s.handle(before)  # late: the rotation was seen first
        await s.handle(sealed(alice, bob, text("from the stolen phone"), s.clock()))
        assert (
            s.reasons()
            == [
                f"sender: a key its owner rotated away from (now {new.fingerprint.hex()[:16]}):"
                " refused"
            ]
            * 2
        )
        assert s.cache.message_count() == 0 and s.inbox.report.receipts_due == []
        await s.handle(sealed(new, bob, text("from the new keys"), s.clock()))
        assert [m.body for m in s.cache.messages()] == ["from the new keys"]
        receipt = payload(receipt=pb.DeliveryReceipt(message_ids=[b"m" * 16]))
        await s.handle(sealed(alice, bob, receipt, s.clock()))
        assert len(s.reasons()) == 2

    asyncio.run(go())


def test_receipts_are_due_per_sender_in_envelope_sized_batches(
    bob_inbox: Setup, alice: Identity, carol: Identity
) -> None:
    s = bob_inbox
    for i in range(RECEIPT_BATCH_IDS + 1):
        s.inbox.owe_receipt(alice.public, i.to_bytes(16, "big"))
    s.inbox.owe_receipt(carol.public, b"c" * 16)
    due = [(r.to.fingerprint, len(r.message_ids)) for r in s.inbox.report.receipts_due]
    assert due == [
        (alice.fingerprint, RECEIPT_BATCH_IDS),
        (alice.fingerprint, 1),
        (carol.fingerprint, 1),
    ]
    ids = [i for r in s.inbox.report.receipts_due for i in r.message_ids]
    assert len(set(ids)) == RECEIPT_BATCH_IDS + 2  # each ID once


@dataclass
class Told:
    """An ``on_message`` hook noting each message, and whether another connection to the
    cache file (what a restarted device would read) held it yet."""

    committed_view: Cache
    messages: list[bytes] = field(default_factory=list)
    durable_when_told: list[int] = field(default_factory=list)
    fail_with: BaseException | None = None

    def __call__(self, msg: Any) -> None:
        self.messages.append(msg.message_id)
        self.durable_when_told.append(self.committed_view.message_count())
        if self.fail_with is not None:
            raise self.fail_with


@pytest.fixture
def told(tmp_path: Path, bob_inbox: Setup) -> Told:
    key = bob_inbox.cache_key
    hook = Told(Cache.open(tmp_path / "cache.db", key))
    bob_inbox.inbox.on_message = hook
    return hook


def test_on_message_hears_a_new_message_before_its_commit(
    bob_inbox: Setup, told: Told, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        s = bob_inbox
        await s.handle(sealed(alice, bob, text("hi"), s.clock()))
        assert told.messages == [s.inbox.report.new_messages[0].message_id]
        assert told.durable_when_told == [0]  # not yet committed when told
        assert told.committed_view.message_count() == 1  # committed once handled

    asyncio.run(go())


def test_on_message_hears_nothing_of_replays_receipts_and_rejected_blobs(
    bob_inbox: Setup, told: Told, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        s = bob_inbox
        blob = sealed(alice, bob, text("once"), s.clock())
        await s.handle(blob)
        await s.handle(blob)  # the same blob again (another replica's copy)
        await s.inbox.handle_blob(b"\x01" * 32, blob)  # the same envelope, another blob ID
        receipt = payload(receipt=pb.DeliveryReceipt(message_ids=[os.urandom(16)]))
        await s.handle(sealed(alice, bob, receipt, s.clock()))
        await s.handle(os.urandom(500))
        assert len(told.messages) == 1 and len(s.reasons()) == 2

    asyncio.run(go())


def test_a_failing_on_message_does_not_undo_the_message(
    bob_inbox: Setup, told: Told, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        s = bob_inbox
        told.fail_with = RuntimeError("the user interface broke")
        await s.handle(sealed(alice, bob, text("kept"), s.clock()))
        assert told.committed_view.message_count() == 1
        assert [m.body for m in s.inbox.report.new_messages] == ["kept"]

    asyncio.run(go())


def test_a_message_told_but_never_committed_is_received_again(
    bob_inbox: Setup, told: Told, alice: Identity, bob: Identity
) -> None:
    """The device dies between the hook and the commit (here: the hook raises what
    unwinds the process): nothing of the blob is in the cache, so the next sync's inbox
    handles the same blob as new and tells it again. Shown twice, never lost."""

    async def go() -> None:
        s = bob_inbox
        blob = sealed(alice, bob, text("again"), s.clock())
        told.fail_with = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):
            await s.handle(blob)
        assert told.committed_view.message_count() == 0
        assert s.cache.blob_outcome(hashlib.sha256(blob).digest()) is None
        told.fail_with = None
        s.inbox = Inbox(s.cache, s.owner, clock=s.clock, on_message=told)  # the next sync
        await s.handle(blob)
        assert len(told.messages) == 2 and told.messages[0] == told.messages[1]
        assert [m.body for m in s.cache.messages()] == ["again"]

    asyncio.run(go())


def test_an_acknowledging_inbox_notes_each_blob_s_ack_with_its_commit(
    bob_inbox: Setup, alice: Identity, bob: Identity
) -> None:
    """The own mailbox's inbox notes this device's acknowledgement of each blob it holds
    (handled, refused, deferred) in the blob's own transaction: noted at the end of the
    fetched page, a kill in between left blobs recorded as handled, skipped by every later
    fetch, and never acknowledged, so never deleted (test_peer_e2e's kills found three)."""

    async def go() -> None:
        s = bob_inbox
        s.inbox = Inbox(s.cache, s.owner, clock=s.clock, acknowledge=True)
        handled = await s.handle(sealed(alice, bob, text("hi"), s.clock()))
        refused = await s.handle(sealed(alice, bob, payload(read=pb.ReadMarker()), s.clock()))
        deferred = await s.handle(sealed(Identity.generate(), bob, text("?"), s.clock(),
                                         keys=False), look_up=False)  # fmt: skip
        assert len(s.reasons()) == 1 and s.inbox.report.deferred == 1
        assert set(s.cache.deletable_blobs(s.clock())) == {handled, refused, deferred}

    asyncio.run(go())
