"""Every process of a testnet SIGKILLed while messages are in flight and queued for an
offline recipient, then started again from its data directory (same keys, same ports):
nothing a sender saw acknowledged is lost or duplicated, the senders' peers (alive across
the outage) send again, and the recipient's `dna sync` and a subscription work."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from cluster import free_ips
from dna_core.errors import DnaError
from dna_peer.peer import Peer
from dna_testnet.network import Testnet
from peers import People

pytestmark = [pytest.mark.process]


async def send_until(
    sender: Peer, to: Peer, prefix: str, acked: list[str], tried: list[str], stop: asyncio.Event
) -> None:
    """Send numbered messages until ``stop``; ``acked`` those whose send returned."""
    contact = sender.cache.contacts()[0]
    i = 0
    while not stop.is_set():
        body = f"{prefix} {i}"
        tried.append(body)
        with contextlib.suppress(DnaError):
            await sender.send(contact, body)
            acked.append(body)
        i += 1
        await asyncio.sleep(0.01)


def test_everything_killed_and_restarted_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    net = Testnet(tmp_path / "net", bootstraps=1, storage=3, addresses=free_ips(4))
    net.up()
    try:
        who = People(tmp_path, net.seeds)

        async def before() -> tuple[list[str], list[str]]:
            alice = await who.new("alice")
            senders = [await who.new(n, publish=False) for n in ("bob", "carol")]
            for s in senders:
                await s.add_contact(who.name("alice"))
            await alice.close()  # offline: everything queues in the mailbox
            acked: list[str] = []
            tried: list[str] = []
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(send_until(s, alice, name, acked, tried, stop))
                for s, name in zip(senders, ("bob", "carol"), strict=True)
            ]
            await asyncio.sleep(1.5)
            net.kill_all()  # mid-send: some in flight
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
            net.up()
            # The senders' peers lived through the outage: they must sync and send again.
            bob, carol = senders
            start = time.monotonic()
            await bob.send(bob.cache.contacts()[0], "bob after")
            print(f"\nbob's first send after the restart took {time.monotonic() - start:.1f} s")
            await carol.sync()
            await carol.send(carol.cache.contacts()[0], "carol after")
            acked += ["bob after", "carol after"]
            tried += ["bob after", "carol after"]
            await asyncio.gather(*(s.close() for s in senders))
            return acked, tried

        acked, tried = asyncio.run(before())
        assert len(acked) > 5

        async def after() -> None:
            alice = await who.open("alice")
            await alice.sync()
            got = [m.body for m in alice.cache.messages()]
            assert len(got) == len(set(got))  # nothing twice
            assert set(acked) <= set(got)  # nothing acknowledged lost
            assert set(got) <= set(tried)
            print(f"acked {len(acked)}, tried {len(tried)}, received {len(got)}")
            await alice.close()

        asyncio.run(after())
    finally:
        net.down()
