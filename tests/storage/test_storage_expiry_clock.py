"""``ExpiryClock``, sans-I/O: the time GC expires against follows the wall clock, a step
back at once, a step forward at most ``MAX_RATE`` times as fast as time passes."""

from __future__ import annotations

from dna_storage.expiry import MAX_RATE, SLACK_MS, ExpiryClock
from hypothesis import given
from hypothesis import strategies as st

DAY = 86_400_000


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


@given(st.lists(st.tuples(st.integers(-DAY, DAY), st.integers(0, 60_000)), max_size=50))
def test_gc_time_never_passes_the_wall_clock_nor_runs_faster_than_allowed(
    steps: list[tuple[int, int]],
) -> None:
    clock = ExpiryClock()
    wall, mono = 100 * DAY, 0
    last = clock.now_ms(wall, mono)
    for wall_step, elapsed in steps:
        wall, mono = wall + wall_step, mono + elapsed
        now = clock.now_ms(wall, mono)
        assert now <= wall
        assert now - last <= MAX_RATE * elapsed + SLACK_MS
        last = now
