"""Small simulations shared by the simulator tests (a few hundred nodes: well under a second
each). Every scenario has a fixed seed, so a failure replays with the same numbers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from dna_sim.scenario import Scenario, Simulation

Simulate = Callable[..., Simulation]


def _simulate(**overrides: Any) -> Simulation:
    options: dict[str, Any] = {"nodes": 300, "lookups": 150, "seed": 11}
    options.update(overrides)
    sim = Simulation(Scenario(**options))
    sim.run()
    return sim


@pytest.fixture
def simulate() -> Simulate:
    """``simulate(**scenario_options)``: build, run every phase, return the Simulation."""
    return _simulate
