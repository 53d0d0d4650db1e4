"""A seed replays: same seed, same summary (minus wall and CPU time); another seed differs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dna_sim.scenario import Simulation, summary

Simulate = Callable[..., Simulation]  # the `simulate` fixture (tests/sim/conftest.py)


def _summary(simulate: Simulate, **options: Any) -> dict[str, Any]:
    out = summary(simulate(**options), 0.0, 0.0)
    del out["wall_seconds"], out["cpu_seconds"]
    return out


def test_same_seed_same_summary(simulate: Simulate) -> None:
    options = {"nodes": 200, "lookups": 60, "seed": 5, "crash": 0.1, "loss": 0.02}
    options["adversarial"] = 0.2
    assert _summary(simulate, **options) == _summary(simulate, **options)


def test_different_seeds_differ(simulate: Simulate) -> None:
    """The seed drives the run: what was measured differs, not just the echoed seed."""
    a, b = _summary(simulate, seed=5), _summary(simulate, seed=6)
    assert a["phases"] != b["phases"]
    assert a["messages_total"] != b["messages_total"]
