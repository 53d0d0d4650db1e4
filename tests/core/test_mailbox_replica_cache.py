"""The client's per-mailbox cache of storage node candidates: TTL, forget, LRU bound,
and the merge of two lookups' answers."""

from __future__ import annotations

from dna_core.crypto.node import NodeIdentity
from dna_core.mailbox.client import ReplicaSetCache
from dna_core.overlay.contact import Contact, Endpoint, closest_first


def contact(i: int) -> Contact:
    identity = NodeIdentity.generate(0)[0]
    return Contact(identity.node_id, identity.public_key, (Endpoint(f"127.0.0.{i}", 7400),))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_live_for_the_ttl_then_need_a_new_lookup() -> None:
    clock = Clock()
    cache = ReplicaSetCache(ttl_s=30.0, clock=clock)
    found = [contact(1), contact(2)]
    assert cache.get(b"box") is None
    cache.put(b"box", found)
    clock.now += 29.9
    assert cache.get(b"box") == found
    clock.now += 0.1
    assert cache.get(b"box") is None


def test_an_entry_can_be_kept_for_less_than_the_ttl() -> None:
    clock = Clock()
    cache = ReplicaSetCache(ttl_s=30.0, clock=clock)
    cache.put(b"short", [contact(1)], 2.0)
    clock.now += 1.9
    assert cache.get(b"short") is not None
    clock.now += 0.1
    assert cache.get(b"short") is None


def test_two_answers_merge_into_one_closest_first_list() -> None:
    nodes = [contact(i) for i in range(1, 7)]
    target = nodes[0].node_id
    key = int.from_bytes(target, "big")
    merged = closest_first(target, nodes[:4], nodes[2:])
    assert sorted(c.node_id for c in merged) == sorted(c.node_id for c in nodes)  # each once
    assert [c.key ^ key for c in merged] == sorted(c.key ^ key for c in nodes)
    assert merged[0] == nodes[0]


def test_a_failed_replica_drops_the_entry() -> None:
    cache = ReplicaSetCache(clock=Clock())
    cache.put(b"box", [contact(1)])
    cache.put(b"other", [contact(2)])
    cache.forget(b"box")
    cache.forget(b"never cached")
    assert cache.get(b"box") is None
    assert cache.get(b"other") is not None


def test_the_least_recently_used_mailbox_goes_first() -> None:
    cache = ReplicaSetCache(size=2, clock=Clock())
    cache.put(b"a", [contact(1)])
    cache.put(b"b", [contact(2)])
    assert cache.get(b"a") is not None  # "a" is now the most recently used
    cache.put(b"c", [contact(3)])
    assert cache.get(b"b") is None
    assert cache.get(b"a") is not None and cache.get(b"c") is not None
