"""Where a record is stored and asked for (`OverlayNode.put_record`, `get_record`): the
closest nodes to its key, at most 2 of one /24 (/48) while others are left
(dna_core.overlay.contact.spread_over_subnets)."""

from __future__ import annotations

import hashlib

from dna_core.overlay.aio import RECORD_REPLICAS
from dna_core.overlay.contact import Contact, Endpoint, spread_over_subnets


def at(i: int, ip: str) -> Contact:
    node_id = hashlib.sha256(f"node {i}".encode()).digest()
    return Contact(node_id, b"k" * 32, (Endpoint(ip, 4000),))


def test_one_subnet_ground_near_a_key_gets_two_of_its_replicas() -> None:
    """IDs cost 8 puzzle bits: one /24 ground 8 IDs nearer a key than anyone else and
    took every replica of its record (withholding it at will)."""
    sybils = [at(i, f"203.0.113.{i + 1}") for i in range(10)]
    honest = [at(100 + i, f"198.51.{i}.1") for i in range(10)]
    found = sybils + honest  # the lookup's k, closest first
    replicas = spread_over_subnets(found, RECORD_REPLICAS)
    assert replicas == sybils[:2] + honest[:6]
    # a get asks the first of the same choice: holders of what a put stored
    assert spread_over_subnets(found, 5) == replicas[:5]


def test_too_few_subnets_still_fill_every_place() -> None:
    """A small network with few subnets keeps its record on as many nodes as before."""
    found = [at(i, f"203.0.113.{i + 1}") for i in range(6)] + [at(9, "198.51.0.1")]
    replicas = spread_over_subnets(found, 5)
    assert replicas == [*found[:4], found[6]]  # 2 of the subnet, the other, 2 more of it
    assert len(spread_over_subnets(found, 20)) == len(found)


def test_a_local_testnet_on_loopback_keeps_the_closest() -> None:
    found = [at(i, "127.0.0.1") for i in range(10)]
    assert spread_over_subnets(found, 8, loopback_exempt=True) == found[:8]
    assert spread_over_subnets(found, 8) == found[:8]  # one subnet only: filled up in order


def test_ipv6_counts_per_48() -> None:
    found = [at(i, f"2001:db8:1:{i:x}::1") for i in range(4)] + [at(9, "2001:db8:2::1")]
    assert spread_over_subnets(found, 3) == [*found[:2], found[4]]


def test_a_private_network_keeps_the_closest() -> None:
    """Private addresses skip the spread (a Kubernetes machine's pods share a /24), with no
    testnet setting: an outside attacker cannot hold them."""
    one_machine = [at(i, f"10.244.0.{i + 1}") for i in range(10)]
    others = [at(100 + i, f"10.244.{i + 1}.1") for i in range(3)]
    assert spread_over_subnets(one_machine + others, 8) == one_machine[:8]
