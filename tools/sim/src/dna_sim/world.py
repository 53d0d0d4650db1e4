"""Building a simulated overlay: node IDs, addresses, routing tables, faults.

Two ways to fill the routing tables:

* ``oracle_fill`` (default, fast enough for 10,000 nodes): for each node and each bucket,
  up to k random nodes from the bucket's ID range go through ``RoutingTable.observe``, as if
  the network had been running for a while. IDs are kept sorted, so a bucket's range is a
  contiguous slice found with two bisections.
* ``join`` (``--join real``, for small networks): nodes join one by one through a bootstrap
  as a real node does: ping it, look up their own ID, then refresh every bucket.
"""

from __future__ import annotations

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

from dna_sim.network import NetConfig, SimNetwork
from dna_sim.node import AddressBook, Coalition, SimNode, node_config
from dna_sim.xor import bucket_range, prefix_range

# 198.18.0.0/15 (RFC 2544 benchmarking space): 512 /24 subnets of 254 hosts, so the
# tables' two-per-/24 Sybil limit bites about as often as it would on the Internet.
_SUBNETS = 512
_HOSTS = 254
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

    def __init__(self, config: WorldConfig, rng: random.Random) -> None:
        if config.nodes > _SUBNETS * _HOSTS:
            raise ValueError(f"at most {_SUBNETS * _HOSTS} nodes fit 198.18.0.0/15")
        self.config = config
        self.rng = rng
        contacts = _mint_contacts(config.nodes, rng)
        self.contacts = contacts
        self.keys = [c.key for c in contacts]
        self.book = AddressBook(contacts)
        self.net = SimNetwork(len(contacts), rng, config.net)
        self._bootstrap = self.book.addrs[0]  # replaced by `join`
        bad = set(rng.sample(range(len(contacts)), round(config.adversarial * len(contacts))))
        self.adversarial = bytearray(1 if i in bad else 0 for i in range(len(contacts)))
        coalition = Coalition([contacts[i] for i in sorted(bad)]) if bad else None
        self.nodes = [
            SimNode(
                i, c, self.net, self.book, config=config.node, rng=rng,
                coalition=coalition if i in bad else None,
            )
            for i, c in enumerate(contacts)
        ]  # fmt: skip
        self.net.handlers = [node.receive for node in self.nodes]

    @property
    def k(self) -> int:
        return self.config.node.k

    # -- table filling ------------------------------------------------------------

    def oracle_fill(self) -> None:
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
        neighbour that does not answer is evicted (a failed liveness check)."""
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
        order = self.rng.sample(range(len(self.nodes)), len(self.nodes))
        self._bootstrap = self.book.addrs[order[0]]
        for position, i in enumerate(order[1:]):
            self.net.call_at(position * _JOIN_SPACING, self._join_one, self.nodes[i])
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
        return [i for i in range(len(self.nodes)) if not crashed[i]]

    def crash(self, fraction: float) -> list[int]:
        """Crash ``fraction`` of all nodes, chosen among the living."""
        alive = self.alive()
        victims = sorted(self.rng.sample(alive, min(len(alive), round(fraction * len(self.nodes)))))
        self.net.crash(victims)
        return victims

    def partition(self, fraction: float) -> list[int]:
        """Cut ``fraction`` of the nodes off from the rest (group 1 vs group 0)."""
        side = set(self.rng.sample(range(len(self.nodes)), round(fraction * len(self.nodes))))
        groups = [1 if i in side else 0 for i in range(len(self.nodes))]
        self.net.partition(groups)
        return groups


def _ignore(_node: SimNode, _lookup: Lookup) -> None:
    pass


def _mint_contacts(count: int, rng: random.Random) -> list[Contact]:
    """``count`` contacts with distinct random IDs, sorted by ID, each at its own synthetic
    address spread over the /24s of 198.18.0.0/15 (in memory only: nothing is sent)."""
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(rng.getrandbits(ID_BITS))
    addresses = rng.sample(range(_SUBNETS * _HOSTS), count)
    contacts = []
    for key, address in zip(sorted(ids), addresses, strict=True):
        subnet, host = divmod(address, _HOSTS)
        ip = f"198.{18 + subnet // 256}.{subnet % 256}.{host + 1}"
        node_id = key.to_bytes(ID_BYTES, "big")
        contacts.append(Contact(node_id, b"", (Endpoint(ip, _PORT),)))
    return contacts
