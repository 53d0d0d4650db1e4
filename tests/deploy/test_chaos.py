"""deploy/chaos: the scenarios for a real cluster. They cannot run here (no Kubernetes API
server), so this checks what can be checked offline: every scenario names a fault run.sh
knows, every Chaos Mesh manifest is one of the scenarios' and selects pods by the labels
the chart really puts on them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import CHART, DEPLOY, tool

pytestmark = pytest.mark.process  # helm, promtool, bash or node processes

CHAOS = DEPLOY / "chaos"


def _scenarios() -> list[dict[str, Any]]:
    return list(yaml.safe_load((CHAOS / "scenarios.yaml").read_text())["scenarios"])


def test_every_scenario_has_exactly_one_fault_and_a_duration() -> None:
    names = [s["name"] for s in _scenarios()]
    assert len(names) == len(set(names)) == 6
    sequences = {"kill-wipe", "rolling-restart"}
    for scenario in _scenarios():
        assert ("manifest" in scenario) != ("kubectl" in scenario), scenario["name"]
        assert scenario.get("kubectl", "kill-wipe") in sequences, scenario["name"]
        assert str(scenario["duration"]).endswith("s") and scenario["about"]
    manifests = {s["manifest"] for s in _scenarios() if "manifest" in s}
    on_disk = {str(p.relative_to(CHAOS)) for p in (CHAOS / "chaos-mesh").glob("*.yaml")}
    assert manifests == on_disk


def _selectors(node: Any) -> list[dict[str, str]]:
    if isinstance(node, dict):
        found = [node["labelSelectors"]] if "labelSelectors" in node else []
        return found + [s for value in node.values() for s in _selectors(value)]
    if isinstance(node, list):
        return [s for value in node for s in _selectors(value)]
    return []


def _rendered_pod_labels() -> list[dict[str, str]]:
    result = subprocess.run(
        [tool("helm"), "template", "rel", str(CHART), "--namespace", "ns"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    labels = [
        d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "StatefulSet"
    ]
    return labels + [d["metadata"]["labels"] for d in docs if d["kind"] == "Pod"]


def test_chaos_manifests_select_pods_the_chart_makes() -> None:
    pods = _rendered_pod_labels()
    for path in sorted((CHAOS / "chaos-mesh").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "chaos-mesh.org/v1alpha1", path.name
        selectors = _selectors(doc["spec"])
        assert selectors, path.name
        for raw in selectors:
            selector = {k: v.replace("RELEASE", "rel") for k, v in raw.items()}
            matched = [p for p in pods if selector.items() <= p.items()]
            assert matched, f"{path.name}: {selector} selects no pod of the chart"


def test_run_script_is_valid_bash_and_refuses_an_unknown_scenario(tmp_path: Path) -> None:
    script = CHAOS / "run.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    result = subprocess.run(
        ["bash", str(script), "rel", "ns", "no-such-scenario"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0 and "no scenario 'no-such-scenario'" in result.stderr
