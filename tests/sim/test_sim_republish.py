"""`dna-sim republish`: the honest holders' republish traffic and its floor under attack."""

from __future__ import annotations

from dna_core.overlay.records import MAX_SILENCE
from dna_sim.republish import simulate


def test_honest_holders_take_turns_about_one_republish_an_interval() -> None:
    row = simulate(holders=8, intervals=200)
    assert 1.0 <= row["republishes_per_interval"] <= 1.2
    assert row["longest_silence"] <= MAX_SILENCE


def test_one_subnets_copies_postpone_nobody_twice_in_a_row() -> None:
    row = simulate(holders=6, intervals=200, attack_subnets=1)
    assert row["republishes_per_interval"] >= 1.0


def test_two_subnets_taking_turns_postpone_nobody_past_max_silence() -> None:
    row = simulate(holders=6, intervals=200, attack_subnets=2)
    assert row["longest_silence"] <= MAX_SILENCE
    assert row["republishes_per_interval"] >= 6 / MAX_SILENCE * 0.9
