"""Store-on-join: records handed to a node that joins among their holders (sans-I/O).

Kademlia §2.5: "when a new node joins the system, it must store any key-value pair to
which it is one of the k closest". Without it a node that joins near a key holds nothing
until the next republish: an hour, and up to ``MAX_SILENCE`` hours when IDs ground near
the key postpone the holders' republishes (docs/overlay.md, durability).

What this module decides, for the node that holds a record and has just added a contact
it never had in its routing table (``ContactAdded``):

* whether the newcomer is now one of the record's replicas: the replica choice a put
  makes (`spread_over_subnets` over the k closest to the key), over this node's own view
  (its table's k closest, itself included). The node must be a replica by the same
  choice, or it is not a holder the others count on;
* who of the other replicas hands it over (`handoff_senders`): the first ``HANDOFF_SENDERS`` (2)
  of distinct subnets in an order drawn per newcomer, ``SHA-256(label ‖ newcomer ID ‖
  holder ID)``. Not the paper's "the one closest to the key": IDs ground near a key are
  closest, so an attacker holding 2 replicas would always be the one asked and never
  send. No ID is near every newcomer's hash, and two of distinct subnets are never both
  of one attacker's /24 (the spread gives it at most 2 of 8). Every replica works the
  order out alone from its own view; where views differ, a record goes twice or not at
  all, and the republish clock stays the backstop. A duplicate costs the receiver a
  dictionary look-up (`RecordStore.repeat`);
* which of the records to look at: the ``MAX_PER_NEWCOMER`` held keys nearest the
  newcomer (one XOR each), not every record the node holds (20,000 routing-table
  look-ups a newcomer): a newcomer is a replica of keys near its own ID;
* for how many newcomers: ``PLAN_RATE_PER_S`` a second after a burst of ``PLAN_BURST``
  (`PlanBudget`); a flood of newcomers beyond that is not planned for (and counted), so
  its CPU cost is bounded too;
* how often for one newcomer: once a republish interval (`RecentlyPlanned`, the last
  ``REPLAN_MEMORY`` planned IDs). A node that leaves the table and comes back (a flapping
  one: evicted after two failures, observed again) got a new plan and a new burst every
  time; what it missed since the first, the republish brings;
* when to send (`HandoffQueue`): each newcomer's handoffs at most ``HANDOFF_BURST`` at
  once, then ``HANDOFF_RATE_PER_S`` a second, under the receiver's per-source token
  bucket for stores (`dna_core.ratelimit`: 30, then 1 a second; a repeat is not charged)
  with room left for this node's own puts and republishes; at most ``MAX_PER_NEWCOMER``
  queued for one newcomer and ``MAX_QUEUED`` in all, the oldest dropped when full (and
  counted): a flood of Sybil newcomers costs a bounded queue, not the node's memory.
  A refusal is not retried.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from dna_core.crypto import primitives as p
from dna_core.overlay.contact import Contact, id_int, spread_over_subnets
from dna_core.ratelimit import TokenBucket

HANDOFF_SENDERS = 2  # holders of distinct subnets that hand one newcomer one record
MAX_PER_NEWCOMER = 64  # held keys looked at, and handoffs queued, for one newcomer
MAX_QUEUED = 4096  # handoffs queued in all; the oldest is dropped for a new one
HANDOFF_BURST = 10  # sent to one newcomer at once (its store bucket: 30)
HANDOFF_RATE_PER_S = 0.5  # then at most this many a second (its bucket refills 1/s)
# Newcomers planned for (`plan`: a scan of the held keys, ~18 ms at 20,000 records): at
# most this many at once, then this many a second; beyond, a newcomer gets nothing from
# this node until the republish. An honest table takes in a few newcomers a minute
# (10,000 nodes, 30% replaced an hour: ~80 an hour of a ~260-contact table).
PLAN_BURST, PLAN_RATE_PER_S = 50, 5.0
REPLAN_MEMORY = 1024  # newcomers remembered as planned for (`RecentlyPlanned`)
_ORDER_LABEL = p.label("handoff-order")


def handoff_rank(newcomer: bytes, holder: bytes) -> bytes:
    """Where ``holder`` comes in the order of those handing ``newcomer`` a record."""
    return hashlib.sha256(_ORDER_LABEL + newcomer + holder).digest()


def handoff_senders(
    newcomer: bytes, replicas: Sequence[Contact], *, loopback_exempt: bool = False
) -> list[Contact]:
    """Of a record's ``replicas`` (the newcomer among them or not), those who hand it to
    ``newcomer``: the first ``HANDOFF_SENDERS`` of distinct subnets in the newcomer's own
    order (module docstring); of one subnet only when no other is left."""
    others = sorted(
        (c for c in replicas if c.node_id != newcomer),
        key=lambda c: handoff_rank(newcomer, c.node_id),
    )
    return spread_over_subnets(
        others, HANDOFF_SENDERS, per_subnet=1, loopback_exempt=loopback_exempt
    )


def hands_off(
    local: Contact, newcomer: Contact, key: bytes, known: Sequence[Contact], *, k: int,
    replicas: int, loopback_exempt: bool = False,
) -> bool:  # fmt: skip
    """Whether ``local``, holding the record at ``key``, hands it to ``newcomer``: both are
    among its replicas in ``local``'s view, and ``local`` is one of the ``handoff_senders``. The
    view: the ``k`` nearest the key of ``known`` (the contacts it knows closest to the key,
    the newcomer among them) and ``local`` itself; the replicas: what a put chooses
    there (``spread_over_subnets``)."""
    target = id_int(key)
    merged = {c.node_id: c for c in (local, *known)}
    view = sorted(merged.values(), key=lambda c: c.key ^ target)[:k]
    chosen = spread_over_subnets(view, replicas, loopback_exempt=loopback_exempt)
    ids = {c.node_id for c in chosen}
    if newcomer.node_id not in ids or local.node_id not in ids:
        return False
    picked = handoff_senders(newcomer.node_id, chosen, loopback_exempt=loopback_exempt)
    return any(c.node_id == local.node_id for c in picked)


def plan(
    local: Contact, newcomer: Contact, held: Iterable[bytes],
    closest: Callable[[bytes, int], Sequence[Contact]], *, k: int, replicas: int,
    loopback_exempt: bool = False,
) -> list[bytes]:  # fmt: skip
    """The keys of ``held`` that ``local`` hands to ``newcomer`` (``closest``: its routing
    table's, which holds the newcomer now), nearest the newcomer first; only the
    ``MAX_PER_NEWCOMER`` held keys nearest the newcomer are looked at."""
    near = newcomer.key
    candidates = heapq.nsmallest(MAX_PER_NEWCOMER, held, key=lambda key: id_int(key) ^ near)
    exempt = loopback_exempt
    return [
        key
        for key in candidates
        if hands_off(
            local, newcomer, key, closest(key, k), k=k, replicas=replicas, loopback_exempt=exempt
        )
    ]


class PlanBudget:
    """How many newcomers a node plans handoffs for (module docstring): a token bucket."""

    def __init__(self, burst: int = PLAN_BURST, rate_per_s: float = PLAN_RATE_PER_S) -> None:
        self._bucket = TokenBucket(rate_per_s, burst)

    def allow(self, now: float) -> bool:
        return self._bucket.take(now) == 0.0


class RecentlyPlanned:
    """The newcomers planned for within the last ``hold_s`` (the republish interval), at
    most ``most`` of them, the least recently planned forgotten first (module docstring).
    Forgetting early costs only a plan within the `PlanBudget`, so a flood of IDs that
    pushes an honest one out does no worse than the flood alone."""

    def __init__(self, hold_s: float, most: int = REPLAN_MEMORY) -> None:
        self.hold_s, self.most = hold_s, most
        self._at: dict[bytes, float] = {}  # node ID -> when planned, oldest first

    def __len__(self) -> int:
        return len(self._at)

    def recent(self, node_id: bytes, now: float) -> bool:
        """Whether ``node_id`` was planned for within ``hold_s`` of ``now``."""
        at = self._at.get(node_id)
        return at is not None and now - at < self.hold_s

    def planned(self, node_id: bytes, now: float) -> None:
        self._at.pop(node_id, None)
        self._at[node_id] = now
        while len(self._at) > self.most:
            del self._at[next(iter(self._at))]


@dataclass(frozen=True, slots=True)
class Handoff:
    """Send the record held at ``key`` to ``newcomer`` (an ordinary store)."""

    newcomer: Contact
    key: bytes


class _Pace:
    """One newcomer's queue and token bucket."""

    __slots__ = ("bucket", "contact", "keys")

    def __init__(self, contact: Contact, burst: float, rate: float) -> None:
        self.contact = contact
        self.keys: deque[bytes] = deque()
        self.bucket = TokenBucket(rate, burst)


class HandoffQueue:
    """Handoffs waiting to be sent, paced per newcomer, bounded per newcomer and in all.

    Invariants: at most ``max_queued`` handoffs held and ``max_per_newcomer`` of one
    newcomer; a newcomer gets at most ``burst`` at once, then ``rate_per_s`` a second (a
    token bucket); the oldest handoff is dropped for a
    newer one when the queue is full, and every handoff offered is either taken once or
    dropped once (``dropped``).
    """

    def __init__(
        self, *, max_queued: int = MAX_QUEUED, max_per_newcomer: int = MAX_PER_NEWCOMER,
        burst: int = HANDOFF_BURST, rate_per_s: float = HANDOFF_RATE_PER_S,
    ) -> None:  # fmt: skip
        self.max_queued, self.max_per_newcomer = max_queued, max_per_newcomer
        self.burst, self.rate = float(burst), rate_per_s
        self._paces: dict[bytes, _Pace] = {}  # by newcomer ID
        # Every queued (newcomer ID, key), oldest first: the globally oldest is also its
        # newcomer's oldest, as each newcomer's keys queue in the same order.
        self._order: dict[tuple[bytes, bytes], None] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._order)

    def queued_for(self, newcomer: bytes) -> int:
        pace = self._paces.get(newcomer)
        return 0 if pace is None else len(pace.keys)

    def offer(self, newcomer: Contact, keys: Iterable[bytes], now: float) -> int:
        """Queue handoffs of ``keys`` to ``newcomer``; returns how many were dropped (over
        its share, or the oldest of the queue to make room)."""
        pace = self._paces.get(newcomer.node_id)
        if pace is None:
            pace = self._paces[newcomer.node_id] = _Pace(newcomer, self.burst, self.rate)
        dropped = 0
        for key in keys:
            entry = (newcomer.node_id, key)
            if entry in self._order:
                continue
            if len(pace.keys) >= self.max_per_newcomer:
                dropped += 1
                continue
            if len(self._order) >= self.max_queued:
                self._drop_oldest()
                dropped += 1
                self._paces[newcomer.node_id] = pace  # (if that was its own last one)
            pace.keys.append(key)
            self._order[entry] = None
        if not pace.keys:
            del self._paces[newcomer.node_id]
        self.dropped += dropped
        return dropped

    def take(self, now: float) -> list[Handoff]:
        """The handoffs to send now, each newcomer's within its bucket."""
        out: list[Handoff] = []
        for node_id, pace in list(self._paces.items()):
            while pace.keys and pace.bucket.take(now) == 0.0:
                key = pace.keys.popleft()
                del self._order[(node_id, key)]
                out.append(Handoff(pace.contact, key))
            if not pace.keys:
                del self._paces[node_id]
        return out

    def next_due(self, now: float) -> float | None:
        """When ``take`` next has something to hand out (None: nothing is queued)."""
        if not self._paces:
            return None
        return now + min(pace.bucket.peek(now) for pace in self._paces.values())

    def _drop_oldest(self) -> None:
        node_id, key = next(iter(self._order))
        del self._order[(node_id, key)]
        pace = self._paces[node_id]
        pace.keys.popleft()  # (its oldest: see _order)
        if not pace.keys:
            del self._paces[node_id]
