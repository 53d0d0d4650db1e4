"""Caps on open inbound connections, per source and in total (sans-I/O).

Every open connection holds a file descriptor of the node, so one address must not be
able to hold them all. The adapters (the ops HTTP server, the gRPC port's `TcpRelay`) ask
`admit` when a connection is accepted and `release` when it closes; a refused connection
is closed at once, before it costs a buffer.

Sources are grouped as the rate limiters group them (`dna_core.ratelimit.source_key`): an
IPv6 host owns a whole /64, so per-address caps would be worth nothing against it, and
a site owns a whole /48 of them, so the /64s of one /48 together hold at most ``share``
times the per-source cap (`dna_core.ratelimit.SiteTier`). The invariant: after any
sequence of calls, ``open`` equals the admitted connections not yet released, no source
holds more than ``max_per_source`` of them and no site more than its share.
"""

from __future__ import annotations

from dataclasses import dataclass

from dna_core.ratelimit import SITE_TIER, SiteTier, SourceCounts, source_key

__all__ = [
    "OVER_SITE_CAP",
    "OVER_SOURCE_CAP",
    "OVER_TOTAL_CAP",
    "ConnectionCaps",
    "ConnectionLimits",
]

# Why a connection was refused: the ``reason`` label of the refusal counters.
OVER_TOTAL_CAP = "total_cap"
OVER_SOURCE_CAP = "source_cap"
OVER_SITE_CAP = "site_cap"  # the source's IPv6 /48 holds its share already


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_connections_per_source: int

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_source < 1:
            raise ValueError(f"connection caps must be >= 1, got {self}")


class ConnectionCaps:
    """Counts open connections by source; `admit` says whether one more fits."""

    def __init__(self, limits: ConnectionLimits, site: SiteTier | None = None) -> None:
        self.limits = limits
        self._by_source = SourceCounts(limits.max_connections_per_source, site)
        self._open = 0

    @property
    def open(self) -> int:
        """Connections admitted and not yet released."""
        return self._open

    def held_by(self, source: str) -> int:
        return self._by_source.held(source_key(source))

    def admit(self, source: str) -> str | None:
        """Count one more connection from ``source`` (an IP address) and return None, or
        return why it does not fit (`OVER_TOTAL_CAP`, `OVER_SOURCE_CAP`, `OVER_SITE_CAP`)
        and count nothing."""
        key = source_key(source)
        if self._open >= self.limits.max_connections:
            return OVER_TOTAL_CAP
        tier = self._by_source.over(key)
        if tier is not None:
            return OVER_SITE_CAP if tier == SITE_TIER else OVER_SOURCE_CAP
        self._by_source.add(key)
        self._open += 1
        return None

    def release(self, source: str) -> None:
        """One admitted connection from ``source`` closed."""
        key = source_key(source)
        if self._by_source.held(key) <= 0:
            raise ValueError(f"release of {source!r}, which holds no admitted connection")
        self._by_source.remove(key)
        self._open -= 1
