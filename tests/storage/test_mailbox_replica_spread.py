"""A mailbox's replica set is spread over subnets (``dna_core.mailbox.replica_set``): the
closest storage nodes, at most 2 of one /24 (/48) while others are left, then the closest
of the rest. Node IDs cost 8 puzzle bits and a mailbox's ID is public, so one subnet could
grind IDs nearer it than anyone, take all R places and drop its mail. Clients (writes,
reads, hand-off) and nodes (repair's ``choose_replicas``, a reused lookup's ``ranks``,
sync authorization's R + 2) must all choose the same set."""

from __future__ import annotations

import hashlib
import random

from dna_core.mailbox import HANDOFF_CANDIDATES, REPLICAS, mailbox_candidates, replica_set
from dna_core.overlay import distance
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.wire import common_pb2
from dna_storage.replication import (
    SYNC_MARGIN,
    Neighbourhood,
    by_distance,
    choose_replicas,
    lookup_view,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from support import run_seed

SEED = run_seed(20261205)
K, R = 20, REPLICAS
STORAGE, BOOTSTRAP = common_pb2.NODE_ROLE_STORAGE, common_pb2.NODE_ROLE_BOOTSTRAP


def node(node_id: bytes, ip: str = "", role: int = STORAGE) -> Contact:
    """A node at ``ip``; by default in one of 65,536 /24s, from a hash of its ID (nodes
    with near IDs are not near in address)."""
    a, b = hashlib.sha256(node_id).digest()[:2]
    return Contact(node_id, b"k" * 32, (Endpoint(ip or f"10.{a}.{b}.1", 4000),), role)


def near(rng: random.Random, center: bytes, bits: int) -> bytes:
    """A random ID sharing all but its last ``bits`` bits with ``center``."""
    mask = (1 << bits) - 1
    value = (int.from_bytes(center, "big") & ~mask) | rng.getrandbits(bits)
    return value.to_bytes(32, "big")


def lookup(nodes: list[Contact], target: bytes, asker: Contact | None = None) -> list[Contact]:
    """What an exact lookup returns: the k nodes closest to ``target``, never the asker."""
    others = [c for c in nodes if asker is None or c.node_id != asker.node_id]
    return by_distance(target, others)[:K]


def client_replicas(nodes: list[Contact], box: bytes) -> list[Contact]:
    """The R replicas a client writes to and reads from (`MailboxClient._candidates`)."""
    return mailbox_candidates(lookup(nodes, box), R, HANDOFF_CANDIDATES, loopback_exempt=False)[:R]


def node_view(nodes: list[Contact], me: Contact, box: bytes) -> set[bytes]:
    """The replica set as node ``me`` sees it from its own lookup (``choose_replicas``)."""
    others, rightful = choose_replicas(
        lookup(nodes, box, me), me, box, R, k=K, loopback_exempt=False
    )
    return {c.node_id for c in others} | ({me.node_id} if rightful else set())


def ids(contacts: list[Contact]) -> set[bytes]:
    return {c.node_id for c in contacts}


def crowded_network(
    rng: random.Random, honest: int, crowds: int, crowd: int, near_to: bytes | None = None
) -> list[Contact]:
    """``honest`` storage nodes, each in a /24 of its own (and a few bootstrap nodes), and
    ``crowds`` subnets of ``crowd`` storage nodes each, ground near a random point (near
    ``near_to`` if given)."""
    nodes = [node(rng.randbytes(32)) for _ in range(honest)]
    nodes += [node(rng.randbytes(32), role=BOOTSTRAP) for _ in range(honest // 20)]
    for n in range(crowds):
        center = rng.randbytes(32) if near_to is None else near(rng, near_to, 246)
        nodes += [node(near(rng, center, 236), f"203.0.{n}.{i + 1}") for i in range(crowd)]
    return nodes


# -- what the spread does ------------------------------------------------------------


def sybils_nearest(rng: random.Random, box: bytes) -> tuple[list[Contact], list[Contact]]:
    """8 storage nodes of one /24 ground nearer ``box`` than 30 honest ones."""
    sybils = [node(near(rng, box, 200), f"203.0.113.{i + 1}") for i in range(8)]
    honest = [node(near(rng, box, 240)) for _ in range(30)]
    return sybils, honest


def test_one_subnet_nearest_a_mailbox_gets_two_replicas_and_none_of_the_hand_offs() -> None:
    """The client's candidates: 2 of the grinding subnet, then the closest of the others;
    the hand-off candidates, which take the writes its replicas refuse, are spread alike."""
    rng = random.Random(f"{SEED}/sybils")
    box = rng.randbytes(32)
    sybils, honest = sybils_nearest(rng, box)
    found = lookup(sybils + honest, box)
    assert ids(found[:R]) <= ids(sybils)  # the R closest: all of one subnet
    candidates = mailbox_candidates(found, R, HANDOFF_CANDIDATES, loopback_exempt=False)
    ranked = by_distance(box, honest)
    assert candidates[:R] == by_distance(box, [*found[:2], *ranked[:3]])
    assert candidates[R:] == ranked[3 : 3 + HANDOFF_CANDIDATES]


def test_every_node_of_the_mailbox_sees_the_set_the_client_writes_to() -> None:
    """Repair on each node (placing itself by its own distance and subnet) agrees with the
    client: the honest replicas sync with each other, the ground ones are 2 of 5."""
    rng = random.Random(f"{SEED}/agree")
    box = rng.randbytes(32)
    sybils, honest = sybils_nearest(rng, box)
    nodes = sybils + honest
    chosen = ids(client_replicas(nodes, box))
    assert len(chosen & ids(sybils)) == 2 and len(chosen) == R
    for me in lookup(nodes, box):
        assert node_view(nodes, me, box) == chosen, me.short()


def test_with_one_subnet_only_every_place_is_filled() -> None:
    """A network on one /24 (a one-machine cluster) keeps a mailbox on R nodes: the closest."""
    rng = random.Random(f"{SEED}/one")
    box = rng.randbytes(32)
    nodes = [node(rng.randbytes(32), f"192.168.7.{i + 1}") for i in range(12)]
    closest = by_distance(box, nodes)
    candidates = mailbox_candidates(closest, R, HANDOFF_CANDIDATES, loopback_exempt=False)
    assert candidates == closest[: R + HANDOFF_CANDIDATES]
    for me in closest:
        assert node_view(nodes, me, box) == ids(closest[:R])


def test_a_local_testnet_on_loopback_keeps_the_closest() -> None:
    """Every node of a local testnet is on 127.0.0.x: loopback is exempt, as in the table."""
    rng = random.Random(f"{SEED}/loopback")
    box = rng.randbytes(32)
    local = [node(near(rng, box, 200), f"127.0.0.{i + 1}") for i in range(6)]
    elsewhere = [node(near(rng, box, 240)) for _ in range(8)]  # and, oddly, nodes elsewhere
    closest = by_distance(box, local + elsewhere)
    assert closest[:R] == by_distance(box, local)[:R]
    assert mailbox_candidates(closest, R, 0, loopback_exempt=True) == closest[:R]
    spread = mailbox_candidates(closest, R, 0, loopback_exempt=False)  # not a testnet
    assert len(ids(spread) & ids(local)) == 2


# -- clients and nodes agree -----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), honest=st.integers(3, 120), crowds=st.integers(0, 6),
       crowd=st.integers(2, 12))  # fmt: skip
def test_clients_and_every_node_choose_the_same_replicas(
    seed: int, honest: int, crowds: int, crowd: int
) -> None:
    rng = random.Random(f"{SEED}/prop/{seed}")
    nodes = crowded_network(rng, honest, crowds, crowd)
    storage = [c for c in nodes if c.role == STORAGE]
    for _ in range(10):
        box = near(rng, rng.choice(storage).node_id, rng.randint(200, 256))
        chosen = client_replicas(nodes, box)
        assert len(chosen) == min(R, len(lookup([c for c in nodes if c.role == STORAGE], box)))
        held = max((sum(c.subnet == s.subnet for c in chosen) for s in chosen), default=0)
        subnets = {c.subnet for c in lookup(nodes, box) if c.role == STORAGE}
        if len(subnets) >= 3:  # others left: at most 2 of one subnet
            assert held <= 2
        for me in lookup(nodes, box):
            if me.role == STORAGE:
                assert node_view(nodes, me, box) == ids(chosen)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), honest=st.integers(30, 300), crowds=st.integers(1, 8),
       crowd=st.integers(3, 12), count=st.sampled_from([R, R + SYNC_MARGIN]))  # fmt: skip
def test_a_reused_lookup_that_ranks_a_mailbox_chooses_as_a_fresh_one(
    seed: int, honest: int, crowds: int, crowd: int, count: int
) -> None:
    """``Neighbourhood.ranks`` for repair (R) and authorization (R + 2): the proof must
    reach the last node the spread takes, which may lie past the R-th closest."""
    rng = random.Random(f"{SEED}/hood/{seed}")
    target = rng.randbytes(32)
    nodes = crowded_network(rng, honest, crowds, crowd, near_to=target)
    me = rng.choice([c for c in lookup(nodes, target) if c.role == STORAGE])
    hood = Neighbourhood(target, tuple(lookup(nodes, target, me)), False, K, 0.0)
    for _ in range(60):
        box = near(rng, target, rng.randint(200, 256))
        if not hood.ranks(box, me, count, loopback_exempt=False):
            continue
        reused = replica_set(lookup_view(hood.contacts, me, box, K), count, loopback_exempt=False)
        fresh = lookup_view(lookup(nodes, box, me), me, box, K)
        truth = replica_set(fresh, count, loopback_exempt=False)
        assert ids(reused) == ids(truth)


def at(value: int) -> bytes:
    return value.to_bytes(32, "big")


def test_the_proof_reaches_past_the_r_th_closest() -> None:
    """A reused lookup certain of the R closest (one subnet's, ground near the mailbox)
    but not of the honest nodes the spread takes after them must not rank the mailbox: a
    node it does not hold is nearer the mailbox than those it does."""
    base = random.Random(f"{SEED}/reach").getrandbits(256) & ~((1 << 252) - 1)
    target, box = base, base ^ (1 << 250)
    sybils = [node(at(box ^ (i + 1)), f"203.0.113.{i + 1}") for i in range(7)]
    honest = [node(at(target ^ ((1 << 249) + (i << 200)))) for i in range(12)]
    farthest = node(at(target ^ ((1 << 250) + (1 << 240))))  # the hood's radius
    hood = Neighbourhood(at(target), (*honest, *sybils, farthest), False, K, 0.0)
    assert len(hood.contacts) == K
    me = node(at(target ^ (1 << 248)))
    missed = node(at(box ^ (1 << 245)))  # nearer the box than any honest node held
    assert distance(missed.node_id, at(target)) > distance(farthest.node_id, at(target))
    # the R closest are the ground subnet's, well within what the hood is certain of
    reach = sorted(distance(c.node_id, at(box)) for c in [*hood.storage(), me])[R - 1]
    assert reach + distance(at(target), at(box)) < distance(farthest.node_id, at(target))
    assert not hood.ranks(at(box), me, R, loopback_exempt=False)
    reused = choose_replicas(hood.contacts, me, at(box), R, k=K, loopback_exempt=False)[0]
    fresh = choose_replicas([*hood.contacts, missed], me, at(box), R, k=K, loopback_exempt=False)[0]
    assert missed in fresh and missed not in reused  # what reusing it would have got wrong


def test_authorization_admits_every_replica() -> None:
    """Sync authorization takes R + 2 with the same spread: a superset of the R replicas
    (``ReplicaView.ranking``), however the subnets crowd."""
    rng = random.Random(f"{SEED}/superset")
    for _ in range(300):
        box = rng.randbytes(32)
        nodes = crowded_network(rng, rng.randint(0, 20), rng.randint(1, 4), rng.randint(2, 9))
        storage = by_distance(box, [c for c in nodes if c.role == STORAGE])
        replicas = replica_set(storage, R, loopback_exempt=False)
        admitted = replica_set(storage, R + SYNC_MARGIN, loopback_exempt=False)
        assert ids(replicas) <= ids(admitted)
