"""The mailbox client's decisions, sans-I/O, in the shape of ``overlay/lookup.py``.

`MailboxClient` (client.py) is the asyncio adapter: it looks nodes up, signs, solves proofs
of work and makes the gRPC calls; what to do next is decided here, from what it reports,
with the time passed in. Nothing here awaits, sleeps or reads a clock.

A put (`WritePlan`): ``next(now)`` says to send the put to a node with a proof of so many
bits (`Put`), that nothing can be sent until a report or a time (`Wait`), or that the
write is over (`Finished`); the adapter reports each node's answer (``on_stored``,
``on_pow_required``, ``on_retry_after``, ``on_failure``). The write goes in rounds:

* the first round asks the R replicas (`replica_set`: the closest storage nodes, at most
  2 of one subnet while others are left);
* a node asking for a harder proof of work than the round's, up to ``max_pow_bits``, ends
  the round with a new one: every node of it that has not stored the blob is asked again
  with the harder proof (the bits only ever grow);
* a node answering "retry after" is asked again no sooner than that (capped at
  ``max_retry_after_s``), in this round or a later one; at most ``attempts`` times a
  round;
* otherwise, once every node of a round has answered, the next-closest candidates take
  the place of the replicas that did not store the blob (hinted hand-off): as many as are
  missing from R, so no more than R nodes ever store it; but none for a replica that said
  the mailbox is full (``mailbox_full``), and none at all once W is out of the replicas'
  reach for that reason: a hand-off node would take the blob over the owner's quota where
  the owner does not read (a fetch asks hand-off nodes only for replicas that do not
  answer), and the sender would be told "stored" for a message its recipient never sees;
* the write reached its quorum once W nodes stored it (``quorum_reached``).

A fetch (`ReadPlan`): ``next()`` names the nodes to ask in a round (`Ask`), each from its
own cursor in `FetchState`; the adapter reports each node's page (``on_page``), its
silence (``on_failure``) or its refusal (``on_refused``). The first round asks the R
replicas; a hand-off candidate is asked only in place of one that did not answer; a
node with more pages is asked again while its cursor advances (no endless paging); a node
that refused a request made in a session is asked again (the adapter signs it). Pages
merge by blob ID (the first copy reported wins), so a fetch returns each blob once; past
``budget_bytes`` it stops with ``state.more`` set and the cursors where they got to.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from dna_core.errors import DnaError
from dna_core.mailbox.codec import StoredBlob
from dna_core.mailbox.ids import blob_id
from dna_core.overlay.contact import Contact, spread_depth, spread_over_subnets
from dna_core.wire.gen.dna.v1 import common_pb2

REPLICAS = 5
WRITE_QUORUM = 3
MAILBOX_FULL = "quota"  # the kind of a put refused because the mailbox is at its quota
HANDOFF_CANDIDATES = 4  # further storage nodes that may take writes for absent replicas
MAX_POW_BITS = 28  # a client does not solve harder than this: ~0.3 G hashes
PUT_ATTEMPTS = 3  # sends of one put to one node in a round ("retry after" allows more)
MAX_RETRY_AFTER_S = 2.0  # a node's "retry after" is waited for up to this
REPLICA_SET_TTL_S = 30.0  # how long a lookup's answer is reused (membership changes slowly)
# How long an answer still short after its retry is reused: the nodes it missed may only have
# been slow, so the next operation soon looks again rather than keep writing to too few.
SHORT_REPLICA_SET_TTL_S = 2.0
REPLICA_SET_CACHE_SIZE = 1024  # mailboxes remembered; least recently used go first
FETCH_BUDGET_BYTES = 16 * 1024 * 1024  # blobs one fetch holds before it returns for more
# A failed write names why, in what the nodes said: at most this many distinct reasons,
# each cut to this length (a node chooses the text).
MAX_REFUSALS_SHOWN, MAX_REASON_CHARS = 4, 200


class QuorumError(DnaError):
    """Fewer than W replicas stored the blob. ``full``: because enough of them had no room
    (the mailbox at its quota, or a disk full) that W could not be met."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class TooFewNodesError(QuorumError):
    """The lookup found fewer storage nodes than the write quorum (``found``), so nothing
    was sent: the network is down, or this node lost its way to it (none found: an outage
    emptied its routing table, and rejoining through the seeds finds it again)."""

    def __init__(self, found: int) -> None:
        super().__init__(f"only {found} storage nodes found for the mailbox")
        self.found = found


class UnreachableError(DnaError):
    """No storage node of the mailbox was found or answered: the network (or this
    device's connection to it) is down. Not the same as "nothing new"."""


def storage_candidates(found: Iterable[Contact], count: int) -> list[Contact]:
    """The first ``count`` storage nodes of a lookup's answer (closest first)."""
    return [c for c in found if c.role == common_pb2.NODE_ROLE_STORAGE][:count]


def replica_set(storage: Sequence[Contact], count: int, *, loopback_exempt: bool) -> list[Contact]:
    """A mailbox's ``count`` replicas among its storage nodes (closest first): the closest,
    at most 2 of one /24 (/48) while others are left, then the closest of the rest
    (`spread_over_subnets`; loopback exempt on a local testnet). Node IDs cost 8 puzzle
    bits and a mailbox's ID is public: one subnet could grind IDs nearer it than anyone,
    take all R places and drop its mail. Writers, readers, repair and sync authorization
    all choose with this, so they agree."""
    return spread_over_subnets(storage, count, loopback_exempt=loopback_exempt)


def replica_set_depth(
    storage: Sequence[Contact], count: int, *, loopback_exempt: bool
) -> int | None:
    """How many of ``storage`` (closest first) `replica_set` decides from; None when it
    took some beyond the cap, so any farther node of another subnet could change it
    (`spread_depth`)."""
    return spread_depth(storage, count, loopback_exempt=loopback_exempt)


def mailbox_candidates(
    found: Iterable[Contact], replicas: int, handoffs: int, *, loopback_exempt: bool
) -> list[Contact]:
    """The storage nodes of a lookup's answer (closest first) a mailbox's writes and reads
    go to: its replicas (`replica_set`), then ``handoffs`` hand-off candidates, the ones
    the same spread adds for ``replicas + handoffs`` (a superset: the replicas are the
    first within the cap), closest first: so a subnet holding the nearest IDs cannot take
    the hand-offs of replicas it made fail."""
    storage = [c for c in found if c.role == common_pb2.NODE_ROLE_STORAGE]
    chosen = replica_set(storage, replicas, loopback_exempt=loopback_exempt)
    taken = {c.node_id for c in chosen}
    wider = replica_set(storage, replicas + handoffs, loopback_exempt=loopback_exempt)
    return chosen + [c for c in wider if c.node_id not in taken]


class ReplicaSetCache:
    """Per mailbox, the storage nodes a lookup found, for ``ttl_s`` (bounded, LRU)."""

    def __init__(
        self,
        ttl_s: float = REPLICA_SET_TTL_S,
        size: int = REPLICA_SET_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.size, self.clock = ttl_s, size, clock
        self._entries: OrderedDict[bytes, tuple[float, list[Contact]]] = OrderedDict()  # expires

    def get(self, box: bytes) -> list[Contact] | None:
        entry = self._entries.get(box)
        if entry is None or self.clock() >= entry[0]:
            self._entries.pop(box, None)
            return None
        self._entries.move_to_end(box)
        return entry[1]

    def put(self, box: bytes, contacts: list[Contact], ttl_s: float | None = None) -> None:
        """Keep ``contacts`` for ``ttl_s`` (default: the cache's)."""
        expires = self.clock() + (self.ttl_s if ttl_s is None else ttl_s)
        self._entries[box] = (expires, contacts)
        self._entries.move_to_end(box)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, box: bytes) -> None:
        self._entries.pop(box, None)

    def clear(self) -> None:
        self._entries.clear()


# -- steps ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Put:
    """Send the put to ``contact`` with a proof of work of ``pow_bits``."""

    contact: Contact
    pow_bits: int


@dataclass(frozen=True, slots=True)
class Ask:
    """Ask these nodes for a page each, from their cursors (one round)."""

    contacts: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    until: float | None  # call next() again by then (or on any report); None: on a report


@dataclass(frozen=True, slots=True)
class Finished:
    pass


FINISHED = Finished()


# -- write ------------------------------------------------------------------------------


class _Put(Enum):
    READY = 0  # to be sent at ``_Slot.at``
    SENT = 1
    STORED = 2
    HARDER = 3  # wants a harder proof (``_Slot.bits``)
    FAILED = 4


@dataclass(slots=True)
class _Slot:
    contact: Contact
    state: _Put = _Put.READY
    at: float = float("-inf")
    sends: int = 0
    bits: int = 0


@dataclass(frozen=True, slots=True)
class PutResult:
    blob_id: bytes
    stored_on: tuple[bytes, ...]  # node IDs that acknowledged
    pow_bits: int


class WritePlan:
    def __init__(
        self,
        candidates: Sequence[Contact],
        *,
        replicas: int = REPLICAS,
        write_quorum: int = WRITE_QUORUM,
        pow_bits: int = 12,
        max_pow_bits: int = MAX_POW_BITS,
        attempts: int = PUT_ATTEMPTS,
        max_retry_after_s: float = MAX_RETRY_AFTER_S,
    ) -> None:
        self.replicas, self.write_quorum = replicas, write_quorum
        self.pow_bits, self.max_pow_bits = pow_bits, max_pow_bits
        self.attempts, self.max_retry_after_s = attempts, max_retry_after_s
        self._not_before: dict[bytes, float] = {}  # a node's last "retry after", when due
        self._round = self._slots(candidates[:replicas])
        self._spare = deque(candidates[replicas:])
        self.stored: list[bytes] = []  # node IDs, in the order they acknowledged
        self.failed: set[bytes] = set()  # nodes that did not answer or refused
        self.refusals: dict[str, None] = {}  # why nodes refused, each reason once, in order
        self.no_room = 0  # nodes that refused for lack of room
        self.mailbox_full = 0  # of them, nodes where the mailbox is at its quota: no hand-off
        self._finished = not self._round

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def quorum_reached(self) -> bool:
        return len(self.stored) >= self.write_quorum

    def next(self, now: float) -> Put | Wait | Finished:
        while not self._finished:
            step = self._in_round(now)
            if step is not None:
                return step
            self._next_round()
        return FINISHED

    def _in_round(self, now: float) -> Put | Wait | None:
        """A send due now, else a wait for the round's answers; None once all are in."""
        for slot in self._round.values():
            if slot.state is _Put.READY and slot.at <= now:
                slot.state, slot.sends = _Put.SENT, slot.sends + 1
                return Put(slot.contact, self.pow_bits)
        if any(s.state is _Put.SENT for s in self._round.values()):
            return Wait(self._next_due())
        if any(s.state is _Put.READY for s in self._round.values()):
            return Wait(self._next_due())
        return None

    def _next_due(self) -> float | None:
        due = [s.at for s in self._round.values() if s.state is _Put.READY]
        return min(due) if due else None

    def _next_round(self) -> None:
        slots = list(self._round.values())
        harder = max(
            (s.bits for s in slots if s.state is _Put.HARDER and s.bits <= self.max_pow_bits),
            default=0,
        )  # a node asking for more than we solve is not let stop us meeting another's
        if harder > self.pow_bits:
            self.pow_bits = harder  # a node raised the bar: everyone not done, again
            nodes = [s.contact for s in slots if s.state is not _Put.STORED]
        else:
            nodes = [self._spare.popleft() for _ in range(min(self._absent(), len(self._spare)))]
        self._round = self._slots(nodes)
        self._finished = not self._round

    def _absent(self) -> int:
        """Replicas a hand-off node may stand in for: those that did not store the blob,
        but not one that said the mailbox is full there, and none at all once so many said
        so that W is out of the replicas' reach (the mailbox is full)."""
        if self.mailbox_full > max(0, self.replicas - self.write_quorum):
            return 0
        return self.replicas - len(self.stored) - self.mailbox_full

    def _slots(self, nodes: Iterable[Contact]) -> dict[bytes, _Slot]:
        """A round's nodes; one that said "retry after" is not asked before it is due, even
        in a later round."""
        return {
            c.node_id: _Slot(c, at=self._not_before.get(c.node_id, float("-inf"))) for c in nodes
        }

    def _sent(self, node_id: bytes) -> _Slot | None:
        slot = self._round.get(node_id)
        return slot if slot is not None and slot.state is _Put.SENT else None

    def on_stored(self, node_id: bytes) -> bool:
        """The node stored the blob durably; False if no put to it was awaited."""
        slot = self._sent(node_id)
        if slot is None:
            return False
        slot.state = _Put.STORED
        self.stored.append(node_id)
        return True

    def on_pow_required(self, node_id: bytes, bits: int) -> bool:
        """The node wants a proof of ``bits``: asked again with it after the round, if no
        harder than ``max_pow_bits`` (and harder than what it got)."""
        slot = self._sent(node_id)
        if slot is None:
            return False
        slot.state, slot.bits = _Put.HARDER, bits
        return True

    def on_retry_after(self, node_id: bytes, retry_after_ms: int, now: float) -> bool:
        slot = self._sent(node_id)
        if slot is None:
            return False
        due = now + min(self.max_retry_after_s, max(0, retry_after_ms) / 1000)
        self._not_before[node_id] = due
        if slot.sends >= self.attempts:
            self._fail(slot, "rate limited")
        else:
            slot.state, slot.at = _Put.READY, due
        return True

    def on_failure(
        self, node_id: bytes, reason: str = "", *, no_room: bool = False,
        mailbox_full: bool = False,
    ) -> bool:  # fmt: skip
        """The node did not answer, or refused for good (``reason``: what it said;
        ``no_room``: for lack of room; ``mailbox_full``: the mailbox is at its quota there,
        which no hand-off node may make up for)."""
        slot = self._sent(node_id)
        if slot is None:
            return False
        self._fail(slot, reason or "no answer")
        self.no_room += no_room or mailbox_full
        self.mailbox_full += mailbox_full
        return True

    def _fail(self, slot: _Slot, reason: str) -> None:
        slot.state = _Put.FAILED
        self.failed.add(slot.contact.node_id)
        if len(self.refusals) < MAX_REFUSALS_SHOWN:  # a node's text: bounded
            self.refusals[reason[:MAX_REASON_CHARS]] = None

    def result(self, blob_id: bytes) -> PutResult:
        """What stored the blob so far; QuorumError once finished short of W, saying why
        the nodes did not store it (a full mailbox must read as one to its sender)."""
        if self._finished and not self.quorum_reached:
            why = f" ({'; '.join(self.refusals)})" if self.refusals else ""
            raise QuorumError(
                f"stored on {len(self.stored)} of {self.write_quorum} required replicas{why}",
                full=self.no_room > self.replicas - self.write_quorum,
            )
        return PutResult(blob_id, tuple(self.stored), self.pow_bits)


# -- fetch ------------------------------------------------------------------------------


@dataclass
class FetchState:
    """Per-replica cursors of one mailbox (node ID -> opaque cursor); ``more`` when the
    last fetch stopped at its byte budget with pages left (fetch again from here)."""

    cursors: dict[bytes, bytes] = field(default_factory=dict)
    more: bool = False
    # The nodes that returned each blob of the last fetch (not saved with the cursors): a
    # blob only one node returned is only that node's word (dna_peer.inbox bounds per node
    # what it keeps of such blobs).
    sources: dict[bytes, set[bytes]] = field(default_factory=dict)


class _Read(Enum):
    ASKED = 0
    PAGE = 1  # answered with a page
    MORE = 2  # answered with a page and has more past an advanced cursor
    FAILED = 3  # did not answer (or refused a signed request)
    AGAIN = 4  # refused a session: to be asked again, signed


class ReadPlan:
    def __init__(
        self,
        candidates: Sequence[Contact],
        state: FetchState,
        *,
        replicas: int = REPLICAS,
        budget_bytes: int = FETCH_BUDGET_BYTES,
    ) -> None:
        self.state, self.budget_bytes = state, budget_bytes
        self.candidates = len(candidates)
        self._next: list[Contact] = list(candidates[:replicas])
        self._spare = deque(candidates[replicas:])
        self._round: dict[bytes, tuple[Contact, _Read]] = {}
        self._merged: dict[bytes, StoredBlob] = {}
        self._bytes = 0
        self.answered = False  # some node answered, if only to refuse
        self.failed: set[bytes] = set()
        self._finished = False
        state.more = False
        state.sources = {}

    @property
    def finished(self) -> bool:
        return self._finished

    def next(self) -> Ask | Wait | Finished:
        if self._finished:
            return FINISHED
        if any(state is _Read.ASKED for _, state in self._round.values()):
            return Wait(None)
        if self._round:
            self._next = self._after_round()
        if not self._next:
            self._finished = True
            return FINISHED
        self._round = {c.node_id: (c, _Read.ASKED) for c in self._next}
        return Ask(tuple(self._next))

    def _after_round(self) -> list[Contact]:
        """More pages first, then the refused to sign for, then stand-ins for the silent."""
        by_state: dict[_Read, list[Contact]] = {s: [] for s in _Read}
        for contact, state in self._round.values():
            by_state[state].append(contact)
        more, again = by_state[_Read.MORE], by_state[_Read.AGAIN]
        stand_ins = len(by_state[_Read.FAILED])
        spare = [self._spare.popleft() for _ in range(min(stand_ins, len(self._spare)))]
        if more and self._bytes >= self.budget_bytes:
            self.state.more = True  # the rest next time, from these cursors
            return []
        return more + again + spare

    def _asked(self, node_id: bytes) -> Contact | None:
        entry = self._round.get(node_id)
        return entry[0] if entry is not None and entry[1] is _Read.ASKED else None

    def on_page(
        self, node_id: bytes, blobs: Iterable[StoredBlob], next_cursor: bytes, more: bool
    ) -> bool:
        """The node's page: its blobs, its next cursor and whether it has more past it.
        A blob that does not hash to its ID is dropped here, before the merge: blob IDs
        are content-addressed, so a node answering first with an altered copy under a real
        blob's ID (or garbage under any ID) can neither shadow another node's intact copy
        nor be counted among the nodes that returned it (``state.sources``: where a blob
        that does not open is deleted, dna_peer.inbox)."""
        contact = self._asked(node_id)
        if contact is None:
            return False
        self.answered = True
        for blob in blobs:
            if blob_id(blob.blob) != blob.blob_id:
                continue  # altered by its node; another node may hold it intact
            self.state.sources.setdefault(blob.blob_id, set()).add(node_id)
            if blob.blob_id not in self._merged:
                self._merged[blob.blob_id] = blob
                self._bytes += len(blob.blob)
        advanced = next_cursor != self.state.cursors.get(node_id)
        self.state.cursors[node_id] = next_cursor
        self._round[node_id] = (contact, _Read.MORE if more and advanced else _Read.PAGE)
        return True

    def on_failure(self, node_id: bytes) -> bool:
        """The node did not answer; a hand-off candidate is asked in its place."""
        contact = self._asked(node_id)
        if contact is None:
            return False
        self.failed.add(node_id)
        self._round[node_id] = (contact, _Read.FAILED)
        return True

    def on_refused(self, node_id: bytes, *, ask_again: bool) -> bool:
        """The node refused the request's authentication: it answered. ``ask_again`` when
        the request was made in a session (the node may have restarted and forgotten
        it): it is asked again, signed; else a stand-in is asked in its place."""
        contact = self._asked(node_id)
        if contact is None:
            return False
        self.answered = True
        if not ask_again:
            self.failed.add(node_id)
        self._round[node_id] = (contact, _Read.AGAIN if ask_again else _Read.FAILED)
        return True

    def result(self) -> list[StoredBlob]:
        """The blobs fetched, each once, oldest first; UnreachableError when no node
        answered at all."""
        if not self.answered:
            raise UnreachableError(f"no storage node answered ({self.candidates} asked)")
        return sorted(self._merged.values(), key=lambda b: (b.stored_ms, b.blob_id))
