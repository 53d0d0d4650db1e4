"""Session fixtures: deterministic identities (seeded), so failures replay. And the
``process`` mark, kept true by tests/process_mark.py: set from the fixtures a test uses,
enforced by refusing to start a process in a test that is not marked."""

from __future__ import annotations

from collections.abc import Generator

import process_mark
import pytest
from dna_core.crypto import Identity
from hypothesis import Phase, settings
from support import seeded_identity


def pytest_configure(config: pytest.Config) -> None:
    process_mark.install()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    process_mark.mark_process_tests(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    with process_mark.guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with process_mark.watch(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with process_mark.watch(item):
        return (yield)


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
