"""Replica anti-entropy between storage nodes.

Every ``interval`` a node walks the mailboxes it holds. For each, it finds the
mailbox's R = 5 rightful replicas: the storage nodes closest to it, at most 2 of one
/24 (/48) while other subnets are left (``replica_set``, as clients choose): one lookup serves
the mailboxes after it while it provably ranks them as their own would
(``Neighbourhood``). A rightful
replica, with each other one: lists what the peer holds a page at a time, pulls
blobs and tombstones it lacks, and pushes what the peer lacks. Pulling alone would
never reach a replica that lost everything (it does not know the mailbox exists);
pushing alone would never reach a node that was down when the data arrived. A
node outside the set that took a write by hinted hand-off only pushes: it offers
the IDs it holds, pushes what a replica lacks, and drops its copy once all R of
them report holding it. A pass keeps going with a peer until the mailbox is whole
there; every message is bounded in bytes and items (``SYNC_BYTES``), and a piece
refused as too large (RESOURCE_EXHAUSTED) is retried in halves. The calls to each peer
are paced to its sync rate limit (``PeerPacer``), and one refused over it goes again
after the retry-after the refusal carries: a pass over more mailboxes than a peer's
burst completes.

The calls to a peer travel on one long-lived mailbox session to it (``SessionPool``,
docs/storage.md "Sessions and push"), served there by the very handlers of the unary
calls; a peer that serves no sessions (an older node) or whose session is unavailable
gets the unary ``SyncList``, ``SyncPull`` and ``SyncPush`` (``dna_storage_repair_calls``
counts both).

Each pass also observes, per mailbox held, how many of the replica set hold the
mailbox's least-replicated item (``dna_storage_mailbox_replicas``).

Who may sync (docs/storage.md, "Sync authorization and bounds"): requests are signed by
the sender's node key (domain ``mailbox-sync``), and a node serves ``SyncList`` and
``SyncPull`` for a mailbox only to a caller that it itself finds among the
R + ``SYNC_MARGIN`` replicas of that mailbox (``replica_set``) in its own view (``ReplicaView``:
routing table and its own lookup); it takes ``SyncPush`` from such a caller, or from anyone
when it is itself among them (a hand-off holder pushing to a rightful replica). Every
blob received is judged as a client's put is (``SyncRules``): size, proof of work
bound to mailbox and blob, expiry no later than the proof's timestamp plus the
maximum TTL, not tombstoned, quota; a tombstone must carry the owner's signed delete
naming it. Calls are rate-limited per peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from dna_core.crypto.node import NodeIdentity, verify_node_signature
from dna_core.crypto.primitives import u64
from dna_core.errors import (
    CapacityError,
    ExpiredError,
    MalformedError,
    ProtocolError,
    RemoteError,
    UnavailableError,
    VerificationError,
)
from dna_core.mailbox import (
    MailboxRules,
    NoSession,
    SessionPool,
    StoredBlob,
    Tombstone,
    blob_proto,
    replica_set,
    replica_set_depth,
    status_error,
    tombstone_proto,
)
from dna_core.overlay import (
    Closest,
    Contact,
    OverlayNode,
    contact_from_proto,
    contact_to_proto,
    distance,
)
from dna_core.rpc_errors import call
from dna_core.singleflight import SingleFlight
from dna_core.tasks import stop_tasks
from dna_core.wire import common_pb2, mailbox_pb2, mailbox_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dna_storage.admission import Quota, RateLimited, RateLimiter, TokenBucket
from dna_storage.backends.base import (
    MailboxBackend,
    MailboxDigest,
    PutOutcome,
    StorageFullError,
    StoreDamagedError,
    StoreUnavailableError,
    SyncIndex,
)

log = logging.getLogger("dna.storage.repair")
# This node's store failing a call: one mailbox's exchange ends, the pass goes on (the node
# says the fault itself, once: `StorageNode`).
LOCAL_STORE_ERRORS = (StorageFullError, StoreUnavailableError, StoreDamagedError)
SYNC_DOMAIN = b"mailbox-sync"
SYNC_WINDOW_MS = 5 * 60_000
SYNC_MARGIN = 2  # replica-set views differ a little between nodes: R + 2 may sync
SYNC_BYTES = 1 << 20  # per list page, pull answer and push request: a quarter of gRPC's cap
MIN_PIECE_BYTES = 32 * 1024  # halving a refused piece stops here (a piece holds >= 1 item)
MAX_SYNC_ITEMS = 500  # blobs, and tombstones, per SyncPush
MAX_SYNC_IDS = 4096  # IDs per list page, pull request and push offer (~140 KB)
MAX_COMPARE = 512  # mailboxes per SyncCompare (~36 KB asked, at most ~17 KB answered)
# IDs one SyncCompare may make this node read: a list page's worth times 16. A caller naming
# mailboxes of a million IDs must not cost this node a million reads per call (a SyncList
# reads one page); mailboxes past it are answered as differing, to be listed page by page.
MAX_COMPARE_IDS = 16 * MAX_SYNC_IDS
COMPARE_READ = 8  # mailboxes read at a time, so the budget overshoots by at most 8
SYNC_CALLS_PER_S, SYNC_CALL_BURST = 100.0, 1000.0  # per calling node and per address
PACE_SHARE = 0.95  # of the peers' default rate and burst repair keeps to (arrival jitter)
MIN_PACE_PER_S = 1.0  # a peer that keeps refusing is called no slower than this
PACE_STEP = 0.05  # calls/s a paced peer's rate grows by per answered call
RATE_RETRIES = 8  # refusals of one call over a peer's rate before the exchange fails
MAX_RATE_WAIT_S = 60.0  # a retry-after longer than this fails the exchange (next pass)
ID_WIRE = 34  # a 32-byte ID with its tag and length
BLOB_WIRE, TOMB_WIRE = 128, 64  # a blob's / tombstone's fields beside its payload
REPAIR_RANGES = 256  # slices of the mailbox ID space a repair pass lists one at a time
_PULL_CHUNK = 8  # blobs read from the backend at a time while filling a bounded answer
_OFFER_AHEAD = 256  # a push longer than this offers IDs before sending their blobs
LOOKUP_TTL_S = 60.0  # how long a lookup of a mailbox's neighbourhood serves authorization
RELOOK_AFTER_S = 10.0  # a refusal on an older lookup looks again once (a node restarted)
REUSE_S = 10.0  # how long, within a pass, a lookup's result may choose later mailboxes' replicas
NEIGHBOURHOODS = 16  # recent lookup results a node's authorization of sync calls draws on
OWN_LOOKUPS = 4096  # mailboxes whose own lookup authorization keeps (least recent go first)
IN_FLIGHT = 8  # mailboxes a pass syncs at once: their round trips overlap, not add up
# SyncCompare calls in flight to one peer, and ID slices planned ahead of the syncs (their
# plans held in memory): one slice and one call at a time, a pass with nothing to repair
# lasted at least a round trip per slice or 512 mailboxes (256 of them: 38 s at 150 ms).
# At most half of a peer's NEIGHBOURHOODS: it authorizes each slice from its own lookups.
COMPARE_AHEAD = 8
T = TypeVar("T")
R = TypeVar(
    "R",
    mailbox_pb2.SyncListRequest,
    mailbox_pb2.SyncPullRequest,
    mailbox_pb2.SyncPushRequest,
    mailbox_pb2.SyncCompareRequest,
)
SYNC_OPS = {"SyncList": "sync_list", "SyncPull": "sync_pull", "SyncPush": "sync_push"}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _together(works: Sequence[Awaitable[T]]) -> list[T]:
    """``asyncio.gather``, but the first failure cancels the others and waits for them:
    a pass that fails or is cancelled leaves none of its calls running."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        await stop_tasks(tasks)
        raise


def id_ranges(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` (at most 256) ``[start, end)`` slices covering every ID, in ID order, by
    first byte: ``b""`` starts the first and ends the last (``digests``: no bound)."""
    cuts = [bytes([256 * i // count]) for i in range(1, count)]
    return list(zip([b"", *cuts], [*cuts, b""], strict=True))


def _signed(method: str, subject: bytes, timestamp_ms: int) -> bytes:
    return method.encode() + b"\0" + subject + u64(timestamp_ms)


def sign_proof(
    identity: NodeIdentity, contact: Contact, method: str, subject: bytes
) -> mailbox_pb2.NodeProof:
    now = _now_ms()
    return mailbox_pb2.NodeProof(
        sender=contact_to_proto(contact),
        timestamp_ms=now,
        signature=identity.sign(SYNC_DOMAIN, _signed(method, subject, now)),
    )


def verify_proof(
    proof: mailbox_pb2.NodeProof, method: str, subject: bytes, *, puzzle_bits: int
) -> Contact:
    """The node behind a sync request (its key signed this method and subject), or a
    ProtocolError. Whether it may sync this mailbox is ``ReplicaView.authorize``'s call:
    the role in the contact is the caller's own claim."""
    sender = contact_from_proto(proof.sender, puzzle_bits)
    if sender.role != common_pb2.NODE_ROLE_STORAGE:
        raise VerificationError("sync: only storage nodes may sync replicas")
    if abs(proof.timestamp_ms - _now_ms()) > SYNC_WINDOW_MS:
        raise ExpiredError("sync: proof timestamp outside the window")
    message = _signed(method, subject, proof.timestamp_ms)
    verify_node_signature(sender.public_key, SYNC_DOMAIN, message, proof.signature)
    return sender


def compare_subject(mailboxes: Sequence[mailbox_pb2.MailboxDigest]) -> bytes:
    """What a ``SyncCompare`` proof signs beside its method: SHA-256 over the request's
    mailboxes, each ID and digest length-prefixed, in order (the whole question: a proof
    cannot be moved to other mailboxes or other digests)."""
    h = hashlib.sha256(b"sync-compare")
    for entry in mailboxes:
        for part in (entry.mailbox_id, entry.digest):
            h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def compare_problem(mailboxes: Sequence[mailbox_pb2.MailboxDigest]) -> str:
    """How a ``SyncCompare``'s mailboxes are malformed, or "" (bounded before any mailbox
    costs this node a ranking or a read)."""
    if not 1 <= len(mailboxes) <= MAX_COMPARE:
        return f"sync: compare of {len(mailboxes)} mailboxes, not 1..{MAX_COMPARE}"
    previous = b""
    for entry in mailboxes:
        if len(entry.mailbox_id) != 32 or len(entry.digest) != 32:
            return "sync: a compared mailbox ID or digest is not 32 bytes"
        if entry.mailbox_id <= previous:
            return "sync: compared mailbox IDs are not strictly increasing"
        previous = entry.mailbox_id
    return ""


async def compare_answer(
    backend: MailboxBackend,
    mailboxes: Sequence[mailbox_pb2.MailboxDigest],
    judged: set[bytes],
    now_ms: int,
) -> mailbox_pb2.SyncCompareResponse:
    """The mailboxes whose digest here differs from the caller's; those not ``judged``
    (the caller is not their replica as this node sees it) are answered as differing
    without a read: the caller learns nothing of them (its SyncList will be refused).
    Reading stops once ``MAX_COMPARE_IDS`` IDs were read: the mailboxes not read are
    answered as differing too, and the caller's exchange lists them a page at a time."""
    ours: dict[bytes, bytes] = {}
    todo, budget = sorted(judged), MAX_COMPARE_IDS
    for start in range(0, len(todo), COMPARE_READ):
        if budget <= 0:
            break
        for d in await backend.digests_of(todo[start : start + COMPARE_READ], now_ms):
            ours[d.mailbox_id] = d.digest
            budget -= d.blobs + d.tombstones
    return mailbox_pb2.SyncCompareResponse(
        differ=[e.mailbox_id for e in mailboxes if ours.get(e.mailbox_id) != e.digest]
    )


def check_mailbox_id(box: bytes) -> bytes:
    if len(box) != 32:
        raise MalformedError("sync: mailbox ID is not 32 bytes")
    return box


@dataclass(frozen=True)
class SyncRules(MailboxRules):
    """What a blob or tombstone from another node must pass (``MailboxRules``, the
    codec's), and the mailbox quota it must fit."""

    quota: Quota


def blob_wire(b: StoredBlob) -> int:
    return len(b.blob) + BLOB_WIRE


def tomb_wire(t: Tombstone | mailbox_pb2.Tombstone) -> int:
    return len(t.authorization) + TOMB_WIRE


@dataclass(frozen=True)
class Accepted:
    """What a push or pull stored, and which of its blobs are now held here."""

    stored: int
    tombstoned: int
    held_blobs: frozenset[bytes]
    held_tombstones: frozenset[bytes]


async def accept(
    backend: MailboxBackend,
    box: bytes,
    blobs: Sequence[mailbox_pb2.StoredBlob],
    tombstones: Sequence[mailbox_pb2.Tombstone],
    rules: SyncRules,
) -> Accepted:
    """Store what passes ``rules`` and fits the mailbox's quota; the rest is refused and
    counted in one WARNING per call (a hostile peer must not flood the log)."""
    now = _now_ms()
    refused: dict[str, int] = {}
    good_tombs = _checked(tombstones, lambda t: rules.check_tombstone(box, t, now), refused)
    good_blobs = _checked(blobs, lambda b: rules.check_blob(box, b, now), refused)
    if good_tombs:
        await backend.delete(good_tombs, now)
    good_blobs = await _within_quota(backend, box, good_blobs, rules.quota, now, refused)
    # The quota again where the blobs are written: pushes, pulls and puts to the mailbox
    # running at once each passed ``_within_quota`` against usage read before the others.
    outcomes = await backend.put_many(good_blobs, now, rules.quota) if good_blobs else []
    if over := sum(o is PutOutcome.OVER_QUOTA for o in outcomes):
        refused["mailbox quota"] = refused.get("mailbox quota", 0) + over
    if refused:
        log.warning("refused synced items", extra={"mailbox": box.hex(), "refused": refused})
    held = {b.blob_id for b, o in zip(good_blobs, outcomes, strict=True) if _held(o)}
    deleted = {b.blob_id for b, o in zip(good_blobs, outcomes, strict=True)
               if o is PutOutcome.TOMBSTONED}  # fmt: skip
    return Accepted(
        sum(o is PutOutcome.STORED for o in outcomes), len(good_tombs),
        frozenset(held), frozenset(deleted | {t.blob_id for t in good_tombs}),
    )  # fmt: skip


def _held(outcome: PutOutcome) -> bool:
    return outcome in (PutOutcome.STORED, PutOutcome.DUPLICATE)


def _checked(items: Sequence[Any], check: Callable[[Any], T], refused: dict[str, int]) -> list[T]:
    good = []
    for item in items:
        try:
            good.append(check(item))
        except ProtocolError as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
    return good


async def _within_quota(
    backend: MailboxBackend,
    box: bytes,
    blobs: list[StoredBlob],
    quota: Quota,
    now_ms: int,
    refused: dict[str, int],
) -> list[StoredBlob]:
    """The blobs, in order, that fit the mailbox's quota counted forward (as PutMany).
    A blob already held passes without counting: several replicas push the same blobs
    to a replica that lost them, and near the quota the copies would crowd out the rest."""
    if not blobs:
        return []
    usage = await backend.usage(box, now_ms)
    held, _ = await backend.held(box, [b.blob_id for b in blobs], now_ms)
    count, size = usage.blobs, usage.bytes
    fitting = []
    for blob in blobs:
        if blob.blob_id in held:
            fitting.append(blob)  # a duplicate: stores nothing
            continue
        try:
            quota.check_quota(count, size, len(blob.blob))
        except CapacityError:
            refused["mailbox quota"] = refused.get("mailbox quota", 0) + 1
            continue
        fitting.append(blob)
        count, size = count + 1, size + len(blob.blob)
    return fitting


def is_storage(contact: Contact) -> bool:
    return contact.role == common_pb2.NODE_ROLE_STORAGE


@dataclass(frozen=True)
class Neighbourhood:
    """One lookup's result, kept to rank the storage nodes of other mailboxes than its
    target without a lookup of their own, where that provably gives what a lookup of them
    would (``ranks``).

    Why it is safe: a lookup returns the k nodes closest to its target; any node left out
    is farther from the target than the farthest returned (``radius``). XOR distance obeys
    the triangle inequality, so a node left out is farther from another ID ``box`` than
    ``radius - distance(target, box)``. If the storage nodes to ``box`` among those
    returned (this node included), closest first, up to the last one the replica choice
    takes (``replica_set_depth``: past the ``count``-th when a crowded subnet's nearest
    are passed over) all lie closer than that, no node left out can be among them; and
    every node that close is among the k returned, so a lookup of ``box`` (its k closest)
    would return them all too, and the choice, which looks no further, is the same. A
    choice that had to fill from crowded subnets (too few subnets near ``box``) depends
    on all k, and is proved only by a lookup that found every node reachable
    (``exhaustive``: a small network), which ranks any mailbox. Assumes what a fresh lookup does:
    that the lookup found the true closest nodes."""

    target: bytes
    contacts: tuple[Contact, ...]  # closest to ``target`` first, this node never among them
    exhaustive: bool
    k: int
    at: float  # monotonic

    @classmethod
    def of(cls, target: bytes, found: Closest, k: int, now: float) -> Neighbourhood:
        return cls(target, tuple(found.contacts), found.exhaustive, k, now)

    def storage(self) -> list[Contact]:
        return [c for c in self.contacts if is_storage(c)]

    def ranks(self, box: bytes, me: Contact, count: int, *, loopback_exempt: bool) -> bool:
        """Whether the ``count`` replicas of ``box`` (``replica_set``, ``me`` among them if
        it is one) are certainly those a lookup of ``box`` would give. The spread over
        subnets may pass over the nearest nodes of a crowded subnet: the proof must reach
        the last node it takes, not only the ``count``-th closest; and a choice that had
        to fill from the crowded subnets (too few others) depends on every node, proved
        by nothing short of an exhaustive lookup."""
        if self.exhaustive:
            return True
        if len(self.contacts) < self.k:  # a short answer bounds nothing
            return False
        ranked = lookup_view(self.contacts, me, box, self.k)
        depth = replica_set_depth(ranked, count, loopback_exempt=loopback_exempt)
        if depth is None:
            return False
        reach = distance(ranked[depth - 1].node_id, box)
        radius = distance(self.contacts[-1].node_id, self.target)
        return reach + distance(self.target, box) < radius


def by_distance(box: bytes, contacts: Sequence[Contact]) -> list[Contact]:
    """Each node once, closest to ``box`` first."""
    unique = {c.node_id: c for c in contacts}
    return sorted(unique.values(), key=lambda c: distance(c.node_id, box))


def lookup_view(found: Sequence[Contact], me: Contact, box: bytes, k: int) -> list[Contact]:
    """The storage nodes, closest to ``box`` first, of what a client's lookup of ``box``
    returns, from this node's lookup ``found``: its k closest, this node among them
    (a lookup never returns its asker). The spread may reach the k-th when subnets are
    few, so the view must end where the client's does."""
    return [c for c in by_distance(box, [*found, me])[:k] if is_storage(c) or c is me]


def choose_replicas(
    found: Sequence[Contact], me: Contact, box: bytes, replicas: int, *, k: int,
    loopback_exempt: bool,
) -> tuple[list[Contact], bool]:  # fmt: skip
    """The other storage nodes of the mailbox's replica set among ``found``
    (``replica_set``: the closest, at most 2 of one subnet while others are left, as
    clients choose), closest first, and whether ``me`` is one of them. A lookup never
    returns the node that asks, so this node is placed by its own distance and subnet:
    otherwise a replica would take the next one for a replica and keep pushing the
    mailbox to it."""
    view = lookup_view([c for c in found if c.node_id != me.node_id], me, box, k)
    chosen = replica_set(view, replicas, loopback_exempt=loopback_exempt)
    rightful = any(c.node_id == me.node_id for c in chosen)
    return [c for c in chosen if c.node_id != me.node_id], rightful


class ReplicaView:
    """Who may sync a mailbox with this node, judged from its own view of the network.

    The ranking is of the storage nodes this node knows near the mailbox, plus itself, by
    XOR distance: those of its routing table (each proved its key from its address before
    it entered) and those its own lookup of the mailbox found (cached ``LOOKUP_TTL_S`` per
    mailbox; or one of its last lookups, of a neighbouring mailbox, that provably ranks
    this one as its own would: ``Neighbourhood``). The lookup matters: a table right
    after a start knows few nodes, and a thin view would rank anyone among the closest.
    A caller among the R + ``SYNC_MARGIN`` the replica choice takes (``replica_set``, as
    clients choose R: these include them) is a replica; so is this node, under the same
    bound. A caller refused on a lookup older than ``RELOOK_AFTER_S`` (it may have
    just started) gets one fresh lookup.
    An injected fake close ID can only push real nodes out (denying sync, counted as a
    failure), never let a caller in: the caller must sign with the key of its ranked ID.
    Calls are rate-limited per caller and per address first, before any lookup."""

    def __init__(
        self, node: OverlayNode, replicas: int = 5, *,
        rate: float = SYNC_CALLS_PER_S, burst: float = SYNC_CALL_BURST,
    ) -> None:  # fmt: skip
        self.node, self.bound = node, replicas + SYNC_MARGIN
        self.per_node = RateLimiter(rate, burst, 4096)
        self.per_address = RateLimiter(rate, burst, 4096)
        self._own: OrderedDict[bytes, Neighbourhood] = OrderedDict()  # by mailbox looked up
        self._lookups: SingleFlight[bytes, Neighbourhood] = SingleFlight()  # by mailbox
        self._hoods: deque[Neighbourhood] = deque(maxlen=NEIGHBOURHOODS)
        self.lookups = 0  # made so far (bench.repair, tests)

    async def ranking(self, box: bytes, *, fresh: bool = False) -> list[bytes]:
        """Node IDs of the ``bound`` replicas of the storage nodes known (this node
        included), chosen as clients choose R (``replica_set``: a superset of those R)."""
        near = self.node.table.closest(box, 4 * self.bound)
        known = [*near, *await self._looked_up(box, fresh=fresh)]
        view = lookup_view(known, self._me(), box, self.node.config.k)
        chosen = replica_set(view, self.bound, loopback_exempt=self.node.config.allow_loopback)
        return [c.node_id for c in chosen]

    def _me(self) -> Contact:
        assert self.node.contact is not None, "node not started"
        return self.node.contact

    async def _looked_up(self, box: bytes, *, fresh: bool) -> list[Contact]:
        """The nodes a lookup of ``box`` finds: this mailbox's own recent lookup,
        else a recent lookup of a neighbouring mailbox that provably ranks this one the
        same (``Neighbourhood``; a replica syncs its mailboxes in ID order, mostly
        neighbours), else a new lookup (one per mailbox in flight, shared).

        A call that finds none while lookups are in flight waits for them and looks
        again: a peer's pass sends ``COMPARE_AHEAD`` compares at once, and each started a
        lookup of its first mailbox where the first to end would have ranked them all
        (`bench.repair` burst, 5 storage nodes: 8-24 lookups on the 4 peers per pass,
        one each now)."""
        max_age = RELOOK_AFTER_S if fresh else LOOKUP_TTL_S
        hood = self._recent(box, max_age)
        if hood is None and len(self._lookups):
            await self._lookups.settled()
            hood = self._recent(box, max_age)
        if hood is None:
            hood = await self._lookups.run(box, lambda: self._lookup(box))
        return list(hood.contacts)

    def _recent(self, box: bytes, max_age: float) -> Neighbourhood | None:
        """A lookup no older than ``max_age`` that ranks ``box``: its own, or a neighbour's."""
        now = time.monotonic()
        own = self._own.get(box)
        if own is not None and now - own.at <= max_age:
            self._own.move_to_end(box)
            return own
        for hood in reversed(self._hoods):
            if now - hood.at <= max_age and hood.ranks(
                box, self._me(), self.bound, loopback_exempt=self.node.config.allow_loopback
            ):
                return hood
        return None

    async def _lookup(self, box: bytes) -> Neighbourhood:
        self.lookups += 1
        found = await self.node.find_closest(box)
        hood = Neighbourhood.of(box, found, self.node.config.k, time.monotonic())
        self._hoods.append(hood)
        self._own[box] = hood
        self._own.move_to_end(box)
        while len(self._own) > OWN_LOOKUPS:
            self._own.popitem(last=False)
        return hood

    async def authorize(self, box: bytes, caller: Contact, source_ip: str, *, push: bool) -> None:
        """Return if ``caller`` may make this call for ``box``, else raise why not."""
        self.admit(caller, source_ip)
        for fresh in (False, True):
            if await self.is_replica(box, caller, push=push, fresh=fresh):
                return
        raise VerificationError(
            "sync: the caller is not among this mailbox's replicas as this node sees them"
        )

    def admit(self, caller: Contact, source_ip: str) -> None:
        """Count one call against the caller's and its address's rate, or raise
        ``RateLimited`` (a ``SyncCompare`` of many mailboxes is one call)."""
        now = time.monotonic()
        wait = max(self.per_node.check(caller.node_id, now), self.per_address.check(source_ip, now))
        if wait > 0:
            limit = self.per_node.rate
            raise RateLimited(f"sync: over the rate of {limit:g} calls/s from this peer", wait)

    async def is_replica(
        self, box: bytes, caller: Contact, *, push: bool = False, fresh: bool = False
    ) -> bool:
        """``caller`` ranks among ``box``'s replicas here (or, for a push, this node does)."""
        ranking = await self.ranking(box, fresh=fresh)
        return caller.node_id in ranking or (push and self.node.node_id in ranking)


@dataclass
class _Pace:
    bucket: TokenBucket  # the peers' default limit, while this peer never refused
    rate: float | None = None  # calls/s once it refused: one call every 1 / rate
    next_at: float = 0.0  # no call before (its retry-after, or the paced interval)
    cut_at: float = 0.0  # when a refusal last halved the rate


class PeerPacer:
    """When this node's repair may make its next sync call to each peer (sans-I/O: the
    caller gives the monotonic time), so that a pass keeps within the peer's sync rate
    limit instead of being refused (docs/storage.md "Anti-entropy").

    A peer's limit is its own configuration, which this node cannot know. It starts from
    the default (a token bucket of ``rate`` and ``burst``, as a peer's limiter is, at
    ``PACE_SHARE`` of the default: calls arrive a little bunched, and a bucket matching
    the peer's exactly was refused a few times a pass): against a peer with the default
    limit, a pass is not refused. A peer configured lower
    refuses with a retry-after, which is authoritative: no call goes to it before then,
    and from then on its calls are paced one at a time at a rate halved by each refusal
    (not below ``MIN_PACE_PER_S``) and raised by ``PACE_STEP`` per answered call, up to
    ``rate``: the pace settles just under the peer's real limit, back from a halving in
    ``rate / (2 * PACE_STEP)`` calls (~13 s whatever the rate), so about one refusal per
    ``10 * rate`` calls. (A peer's limit is per calling node: there is no capacity shared
    with other callers to be fair about, only the peer's own limit to find.) Memory: at
    most ``max_peers`` peers, the least recently called forgotten (one comes back at the
    default)."""

    def __init__(
        self, rate: float = PACE_SHARE * SYNC_CALLS_PER_S,
        burst: float = PACE_SHARE * SYNC_CALL_BURST, max_peers: int = 4096,
    ) -> None:  # fmt: skip
        TokenBucket(rate, burst)  # validates them
        self.rate, self.burst, self.max_peers = rate, burst, max_peers
        self._peers: OrderedDict[bytes, _Pace] = OrderedDict()

    def wait(self, peer: bytes, now: float) -> float:
        """0.0: a call to ``peer`` may go now (counted as sent); else the seconds to wait
        before asking again (nothing changed)."""
        pace = self._pace(peer)
        if now < pace.next_at:
            return pace.next_at - now
        if pace.rate is None:
            return pace.bucket.take(now)
        pace.next_at = now + 1 / pace.rate
        return 0.0

    def refused(self, peer: bytes, retry_after_s: float, now: float, sent: float) -> None:
        """``peer`` refused a call sent at ``sent`` over its rate: nothing before its
        retry-after, then slower. Calls in flight together are refused together: only
        one sent after the last cut halves the rate again, as TCP cuts once a window."""
        pace = self._pace(peer)
        if pace.rate is None or sent >= pace.cut_at:
            pace.rate = max(MIN_PACE_PER_S, (pace.rate or self.rate) / 2)
            pace.cut_at = now
        pace.next_at = max(pace.next_at, now + retry_after_s)

    def answered(self, peer: bytes) -> None:
        """``peer`` answered a call: a paced peer's rate grows by ``PACE_STEP``."""
        pace = self._peers.get(peer)
        if pace is not None and pace.rate is not None:
            pace.rate = min(self.rate, pace.rate + PACE_STEP)

    def pace(self, peer: bytes) -> float | None:
        """Calls/s ``peer`` is paced at since it refused, or None (never refused)."""
        pace = self._peers.get(peer)
        return None if pace is None else pace.rate

    def _pace(self, peer: bytes) -> _Pace:
        pace = self._peers.get(peer)
        if pace is None:
            pace = self._peers[peer] = _Pace(TokenBucket(self.rate, self.burst))
            if len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        self._peers.move_to_end(peer)
        return pace


@dataclass(frozen=True)
class PagePlan:
    blob_ids: list[bytes]
    tombstone_ids: list[bytes]
    next_after: bytes | None  # None: this page reaches the end of the mailbox


def plan_page(index: SyncIndex, after: bytes) -> PagePlan:
    """The items with ID > ``after``, in ID order, up to ``MAX_SYNC_IDS`` items and
    ``SYNC_BYTES``; a page never splits the items of one ID (a blob and its tombstone).
    Tombstones count by their authorization's size."""
    items = sorted(
        [(i, False, ID_WIRE) for i in index.blob_ids if i > after]
        + [(i, True, size + TOMB_WIRE) for i, size in index.tombstones if i > after]
    )
    plan = PagePlan([], [], None)
    size = 0
    for n, (item_id, is_tomb, wire) in enumerate(items):
        first_of_id = n == 0 or items[n - 1][0] != item_id
        full = n >= MAX_SYNC_IDS or (n > 0 and size + wire > SYNC_BYTES)
        if first_of_id and full:
            return PagePlan(plan.blob_ids, plan.tombstone_ids, items[n - 1][0])
        (plan.tombstone_ids if is_tomb else plan.blob_ids).append(item_id)
        size += wire
    return plan


async def list_answer(
    backend: MailboxBackend, box: bytes, after: bytes, now_ms: int
) -> mailbox_pb2.SyncListResponse:
    """One page of the mailbox (``plan_page``), reading only that page's part of the index
    and its authorizations. The whole index at every page cost 0.34 s a page on SQLite's
    reader for a mailbox of 50,000 blobs and 50,000 tombstones: 650 pages, 218 s, fetches
    waiting behind it. ``plan_page`` takes at most ``MAX_SYNC_IDS`` items and the partner of
    the last one's ID, and looks at one more to know the page is not the last: the smallest
    ``MAX_SYNC_IDS + 2`` of each kind hold them all."""
    index = await backend.sync_index(box, now_ms, after=after, limit=MAX_SYNC_IDS + 2)
    plan = plan_page(index, after)
    tombs = await backend.get_tombstones(box, plan.tombstone_ids, now_ms)
    page = mailbox_pb2.SyncListResponse(
        blob_ids=plan.blob_ids, tombstones=[tombstone_proto(t) for t in tombs]
    )
    if plan.next_after is not None:
        page.more, page.next_after = True, plan.next_after
    return page


async def pull_answer(
    backend: MailboxBackend, box: bytes, ids: Sequence[bytes], max_bytes: int, now_ms: int
) -> mailbox_pb2.SyncPullResponse:
    """The blobs held among the first IDs asked for, read a few at a time, until the next
    one would pass ``max_bytes`` (the first one always goes: a piece holds one item)."""
    answer = mailbox_pb2.SyncPullResponse()
    size = 0
    for start in range(0, len(ids), _PULL_CHUNK):
        chunk = ids[start : start + _PULL_CHUNK]
        found = {b.blob_id: b for b in await backend.get_blobs(box, chunk, now_ms)}
        for offset, wanted in enumerate(chunk):
            blob = found.get(wanted)
            if blob is not None:
                if answer.blobs and size + blob_wire(blob) > max_bytes:
                    answer.answered = start + offset
                    return answer
                answer.blobs.append(blob_proto(blob))
                size += blob_wire(blob)
    answer.answered = len(ids)
    return answer


@dataclass(frozen=True)
class Holdings:
    """The blob and tombstone IDs one node holds for one mailbox."""

    blob_ids: frozenset[bytes]
    tombstone_ids: frozenset[bytes]

    def settles_blob(self, blob_id: bytes) -> bool:
        """Holding a blob or its tombstone: either way the node needs nothing more for it."""
        return blob_id in self.blob_ids or blob_id in self.tombstone_ids


class PullClaims:
    """Which peer each blob one mailbox's sync pulls is asked of. The exchanges with the
    peers run at once, each against the same snapshot of what this node holds, so a blob
    every peer lists was pulled from each of them: a node that missed a mailbox's blobs
    while it was down took each one 4 times from 4 peers (4 SyncPulls, 4 times the bytes and
    the checks), and its repair ran at the peers' rate for twice the calls it needed. Now the
    first exchange to list a blob claims it.

    A peer whose pull answer covers an ID it did not deliver (it withholds, or no longer
    holds it), or whose exchange failed, gives up every claim it has not delivered at once
    (``release``) and claims nothing more in this sync: the other peers that listed those
    blobs pull them as soon as their own exchange is done (``released``), and once every
    exchange is done what is left is asked of each peer that listed it in turn
    (``unsettled``). Before, a claimed blob was asked of another peer only after every
    exchange ended, so a peer that listed all first and answered each pull late with
    nothing held the repair for one call per blob at its pace (30,000 blobs: hours)."""

    def __init__(self, exchanges: int = 0) -> None:
        self._claimed: dict[bytes, bytes] = {}  # blob ID -> the node ID it was asked of
        self._settled: set[bytes] = set()
        self._barred: set[bytes] = set()  # peers that gave up their claims
        self.open = exchanges  # exchanges not yet done
        self._change = asyncio.Event()

    def claim(self, peer: bytes, blob_ids: Iterable[bytes]) -> list[bytes]:
        """Those of ``blob_ids`` no other exchange pulls, now pulled from ``peer``."""
        if peer in self._barred:
            return []
        mine = [b for b in blob_ids if self._claimed.get(b, RELEASED) == RELEASED]
        self._claimed.update(dict.fromkeys(mine, peer))
        return mine

    def settle(self, blob_ids: Iterable[bytes]) -> None:
        """Held here now (stored, held already, or deleted)."""
        self._settled.update(blob_ids)

    def release(self, peer: bytes) -> None:
        """``peer`` did not deliver what it was asked for: its claims not yet held here go
        to the other peers now, and it claims nothing more in this sync."""
        self._barred.add(peer)
        gone = [b for b, p in self._claimed.items() if p == peer and b not in self._settled]
        self._claimed.update(dict.fromkeys(gone, RELEASED))
        self._changed()

    def done(self) -> None:
        """One exchange is done."""
        self.open -= 1
        self._changed()

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def changed(self) -> None:
        """Until the next ``release`` or ``done``."""
        await self._change.wait()

    def released(self, peer: bytes, listed: frozenset[bytes]) -> list[bytes]:
        """Blobs ``peer`` listed that another peer gave up; they are claimed for ``peer``."""
        if peer in self._barred:
            return []
        return self._take(peer, listed, lambda owner: owner == RELEASED)

    def unsettled(self, peer: bytes, listed: frozenset[bytes]) -> list[bytes]:
        """Blobs ``peer`` listed that another peer was asked for and did not deliver; they
        are claimed for ``peer`` now."""
        return self._take(peer, listed, lambda owner: owner != peer)

    def barred(self, peer: bytes) -> bool:
        return peer in self._barred

    def _take(
        self, peer: bytes, listed: frozenset[bytes], whose: Callable[[bytes], bool]
    ) -> list[bytes]:
        left = sorted(b for b in listed & self._claimed.keys()
                      if b not in self._settled and whose(self._claimed[b]))  # fmt: skip
        self._claimed.update(dict.fromkeys(left, peer))
        return left


RELEASED = b""  # ``PullClaims``: the claim of no peer, given up by the one it was asked of


def copies(ours: Holdings, peers: Sequence[Holdings]) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """For each blob and each tombstone we hold, how many of ``peers`` hold it too."""
    blobs = {b: sum(p.settles_blob(b) for p in peers) for b in ours.blob_ids}
    tombs = {t: sum(t in p.tombstone_ids for p in peers) for t in ours.tombstone_ids}
    return blobs, tombs


@dataclass
class RepairMetrics:
    passes: Counter
    pulled: Counter
    pushed: Counter
    last_pass: Gauge
    pass_seconds: Gauge
    replicas: Histogram
    handoff_dropped: Counter
    failures: Counter
    calls: Counter
    lookups: Counter
    rate_waits: Counter
    compared: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry, replicas: int) -> RepairMetrics:
        return cls(
            Counter("dna_storage_repair_passes", "Anti-entropy passes", registry=registry),
            Counter("dna_storage_repair_pulled", "Blobs and tombstones pulled", registry=registry),
            Counter("dna_storage_repair_pushed", "Blobs and tombstones pushed", registry=registry),
            Gauge(
                "dna_storage_repair_last_pass_timestamp_seconds",
                "When the last pass ended",
                registry=registry,
            ),
            Gauge(
                "dna_storage_repair_last_pass_duration_seconds",
                "How long the last pass took",
                registry=registry,
            ),
            Histogram(
                "dna_storage_mailbox_replicas",
                "Per mailbox held, per repair pass: replicas of the mailbox's replica set found "
                "holding its least-replicated blob or tombstone (this node counts if it is one)",
                buckets=tuple(range(replicas + 1)),
                registry=registry,
            ),
            Counter(
                "dna_storage_handoff_dropped",
                "Hand-off blobs and tombstones dropped once every rightful replica held them",
                registry=registry,
            ),
            Counter(
                "dna_storage_repair_failures",
                "Sync exchanges with a peer that failed, by reason (the gRPC status, lower "
                "case; 'split' counts pieces refused as too large and retried in halves; "
                "'withheld': a pull answer covered blobs the peer did not send, and its "
                "share went to the other peers; "
                "'store_disk', 'store_unavailable', 'store_damaged': this node's store "
                "failed, and a full one still pushed)",
                ["reason"],
                registry=registry,
            ),
            Counter(
                "dna_storage_repair_calls",
                "Sync calls of this node's repair that a peer answered (refusals and failures "
                "are in repair_failures), by method (SyncList, SyncPull, SyncPush, "
                "SyncCompare) and how: session, or unary (the peer serves no sessions, or its "
                "session was unavailable; SyncCompare always)",
                ["method", "via"],
                registry=registry,
            ),
            Counter(
                "dna_storage_repair_lookups",
                "Overlay lookups of repair to find mailboxes' replica sets (one serves the "
                "mailboxes after it that it provably ranks the same)",
                registry=registry,
            ),
            Counter(
                "dna_storage_repair_rate_waits",
                "Sync calls of repair that waited for a peer's rate limit, by cause: 'pace' "
                "(this node's own pacing held the call back) or 'refused' (the peer refused "
                "it over its rate; the call went again after the retry-after it gave)",
                ["cause"],
                registry=registry,
            ),
            Counter(
                "dna_storage_repair_compared",
                "Mailboxes of a repair pass (one per peer they are shared with) whose exchange "
                "a SyncCompare decided, by outcome: 'same' (the peer holds what this node "
                "holds: no exchange), 'differ' (exchanged), 'unsupported' (an older peer: "
                "exchanged, as before SyncCompare) or 'failed' (the call failed: exchanged)",
                ["outcome"],
                registry=registry,
            ),
        )


@dataclass(frozen=True)
class MailboxPlan:
    """What a pass does with one mailbox: its other replicas (or, for a hand-off copy, the
    rightful ones), and those of them a ``SyncCompare`` found holding what this node holds
    (no exchange with them)."""

    box: bytes
    peers: list[Contact]
    rightful: bool
    in_sync: frozenset[bytes] = frozenset()  # node IDs

    def to_sync(self) -> list[Contact]:
        return [p for p in self.peers if p.node_id not in self.in_sync]


class RepairError(Exception):
    """A peer's answers make no progress (it answered none of the IDs asked for)."""


class _Window:
    """At most ``size`` coroutines running at once (a pass's mailboxes in flight). The
    first to fail raises, from ``add`` or ``drain``, as the pass did one at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tasks: set[asyncio.Future[None]] = set()

    async def add(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            while len(self.tasks) >= self.size:
                await self._reap()
        except BaseException:  # the pass ends (cancelled, or another mailbox failed)
            work.close()  # never started: no "coroutine was never awaited" warning
            raise
        self.tasks.add(asyncio.ensure_future(work))

    async def drain(self) -> None:
        while self.tasks:
            await self._reap()

    async def cancel(self) -> None:
        """Cancel what is left (a failure, or the pass itself cancelled) and wait for it."""
        await stop_tasks(self.tasks)
        self.tasks.clear()

    async def _reap(self) -> None:
        done, self.tasks = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        failed = [t.exception() for t in done if not t.cancelled() and t.exception()]
        if failed:  # the first ends the pass, as it did before mailboxes overlapped
            raise failed[0]  # type: ignore[misc]


class _Ahead:
    """Up to ``size`` slices' plans being completed (their compares in flight) while the
    pass reads and looks up the next slice; taken back oldest first, in ID order."""

    def __init__(self, size: int) -> None:
        if size < 1:  # nothing could be taken back: the pass would never sync
            raise ValueError(f"compare_ahead must be at least 1, not {size}")
        self.size = size
        self.tasks: deque[asyncio.Future[list[MailboxPlan]]] = deque()

    def full(self) -> bool:
        return len(self.tasks) >= self.size

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def put(self, work: Awaitable[list[MailboxPlan]]) -> None:
        self.tasks.append(asyncio.ensure_future(work))

    async def take(self) -> list[MailboxPlan]:
        """The oldest slice's plans, once its compares are answered. It leaves the queue
        only then: one that fails stays for ``cancel`` to collect (no task left behind)."""
        plans = await self.tasks[0]
        self.tasks.popleft()
        return plans

    async def cancel(self) -> None:
        """Cancel the slices still ahead (a failure, or the pass itself cancelled) and
        wait for them."""
        await stop_tasks(self.tasks)
        self.tasks.clear()


class Repairer:
    def __init__(
        self,
        node: OverlayNode,
        backend: MailboxBackend,
        *,
        rules: SyncRules,
        registry: CollectorRegistry,
        replicas: int = 5,
        interval_s: float = 60.0,
        timeout_s: float = 10.0,
        sessions: bool = True,
        in_flight: int = IN_FLIGHT,
        compare: bool = True,
        compare_ahead: int = COMPARE_AHEAD,
    ) -> None:
        self.node, self.backend, self.rules = node, backend, rules
        self.in_flight, self.compare_ahead = in_flight, compare_ahead
        self.compare = compare  # False: every mailbox exchanged with every peer (benchmarks)
        self.replicas = replicas
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.metrics = RepairMetrics.create(registry, replicas)
        self._hood: Neighbourhood | None = None  # the last lookup (``replica_peers``)
        self._looking = asyncio.Lock()  # mailboxes in flight wait for one lookup, and share it
        self._no_compare: set[bytes] = set()  # peers that answered UNIMPLEMENTED this pass
        self._comparing: dict[bytes, asyncio.Semaphore] = {}  # per peer, this pass
        self.pacer = PeerPacer()
        # One session per peer carries the sync calls (session.py); a peer that serves none
        # (an older node), or whose session is unavailable, gets the unary calls, as every
        # peer does with None (``sessions=False``: the unary calls only, as before them).
        self.sessions = (
            SessionPool(node.channels.get, timeout_s, node.channels.discard) if sessions else None
        )

    async def close(self) -> None:
        """End the sessions to the peers (the overlay node's channels stay its own)."""
        if self.sessions is not None:
            await self.sessions.close()

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.repair_once()
            except (RemoteError, ProtocolError, OSError) as exc:
                log.warning("repair pass failed: %s", exc)
            except Exception:  # a bug must not stop repair for good: log it, try next pass
                log.exception("repair pass crashed")

    async def repair_once(self) -> int:
        """One pass over every mailbox held; returns how many were synced.

        The mailbox ID space is walked in REPAIR_RANGES slices: listing everything at once
        would hold every blob ID of the node in memory (~100 MB at a million blobs).
        Each slice's replicas are found here, in ID order (one lookup serves many
        neighbours: ``replica_peers``), and its compares go on while the next slices are
        read and looked up, ``compare_ahead`` slices at most: one after the other, a pass
        with nothing to repair lasted 256 round trips per peer. ``in_flight`` mailboxes are
        synced at once: one after the other, a pass would last at least a round trip per
        mailbox (100,000 mailboxes at 50 ms: 83 minutes), far below what the peers' rate
        limits allow; the pacer keeps each peer within them, compares included."""
        started = time.monotonic()
        synced = 0
        self._hood = None  # a pass starts from a fresh lookup: nodes come and go between
        self._no_compare, self._comparing = set(), {}
        window, ahead = _Window(self.in_flight), _Ahead(self.compare_ahead)
        try:
            for start, end in id_ranges(REPAIR_RANGES):
                digests = await self.backend.digests(start, end, _now_ms())
                plans = await self._replicas(digests)
                if ahead.full():
                    synced += await self._sync_all(window, await ahead.take())
                ahead.put(self._compared_plans(plans, digests))
            while ahead:
                synced += await self._sync_all(window, await ahead.take())
            await window.drain()
        finally:
            await ahead.cancel()
            await window.cancel()
        self.metrics.passes.inc()
        self.metrics.last_pass.set(time.time())
        self.metrics.pass_seconds.set(time.monotonic() - started)
        return synced

    async def _sync_all(self, window: _Window, plans: list[MailboxPlan]) -> int:
        """Hand each planned mailbox to the window (waiting while it is full)."""
        for plan in plans:
            await window.add(self.sync_mailbox(plan.box, plan))
        return len(plans)

    async def replica_peers(self, box: bytes) -> tuple[list[Contact], bool]:
        """The other storage nodes of the mailbox's replica set (``choose_replicas``), and
        whether this node is one of them: from the last lookup while it provably ranks this
        mailbox as its own lookup would (``Neighbourhood``: a pass walks mailboxes in ID
        order, and neighbours mostly share their replicas), else from a new lookup. The
        last lookup serves for ``REUSE_S`` at most, and never into the next pass: a node
        that came back (or left) is seen as soon as a fresh lookup per mailbox would have,
        give or take those seconds (a small network's exhaustive lookup ranks every
        mailbox, so without the bound it would hide a restarted replica for as long)."""
        assert self.node.contact is not None, "node not started"
        me, exempt = self.node.contact, self.node.config.allow_loopback
        async with self._looking:
            now, hood = time.monotonic(), self._hood
            if (
                hood is None
                or now - hood.at > REUSE_S
                or not hood.ranks(box, me, self.replicas, loopback_exempt=exempt)
            ):
                found = await self.node.find_closest(box)
                self.metrics.lookups.inc()
                hood = self._hood = Neighbourhood.of(box, found, self.node.config.k, now)
        return choose_replicas(
            hood.contacts, me, box, self.replicas, k=self.node.config.k, loopback_exempt=exempt
        )

    async def _replicas(self, digests: list[MailboxDigest]) -> list[MailboxPlan]:
        """Each mailbox's replicas, one after the other in ID order: neighbours share a
        lookup (``replica_peers``), which mailboxes looked up out of order would not."""
        return [MailboxPlan(d.mailbox_id, *await self.replica_peers(d.mailbox_id))
                for d in digests]  # fmt: skip

    async def _compared_plans(
        self, plans: list[MailboxPlan], digests: list[MailboxDigest]
    ) -> list[MailboxPlan]:
        """``plans`` with the peers found in sync: one ``SyncCompare`` per peer and
        ``MAX_COMPARE`` mailboxes shared with it, the peers at once; a mailbox a peer
        holds the same is not exchanged with it (``MailboxPlan.in_sync``). A hand-off
        copy is never compared: outside the set, this node only offers."""
        shared: dict[bytes, tuple[Contact, list[MailboxDigest]]] = {}
        for plan, digest in zip(plans, digests, strict=True):
            for peer in plan.peers if plan.rightful and self.compare else []:
                shared.setdefault(peer.node_id, (peer, []))[1].append(digest)
        same = await _together([self._in_sync(peer, ds) for peer, ds in shared.values()])
        in_sync: dict[bytes, set[bytes]] = {}
        for peer_id, boxes in zip(shared, same, strict=True):
            for box in boxes:
                in_sync.setdefault(box, set()).add(peer_id)
        return [replace(p, in_sync=frozenset(in_sync.get(p.box, ()))) for p in plans]

    async def _in_sync(self, peer: Contact, digests: list[MailboxDigest]) -> set[bytes]:
        """Of ``digests`` (ID order), the mailboxes ``peer`` holds the same, by
        ``SyncCompare`` calls of ``MAX_COMPARE``, at once as far as the peer's share of
        calls in flight allows: a node of a large network holds its mailboxes near its
        own ID, most in one slice, where calls one after the other would add up."""
        batches = [digests[n : n + MAX_COMPARE] for n in range(0, len(digests), MAX_COMPARE)]
        agreed = await _together([self._batch_in_sync(peer, batch) for batch in batches])
        return set().union(*agreed)

    async def _batch_in_sync(self, peer: Contact, batch: list[MailboxDigest]) -> set[bytes]:
        """The mailboxes of ``batch`` ``peer`` holds the same (none, for an older peer or
        a failed call: they go to the exchange, as before SyncCompare)."""
        comparing = self._comparing.setdefault(peer.node_id, asyncio.Semaphore(self.compare_ahead))
        async with comparing:  # the pacer then spaces them within the peer's rate
            differ = await self._compared(peer, batch)
        if differ is None:
            return set()
        agreed = {d.mailbox_id for d in batch} - differ
        self.metrics.compared.labels(outcome="same").inc(len(agreed))
        self.metrics.compared.labels(outcome="differ").inc(len(differ))
        return agreed

    async def _compared(self, peer: Contact, batch: list[MailboxDigest]) -> set[bytes] | None:
        """The mailboxes of ``batch`` that differ at ``peer``, or None when it was not
        asked (an older peer: for the rest of the pass) or the call failed (counted)."""
        if peer.node_id in self._no_compare:
            self.metrics.compared.labels(outcome="unsupported").inc(len(batch))
            return None
        try:
            return await self._sync_compare(peer, batch)
        except RemoteError as err:
            if err.grpc_code == "UNIMPLEMENTED":
                self._no_compare.add(peer.node_id)
                self.metrics.compared.labels(outcome="unsupported").inc(len(batch))
                return None
            reason, detail = err.grpc_code.lower(), err.details
        except RepairError as exc:
            reason, detail = "no_progress", str(exc)
        self.metrics.compared.labels(outcome="failed").inc(len(batch))
        self.metrics.failures.labels(reason=reason).inc()
        log.warning("SyncCompare with %s failed: %s %s", peer.short(), reason, detail)
        return None

    async def _sync_compare(self, peer: Contact, batch: list[MailboxDigest]) -> set[bytes]:
        """One paced ``SyncCompare``: the mailboxes of ``batch`` that differ at ``peer``.
        Unary (an older node's session would answer the op as malformed, not as unknown)."""
        entries = [mailbox_pb2.MailboxDigest(mailbox_id=d.mailbox_id, digest=d.digest)
                   for d in batch]  # fmt: skip
        subject = compare_subject(entries)

        async def send() -> mailbox_pb2.SyncCompareResponse:
            request = self._signed(mailbox_pb2.SyncCompareRequest(mailboxes=entries),
                                   "SyncCompare", subject)  # fmt: skip
            answer: mailbox_pb2.SyncCompareResponse = await self._unary(
                "SyncCompare", self._stub(peer).SyncCompare(request, timeout=self.timeout_s)
            )
            return answer

        differ = set((await self._paced(peer, send)).differ)
        if not differ <= {d.mailbox_id for d in batch}:
            raise RepairError("SyncCompare answered mailboxes not asked about")
        return differ

    async def sync_mailbox(self, box: bytes, plan: MailboxPlan | None = None) -> None:
        """Exchange with each replica not known to hold what this node holds (``plan``,
        else every replica, found now); observe the mailbox's least-held item."""
        plan = plan or MailboxPlan(box, *await self.replica_peers(box))
        peers, rightful = plan.to_sync(), plan.rightful
        agreeing = len(plan.peers) - len(peers)
        if plan.peers and not peers:  # each holds every item held here: no read, no call
            self.metrics.replicas.observe(agreeing + rightful)
            return
        # IDs only: a tombstone's signed delete (~13 KB) is read when it is pushed. Reading
        # every tombstone whole (an ``ids`` read, since removed) held 4 GiB for a mailbox of
        # 100,000 tombstones.
        index = await self.backend.sync_index(box, _now_ms())
        ours = Holdings(frozenset(index.blob_ids), frozenset(t for t, _ in index.tombstones))
        claims = PullClaims(len(peers))
        views = await asyncio.gather(*(
            self._exchange(peer, box, ours, claims) if rightful
            else self._guarded(peer, box, self._hand_off(peer, box, ours))
            for peer in peers
        ))  # fmt: skip
        if rightful:
            await self._pull_unsettled(box, claims, peers, views)
        answered = [v for v in views if v is not None] + [ours] * agreeing
        blob_copies, tomb_copies = copies(ours, answered)
        least = min((*blob_copies.values(), *tomb_copies.values()), default=None)
        if least is not None:
            self.metrics.replicas.observe(least + rightful)
        if not rightful:
            whole = self.replicas  # every rightful replica reported holding it
            await self._drop_handoff(
                box,
                [b for b, n in blob_copies.items() if n == whole],
                [t for t, n in tomb_copies.items() if n == whole],
            )

    async def _guarded(
        self, peer: Contact, box: bytes, exchange: Awaitable[Holdings]
    ) -> Holdings | None:
        """One peer's exchange; a failure is counted and logged at WARNING (repair that
        silently fails loses data later), and the next pass tries again."""
        try:
            return await exchange
        except RemoteError as err:
            reason, detail = err.grpc_code.lower(), err.details
        except RepairError as exc:
            reason, detail = "no_progress", str(exc)
        except LOCAL_STORE_ERRORS as exc:  # before, it ended the whole pass, every pass
            self.metrics.failures.labels(reason=f"store_{exc.kind}").inc()
            log.debug("sync with %s stopped: %s", peer.short(), exc)
            return None
        self.metrics.failures.labels(reason=reason).inc()
        log.warning(
            "sync with %s failed: %s %s", peer.short(), reason, detail,
            extra={"mailbox": box.hex(), "peer": peer.node_id.hex()},
        )  # fmt: skip
        return None

    async def _exchange(
        self, peer: Contact, box: bytes, ours: Holdings, claims: PullClaims
    ) -> Holdings | None:
        """``_sync_with`` one replica, then pull from it what the other peers it listed
        gave up (``PullClaims.released``) until every exchange is done: a peer that does
        not deliver delays the blobs it claimed by one of its calls, not one per blob."""
        try:
            view = await self._guarded(peer, box, self._sync_with(peer, box, ours, claims))
        finally:
            claims.done()
        if view is None:
            claims.release(peer.node_id)
            return None
        while True:
            left = claims.released(peer.node_id, view.blob_ids)
            if left:
                if await self._guarded(peer, box, self._pull_held(peer, box, left, claims)) is None:
                    claims.release(peer.node_id)
                    return view
            elif claims.open == 0:
                return view
            else:
                await claims.changed()

    async def _pull_unsettled(
        self,
        box: bytes,
        claims: PullClaims,
        peers: Sequence[Contact],
        views: Sequence[Holdings | None],
    ) -> None:
        """What a pull of the exchanges did not deliver, from the other peers that listed it,
        one after the other until none is left (a peer that gave up its claims last)."""
        order = sorted(zip(peers, views, strict=True), key=lambda pv: claims.barred(pv[0].node_id))
        for peer, view in order:
            if view is not None and (left := claims.unsettled(peer.node_id, view.blob_ids)):
                await self._guarded(peer, box, self._pull_held(peer, box, left, claims))

    async def _pull_held(
        self, peer: Contact, box: bytes, missing: list[bytes], claims: PullClaims
    ) -> Holdings:
        await self._pull(peer, box, missing, claims)
        return Holdings(frozenset(), frozenset())

    async def _drop_handoff(self, box: bytes, blob_ids: list[bytes], tomb_ids: list[bytes]) -> None:
        """A node outside the replica set holds a mailbox only as a hinted hand-off copy:
        once all R rightful replicas report holding an item (their own answer to this
        pass's offer or push), the copy here is surplus. Items not yet confirmed, and
        anything that arrived since, stay for the next pass."""
        if not blob_ids and not tomb_ids:
            return
        removed = await self.backend.forget(box, blob_ids, tomb_ids)
        if removed:
            self.metrics.handoff_dropped.inc(removed)
            log.info("dropped a confirmed hand-off copy", extra={"removed": removed})

    def _stub(self, peer: Contact) -> mailbox_pb2_grpc.MailboxAsyncStub:
        return mailbox_pb2_grpc.MailboxStub(self.node.channels.get(peer.endpoint.grpc_target))

    async def _sync_list(
        self, peer: Contact, box: bytes, request: mailbox_pb2.SyncListRequest
    ) -> mailbox_pb2.SyncListResponse:
        answer: mailbox_pb2.SyncListResponse = await self._sync_call(peer, box, "SyncList", request)
        return answer

    async def _sync_pull(
        self, peer: Contact, box: bytes, request: mailbox_pb2.SyncPullRequest
    ) -> mailbox_pb2.SyncPullResponse:
        answer: mailbox_pb2.SyncPullResponse = await self._sync_call(peer, box, "SyncPull", request)
        return answer

    async def _sync_push(
        self, peer: Contact, box: bytes, request: mailbox_pb2.SyncPushRequest
    ) -> mailbox_pb2.SyncPushResponse:
        answer: mailbox_pb2.SyncPushResponse = await self._sync_call(peer, box, "SyncPush", request)
        return answer

    async def _sync_call(self, peer: Contact, box: bytes, method: str, request: R) -> Any:
        """One sync call, paced: signed, on the peer's session, else the unary call."""

        async def send() -> Any:
            signed = self._signed(request, method, box)
            answer = await self._on_session(peer, method, signed)
            if answer is not None:
                return getattr(answer, SYNC_OPS[method])
            unary = getattr(self._stub(peer), method)
            return await self._unary(method, unary(signed, timeout=self.timeout_s))

        return await self._paced(peer, send)

    async def _paced(self, peer: Contact, send: Callable[[], Awaitable[T]]) -> T:
        """``send`` one sync call to ``peer`` when its pace allows (``PeerPacer``). Refused
        over the peer's rate, the call waits the retry-after the refusal carries and goes
        again, signed anew (at most ``RATE_RETRIES`` times, never for longer than
        ``MAX_RATE_WAIT_S``): a pass over more mailboxes than a peer's burst completes
        rather than leave them to a later pass, where the same would happen again."""
        for attempt in range(RATE_RETRIES + 1):
            await self._turn(peer)
            sent = time.monotonic()
            try:
                answer = await send()
            except RemoteError as err:
                wait_s = err.retry_after_ms / 1000
                if not wait_s or attempt == RATE_RETRIES or wait_s > MAX_RATE_WAIT_S:
                    raise
                self.pacer.refused(peer.node_id, wait_s, time.monotonic(), sent)
                self.metrics.rate_waits.labels(cause="refused").inc()
                continue
            self.pacer.answered(peer.node_id)
            return answer
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _turn(self, peer: Contact) -> None:
        """Until the pacer lets a call to ``peer`` go."""
        wait = self.pacer.wait(peer.node_id, time.monotonic())
        if wait > 0:
            self.metrics.rate_waits.labels(cause="pace").inc()
        while wait > 0:
            await asyncio.sleep(wait)
            wait = self.pacer.wait(peer.node_id, time.monotonic())

    async def _on_session(
        self, peer: Contact, method: str, request: R
    ) -> mailbox_pb2.SessionResponse | None:
        """The peer's answer to a signed sync request on its session, or None: the caller
        makes the unary call (the peer serves no sessions, or its session could not be
        opened, broke or timed out; as `MailboxClient` falls back). A refusal is the peer's
        answer, not a failed session: raised as the unary call's would be, never sent again
        (a rate-limited request must not be retried at once)."""
        if self.sessions is None:
            return None
        op = {SYNC_OPS[method]: request}
        try:
            answer = await self.sessions.call(
                peer.endpoint.grpc_target, lambda session: session.exchange(op)
            )
        except (NoSession, UnavailableError):
            return None
        if answer.HasField("error"):
            raise status_error(answer.error)
        self.metrics.calls.labels(method=method, via="session").inc()
        return answer

    async def _unary(self, method: str, rpc: Awaitable[T]) -> T:
        answer = await call(rpc)
        self.metrics.calls.labels(method=method, via="unary").inc()
        return answer

    def _signed(self, request: R, method: str, subject: bytes) -> R:
        """``request`` with this node's proof for ``method`` on ``subject`` (a mailbox ID,
        or ``compare_subject``) in its ``from``."""
        assert self.node.contact is not None
        proof = sign_proof(self.node.identity, self.node.contact, method, subject)
        getattr(request, "from").CopyFrom(proof)
        return request

    async def _sync_with(
        self, peer: Contact, box: bytes, ours: Holdings, claims: PullClaims
    ) -> Holdings:
        """List, pull and push with one replica, a page of the peer's listing at a time,
        until the whole mailbox is done; what the peer held before this exchange. Pulls
        only the blobs no exchange with another peer pulls (``claims``)."""
        held_blobs: set[bytes] = set()
        held_tombs: set[bytes] = set()
        after = b""
        full = False  # this node's store had no room for what it pulled: it only gives
        while True:
            request = mailbox_pb2.SyncListRequest(mailbox_id=box, after=after)
            page = await self._sync_list(peer, box, request)
            theirs = Holdings(
                frozenset(page.blob_ids), frozenset(t.blob_id for t in page.tombstones)
            )
            held_blobs |= theirs.blob_ids
            held_tombs |= theirs.tombstone_ids
            last = page.next_after if page.more else None

            def in_page(item: bytes, start: bytes = after, end: bytes | None = last) -> bool:
                return item > start and (end is None or item <= end)

            if not full:
                try:
                    await self._take(peer, box, ours, theirs, page, claims)
                except StorageFullError:  # what the peer lacks still goes to it
                    full = True
                    self.metrics.failures.labels(reason="store_disk").inc()
            await self._push(
                peer, box,
                [b for b in sorted(ours.blob_ids) if in_page(b) and not theirs.settles_blob(b)],
                sorted(t for t in ours.tombstone_ids if in_page(t)
                       and t not in theirs.tombstone_ids),
            )  # fmt: skip
            if last is None:
                return Holdings(frozenset(held_blobs), frozenset(held_tombs))
            if last <= after:
                raise RepairError("SyncList page does not advance")
            after = last

    async def _take(
        self,
        peer: Contact,
        box: bytes,
        ours: Holdings,
        theirs: Holdings,
        page: mailbox_pb2.SyncListResponse,
        claims: PullClaims,
    ) -> None:
        """Pull the blobs of a list page this node lacks that no other exchange pulls, and
        store its tombstones."""
        dead = theirs.tombstone_ids | ours.tombstone_ids
        lacking = sorted(theirs.blob_ids - ours.blob_ids - dead)
        await self._pull(peer, box, claims.claim(peer.node_id, lacking), claims)
        new_tombs = [t for t in page.tombstones if t.blob_id not in ours.tombstone_ids]
        if new_tombs:
            got = await accept(self.backend, box, [], new_tombs, self.rules)
            self.metrics.pulled.inc(got.tombstoned)

    async def _hand_off(self, peer: Contact, box: bytes, ours: Holdings) -> Holdings:
        """A hand-off holder's exchange with a rightful replica: offer the IDs held, push
        what the replica lacks; what it holds of ours afterwards, by its own answers.
        (Never a listing or a pull: outside the set, this node may only give.)"""
        offered = sorted(ours.blob_ids | ours.tombstone_ids)
        held_blobs: set[bytes] = set()
        held_tombs: set[bytes] = set()
        for start in range(0, len(offered), MAX_SYNC_IDS):
            offer = mailbox_pb2.SyncPushRequest(
                mailbox_id=box, offered_ids=offered[start : start + MAX_SYNC_IDS]
            )
            answer = await self._sync_push(peer, box, offer)
            held_blobs |= set(answer.blob_ids)
            held_tombs |= set(answer.tombstone_ids)
        theirs = Holdings(frozenset(held_blobs), frozenset(held_tombs))
        pushed = await self._push(
            peer, box,
            sorted(b for b in ours.blob_ids if not theirs.settles_blob(b)),
            sorted(t for t in ours.tombstone_ids if t not in theirs.tombstone_ids),
        )  # fmt: skip
        return Holdings(
            theirs.blob_ids | pushed.blob_ids, theirs.tombstone_ids | pushed.tombstone_ids
        )

    async def _push(
        self,
        peer: Contact,
        box: bytes,
        blob_ids: list[bytes],
        tomb_ids: list[bytes],
    ) -> Holdings:
        """Push everything given, in requests of at most ``SYNC_BYTES`` (halved each time
        the peer refuses one as too large); what the peer reports holding of it. Blobs and
        tombstones are read from the backend a few at a time, as each piece is filled.

        A long push (a replica that lost everything) is what every other replica is
        sending it at the same time: each pusher goes in its own random order and offers
        the next IDs before sending them, so the copies others delivered meanwhile are
        not sent again (measured: 4 replicas repairing a wiped one, issue 10)."""
        order = list(blob_ids)
        long_push = len(order) > _OFFER_AHEAD
        if long_push:
            self.node.rng.shuffle(order)
        ids, pending = deque(order), deque(tomb_ids)
        held_blobs: set[bytes] = set()
        held_tombs: set[bytes] = set()
        budget, offered = SYNC_BYTES, 0
        while ids or pending:
            if long_push and offered <= 0:
                offered = await self._skip_held(peer, box, ids, held_blobs, held_tombs)
            piece_tombs, piece_blobs = await self._next_piece(box, ids, pending, budget)
            offered -= len(piece_blobs)
            if not piece_tombs and not piece_blobs:
                break  # the rest expired meanwhile
            request = mailbox_pb2.SyncPushRequest(
                mailbox_id=box,
                blobs=[blob_proto(b) for b in piece_blobs],
                tombstones=[tombstone_proto(t) for t in piece_tombs],
            )
            try:
                answer = await self._sync_push(peer, box, request)
            except RemoteError as err:
                budget = self._smaller(err, budget)
                ids.extendleft(reversed([b.blob_id for b in piece_blobs]))
                pending.extendleft(reversed([t.blob_id for t in piece_tombs]))
                continue
            self.metrics.pushed.inc(answer.stored + answer.tombstoned)
            held_blobs |= set(answer.blob_ids)
            held_tombs |= set(answer.tombstone_ids)
        return Holdings(frozenset(held_blobs), frozenset(held_tombs))

    async def _skip_held(
        self,
        peer: Contact,
        box: bytes,
        ids: deque[bytes],
        held_blobs: set[bytes],
        held_tombs: set[bytes],
    ) -> int:
        """Offer the next ``_OFFER_AHEAD`` IDs of ``ids`` and drop those the peer holds;
        returns how many of the offered remain at the front."""
        window = [ids.popleft() for _ in range(min(_OFFER_AHEAD, len(ids)))]
        offer = mailbox_pb2.SyncPushRequest(mailbox_id=box, offered_ids=window)
        answer = await self._sync_push(peer, box, offer)
        held_blobs |= set(answer.blob_ids)
        held_tombs |= set(answer.tombstone_ids)
        settled = held_blobs | held_tombs
        keep = [i for i in window if i not in settled]
        ids.extendleft(reversed(keep))
        return len(keep)

    async def _next_piece(
        self, box: bytes, ids: deque[bytes], tomb_ids: deque[bytes], budget: int
    ) -> tuple[list[Tombstone], list[StoredBlob]]:
        """Take from the fronts of ``tomb_ids`` and ``ids`` what fits ``budget`` bytes and
        the item caps (at least one item); tombstones and blobs are read a few at a time,
        and what was read but does not fit goes back to the front of its queue."""
        out_tombs: list[Tombstone] = []
        out_blobs: list[StoredBlob] = []
        size = 0
        while tomb_ids and len(out_tombs) < MAX_SYNC_ITEMS:
            chunk = [tomb_ids.popleft() for _ in range(min(_PULL_CHUNK, len(tomb_ids)))]
            tombs = await self.backend.get_tombstones(box, chunk, _now_ms())
            for n, tomb in enumerate(tombs):
                full = len(out_tombs) >= MAX_SYNC_ITEMS
                if full or (out_tombs and size + tomb_wire(tomb) > budget):
                    tomb_ids.extendleft(reversed([t.blob_id for t in tombs[n:]]))
                    return out_tombs, out_blobs
                size += tomb_wire(tomb)
                out_tombs.append(tomb)
        while ids and len(out_blobs) < MAX_SYNC_ITEMS:
            chunk = [ids.popleft() for _ in range(min(_PULL_CHUNK, len(ids)))]
            blobs = await self.backend.get_blobs(box, chunk, _now_ms())
            for n, blob in enumerate(blobs):
                full = len(out_blobs) >= MAX_SYNC_ITEMS
                if full or ((out_blobs or out_tombs) and size + blob_wire(blob) > budget):
                    ids.extendleft(reversed([b.blob_id for b in blobs[n:]]))
                    return out_tombs, out_blobs
                size += blob_wire(blob)
                out_blobs.append(blob)
        return out_tombs, out_blobs

    async def _pull(
        self, peer: Contact, box: bytes, missing: list[bytes], claims: PullClaims
    ) -> None:
        """Pull ``missing`` blobs: each answer is bounded in bytes (a smaller bound asked
        for after a RESOURCE_EXHAUSTED), and the next request asks for what it did not
        answer. What is held here afterwards is settled in ``claims``; an answer covering an
        ID it did not deliver gives up the peer's claims (``PullClaims.release``) and ends
        the pull, so the other peers that listed them pull them now."""
        done, budget = 0, SYNC_BYTES
        while done < len(missing):
            ids = missing[done : done + MAX_SYNC_IDS]
            request = mailbox_pb2.SyncPullRequest(mailbox_id=box, blob_ids=ids, max_bytes=budget)
            try:
                answer = await self._sync_pull(peer, box, request)
            except RemoteError as err:
                budget = self._smaller(err, budget)
                continue
            if not 0 < answer.answered <= len(ids):
                raise RepairError(f"SyncPull answered {answer.answered} of {len(ids)} IDs")
            covered, done = ids[: answer.answered], done + answer.answered
            held: frozenset[bytes] = frozenset()
            if answer.blobs:
                got = await accept(self.backend, box, answer.blobs, [], self.rules)
                self.metrics.pulled.inc(got.stored)
                held = got.held_blobs | got.held_tombstones
                claims.settle(held)
            # A blob it sent that this node refused (over quota, say) was delivered all the same.
            if missed := set(covered) - held.union(b.blob_id for b in answer.blobs):
                self._withheld(peer, box, claims, len(missed))
                return

    def _withheld(self, peer: Contact, box: bytes, claims: PullClaims, missed: int) -> None:
        """``peer`` answered for ``missed`` blobs it did not send: its claims go to the other
        peers (counted as ``withheld`` and logged: at most twice a peer in a mailbox sync)."""
        claims.release(peer.node_id)
        self.metrics.failures.labels(reason="withheld").inc()
        log.warning(
            "sync with %s: answered for %d blobs it did not send; the other peers pull its share",
            peer.short(), missed, extra={"mailbox": box.hex(), "peer": peer.node_id.hex()},
        )  # fmt: skip

    def _smaller(self, err: RemoteError, budget: int) -> int:
        """The next piece's bound after ``err``: half, when the piece was refused as too
        large and can still shrink; otherwise the error ends this exchange."""
        too_large = (
            err.grpc_code == "RESOURCE_EXHAUSTED"
            and not err.retry_after_ms  # a rate refusal: ``_paced`` gave up waiting
            and "rate" not in err.details
        )
        if not too_large or budget <= MIN_PIECE_BYTES:
            raise err
        self.metrics.failures.labels(reason="split").inc()
        log.warning("sync piece of %d bytes refused as too large; retrying in halves", budget)
        return budget // 2
