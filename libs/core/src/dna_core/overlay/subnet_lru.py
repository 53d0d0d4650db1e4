"""A bounded memory that one subnet cannot flush, sans-I/O.

A node remembers things about the nodes it hears from: which address an ID proved its
key from, the latest token of an address, which IDs just failed it. Anyone can make it
remember more of them (an ID costs 8 puzzle bits, an address a port), so a plain
least-recently-used map lets one subnet push out what the node knew of every other.

``SubnetLru`` keeps the ``size`` most recently used keys, of which at most
``per_subnet`` were filed under one /24 (IPv6 /48): a subnet that adds more replaces its
own least recently used, never another subnet's (as the routing table's replacement
cache does), so flushing the memory takes ``size / per_subnet`` subnets. And at most
``BLOCK_FACTOR * per_subnet`` of one block (`contact.block_of`: an IPv6 /32; an IPv4 /24
is its own block): a /32 holds 65,536 /48s, so with the /48 share alone its holder
flushed the memory as easily as one subnet used to. A key filed under no subnet
(``None``: loopback on a local testnet, a private address) is counted only in the total.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar, overload

from dna_core.overlay.contact import BLOCK_FACTOR, block_of_subnet

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SubnetLru(Generic[K, V]):
    """``key -> value``, least recently used first, at most ``per_subnet`` of one subnet."""

    __slots__ = ("_by_block", "_by_key", "_by_subnet", "per_block", "per_subnet", "size")

    def __init__(self, size: int, per_subnet: int) -> None:
        self.size, self.per_subnet = size, per_subnet
        self.per_block = BLOCK_FACTOR * per_subnet
        self._by_key: OrderedDict[K, tuple[V, str | None]] = OrderedDict()
        self._by_subnet: dict[str, OrderedDict[K, None]] = {}  # each LRU first
        self._by_block: dict[str, OrderedDict[K, None]] = {}  # each LRU first

    def __len__(self) -> int:
        return len(self._by_key)

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: V) -> V: ...
    def get(self, key: K, default: V | None = None) -> V | None:
        held = self._by_key.get(key)
        return held[0] if held is not None else default

    def of_subnet(self, subnet: str) -> int:
        return len(self._by_subnet.get(subnet, ()))

    def of_block(self, block: str) -> int:
        return len(self._by_block.get(block, ()))

    def touch(self, key: K) -> None:
        """``key`` (held) was used: it is the most recent, in all and in its groups."""
        self._by_key.move_to_end(key)
        subnet = self._by_key[key][1]
        if subnet is not None:
            self._by_subnet[subnet].move_to_end(key)
            self._by_block[block_of_subnet(subnet)].move_to_end(key)

    def remember(self, key: K, value: V, subnet: str | None) -> None:
        """``key -> value``, the most recent, filed under ``subnet`` (None: uncounted)."""
        self.forget(key)
        if subnet is not None:
            block = block_of_subnet(subnet)
            same = self._by_subnet.get(subnet)
            neighbours = self._by_block.get(block)
            if same is not None and len(same) >= self.per_subnet:
                self.forget(next(iter(same)))
            elif neighbours is not None and len(neighbours) >= self.per_block:
                self.forget(next(iter(neighbours)))
            self._by_subnet.setdefault(subnet, OrderedDict())[key] = None
            self._by_block.setdefault(block, OrderedDict())[key] = None
        self._by_key[key] = (value, subnet)
        while len(self._by_key) > self.size:
            self.forget(next(iter(self._by_key)))

    def forget(self, key: K) -> None:
        held = self._by_key.pop(key, None)
        if held is None or held[1] is None:
            return
        subnet = held[1]
        for groups, group in ((self._by_subnet, subnet), (self._by_block, block_of_subnet(subnet))):
            same = groups[group]
            del same[key]
            if not same:
                del groups[group]
