"""Iterative lookups (dna_core.overlay.lookup), driven synchronously over a simulated
network of synthetic nodes whose routing tables know everyone they can hold.

Time only moves where a test says so; "in flight" is what the driver sent and has not
answered yet. The network seed is printed in assertion messages; DNA_TEST_SEED=N runs
the network tests on another seed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import pytest
from dna_core.overlay.codec import WHOLE_ANSWER
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.overlay.kbucket import RoutingTable
from dna_core.overlay.lookup import (
    ClosestPeersIter,
    DisjointLookup,
    Finished,
    Query,
    Step,
    Wait,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from support import run_seed

NET_SEED = run_seed(20260611)  # printed in failures; DNA_TEST_SEED=N runs another
NODES = 300
K = 20
ALPHA = 3
TARGET0 = bytes(32)

Mode = Literal["batch", "fifo", "random"]


class Lookup(Protocol):
    def next(self, now: float) -> Step: ...
    def on_response(self, node_id: bytes, closer: Iterable[Contact]) -> bool: ...
    def on_failure(self, node_id: bytes) -> bool: ...
    def result(self) -> list[Contact]: ...


def dist(node_id: bytes, target: bytes) -> int:
    return int.from_bytes(node_id, "big") ^ int.from_bytes(target, "big")


def synthetic(node_id: bytes, i: int = 0) -> Contact:
    ip = f"198.18.{i // 250 % 256}.{i % 250 + 1}"
    return Contact(node_id=node_id, public_key=b"k" * 32, endpoints=(Endpoint(ip, 4000),))


def at(d: int, target: bytes = TARGET0) -> Contact:
    """A contact at XOR distance ``d`` from ``target``."""
    return synthetic((int.from_bytes(target, "big") ^ d).to_bytes(32, "big"), d)


@dataclass
class Net:
    contacts: list[Contact]
    tables: dict[bytes, RoutingTable]

    def answer(self, node_id: bytes, target: bytes, count: int = K) -> list[Contact]:
        return self.tables[node_id].closest(target, count)

    def answerer(self, target: bytes) -> Callable[[bytes], list[Contact] | None]:
        return lambda node_id: self.answer(node_id, target)

    def truth(
        self, target: bytes, *, exclude: bytes, count: int = K, among: set[bytes] | None = None
    ) -> list[bytes]:
        ids = [c.node_id for c in self.contacts if c.node_id != exclude]
        if among is not None:
            ids = [i for i in ids if i in among]
        return sorted(ids, key=lambda i: dist(i, target))[:count]


@pytest.fixture(scope="module")
def net() -> Net:
    rng = random.Random(NET_SEED)
    contacts = [synthetic(rng.randbytes(32), i) for i in range(NODES)]
    tables = {}
    for c in contacts:
        table = RoutingTable(c.node_id, subnet_limit=K, table_subnet_limit=None)
        others = contacts[:]
        rng.shuffle(others)
        for other in others:
            table.observe(other, 0.0)
        tables[c.node_id] = table
    return Net(contacts, tables)


@dataclass
class Trace:
    queried: dict[bytes, Query] = field(default_factory=dict)
    responded: set[bytes] = field(default_factory=set)
    failed: set[bytes] = field(default_factory=set)
    left_in_flight: int = 0


def path_of(lookup: Lookup, path: int) -> ClosestPeersIter:
    it = lookup.paths[path] if isinstance(lookup, DisjointLookup) else lookup
    assert isinstance(it, ClosestPeersIter)
    return it


def parallelism(lookup: Lookup, path: int, alpha: int) -> int:
    """alpha, or k while the path is stalled (alpha answers in a row brought nothing closer)."""
    it = path_of(lookup, path)
    return it.k if it.stalled else alpha


def drive(
    lookup: Lookup,
    answer: Callable[[bytes], list[Contact] | None],
    rng: random.Random,
    *,
    mode: Mode,
    alpha: int = ALPHA,
) -> Trace:
    """Run ``lookup`` to the end at now=0. ``answer`` returns a peer's closer contacts,
    or None for a dead peer (reported with on_failure). In "batch" mode every query in
    flight is answered before the next call to next(); otherwise one at a time, oldest
    first ("fifo") or in random order."""
    trace = Trace()
    in_flight: dict[bytes, Query] = {}
    for _ in range(100_000):
        step = lookup.next(0.0)
        if isinstance(step, Query):
            node_id = step.contact.node_id
            assert node_id not in trace.queried, "a node was queried twice"
            trace.queried[node_id] = step
            in_flight[node_id] = step
            per_path = Counter(q.path for q in in_flight.values())
            limit = parallelism(lookup, step.path, alpha)
            assert per_path[step.path] <= limit, f"more than {limit} in flight"
            continue
        if isinstance(step, Finished):
            trace.left_in_flight = len(in_flight)
            return trace
        assert isinstance(step, Wait) and in_flight, "Wait with nothing in flight"
        assert step.until == min(q.deadline for q in in_flight.values())
        if mode == "batch":
            batch = list(in_flight)
        elif mode == "fifo":
            batch = [next(iter(in_flight))]
        else:
            batch = [rng.choice(list(in_flight))]
        for node_id in batch:
            del in_flight[node_id]
            closer = answer(node_id)
            if closer is None:
                assert lookup.on_failure(node_id)
                trace.failed.add(node_id)
            else:
                assert lookup.on_response(node_id, closer)
                trace.responded.add(node_id)
    raise AssertionError("lookup did not terminate")


def check_result(result: list[Contact], target: bytes, trace: Trace, k: int) -> None:
    ids = [c.node_id for c in result]
    assert len(ids) == len(set(ids)) <= k
    assert ids == sorted(ids, key=lambda i: dist(i, target)), "result not sorted by distance"
    assert set(ids) <= trace.responded, "result holds a peer that did not respond"


# -- the simulated network -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "fifo", "random"])
def test_lookup_finds_the_true_k_closest(net: Net, mode: Mode) -> None:
    rng = random.Random(f"{NET_SEED}/{mode}")
    misses = []
    for n in range(30):
        origin = rng.choice(net.contacts).node_id
        target = rng.randbytes(32)
        it = ClosestPeersIter(target, net.answer(origin, target), local_id=origin)
        trace = drive(it, net.answerer(target), rng, mode=mode)
        check_result(it.result(), target, trace, K)
        assert origin not in trace.queried
        if [c.node_id for c in it.result()] != net.truth(target, exclude=origin):
            misses.append((n, trace.left_in_flight))
    assert not misses, f"seed {NET_SEED}: (lookup, queries left in flight) that missed: {misses}"


@pytest.mark.parametrize("mode", ["batch", "random"])
def test_disjoint_lookup_paths_never_share_a_node(net: Net, mode: Mode) -> None:
    rng = random.Random(f"{NET_SEED}/disjoint/{mode}")
    for _ in range(15):
        origin = rng.choice(net.contacts).node_id
        target = rng.randbytes(32)
        lookup = DisjointLookup(target, net.answer(origin, target), paths=3, local_id=origin)
        trace = drive(lookup, net.answerer(target), rng, mode=mode)
        # drive() asserts no node is queried twice and at most alpha (k if stalled) in flight
        check_result(lookup.result(), target, trace, K)
        assert {q.path for q in trace.queried.values()} <= {0, 1, 2}
        assert lookup.finished
        assert lookup.queries == len(trace.queried)
        if mode == "batch":
            assert [c.node_id for c in lookup.result()] == net.truth(target, exclude=origin)


def test_dead_peers_are_skipped(net: Net) -> None:
    rng = random.Random(f"{NET_SEED}/dead")
    dead = {c.node_id for c in rng.sample(net.contacts, NODES // 5)}
    live = {c.node_id for c in net.contacts} - dead
    recall = []
    for _ in range(30):
        origin = rng.choice(sorted(live))
        target = rng.randbytes(32)

        def answer(p: bytes, t: bytes = target) -> list[Contact] | None:
            return None if p in dead else net.answer(p, t)

        it = ClosestPeersIter(target, net.answer(origin, target), local_id=origin)
        trace = drive(it, answer, rng, mode="batch")
        check_result(it.result(), target, trace, K)
        got = [c.node_id for c in it.result()]
        assert not set(got) & dead
        assert it.failures == len(trace.failed) > 0 and trace.failed <= dead
        want = net.truth(target, exclude=origin, among=live)
        # answers still list dead nodes (tables do not know yet), which can push the last
        # live ones out of every k-list; the closest ones are always found
        assert got[:5] == want[:5]
        recall.append(len(set(got) & set(want)) / K)
    assert sum(recall) / len(recall) >= 0.88, f"seed {NET_SEED}: recall {recall}"


def test_disjoint_paths_find_the_closest_honest_node_under_an_eclipse(
    net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    """60% of nodes collude: asked anything, they name only the colluders closest to the
    target. A disjoint lookup needs one clean path; a single path gets captured more often.
    The test prints both rates."""
    k, lookups = 8, 200
    rng = random.Random(f"{NET_SEED}/eclipse")
    ids = [c.node_id for c in net.contacts]
    bad = set(rng.sample(ids, int(0.6 * NODES)))
    colluders = [c for c in net.contacts if c.node_id in bad]
    found = {"single": 0, "disjoint": 0}
    for _ in range(lookups):
        origin = rng.choice([i for i in ids if i not in bad])
        target = rng.randbytes(32)
        honest = net.truth(target, exclude=origin, count=1, among=set(ids) - bad)[0]
        cabal = sorted(colluders, key=lambda c: dist(c.node_id, target))[:k]

        def answer(p: bytes, t: bytes = target, cabal: list[Contact] = cabal) -> list[Contact]:
            return cabal if p in bad else net.answer(p, t, k)

        seeds = net.answer(origin, target, k)
        single = ClosestPeersIter(target, seeds, k=k, local_id=origin)
        disjoint = DisjointLookup(target, seeds, paths=3, k=k, local_id=origin)
        for name, lookup in (("single", single), ("disjoint", disjoint)):
            trace = drive(lookup, answer, rng, mode="fifo")
            check_result(lookup.result(), target, trace, k)
            found[name] += honest in {c.node_id for c in lookup.result()}
    single_rate, disjoint_rate = found["single"] / lookups, found["disjoint"] / lookups
    summary = f"seed {NET_SEED}: single {single_rate:.3f}, disjoint {disjoint_rate:.3f}"
    with capsys.disabled():
        print(f"\neclipse (60% colluding, k={k}, {lookups} lookups): {summary}")
    assert disjoint_rate >= 0.9, summary
    assert disjoint_rate - single_rate >= 0.06, summary


# -- the iterator's rules, one at a time -------------------------------------------------


def test_does_not_finish_while_a_closer_peer_is_in_flight() -> None:
    """The k closest known have not all answered while a closer one is still waiting
    (and not yet past its deadline): finishing now drops that peer and what it knows."""
    a, b, c = at(1), at(2), at(3)
    it = ClosestPeersIter(TARGET0, [a, b, c], k=2, alpha=3, timeout=1.0)
    assert [it.next(0.0) for _ in range(3)] == [Query(a, 1.0), Query(b, 1.0), Query(c, 1.0)]
    assert it.on_response(b.node_id, [])
    assert it.on_response(c.node_id, [])
    assert it.next(0.5) == Wait(1.0)
    assert it.on_response(a.node_id, [])
    assert isinstance(it.next(0.6), Finished)
    assert it.result() == [a, b]


def test_a_peer_past_its_deadline_stops_holding_a_slot_and_its_late_answer_counts() -> None:
    a, b, c, d = at(1), at(2), at(3), at(4)
    it = ClosestPeersIter(TARGET0, [a, b, c], k=3, alpha=2, timeout=1.0)
    assert it.next(0.0) == Query(a, 1.0)
    assert it.next(0.5) == Query(b, 1.5)
    assert it.next(0.5) == Wait(1.0)  # alpha reached; the earliest deadline
    assert it.next(0.99) == Wait(1.0)
    assert it.next(1.0) == Query(c, 2.0)  # a is unresponsive: its slot is free
    assert it.next(1.0) == Wait(1.5)
    assert it.asked(a.node_id)
    assert it.on_response(a.node_id, [d])  # late, still accepted, and what it says is used
    assert it.on_response(b.node_id, [])
    assert it.next(1.2) == Query(d, 2.2)
    assert it.on_response(c.node_id, [])
    assert it.on_response(d.node_id, [])
    assert isinstance(it.next(1.3), Finished)
    assert it.result() == [a, b, c]
    assert (it.queries, it.responses, it.failures) == (4, 4, 0)


def test_unresponsive_peers_let_the_lookup_finish_at_their_deadline() -> None:
    a, b = at(1), at(2)
    it = ClosestPeersIter(TARGET0, [a, b], k=2, alpha=3, timeout=2.0)
    assert it.next(0.0) == Query(a, 2.0)
    assert it.next(1.0) == Query(b, 3.0)
    assert it.next(1.0) == Wait(2.0)
    assert it.on_response(b.node_id, [])
    assert it.next(1.5) == Wait(2.0)  # a is closer and may still answer
    assert isinstance(it.next(2.0), Finished)  # nobody left: a never answered
    assert it.result() == [b]
    assert it.missed == 1  # the result may lack a


def test_missed_counts_the_silent_peers_closer_than_the_kth_answer_only() -> None:
    """A silent peer past the k-th answer cannot be missing from the result; one closer
    can. Late answers and answers with failures are told apart."""
    a, b, c, d, e = at(1), at(2), at(3), at(4), at(5)
    it = ClosestPeersIter(TARGET0, [a, b, c, d, e], k=2, alpha=5, timeout=1.0)
    for _ in range(5):
        assert isinstance(it.next(0.0), Query)
    assert it.on_failure(a.node_id)  # closer than both answers: missed
    assert it.on_response(b.node_id, [])
    assert it.on_response(d.node_id, [])
    assert it.next(1.0) == Finished() and it.result() == [b, d]
    assert it.missed == 2  # a failed, c timed out; e (past d) does not count
    assert it.on_response(c.node_id, [])  # late: c is in the result now
    assert it.result() == [b, c] and it.missed == 1
    disjoint = DisjointLookup(TARGET0, [a, b], paths=2, k=2, alpha=1, timeout=1.0)
    assert isinstance(disjoint.next(0.0), Query) and isinstance(disjoint.next(0.0), Query)
    assert disjoint.on_failure(a.node_id) and disjoint.on_failure(b.node_id)
    assert disjoint.missed == 2  # summed over the paths


def test_unsolicited_and_repeated_responses_are_ignored() -> None:
    a, b, stranger, planted = at(4), at(8), at(5), at(1)
    it = ClosestPeersIter(TARGET0, [a, b], k=3, alpha=1, timeout=1.0)
    assert it.next(0.0) == Query(a, 1.0)
    # b is known but was not asked yet; stranger was never heard of
    assert not it.on_response(b.node_id, [planted])
    assert not it.on_response(stranger.node_id, [planted])
    assert not it.on_failure(b.node_id)
    assert not it.on_failure(stranger.node_id)
    assert it.result() == []
    assert it.responses == 0
    assert it.on_response(a.node_id, [])
    assert not it.on_response(a.node_id, [planted])  # twice
    assert not it.on_failure(a.node_id)  # after success
    assert it.result() == [a]
    assert it.next(0.1) == Query(b, 1.1)  # planted was never added
    assert it.on_response(b.node_id, [])
    assert isinstance(it.next(0.2), Finished)
    assert it.result() == [a, b]


def test_failed_peers_are_skipped_and_nobody_left_finishes() -> None:
    a, b, c = at(1), at(2), at(3)
    it = ClosestPeersIter(TARGET0, [a, b, c], k=2, alpha=3, timeout=1.0)
    for _ in range(3):
        assert isinstance(it.next(0.0), Query)
    assert it.on_failure(a.node_id)
    assert not it.on_failure(a.node_id)
    assert not it.on_response(a.node_id, [])  # a failed peer's answer is not used
    assert it.on_failure(b.node_id)
    assert it.on_failure(c.node_id)
    assert isinstance(it.next(0.1), Finished)
    assert it.result() == []
    assert it.failures == 3


def test_no_seeds_finishes_at_once_and_stays_finished() -> None:
    it = ClosestPeersIter(TARGET0, [], k=2)
    assert isinstance(it.next(0.0), Finished) and it.finished
    assert isinstance(it.next(5.0), Finished)
    disjoint = DisjointLookup(TARGET0, [at(1)], paths=3, k=2)
    assert isinstance(disjoint.next(0.0), Query)  # one path got the seed, two got none


def test_local_id_and_duplicates_are_never_queried() -> None:
    me, a = at(1), at(2)
    it = ClosestPeersIter(TARGET0, [me, a, a], k=3, alpha=3, local_id=me.node_id)
    assert it.next(0.0) == Query(a, 1.0)
    assert it.next(0.0) == Wait(1.0)
    assert it.on_response(a.node_id, [me, a])
    assert isinstance(it.next(0.0), Finished)
    assert it.result() == [a]


def test_disjoint_response_goes_to_the_path_that_asked() -> None:
    seeds = [at(d) for d in (1, 2, 3, 4, 5, 6)]
    lookup = DisjointLookup(TARGET0, seeds, paths=3, k=2, alpha=1, timeout=1.0)
    queries = [lookup.next(0.0) for _ in range(3)]
    assert all(isinstance(q, Query) for q in queries)
    paths = {q.path: q.contact for q in queries if isinstance(q, Query)}
    assert sorted(paths) == [0, 1, 2]
    assert lookup.next(0.0) == Wait(1.0)
    # an answer naming a node another path already owns does not make it queried twice
    owner = paths[0]
    assert lookup.on_response(paths[1].node_id, [owner, at(7)])
    assert not lookup.on_response(at(7).node_id, [])  # learned, not asked
    assert lookup.on_response(owner.node_id, [])
    assert not lookup.on_response(owner.node_id, [])
    asked = [q.contact.node_id for q in queries if isinstance(q, Query)]
    for _ in range(50):
        step = lookup.next(0.1)
        if isinstance(step, Finished):
            break
        if isinstance(step, Query):
            asked.append(step.contact.node_id)
        else:  # answer whatever is still open, with nothing new
            for node_id in [c.node_id for c in [*seeds, at(7)]]:
                lookup.on_response(node_id, [])
    assert lookup.finished
    assert len(asked) == len(set(asked))
    assert asked.count(owner.node_id) == 1


# -- random schedules -------------------------------------------------------------------

POOL = [at(d) for d in range(1, 41)]


@settings(max_examples=150)
@given(
    seeds=st.lists(st.sampled_from(POOL), max_size=8),
    k=st.integers(1, 6),
    alpha=st.integers(1, 4),
    paths=st.sampled_from([0, 1, 3]),  # 0 = a ClosestPeersIter
    data=st.data(),
)
def test_random_schedules_keep_the_invariants(  # noqa: PLR0915
    seeds: list[Contact], k: int, alpha: int, paths: int, data: st.DataObject
) -> None:
    timeout = 1.0
    lookup: Lookup
    if paths:
        lookup = DisjointLookup(TARGET0, seeds, paths=paths, k=k, alpha=alpha, timeout=timeout)
    else:
        lookup = ClosestPeersIter(TARGET0, seeds, k=k, alpha=alpha, timeout=timeout)
    now = 0.0
    sent: dict[bytes, Query] = {}
    open_: set[bytes] = set()  # sent and neither answered nor failed
    responded: set[bytes] = set()
    finished = False
    for _ in range(60):
        action = data.draw(st.sampled_from(["next", "next", "respond", "fail", "stray"]))
        if action == "next":
            now += data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
            step = lookup.next(now)
            live = [q for n, q in sent.items() if n in open_ and q.deadline > now]
            if isinstance(step, Finished):
                finished = True
                continue
            assert not finished, "a finished lookup came back to life"
            if isinstance(step, Query):
                node_id = step.contact.node_id
                assert node_id not in sent, "queried twice"
                assert step.deadline == now + timeout
                sent[node_id] = step
                open_.add(node_id)
                live.append(step)
                limit = parallelism(lookup, step.path, alpha)
                assert Counter(q.path for q in live)[step.path] <= limit
            else:
                # A path that finished (its k closest answered, a late answer included)
                # waits for nothing it still has in flight.
                waited = [q for q in live if not path_of(lookup, q.path).finished]
                assert waited and step.until == min(q.deadline for q in waited)
        elif action in ("respond", "fail") and open_:
            node_id = data.draw(st.sampled_from(sorted(open_)))
            open_.discard(node_id)
            if action == "respond":
                closer = data.draw(st.lists(st.sampled_from(POOL), max_size=6))
                assert lookup.on_response(node_id, closer)
                responded.add(node_id)
            else:
                assert lookup.on_failure(node_id)
        elif action == "stray":
            node_id = data.draw(st.sampled_from(POOL)).node_id
            expected = node_id in open_
            assert lookup.on_response(node_id, [POOL[0]]) is expected
            if expected:
                open_.discard(node_id)
                responded.add(node_id)
        result = [c.node_id for c in lookup.result()]
        assert len(result) <= k
        assert result == sorted(result, key=lambda i: dist(i, TARGET0))
        assert set(result) <= responded


# -- exhaustive: a lookup that found every node reachable (a small network) ---------------


def small_net(size: int, seed: str) -> Net:
    """``size`` nodes, each knowing all the others."""
    rng = random.Random(f"{NET_SEED}/{seed}")
    contacts = [synthetic(rng.randbytes(32), i) for i in range(size)]
    tables = {}
    for c in contacts:
        table = RoutingTable(c.node_id, subnet_limit=K, table_subnet_limit=None)
        for other in contacts:
            if other.node_id != c.node_id:
                table.observe(other, 0.0)
        tables[c.node_id] = table
    return Net(contacts, tables)


def small_lookup(net: Net, target: bytes, dead: frozenset[bytes] = frozenset()) -> ClosestPeersIter:
    origin = net.contacts[0].node_id
    rng = random.Random(f"{NET_SEED}/small")

    def answer(p: bytes) -> list[Contact] | None:  # the requester left out, as nodes do
        if p in dead:
            return None
        return [c for c in net.answer(p, target, K + 1) if c.node_id != origin][:K]

    it = ClosestPeersIter(target, net.answer(origin, target), local_id=origin)
    drive(it, answer, rng, mode="batch")
    return it


def test_a_lookup_of_a_network_smaller_than_an_answer_is_exhaustive_and_the_same_for_any_target(
) -> None:  # fmt: skip
    net = small_net(WHOLE_ANSWER, "whole")  # each answer: the others but the asker
    rng = random.Random(f"{NET_SEED}/targets")
    results = []
    for _ in range(20):
        it = small_lookup(net, rng.randbytes(32))
        assert it.exhaustive
        results.append({c.node_id for c in it.result()})
    assert results == [{c.node_id for c in net.contacts[1:]}] * 20


def test_a_lookup_is_not_exhaustive_if_a_node_failed_or_an_answer_may_have_been_cut() -> None:
    net = small_net(WHOLE_ANSWER, "dead")
    dead = frozenset({net.contacts[-1].node_id})
    assert not small_lookup(net, bytes(32), dead).exhaustive  # it may answer the next one
    # Answers as long as a datagram may cut: a sender may have known more than it said.
    assert not small_lookup(small_net(WHOLE_ANSWER + 2, "cut"), bytes(32)).exhaustive
    # A full lookup of a larger network bounds nothing beyond its k.
    assert not small_lookup(small_net(K + 5, "large"), bytes(32)).exhaustive
