"""The client's per-mailbox cache of storage node candidates: TTL, forget, LRU bound,
the merge of two lookups' answers, and one lookup for the calls that miss it together."""

from __future__ import annotations

import asyncio
from typing import cast

from dna_core.crypto.node import NodeIdentity
from dna_core.mailbox.client import MailboxClient, ReplicaSetCache
from dna_core.overlay.aio.node import Closest, NodeConfig, OverlayNode
from dna_core.overlay.contact import Contact, Endpoint, closest_first
from dna_core.wire.gen.dna.v1.common_pb2 import NODE_ROLE_STORAGE


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


class CountingNode:
    """An overlay node's lookup, counted and slow enough that calls overlap (the calls'
    sharing is also tested on real processes: tests/integration/test_mailbox_client.py)."""

    def __init__(self, found: list[Contact], fail: bool = False) -> None:
        self.found, self.fail, self.lookups = found, fail, 0
        self.config = NodeConfig()  # the client reads k and allow_loopback from it

    async def find_closest(self, target: bytes) -> Closest:
        self.lookups += 1
        await asyncio.sleep(0.05)
        if self.fail:
            raise OSError("no route")
        return Closest(self.found, exhaustive=True)


def storage_contact(i: int) -> Contact:
    plain = contact(i)
    return Contact(plain.node_id, plain.public_key, plain.endpoints, NODE_ROLE_STORAGE)


def test_calls_missing_the_cache_together_share_one_lookup_and_its_failure() -> None:
    """64 puts in flight when a mailbox's entry expired sent 64 lookups at once; a lookup
    that fails fails every call waiting on it, and is not kept."""
    node = CountingNode([storage_contact(i) for i in range(1, 10)])
    client = MailboxClient(cast(OverlayNode, node), sessions=False)

    async def scenario() -> None:
        answers = await asyncio.gather(*(client.candidates(b"box") for _ in range(64)))
        assert node.lookups == 1
        assert all(a == node.found for a in answers)
        client.replica_sets.forget(b"box")
        assert await client.candidates(b"box") == node.found
        assert node.lookups == 2
        node.fail = True
        client.replica_sets.forget(b"box")
        failed = await asyncio.gather(
            *(client.candidates(b"box") for _ in range(8)), return_exceptions=True
        )
        assert all(isinstance(e, OSError) for e in failed) and node.lookups == 3
        node.fail = False
        assert await client.candidates(b"box") == node.found  # a failure is not kept
        assert node.lookups == 4

    asyncio.run(scenario())
