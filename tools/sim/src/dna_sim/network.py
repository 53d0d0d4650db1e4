"""A seeded in-memory network on a virtual clock.

Nothing here touches a socket or the wall clock: time is ``SimNetwork.now`` (seconds) and
only moves when the event heap is drained (``run``), jumping straight to the next event
(trio's ``MockClock`` idea). Every random choice comes from the one ``random.Random`` handed
in, and ties on the heap are broken by insertion order, so a seed replays byte for byte.

The fault model:

* latency: each node pair has a stable base delay (uniform in ``base * (1 ± spread)``,
  derived from the pair and a per-run salt, so it costs no state), plus per-message
  uniform jitter of ``± jitter``; jitter larger than the gap between two sends reorders them;
* loss: every message is dropped independently with probability ``loss``;
* crashes: a crashed node receives nothing (so never answers) and runs nothing;
* partitions: nodes carry a group number; a message between two groups is dropped.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from dna_core.overlay import (
    Datagram,
)

_MASK64: Final = (1 << 64) - 1
_MIN_DELAY: Final = 0.0005  # jitter never makes a message arrive before it was sent


class Message:
    """One datagram in flight: the codec's ``Datagram`` as an object (nothing is encoded).
    ``src``/``dst`` are node indices; nodes see addresses (the address book maps them)."""

    __slots__ = ("datagram", "dst", "src")

    def __init__(self, src: int, dst: int, datagram: Datagram) -> None:
        self.src = src
        self.dst = dst
        self.datagram = datagram


@dataclass(frozen=True, slots=True)
class NetConfig:
    base_latency: float = 0.020  # mean one-way delay of a pair, seconds
    spread: float = 0.5  # pair bases are uniform in base * (1 ± spread)
    jitter: float = 0.005  # per-message uniform jitter, ± seconds
    loss: float = 0.0  # per-message drop probability


Handler = Callable[[Message], None]


class Handlers(Protocol):
    """Who receives a message addressed to node ``index`` (a list, or a lazy world's)."""

    def __getitem__(self, index: int, /) -> Handler: ...


class SimNetwork:
    def __init__(self, size: int, rng: random.Random, config: NetConfig | None = None) -> None:
        self.config = config or NetConfig()
        self.rng = rng
        self.now = 0.0
        self.crashed = bytearray(size)  # 1 = crashed: drops everything addressed to it
        self.group: list[int] | None = None  # partition group per node; None = connected
        self.handlers: Handlers = []
        self.sent = 0
        self.dropped: Counter[str] = Counter()
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self._salt = rng.getrandbits(64)

    # -- clock ------------------------------------------------------------------

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn, arg))

    def run(self, until: float | None = None) -> None:
        """Process events in time order until the heap is empty (or past ``until``)."""
        heap, pop = self._heap, heapq.heappop
        while heap and (until is None or heap[0][0] <= until):
            when, _, fn, arg = pop(heap)
            self.now = when
            fn(arg)
        if until is not None and until > self.now:
            self.now = until

    @property
    def idle(self) -> bool:
        return not self._heap

    # -- faults -----------------------------------------------------------------

    def crash(self, indices: Sequence[int]) -> None:
        for i in indices:
            self.crashed[i] = 1

    def partition(self, groups: list[int]) -> None:
        self.group = groups

    def heal(self) -> None:
        self.group = None

    def reachable(self, a: int, b: int) -> bool:
        group = self.group
        return group is None or group[a] == group[b]

    # -- delivery ---------------------------------------------------------------

    def send(self, msg: Message) -> None:
        self.sent += 1
        config = self.config
        if config.loss and self.rng.random() < config.loss:
            self.dropped["loss"] += 1
            return
        group = self.group
        if group is not None and group[msg.src] != group[msg.dst]:
            self.dropped["partition"] += 1
            return
        delay = self.pair_base(msg.src, msg.dst)
        if config.jitter:
            delay += (self.rng.random() * 2.0 - 1.0) * config.jitter
        self.call_at(self.now + max(delay, _MIN_DELAY), self._deliver, msg)

    def pair_base(self, a: int, b: int) -> float:
        """The stable one-way base delay between ``a`` and ``b`` (symmetric)."""
        lo, hi = (a, b) if a < b else (b, a)
        unit = _mix64(self._salt ^ (lo << 32 | hi)) / 2.0**64
        config = self.config
        return config.base_latency * (1.0 + config.spread * (2.0 * unit - 1.0))

    def _deliver(self, msg: Message) -> None:
        if self.crashed[msg.dst]:
            self.dropped["crashed"] += 1
            return
        self.handlers[msg.dst](msg)


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a cheap, well-spread hash of a 64-bit value."""
    x &= _MASK64
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)
