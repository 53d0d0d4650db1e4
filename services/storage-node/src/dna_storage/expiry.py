"""The time GC removes expired blobs and tombstones against (sans-I/O: the caller passes
both clocks' readings).

Expiry is wall-clock time (`expires_ms`, the same on every replica), and reads compare it
with the wall clock as it is: a read that hides an item is undone when the clock is set
right. GC's removal is not. A wall clock stepped forward (a bad NTP server, an RTC reset,
an operator's typo), on one node or a fleet, made the next GC pass delete every blob and
tombstone expiring before the new time: 30 days ahead, everything held, within seconds,
and a tombstone removed early lets a deleted blob come back from a replica that missed
the delete.

Invariant: the time GC uses (``ExpiryClock.now_ms``) never runs ahead of the wall clock,
and between two readings it advances at most ``MAX_RATE`` times the monotonic time that
passed (plus ``SLACK_MS``). A forward step of J is followed, but over J / (MAX_RATE - 1)
of real time (a day's step: a day), so an operator sees it (``stepped_ms``, logged) before
much is gone; a backward step is followed at once (GC removes less, nothing is lost). The
first reading after a start has nothing to compare with and is the wall clock.
"""

from __future__ import annotations

MAX_RATE = 2.0  # GC's time runs at most twice as fast as real time while catching up
SLACK_MS = 1_000  # between readings: scheduling, and the clocks' own small corrections


class ExpiryClock:
    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None  # (GC time, monotonic) of the last reading
        self.stepped_ms = 0  # how far GC's time is behind the wall clock, after a step

    def now_ms(self, wall_ms: int, monotonic_ms: int) -> int:
        """The time GC expires against, given the wall clock and the monotonic clock now."""
        now = wall_ms
        if self._last is not None:
            last, at = self._last
            now = min(wall_ms, last + int(MAX_RATE * max(0, monotonic_ms - at)) + SLACK_MS)
        self._last = (now, monotonic_ms)
        self.stepped_ms = wall_ms - now
        return now
