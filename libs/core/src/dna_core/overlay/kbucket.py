"""The Kademlia routing table (sans-I/O: `now` is passed in, nothing is sent).

Invariants the table keeps:

* bucket ``i`` holds contacts at XOR distance ``[2^i, 2^(i+1))`` from the local
  ID, at most ``k`` of them, least recently seen first;
* a bucket holds at most ``subnet_limit`` contacts of one /24 (IPv4) or /48
  (IPv6), so one operator with one subnet cannot fill it (Sybil/eclipse
  resistance); loopback is exempt only when the table is configured for a
  local testnet. Its replacement cache holds at most ``subnet_limit`` of one
  subnet too: a newcomer from a subnet that has as many waiting takes the place
  of the oldest of them, so one subnet's many IDs push out only their own and
  never the other nodes waiting for a place;
* the whole table holds at most ``table_subnet_limit`` contacts of one subnet
  (libp2p kad's diversity filter: 2 per bucket, 10 per table), loopback exempt
  as above: with 2 per bucket alone, one /24 with many IDs (8 puzzle bits each)
  sat in every one of the ~17 buckets a table uses;
* each of these caps (bucket, table, replacement cache) also holds, ``BLOCK_FACTOR``
  times over, per *block* (`contact.block_of`: an IPv6 /32; for IPv4 the /24 itself, so
  nothing changes there): a /32 holds 65,536 /48s, and its holder passed every /48 cap,
  filling every bucket; now it holds what two /48s hold;
* a full bucket never drops a live contact for a new one (old nodes are the
  most likely to stay, Kademlia §2.2): the newcomer waits in a bounded
  replacement cache while the least-recently-seen entry is liveness-checked,
  and only replaces it if the check fails; an entry heard from within
  ``good_for`` (15 min, as BEP 5's "good" nodes) is not checked at all, which
  keeps a busy node from pinging on every newcomer;
* a contact that fails a request is evicted at once when a replacement is
  waiting, otherwise after ``max_failures`` consecutive failures.

Contacts enter only through the codec (which verified the node-key proof) or
the simulator; the table trusts them.
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from dna_core.overlay.contact import (
    BLOCK_FACTOR,
    ID_BITS,
    Contact,
    id_int,
    subnet_cap_exempt,
)

K = 20
TABLE_SUBNET_LIMIT = 10  # contacts of one /24 (IPv6 /48) in a whole table (libp2p's maxForTable)
# An IPv6 /32 (`contact.block_of`) holds BLOCK_FACTOR (2) times a /48's share, in a bucket,
# in the table and waiting: one holder of a /32 gets no more than 2 /48s would; honest nodes
# of one provider's /32 still get 20 places of a table (a 10,000-node network's tables hold
# ~260), 4 of a bucket's 20.
GOOD_FOR = 900.0  # a contact heard from this recently is not pinged to make room (BEP 5)


class Admission(enum.Enum):
    SELF = "self"
    UPDATED = "updated"
    INSERTED = "inserted"
    CHECK_PENDING = "check_pending"  # bucket full: `check` must be pinged
    CACHED = "cached"  # bucket full, a check already runs: newcomer waits
    REJECTED_SUBNET = "rejected_subnet"


@dataclass(frozen=True, slots=True)
class Observed:
    admission: Admission
    check: Contact | None = None  # ping this contact, then call on_check_result


@dataclass(slots=True)
class _Entry:
    contact: Contact
    last_seen: float
    failures: int = 0


class _Bucket:
    # Plain dicts (insertion-ordered) instead of OrderedDicts, and subnets counted over
    # the <= k entries when a newcomer asks instead of kept in a Counter: a million-node
    # simulation holds ~300 contacts in ~17 buckets per node (docs/performance.md).
    __slots__ = ("entries", "last_refresh", "pending", "replacements")

    def __init__(self) -> None:
        self.entries: dict[bytes, _Entry] = {}  # LRS first
        self.replacements: dict[bytes, Contact] = {}  # newest last
        self.pending: bytes | None = None  # node ID under liveness check
        self.last_refresh = 0.0


_EMPTY = _Bucket()


class RoutingTable:
    def __init__(
        self,
        local_id: bytes,
        *,
        k: int = K,
        subnet_limit: int = 2,
        table_subnet_limit: int | None = TABLE_SUBNET_LIMIT,
        allow_loopback: bool = False,
        max_failures: int = 2,
        good_for: float = GOOD_FOR,
    ) -> None:
        self.local_id = local_id
        self.local_key = id_int(local_id)
        self.k = k
        self.subnet_limit = subnet_limit
        # None: no table-wide count (the simulator: its Counter would cost ~6.6 KB a table,
        # and its synthetic addresses never put 10 of one /24 in a table).
        self.table_subnet_limit = table_subnet_limit
        self._per_subnet: Counter[str] = Counter()  # (loopback uncounted if exempt)
        self._per_block: Counter[str] = Counter()  # IPv6 /32s (IPv4: their /24 again)
        self.allow_loopback = allow_loopback
        self.max_failures = max_failures
        self.good_for = good_for
        # Created on first use: a table of a 10,000-node network fills ~14 of 256 buckets.
        self._buckets: dict[int, _Bucket] = {}
        self._low = ID_BITS  # lowest non-empty bucket: closest() never looks below it
        self._size = 0

    # -- queries --------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def __contains__(self, node_id: bytes) -> bool:
        bucket = self._existing(node_id)
        return bucket is not None and node_id in bucket.entries

    def get(self, node_id: bytes) -> Contact | None:
        bucket = self._existing(node_id)
        entry = bucket.entries.get(node_id) if bucket is not None else None
        return entry.contact if entry else None

    def contacts(self) -> Iterator[Contact]:
        for index in sorted(self._buckets):
            for entry in self._buckets[index].entries.values():
                yield entry.contact

    def bucket_index(self, node_id: bytes) -> int:
        """Index of the bucket for ``node_id``; -1 for the local ID itself."""
        return (id_int(node_id) ^ self.local_key).bit_length() - 1

    def bucket_sizes(self) -> dict[int, int]:
        return {i: len(b.entries) for i, b in sorted(self._buckets.items()) if b.entries}

    def closest(self, target: bytes, count: int | None = None) -> list[Contact]:
        """The ``count`` (default k) known contacts closest to ``target``, closest first.

        Buckets are visited in increasing order of the distances they can hold
        from ``target`` (see ``_bucket_order``), so only a few are touched.
        """
        count = self.k if count is None else count
        t = id_int(target)
        found: list[Contact] = []
        buckets = self._buckets
        for i in _bucket_order(t ^ self.local_key, self._low):
            bucket = buckets.get(i)
            if bucket is not None and bucket.entries:
                found.extend([e.contact for e in bucket.entries.values()])
                if len(found) >= count:
                    break
        # Bucket distance ranges do not overlap, so one sort equals a sort per bucket.
        found.sort(key=lambda c: c.key ^ t)
        return found[:count]

    # -- updates --------------------------------------------------------------

    def observe(self, contact: Contact, now: float) -> Observed:
        """We heard from ``contact`` (it answered us, or sent us a request)."""
        index = (contact.key ^ self.local_key).bit_length() - 1
        if index < 0:
            return Observed(Admission.SELF)
        bucket = self._bucket(index)
        entry = bucket.entries.get(contact.node_id)
        if entry is not None:
            entry.last_seen, entry.failures = now, 0
            bucket.entries[contact.node_id] = bucket.entries.pop(contact.node_id)  # to the end
            self._update_contact(bucket, entry, contact)
            return Observed(Admission.UPDATED)
        if not self._subnet_allows(bucket, contact):
            return Observed(Admission.REJECTED_SUBNET)
        if len(bucket.entries) < self.k:
            self._insert(bucket, contact, now)
            return Observed(Admission.INSERTED)
        bucket.replacements.pop(contact.node_id, None)
        self._make_room_for_subnet(bucket, contact)
        bucket.replacements[contact.node_id] = contact
        while len(bucket.replacements) > self.k:
            del bucket.replacements[next(iter(bucket.replacements))]  # the oldest
        oldest = next(iter(bucket.entries.values()))
        if bucket.pending is not None or now - oldest.last_seen < self.good_for:
            return Observed(Admission.CACHED)
        bucket.pending = oldest.contact.node_id
        return Observed(Admission.CHECK_PENDING, oldest.contact)

    def on_check_result(self, node_id: bytes, alive: bool, now: float) -> list[Contact]:
        """The liveness check asked for by ``observe`` finished; returns the contacts that
        entered the table from the replacement cache in place of a dead one."""
        bucket = self._existing(node_id)
        if bucket is None:
            return []
        if bucket.pending == node_id:
            bucket.pending = None
        if alive:
            entry = bucket.entries.get(node_id)
            if entry is not None:
                entry.last_seen, entry.failures = now, 0
                bucket.entries[node_id] = bucket.entries.pop(node_id)  # to the end
            return []
        return self._evict(bucket, node_id, now)

    def on_failure(self, node_id: bytes, now: float) -> list[Contact]:
        """A request to ``node_id`` failed or timed out; returns the contacts that entered
        the table from the replacement cache in its place, if it was evicted."""
        bucket = self._existing(node_id)
        if bucket is None:
            return []
        entry = bucket.entries.get(node_id)
        if entry is None:
            bucket.replacements.pop(node_id, None)
            return []
        entry.failures += 1
        if bucket.replacements or entry.failures >= self.max_failures:
            return self._evict(bucket, node_id, now)
        return []

    def remove(self, node_id: bytes) -> bool:
        """Forget a contact; its slot waits for the next node heard from."""
        bucket = self._existing(node_id)
        return bucket is not None and self._drop(bucket, node_id)

    # -- refresh --------------------------------------------------------------

    def mark_refreshed(self, target: bytes, now: float) -> None:
        index = self.bucket_index(target)
        if index >= 0:
            self._bucket(index).last_refresh = now

    def refresh_targets(self, now: float, interval: float, rng: random.Random) -> list[bytes]:
        """A random ID in each bucket not looked up within ``interval``.

        Buckets closer than the nearest non-empty one are skipped: in a network
        of N nodes only about log2(N) of the farthest buckets can hold anyone.
        """
        return [
            self.random_id_in_bucket(i, rng)
            for i in range(self._low, ID_BITS)
            if now - self._bucket(i).last_refresh >= interval
        ]

    def random_id_in_bucket(self, index: int, rng: random.Random) -> bytes:
        offset = (1 << index) | rng.getrandbits(index) if index > 0 else 1
        return (self.local_key ^ offset).to_bytes(ID_BITS // 8, "big")

    # -- internals ------------------------------------------------------------

    def _existing(self, node_id: bytes) -> _Bucket | None:
        return self._buckets.get(self.bucket_index(node_id))

    def _bucket(self, index: int) -> _Bucket:
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = _Bucket()
        return bucket

    def _update_contact(self, bucket: _Bucket, entry: _Entry, contact: Contact) -> None:
        """A known node answered from new addresses (only proven addresses are observed)."""
        if contact == entry.contact:
            return
        if self._subnet_allows(bucket, contact, besides=entry):
            self._count(entry.contact, -1)
            entry.contact = contact
            self._count(contact, +1)

    def _insert(self, bucket: _Bucket, contact: Contact, now: float) -> None:
        bucket.replacements.pop(contact.node_id, None)
        bucket.entries[contact.node_id] = _Entry(contact, now)
        self._count(contact, +1)
        self._size += 1
        self._low = min(self._low, (contact.key ^ self.local_key).bit_length() - 1)

    def _drop(self, bucket: _Bucket, node_id: bytes) -> bool:
        entry = bucket.entries.pop(node_id, None)
        if entry is None:
            return False
        self._count(entry.contact, -1)
        self._size -= 1
        while self._low < ID_BITS and not self._buckets.get(self._low, _EMPTY).entries:
            self._low += 1
        return True

    def _evict(self, bucket: _Bucket, node_id: bytes, now: float) -> list[Contact]:
        """Drop ``node_id``; the most recently heard replacements take its place (returned)."""
        self._drop(bucket, node_id)
        promoted = []
        while bucket.replacements and len(bucket.entries) < self.k:
            _, candidate = bucket.replacements.popitem()  # most recently heard
            if self._subnet_allows(bucket, candidate):
                self._insert(bucket, candidate, now)
                promoted.append(candidate)
        return promoted

    def _count(self, contact: Contact, change: int) -> None:
        """Keep the table-wide counts of ``contact``'s subnet and block (an exempt one is
        not counted)."""
        if self.table_subnet_limit is None or subnet_cap_exempt(contact.scope, self.allow_loopback):
            return
        for counts, group in ((self._per_subnet, contact.subnet), (self._per_block, contact.block)):
            held = counts[group] + change
            if held:
                counts[group] = held
            else:
                del counts[group]

    def _make_room_for_subnet(self, bucket: _Bucket, contact: Contact) -> None:
        """Drop the oldest replacement of ``contact``'s subnet if it has its limit waiting,
        else of its block if that has its limit waiting."""
        if subnet_cap_exempt(contact.scope, self.allow_loopback):
            return
        same = [i for i, c in bucket.replacements.items() if c.subnet == contact.subnet]
        if len(same) >= self.subnet_limit:
            del bucket.replacements[same[0]]
            return
        block = [i for i, c in bucket.replacements.items() if c.block == contact.block]
        if len(block) >= BLOCK_FACTOR * self.subnet_limit:
            del bucket.replacements[block[0]]

    def _subnet_allows(
        self, bucket: _Bucket, contact: Contact, besides: _Entry | None = None
    ) -> bool:
        """Room for ``contact``'s subnet among the bucket's entries and the table's
        (``besides`` one of them)."""
        if subnet_cap_exempt(contact.scope, self.allow_loopback):
            return True
        subnet, room = contact.subnet, self.subnet_limit
        block, block_room = contact.block, BLOCK_FACTOR * self.subnet_limit
        table_limit = self.table_subnet_limit
        if table_limit is not None:
            held = self._per_subnet.get(subnet, 0)
            in_block = self._per_block.get(block, 0)
            if besides is not None:
                held -= besides.contact.subnet == subnet
                in_block -= besides.contact.block == block
            if held >= table_limit or in_block >= BLOCK_FACTOR * table_limit:
                return False
        for entry in bucket.entries.values():
            if entry is besides or entry.contact.block != block:
                continue
            block_room -= 1
            room -= entry.contact.subnet == subnet
            if not room or not block_room:
                return False
        return True


def _bucket_order(x: int, low: int = 0) -> Iterator[int]:
    """Bucket indices ordered by the distance their contacts can have from a
    target ``t`` with ``x = t ^ local`` (lazy: callers usually stop early),
    skipping buckets below ``low`` (known to be empty).

    With ``b`` the top bit of ``x``: bucket ``b`` holds distances below ``2^b``;
    a bucket ``j < b`` holds distances with bit ``b`` set whose bit ``j`` is
    ``x_j ^ 1``, so buckets with ``x_j = 1`` come first (highest ``j`` first),
    then those with ``x_j = 0`` (lowest first); buckets above ``b`` come last,
    in increasing order.
    """
    b = x.bit_length() - 1
    if b >= 0:
        yield b
    for j in range(b - 1, low - 1, -1):
        if x >> j & 1:
            yield j
    for j in range(low, b):
        if not x >> j & 1:
            yield j
    yield from range(b + 1, ID_BITS)
