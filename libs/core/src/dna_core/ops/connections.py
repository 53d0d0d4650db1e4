"""Caps on open inbound connections, per source and in total (sans-I/O).

Every open connection holds a file descriptor of the node, so one address must not be
able to hold them all. The adapters (the ops HTTP server, the gRPC port's `TcpRelay`) ask
`admit` when a connection is accepted and `release` when it closes; a refused connection
is closed at once, before it costs a buffer.

Sources are grouped as the rate limiters group them (`dna_core.ratelimit.source_key`): an
IPv6 host owns a whole /64, so per-address caps would be worth nothing against it. The
invariant: after any sequence of calls, ``open`` equals the admitted connections not yet
released, and no source holds more than ``max_per_source`` of them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from dna_core.ratelimit import source_key

__all__ = ["OVER_SOURCE_CAP", "OVER_TOTAL_CAP", "ConnectionCaps", "ConnectionLimits"]

# Why a connection was refused: the ``reason`` label of the refusal counters.
OVER_TOTAL_CAP = "total_cap"
OVER_SOURCE_CAP = "source_cap"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_connections_per_source: int

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_source < 1:
            raise ValueError(f"connection caps must be >= 1, got {self}")


class ConnectionCaps:
    """Counts open connections by source; `admit` says whether one more fits."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._by_source: Counter[str] = Counter()
        self._open = 0

    @property
    def open(self) -> int:
        """Connections admitted and not yet released."""
        return self._open

    def held_by(self, source: str) -> int:
        return self._by_source[source_key(source)]

    def admit(self, source: str) -> str | None:
        """Count one more connection from ``source`` (an IP address) and return None, or
        return why it does not fit (`OVER_TOTAL_CAP`, `OVER_SOURCE_CAP`) and count nothing."""
        key = source_key(source)
        if self._open >= self.limits.max_connections:
            return OVER_TOTAL_CAP
        if self._by_source[key] >= self.limits.max_connections_per_source:
            return OVER_SOURCE_CAP
        self._by_source[key] += 1
        self._open += 1
        return None

    def release(self, source: str) -> None:
        """One admitted connection from ``source`` closed."""
        key = source_key(source)
        if self._by_source[key] <= 0:
            raise ValueError(f"release of {source!r}, which holds no admitted connection")
        self._by_source[key] -= 1
        self._open -= 1
        if not self._by_source[key]:
            del self._by_source[key]
