"""deploy/chaos: the resilience scenarios on a real cluster. They cannot run here (no
Kubernetes API server), so this checks what can be checked offline: scenarios.yaml is the
suite's own list, every Chaos Mesh manifest is one the kubectl driver applies and selects
pods by the labels the chart really puts on them, and run.sh is valid bash that refuses
an unknown scenario."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import CHART, DEPLOY, ROOT, tool
from dna_testnet.resilience.driver import CHAOS_MANIFESTS
from dna_testnet.resilience.scenarios import SCENARIOS

pytestmark = pytest.mark.process  # helm, promtool, bash or node processes

CHAOS = DEPLOY / "chaos"


def _scenarios() -> list[dict[str, Any]]:
    return list(yaml.safe_load((CHAOS / "scenarios.yaml").read_text())["scenarios"])


def test_the_scenarios_file_is_generated_from_the_suites_own_definitions() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen_chaos_scenarios.py"), "--check"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [s["name"] for s in _scenarios()] == [s.name for s in SCENARIOS]
    assert {s["fault"]["kind"] for s in _scenarios()} == {
        "kill-wipe", "rolling-restart", "partition", "churn", "pause", "loss"
    }  # fmt: skip


def test_every_chaos_mesh_manifest_is_one_the_kubectl_driver_applies() -> None:
    on_disk = {p.name for p in (CHAOS / "chaos-mesh").glob("*.yaml")}
    assert on_disk == set(CHAOS_MANIFESTS.values())
    for name in on_disk:  # the placeholders the driver replaces, and nothing left over
        text = (CHAOS / "chaos-mesh" / name).read_text()
        assert "NAMESPACE" in text and "RELEASE" in text, name


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
