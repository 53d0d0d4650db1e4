"""One overlay node's coordination, sans-I/O: what a node does with what it hears.

The asyncio node (``aio/node.py``) and the simulator (``dna_sim``) drive this one class,
as rust-libp2p's kad ``Behaviour`` is driven by its swarm and aioquic's connection by
its asyncio adapter. They feed it events, each with ``now``:

* a response datagram arrived (``on_response``); a request came from an address the
  requester proved it receives at (``observe_requester``, the ``Responder``'s hook);
* a timer it asked for fired (``on_timer``);
* an operation is wanted: ``ping``, ``check_liveness``, ``lookup``, ``refresh``;

and carry out what it queues, taken with ``poll()``: ``Send`` a request datagram to an
address, ``StartTimer``; the ends of operations (``PingDone``, ``LookupDone``); a contact
new to the routing table (``ContactAdded``, for store-on-join); and what adapters count
(``RequestEnded``, ``Rejected``). Answering requests is not here: the
``Responder`` (bytes, tokens, amplification) or the simulator's answerer does it.

Invariants:

* every request ends exactly once: answered (matched by request ID *and* address,
  ``RequestTracker``) or failed at its hard deadline (``request_timeout``). A
  ``TokenReply`` is followed by the same request once more, with the token; a second
  one fails the request;
* a contact is observed (offered to the routing table) only when it answers a request of
  ours or sends one from a proven address, and only once it has proven its node key from
  that address: one challenge per (ID, address) at a time, at most ``MAX_KEY_PROOFS`` at
  once and ``MAX_KEY_PROOFS_PER_SUBNET`` of them to one subnet for requesters (a node
  that answered us is challenged whatever those caps say). ``prove_keys=False`` is
  for the simulator, whose contacts are minted, not claimed;
* what a node remembers of others (``SubnetLru``: which address an ID proved its key
  from, an address's latest token, which IDs are suspect) holds at most ``*_PER_SUBNET``
  entries of one /24 or /48 (loopback exempt on a local testnet): one subnet's many IDs
  and addresses push out only its own;
* every liveness check a full bucket asks for (``Observed.check``) is pinged and its
  result reported to the table, which evicts a silent contact for a waiting newcomer;
* a lookup's query has two deadlines: the iterator's adaptive one (RTT, RFC 6298), past
  which the peer no longer holds a slot, and the hard one, past which it has failed: the
  iterator is told, the table counts a failure, and the peer is *suspect* for
  ``SUSPECT_SECONDS``: not used as a seed or candidate, unless fewer than alpha would
  remain. A lookup that finishes with fewer than k results while queries are open waits
  one more adaptive timeout for them; then it marks its bucket refreshed and ends
  (``LookupDone``);
* a lookup ends at the latest ``lookup_timeout`` after it started, with the peers that
  answered by then, and sends at most ``lookup.MAX_QUERIES_PER_K`` k queries a path:
  nodes answering slowly, or with ever closer fresh contacts, bound its time and work.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dna_core.crypto.node import verify_node_signature
from dna_core.errors import ProtocolError
from dna_core.overlay.codec import (
    CHALLENGE_BYTES,
    Body,
    Datagram,
    FindNode,
    Nodes,
    Ping,
    Pong,
    TokenReply,
)
from dna_core.overlay.contact import (
    BLOCK_FACTOR,
    Contact,
    Scope,
    address_scope,
    block_of_subnet,
    host_of,
    subnet_cap_exempt,
    subnet_of,
)
from dna_core.overlay.kbucket import (
    GOOD_FOR,
    TABLE_SUBNET_LIMIT,
    Admission,
    K,
    Observed,
    RoutingTable,
)
from dna_core.overlay.lookup import ClosestPeersIter, DisjointLookup, Finished, Query
from dna_core.overlay.protocol import (
    PONG_DOMAIN,
    Addr,
    Pending,
    RequestTracker,
    proven_contact,
    request_for,
)
from dna_core.overlay.rtt import RttEstimator
from dna_core.overlay.subnet_lru import SubnetLru

# Each memory below holds at most *_PER_SUBNET entries of one /24 (IPv6 /48), loopback
# exempt on a local testnet; a subnet beyond its share replaces its own least recently used
# (``SubnetLru``), so flushing one takes size / share subnets.
TOKEN_CACHE_SIZE = 4096  # addresses whose latest token is kept for the next request
# Each address a request comes from gets a key challenge, whose answer brings a token: one
# subnet answering from 4,100 ports used to push every other node's token out (our next
# request to each went padded and unproven: not observed, a full answer one more round trip).
TOKENS_PER_SUBNET = 32
SUSPECT_SECONDS = 10.0  # a node that just failed us is not asked again for this long
SUSPECT_CACHE_SIZE = 4096
# Hostile answers listing fresh IDs of their subnet that never answer used to push every
# other suspect out (a node that had just died was asked again, its timeout waited out).
SUSPECTS_PER_SUBNET = 32
PROVEN_KEYS_SIZE = 8192  # node ID -> the address it proved its key from
# IDs cost 8 puzzle bits and a proof one round trip, so one subnet proving thousands of IDs
# used to push every other node's proof out (each then challenged again, its lookups' ends
# waiting for it, or left out of a result).
PROVEN_KEYS_PER_SUBNET = 32
MAX_KEY_PROOFS = 256  # challenges in flight at once; beyond, senders wait for the next time
# ...and from one /24 (IPv4) or /48 (IPv6), loopback exempt as in the table: otherwise one
# address claiming hundreds of fresh IDs (cheap at 8 puzzle bits) and never answering
# holds them all, and no other node proves its key and enters the table while it does.
MAX_KEY_PROOFS_PER_SUBNET = 8
# ...and twice that from one IPv6 /32 (`contact.block_of`): with 65,536 /48s, one /32 held
# them all from 32 of its /48s.
MAX_KEY_PROOFS_PER_BLOCK = BLOCK_FACTOR * MAX_KEY_PROOFS_PER_SUBNET
# A lookup follows at most this many new contacts of one answer at one IP address (IPv6:
# /64; as a bucket holds two of a /24): a hostile answer listing 20 fresh IDs at one
# victim's address, on 20 ports, would otherwise make every lookup that asked it send the
# victim 20 padded requests (8x its answer's bytes; now under 1x). Per answer, not per
# lookup, so that a hostile answer cannot use up an honest node's share. Loopback is
# exempt on a local testnet, as in the table.
LOOKUP_CONTACTS_PER_IP = 2


@dataclass(frozen=True, slots=True)
class BehaviourConfig:
    k: int = K
    alpha: int = 3
    request_timeout: float = 2.0  # the hard deadline of a request, and the RTT ceiling
    rto_initial: float = 0.5  # the adaptive timeout before the first round trip is measured
    rto_floor: float = 0.05
    good_for: float = GOOD_FOR  # a contact heard from this recently is not pinged for room
    allow_loopback: bool = False  # local testnets: loopback peers skip the /24 limit
    # contacts of one /24 (/48) in the whole table; None: uncounted (the simulator)
    table_subnet_limit: int | None = TABLE_SUBNET_LIMIT
    prove_keys: bool = True  # challenge contacts for their node key before observing them
    # A lookup ends by then with what answered, whatever is still open: hostile answers
    # (slow ones, ever closer ones, unreachable ones) cannot hold an operation longer.
    lookup_timeout: float = 10.0


# -- commands: what the driver carries out ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send this request datagram to ``addr`` (the aio node encodes it first)."""

    addr: Addr
    datagram: Datagram


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Call ``on_timer(timer, now)`` once ``when`` has come. Timers are never cancelled:
    one whose work is done by then is ignored. Each ``timer`` object is started once."""

    when: float
    timer: object


@dataclass(frozen=True, slots=True)
class PingDone:
    """A ``ping`` ended: ``contact`` answered and proved its key (it was observed), or
    None (no answer in time, or no valid proof)."""

    ping: PingOp
    contact: Contact | None


@dataclass(frozen=True, slots=True)
class LookupDone:
    lookup: Lookup


@dataclass(frozen=True, slots=True)
class RequestEnded:
    """For the adapter's counters: one per request sent."""

    method: str  # "ping" or "findnode"
    outcome: str  # "ok" (answered) or "timeout"


@dataclass(frozen=True, slots=True)
class Rejected:
    """For the adapter's counters: a response refused."""

    reason: str  # "unsolicited_response", "key_unproven" or "another_node"


@dataclass(frozen=True, slots=True)
class ContactAdded:
    """``contact`` entered the routing table, not known there before (not a refresh of an
    entry), as a newcomer to a bucket with room or from a bucket's replacement cache in
    place of a dead entry: a node holding records may owe it some (store-on-join,
    ``handoff.py``)."""

    contact: Contact


Command = Send | StartTimer | PingDone | LookupDone | RequestEnded | Rejected | ContactAdded


# -- operations in flight -----------------------------------------------------------------


class PingOp:
    """A ping in flight: asked for by the driver (``ping``), a liveness check of a table
    entry (``check``), or a node-key challenge (``proving``)."""

    __slots__ = ("addr", "asked", "challenge", "check", "proving", "solicited")

    def __init__(
        self,
        addr: Addr,
        challenge: bytes,
        *,
        asked: bool = False,
        check: Contact | None = None,
        proving: tuple[bytes, Addr] | None = None,
        solicited: bool = False,
    ) -> None:
        self.addr = addr
        self.challenge = challenge
        self.asked = asked
        self.check = check
        self.proving = proving
        self.solicited = solicited  # (a proving challenge to a node that answered us)


class Lookup:
    """An iterative find-node and its figures.

    Hops: the longest chain of sequential round trips behind the result. A contact from
    the local table is 1 hop away; one first learned from a contact at ``h`` hops is at
    ``h + 1``; the lookup's figure is the maximum over the contacts in its result.
    Messages: requests sent plus answers taken before the lookup ended.
    Timeouts: queries that missed their adaptive deadline before the lookup ended.
    """

    __slots__ = (
        "awaiting",
        "depth",
        "done",
        "ended",
        "grace",
        "it",
        "messages",
        "open",
        "request",
        "selves",
        "started",
        "target",
        "timeouts",
        "unproven",
    )

    def __init__(self, target: bytes, it: ClosestPeersIter | DisjointLookup, now: float) -> None:
        self.target = target
        self.it = it
        self.request = FindNode(target)
        self.started = now
        self.ended = 0.0
        self.done = False
        self.grace = False  # the iterator finished; open queries get one more timeout
        self.open = 0  # queries neither answered nor failed
        # Each peer that answered as it described itself, from the address it answered at
        # (`proven_contact`): what a third party listed for it (its gRPC port) is not used.
        self.selves: dict[bytes, Contact] = {}
        self.awaiting: set[tuple[bytes, Addr]] = set()  # key proofs the end waits for
        self.unproven: frozenset[bytes] = frozenset()  # answered, key not proven: left out
        self.depth: dict[bytes, int] = {}
        self.messages = 0
        self.timeouts = 0

    @property
    def queries(self) -> int:
        return self.it.queries

    def result(self) -> list[Contact]:
        """The (up to) k closest peers that answered and proved their node key at the
        address they answered from, closest first, each as it described itself."""
        selves = self.selves
        return [selves.get(c.node_id, c) for c in self.it.result(self.unproven)]

    @property
    def exhaustive(self) -> bool:
        """The result holds every node reachable from here (``ClosestPeersIter``)."""
        return self.it.exhaustive and not self.unproven

    @property
    def missed(self) -> int:
        """Peers asked that never answered, closer than the k-th answer (``ClosestPeersIter``)."""
        return self.it.missed

    def hops(self, result: Sequence[Contact]) -> int:
        return max((self.depth.get(c.node_id, 1) for c in result), default=0)


class _Budget:
    """The timer of a lookup's ``lookup_timeout``."""

    __slots__ = ("lookup",)

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup


class _Query:
    """One find-node of a lookup; also the timer of its adaptive deadline."""

    __slots__ = ("deadline", "done", "lookup", "peer", "scope", "subnet")

    def __init__(self, lookup: Lookup, peer: Contact, deadline: float, subnet: str | None) -> None:
        self.lookup = lookup
        self.peer = peer.node_id
        self.scope = peer.scope  # of the address asked: what its answer may list
        self.subnet = subnet  # of the address asked (None: uncounted), if it becomes suspect
        self.deadline = deadline
        self.done = False


# -- the behaviour ------------------------------------------------------------------------


class OverlayBehaviour:
    def __init__(
        self,
        local_id: bytes,
        config: BehaviourConfig,
        rng: random.Random,
        *,
        sender: Contact | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.local_id = local_id
        self.config = config
        self.rng = rng  # request IDs and refresh targets
        # Our contact, sent with every request; None for a client (never observed by others).
        self.sender = sender
        self.table = RoutingTable(
            local_id, k=config.k, allow_loopback=config.allow_loopback, good_for=config.good_for,
            table_subnet_limit=config.table_subnet_limit,
        )  # fmt: skip
        self.rtt = RttEstimator(
            initial=config.rto_initial, floor=config.rto_floor, ceiling=config.request_timeout
        )
        self.tracker = RequestTracker(rng)
        self._entropy = entropy  # ping challenges: unpredictable, or answers could be replayed
        self._out: list[Command] = []
        self._tokens = SubnetLru[Addr, bytes](TOKEN_CACHE_SIZE, TOKENS_PER_SUBNET)
        # Other nodes keep dead contacts until their own checks run; without this memory every
        # lookup would rediscover them from answers and wait out their timeouts again.
        # (node ID -> until when)
        self._suspects = SubnetLru[bytes, float](SUSPECT_CACHE_SIZE, SUSPECTS_PER_SUBNET)
        self._proven_keys = SubnetLru[bytes, Addr](PROVEN_KEYS_SIZE, PROVEN_KEYS_PER_SUBNET)
        self._proving: dict[tuple[bytes, Addr], str | None] = {}  # -> its subnet (or exempt)
        self._proving_per_subnet: Counter[str] = Counter()
        self._proving_per_block: Counter[str] = Counter()
        self._proofs_awaited: dict[tuple[bytes, Addr], set[Lookup]] = {}
        self._solicited = 0  # challenges in flight to nodes that answered us (uncapped)

    def poll(self) -> list[Command]:
        """The commands queued since the last poll, oldest first."""
        out = self._out
        if not out:
            return []  # (most events queue nothing: keep the queue, it is empty)
        self._out = []
        return out

    # -- operations -----------------------------------------------------------------------

    def ping(self, addr: Addr, now: float, *, timeout: float | None = None) -> PingOp:
        """Ping ``addr`` with a key challenge; ends with ``PingDone``."""
        op = PingOp(addr, self._challenge(), asked=True)
        self._request(addr, Ping(op.challenge), now, op, timeout=timeout)
        return op

    def check_liveness(self, contact: Contact, now: float) -> None:
        """Ping a table entry; the table learns whether it answered (a silent one goes)."""
        op = PingOp(contact.endpoint.udp, self._challenge(), check=contact)
        self._request(op.addr, Ping(op.challenge), now, op)

    def lookup(self, target: bytes, now: float, *, paths: int = 1) -> Lookup:
        """Start an iterative lookup of the k closest nodes to ``target`` over ``paths``
        disjoint paths, seeded with k trusted contacts per path; ends with ``LookupDone``."""
        config = self.config
        seeds = self.trusted(self.table.closest(target, config.k * paths), now)
        it: ClosestPeersIter | DisjointLookup
        if paths > 1:
            it = DisjointLookup(
                target, seeds, paths=paths, k=config.k, alpha=config.alpha,
                timeout=self.rtt.timeout, local_id=self.local_id,
            )  # fmt: skip
        else:
            it = ClosestPeersIter(
                target, seeds, k=config.k, alpha=config.alpha,
                timeout=self.rtt.timeout, local_id=self.local_id,
            )  # fmt: skip
        lookup = Lookup(target, it, now)
        self._out.append(StartTimer(now + config.lookup_timeout, _Budget(lookup)))
        self._pump(lookup, now)
        return lookup

    def refresh(self, now: float, interval: float) -> list[Lookup]:
        """Look up a random ID in every bucket not looked up within ``interval``."""
        return [self.lookup(t, now) for t in self.table.refresh_targets(now, interval, self.rng)]

    def trusted(self, contacts: list[Contact], now: float) -> list[Contact]:
        """``contacts`` without the suspects, unless fewer than alpha would remain."""
        if not self._suspects:
            return contacts
        trusted = [c for c in contacts if self._suspects.get(c.node_id, 0.0) <= now]
        # Timeouts from our own overload (a full socket buffer, a busy loop) make everyone
        # suspect at once; asking suspects beats failing every lookup until they clear.
        return trusted if len(trusted) >= min(len(contacts), self.config.alpha) else contacts

    # -- events ---------------------------------------------------------------------------

    def on_response(self, dgram: Datagram, addr: Addr, now: float) -> None:
        """A response from ``addr``, decoded (the codec checked it)."""
        pending = self.tracker.match(dgram, addr)
        if pending is None:
            self._out.append(Rejected("unsolicited_response"))
            return
        self.rtt.sample(now - pending.sent_at)
        self._out.append(_ANSWERED[type(pending.body)])
        if dgram.token:
            self._tokens.remember(addr, dgram.token, self._subnet_of(addr[0]))
        self._heard_from(dgram, addr, now)
        owner = pending.context
        if _another_node_answered(pending, dgram):
            # The node asked for is gone from that address: another one (a new key on the
            # same host, as a storage node whose disk was replaced) answered, and was
            # observed above. For the node asked, it is no answer: otherwise its stale
            # entry passes every liveness check and every lookup, and a mailbox's replica
            # set names that one host twice (two of the W copies of a put on one disk).
            self._out.append(Rejected("another_node"))
            self._failed(pending, now)
            return
        if isinstance(dgram.body, TokenReply):
            self._token_required(pending, now)
        elif type(owner) is _Query:
            self._query_answered(owner, dgram, addr, now)
        else:
            assert type(owner) is PingOp
            self._ping_answered(owner, dgram, addr, now)

    def observe_requester(self, contact: Contact, addr: Addr, now: float) -> Observed | None:
        """``contact`` sent a request from ``addr``, an address it proved it receives at
        (``proven_contact`` put it first): observe it, once its key is proven there."""
        if not self.key_proven(contact, addr, now):
            return None
        self._suspects.forget(contact.node_id)  # it is back: it just spoke
        return self._observe(contact, now)

    def on_timer(self, timer: object, now: float) -> None:
        """A timer of a ``StartTimer`` fired; its time has come, whatever ``now`` says."""
        if type(timer) is Pending:
            self._hard_deadline(timer, now)
        elif type(timer) is _Query:
            self._soft_deadline(timer, max(now, timer.deadline))
        elif type(timer) is Lookup:
            if not timer.done:
                self._end(timer, now)  # the grace for its late queries is over
        elif type(timer) is _Budget:
            if not timer.lookup.done:  # out of time: what answered and proved is the result
                self._end(timer.lookup, now, wait_for_proofs=False)
        else:
            raise TypeError(f"not a timer of this behaviour: {timer!r}")

    def key_proven(
        self, contact: Contact, addr: Addr, now: float, *, solicited: bool = False
    ) -> bool:
        """Whether ``contact`` proved its node key from ``addr``; if not, challenge it
        (once at a time): the ping observes it when it answers.

        ``solicited``: it answered a request of ours. Those challenges are as many as our
        own requests and take no share of the caps, which bound what others' requests
        start: otherwise whoever holds the shares (32 subnets) would keep every node we
        ask out of our table and out of our lookups' results."""
        if not self.config.prove_keys:
            return True
        proven = self._proven_keys
        if proven.get(contact.node_id) == addr:
            proven.touch(contact.node_id)
            return True
        key = (contact.node_id, addr)
        if key in self._proving:
            return False
        if not solicited and len(self._proving) - self._solicited >= MAX_KEY_PROOFS:
            return False
        exempt = solicited or subnet_cap_exempt(contact.scope, self.config.allow_loopback)
        subnet = None if exempt else contact.subnet  # (of addr: proven_contact put it first)
        if subnet is not None:
            block = block_of_subnet(subnet)
            if (
                self._proving_per_subnet[subnet] >= MAX_KEY_PROOFS_PER_SUBNET
                or self._proving_per_block[block] >= MAX_KEY_PROOFS_PER_BLOCK
            ):
                return False
            self._proving_per_subnet[subnet] += 1
            self._proving_per_block[block] += 1
        self._proving[key] = subnet
        self._solicited += solicited
        op = PingOp(addr, self._challenge(), proving=key, solicited=solicited)
        self._request(addr, Ping(op.challenge), now, op)
        return False

    # -- requests -------------------------------------------------------------------------

    def _request(
        self,
        addr: Addr,
        body: Body,
        now: float,
        owner: PingOp | _Query,
        *,
        node_id: bytes | None = None,
        timeout: float | None = None,
        retried: bool = False,
    ) -> None:
        timeout = timeout or self.config.request_timeout
        pending = self.tracker.start(addr, body, now, timeout, node_id)
        pending.context, pending.retried = owner, retried
        datagram = request_for(pending, self.sender, self._tokens.get(addr))
        self._out.append(Send(addr, datagram))
        self._out.append(StartTimer(pending.deadline, pending))

    def _token_required(self, pending: Pending, now: float) -> None:
        """The responder wants proof of our address: the token just remembered is it."""
        if pending.retried:  # it keeps asking: give up on it
            self._failed(pending, now)
            return
        assert isinstance(pending.context, PingOp | _Query)
        self._request(
            pending.addr, pending.body, now, pending.context, node_id=pending.node_id,
            timeout=pending.deadline - pending.sent_at, retried=True,
        )  # fmt: skip

    def _hard_deadline(self, pending: Pending, now: float) -> None:
        if not self.tracker.forget(pending):
            return  # answered in time
        self._out.append(_TIMED_OUT[type(pending.body)])
        self._failed(pending, now)

    def _failed(self, pending: Pending, now: float) -> None:
        owner = pending.context
        if type(owner) is _Query:
            self._query_failed(owner, now)
        else:
            assert type(owner) is PingOp
            self._ping_ended(owner, None, now)

    def _heard_from(self, dgram: Datagram, addr: Addr, now: float) -> None:
        """A matched response: its sender is observed from the address it answered from
        (a challenge's answer is judged by its ping)."""
        sender = dgram.sender
        contact = proven_contact(sender, addr) if sender is not None else None
        if contact is None:
            return
        self._suspects.forget(contact.node_id)
        answers_challenge = isinstance(dgram.body, Pong) and dgram.body.proof
        if not answers_challenge and self.key_proven(contact, addr, now, solicited=True):
            self._observe(contact, now)

    def _observe(self, contact: Contact, now: float) -> Observed:
        """Into the routing table (clients too: they route through what answered them);
        a full bucket's oldest contact gets its liveness check, or the bucket would wait
        for it forever."""
        observed = self.table.observe(contact, now)
        if observed.admission is Admission.INSERTED:
            self._out.append(ContactAdded(contact))
        if observed.check is not None:
            self.check_liveness(observed.check, now)
        return observed

    # -- pings ----------------------------------------------------------------------------

    def _challenge(self) -> bytes:
        return self._entropy(CHALLENGE_BYTES) if self.config.prove_keys else b""

    def _ping_answered(self, op: PingOp, dgram: Datagram, addr: Addr, now: float) -> None:
        contact = proven_contact(dgram.sender, addr) if dgram.sender is not None else None
        body = dgram.body
        if contact is None or not isinstance(body, Pong) or not _signed(contact, op, body):
            self._out.append(Rejected("key_unproven"))
            self._ping_ended(op, None, now)
            return
        if op.challenge:  # (unchallenged, it was observed as any responder is)
            exempt = subnet_cap_exempt(contact.scope, self.config.allow_loopback)
            self._proven_keys.remember(contact.node_id, addr, None if exempt else contact.subnet)
            self._observe(contact, now)
        self._ping_ended(op, contact, now)

    def _ping_ended(self, op: PingOp, contact: Contact | None, now: float) -> None:
        if op.proving is not None:
            self._solicited -= op.solicited
            subnet = self._proving.pop(op.proving, None)
            if subnet is not None:
                for counts, group in (
                    (self._proving_per_subnet, subnet),
                    (self._proving_per_block, block_of_subnet(subnet)),
                ):
                    counts[group] -= 1
                    if not counts[group]:
                        del counts[group]
            for lookup in self._proofs_awaited.pop(op.proving, ()):
                lookup.awaiting.discard(op.proving)
                if not lookup.awaiting and not lookup.done:
                    self._end(lookup, now)
        if op.check is not None:
            promoted = self.table.on_check_result(op.check.node_id, contact is not None, now)
            self._out.extend(ContactAdded(c) for c in promoted)
        if op.asked:
            self._out.append(PingDone(op, contact))

    # -- lookups --------------------------------------------------------------------------

    def _pump(self, lookup: Lookup, now: float) -> None:
        it, rtt = lookup.it, self.rtt
        while True:
            # One timeout per iterator in the core: refresh it from the estimate before
            # every step, so each new query gets a current deadline.
            it.timeout = rtt.timeout
            step = it.next(now)
            if type(step) is Query:
                self._send_query(lookup, step, now)
            elif type(step) is Finished:
                self._finished(lookup, now)
                return
            else:
                return  # Wait: its `until` is a query's deadline, which has its timer

    def _send_query(self, lookup: Lookup, query: Query, now: float) -> None:
        peer = query.contact
        exempt = subnet_cap_exempt(peer.scope, self.config.allow_loopback)
        q = _Query(lookup, peer, query.deadline, None if exempt else peer.subnet)
        lookup.open += 1
        lookup.messages += 1
        lookup.depth.setdefault(peer.node_id, 1)
        self._request(peer.endpoint.udp, lookup.request, now, q, node_id=peer.node_id)
        self._out.append(StartTimer(query.deadline, q))

    def _query_answered(self, q: _Query, dgram: Datagram, addr: Addr, now: float) -> None:
        q.done = True
        lookup = q.lookup
        lookup.open -= 1
        if lookup.done:
            return  # a late answer: its sender is observed, the result is out
        itself = proven_contact(dgram.sender, addr) if dgram.sender is not None else None
        if itself is not None:  # (its ID is the one asked: _another_node_answered)
            lookup.selves[q.peer] = itself
        body = dgram.body
        if type(body) is Nodes:
            # (the iterator skips the local ID)
            closer: Sequence[Contact] = self._followable(lookup, body.closer, q.scope)
            if self._suspects:  # (without it, so it does not count as trusted)
                local = self.local_id
                closer = self.trusted([c for c in closer if c.node_id != local], now)
            lookup.messages += 1
            lookup.it.on_response(q.peer, closer)
            hop = lookup.depth.get(q.peer, 1) + 1
            setdefault = lookup.depth.setdefault
            for contact in closer:
                setdefault(contact.node_id, hop)
        else:
            lookup.it.on_failure(q.peer)
        self._advance(lookup, now)

    def _followable(
        self, lookup: Lookup, closer: Sequence[Contact], answerer: Scope
    ) -> list[Contact]:
        """The contacts of an answer from an address of scope ``answerer`` that ``lookup``
        may ask: none whose address the answerer could not have reached itself from where
        we reached it, or reaches nobody (``Scope.reachable_via``: a public node listing
        loopback, private or martian addresses would aim our queries at our own host's
        or network's services), none at our own address (we would ask ourselves), and no
        more than ``LOOKUP_CONTACTS_PER_IP`` new ones at one IP address (IPv6: /64)."""
        own = self.sender.endpoint.udp if self.sender is not None else None
        known, per_ip = lookup.depth, Counter[str]()
        loopback_exempt = self.config.allow_loopback
        followed = []
        for c in closer:
            endpoint = c.endpoint
            if not c.scope.reachable_via(answerer) or endpoint.udp == own:
                continue
            if c.node_id not in known and not (loopback_exempt and c.loopback):
                host = host_of(endpoint.ip)
                if per_ip[host] >= LOOKUP_CONTACTS_PER_IP:
                    continue
                per_ip[host] += 1
            followed.append(c)
        return followed

    def _query_failed(self, q: _Query, now: float) -> None:
        q.done = True
        lookup = q.lookup
        lookup.open -= 1
        self._suspect(q, now)
        if lookup.done:
            return
        lookup.it.on_failure(q.peer)
        self._advance(lookup, now)

    def _soft_deadline(self, q: _Query, now: float) -> None:
        lookup = q.lookup
        if q.done or lookup.done:
            return
        lookup.timeouts += 1
        if not lookup.grace:
            self._pump(lookup, now)  # next() marks the peer unresponsive and frees its slot

    def _advance(self, lookup: Lookup, now: float) -> None:
        if not lookup.grace:
            self._pump(lookup, now)
        elif not lookup.open:
            self._end(lookup, now)

    def _finished(self, lookup: Lookup, now: float) -> None:
        if lookup.open and len(lookup.it.result()) < self.config.k:
            # The iterator gave up on peers past their adaptive deadline but their requests
            # are still open: under load that deadline is often just too short, and a put
            # would land on 3 replicas instead of k. One more timeout for them (a late
            # answer still counts: on_response accepts unresponsive peers).
            lookup.grace = True
            self._out.append(StartTimer(now + self.rtt.timeout, lookup))
        else:
            self._end(lookup, now)

    def _end(self, lookup: Lookup, now: float, *, wait_for_proofs: bool = True) -> None:
        """End ``lookup``; first, while some of the peers that would make its result still
        have a key challenge in flight, wait for them (``_ping_ended`` comes back here)."""
        if self.config.prove_keys:
            if wait_for_proofs and self._await_proofs(lookup, now):
                return
            proven = self._proven_keys
            lookup.unproven = frozenset(
                c.node_id for c in lookup.it.succeeded() if proven.get(c.node_id) != c.endpoint.udp
            )
        lookup.done = True
        lookup.ended = now
        for key in lookup.awaiting:
            self._proofs_awaited.get(key, set()).discard(lookup)
        self.table.mark_refreshed(lookup.target, now)
        self._out.append(LookupDone(lookup))

    def _await_proofs(self, lookup: Lookup, now: float) -> bool:
        """Whether ``lookup`` must wait for key challenges in flight (started now if none
        is and one can be) before its k closest proven peers are known.

        A node ID is the hash of a public key anyone can copy: a peer counts in a result
        only once it signed a challenge from the address it answered at, or hostile nodes
        could answer under the IDs of the true closest nodes from their own addresses."""
        proven, count = self._proven_keys, 0
        for listed in lookup.it.succeeded():
            if count >= self.config.k:
                break
            addr = listed.endpoint.udp
            if proven.get(listed.node_id) == addr:
                count += 1
                continue
            itself = lookup.selves.get(listed.node_id)
            if itself is None:
                continue  # its answer did not list the address it came from: unprovable
            key = (listed.node_id, addr)
            if key not in self._proving:
                self.key_proven(itself, addr, now, solicited=True)  # (starts a challenge)
            if key in self._proving:
                lookup.awaiting.add(key)
                self._proofs_awaited.setdefault(key, set()).add(lookup)
        return bool(lookup.awaiting)

    def _suspect(self, q: _Query, now: float) -> None:
        self._out.extend(ContactAdded(c) for c in self.table.on_failure(q.peer, now))
        self._suspects.remember(q.peer, now + SUSPECT_SECONDS, q.subnet)

    def _subnet_of(self, ip: str) -> str | None:
        """The subnet ``ip``'s entries count against (None: loopback on a local testnet)."""
        exempt = subnet_cap_exempt(address_scope(ip), self.config.allow_loopback)
        return None if exempt else subnet_of(ip)


_REQUESTS: tuple[type[Body], ...] = (Ping, FindNode)
_ANSWERED = {kind: RequestEnded(kind.__name__.lower(), "ok") for kind in _REQUESTS}
_TIMED_OUT = {kind: RequestEnded(kind.__name__.lower(), "timeout") for kind in _REQUESTS}


def _another_node_answered(pending: Pending, dgram: Datagram) -> bool:
    """Whether a response comes from another node than the one the request was for (a
    lookup query, a liveness check; a plain ping is for whoever is at the address)."""
    owner = pending.context
    expected = pending.node_id
    if expected is None and type(owner) is PingOp and owner.check is not None:
        expected = owner.check.node_id
    sender = dgram.sender
    return expected is not None and sender is not None and sender.node_id != expected


def _signed(contact: Contact, op: PingOp, pong: Pong) -> bool:
    """Whether ``pong`` carries ``contact``'s node-key signature over the challenge (an
    unchallenged ping needs none)."""
    if not op.challenge:
        return True
    try:
        verify_node_signature(contact.public_key, PONG_DOMAIN, op.challenge, pong.proof)
    except ProtocolError:
        return False
    return True
