"""Multi-device rough edges (issue 11, item 9), with real peers on a real local testnet."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dna_peer.link import accept_link, offer_link
from dna_testnet.network import Testnet
from peers import PASSPHRASE, People


def test_contact_names_carry_over_to_a_linked_device(testnet: Testnet, tmp_path: Path) -> None:
    async def scenario() -> None:
        people = People(tmp_path, testnet.seeds)
        alice, phone = await people.new("alice"), await people.new("bob")
        assert (await phone.add_contact(people.name("alice"))).name == people.name("alice")
        await alice.send(await alice.add_contact(people.name("bob")), "hello bob")
        # The phone links before it synced: the laptop meets alice's message (and pins her
        # without a name, first contact) before the history that names her.
        offer = await offer_link(phone, "laptop")
        laptop = await accept_link(people.profile("laptop"), offer.code, PASSPHRASE,
                                   people.seeds)  # fmt: skip
        await laptop.sync()
        assert laptop.find_contact(people.name("alice")).fingerprint == alice.fingerprint
        await laptop.send(laptop.find_contact(people.name("alice")), "from the laptop")
        await asyncio.gather(alice.close(), phone.close(), laptop.close())

    asyncio.run(scenario())


def test_a_contact_added_later_reaches_the_other_devices_and_prefixes_work(
    testnet: Testnet, tmp_path: Path
) -> None:
    async def scenario() -> None:
        people = People(tmp_path, testnet.seeds)
        phone, carol = await people.new("bob"), await people.new("carol")
        offer = await offer_link(phone, "laptop")
        laptop = await accept_link(people.profile("laptop"), offer.code, PASSPHRASE,
                                   people.seeds)  # fmt: skip
        await laptop.sync()
        await phone.add_contact(people.name("carol"))  # after the link: a card follows
        await laptop.sync()
        assert laptop.find_contact(people.name("carol")).fingerprint == carol.fingerprint

        # The inbox shows 16 hex digits for someone without a name: they are accepted
        # wherever a contact is expected, in any case.
        shown = carol.fingerprint.hex()[:16].upper()
        assert phone.find_contact(shown).fingerprint == carol.fingerprint
        assert (await phone.add_contact(shown)).fingerprint == carol.fingerprint
        await asyncio.gather(phone.close(), laptop.close(), carol.close())

    asyncio.run(scenario())
