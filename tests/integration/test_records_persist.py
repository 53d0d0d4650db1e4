"""Issue 11 item 2: names and identity records survive the overlay restarting.

A real testnet (node processes) is taken down with SIGTERM and brought up again from the
same directory: every node must come back holding the records it held, verified again,
so that lookups by name and by fingerprint still work and nobody else can take the name.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cluster import free_ips
from dna_core.crypto import Identity
from dna_peer import keyserver
from dna_peer.profile import Profile
from dna_testnet.network import Testnet, client_node
from peers import PASSPHRASE, People

pytestmark = pytest.mark.process  # every test starts nodes

NAME = "persisted-alice"
ADDRESSES = free_ips(4)  # both tests; a testnet brought up again keeps its addresses


def small_testnet(root: Path) -> Testnet:
    return Testnet(root, bootstraps=1, storage=3, addresses=ADDRESSES)


def test_names_and_identities_survive_a_testnet_down_and_up(tmp_path: Path) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    net = small_testnet(tmp_path)
    net.up()
    try:

        async def publish() -> tuple[int, int]:
            node = await client_node(net.seeds)
            try:
                stored = await keyserver.publish_identity(node, alice, "Alice")
                return stored, await keyserver.claim_name(node, alice, NAME)
            finally:
                await node.stop()

        stored, claimed = asyncio.run(publish())
        assert stored >= 3 and claimed >= 3
        held_before = sum(n.status()["records"] for n in net.nodes)
    finally:
        net.down()
    assert not any(n.alive() for n in net.nodes)

    again = small_testnet(tmp_path)
    again.up()
    try:
        held_after = sum(n.status()["records"] for n in again.nodes)

        async def look_up() -> tuple[bytes | None, bool, int]:
            node = await client_node(again.seeds)
            try:
                owner = await keyserver.lookup_name(node, NAME)
                keys = await keyserver.lookup_keys(node, alice.fingerprint)
                stolen = await keyserver.claim_name(node, mallory, NAME)
                return owner, keys == alice.public, stolen
            finally:
                await node.stop()

        owner, keys_found, stolen = asyncio.run(look_up())
    finally:
        again.kill_all()
    assert held_after == held_before > 0, f"held {held_before} before, {held_after} after"
    assert owner == alice.fingerprint
    assert keys_found
    assert stolen == 0, "someone else claimed the name after the restart"


def test_a_device_republishes_when_it_finds_its_records_gone(tmp_path: Path) -> None:
    """Every node replaced (record files wiped): the owner's device puts its identity and
    name back at its first sync after reconnecting, not a day later."""
    net = small_testnet(tmp_path / "net")
    people = People(tmp_path / "people", net.seeds)
    net.up()
    try:

        async def create() -> None:
            alice = await people.new("alice")
            await alice.close()

        asyncio.run(create())
    finally:
        net.kill_all()  # every node lost, with what it held
    for path in (tmp_path / "net").glob("*-records.sqlite3*"):
        path.unlink()
    again = small_testnet(tmp_path / "net")
    again.up()
    try:

        async def reconnect() -> tuple[bytes | None, bytes | None]:
            node = await client_node(again.seeds)
            alice = await people.open("alice")
            try:
                gone = await keyserver.lookup_name(node, people.name("alice"))
                await alice.sync()
                return gone, await keyserver.lookup_name(node, people.name("alice"))
            finally:
                await alice.close()
                await node.stop()

        gone, back = asyncio.run(reconnect())
        fingerprint = Profile(tmp_path / "people" / "alice").unlock(PASSPHRASE).fingerprint
    finally:
        again.kill_all()
    assert gone is None  # the wipe really lost it
    assert back == fingerprint
