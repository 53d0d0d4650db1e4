"""Local stand-ins for two fixes proposed to ``dna_core.overlay`` (delete once applied).

The simulator uses these by default; ``dna-sim --unpatched-core`` runs the core exactly
as it is, which is how the numbers in the report were measured.

1. ``kbucket.RoutingTable.closest`` (speed only, same results). ``_bucket_order`` yields
   every index from the target's bucket down to 0 and back up, though all buckets below
   the lowest non-empty one are empty (about 240 of 256 with 10,000 nodes). For a node
   near the target, i.e. most queries of a lookup, that is ~250 generator steps per call:
   60% of a 10,000-lookup run. ``SimRoutingTable`` keeps the lowest non-empty bucket
   index up to date and visits the same buckets in the same order minus those below it
   (``tests/sim/test_patches.py`` compares the two).

2. ``lookup.ClosestPeersIter.next`` (correctness). It counts k successes *past* a closer
   peer whose query is still in flight and finishes, so that peer (and whatever closer
   nodes it would report) is missing from the result: with 500 nodes only ~55% of
   healthy lookups return the exact k closest. rust-libp2p's ``ClosestPeersIter`` stops
   counting at such a peer (``result_counter = None``). ``PatchedClosestPeersIter``
   waits for it instead (it does not query farther peers meanwhile, which libp2p does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from dna_core.overlay.contact import ID_BITS, Contact, id_int
from dna_core.overlay.kbucket import Admission, Observed, RoutingTable
from dna_core.overlay.lookup import (
    FINISHED,
    ClosestPeersIter,
    DisjointLookup,
    Step,
    Wait,
    _State,
)


class SimRoutingTable(RoutingTable):
    """``RoutingTable`` that tracks its lowest non-empty bucket, for ``closest``."""

    def __init__(self, local_id: bytes, **options: Any) -> None:
        super().__init__(local_id, **options)
        self._low = ID_BITS

    def observe(self, contact: Contact, now: float) -> Observed:
        observed = super().observe(contact, now)
        if observed.admission is Admission.INSERTED:
            self._low = min(self._low, (contact.key ^ self.local_key).bit_length() - 1)
        return observed

    # Removals can only empty the lowest bucket (a replacement refills the same bucket).
    def on_check_result(self, node_id: bytes, alive: bool, now: float) -> None:
        super().on_check_result(node_id, alive, now)
        self._raise_low()

    def on_failure(self, node_id: bytes, now: float) -> None:
        super().on_failure(node_id, now)
        self._raise_low()

    def remove(self, node_id: bytes) -> bool:
        removed = super().remove(node_id)
        self._raise_low()
        return removed

    def _raise_low(self) -> None:
        buckets, low = self._buckets, self._low
        while low < ID_BITS and not buckets[low].entries:
            low += 1
        self._low = low

    def closest(self, target: bytes, count: int | None = None) -> list[Contact]:
        count = self.k if count is None else count
        t = id_int(target)
        buckets = self._buckets
        found: list[Contact] = []
        for i in _bucket_order(t ^ self.local_key, self._low):
            entries = buckets[i].entries
            if entries:
                found.extend([e.contact for e in entries.values()])
                if len(found) >= count:
                    break
        # Buckets come in increasing order of distance ranges, which do not overlap:
        # one sort at the end equals the core's sort per bucket.
        found.sort(key=lambda c: c.key ^ t)
        return found[:count]


def _bucket_order(x: int, low: int) -> Iterator[int]:
    """``kbucket._bucket_order`` restricted to buckets ``>= low`` (the rest are empty)."""
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


class PatchedClosestPeersIter(ClosestPeersIter):
    def next(self, now: float) -> Step:
        """``ClosestPeersIter.next`` plus the two lines marked FIX."""
        if self._finished:
            return FINISHED
        self._expire(now)
        successes = 0
        closer_in_flight = False
        for _, node_id in self._order:
            peer = self._peers[node_id]
            if peer.state is _State.SUCCEEDED:
                successes += 1
                if successes >= self.k:
                    if closer_in_flight:  # FIX: its answer may still change the k closest
                        return Wait(min(self._waiting.values()))
                    return self._finish()
            elif peer.state is _State.WAITING:
                closer_in_flight = True  # FIX (past _expire: its deadline is ahead)
            elif peer.state is _State.NOT_CONTACTED:
                if len(self._waiting) >= self.alpha:
                    return Wait(min(self._waiting.values()))
                if self._claimed is not None:
                    if node_id in self._claimed:
                        peer.state = _State.CLAIMED_ELSEWHERE
                        continue
                    self._claimed.add(node_id)
                return self._query(peer, now)
        if not self._waiting:
            return self._finish()
        return Wait(min(self._waiting.values()))


class PatchedDisjointLookup(DisjointLookup):
    """``DisjointLookup`` whose paths are ``PatchedClosestPeersIter``s (same arguments)."""

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        paths: int = 3,
        k: int = 20,
        alpha: int = 3,
        timeout: float = 1.0,
        local_id: bytes | None = None,
    ) -> None:
        seeds = list(seeds)
        super().__init__(
            target, seeds, paths=paths, k=k, alpha=alpha, timeout=timeout, local_id=local_id
        )
        claimed: set[bytes] = set()
        self.paths = [
            PatchedClosestPeersIter(
                target, seeds[i::paths], k=k, alpha=alpha, timeout=timeout,
                local_id=local_id, claimed=claimed, path=i,
            )
            for i in range(paths)
        ]  # fmt: skip
