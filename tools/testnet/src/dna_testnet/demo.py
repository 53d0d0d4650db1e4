"""`dna-testnet demo`: the whole flow of the messenger on a real local network.

3 bootstrap and 6 storage node processes and a STUN/TURN relay start on 127.0.0.2-11.
Alice and bob create identities (keys locked with a passphrase, an encrypted cache each)
and publish them to the DHT keyserver with name claims. Bob goes offline; alice finds
bob by name (pinning his key), asks the network where he is (no fresh presence record:
offline), so she seals the message and stores it on the 5 storage nodes closest to
bob's mailbox (store-and-forward). Bob comes back, fetches, verifies, decrypts, and a
delivery receipt reaches alice. Bob links a second device with a one-time code; it
receives the history. Bob's phone goes online for direct messages: it publishes a
presence record whose candidates only alice can open. Alice asks where bob is, connects
to him directly (ICE, then a channel keyed from both identities) and sends; the phone
stores and acknowledges it, both keep it in their caches, and the phone mirrors it to
the laptop. On loopback the ICE pair runs through the relay (TURN): aioice gathers no
host candidate there, so both ends are relay-only and the relay allows its own loopback
address by allow-list. The laptop's reply is mirrored to the phone and pushed to alice,
who subscribed to her mailbox, and both devices end with the same history. Every step
prints its timing, every message the path it took.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from dna_core.crypto import Identity
from dna_core.mailbox import Subscription
from dna_peer.cache import Contact
from dna_peer.direct.link import IceConfig
from dna_peer.link import accept_link, offer_link
from dna_peer.peer import DIRECT, Peer, SentMessage, open_peer
from dna_peer.presence import Presence
from dna_peer.profile import Profile

from dna_testnet.network import Testnet
from dna_testnet.topology import TESTNET_TURN_PASSWORD, TESTNET_TURN_USER

T = TypeVar("T")
PASSPHRASE = "demo passphrase"


async def _step(title: str, work: Awaitable[T]) -> T:
    started = time.perf_counter()
    result = await work
    print(f"  {title:<64} {1000 * (time.perf_counter() - started):8.1f} ms", flush=True)
    return result


def _expect(held: bool, failure: str) -> None:
    """A step's outcome, checked: the demo is also the smoke test of the whole flow, so a
    step that did not do what it printed ends it with exit status 1."""
    if not held:
        raise SystemExit(f"demo failed: {failure}")


def _history(peer: Peer) -> list[str]:
    return [f"{'me' if m.outgoing else 'them'}: {m.body}" for m in peer.cache.messages()]


async def _new_peer(root: Path, who: str, seeds: list[tuple[str, int]]) -> Peer:
    profile = Profile(root / who)
    profile.create(Identity.generate(), PASSPHRASE)
    peer = await open_peer(profile, PASSPHRASE, seeds)
    await peer.publish(who.capitalize(), who)
    return peer


def _ice(net: Testnet) -> IceConfig:
    """The testnet relay as TURN server, relay-only: on loopback aioice gathers no host
    candidate, so the one pair there is relay to relay through the same server."""
    return IceConfig(turn=net.relays[0].udp, turn_username=TESTNET_TURN_USER,
                     turn_password=TESTNET_TURN_PASSWORD, relay_only=True)  # fmt: skip


def _where(presence: Presence | None) -> str:
    if presence is None:
        return "bob is OFFLINE (no fresh presence record)"
    if presence.reach is None:
        return "bob is online, but his record is not sealed to alice"
    kinds = [sdp.split()[7] for sdp in presence.reach.candidates]  # "... typ relay ..."
    return f"bob is ONLINE; candidates sealed to alice: {', '.join(kinds)}"


def _path(sender: Peer, contact: Contact, sent: SentMessage) -> str:
    if sent.path != DIRECT:
        return f"path: stored (store-and-forward) on {sent.stored_on} of 5 replicas"
    route = sender.direct.route_to(contact.fingerprint) if sender.direct else None
    how = "via the TURN relay" if route is not None and "relay" in route else "peer to peer"
    return f"path: direct {how} (ICE pair {route}), acknowledged by bob's phone"


async def _flow(net: Testnet, root: Path) -> None:
    seeds, ice = net.seeds, _ice(net)
    alice = await _step("alice creates an identity, publishes it, claims 'alice'",
                        _new_peer(root, "alice", seeds))  # fmt: skip
    bob = await _step("bob does the same and claims 'bob'", _new_peer(root, "bob", seeds))
    print(f"    alice {alice.fingerprint.hex()[:24]}…  bob {bob.fingerprint.hex()[:24]}…")
    await _step("bob goes offline", bob.close())
    await alice.go_direct(ice, listen=False)  # alice sends directly whenever bob is there

    contact = await _step("alice looks up 'bob' in the DHT keyserver, pins his key",
                          alice.add_contact("bob"))  # fmt: skip
    print(f"    safety number: {alice.safety_number(contact)}")
    where = await _step("alice asks the network: WHERE IS bob? (presence)",
                        alice.presence_of(contact))  # fmt: skip
    print(f"    {_where(where)}")
    sent = await _step("alice sends (sealed, PoW, stored on bob's replicas)",
                       alice.send(contact, "Hi Bob! Sent while you were away."))  # fmt: skip
    print(f"    {_path(alice, contact, sent)} (done at a quorum of 3)")

    bob = await _step("bob comes back online", open_peer(Profile(root / "bob"), PASSPHRASE, seeds))
    report = await _step("bob syncs: fetch, verify, decrypt, receipt", bob.sync())
    for msg in report.new_messages:
        print(f"    bob got: {msg.body!r}")
    _expect([m.message_id for m in report.new_messages] == [sent.message_id],
            "bob did not get alice's stored message")  # fmt: skip
    await _step("bob adds alice by name (matches the key he was sent from)",
                bob.add_contact("alice"))  # fmt: skip
    report = await _step("alice syncs: the delivery receipt arrives", alice.sync())
    print(f"    delivered: {alice.cache.messages()[-1].delivered}")
    _expect(alice.cache.messages()[-1].delivered, "alice got no delivery receipt")

    offer = await _step("bob's phone offers a link to a new device", offer_link(bob, "laptop"))
    print(f"    one-time code: {offer.code}")
    laptop = await _step("bob's laptop uses the code and syncs the history",
                         _linked(root, offer.code, seeds))  # fmt: skip
    await _direct(alice, bob, laptop, contact, ice)

    pushed = await _step("alice subscribes to her mailbox on its replicas (push)",
                         alice.subscribe())  # fmt: skip
    reply = laptop.find_contact("alice")
    sent = await _step("bob replies from the laptop (not online for direct: stored)",
                       laptop.send(reply, "Got it on both devices."))  # fmt: skip
    print(f"    {_path(laptop, reply, sent)}")
    await _step("the phone syncs the laptop's transcript", bob.sync())
    if pushed is not None:
        await _step("alice gets the reply, pushed to her (no fetch)", _until_pushed(alice, pushed))
        await pushed.close()
    else:  # no replica took the subscription: poll
        await _step("alice gets the reply", alice.sync())
    print(f"    phone:  {_history(bob)}")
    print(f"    laptop: {_history(laptop)}")
    same = _history(bob) == _history(laptop)
    print(f"    both devices hold the same history: {same}")
    for peer in (alice, bob, laptop):
        await peer.close()
    _expect(same, "the devices did not converge")


async def _direct(alice: Peer, bob: Peer, laptop: Peer, contact: Contact, ice: IceConfig) -> None:
    """Scenario 1 of the design: both online, the message goes peer to peer."""
    await _step("bob's phone goes online: presence record, candidates sealed to contacts",
                bob.go_direct(ice, listen=True))  # fmt: skip
    where = await _step("alice asks the network: WHERE IS bob? (presence)",
                        alice.presence_of(contact))  # fmt: skip
    print(f"    {_where(where)}")
    for body, title in (
        ("Welcome to the laptop!", "alice connects to bob directly (ICE, handshake) and sends"),
        ("This one took the open channel.", "alice sends again over the open direct channel"),
    ):
        sent = await _step(title, alice.send(contact, body))
        print(f"    {_path(alice, contact, sent)}")
        _expect(sent.path == DIRECT, "the direct path did not come up")
        held = [m.body for m in bob.cache.messages() if m.message_id == sent.message_id]
        [mine] = [m for m in alice.cache.messages() if m.message_id == sent.message_id]
        print(
            f"    in bob's phone's cache: {held}; in alice's: {[mine.body]},"
            f" delivered: {mine.delivered}"
        )
        _expect(held == [body] and mine.delivered, "a direct message was not acknowledged")
    await _step("bob's phone mirrors them for his other devices", bob.mirrored())
    report = await _step("bob's laptop syncs: the mirrored messages arrive", laptop.sync())
    for msg in report.new_messages:
        print(f"    laptop got: {msg.body!r}")
    mirrored = [m.body for m in report.new_messages]
    _expect(sorted(mirrored) == ["This one took the open channel.", "Welcome to the laptop!"],
            "the laptop did not get the mirrored messages")  # fmt: skip


async def _until_pushed(peer: Peer, pushed: Subscription) -> None:
    for _ in range(20):
        if (await peer.receive_pushed(pushed, 0.5)).new_messages:
            return
    raise SystemExit("demo failed: the reply was not pushed within 10 s")


async def _linked(root: Path, code: str, seeds: list[tuple[str, int]]) -> Peer:
    laptop = await accept_link(Profile(root / "bob-laptop"), code, PASSPHRASE, seeds)
    await laptop.sync()
    return laptop


def run_demo(root: Path | None = None) -> None:
    print("DNA Messenger v2 demo: post-quantum messaging on a local decentralized network\n")
    with tempfile.TemporaryDirectory(prefix="dna-testnet-") as tmp:
        base = root or Path(tmp)
        net = Testnet(base / "network", stun=1)
        started = time.perf_counter()
        try:
            net.up()
            print(
                f"  {'3 bootstrap, 6 storage nodes, a STUN/TURN relay up on 127.0.0.2-11':<64}"
                f" {1000 * (time.perf_counter() - started):8.1f} ms"
            )
            asyncio.run(_flow(net, base / "people"))
        finally:
            net.down()
    print("\ndemo complete")
