"""One call in flight per key (single flight): a caller asking for a key whose call is still
running waits for that call's result instead of starting its own.

For work that many callers start at once after missing a cache: the mailbox client's
replica-set lookups (32 sends to a new mailbox made 32 lookups), a storage node's
authorization lookups (a peer's repair pass compares 8 ID slices at once), the opening of
a session to a node (every request to a node not yet connected).

Invariants: at most one call per key runs; nothing is cached past the call's end (the
caller keeps its own cache); a caller that gives up (cancelled) leaves the call running for
the others; a call's exception reaches every caller waiting, and is retrieved even when
none is (no "exception was never retrieved" warning).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        """Calls in flight."""
        return len(self._flights)

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """``work()``'s result, from the call in flight for ``key`` if there is one."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._flights[key] = flight
            flight.add_done_callback(functools.partial(self._landed, key))
        return await asyncio.shield(flight)  # a caller giving up leaves it to the others

    async def settled(self) -> None:
        """Until every call in flight now has ended (whatever its outcome: that is its
        callers' to see)."""
        if self._flights:
            await asyncio.wait(list(self._flights.values()))

    def _landed(self, key: K, flight: asyncio.Future[V]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: every caller may have given up
