"""Session fixtures: deterministic identities (seeded), so failures replay."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity
from hypothesis import Phase, settings
from support import seeded_identity


@pytest.fixture(scope="session")
def alice() -> Identity:
    return seeded_identity("alice")


@pytest.fixture(scope="session")
def bob() -> Identity:
    return seeded_identity("bob")


@pytest.fixture(scope="session")
def carol() -> Identity:
    return seeded_identity("carol")


# Hypothesis: no per-example deadline (2 shared cores are noisy); failures print the
# seed and a reproduction blob (`--hypothesis-seed=N` replays a run).
# The explain phase re-runs failing examples many times (minutes on 3.11): left out.
settings.register_profile(
    "dna", deadline=None, print_blob=True, phases=[p for p in Phase if p is not Phase.explain]
)
settings.load_profile("dna")
