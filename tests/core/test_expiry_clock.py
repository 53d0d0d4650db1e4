"""``ExpiryClock``, sans-I/O: the time a node deletes expired data against follows the
wall clock, a step back at once, a step forward past the latest time it used at most
``MAX_RATE`` times as fast as time passes, across restarts too (``resume_ms``)."""

from __future__ import annotations

from dna_core.expiry import MAX_RATE, SLACK_MS, ExpiryClock
from hypothesis import given
from hypothesis import strategies as st

DAY = 86_400_000
T0 = 1_700_000_000_000


def test_the_first_reading_and_a_steady_clock_are_the_wall_clock() -> None:
    clock = ExpiryClock()
    for second in range(5):
        assert clock.now_ms(1_000_000 + second * 1000, second * 1000) == 1_000_000 + second * 1000
        assert clock.stepped_ms == 0


def test_a_step_forward_is_caught_up_at_most_twice_as_fast_as_time_passes() -> None:
    clock = ExpiryClock()
    clock.now_ms(0, 0)
    after_step = int(MAX_RATE * 1000) + SLACK_MS  # a second passed, the wall clock: a day
    assert clock.now_ms(DAY, 1000) == after_step
    assert clock.stepped_ms == DAY - after_step
    # an hour of real time later: two hours of GC time, not a day
    hour = 3_600_000
    assert clock.now_ms(DAY + hour, 1000 + hour) == after_step + int(MAX_RATE * hour) + SLACK_MS
    # after a day of real time it has caught up, and follows the wall clock again
    assert clock.now_ms(2 * DAY, 1000 + DAY) == 2 * DAY
    assert clock.stepped_ms == 0


def test_a_step_back_is_followed_at_once() -> None:
    clock = ExpiryClock()
    clock.now_ms(10 * DAY, 0)
    assert clock.now_ms(DAY, 1000) == DAY
    assert clock.stepped_ms == 0


def test_the_clock_set_right_after_a_step_back_returns_at_once_to_where_gc_was() -> None:
    """An RTC reset to last year, set right by NTP a minute later: GC resumes at once.
    Before, it caught up from last year at twice real time: no GC for a year."""
    clock = ExpiryClock()
    clock.now_ms(400 * DAY, 0)
    assert clock.now_ms(35 * DAY, 1000) == 35 * DAY  # the step back, followed at once
    # a minute later the wall clock is right again, and so is GC's time
    assert clock.now_ms(400 * DAY + 61_000, 61_000) == 400 * DAY + 61_000
    assert clock.stepped_ms == 0


def test_a_restarted_clock_resumes_from_the_saved_time_not_a_stepped_wall_clock() -> None:
    """A node restarted after a 31-day forward step: its first pass expires against the time
    the last run saved (plus the slack), not the stepped wall clock; then it catches up."""
    saved = 100 * DAY
    clock = ExpiryClock(resume_ms=saved)
    assert clock.now_ms(saved + 31 * DAY, 5_000_000) == saved + SLACK_MS
    assert clock.stepped_ms == 31 * DAY - SLACK_MS
    hour = 3_600_000
    assert clock.now_ms(saved + 31 * DAY + hour, 5_000_000 + hour) == (
        saved + SLACK_MS + int(MAX_RATE * hour) + SLACK_MS
    )
    # a wall clock behind the saved time (set back while it was down) is followed at once
    assert ExpiryClock(resume_ms=saved).now_ms(saved - DAY, 0) == saved - DAY


@given(
    st.one_of(st.none(), st.integers(90 * DAY, 110 * DAY)),
    st.lists(st.tuples(st.integers(-DAY, DAY), st.integers(0, 60_000)), max_size=50),
)
def test_gc_time_never_passes_the_wall_clock_nor_gains_ground_faster_than_allowed(
    resume: int | None, steps: list[tuple[int, int]]
) -> None:
    """Never ahead of the wall clock; the latest time GC used (what it may have removed up
    to) grows at most ``MAX_RATE`` times as fast as real time, plus the slack per reading,
    from a resumed clock's saved time as from a running one's."""
    clock = ExpiryClock(resume)
    wall, mono = 100 * DAY, 0
    first = clock.now_ms(wall, mono)
    assert first <= wall
    if resume is not None:
        assert first <= resume + SLACK_MS
    high = clock.high_ms
    assert high is not None
    for wall_step, elapsed in steps:
        wall, mono = wall + wall_step, mono + elapsed
        now = clock.now_ms(wall, mono)
        assert now <= wall
        assert clock.high_ms is not None
        assert clock.high_ms - high <= MAX_RATE * elapsed + SLACK_MS
        assert clock.high_ms == max(high, now)
        high = clock.high_ms


def test_a_step_is_news_once_when_it_begins_and_once_when_it_is_caught_up() -> None:
    clock = ExpiryClock()
    clock.now_ms(T0, 0)
    assert clock.step_news(60_000) is None  # following the wall clock: nothing to say
    clock.now_ms(T0 + DAY, 1_000)  # a day's step forward
    assert clock.step_news(60_000) == "behind"
    clock.now_ms(T0 + DAY + 1_000, 2_000)
    assert clock.step_news(60_000) is None  # still behind: said already
    clock.now_ms(T0 + 1_000, 3_000)  # set right: followed at once
    assert clock.step_news(60_000) == "caught up"
    clock.now_ms(T0 + 2_000, 4_000)
    assert clock.step_news(60_000) is None
