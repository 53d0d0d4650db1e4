"""The resilience suite's pure parts: reading a peer's log into deliveries, and the
scenario list (names, the short versions)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from dna_testnet.resilience.driver import KubernetesFaults, parse_deliveries
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


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


class _Kubectl:
    """Stands in for kubectl (no API server runs here): records each command and the
    manifest it was given, answers with the next canned output."""

    def __init__(self, *answers: str) -> None:
        self.commands: list[list[str]] = []
        self.manifests: list[str] = []
        self.answers = list(answers)

    def __call__(self, argv: Sequence[str]) -> str:
        self.commands.append(list(argv))
        if "-f" in argv:
            self.manifests.append(Path(argv[argv.index("-f") + 1]).read_text())
        return self.answers.pop(0) if self.answers else ""


def test_the_kubernetes_faults_act_through_the_harness_driver_on_topology_names() -> None:
    pods = {"items": [{"metadata": {"name": "t-dna-storage-4"}, "status": {"podIP": "10.1.0.5"}}]}
    kubectl = _Kubectl(json.dumps(pods))
    faults = KubernetesFaults("t", "dna", chaos_dir=DEPLOY / "chaos/chaos-mesh", runner=kubectl)
    assert faults.storage()[0] == "storage1" and faults.node_of("10.1.0.5") == "storage5"
    faults.kill("storage2")  # the harness's node operation, on the pod it names
    faults.pause("storage3")  # Chaos Mesh, which the harness's driver cannot do
    faults.wait_healthy(["storage2"], timeout=60)
    faults.heal_all()
    k = ["kubectl", "-n", "dna"]
    assert kubectl.commands[1] == [*k, "delete", "pod", "t-dna-storage-1", "--grace-period=0",
                                   "--force"]  # fmt: skip
    assert kubectl.commands[2][3:5] == ["apply", "-f"]
    assert "t-dna-storage-2" in kubectl.manifests[0] and "TARGET_POD" not in kubectl.manifests[0]
    assert kubectl.commands[3] == [*k, "wait", "--for=condition=Ready", "pod/t-dna-storage-1",
                                   "--timeout=60s"]  # fmt: skip
    assert kubectl.commands[4][3:6] == ["delete", "--ignore-not-found", "-f"]
    assert kubectl.manifests[1] == kubectl.manifests[0] and faults.applied == []
    kubectl.answers.append(json.dumps(pods))
    with pytest.raises(RuntimeError, match=r"no pod has the address 10\.9\.9\.9"):
        faults.node_of("10.9.9.9")
