"""The direct channel's state machine alone (sans-I/O): handshake, pinning, records,
acknowledgements, replays and garbage, with datagrams carried by hand."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest
from dna_core.crypto import Identity, PublicKeySet
from dna_peer.direct.channel import (
    LOGGED_REFUSALS,
    Channel,
    Closed,
    Delivered,
    Established,
    Received,
    Refused,
    Step,
)
from dna_peer.direct.frames import (
    FRAGMENT_BYTES,
    MAX_FRAGMENTS,
    MAX_PENDING,
    RECORD,
    Reassembler,
    fragment,
)
from dna_peer.direct.link import REFUSED_KEPT, DirectLink, IceConfig, NotTaken
from dna_peer.direct.service import DIRECT_BURST, DIRECT_RATE_PER_S, DirectService
from hypothesis import given
from hypothesis import strategies as st
from support import until_async


def pins(*keys: PublicKeySet) -> dict[bytes, PublicKeySet]:
    return {k.fingerprint: k for k in keys}


def deliver(to: Channel, datagrams: list[bytes]) -> Step:
    """Feed ``datagrams`` to ``to``; what came out, merged."""
    out = Step()
    for datagram in datagrams:
        step = to.receive(datagram)
        out.send += step.send
        out.events += step.events
    return out


def handshake(a: Identity, b: Identity) -> tuple[Channel, Channel]:
    initiator, hello = Channel.initiate(a, b.public)
    responder = Channel.respond(b, pins(a.public).get)
    welcome = deliver(responder, hello)
    assert welcome.events == [Established(a.public)]
    assert deliver(initiator, welcome.send).events == [Established(b.public)]
    return initiator, responder


def test_pinned_identities_establish_and_exchange_acknowledged_messages(
    alice: Identity, bob: Identity
) -> None:
    a, b = handshake(alice, bob)
    sent = a.seal_message(b"m" * 16, b"x" * 5000)  # several fragments
    assert len(sent) == 5
    got = deliver(b, sent)
    assert got.events == [Received(b"m" * 16, b"x" * 5000)] and got.send == []
    assert deliver(a, b.stored(b"m" * 16)).events == [Delivered(b"m" * 16)]  # stored: the ACK
    back = deliver(a, b.seal_message(b"r" * 16, b"reply"))  # the other direction
    assert back.events == [Received(b"r" * 16, b"reply")]


def test_a_hello_from_an_unpinned_key_is_refused_and_logged(
    alice: Identity, bob: Identity, carol: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    responder = Channel.respond(bob, pins(alice.public).get)
    _, hello = Channel.initiate(carol, bob.public)
    with caplog.at_level(logging.WARNING, "dna.peer.direct"):
        step = deliver(responder, hello)
    assert step.send == [] and [type(e) for e in step.events] == [Refused]
    assert "unpinned key" in caplog.text
    assert not responder.established
    _, pinned_hello = Channel.initiate(alice, bob.public)  # nothing changed: alice still gets in
    assert deliver(responder, pinned_hello).events == [Established(alice.public)]


def test_a_welcome_not_signed_by_the_pinned_key_is_refused(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    initiator, hello = Channel.initiate(alice, bob.public)
    impostor = Channel.respond(carol, pins(alice.public).get)  # carol answers for bob
    refused = deliver(impostor, hello)  # addressed to bob: carol refuses it too
    assert [type(e) for e in refused.events] == [Refused]
    real = Channel.respond(bob, pins(alice.public).get)
    welcome = deliver(real, hello).send
    forged = [d[:-1] + bytes([d[-1] ^ 1]) for d in welcome]  # the signature's last byte
    assert [type(e) for e in deliver(initiator, forged).events] == [Refused]
    assert not initiator.established
    assert deliver(initiator, welcome).events == [Established(bob.public)]


def test_a_lost_welcome_is_answered_again_with_the_same_session(
    alice: Identity, bob: Identity
) -> None:
    initiator, hello = Channel.initiate(alice, bob.public)
    responder = Channel.respond(bob, pins(alice.public).get)
    deliver(responder, hello)  # the WELCOME is lost
    again = deliver(responder, initiator.hello_datagrams())
    assert deliver(initiator, again.send).events == [Established(bob.public)]
    assert deliver(responder, initiator.seal_message(b"i" * 16, b"ok")).events[0] == Received(
        b"i" * 16, b"ok"
    )


def test_a_replayed_record_is_refused_and_logged_and_not_handed_up_twice(
    alice: Identity, bob: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = handshake(alice, bob)
    record = a.seal_message(b"m" * 16, b"once")
    assert deliver(b, record).events == [Received(b"m" * 16, b"once")]
    b.stored(b"m" * 16)  # (its ACK is lost)
    with caplog.at_level(logging.WARNING, "dna.peer.direct"):
        replay = deliver(b, record)
    assert replay.send == [] and replay.events == [Refused("direct: record 0 replayed")]
    assert "replayed" in caplog.text
    retransmitted = deliver(b, a.seal_message(b"m" * 16, b"once"))  # new counter, same ID
    assert retransmitted.events == [] and len(retransmitted.send) == 1  # only the ACK again
    assert deliver(a, retransmitted.send).events == [Delivered(b"m" * 16)]


def test_a_close_is_told_once_and_only_from_the_other_end(alice: Identity, bob: Identity) -> None:
    a, b = handshake(alice, bob)
    (close,) = a.seal_close()
    forged = close[:-1] + bytes([close[-1] ^ 1])
    assert b.receive(forged).events == [Refused("direct: record does not authenticate")]
    assert b.receive(close).events == [Closed()]
    assert b.receive(close).events == [Refused("direct: record 0 replayed")]
    _, c = handshake(alice, bob)  # another session's channel cannot be closed by it
    assert c.receive(close).events == [Refused("direct: record does not authenticate")]


def test_a_message_the_owner_could_not_store_is_never_acknowledged(
    alice: Identity, bob: Identity
) -> None:
    """The channel remembered a message ID as it handed the message up, so when the owner
    could not store it (a full disk, a contact over its rate) the sender's retransmission
    was acknowledged without being handed up: the sender counted as delivered a message
    nobody kept. Now the ID is remembered, and the ACK sent, only once the owner stored it:
    the retransmission is handed up again."""
    a, b = handshake(alice, bob)
    first = deliver(b, a.seal_message(b"m" * 16, b"keep me"))
    assert first.events == [Received(b"m" * 16, b"keep me")] and first.send == []
    again = deliver(b, a.seal_message(b"m" * 16, b"keep me"))  # not stored: retransmitted
    assert again.events == [Received(b"m" * 16, b"keep me")] and again.send == []
    assert deliver(a, b.stored(b"m" * 16)).events == [Delivered(b"m" * 16)]
    late = deliver(b, a.seal_message(b"m" * 16, b"keep me"))  # stored: ACKed, not handed up
    assert late.events == [] and deliver(a, late.send).events == [Delivered(b"m" * 16)]


def test_a_tampered_record_is_refused(alice: Identity, bob: Identity) -> None:
    a, b = handshake(alice, bob)
    (record,) = a.seal_message(b"m" * 16, b"text")
    tampered = record[:-3] + bytes([record[-3] ^ 0x40]) + record[-2:]
    step = b.receive(tampered)
    assert step.events == [Refused("direct: record does not authenticate")]
    assert b.receive(record).events == [Received(b"m" * 16, b"text")]  # the real one still


def test_records_before_the_handshake_are_refused(alice: Identity, bob: Identity) -> None:
    responder = Channel.respond(bob, pins(alice.public).get)
    step = responder.receive(fragment(RECORD, 0, b"\0" * 40)[0])
    assert [type(e) for e in step.events] == [Refused]


def test_reassembly_holds_a_bounded_number_of_unfinished_units() -> None:
    frames = Reassembler()
    for transfer in range(MAX_PENDING + 5):
        assert frames.add(fragment(RECORD, transfer, b"x" * (FRAGMENT_BYTES + 1))[0]) is None
    assert len(frames._pending) == MAX_PENDING  # the oldest were dropped


_SOMEONE = Identity(bytes(160))


@given(st.binary(max_size=2000))
def test_garbage_is_refused_or_ignored_never_raised(data: bytes) -> None:
    channel = Channel.respond(_SOMEONE, lambda fp: None)
    step = channel.receive(data)
    assert step.send == [] and all(isinstance(e, Refused) for e in step.events)


class MemoryAgent:
    """The datagram path in memory: what DirectLink uses of an aioice connection. Paired
    (`pair`), what one sends the other receives; alone, what it sends goes nowhere."""

    def __init__(self) -> None:
        self.inbound: asyncio.Queue[bytes] = asyncio.Queue()
        self.other: MemoryAgent | None = None

    async def recv(self) -> bytes:
        return await self.inbound.get()

    async def send(self, datagram: bytes) -> None:
        if self.other is not None:
            self.other.inbound.put_nowait(datagram)

    async def close(self) -> None:
        pass


def pair() -> tuple[MemoryAgent, MemoryAgent]:
    a, b = MemoryAgent(), MemoryAgent()
    a.other, b.other = b, a
    return a, b


def test_a_direct_message_the_receiver_could_not_store_is_not_counted_delivered(
    alice: Identity, bob: Identity
) -> None:
    """Bob's first try to store alice's message fails (a full disk): no ACK. Her link
    retransmits; the retransmission was ACKed without reaching bob's store (the channel
    had remembered the ID), so her send said delivered and the message was lost. Now it
    is handed up again, stored, and only then ACKed."""
    stored: list[bytes] = []
    tries = 0

    async def store_second_time(sender: PublicKeySet, message_id: bytes, payload: bytes) -> None:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise OSError(28, "No space left on device")
        stored.append(payload)

    async def never(sender: PublicKeySet, message_id: bytes, payload: bytes) -> None:
        raise AssertionError("bob sent nothing")

    async def scenario() -> None:
        to_bob, to_alice = pair()
        bobs = DirectLink.accept(to_alice, bob, pins(alice.public).get, store_second_time)  # type: ignore[arg-type]
        alices = await DirectLink.open(to_bob, alice, bob.public, never, timeout=5.0)  # type: ignore[arg-type]
        assert await alices.send(b"m" * 16, b"the envelope", timeout=5.0)
        assert stored == [b"the envelope"]
        await asyncio.gather(alices.close(), bobs.close())

    asyncio.run(scenario())


def oversized(transfer: int) -> bytes:
    """A fragment header a sender may write, with a chunk far over FRAGMENT_BYTES (one UDP
    datagram holds up to 64 KiB)."""
    return struct.pack(">BIHH", RECORD, transfer, 0, MAX_FRAGMENTS) + b"x" * 60_000


def test_a_fragment_over_the_cap_is_refused_and_nothing_of_it_is_held(
    alice: Identity, bob: Identity
) -> None:
    """Fragments were held whatever their length: 16 units of 256 fragments of 60 KB, 250
    MB, from one peer. One longer than ours is refused; the most a flood of fragments
    can make a channel hold is MAX_PENDING * MAX_FRAGMENTS * FRAGMENT_BYTES."""
    responder = Channel.respond(bob, pins(alice.public).get)
    for transfer in range(MAX_PENDING):
        step = responder.receive(oversized(transfer))
        assert [type(e) for e in step.events] == [Refused], step
        assert "over the cap" in step.events[0].reason  # type: ignore[union-attr]
    assert responder._frames._pending == {}
    for transfer in range(MAX_PENDING + 5):  # as much as a peer can make it hold
        for index in range(MAX_FRAGMENTS - 1):
            head = struct.pack(">BIHH", RECORD, transfer, index, MAX_FRAGMENTS)
            assert responder.receive(head + b"x" * FRAGMENT_BYTES).events == []
    held = sum(len(c) for parts in responder._frames._pending.values() for c in parts.values())
    assert held <= MAX_PENDING * MAX_FRAGMENTS * FRAGMENT_BYTES


def test_a_peer_sending_garbage_forever_fills_neither_the_log_nor_the_memory(
    alice: Identity, bob: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """Every refused datagram was a warning line and a reason kept by the link, without
    bound: a contact sending garbage at line rate filled the log and the memory. Now a
    channel logs its first LOGGED_REFUSALS refusals and one line more, and a link keeps the
    latest REFUSED_KEPT reasons; every datagram is still refused."""

    async def never(sender: PublicKeySet, message_id: bytes, payload: bytes) -> None:
        raise AssertionError("garbage was handed up")

    async def scenario() -> None:
        agent = MemoryAgent()
        link = DirectLink.accept(agent, bob, pins(alice.public).get, never)  # type: ignore[arg-type]
        for n in range(1000):
            agent.inbound.put_nowait(b"\xff" * 20 if n % 2 else oversized(n))
        await until_async(lambda: link.channel.refusals == 1000, "every frame refused")
        assert 0 < len(link.refused) <= REFUSED_KEPT
        await link.close()

    with caplog.at_level(logging.WARNING, logger="dna.peer.direct"):
        asyncio.run(scenario())
    refused = [r for r in caplog.records if "refused input" in r.getMessage()]
    assert len(refused) == LOGGED_REFUSALS + 1, len(refused)
    assert "further refusals on this channel are not logged" in refused[-1].getMessage()


def test_a_contact_flooding_the_direct_path_is_taken_at_the_mailbox_rate(alice: Identity) -> None:
    """The direct path has no proof of work and no quota: a contact could push messages
    into the cache as fast as the link carries them (the mailbox takes 10 a second into a
    whole mailbox). Now DIRECT_BURST, then DIRECT_RATE_PER_S a second, per contact; the
    rest are NotTaken (no ACK: the sender's message takes the mailbox), and another
    contact is not held up."""
    now = [1000.0]
    kept: list[bytes] = []

    async def deliver(sender: PublicKeySet, message_id: bytes, envelope: bytes) -> None:
        kept.append(message_id)

    service = DirectService(None, IceConfig(), deliver, clock=lambda: now[0])  # type: ignore[arg-type]

    async def flood(sender: PublicKeySet, count: int) -> int:
        refused = 0
        for n in range(count):
            try:
                await service.take(sender, n.to_bytes(16, "big"), b"envelope")
            except NotTaken:
                refused += 1
        return refused

    async def scenario() -> None:
        assert await flood(alice.public, 500) == 500 - DIRECT_BURST
        now[0] += 1.0  # a second later: DIRECT_RATE_PER_S more
        assert await flood(alice.public, 100) == 100 - DIRECT_RATE_PER_S
        assert await flood(Identity.generate().public, 10) == 0  # someone else

    asyncio.run(scenario())
    assert len(kept) == DIRECT_BURST + DIRECT_RATE_PER_S + 10
