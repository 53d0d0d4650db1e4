"""Iterative lookups (sans-I/O), in the style of rust-libp2p's ``ClosestPeersIter``.

The caller drives the iterator: ``next(now)`` says whom to query (``Query``),
that nothing can be sent until a response or a deadline (``Wait``), or that the
lookup is over (``Finished``); the caller reports ``on_response(peer, closer)``
and ``on_failure(peer)``.

Invariants:

* at most ``alpha`` queries are in flight; a query past its deadline stops
  counting as in flight (the peer is *unresponsive*) so a dead node never holds
  a slot longer than its timeout, yet its late answer is still used;
* when ``alpha`` answers in a row bring no peer closer than the closest known,
  the lookup is *stalled* and may have ``k`` queries in flight until progress
  resumes (rust-libp2p's rule: it stops a lookup from crawling past dead nodes
  three at a time);
* responses from peers that were not queried are ignored (unsolicited);
* the lookup finishes when the ``k`` closest peers known have all answered,
  with no closer peer left unqueried or still in flight, or when nobody is left
  to ask;
* it sends at most ``max_queries`` queries (``MAX_QUERIES`` = 8 k: a healthy lookup
  in 10,000 nodes sends ~42), and so learns at most that many answers' contacts:
  hostile nodes that answer with ever closer fresh IDs (each only has to beat the
  k-th closest that answered, or be unreachable and never answer) would otherwise
  keep it asking, and remembering, without end. Past the cap it waits for the
  queries in flight and finishes with what answered.

``DisjointLookup`` runs ``d`` such iterators over node-disjoint paths
(S/Kademlia §4.4): no peer is queried by two paths, so one adversary-free path
is enough to find the true closest nodes.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Container, Iterable
from dataclasses import dataclass

from dna_core.overlay.codec import WHOLE_ANSWER
from dna_core.overlay.contact import Contact, id_int


class _State(enum.Enum):
    NOT_CONTACTED = 0
    WAITING = 1
    SUCCEEDED = 2
    FAILED = 3
    UNRESPONSIVE = 4
    CLAIMED_ELSEWHERE = 5  # queried by another disjoint path


@dataclass(frozen=True, slots=True)
class Query:
    contact: Contact
    deadline: float
    path: int = 0


@dataclass(frozen=True, slots=True)
class Wait:
    until: float | None  # call next() again by then (or on any response)


@dataclass(frozen=True, slots=True)
class Finished:
    pass


Step = Query | Wait | Finished
FINISHED = Finished()
MAX_QUERIES_PER_K = 8  # a lookup (each disjoint path) sends at most 8 k queries


@dataclass(slots=True)
class _Peer:
    contact: Contact
    state: _State = _State.NOT_CONTACTED
    deadline: float = 0.0


class ClosestPeersIter:
    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        k: int = 20,
        alpha: int = 3,
        timeout: float = 1.0,
        local_id: bytes | None = None,
        claimed: set[bytes] | None = None,
        path: int = 0,
        max_queries: int | None = None,
    ) -> None:
        self.target = id_int(target)
        self.k, self.alpha, self.timeout = k, alpha, timeout
        self.max_queries = MAX_QUERIES_PER_K * k if max_queries is None else max_queries
        self.path = path
        self._local_id = local_id
        self._claimed = claimed  # shared between disjoint paths
        self._peers: dict[bytes, _Peer] = {}
        self._order: list[tuple[int, bytes]] = []
        self._waiting: dict[bytes, float] = {}
        self._finished = False
        self._no_progress = 0  # answers in a row that brought nothing closer
        self._whole = True  # every answer so far held all its sender knows (`exhaustive`)
        self.queries = self.responses = self.failures = 0
        self._add(seeds)

    @property
    def finished(self) -> bool:
        return self._finished

    def next(self, now: float) -> Step:
        if self._finished:
            return FINISHED
        self._expire(now)
        step = self._scan(now)
        if step is not None:
            return step
        return self._wait() if self._waiting else self._finish()

    def _scan(self, now: float) -> Step | None:
        """Walk peers closest first: query, wait, or finish; None when the list runs out."""
        successes = 0
        closer_in_flight = False
        parallelism = self.k if self.stalled else self.alpha
        for _, node_id in self._order:
            peer = self._peers[node_id]
            if peer.state is _State.SUCCEEDED:
                successes += 1
                if successes >= self.k:
                    # A closer peer still in flight may change the k closest: wait for it.
                    return self._wait() if closer_in_flight else self._finish()
            elif peer.state is _State.WAITING:
                closer_in_flight = True
            elif peer.state is _State.NOT_CONTACTED:
                if self.queries >= self.max_queries:
                    continue  # spent: the answers in flight, then finish
                if len(self._waiting) >= parallelism:
                    return self._wait()
                if self._claimed is not None:
                    if node_id in self._claimed:
                        peer.state = _State.CLAIMED_ELSEWHERE
                        continue
                    self._claimed.add(node_id)
                return self._query(peer, now)
        return None

    def _wait(self) -> Wait:
        return Wait(min(self._waiting.values()))

    def on_response(self, node_id: bytes, closer: Iterable[Contact]) -> bool:
        """``node_id`` answered with ``closer``; False if we never asked it."""
        peer = self._peers.get(node_id)
        if peer is None or peer.state not in (_State.WAITING, _State.UNRESPONSIVE):
            return False
        self._waiting.pop(node_id, None)
        peer.state = _State.SUCCEEDED
        self.responses += 1
        closer = tuple(closer)
        self._whole = self._whole and len(closer) < min(self.k, WHOLE_ANSWER)
        if not self._finished:
            before = self._order[0][0] if self._order else None
            self._add(closer)
            progressed = self._order and self._order[0][0] != before
            self._no_progress = 0 if progressed else self._no_progress + 1
        return True

    @property
    def stalled(self) -> bool:
        return self._no_progress >= self.alpha

    def on_failure(self, node_id: bytes) -> bool:
        peer = self._peers.get(node_id)
        if peer is None or peer.state not in (_State.WAITING, _State.UNRESPONSIVE):
            return False
        self._waiting.pop(node_id, None)
        peer.state = _State.FAILED
        self.failures += 1
        return True

    @property
    def exhaustive(self) -> bool:
        """The lookup found every node reachable from here, so its result is the same
        whatever the target (a small network): it learned fewer than k nodes (so its seeds
        were this node's whole table), every one of them answered, and every answer was
        short of k and of what a datagram always carries whole (``WHOLE_ANSWER``), so no
        answer was cut: each sender told all it knows."""
        return (
            self._finished
            and self._whole
            and len(self._peers) < self.k
            and all(p.state is _State.SUCCEEDED for p in self._peers.values())
        )

    @property
    def missed(self) -> int:
        """Peers asked that never answered (timed out or failed), closer than the k-th
        answer: the result may lack them. A node under load answers past the adaptive
        deadline and is dropped, so a lookup can end short in a network that has more."""
        missed = successes = 0
        for _, node_id in self._order:
            state = self._peers[node_id].state
            if state is _State.SUCCEEDED:
                successes += 1
                if successes >= self.k:
                    break
            elif state in (_State.UNRESPONSIVE, _State.FAILED):
                missed += 1
        return missed

    def result(self, exclude: Container[bytes] = frozenset()) -> list[Contact]:
        """The (up to) k closest peers that answered, closest first (none in ``exclude``)."""
        found = [c for c in self.succeeded() if c.node_id not in exclude]
        return found[: self.k]

    def succeeded(self) -> list[Contact]:
        """Every peer that answered, closest first."""
        peers = self._peers
        return [peers[n].contact for _, n in self._order if peers[n].state is _State.SUCCEEDED]

    def asked(self, node_id: bytes) -> bool:
        peer = self._peers.get(node_id)
        return peer is not None and peer.state in (_State.WAITING, _State.UNRESPONSIVE)

    def _query(self, peer: _Peer, now: float) -> Query:
        peer.state = _State.WAITING
        peer.deadline = now + self.timeout
        self._waiting[peer.contact.node_id] = peer.deadline
        self.queries += 1
        return Query(peer.contact, peer.deadline, self.path)

    def _expire(self, now: float) -> None:
        for node_id, deadline in list(self._waiting.items()):
            if now >= deadline:
                del self._waiting[node_id]
                self._peers[node_id].state = _State.UNRESPONSIVE

    def _finish(self) -> Finished:
        self._finished = True
        return FINISHED

    def _add(self, contacts: Iterable[Contact]) -> None:
        for contact in contacts:
            node_id = contact.node_id
            if node_id in self._peers or node_id == self._local_id:
                continue
            self._peers[node_id] = _Peer(contact)
            bisect.insort(self._order, (contact.key ^ self.target, node_id))


class DisjointLookup:
    """``d`` node-disjoint ClosestPeersIter paths over one shared claim set."""

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        paths: int = 3,
        k: int = 20,
        alpha: int = 3,
        timeout: float = 1.0,
        local_id: bytes | None = None,
        max_queries: int | None = None,
    ) -> None:
        seeds = list(seeds)
        claimed: set[bytes] = set()
        self.k = k
        self.target = id_int(target)
        self.paths = [
            ClosestPeersIter(
                target, seeds[i::paths], k=k, alpha=alpha, timeout=timeout,
                local_id=local_id, claimed=claimed, path=i, max_queries=max_queries,
            )
            for i in range(paths)
        ]  # fmt: skip
        self._turn = 0

    @property
    def finished(self) -> bool:
        return all(p.finished for p in self.paths)

    @property
    def timeout(self) -> float:
        return self.paths[0].timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        for p in self.paths:
            p.timeout = value

    def next(self, now: float) -> Step:
        """A query from the next path that has one, round robin."""
        until: float | None = None
        for offset in range(len(self.paths)):
            path = self.paths[(self._turn + offset) % len(self.paths)]
            step = path.next(now)
            if isinstance(step, Query):
                self._turn = (path.path + 1) % len(self.paths)
                return step
            if isinstance(step, Wait) and step.until is not None:
                until = step.until if until is None else min(until, step.until)
        return FINISHED if self.finished else Wait(until)

    def on_response(self, node_id: bytes, closer: Iterable[Contact]) -> bool:
        return any(p.on_response(node_id, closer) for p in self.paths if p.asked(node_id))

    def on_failure(self, node_id: bytes) -> bool:
        return any(p.on_failure(node_id) for p in self.paths if p.asked(node_id))

    @property
    def exhaustive(self) -> bool:
        """Never claimed: a peer claimed by another path is not asked by this one."""
        return False

    @property
    def missed(self) -> int:
        return sum(p.missed for p in self.paths)

    def result(self, exclude: Container[bytes] = frozenset()) -> list[Contact]:
        found = [c for c in self.succeeded() if c.node_id not in exclude]
        return found[: self.k]

    def succeeded(self) -> list[Contact]:
        merged = {c.node_id: c for p in self.paths for c in p.succeeded()}
        return sorted(merged.values(), key=lambda c: c.key ^ self.target)

    @property
    def queries(self) -> int:
        return sum(p.queries for p in self.paths)
