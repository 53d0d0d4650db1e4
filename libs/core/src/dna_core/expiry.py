"""The time a node deletes expired data against (sans-I/O: the caller passes both clocks'
readings, and saves and restores ``high_ms`` across restarts). Storage nodes' GC removes
blobs and tombstones against it; every overlay node's upkeep removes DHT records.

Expiry is wall-clock time (an item's ``expires_ms``, the same on every holder), and reads
compare it with the wall clock as it is: a read that hides an item is undone when the clock
is set right. Deletion is not. A wall clock stepped forward (a bad NTP server, an RTC reset,
an operator's typo), on one node or a fleet, made the next pass delete everything expiring
before the new time: 30 days ahead, every blob, tombstone or record held, within seconds
(and a tombstone removed early lets a deleted blob come back from a replica that missed
the delete).

Invariants:

* the time deletion uses (``ExpiryClock.now_ms``) never runs ahead of the wall clock;
* it passes ``high_ms``, the latest time deletion has used (and the node has saved), at
  most ``MAX_RATE`` times as fast as monotonic time passes (plus ``SLACK_MS`` per reading).
  A forward step of J is followed, but over J / (MAX_RATE - 1) of real time (a day's step:
  a day), so an operator sees it (``stepped_ms``, logged) before much is gone;
* a backward step is followed at once (less is deleted, nothing is lost), and the clock set
  right again returns at once up to ``high_ms``: a time deletion had reached already removes
  nothing new. (Catching up from the low reading at ``MAX_RATE`` stopped deletion for as long
  as the clock had been wrong: a year, after an RTC reset to last year set right a minute
  later.)
* a clock restored with ``high_ms`` saved by an earlier run (``ExpiryClock(resume_ms)``)
  counts the time it was not running as none passed: the monotonic clock does not survive
  a restart, and the wall clock is what cannot be trusted. A node restarted after a 31-day
  step deleted everything on its first pass; now deletion resumes at the saved time and
  catches up as after any step (a node that was down a day lags a day, for a day: reads hide
  what expired meanwhile, a later pass removes it). Without a saved time (a new store or
  record file) the first reading is the wall clock.
"""

from __future__ import annotations

from typing import Literal

MAX_RATE = 2.0  # deletion's time runs at most twice as fast as real time while catching up
SLACK_MS = 1_000  # between readings: scheduling, and the clocks' own small corrections


class ExpiryClock:
    def __init__(self, resume_ms: int | None = None) -> None:
        """``resume_ms``: the ``high_ms`` an earlier run saved, if any."""
        self.high_ms = resume_ms  # the latest time deletion used (None: none yet)
        self._at: int | None = None  # the monotonic time of the last reading (None: none)
        self.stepped_ms = 0  # how far deletion's time is behind the wall clock
        self._behind = False  # by more than what the caller said: ``step_news``

    def now_ms(self, wall_ms: int, monotonic_ms: int) -> int:
        """The time to delete expired items against, given both clocks' readings now.

        Read it once per pass (GC, upkeep), not per request: every reading may add
        ``SLACK_MS``, so a reading per request would let a flood of requests catch a
        stepped clock up at once. A request reads ``high_ms`` instead."""
        now = wall_ms
        if self.high_ms is not None:  # after a restart, the time since is unknown: none
            elapsed = 0 if self._at is None else max(0, monotonic_ms - self._at)
            now = min(wall_ms, self.high_ms + int(MAX_RATE * elapsed) + SLACK_MS)
        self._at = monotonic_ms
        self.high_ms = now if self.high_ms is None else max(self.high_ms, now)
        self.stepped_ms = wall_ms - now
        return now

    def step_news(self, warn_ms: int) -> Literal["behind", "caught up"] | None:
        """Whether the last reading changed what a node says about a step: ``"behind"`` the
        first reading more than ``warn_ms`` behind the wall clock, ``"caught up"`` the first
        one back within it, None otherwise. Each is said once, not at every pass."""
        behind = self.stepped_ms > warn_ms
        if behind == self._behind:
            return None
        self._behind = behind
        return "behind" if behind else "caught up"
