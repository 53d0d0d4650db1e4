"""Repair at the sizes a network brings, sans-I/O: the pacer keeps a pass within a peer's
sync rate limit (``PeerPacer``), and one lookup serves the mailboxes after it only where
it provably ranks them as their own lookup would (``Neighbourhood``)."""

from __future__ import annotations

import functools
import hashlib
import heapq
import random

import pytest
from dna_core.overlay import distance
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.ratelimit import RateLimiter
from dna_core.wire import common_pb2
from dna_storage.replication import (
    MIN_PACE_PER_S,
    PACE_SHARE,
    SYNC_CALL_BURST,
    SYNC_CALLS_PER_S,
    Neighbourhood,
    PeerPacer,
    choose_replicas,
    is_storage,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from support import run_seed

PEER = b"p" * 32
SEED = run_seed(20261203)
K, R = 20, 5


def call_times(pacer: PeerPacer, peer: RateLimiter, calls: int) -> tuple[list[float], int]:
    """Send ``calls`` calls to ``peer`` (its limiter) as fast as ``pacer`` lets them go, on
    a simulated clock, retrying a refused call after the retry-after the peer gives (as
    ``Repairer._paced``); when each was admitted, and how many were refused."""
    now, refusals = 0.0, 0
    admitted: list[float] = []
    while len(admitted) < calls:
        wait = pacer.wait(PEER, now)
        if wait > 0:
            now += wait
            continue
        retry_after = peer.check("caller", now)
        if retry_after > 0:
            refusals += 1
            pacer.refused(PEER, retry_after, now, now)
            continue
        pacer.answered(PEER)
        admitted.append(now)
        now += 0.0005  # the call's own time
    return admitted, refusals


def test_against_a_peer_with_the_default_limit_a_pass_is_never_refused() -> None:
    peer = RateLimiter(SYNC_CALLS_PER_S, SYNC_CALL_BURST, 16)
    admitted, refusals = call_times(PeerPacer(), peer, 3_000)
    assert refusals == 0
    # 95% of the burst at once, then 95% of the peer's rate: 2,050 calls in ~21.6 s
    expected = (3_000 - PACE_SHARE * SYNC_CALL_BURST) / (PACE_SHARE * SYNC_CALLS_PER_S)
    assert expected - 0.5 < admitted[-1] < expected + 0.5


def test_calls_arriving_bunched_at_a_default_peer_are_not_refused() -> None:
    """Each call reaches the peer up to 5 ms late (transit, a busy event loop): the 5%
    the pace keeps below the default absorbs it."""
    pacer, peer = PeerPacer(), RateLimiter(SYNC_CALLS_PER_S, SYNC_CALL_BURST, 16)
    rng = random.Random(f"{SEED}/jitter")
    now, refusals, sent = 0.0, 0, 0
    while sent < 5_000:
        wait = pacer.wait(PEER, now)
        if wait > 0:
            now += wait
            continue
        refusals += peer.check("caller", now + rng.uniform(0, 0.005)) > 0
        sent += 1
    assert refusals == 0


@pytest.mark.parametrize(("rate", "burst"), [(20.0, 50.0), (100.0, 40.0), (5.0, 1.0)])
def test_a_peer_with_a_lower_limit_is_learned_from_its_refusals(rate: float, burst: float) -> None:
    """Every call goes through near the peer's limit, at about one refusal per 10 * rate
    calls (a cycle of the pace halving and growing back: 3/4 of the limit on average
    where the peer's burst is 1, nearer where its bucket fills while the pace is low)."""
    peer = RateLimiter(rate, burst, 16)
    calls = 2_000
    admitted, refusals = call_times(PeerPacer(), peer, calls)
    ideal = (calls - burst) / rate
    print(f"\npeer at {rate:g}/s, burst {burst:g}: {refusals} refusals, "
          f"{admitted[-1]:.1f} s for {ideal:.1f} s at its limit")  # fmt: skip
    assert len(admitted) == calls
    assert refusals < 2 + calls * 2 / (10 * rate), refusals
    assert admitted[-1] < 1.45 * ideal, (admitted[-1], ideal)


def test_no_call_goes_before_a_refusals_retry_after() -> None:
    pacer = PeerPacer()
    assert pacer.wait(PEER, 0.0) == 0.0
    pacer.refused(PEER, 2.5, 1.0, 1.0)
    assert pacer.wait(PEER, 1.0) == pytest.approx(2.5)
    assert pacer.wait(PEER, 3.4) == pytest.approx(0.1)
    assert pacer.wait(PEER, 3.5) == 0.0
    assert pacer.pace(PEER) == pacer.rate / 2


def test_the_pace_halves_on_each_refusal_down_to_a_floor_and_grows_back_by_answers() -> None:
    pacer = PeerPacer()
    for step in range(20):
        pacer.refused(PEER, 0.01, float(step), float(step))
    assert pacer.pace(PEER) == MIN_PACE_PER_S
    for _ in range(1_000_000):
        pacer.answered(PEER)
        if pacer.pace(PEER) == pacer.rate:
            break
    assert pacer.pace(PEER) == pacer.rate == PACE_SHARE * SYNC_CALLS_PER_S  # never above


def test_calls_in_flight_refused_together_halve_the_pace_once() -> None:
    pacer = PeerPacer()
    for _ in range(8):  # 8 calls sent at 1.0, all refused at 1.01
        pacer.refused(PEER, 0.01, 1.01, 1.0)
    assert pacer.pace(PEER) == pacer.rate / 2
    pacer.refused(PEER, 0.01, 2.0, 1.5)  # sent after that cut: halves again
    assert pacer.pace(PEER) == pacer.rate / 4


def test_peers_are_paced_apart_and_at_most_max_peers_remembered() -> None:
    pacer = PeerPacer(rate=10.0, burst=1.0, max_peers=2)
    assert pacer.wait(b"a" * 32, 0.0) == 0.0
    assert pacer.wait(b"a" * 32, 0.0) == pytest.approx(0.1)
    assert pacer.wait(b"b" * 32, 0.0) == 0.0  # another peer, another bucket
    assert pacer.wait(b"c" * 32, 0.0) == 0.0
    assert pacer.wait(b"a" * 32, 0.0) == 0.0  # forgotten (least recently called): full


# -- one lookup for many mailboxes --------------------------------------------------------


def contact(node_id: bytes, role: int, ip: str = "") -> Contact:
    """A node at ``ip``; by default in one of 65,536 /24s, from a hash of its ID."""
    a, b = hashlib.sha256(node_id).digest()[:2]
    ip = ip or f"10.{a}.{b}.1"
    return Contact(node_id, b"k" * 32, (Endpoint(ip, 4000),), role)


def network(rng: random.Random, storage: int, others: int) -> list[Contact]:
    roles = [common_pb2.NODE_ROLE_STORAGE] * storage + [common_pb2.NODE_ROLE_BOOTSTRAP] * others
    return [contact(rng.randbytes(32), role) for role in roles]


def lookup(nodes: list[Contact], me: Contact, target: bytes) -> list[Contact]:
    """What an exact lookup returns: the k nodes closest to ``target``, never the asker."""
    return sorted((c for c in nodes if c.node_id != me.node_id),
                  key=lambda c: distance(c.node_id, target))[:K]  # fmt: skip


def near(rng: random.Random, me: bytes, bits: int) -> bytes:
    """A random ID sharing all but its last ``bits`` bits with ``me`` (the mailboxes a
    node holds lie near its own ID)."""
    mask = (1 << bits) - 1
    value = (int.from_bytes(me, "big") & ~mask) | rng.getrandbits(bits)
    return value.to_bytes(32, "big")


def walk(
    nodes: list[Contact], me: Contact, boxes: list[bytes], count: int
) -> tuple[int, list[tuple[list[Contact], bool]]]:
    """``Repairer.replica_peers`` over ``boxes`` in ID order: the last lookup while it
    ranks the next mailbox, else a new one; lookups made, and the sets chosen."""
    hood: Neighbourhood | None = None
    lookups, chosen = 0, []
    for box in sorted(boxes):
        if hood is None or not hood.ranks(box, me, count, loopback_exempt=False):
            lookups += 1
            hood = Neighbourhood(box, tuple(lookup(nodes, me, box)), False, K, 0.0)
        chosen.append(choose_replicas(hood.contacts, me, box, R, k=K, loopback_exempt=False))
    return lookups, chosen


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), storage=st.integers(8, 400), others=st.integers(0, 800),
       spread=st.integers(200, 256))  # fmt: skip
def test_reused_lookups_choose_the_replicas_a_fresh_lookup_of_each_mailbox_does(
    seed: int, storage: int, others: int, spread: int
) -> None:
    rng = random.Random(f"{SEED}/{seed}")
    nodes = network(rng, storage, others)
    me = rng.choice([c for c in nodes if is_storage(c)])
    boxes = [near(rng, me.node_id, spread) for _ in range(400)]
    lookups, chosen = walk(nodes, me, boxes, R)
    for box, (peers, rightful) in zip(sorted(boxes), chosen, strict=True):
        fresh_peers, fresh_rightful = choose_replicas(
            lookup(nodes, me, box), me, box, R, k=K, loopback_exempt=False
        )
        assert [c.node_id for c in peers] == [c.node_id for c in fresh_peers]
        assert rightful == fresh_rightful
    assert lookups <= len(boxes)


def test_a_node_walking_the_mailboxes_it_holds_looks_up_a_small_fraction_of_them() -> None:
    rng = random.Random(f"{SEED}/fraction")
    nodes = network(rng, 1_000, 50)
    me = nodes[0]
    storage = [c.node_id for c in nodes if is_storage(c)]
    # the mailboxes a node holds: those it is a replica of, all near its own ID
    boxes = [
        box for box in (near(rng, me.node_id, 250) for _ in range(2_000))
        if me.node_id in heapq.nsmallest(R, storage, key=functools.partial(distance, box))
    ]  # fmt: skip
    assert len(boxes) > 200
    lookups, _ = walk(nodes, me, boxes, R)
    print(f"\n{len(boxes)} mailboxes held, of 1,000 storage nodes: {lookups} lookups")
    assert lookups <= len(boxes) / 5


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), storage=st.integers(30, 300))
def test_a_neighbourhood_that_ranks_a_mailbox_gives_its_true_closest_storage_nodes(
    seed: int, storage: int
) -> None:
    """Authorization's use (``ReplicaView``, R + 2 closest, this node included)."""
    rng = random.Random(f"{SEED}/rank/{seed}")
    nodes = network(rng, storage, 10)
    me = nodes[0]
    target = rng.randbytes(32)
    hood = Neighbourhood(target, tuple(lookup(nodes, me, target)), False, K, 0.0)
    held = [c for c in nodes if is_storage(c)]
    for _ in range(50):
        box = near(rng, target, rng.randint(200, 256))
        if hood.ranks(box, me, R + 2, loopback_exempt=False):
            ranked = sorted([c.node_id for c in hood.contacts if is_storage(c)] + [me.node_id],
                            key=lambda i: distance(i, box))[: R + 2]  # fmt: skip
            truth = sorted({c.node_id for c in held}, key=lambda i: distance(i, box))[: R + 2]
            assert ranked == truth


def test_a_short_lookup_ranks_nothing_unless_it_is_exhaustive() -> None:
    rng = random.Random(f"{SEED}/short")
    nodes = network(rng, 6, 1)
    me, box = nodes[0], rng.randbytes(32)
    found = tuple(lookup(nodes, me, bytes(32)))
    assert len(found) < K
    assert not Neighbourhood(bytes(32), found, False, K, 0.0).ranks(
        box, me, R, loopback_exempt=False
    )
    assert Neighbourhood(bytes(32), found, True, K, 0.0).ranks(box, me, R, loopback_exempt=False)
