"""The deferred blobs' room shared fairly between sources (`dna_peer.deferral`): sans-I/O,
properties over any arrival order (hypothesis prints the failing example to replay)."""

from __future__ import annotations

import time
from collections import Counter

from dna_peer.deferral import MAX_EVICTIONS, SEVERAL, DeferredRoom, Limits, Source
from hypothesis import given, settings
from hypothesis import strategies as st

LIMITS = Limits(blobs=30, bytes=10_000, node_blobs=10, node_bytes=10_000)
SOURCES: list[Source] = [SEVERAL, *(bytes([i]) * 32 for i in range(1, 7))]


def arrive(room: DeferredRoom, source: Source, blob_id: bytes, size: int) -> list[bytes] | None:
    """What `Inbox._defer` does with the plan: evict, then add (None: refused)."""
    victims = room.plan(source, size)
    if victims is not None:
        for victim in victims:
            room.remove(victim)
        room.add(source, blob_id, size)
    return victims


# Bursts: a source sends 1-15 blobs in a row (a flood, or a fetch's page from one node).
BURSTS = st.lists(
    st.tuples(st.sampled_from(range(len(SOURCES))), st.integers(1, 15)), max_size=40
).map(lambda bursts: [i for i, n in bursts for _ in range(n)])


@settings(max_examples=300, deadline=None)
@given(BURSTS)
def test_every_source_keeps_its_fair_share_whatever_the_others_send(order: list[int]) -> None:
    """Blobs of one size arrive from any sources in any order. Always: the bounds hold; a
    source refused holds its node share or no less than its fair share less one (the bound
    / the sources present - 1); and no source is evicted below that. So colluding nodes,
    each within its share, cannot push an honest source's blobs out."""
    room = DeferredRoom(LIMITS)
    sent: Counter[Source] = Counter()
    for n, index in enumerate(order):
        source = SOURCES[index]
        sent[source] += 1
        present = len(sent)
        fair = LIMITS.blobs // present - 1
        before = {s: room.held(s)[0] for s in sent}
        victims = arrive(room, source, n.to_bytes(4, "big"), 10)
        assert room.count <= LIMITS.blobs and room.size <= LIMITS.bytes
        if victims is None:
            held = before[source]
            assert held >= fair or (source is not SEVERAL and held >= LIMITS.node_blobs)
        for other in sent:
            if other != source and room.held(other)[0] < before[other]:
                assert room.held(other)[0] >= fair  # evicted only down to its fair share
        for other in sent:
            if other is not SEVERAL:
                assert room.held(other)[0] <= LIMITS.node_blobs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(SOURCES))),
                          st.integers(1, 3_000)), max_size=120))  # fmt: skip
def test_bytes_bound_and_a_refusal_changes_nothing(arrivals: list[tuple[int, int]]) -> None:
    """Blobs of any size: the byte bound holds, a newcomer evicts at most MAX_EVICTIONS,
    each eviction from another source than its own, and a refused plan changes nothing."""
    room = DeferredRoom(LIMITS)
    for n, (index, size) in enumerate(arrivals):
        source = SOURCES[index]
        state = (room.count, room.size, {s: room.held(s) for s in SOURCES})
        plan = room.plan(source, size)
        assert (room.count, room.size, {s: room.held(s) for s in SOURCES}) == state
        victims = arrive(room, source, n.to_bytes(4, "big"), size)
        assert room.count <= LIMITS.blobs and room.size <= LIMITS.bytes
        if victims is not None:
            assert victims == plan and len(victims) <= MAX_EVICTIONS
            assert room.held(source)[0] == state[2][source][0] + 1  # none of its own


def test_blobs_leave_in_constant_time_whatever_their_place() -> None:
    """20,000 blobs of one source handled newest first (a sender's blobs behind older
    ones): each leaves without a scan of those before it. A list scanned took ~11 s here
    (10,000: 2.7 s, quadratic), a loop the peer's round blocks on; now a few ms. The bound
    is far from both."""
    n = 20_000
    ids = [i.to_bytes(8, "big") for i in range(n)]
    room = DeferredRoom(Limits(n, 10**9, n, 10**9), [(SEVERAL, b, 100) for b in ids])
    started = time.perf_counter()
    for blob_id in reversed(ids):
        room.remove(blob_id)
    assert time.perf_counter() - started < 2.0
    assert (room.count, room.size, room.held(SEVERAL)) == (0, 0, (0, 0))


def test_a_blob_added_twice_is_counted_once() -> None:
    """As the cache keeps one row a blob (INSERT OR IGNORE): the room's counts stay its."""
    room = DeferredRoom(LIMITS)
    room.add(SEVERAL, b"a", 10)
    room.add(SOURCES[1], b"a", 10)
    assert (room.count, room.size, room.held(SEVERAL), room.held(SOURCES[1])) == (
        1, 10, (1, 10), (0, 0),
    )  # fmt: skip
    room.remove(b"a")
    assert (room.count, room.size) == (0, 0)


HOSTILE = [bytes([0xF0 + i]) * 32 for i in range(3)]
HONEST = [bytes([i]) * 32 for i in range(1, 4)]
RETURNERS = st.tuples(st.sets(st.sampled_from(HOSTILE)), st.sets(st.sampled_from(HONEST))).filter(
    lambda sets: bool(sets[0] or sets[1])
)


@settings(max_examples=300, deadline=None)
@given(st.lists(RETURNERS, max_size=150))
def test_colluding_nodes_hold_their_shares_and_honest_blobs_keep_theirs(
    arrivals: list[tuple[set[bytes], set[bytes]]],
) -> None:
    """Blobs returned by any set of nodes, hostile ones among them (`place`). Always: a
    blob is counted against a node that returned it; the made-up blobs (returned by
    hostile nodes alone, in any collusion) hold at most the hostile nodes' shares, never
    a "several nodes" room beside them; and a blob that an honest node returned is refused
    only when each honest node that returned it holds its share, or no less than its fair
    share less one (the bound / the sources holding blobs - 1), whatever hostile nodes
    returned it too."""
    room = DeferredRoom(LIMITS)
    made_up: set[bytes] = set()
    for n, (hostile, honest) in enumerate(arrivals):
        blob_id, returned_by = n.to_bytes(4, "big"), hostile | honest
        before = {node: room.held(node)[0] for node in HOSTILE + HONEST}
        placed = room.place(returned_by, 10)
        if placed is None:
            for node in honest:
                sources = sum(1 for held in before.values() if held) + (before[node] == 0)
                fair = LIMITS.blobs // sources - 1
                assert room.share_full(node, 10) or before[node] >= fair
            continue
        source, victims = placed
        assert source in returned_by
        for victim in victims:
            room.remove(victim)
            made_up.discard(victim)
        room.add(source, blob_id, 10)
        if not honest:
            made_up.add(blob_id)
        assert len(made_up) <= len(HOSTILE) * LIMITS.node_blobs
        assert sum(room.held(node)[0] for node in HOSTILE) <= len(HOSTILE) * LIMITS.node_blobs
        assert room.count <= LIMITS.blobs
