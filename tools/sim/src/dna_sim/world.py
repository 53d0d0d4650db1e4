"""Building a simulated overlay: node IDs, addresses, routing tables, faults.

Two ways to fill the routing tables:

* ``oracle_fill`` (default, fast enough for 10,000 nodes): for each node and each bucket,
  up to k random nodes from the bucket's ID range go through ``RoutingTable.observe``, as if
  the network had been running for a while. IDs are kept sorted, so a bucket's range is a
  contiguous slice found with two bisections.
* ``join`` (``--join real``, for small networks): nodes join one by one through a bootstrap
  as a real node does: ping it, look up their own ID, then refresh every bucket.

A lazy world (``lazy=True``, for healthy runs of ``dna-sim scale``) holds only the sorted
ID list until a node is first touched (it starts a lookup or a message reaches it): only
then is its ``SimNode`` built and its table oracle-filled. Only nodes about to start a
lookup do the keepalive (``warm``, for their RTT samples): if every built node pinged its
neighbours, each ping would build a few more nodes and a thousand lookups would build most
of a network. A million-node network with 10,000 lookups touches about a third of its
nodes; the rest cost their contact (~0.5 KB) instead of a routing table.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from dna_core.overlay import (
    ID_BITS,
    ID_BYTES,
    BehaviourConfig,
    Contact,
    Endpoint,
    Lookup,
)

from dna_sim.network import Handler, NetConfig, SimNetwork
from dna_sim.node import AddressBook, Coalition, SimNode, node_config
from dna_sim.xor import bucket_range, prefix_range

# 198.18.0.0/15 (RFC 2544 benchmarking space): 512 /24 subnets of 254 hosts, so the
# tables' two-per-/24 Sybil limit bites about as often as it would on the Internet.
# Larger networks spread over 11.0.0.0/8 instead (public, as the caps need: private
# addresses are exempt from them), with /24s as full as 100,000 nodes
# leave those 512 (about 77%).
_SUBNETS = 512
_HOSTS = 254
_BIG_FILL = 100_000 / (_SUBNETS * _HOSTS)
_MAX_NODES = 65_536 * _HOSTS
_PORT = 4433
_JOIN_SPACING = 0.25  # virtual seconds between two joins
_JOIN_RETRY = 0.5  # a joiner whose bootstrap did not answer asks again this much later


@dataclass(frozen=True, slots=True)
class WorldConfig:
    nodes: int
    adversarial: float = 0.0  # fraction of nodes in the colluding coalition
    net: NetConfig = field(default_factory=NetConfig)
    node: BehaviourConfig = field(default_factory=node_config)


class World:
    """All nodes of one simulation, indexed by position in ID order."""

    def __init__(self, config: WorldConfig, rng: random.Random, *, lazy: bool = False) -> None:
        if config.nodes > _MAX_NODES:
            raise ValueError(f"at most {_MAX_NODES} nodes fit 10.0.0.0/8")
        self.config = config
        self.lazy = lazy
        self.rng = rng
        contacts = _mint_contacts(config.nodes, rng)
        self.contacts = contacts
        self.keys = [c.key for c in contacts]
        self.book = AddressBook(contacts)
        self.net = SimNetwork(len(contacts), rng, config.net)
        self._bootstrap = self.book.addrs[0]  # replaced by `join`
        bad = set(rng.sample(range(len(contacts)), round(config.adversarial * len(contacts))))
        self.adversarial = bytearray(1 if i in bad else 0 for i in range(len(contacts)))
        self._coalition = Coalition([contacts[i] for i in sorted(bad)]) if bad else None
        self._keepalive = 0  # lazy: neighbours a node pings before its first lookup
        self._warm = bytearray(len(contacts))  # lazy: 1 = has done its keepalive
        self._nodes: list[SimNode | None] = [None] * len(contacts)
        if lazy:
            self.net.handlers = _LazyHandlers(self)
        else:
            for i in range(len(contacts)):
                self._nodes[i] = self._new_node(i)
            self.net.handlers = [node.receive for node in self.nodes]

    def _new_node(self, i: int) -> SimNode:
        bad = self.adversarial[i]
        return SimNode(
            i, self.contacts[i], self.net, self.book, config=self.config.node, rng=self.rng,
            coalition=self._coalition if bad else None,
        )  # fmt: skip

    @property
    def nodes(self) -> list[SimNode]:
        """The nodes built so far, in ID order (all of them unless lazy)."""
        return [node for node in self._nodes if node is not None]

    @property
    def built(self) -> int:
        return len(self._nodes) - self._nodes.count(None)

    def node(self, i: int) -> SimNode:
        """Node ``i``, built (filled, warmed up) on first use in a lazy world."""
        node = self._nodes[i]
        if node is None:
            node = self._nodes[i] = self._new_node(i)
            self._fill_table(node)
        return node

    def warm(self, i: int) -> None:
        """Lazy: node ``i`` (built if need be) does its keepalive, once; an eager world
        did every node's in ``keepalive``."""
        if self.lazy and self._keepalive and not self._warm[i] and not self.net.crashed[i]:
            self._warm[i] = 1
            node = self.node(i)
            node.warm_up(node.table.closest(node.contact.node_id, self._keepalive))

    @property
    def k(self) -> int:
        return self.config.node.k

    # -- table filling ------------------------------------------------------------

    def oracle_fill(self) -> None:
        """Fill every table (a lazy world fills each node's when it is built)."""
        if not self.lazy:
            for node in self.nodes:
                self._fill_table(node)

    def _fill_table(self, node: SimNode) -> None:
        keys, k = self.keys, self.k
        local = node.contact.key
        for index in range(ID_BITS - 1, -1, -1):
            start, end = bucket_range(keys, local, index)
            inserted = 0
            for i in self._candidates(start, end):
                if node.admit(self.contacts[i]):
                    inserted += 1
                    if inserted == k:
                        break
            # Own half at this level holds only us: every closer bucket is empty.
            own_start, own_end = prefix_range(keys, local, index)
            if own_end - own_start <= 1:
                break

    def keepalive(self, count: int) -> None:
        """Every live node pings its ``count`` closest contacts once and the network runs
        until quiet: the neighbourhood upkeep a running overlay does all the time (storage
        replicas talk to their replica set). It gives each node RTT samples, and a
        neighbour that does not answer is evicted (a failed liveness check). In a lazy
        world a node does it before its first lookup (``warm``)."""
        if self.lazy:
            self._keepalive = count
        crashed = self.net.crashed
        for node in self.nodes:
            if not crashed[node.index]:
                node.warm_up(node.table.closest(node.contact.node_id, count))
        self.net.run()

    def _candidates(self, start: int, end: int) -> Iterator[int]:
        """The indices ``start..end-1``: all in order when at most 2k (a few may be refused
        by the per-/24 limit), else distinct random picks until the caller stops."""
        size = end - start
        if size <= 2 * self.k:
            yield from range(start, end)
            return
        rand = self.rng.random
        seen: dict[int, None] = {}  # ordered, unlike a set: replays identically
        while len(seen) < size:
            i = start + int(rand() * size)
            if i not in seen:
                seen[i] = None
                yield i

    def join(self) -> None:
        """Real joins: a random order, the first node is the bootstrap everyone knows."""
        if self.lazy:
            raise ValueError("real joins build every node: not in a lazy world")
        size = len(self.contacts)
        order = self.rng.sample(range(size), size)
        self._bootstrap = self.book.addrs[order[0]]
        for position, i in enumerate(order[1:]):
            self.net.call_at(position * _JOIN_SPACING, self._join_one, self.node(i))
        self.net.run()

    def _join_one(self, node: SimNode) -> None:
        node.ping(self._bootstrap, self._bootstrap_answered)

    def _bootstrap_answered(self, node: SimNode, bootstrap: Contact | None) -> None:
        """As ``OverlayNode.join``: once a bootstrap answered, look up the own ID."""
        if bootstrap is None:
            self.net.call_at(self.net.now + _JOIN_RETRY, self._join_one, node)
            return
        node.lookup(node.contact.node_id, self._refresh_after_join)

    def _refresh_after_join(self, node: SimNode, _: Lookup) -> None:
        """Kademlia §2.3: a joined node refreshes its buckets (as every role does after
        ``join``: ``refresh(0)``)."""
        node.refresh(0.0, _ignore)

    # -- faults -------------------------------------------------------------------

    def alive(self) -> list[int]:
        crashed = self.net.crashed
        return [i for i in range(len(self.contacts)) if not crashed[i]]

    def crash(self, fraction: float) -> list[int]:
        """Crash ``fraction`` of all nodes, chosen among the living."""
        alive = self.alive()
        victims = sorted(
            self.rng.sample(alive, min(len(alive), round(fraction * len(self.contacts))))
        )
        self.net.crash(victims)
        return victims

    def partition(self, fraction: float) -> list[int]:
        """Cut ``fraction`` of the nodes off from the rest (group 1 vs group 0)."""
        size = len(self.contacts)
        side = set(self.rng.sample(range(size), round(fraction * size)))
        groups = [1 if i in side else 0 for i in range(size)]
        self.net.partition(groups)
        return groups


class _LazyHandlers:
    """``SimNetwork.handlers`` of a lazy world: a message builds the node it reaches."""

    __slots__ = ("world",)

    def __init__(self, world: World) -> None:
        self.world = world

    def __getitem__(self, index: int) -> Handler:
        return self.world.node(index).receive


def _ignore(_node: SimNode, _lookup: Lookup) -> None:
    pass


def _mint_contacts(count: int, rng: random.Random) -> list[Contact]:
    """``count`` contacts with distinct random IDs, sorted by ID, each at its own synthetic
    address spread over the /24s of 198.18.0.0/15 (in memory only: nothing is sent)."""
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(rng.getrandbits(ID_BITS))
    big = count > _SUBNETS * _HOSTS
    subnets = math.ceil(count / _HOSTS / _BIG_FILL) if big else _SUBNETS
    addresses = rng.sample(range(subnets * _HOSTS), count)
    first, second = (11, 0) if big else (198, 18)  # public: the per-subnet caps apply
    contacts = []
    for key, address in zip(sorted(ids), addresses, strict=True):
        subnet, host = divmod(address, _HOSTS)
        ip = f"{first}.{second + subnet // 256}.{subnet % 256}.{host + 1}"
        node_id = key.to_bytes(ID_BYTES, "big")
        contacts.append(Contact(node_id, b"", (Endpoint(ip, _PORT),)))
    return contacts
