"""`dna-testnet demo`: the whole flow of the messenger on a real local network.

3 bootstrap and 6 storage node processes start on 127.0.0.2-10. Alice and bob
create identities (keys locked with a passphrase, an encrypted cache each) and
publish them to the DHT keyserver with name claims. Bob goes offline; alice
finds bob by name (pinning his key), seals a message and stores it on the 5
storage nodes closest to bob's mailbox. Bob comes back, fetches, verifies,
decrypts, and a delivery receipt reaches alice. Bob links a second device with
a one-time code; it receives the history, both devices get alice's next
message, the laptop's reply is mirrored to the phone and pushed to alice, who
subscribed to her mailbox, and both devices end with the same history. Every step prints its timing.
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
from dna_peer.link import accept_link, offer_link
from dna_peer.peer import Peer, open_peer
from dna_peer.profile import Profile

from dna_testnet.network import Testnet

T = TypeVar("T")
PASSPHRASE = "demo passphrase"


async def _step(title: str, work: Awaitable[T]) -> T:
    started = time.perf_counter()
    result = await work
    print(f"  {title:<64} {1000 * (time.perf_counter() - started):8.1f} ms", flush=True)
    return result


def _history(peer: Peer) -> list[str]:
    return [f"{'me' if m.outgoing else 'them'}: {m.body}" for m in peer.cache.messages()]


async def _new_peer(root: Path, who: str, seeds: list[tuple[str, int]]) -> Peer:
    profile = Profile(root / who)
    profile.create(Identity.generate(), PASSPHRASE)
    peer = await open_peer(profile, PASSPHRASE, seeds)
    await peer.publish(who.capitalize(), who)
    return peer


async def _flow(net: Testnet, root: Path) -> None:
    seeds = net.seeds
    alice = await _step("alice creates an identity, publishes it, claims 'alice'",
                        _new_peer(root, "alice", seeds))  # fmt: skip
    bob = await _step("bob does the same and claims 'bob'", _new_peer(root, "bob", seeds))
    print(f"    alice {alice.fingerprint.hex()[:24]}…  bob {bob.fingerprint.hex()[:24]}…")
    await _step("bob goes offline", bob.close())

    contact = await _step("alice looks up 'bob' in the DHT keyserver, pins his key",
                          alice.add_contact("bob"))  # fmt: skip
    print(f"    safety number: {alice.safety_number(contact)}")
    sent = await _step("alice sends (sealed, PoW, stored on bob's replicas)",
                       alice.send(contact, "Hi Bob! Sent while you were away."))  # fmt: skip
    print(f"    stored on {sent.stored_on} of 5 replicas (done at a quorum of 3)")

    bob = await _step("bob comes back online", open_peer(Profile(root / "bob"), PASSPHRASE, seeds))
    report = await _step("bob syncs: fetch, verify, decrypt, receipt", bob.sync())
    for msg in report.new_messages:
        print(f"    bob got: {msg.body!r}")
    await _step("bob adds alice by name (matches the key he was sent from)",
                bob.add_contact("alice"))  # fmt: skip
    report = await _step("alice syncs: the delivery receipt arrives", alice.sync())
    print(f"    delivered: {alice.cache.messages()[-1].delivered}")

    offer = await _step("bob's phone offers a link to a new device", offer_link(bob, "laptop"))
    print(f"    one-time code: {offer.code}")
    laptop = await _step("bob's laptop uses the code and syncs the history",
                         _linked(root, offer.code, seeds))  # fmt: skip
    await _step("alice sends another message", alice.send(contact, "Welcome to the laptop!"))
    await _step("bob's laptop receives it", laptop.sync())
    await _step("bob's phone receives it", bob.sync())
    pushed = await _step("alice subscribes to her mailbox on its replicas (push)",
                         alice.subscribe())  # fmt: skip
    reply = laptop.find_contact("alice")
    await _step("bob replies from the laptop", laptop.send(reply, "Got it on both devices."))
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
    if not same:
        raise SystemExit("demo failed: the devices did not converge")


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
        net = Testnet(base / "network")
        started = time.perf_counter()
        try:
            net.up()
            print(
                f"  {'3 bootstrap + 6 storage node processes up on 127.0.0.2-10':<64}"
                f" {1000 * (time.perf_counter() - started):8.1f} ms"
            )
            asyncio.run(_flow(net, base / "people"))
        finally:
            net.down()
    print("\ndemo complete")
