"""`support.run_seed`: how a random test takes back the seed it printed (DNA_TEST_SEED)."""

from __future__ import annotations

import pytest
from support import SEED_VARIABLE, run_seed


def test_the_variable_replays_a_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SEED_VARIABLE, " 734201 ")
    assert run_seed() == 734201
    assert run_seed(default=5) == 734201  # a replay overrides a test's fixed seed


def test_without_it_a_fixed_seed_or_a_fresh_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SEED_VARIABLE, raising=False)
    assert run_seed(default=5) == 5
    fresh = {run_seed() for _ in range(20)}
    assert len(fresh) > 1 and all(0 <= s < 1 << 30 for s in fresh)


def test_a_seed_that_is_not_a_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SEED_VARIABLE, "seven")
    with pytest.raises(ValueError, match="DNA_TEST_SEED must be an integer, got 'seven'"):
        run_seed()
