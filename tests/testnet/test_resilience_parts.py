"""The resilience suite's pure parts: reading a peer's log into deliveries, and the
scenario list (names, the short versions)."""

from __future__ import annotations

import json

import pytest
from dna_testnet.resilience.driver import parse_deliveries
from dna_testnet.resilience.scenarios import SCENARIOS, SHORT, SHORT_MESSAGES, by_name


def test_a_peer_log_gives_each_printed_message_with_its_time() -> None:
    message = {"message_id": "ab", "text": "run-00001", "outgoing": False}
    log = "\n".join([
        "2026-12-03T07:00:00.123456789Z watching for messages",
        f"2026-12-03T07:00:01.500000000Z {json.dumps(message)}",
        '2026-12-03T07:00:02.000000000Z {"not": "a message"}',
        "2026-12-03T07:00:03.000000000Z {broken json",
        f"2026-12-03T07:00:04.25Z {json.dumps(message)}",
    ])  # fmt: skip
    deliveries = parse_deliveries(log)
    assert [text for _, text in deliveries] == ["run-00001", "run-00001"]  # both copies kept
    assert deliveries[1][0] - deliveries[0][0] == pytest.approx(2.75)


def test_every_scenario_has_a_unique_name_and_an_unknown_one_is_named_in_the_error() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names)) == 6 and set(SHORT) <= set(names)
    with pytest.raises(ValueError, match="no scenario 'nope' \\(known: kill-wipe-replicas"):
        by_name("nope")


def test_a_short_scenario_spreads_its_few_messages_over_the_fault() -> None:
    frozen = by_name("frozen-replica").small(SHORT_MESSAGES)
    fault_end = frozen.fault.at_s + frozen.fault.lasts_s
    assert frozen.messages == SHORT_MESSAGES and frozen.load_s >= fault_end - 1
    wipe = by_name("kill-wipe-replicas").small(SHORT_MESSAGES)  # the fault waits for the load
    assert wipe.interval_s == by_name("kill-wipe-replicas").interval_s
