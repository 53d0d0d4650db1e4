"""Adaptive request timeouts from measured round trips (RFC 6298's estimator).

A fixed timeout either stalls lookups on dead nodes (too long) or gives up on
live ones (too short); timeout = SRTT + 4 * RTTVAR tracks what the network does.
"""

from __future__ import annotations


class RttEstimator:
    def __init__(self, *, initial: float = 0.5, floor: float = 0.05, ceiling: float = 2.0) -> None:
        self.floor, self.ceiling = floor, ceiling
        self._srtt: float | None = None
        self._rttvar = initial / 2
        self._initial = initial

    def sample(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt

    @property
    def timeout(self) -> float:
        if self._srtt is None:
            return self._initial
        return min(self.ceiling, max(self.floor, self._srtt + 4 * self._rttvar))
