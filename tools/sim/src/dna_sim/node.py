"""A simulated overlay member: the lead's sans-I/O cores behind a message pump.

A ``SimNode`` does what the asyncio adapter (``dna_core.overlay.aio.node``) does, minus
the sockets:

* it answers find-node with ``RoutingTable.closest(target)`` and pings with pongs;
* it observes every requester and every matched responder (so tables evolve as in a live
  network) and answers the liveness checks a full bucket asks for (``Observed.check``);
* it matches a response by request ID *and* source, and drops anything else;
* it drives lookups (``LookupRun``): every ``Query`` becomes a datagram with a deadline
  timer, and ``next()`` is called again on each response and each deadline.

Two deadlines per request, as in the adapter. The lookup's is adaptive: the node's
``RttEstimator`` (RFC 6298 §2) gives ``clamp(srtt + 4 * rttvar)``, so a dead peer holds a
lookup slot for a few RTTs, not a fixed second (the ``kademlia`` package's 5 s p50 with
half its nodes gone is what this avoids); past it the lookup moves on but still takes a
late answer. The hard one, ``rto_ceiling``, decides failure (``it.on_failure``,
``table.on_failure``, a failed liveness check).

Adversarial nodes answer find-node with the colluding nodes closest to the target only,
which looks plausible (they are close) but leads a single-path lookup into the coalition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dna_core.overlay import (
    Admission,
    ClosestPeersIter,
    Contact,
    DisjointLookup,
    Finished,
    Query,
    RoutingTable,
    RttEstimator,
)

from dna_sim.network import FIND_NODE, NODES, PING, PONG, Message, SimNetwork
from dna_sim.xor import xor_closest

Lookup = ClosestPeersIter | DisjointLookup


@dataclass(frozen=True, slots=True)
class NodeConfig:
    k: int = 20
    alpha: int = 3
    rto_initial: float = 0.5  # the adapter's RttEstimator default
    # One estimator per node averages over paths of 15-70 ms RTT (NetConfig defaults), so
    # srtt + 4 * rttvar (~85 ms) sometimes dips under a slow path's RTT: with the
    # adapter's 50 ms floor, 0.05 live peers per lookup miss their deadline. A floor at the
    # slowest path's RTT (70 ms) removes that and costs dead peers nothing extra.
    rto_floor: float = 0.070
    rto_ceiling: float = 2.0  # the adapter's request_timeout: a request has failed
    fresh: float = 900.0  # BEP 5: a node heard from within 15 min is good, no ping needed


class AddressBook:
    """Maps contacts to node indices: the simulator's stand-in for UDP addressing."""

    __slots__ = ("contacts", "index_of")

    def __init__(self, contacts: Sequence[Contact]) -> None:
        self.contacts = list(contacts)
        self.index_of = {c.node_id: i for i, c in enumerate(self.contacts)}


class Coalition:
    """The adversarial nodes, colluding: each knows every member."""

    __slots__ = ("contacts", "keys")

    def __init__(self, members: Sequence[Contact]) -> None:
        ordered = sorted(members, key=lambda c: c.key)
        self.contacts = ordered
        self.keys = [c.key for c in ordered]

    def closest(self, target: bytes, count: int) -> list[Contact]:
        picked = xor_closest(self.keys, int.from_bytes(target, "big"), count)
        return [self.contacts[i] for i in picked]


class Pending:
    """A request in flight, until answered or ``rto_ceiling`` after it was sent. A late
    answer still reaches its lookup (the iterator's UNRESPONSIVE state accepts it) unless
    the lookup has ended (``lookup`` is then None)."""

    __slots__ = ("answered", "kind", "lookup", "peer", "req_id", "sent")

    def __init__(
        self, req_id: int, kind: int, peer: Contact, sent: float, lookup: LookupRun | None
    ) -> None:
        self.req_id = req_id
        self.kind = kind
        self.peer = peer
        self.sent = sent
        self.lookup = lookup
        self.answered = False


class SimNode:
    def __init__(
        self,
        index: int,
        contact: Contact,
        net: SimNetwork,
        book: AddressBook,
        *,
        config: NodeConfig,
        coalition: Coalition | None = None,
    ) -> None:
        self.index = index
        self.contact = contact
        self.net = net
        self.book = book
        self.config = config
        self.coalition = coalition  # set on adversarial nodes only
        self.table = RoutingTable(contact.node_id, k=config.k, good_for=config.fresh)
        self.rtt = RttEstimator(
            initial=config.rto_initial, floor=config.rto_floor, ceiling=config.rto_ceiling
        )
        self.pending: dict[int, Pending] = {}
        # When each contact last sent us anything; absent = not since the oracle fill (t=0).
        self.heard: dict[bytes, float] = {}
        self.maintenance_messages = 0  # liveness pings and pongs this node sent
        self._next_req = 0

    # -- inbound ----------------------------------------------------------------

    def receive(self, msg: Message) -> None:
        kind = msg.kind
        if kind == FIND_NODE:
            self._on_find_node(msg)
        elif kind in (NODES, PONG):
            self._on_response(msg)
        elif kind == PING:
            self.observe(self.book.contacts[msg.src])
            self.maintenance_messages += 1
            self.net.send(Message(PONG, self.index, msg.src, msg.req_id))

    def _on_find_node(self, msg: Message) -> None:
        if self.coalition is not None:
            closer = self.coalition.closest(msg.target, self.config.k)
        else:
            self.observe(self.book.contacts[msg.src])
            closer = self.table.closest(msg.target)
        self.net.send(Message(NODES, self.index, msg.src, msg.req_id, contacts=closer))

    def _on_response(self, msg: Message) -> None:
        pending = self.pending.get(msg.req_id)
        if pending is None or self.book.index_of[pending.peer.node_id] != msg.src:
            return  # unsolicited, spoofed or too late: a real node drops it unread
        del self.pending[msg.req_id]
        pending.answered = True
        self.rtt.sample(self.net.now - pending.sent)
        self.observe(pending.peer)
        if pending.kind == PING:
            self.table.on_check_result(pending.peer.node_id, True, self.net.now)
        elif pending.lookup is not None:
            pending.lookup.on_reply(pending, msg.contacts)

    def _expire(self, pending: Pending) -> None:
        """The hard deadline: the request has failed."""
        if pending.answered:
            return
        del self.pending[pending.req_id]
        now = self.net.now
        if pending.kind == PING:
            self.table.on_check_result(pending.peer.node_id, False, now)
            return
        self.table.on_failure(pending.peer.node_id, now)
        if pending.lookup is not None:
            pending.lookup.on_failure(pending)

    # -- routing table upkeep -----------------------------------------------------

    def observe(self, contact: Contact) -> None:
        now = self.net.now
        self.heard[contact.node_id] = now
        check = self.table.observe(contact, now).check
        if check is None:
            return
        # The table asks for a ping of its least-recently-seen entry on *every* newcomer to
        # a full bucket. Pinging each time starts a cascade (the pinged node observes us,
        # pings its own LRS entry, ...): 9.4M ping/pong messages beside 0.48M lookup
        # messages for 10,000 lookups on 10,000 nodes. As in BEP 5, recent traffic is the
        # answer; only a contact gone quiet for `fresh` seconds is pinged.
        if now - self.heard.get(check.node_id, 0.0) < self.config.fresh:
            self.table.on_check_result(check.node_id, True, now)
        else:
            self._ping(check)

    def admit(self, contact: Contact) -> bool:
        """Offer ``contact`` to the table (the oracle fill); True if it was inserted."""
        return self.table.observe(contact, self.net.now).admission is Admission.INSERTED

    def warm_up(self, contacts: Sequence[Contact]) -> None:
        """Ping ``contacts`` (liveness checks: a silent one is evicted)."""
        for contact in contacts:
            self._ping(contact)

    def _ping(self, contact: Contact) -> None:
        self.request(PING, contact, b"", None)
        self.maintenance_messages += 1

    # -- outbound -----------------------------------------------------------------

    def request(self, kind: int, peer: Contact, target: bytes, lookup: LookupRun | None) -> Pending:
        self._next_req += 1
        net = self.net
        pending = Pending(self._next_req, kind, peer, net.now, lookup)
        self.pending[pending.req_id] = pending
        dst = self.book.index_of[peer.node_id]
        net.send(Message(kind, self.index, dst, pending.req_id, target=target))
        net.call_at(net.now + self.config.rto_ceiling, self._expire, pending)
        return pending

    def lookup(
        self, target: bytes, on_done: Callable[[LookupRun], None], *, paths: int = 1
    ) -> LookupRun:
        """Start an iterative find-node for ``target`` over ``paths`` disjoint paths, seeded
        with k contacts per path (as the adapter's ``find_node`` does)."""
        k, alpha = self.config.k, self.config.alpha
        local_id = self.contact.node_id
        seeds = self.table.closest(target, k * max(1, paths))
        it: Lookup
        if paths > 1:
            it = DisjointLookup(target, seeds, paths=paths, k=k, alpha=alpha, local_id=local_id)
        else:
            it = ClosestPeersIter(target, seeds, k=k, alpha=alpha, local_id=local_id)
        run = LookupRun(self, it, target, on_done)
        run.pump()
        return run


class LookupRun:
    """Drives one lookup iterator over the network and keeps its statistics.

    Hops: the longest chain of sequential round trips behind the result. A contact from
    the local table is 1 hop away; one first learned from a contact at ``h`` hops is at
    ``h + 1``; the lookup's figure is the maximum over the contacts in its result.
    Messages: requests sent plus responses received before the lookup ended.
    Timeouts: queries that missed their (adaptive) lookup deadline.
    """

    __slots__ = (
        "depth",
        "done",
        "ended",
        "it",
        "messages",
        "node",
        "on_done",
        "requests",
        "started",
        "target",
        "target_key",
        "timeouts",
    )

    def __init__(
        self,
        node: SimNode,
        it: Lookup,
        target: bytes,
        on_done: Callable[[LookupRun], None],
    ) -> None:
        self.node = node
        self.it = it
        self.target = target
        self.target_key = int.from_bytes(target, "big")
        self.on_done = on_done
        self.started = node.net.now
        self.ended = 0.0
        self.requests: list[Pending] = []
        self.depth: dict[bytes, int] = {}
        self.messages = 0
        self.timeouts = 0
        self.done = False

    def pump(self) -> None:
        node, it = self.node, self.it
        while True:
            # One timeout per iterator in the core: refresh it from the node's estimate
            # before every step, so each new query gets a current deadline.
            it.timeout = node.rtt.timeout
            step = it.next(node.net.now)
            if type(step) is Query:
                self._send(step)
            elif isinstance(step, Finished):
                self._end()
                return
            else:
                return  # Wait: its `until` is always a deadline we hold a timer for

    def _send(self, query: Query) -> None:
        peer = query.contact
        pending = self.node.request(FIND_NODE, peer, self.target, self)
        self.requests.append(pending)
        self.depth.setdefault(peer.node_id, 1)
        self.messages += 1
        self.node.net.call_at(query.deadline, self._on_deadline, pending)

    def on_reply(self, pending: Pending, closer: Sequence[Contact]) -> None:
        self.messages += 1
        peer_id = pending.peer.node_id
        self.it.on_response(peer_id, closer)
        hop = self.depth[peer_id] + 1
        setdefault = self.depth.setdefault
        for contact in closer:
            setdefault(contact.node_id, hop)
        self.pump()

    def on_failure(self, pending: Pending) -> None:
        self.it.on_failure(pending.peer.node_id)
        self.pump()

    def _on_deadline(self, pending: Pending) -> None:
        if self.done or pending.answered:
            return
        self.timeouts += 1
        self.pump()  # next() marks the peer unresponsive and frees its slot

    def _end(self) -> None:
        self.done = True
        self.ended = self.node.net.now
        for request in self.requests:
            request.lookup = None  # a late answer still updates the table, not the result
        self.requests = []
        self.on_done(self)

    def result(self) -> list[Contact]:
        return self.it.result()

    def hops(self, result: Sequence[Contact]) -> int:
        return max((self.depth.get(c.node_id, 1) for c in result), default=0)
