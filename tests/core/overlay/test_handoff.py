"""Store-on-join (`dna_core.overlay.handoff`): who hands a newcomer which record, and the
queue that paces and bounds it. Sans-I/O: contacts and clocks are made up here."""

from __future__ import annotations

import hashlib
import random

from dna_core.overlay.behaviour import BehaviourConfig, ContactAdded, OverlayBehaviour
from dna_core.overlay.contact import Contact, Endpoint, id_int, spread_over_subnets
from dna_core.overlay.handoff import (
    HANDOFF_BURST,
    HANDOFF_RATE_PER_S,
    HANDOFF_SENDERS,
    MAX_PER_NEWCOMER,
    PLAN_BURST,
    PLAN_RATE_PER_S,
    REPLAN_MEMORY,
    HandoffQueue,
    PlanBudget,
    RecentlyPlanned,
    handoff_senders,
    hands_off,
    plan,
)
from hypothesis import given, settings
from hypothesis import strategies as st

K, REPLICAS = 20, 8


def node(i: int, ip: str, node_id: bytes | None = None) -> Contact:
    node_id = node_id or hashlib.sha256(f"node {i}".encode()).digest()
    return Contact(node_id, b"k" * 32, (Endpoint(ip, 4000),))


def world(seed: int, size: int, subnets: int) -> list[Contact]:
    rng = random.Random(seed)
    return [node(i, f"198.51.{rng.randrange(subnets)}.{i % 250 + 1}") for i in range(size)]


def closest(contacts: list[Contact], key: bytes, count: int) -> list[Contact]:
    target = id_int(key)
    return sorted(contacts, key=lambda c: c.key ^ target)[:count]


def givers(contacts: list[Contact], newcomer: Contact, key: bytes) -> list[Contact]:
    """The nodes that hand ``newcomer`` the record, each deciding from an exact view."""
    found = closest(contacts, key, K)
    return [
        c
        for c in found
        if c is not newcomer
        and hands_off(c, newcomer, key, [x for x in found if x is not c], k=K, replicas=REPLICAS)
    ]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(25, 120), st.integers(1, 40), st.integers(0, 7))
def test_holders_that_agree_on_the_replicas_send_each_newcomer_two(
    seed: int, size: int, subnets: int, place: int
) -> None:
    """Every replica decides alone, from the same view: exactly the two senders (of
    distinct subnets when there are two) hand the newcomer the record; not all 8."""
    contacts = world(seed, size, subnets)
    key = hashlib.sha256(f"key {seed}".encode()).digest()
    replicas = spread_over_subnets(closest(contacts, key, K), REPLICAS)
    newcomer = replicas[place]
    given_by = givers(contacts, newcomer, key)
    assert given_by == [
        c for c in closest(contacts, key, K) if c in handoff_senders(newcomer.node_id, replicas)
    ]
    assert len(given_by) == HANDOFF_SENDERS
    assert all(c in replicas for c in given_by)
    others = {c.subnet for c in replicas if c is not newcomer}
    if len(others) >= 2:
        assert given_by[0].subnet != given_by[1].subnet


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32), st.integers(25, 80))
def test_nobody_hands_a_record_to_a_node_outside_its_replicas(seed: int, size: int) -> None:
    contacts = world(seed, size, 30)
    key = hashlib.sha256(f"key {seed}".encode()).digest()
    found = closest(contacts, key, K)
    replicas = spread_over_subnets(found, REPLICAS)
    outsider = next(c for c in found if c not in replicas)
    assert givers(contacts, outsider, key) == []
    # and a node that is no replica itself hands nothing over, even to one
    assert not hands_off(outsider, replicas[0], key, found, k=K, replicas=REPLICAS)


def test_an_attackers_ground_ids_nearest_the_key_never_are_both_senders() -> None:
    """The paper's rule (the holder closest to the key sends) hands the turn to IDs
    ground nearest the key: they hold the record and keep it. Two senders of distinct
    subnets, in an order drawn per newcomer, always include an honest one."""
    key = hashlib.sha256(b"attacked").digest()
    top = id_int(key) >> 200 << 200
    attacker = [node(i, f"203.0.113.{i + 1}", (top | i).to_bytes(32, "big")) for i in range(1, 3)]
    for seed in range(50):
        honest = world(seed, 60, 40)
        replicas = spread_over_subnets(closest(honest + attacker, key, K), REPLICAS)
        for newcomer in replicas:
            if newcomer in attacker:
                continue
            picked = handoff_senders(newcomer.node_id, replicas)
            assert any(c not in attacker for c in picked), (seed, picked)


def test_plan_looks_at_the_keys_nearest_the_newcomer_only() -> None:
    """A node holding 20,000 records looks at 64 of them per newcomer (one table look-up
    each), not all: a flood of newcomers costs bounded work."""
    contacts = world(1, 40, 20)
    local, newcomer = contacts[0], contacts[1]
    held = [hashlib.sha256(f"key {i}".encode()).digest() for i in range(5000)]
    held.append(newcomer.node_id)  # a key at the newcomer's own ID: it is a replica
    asked: list[bytes] = []

    def table(key: bytes, count: int) -> list[Contact]:
        asked.append(key)
        return closest(contacts[1:], key, count)

    keys = plan(local, newcomer, held, table, k=K, replicas=REPLICAS)
    assert len(asked) == MAX_PER_NEWCOMER
    nearest = sorted(held, key=lambda k: id_int(k) ^ newcomer.key)[:MAX_PER_NEWCOMER]
    assert asked == nearest
    assert set(keys) <= set(nearest)
    want = [
        k for k in nearest
        if hands_off(local, newcomer, k, closest(contacts[1:], k, K), k=K, replicas=REPLICAS)
    ]  # fmt: skip
    assert keys == want


def keys(n: int, tag: str = "") -> list[bytes]:
    return [hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(n)]


def test_a_newcomer_gets_a_burst_then_the_paced_rate() -> None:
    queue = HandoffQueue()
    newcomer = node(1, "198.51.100.1")
    assert queue.offer(newcomer, keys(40), now=0.0) == 0
    first = queue.take(0.0)
    assert len(first) == HANDOFF_BURST
    assert queue.take(0.0) == []
    due = queue.next_due(0.0)
    assert due is not None and abs(due - 1 / HANDOFF_RATE_PER_S) < 1e-9
    assert len(queue.take(10.0)) == int(10 * HANDOFF_RATE_PER_S)
    # the bucket never refills past its burst, however long the wait
    assert len(queue.take(1000.0)) == HANDOFF_BURST
    assert len(queue.take(1000.0 + HANDOFF_BURST / HANDOFF_RATE_PER_S)) == HANDOFF_BURST
    assert len(queue) == 40 - 3 * HANDOFF_BURST - int(10 * HANDOFF_RATE_PER_S)
    assert len(queue.take(2000.0)) == len(first) - int(10 * HANDOFF_RATE_PER_S)
    assert len(queue) == 0 and queue.next_due(2000.0) is None


def test_a_flood_of_newcomers_leaves_the_queue_bounded_and_drops_counted() -> None:
    """Sybil newcomers: each gets at most its share, the queue holds at most its cap, and
    the oldest handoffs make room for the new (every one dropped is counted)."""
    queue = HandoffQueue(max_queued=500, max_per_newcomer=64)
    dropped = 0
    for i in range(100):
        dropped += queue.offer(node(i, f"203.0.113.{i + 1}"), keys(80, f"{i}/"), now=0.0)
        assert len(queue) <= 500
        assert queue.queued_for(node(i, "x").node_id) <= 64
    assert len(queue) == 500
    assert dropped == queue.dropped == 100 * 80 - 500
    # the newest newcomers kept theirs, the oldest lost theirs
    assert queue.queued_for(node(99, "x").node_id) == 64
    assert queue.queued_for(node(0, "x").node_id) == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 30), st.floats(0, 20)), max_size=40),
    st.integers(1, 50),
    st.integers(1, 20),
)
def test_every_handoff_offered_is_taken_once_or_dropped_once(
    ops: list[tuple[int, int, float]], max_queued: int, per_newcomer: int
) -> None:
    queue = HandoffQueue(max_queued=max_queued, max_per_newcomer=per_newcomer)
    now, offered, taken = 0.0, 0, []
    for n, (who, count, step) in enumerate(ops):
        now += step
        newcomer = node(who, f"203.0.113.{who + 1}")
        offered += count
        queue.offer(newcomer, keys(count, f"{n}/"), now)  # (distinct keys per offer)
        taken += queue.take(now)
        assert len(queue) <= max_queued
        assert all(queue.queued_for(node(w, "x").node_id) <= per_newcomer for w in range(6))
    while len(queue):
        now += 10_000
        taken += queue.take(now)
    assert len(taken) + queue.dropped == offered
    assert len({(h.newcomer.node_id, h.key) for h in taken}) == len(taken)


def test_the_behaviour_tells_of_a_contact_new_to_the_table_once() -> None:
    """`ContactAdded` comes when a contact enters the table, not when a known one is heard
    from again: a handoff plan per request would cost every request a scan."""
    local = node(0, "198.51.100.1")
    behaviour = OverlayBehaviour(
        local.node_id, BehaviourConfig(prove_keys=False), random.Random(1), sender=local
    )
    newcomer = node(1, "198.51.101.1")
    behaviour.observe_requester(newcomer, newcomer.endpoint.udp, 0.0)
    assert [c for c in behaviour.poll() if isinstance(c, ContactAdded)] == [ContactAdded(newcomer)]
    behaviour.observe_requester(newcomer, newcomer.endpoint.udp, 5.0)
    assert not [c for c in behaviour.poll() if isinstance(c, ContactAdded)]


def test_newcomers_are_planned_for_at_a_bounded_rate() -> None:
    """Each plan scans the held keys (~18 ms at 20,000): a flood of newcomers gets
    ``PLAN_BURST`` plans at once, then ``PLAN_RATE_PER_S`` a second, not one each."""
    budget = PlanBudget()
    assert sum(budget.allow(0.0) for _ in range(1000)) == PLAN_BURST
    assert sum(budget.allow(1.0) for _ in range(1000)) == int(PLAN_RATE_PER_S)


def test_a_newcomer_planned_for_is_not_planned_again_within_the_interval() -> None:
    """A flapping newcomer (out of the table and back) is planned for once a republish
    interval, not at each return; at most ``REPLAN_MEMORY`` are remembered, the least
    recently planned forgotten first (then planned again: within the `PlanBudget`)."""
    recent = RecentlyPlanned(hold_s=3600.0)
    a, b = b"\xaa" * 32, b"\xbb" * 32
    assert not recent.recent(a, 0.0)
    recent.planned(a, 0.0)
    assert recent.recent(a, 1.0) and recent.recent(a, 3599.0) and not recent.recent(b, 1.0)
    assert not recent.recent(a, 3600.0)  # an interval on: the republish has come since
    recent.planned(a, 3600.0)
    for i in range(REPLAN_MEMORY - 1):
        recent.planned(i.to_bytes(32, "big"), 3601.0)
    assert len(recent) == REPLAN_MEMORY and recent.recent(a, 3602.0)
    recent.planned(b, 3602.0)  # one more: the least recently planned (a) goes
    assert len(recent) == REPLAN_MEMORY and not recent.recent(a, 3603.0)
    assert recent.recent(b, 3603.0) and recent.recent((0).to_bytes(32, "big"), 3603.0)
