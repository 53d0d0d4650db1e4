"""Which nodes a get asks before any lookup (`OverlayNode.first_asked`): the closest known,
then the closest of another subnet. The spread lets one subnet hold 2 of a record's
replicas; when those 2 were the closest, a get asked only them, and both answering with
an older version of the record was a rollback nobody else was asked about."""

from __future__ import annotations

import time

from dna_core.crypto.node import NodeIdentity
from dna_core.overlay.aio.node import NodeConfig, OverlayNode
from dna_core.overlay.contact import Contact, Endpoint

KEY = bytes(32)


def near(distance: int) -> bytes:
    """An ID at XOR ``distance`` from KEY (all within one bucket of the node below)."""
    return distance.to_bytes(32, "big")


def contact(node_id: bytes, ip: str) -> Contact:
    return Contact(node_id=node_id, public_key=b"k" * 32, endpoints=(Endpoint(ip, 4000),))


def node_knowing(*contacts: Contact) -> OverlayNode:
    node = OverlayNode(NodeIdentity.generate(0)[0], NodeConfig())
    for c in contacts:
        node.table.observe(c, time.monotonic())
    assert all(c.node_id in node.table for c in contacts)
    return node


def test_the_two_closest_of_one_subnet_are_not_both_asked() -> None:
    ground = [contact(near(1), "198.18.7.1"), contact(near(2), "198.18.7.2")]  # one /24
    honest = [contact(near(3), "198.19.1.1"), contact(near(4), "198.19.2.1")]
    node = node_knowing(*ground, *honest)
    asked = node.first_asked(KEY)
    assert [c.node_id for c in asked] == [near(1), near(3)]


def test_one_subnet_alone_is_still_asked() -> None:
    node = node_knowing(contact(near(1), "198.18.7.1"), contact(near(2), "198.18.7.2"))
    assert [c.node_id for c in node.first_asked(KEY)] == [near(1), near(2)]
