"""The short resilience suite (issue 13, point 6) on the compose testnet: the scenarios of
`dna-testnet resilience --short` (4 of 5 replicas of bob's mailbox killed and wiped while
he is away; one replica frozen under load), each with a small load, on containers built
from this tree. Every send must be acknowledged and arrive exactly once; the history
checker (dna_testnet.resilience.checker) says so. `make resilience` runs all six at full
size (docs/resilience.md).

No skip: `make test` installs Docker and builds the images (scripts/bootstrap.sh,
scripts/images.sh); if that fails, this fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from containers import build_images, ensure_engine
from dna_testnet.resilience.driver import ComposeFaults, compose_down, compose_up
from dna_testnet.resilience.runner import report, run_scenario
from dna_testnet.resilience.scenarios import SHORT, SHORT_MESSAGES, by_name

pytestmark = [pytest.mark.timeout(1500), pytest.mark.process]  # docker, compose, images.sh

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "dnaresilci"
SEED = 1300  # fixed, so a failure can be run again as it was (--seed)


@pytest.fixture(scope="module")
def testnet() -> Iterator[ComposeFaults]:
    ensure_engine()
    build_images()
    start = time.monotonic()
    driver = compose_up(ROOT, PROJECT)
    print(f"compose testnet healthy after {time.monotonic() - start:.0f} s")
    try:
        yield driver
    finally:
        compose_down(ROOT, PROJECT)


@pytest.mark.parametrize("name", SHORT)
def test_no_acknowledged_message_is_lost_or_duplicated(testnet: ComposeFaults, name: str) -> None:
    scenario = by_name(name).small(SHORT_MESSAGES)
    outcome = run_scenario(testnet, scenario, SEED + SHORT.index(name))
    print(report(outcome))
    figures = outcome.figures()
    assert figures["acked"] == scenario.messages, report(outcome)  # the fault stays in tolerance
    assert figures["present"] == scenario.messages, report(outcome)
    assert figures["lost"] == 0 and figures["duplicates"] == 0, report(outcome)
    assert outcome.undeleted == [] and outcome.fetch_duplicates == [], report(outcome)
