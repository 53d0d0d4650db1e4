"""The routing table (dna_core.overlay.kbucket): its documented invariants, checked
against a reference model under random operations, plus closest/refresh properties.

Contacts are synthetic (the table trusts what the codec admitted): an ID placed in a
chosen bucket of the local ID, a fixed fake key and one endpoint in 198.18.0.0/15
(RFC 2544 benchmarking space) or on loopback.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from dna_core.overlay.contact import BLOCK_FACTOR, ID_BITS, Contact, Endpoint
from dna_core.overlay.kbucket import TABLE_SUBNET_LIMIT, Admission, RoutingTable
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

KEY = b"k" * 32
ALL_PHASES = tuple(p for p in Phase if p is not Phase.explain)  # explain: minutes on 3.11
QUICK_PHASES = tuple(p for p in ALL_PHASES if p is not Phase.shrink)
LOCAL = bytes.fromhex("5a" * 32)


def id_in_bucket(local: bytes, bucket: int, low: int) -> bytes:
    """An ID whose XOR distance from ``local`` has bit length ``bucket + 1``."""
    offset = (1 << bucket) | (low & ((1 << bucket) - 1))
    return (int.from_bytes(local, "big") ^ offset).to_bytes(32, "big")


def contact(node_id: bytes, subnet: int = 0, host: int = 1, *, loopback: bool = False) -> Contact:
    ip = f"127.0.{subnet}.{host}" if loopback else f"198.18.{subnet}.{host}"
    return Contact(node_id=node_id, public_key=KEY, endpoints=(Endpoint(ip, 4000 + host),))


def true_bucket(local: bytes, node_id: bytes) -> int:
    d = int.from_bytes(local, "big") ^ int.from_bytes(node_id, "big")
    return d.bit_length() - 1


def check_structure(table: RoutingTable, used: Iterable[int] = range(ID_BITS)) -> None:
    """Every structural invariant of the module docstring (``used``: the only buckets that
    can hold anything, to keep the state machine's steps cheap)."""
    used = sorted(used)
    assert sum(len(table._bucket(i).entries) for i in used) == len(table)
    total = 0
    for index in used:
        bucket = table._bucket(index)
        entries = [e.contact for e in bucket.entries.values()]
        total += len(entries)
        assert len(entries) <= table.k
        for c in entries:
            assert true_bucket(table.local_id, c.node_id) == index
            assert table.bucket_index(c.node_id) == index
        limited = Counter(c.subnet for c in entries if not (table.allow_loopback and c.loopback))
        assert all(n <= table.subnet_limit for n in limited.values()), limited
        blocks = Counter(c.block for c in entries if not (table.allow_loopback and c.loopback))
        assert all(n <= BLOCK_FACTOR * table.subnet_limit for n in blocks.values()), blocks
        assert len(bucket.replacements) <= table.k
        waiting = Counter(
            c.subnet
            for c in bucket.replacements.values()
            if not (table.allow_loopback and c.loopback)
        )
        assert all(n <= table.subnet_limit for n in waiting.values()), waiting
        assert not set(bucket.replacements) & set(bucket.entries), "cached while in the table"
    assert len(table) == total
    if table.table_subnet_limit is not None:
        everywhere = Counter(
            e.contact.subnet
            for i in used
            for e in table._bucket(i).entries.values()
            if not (table.allow_loopback and e.contact.loopback)
        )
        assert all(n <= table.table_subnet_limit for n in everywhere.values()), everywhere
        assert everywhere == table._per_subnet, "the table-wide count is the entries'"
        blocks = Counter(
            e.contact.block
            for i in used
            for e in table._bucket(i).entries.values()
            if not (table.allow_loopback and e.contact.loopback)
        )
        assert blocks == table._per_block, "the table-wide block count is the entries'"
        assert all(n <= BLOCK_FACTOR * table.table_subnet_limit for n in blocks.values())
    if len(used) == ID_BITS:
        assert len(list(table.contacts())) == total
    assert table.local_id not in table


# -- reference model ------------------------------------------------------------


@dataclass
class _MBucket:
    entries: dict[bytes, Contact] = field(default_factory=dict)  # insertion order = LRS first
    failures: dict[bytes, int] = field(default_factory=dict)
    cache: dict[bytes, Contact] = field(default_factory=dict)  # newest last
    pending: bytes | None = None


class Model:
    """The docstring's rules, written out plainly (one list per bucket)."""

    def __init__(self, table: RoutingTable) -> None:
        self.k, self.limit = table.k, table.subnet_limit
        self.table_limit = table.table_subnet_limit
        self.allow_loopback, self.max_failures = table.allow_loopback, table.max_failures
        self.local = table.local_id
        self.buckets: dict[int, _MBucket] = {}

    def bucket(self, node_id: bytes) -> _MBucket:
        return self.buckets.setdefault(true_bucket(self.local, node_id), _MBucket())

    def allows(self, b: _MBucket, c: Contact, besides: bytes | None = None) -> bool:
        if self.allow_loopback and c.loopback:
            return True
        everywhere = [
            e for m in self.buckets.values() for i, e in m.entries.items() if i != besides
        ]
        held = sum(1 for e in everywhere if e.subnet == c.subnet)
        if self.table_limit is not None and held >= self.table_limit:
            return False
        others = [e for i, e in b.entries.items() if i != besides]
        return sum(1 for e in others if e.subnet == c.subnet) < self.limit

    def insert(self, b: _MBucket, c: Contact) -> None:
        b.entries[c.node_id] = c
        b.failures[c.node_id] = 0
        b.cache.pop(c.node_id, None)

    def touch(self, b: _MBucket, node_id: bytes) -> None:
        b.entries[node_id] = b.entries.pop(node_id)
        b.failures[node_id] = 0

    def observe(self, c: Contact) -> tuple[Admission, bytes | None]:
        if c.node_id == self.local:
            return Admission.SELF, None
        b = self.bucket(c.node_id)
        if c.node_id in b.entries:
            self.touch(b, c.node_id)
            if c != b.entries[c.node_id] and self.allows(b, c, besides=c.node_id):
                b.entries[c.node_id] = c  # a new address, if its subnet has room
            return Admission.UPDATED, None
        if not self.allows(b, c):
            return Admission.REJECTED_SUBNET, None
        if len(b.entries) < self.k:
            self.insert(b, c)
            return Admission.INSERTED, None
        b.cache.pop(c.node_id, None)
        if not (self.allow_loopback and c.loopback):
            same = [i for i, x in b.cache.items() if x.subnet == c.subnet]
            if len(same) >= self.limit:
                del b.cache[same[0]]
        b.cache[c.node_id] = c
        while len(b.cache) > self.k:
            del b.cache[next(iter(b.cache))]
        if b.pending is not None:
            return Admission.CACHED, None
        b.pending = next(iter(b.entries))
        return Admission.CHECK_PENDING, b.pending

    def evict(self, b: _MBucket, node_id: bytes) -> None:
        b.entries.pop(node_id, None)
        b.failures.pop(node_id, None)
        while b.cache and len(b.entries) < self.k:
            newest = list(b.cache)[-1]
            candidate = b.cache.pop(newest)
            if self.allows(b, candidate):
                self.insert(b, candidate)

    def check_result(self, node_id: bytes, alive: bool) -> None:
        b = self.bucket(node_id)
        if b.pending == node_id:
            b.pending = None
        if alive:
            if node_id in b.entries:
                self.touch(b, node_id)
        else:
            self.evict(b, node_id)

    def failure(self, node_id: bytes) -> None:
        b = self.bucket(node_id)
        if node_id not in b.entries:
            b.cache.pop(node_id, None)
            return
        b.failures[node_id] += 1
        if b.cache or b.failures[node_id] >= self.max_failures:
            self.evict(b, node_id)

    def remove(self, node_id: bytes) -> bool:
        b = self.bucket(node_id)
        if node_id not in b.entries:
            return False
        del b.entries[node_id]
        del b.failures[node_id]
        return True

    def pending_ids(self) -> list[bytes]:
        return [b.pending for b in self.buckets.values() if b.pending is not None]


# -- the state machine ------------------------------------------------------------

# three buckets (the two farthest, which fill up, and the nearest, which holds one ID) and
# three subnets, so full buckets, replacement caches and subnet limits are reached quickly
USED_BUCKETS = (255, 254, 0)
BUCKETS = st.sampled_from(USED_BUCKETS)
contacts_st = st.builds(
    lambda bucket, low, subnet, host, loopback: contact(
        id_in_bucket(LOCAL, bucket, low), subnet, host, loopback=loopback
    ),
    BUCKETS,
    st.integers(0, 2**16),
    st.integers(0, 2),
    st.integers(1, 254),
    st.booleans(),
)


class RoutingTableMachine(RuleBasedStateMachine):
    contacts = Bundle("contacts")

    def __init__(self) -> None:
        super().__init__()
        self.table = RoutingTable(LOCAL, good_for=0.0)
        self.model = Model(self.table)
        self.now = 0.0

    @initialize(
        k=st.integers(1, 4),
        subnet_limit=st.integers(1, 3),
        table_subnet_limit=st.none() | st.integers(1, 6),
        allow_loopback=st.booleans(),
        max_failures=st.integers(1, 3),
    )
    def configure(
        self,
        k: int,
        subnet_limit: int,
        table_subnet_limit: int | None,
        allow_loopback: bool,
        max_failures: int,
    ) -> None:
        self.table = RoutingTable(
            LOCAL,
            k=k,
            subnet_limit=subnet_limit,
            table_subnet_limit=table_subnet_limit,
            allow_loopback=allow_loopback,
            max_failures=max_failures,
            good_for=0.0,  # the model pings on every full-bucket newcomer
        )
        self.model = Model(self.table)

    def ids(self) -> set[bytes]:
        # only the buckets contacts_st can reach: contacts() walks all 256 (slow here)
        return {i for b in USED_BUCKETS for i in self.table._bucket(b).entries}

    @rule(target=contacts, c=contacts_st)
    def new_contact(self, c: Contact) -> Contact:
        return c

    @rule(c=contacts, dt=st.floats(0, 10))
    def observe(self, c: Contact, dt: float) -> None:
        self.now += dt
        before = self.ids()
        got = self.table.observe(c, self.now)
        admission, check = self.model.observe(c)
        assert got.admission is admission
        assert (got.check.node_id if got.check else None) == check
        assert before <= self.ids(), "observe never drops a contact"
        if got.admission in (Admission.INSERTED, Admission.UPDATED):
            held = self.table.get(c.node_id)
            assert held is not None and held.node_id == c.node_id

    @rule(c=contacts)
    def failure(self, c: Contact) -> None:
        before = self.ids()
        self.table.on_failure(c.node_id, self.now)
        self.model.failure(c.node_id)
        assert before - self.ids() <= {c.node_id}

    @precondition(lambda self: bool(self.model.pending_ids()))
    @rule(data=st.data(), alive=st.booleans())
    def check_result(self, data: st.DataObject, alive: bool) -> None:
        node_id = data.draw(st.sampled_from(sorted(self.model.pending_ids())))
        before = self.ids()
        self.table.on_check_result(node_id, alive, self.now)
        self.model.check_result(node_id, alive)
        gone = before - self.ids()
        assert gone == (set() if alive else {node_id} & before)

    @rule(c=contacts, alive=st.booleans())
    def stray_check_result(self, c: Contact, alive: bool) -> None:
        before = self.ids()
        self.table.on_check_result(c.node_id, alive, self.now)
        self.model.check_result(c.node_id, alive)
        assert before - self.ids() <= {c.node_id}

    @rule(c=contacts)
    def remove(self, c: Contact) -> None:
        before = self.ids()
        assert self.table.remove(c.node_id) is self.model.remove(c.node_id)
        assert before - self.ids() <= {c.node_id}

    # the same operations aimed at contacts the table holds or caches right now, so the
    # interplay of full buckets, caches and evictions is reached in few steps

    def cached(self) -> list[Contact]:
        return [c for b in self.model.buckets.values() for c in b.cache.values()]

    def members(self) -> list[Contact]:
        return [c for b in self.model.buckets.values() for c in b.entries.values()]

    @precondition(lambda self: bool(self.cached()))
    @rule(data=st.data())
    def observe_cached(self, data: st.DataObject) -> None:
        self.observe(data.draw(st.sampled_from(self.cached())), 1.0)

    @precondition(lambda self: bool(self.members()))
    @rule(data=st.data())
    def fail_member(self, data: st.DataObject) -> None:
        self.failure(data.draw(st.sampled_from(self.members())))

    @precondition(lambda self: bool(self.members()))
    @rule(data=st.data())
    def remove_member(self, data: st.DataObject) -> None:
        self.remove(data.draw(st.sampled_from(self.members())))

    @invariant()
    def structure(self) -> None:
        check_structure(self.table, USED_BUCKETS)

    @invariant()
    def matches_model(self) -> None:
        assert set(self.model.buckets) <= set(USED_BUCKETS)
        for index in USED_BUCKETS:
            bucket = self.table._bucket(index)
            m = self.model.buckets.get(index, _MBucket())
            assert list(bucket.entries) == list(m.entries), f"bucket {index} (LRS order)"
            held = [e.contact for e in bucket.entries.values()]
            assert held == list(m.entries.values()), f"bucket {index} addresses"
            assert list(bucket.replacements) == list(m.cache), f"bucket {index} cache"
            assert bucket.pending == m.pending
        model_size = sum(len(b.entries) for b in self.model.buckets.values())
        assert len(self.table) == model_size


# Shrinking a failing run of this machine takes a minute or more; by default a failure
# prints its (unshrunk) steps and a reproduce blob at once. DNA_SHRINK=1 shrinks it.
RoutingTableMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    report_multiple_bugs=False,
    phases=ALL_PHASES if os.environ.get("DNA_SHRINK") else QUICK_PHASES,
)
TestRoutingTableMachine = RoutingTableMachine.TestCase


# -- deterministic scenarios --------------------------------------------------------


def far(low: int, subnet: int, host: int = 1, *, loopback: bool = False) -> Contact:
    return contact(id_in_bucket(LOCAL, 255, low), subnet, host, loopback=loopback)


def test_full_bucket_keeps_live_contact_and_caches_newcomer() -> None:
    table = RoutingTable(LOCAL, good_for=0.0, k=2, subnet_limit=2)
    a, b, c = far(1, 1), far(2, 2), far(3, 3)
    assert table.observe(a, 1.0).admission is Admission.INSERTED
    assert table.observe(b, 2.0).admission is Admission.INSERTED
    got = table.observe(c, 3.0)
    assert got.admission is Admission.CHECK_PENDING and got.check == a  # least recently seen
    assert table.observe(far(4, 4), 3.5).admission is Admission.CACHED  # one check at a time
    assert table.on_check_result(a.node_id, True, 4.0) == []  # alive: nobody enters
    assert {x.node_id for x in table.contacts()} == {a.node_id, b.node_id}
    # a is now the most recently seen: the next check goes to b
    got = table.observe(c, 5.0)
    assert got.admission is Admission.CHECK_PENDING and got.check == b
    # b's slot goes to the most recently heard newcomer (c was re-heard after 4), and the
    # table says so (store-on-join hands it its records)
    assert table.on_check_result(b.node_id, False, 6.0) == [c]
    assert {x.node_id for x in table.contacts()} == {a.node_id, c.node_id}
    check_structure(table)


def test_replacements_promoted_most_recent_first() -> None:
    table = RoutingTable(LOCAL, good_for=0.0, k=2, subnet_limit=5, max_failures=5)
    a, b = far(1, 1), far(2, 2)
    r1, r2, r3 = far(11, 11), far(12, 12), far(13, 13)
    for i, x in enumerate((a, b, r1, r2, r3)):
        table.observe(x, float(i))
    assert table.on_failure(a.node_id, 10.0) == [r3]  # a replacement waits: evicted at once
    assert table.get(r3.node_id) == r3 and table.get(a.node_id) is None
    assert table.on_failure(b.node_id, 11.0) == [r2]
    assert table.get(r2.node_id) == r2 and table.get(b.node_id) is None
    assert table.get(r1.node_id) is None
    check_structure(table)


def test_one_subnet_flooding_a_full_bucket_pushes_out_only_its_own_replacements() -> None:
    """Many proven IDs from one /24 observed against a full bucket: they used to take
    every place in its replacement cache (the k newest), pushing out the other nodes
    waiting there, so a failure was filled by the flooder or by nobody."""
    table = RoutingTable(LOCAL, k=4, good_for=0.0)
    for host in range(4):
        table.observe(far(host, subnet=host), 0.0)
    waiting = far(100, subnet=100)
    table.observe(waiting, 1.0)
    for host in range(1, 41):  # 40 IDs, one subnet
        table.observe(far(1000 + host, subnet=200, host=host), 2.0)
    replacements = table._bucket(255).replacements
    assert waiting.node_id in replacements
    assert sum(1 for c in replacements.values() if c.subnet == "198.18.200") == 2
    for _ in range(3):  # three places free: the flooder's two (its share), then its own
        table.on_failure(next(iter(table._bucket(255).entries)), 3.0)
    assert waiting.node_id in table


def test_failures_evict_only_after_max_failures_without_replacement() -> None:
    table = RoutingTable(LOCAL, good_for=0.0, k=3, max_failures=3)
    a = far(1, 1)
    table.observe(a, 0.0)
    table.on_failure(a.node_id, 1.0)
    table.on_failure(a.node_id, 2.0)
    table.observe(a, 3.0)  # heard again: the count starts over
    table.on_failure(a.node_id, 4.0)
    table.on_failure(a.node_id, 5.0)
    assert a.node_id in table
    table.on_failure(a.node_id, 6.0)
    assert a.node_id not in table and len(table) == 0


def test_subnet_limit_per_bucket_and_loopback_exemption() -> None:
    table = RoutingTable(LOCAL, good_for=0.0, k=10, subnet_limit=2)
    same = [far(i, 7, host=i) for i in range(1, 4)]
    assert [table.observe(c, 0.0).admission for c in same] == [
        Admission.INSERTED,
        Admission.INSERTED,
        Admission.REJECTED_SUBNET,
    ]
    # another bucket has its own count
    near = contact(id_in_bucket(LOCAL, 3, 1), 7, host=9)
    assert table.observe(near, 0.0).admission is Admission.INSERTED

    loop = [far(100 + i, 0, host=i, loopback=True) for i in range(1, 5)]
    strict = RoutingTable(LOCAL, good_for=0.0, k=10, subnet_limit=2)
    assert [strict.observe(c, 0.0).admission for c in loop].count(Admission.INSERTED) == 2
    testnet = RoutingTable(LOCAL, good_for=0.0, k=10, subnet_limit=2, allow_loopback=True)
    assert all(testnet.observe(c, 0.0).admission is Admission.INSERTED for c in loop)


def test_one_subnet_holds_at_most_ten_contacts_in_the_whole_table() -> None:
    """Two per bucket alone let one /24 (or /48) with many cheap IDs sit in every bucket a
    table uses (~17 of 330 contacts at 100,000 nodes, each a hop it controls)."""
    table = RoutingTable(LOCAL, good_for=0.0)
    assert table.table_subnet_limit == TABLE_SUBNET_LIMIT == 10
    sybils = [contact(id_in_bucket(LOCAL, 255 - i, 1), 7, host=i + 1) for i in range(16)]
    admitted = [table.observe(c, 0.0).admission for c in sybils]
    assert admitted == [Admission.INSERTED] * 10 + [Admission.REJECTED_SUBNET] * 6
    # other subnets are unaffected; one of the ten leaving makes room for the next
    assert table.observe(contact(id_in_bucket(LOCAL, 200, 1), 8), 0.0).admission is (
        Admission.INSERTED
    )
    assert table.remove(sybils[0].node_id)
    assert table.observe(sybils[10], 0.0).admission is Admission.INSERTED
    assert table.observe(sybils[11], 0.0).admission is Admission.REJECTED_SUBNET

    # a known contact moving to that subnet is refused the move, as a newcomer would be
    mover = contact(id_in_bucket(LOCAL, 100, 1), 9)
    table.observe(mover, 0.0)
    moved = contact(mover.node_id, 7, host=200)
    assert table.observe(moved, 1.0).admission is Admission.UPDATED
    assert table.get(mover.node_id) == mover

    # IPv6: the /48, as the per-bucket limit counts it
    v6 = RoutingTable(LOCAL, good_for=0.0)
    for i in range(12):
        ip = f"2001:db8:7:{i:x}::1"
        c = Contact(id_in_bucket(LOCAL, 255 - i, 1), KEY, (Endpoint(ip, 4000),))
        assert v6.observe(c, 0.0).admission is (
            Admission.INSERTED if i < 10 else Admission.REJECTED_SUBNET
        )


def test_a_local_testnet_on_loopback_is_not_capped_table_wide() -> None:
    """Every node of a local testnet is on 127.0.0.1: exempt when so configured, as the
    per-bucket limit and the key-challenge caps are (and counted when not)."""
    loop = [
        contact(id_in_bucket(LOCAL, 255 - i, 1), 0, host=i + 1, loopback=True) for i in range(16)
    ]
    testnet = RoutingTable(LOCAL, good_for=0.0, allow_loopback=True)
    assert all(testnet.observe(c, 0.0).admission is Admission.INSERTED for c in loop)
    strict = RoutingTable(LOCAL, good_for=0.0)
    admitted = [strict.observe(c, 0.0).admission for c in loop]
    assert admitted.count(Admission.INSERTED) == 10


def test_a_private_network_is_not_capped() -> None:
    """Kubernetes gives the pods of one machine one /24 (a private range): the per-subnet
    caps, per bucket and table-wide, would hold a one-machine test network's table to 10
    contacts. Private addresses are exempt, as BEP 42 exempts local networks; a public
    node never takes them (``Scope.reachable_via``)."""
    table = RoutingTable(LOCAL, good_for=0.0)
    pods = [
        Contact(id_in_bucket(LOCAL, 255 - i, 1), KEY, (Endpoint(f"10.244.0.{i + 1}", 4000),))
        for i in range(16)
    ]
    assert all(table.observe(c, 0.0).admission is Admission.INSERTED for c in pods)
    same_bucket = [
        Contact(id_in_bucket(LOCAL, 100, i + 1), KEY, (Endpoint(f"10.244.0.{i + 50}", 4000),))
        for i in range(3)
    ]
    assert all(table.observe(c, 0.0).admission is Admission.INSERTED for c in same_bucket)


def test_ipv6_subnet_is_the_48() -> None:
    table = RoutingTable(LOCAL, good_for=0.0, k=10, subnet_limit=1)

    def v6(low: int, ip: str) -> Contact:
        return Contact(id_in_bucket(LOCAL, 255, low), KEY, (Endpoint(ip, 4000),))

    assert table.observe(v6(1, "2001:db8:1::1"), 0).admission is Admission.INSERTED
    assert table.observe(v6(2, "2001:db8:1:ffff::2"), 0).admission is Admission.REJECTED_SUBNET
    assert table.observe(v6(3, "2001:db8:2::1"), 0).admission is Admission.INSERTED
    assert table.observe(v6(4, "::1"), 0).admission is Admission.INSERTED


def v6_contact(node_id: bytes, ip: str) -> Contact:
    return Contact(node_id, KEY, (Endpoint(ip, 4000),))


def test_one_ipv6_32_holds_what_two_48s_hold() -> None:
    """A /32 holds 65,536 /48s: with caps per /48 alone its holder filled every bucket
    (2 per /48, 10 /48s a bucket) and any share of the table. Now the /32 holds at most
    twice a /48's share, in a bucket (4) and in the table (20)."""
    table = RoutingTable(LOCAL, good_for=0.0)
    one_bucket = [v6_contact(id_in_bucket(LOCAL, 255, i + 1), f"2001:db8:{i:x}::1")
                  for i in range(10)]  # fmt: skip
    admitted = [table.observe(c, 0.0).admission for c in one_bucket]
    assert admitted == [Admission.INSERTED] * 4 + [Admission.REJECTED_SUBNET] * 6
    everywhere = [v6_contact(id_in_bucket(LOCAL, 254 - i, 1), f"2001:db8:{100 + i:x}::1")
                  for i in range(30)]  # fmt: skip
    admitted = [table.observe(c, 0.0).admission for c in everywhere]
    assert admitted == [Admission.INSERTED] * 16 + [Admission.REJECTED_SUBNET] * 14  # 4 + 16
    # another /32 is unaffected, in a bucket the first one filled its share of
    other = v6_contact(id_in_bucket(LOCAL, 255, 99), "2a01:4f8:1::1")
    assert table.observe(other, 0.0).admission is Admission.INSERTED
    check_structure(table)


def test_one_ipv6_32_flooding_a_full_bucket_pushes_out_only_its_own_replacements() -> None:
    table = RoutingTable(LOCAL, k=8, good_for=0.0)
    for host in range(8):
        table.observe(far(host, subnet=host), 0.0)
    waiting = far(100, subnet=100)
    table.observe(waiting, 1.0)
    for i in range(40):  # 40 IDs from 40 /48s of one /32
        table.observe(v6_contact(id_in_bucket(LOCAL, 255, 1000 + i), f"2001:db8:{i:x}::1"), 2.0)
    replacements = table._bucket(255).replacements
    assert waiting.node_id in replacements
    assert sum(1 for c in replacements.values() if c.block == "2001:db8::/32") == 4
    check_structure(table)


def test_self_is_never_inserted() -> None:
    table = RoutingTable(LOCAL)
    assert table.observe(contact(LOCAL), 0.0).admission is Admission.SELF
    assert len(table) == 0 and LOCAL not in table


def test_reobserving_a_cached_contact_after_a_remove_keeps_len_consistent() -> None:
    """A contact waiting in the cache that gets in through a freed slot must leave the
    cache; otherwise a later eviction "promotes" it a second time and len() drifts."""
    table = RoutingTable(LOCAL, good_for=0.0, k=2, subnet_limit=2, max_failures=2)
    a, b, x = far(1, 1), far(2, 2), far(3, 3)
    table.observe(a, 0.0)
    table.observe(b, 0.0)
    table.observe(x, 0.0)  # bucket full: x waits in the cache
    assert table.remove(b.node_id)
    assert table.observe(x, 1.0).admission is Admission.INSERTED  # the freed slot
    table.on_failure(a.node_id, 2.0)
    table.on_failure(a.node_id, 3.0)  # a is gone either way (max_failures)
    assert [c.node_id for c in table.contacts()] == [x.node_id]
    assert len(table) == 1
    check_structure(table)


# -- closest, refresh, random IDs ----------------------------------------------------

table_ids = st.lists(
    st.tuples(st.integers(0, ID_BITS - 1), st.integers(0, 2**256 - 1)), max_size=120
)


def build_table(local: bytes, spec: list[tuple[int, int]]) -> RoutingTable:
    table = RoutingTable(local, subnet_limit=10**6)
    for i, (bucket, low) in enumerate(spec):
        # skew towards the far buckets, where real tables are dense
        b = ID_BITS - 1 - bucket % 8 if bucket % 3 else bucket
        table.observe(contact(id_in_bucket(local, b, low), i % 250, 1 + i % 200), float(i))
    return table


@given(
    local=st.binary(min_size=32, max_size=32),
    spec=table_ids,
    data=st.data(),
    count=st.one_of(st.none(), st.integers(0, 60)),
)
def test_closest_equals_brute_force(
    local: bytes, spec: list[tuple[int, int]], data: st.DataObject, count: int | None
) -> None:
    table = build_table(local, spec)
    members = [c.node_id for c in table.contacts()]
    choices = [
        st.just(local),
        st.binary(min_size=32, max_size=32),
        st.integers(0, 2**16).map(lambda x: (int.from_bytes(local, "big") ^ x).to_bytes(32, "big")),
    ]
    if members:
        choices.append(st.sampled_from(members))
        choices.append(
            st.tuples(st.sampled_from(members), st.integers(1, 2**20)).map(
                lambda m: (int.from_bytes(m[0], "big") ^ m[1]).to_bytes(32, "big")
            )
        )
    target = data.draw(st.one_of(choices), label="target")
    t = int.from_bytes(target, "big")
    want = sorted(table.contacts(), key=lambda c: int.from_bytes(c.node_id, "big") ^ t)
    n = table.k if count is None else count
    assert [c.node_id for c in table.closest(target, count)] == [c.node_id for c in want[:n]]


def test_closest_small_cases() -> None:
    table = RoutingTable(LOCAL)
    assert table.closest(LOCAL) == []
    only = far(5, 5)
    table.observe(only, 0.0)
    assert table.closest(LOCAL, 0) == []
    assert table.closest(only.node_id) == [only]  # a target inside the table
    assert table.closest(LOCAL, 100) == [only]


@given(
    local=st.binary(min_size=32, max_size=32),
    spec=table_ids,
    marks=st.lists(st.tuples(st.integers(0, ID_BITS - 1), st.floats(0, 1000)), max_size=40),
    clock=st.tuples(st.floats(0, 2000), st.floats(0.001, 1000)),
    seed=st.integers(0, 2**32),
)
def test_refresh_targets_fall_in_the_stale_buckets(
    local: bytes,
    spec: list[tuple[int, int]],
    marks: list[tuple[int, float]],
    clock: tuple[float, float],
    seed: int,
) -> None:
    now, interval = clock
    table = build_table(local, spec)
    rng = random.Random(seed)
    last = dict.fromkeys(range(ID_BITS), 0.0)
    for bucket, when in marks:
        table.mark_refreshed(table.random_id_in_bucket(bucket, rng), when)
        last[bucket] = when
    table.mark_refreshed(local, 5000.0)  # the local ID has no bucket: ignored
    sizes = table.bucket_sizes()
    nearest = min(sizes, default=ID_BITS)
    stale = [i for i in range(nearest, ID_BITS) if now - last[i] >= interval]
    targets = table.refresh_targets(now, interval, rng)
    assert [true_bucket(local, t) for t in targets] == stale


@pytest.mark.parametrize("seed", range(3))
def test_random_id_in_bucket_lands_in_that_bucket(seed: int) -> None:
    rng = random.Random(seed)
    local = rng.randbytes(32)
    table = RoutingTable(local)
    for index in range(ID_BITS):
        for _ in range(3):
            node_id = table.random_id_in_bucket(index, rng)
            assert len(node_id) == 32
            assert true_bucket(local, node_id) == index == table.bucket_index(node_id)
