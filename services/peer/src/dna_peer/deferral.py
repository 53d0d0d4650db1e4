"""Who may hold room among the deferred blobs (`Cache.deferred_blobs`): sans-I/O.

A blob waits there for its unknown sender's lookup. Its sender is not authenticated yet,
so what it holds is counted by where it came from, its **source**: one storage node that
returned it, the one holding the least among them (`place`), or `SEVERAL` for a blob that
came from no fetch (and, deferred before 2026-12-05, one several nodes returned: those
were counted together). Nothing here can tell an honest node from a hostile one, so a
"several nodes" source of their own let two or more hostile nodes returning the same
made-up blobs take the fair share of the honest blobs several nodes returned. Counted
against the least-held node that returned it, a made-up blob (it exists on its makers
only) takes room within the hostile nodes' shares alone, however they collude, and an
honest blob finds room while one honest node that returned it has some, whatever hostile
nodes returned it too. (Counted against every node that returned it, a hostile node
returning every blob, its share full, would have refused them all.) The invariants kept:

* at most ``limits.blobs`` blobs and ``limits.bytes`` bytes in all, and at most
  ``limits.node_blobs`` / ``limits.node_bytes`` counted against one node (its share);
* when a blob does not fit, the oldest blobs of the source holding the most are evicted to
  make room, but only from a source holding at least two more than the newcomer's: then
  it does not become the fullest by taking. A source is refused only when no other holds
  two more than it, so with ``n`` sources present and the store full, a refused source
  holds at least ``limits.blobs / n - 1`` (its fair share, less one); a source never
  loses a blob below that either (it is evicted from only as the fullest). So colluding
  nodes, each within its share, fill the whole bound no more: each holds its fair share,
  as does each honest node (the shape of the overlay's `RecordStore`, which evicts from
  the fullest source the same way);
* a newcomer evicts at most ``MAX_EVICTIONS`` blobs (bytes may need several): beyond that,
  or when nobody holds two more, it is refused and nothing changes.

`DeferredRoom` is worked out from the table once a round (`Inbox`) and kept up to date by
the round's own deferrals and evictions; `place` and `plan` decide without changing
anything.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from itertools import islice

Source = bytes | None  # a storage node's ID, or SEVERAL
SEVERAL: Source = None  # not from a fetch (or, deferred before 2026-12-05, several nodes')
MAX_EVICTIONS = 8  # blobs one newcomer may evict (a big one, when bytes bind)


@dataclass(frozen=True, slots=True)
class Limits:
    blobs: int
    bytes: int
    node_blobs: int  # of one node's word (a lone source), not of SEVERAL
    node_bytes: int


@dataclass(slots=True)
class _Held:
    # blob ID -> size, oldest first: a blob handled leaves in O(1) whatever its place (a
    # list scanned for it took 2.7 s to remove 10,000 one source deferred, newest first)
    blobs: dict[bytes, int] = field(default_factory=dict)
    size: int = 0


class DeferredRoom:
    """The deferred blobs by source, oldest first, with their totals."""

    def __init__(self, limits: Limits, rows: Iterable[tuple[Source, bytes, int]] = ()) -> None:
        """``rows``: (source, blob ID, size) of the blobs deferred, oldest first."""
        self.limits = limits
        self._by_source: dict[Source, _Held] = {}
        self._source_of: dict[bytes, Source] = {}
        self.count = self.size = 0
        for source, blob_id, size in rows:
            self.add(source, blob_id, size)

    def held(self, source: Source) -> tuple[int, int]:
        """(blobs, bytes) ``source`` holds."""
        held = self._by_source.get(source)
        return (0, 0) if held is None else (len(held.blobs), held.size)

    def place(
        self, returned_by: Collection[bytes] | None, size: int
    ) -> tuple[Source, list[bytes]] | None:
        """(the source to count a blob of ``size`` against, the blob IDs to evict so it
        fits): the node among ``returned_by`` holding the fewest blobs (then bytes, then
        the lower ID) whose `plan` takes it; `SEVERAL` when it came from no fetch
        (``returned_by`` None or empty); None: every returner refuses it. Changes nothing."""
        if not returned_by:
            victims = self.plan(SEVERAL, size)
            return None if victims is None else (SEVERAL, victims)
        for node in sorted(returned_by, key=lambda n: (*self.held(n), n)):
            victims = self.plan(node, size)
            if victims is not None:
                return node, victims
        return None

    def share_full(self, source: Source, size: int) -> bool:
        """Does ``source`` hold its whole share, for a blob of ``size`` more? (SEVERAL has
        none: only the bound holds it.)"""
        if source is None:
            return False
        mine, mine_size = self.held(source)
        return mine >= self.limits.node_blobs or mine_size + size > self.limits.node_bytes

    def plan(self, source: Source, size: int) -> list[bytes] | None:
        """The blob IDs to evict so that a blob of ``size`` from ``source`` fits (module
        docstring); None: it is refused. Changes nothing."""
        if self.share_full(source, size):
            return None  # its share is full: it may not take anyone's room
        if size > self.limits.bytes:
            return None
        count, total = self.count + 1, self.size + size
        victims: list[bytes] = []
        taken: dict[Source, int] = {}
        while count > self.limits.blobs or total > self.limits.bytes:
            fullest = self._fullest(source, taken)
            if fullest is None or len(victims) >= MAX_EVICTIONS:
                return None
            (victim,) = fullest
            oldest = self._by_source[victim].blobs.items()
            blob_id, victim_size = next(islice(oldest, taken.get(victim, 0), None))
            taken[victim] = taken.get(victim, 0) + 1
            victims.append(blob_id)
            count, total = count - 1, total - victim_size
        return victims

    def _fullest(self, source: Source, taken: dict[Source, int]) -> tuple[Source] | None:
        """(the other source holding the most, less ``taken``,) if it holds at least two
        more than ``source``, else None (a tuple: SEVERAL is None too)."""
        mine = self.held(source)[0]
        best: tuple[Source] | None = None
        most = mine + 1  # a victim must hold more than this
        for other, held in self._by_source.items():
            left = len(held.blobs) - taken.get(other, 0)
            if other != source and left > most:
                best, most = (other,), left
        return best

    def add(self, source: Source, blob_id: bytes, size: int) -> None:
        if blob_id in self._source_of:
            return  # deferred once (the cache keeps one row a blob): counted once
        held = self._by_source.setdefault(source, _Held())
        held.blobs[blob_id] = size
        held.size += size
        self._source_of[blob_id] = source
        self.count += 1
        self.size += size

    def remove(self, blob_id: bytes) -> None:
        """A blob evicted or handled (no longer deferred); unknown: nothing."""
        if blob_id not in self._source_of:
            return
        source = self._source_of.pop(blob_id)
        held = self._by_source[source]
        size = held.blobs.pop(blob_id)
        held.size -= size
        self.count -= 1
        self.size -= size
        if not held.blobs:
            del self._by_source[source]
