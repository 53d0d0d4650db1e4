"""Dashboards and alert rules: current, unit-tested with promtool, and naming only metrics
that real node processes export."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml
from cluster import UDP_PORT, NodeProcess, free_ips, running
from deploy_files import (
    DASHBOARDS,
    RULE_TESTS,
    RULES,
    bucket_bounds,
    dashboard_exprs,
    dashboards,
    metric_names,
    rule_exprs,
    tool,
)
from prometheus_client.parser import text_string_to_metric_families
from stun_node import stun_node
from support import load_script

pytestmark = pytest.mark.process  # helm, promtool, bash or node processes

BOOTSTRAP_IP, STORAGE_IP, STUN_IP = free_ips(3)


def _generator() -> ModuleType:
    return load_script("gen_dashboards")


# --- alert rules ------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    rule_files = sorted(str(p) for p in RULES.glob("*.yml"))
    assert rule_files, "no rules file"
    check = promtool("check", "rules", *rule_files)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted(str(p) for p in RULE_TESTS.glob("*.yml"))
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_rule_that_fires_before_its_time_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests pin each `for:`: an alert that would page after 1 minute instead of
    10 is caught (so the tests above can fail)."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    rules = (RULES / "dna.yml").read_text()
    quorum = rules.index("alert: DnaStorageReplicasBelowQuorum")
    hasty = rules[:quorum] + rules[quorum:].replace("for: 10m", "for: 1m", 1)
    (tmp_path / "rules" / "dna.yml").write_text(hasty)
    (tmp_path / "tests" / "dna_test.yml").write_text((RULE_TESTS / "dna_test.yml").read_text())
    result = promtool("test", "rules", str(tmp_path / "tests" / "dna_test.yml"))
    assert result.returncode != 0
    assert "DnaStorageReplicasBelowQuorum, time: 8m" in result.stdout + result.stderr


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((RULES / "dna.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_is_labelled_documented_and_tested_silent_and_firing() -> None:
    checks = [
        check
        for test in yaml.safe_load((RULE_TESTS / "dna_test.yml").read_text())["tests"]
        for check in test["alert_rule_test"]
    ]
    for alert in _alerts():
        name = alert["alert"]
        assert str(name).startswith("Dna"), name
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}, name
        mine = [c for c in checks if c["alertname"] == name]
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test that it stays silent"
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test that it fires"


# --- dashboards -------------------------------------------------------------------------


def test_committed_dashboards_are_what_the_code_generates(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    fresh = {p.name: p.read_text() for p in written}
    committed = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert fresh.keys() == committed.keys(), "dashboards added or removed: run `make dashboards`"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale dashboards {stale}: run `make dashboards` and commit"


def test_dashboards_have_fixed_uids_unique_panel_ids_and_the_datasource_variable() -> None:
    found = dashboards()
    assert {"dna-overlay.json", "dna-storage.json", "dna-stun.json"} <= found.keys()
    uids = [d["uid"] for d in found.values()]
    assert len(set(uids)) == len(uids) and all(uids)
    for name, dashboard in found.items():
        assert "id" not in dashboard, f"{name}: an id makes Grafana's provisioning clash"
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
                assert panel["targets"], (name, panel["title"])


def test_storage_dashboard_covers_the_storage_health_figures() -> None:
    storage = dashboards()["dna-storage.json"]
    read = set().union(*(metric_names(expr) for _, expr in dashboard_exprs(storage)))
    for needed in (
        "dna_storage_mailbox_replicas_bucket",  # replica-count histogram
        "dna_storage_repair_last_pass_timestamp_seconds",  # repair lag
        "dna_storage_requests_total",  # refusals by reason
        "dna_storage_gc_removed_total",  # GC
        "dna_storage_disk_used_ratio",  # disk high-water, beside its dna_storage_limit
        "dna_storage_tombstones_unheld",  # beside its bound
        "dna_storage_limit",
    ):
        assert needed in read, needed


def test_stun_dashboard_covers_the_relay_figures() -> None:
    relay = dashboards()["dna-stun.json"]
    read = set().union(*(metric_names(expr) for _, expr in dashboard_exprs(relay)))
    for needed in (
        "dna_stun_allocations",  # allocations
        "dna_stun_relayed_bytes_total",  # relayed bytes and packets by direction
        "dna_stun_relayed_packets_total",
        "dna_stun_auth_failures_total",  # failed credentials
        "dna_stun_refusals_total",  # refusals by reason
        "dna_stun_requests_total",  # requests by method
    ):
        assert needed in read, needed
    exprs = " ".join(expr for _, expr in dashboard_exprs(relay))
    assert "by (direction)" in exprs and "by (reason)" in exprs and "by (method)" in exprs
    (variable,) = (v for v in relay["templating"]["list"] if v["name"] == "instance")
    assert variable["query"] == 'label_values(dna_build_info{role="stun"}, instance)'  # relays


# --- the metrics exist ------------------------------------------------------------------


def test_metric_names_finds_metrics_and_only_metrics() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, job) (rate(a_bucket{le="1.0",x=~"$v"}[5m]))) '
        '/ on (instance) group_left b_total offset 5m > 2 and c unless d{role="f"}'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}
    assert metric_names("label_values(dna_build_info, instance)") == {"dna_build_info"}
    assert metric_names('label_values(dna_build_info{role="stun"}, instance)') == {"dna_build_info"}
    assert bucket_bounds(expr) == {"1.0"}


def _exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Every series name a /metrics page can carry (from its families, so a labelled
    counter never incremented counts too), and each histogram's bucket bounds."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
        "gauge": ("",),
        "info": ("_info",),
        "unknown": ("",),
    }
    names: set[str] = set()
    bounds: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in suffixes[family.type]}
        names |= {sample.name for sample in family.samples}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bounds.setdefault(sample.name, set()).add(sample.labels["le"])
    return names, bounds


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[set[str], dict[str, set[str]]]]:
    """What a real bootstrap node, storage node and STUN/TURN relay export on /metrics."""
    root = tmp_path_factory.mktemp("exported")
    seed = f"{BOOTSTRAP_IP}:{UDP_PORT}"
    nodes = [
        NodeProcess("boot", BOOTSTRAP_IP, root, [seed]),
        NodeProcess("store", STORAGE_IP, root, [seed], command="dna-storage-node"),
    ]
    with running(nodes):
        texts = [node.http("/metrics").text for node in nodes]
    with stun_node(tmp_path_factory.mktemp("stun"), STUN_IP) as relay:
        texts.append(httpx.get(f"{relay.http}/metrics", timeout=5).text)
    names: set[str] = set()
    bounds: dict[str, set[str]] = {}
    for text in texts:
        more_names, more_bounds = _exported(text)
        names |= more_names
        for name, values in more_bounds.items():
            bounds.setdefault(name, set()).update(values)
    yield names, bounds


def _every_query() -> list[tuple[str, str]]:
    queries = [(f"rule {name}", expr) for name, expr in rule_exprs()]
    for file, dashboard in dashboards().items():
        queries += [(f"{file}: {title}", expr) for title, expr in dashboard_exprs(dashboard)]
    return queries


def test_every_metric_a_dashboard_or_rule_reads_is_exported(
    exported: tuple[set[str], dict[str, set[str]]],
) -> None:
    names, bounds = exported
    assert "dna_ready" in names and "dna_storage_mailbox_replicas_bucket" in names
    assert "dna_stun_relayed_bytes_total" in names
    queries = _every_query()
    assert len(queries) > 30
    missing = sorted(
        (where, name) for where, expr in queries for name in metric_names(expr) - names
    )
    assert not missing, f"metrics no node exports: {missing}"
    for where, expr in queries:
        for bound in bucket_bounds(expr):
            (bucket,) = (n for n in metric_names(expr) if n.endswith("_bucket"))
            assert bound in bounds[bucket], f"{where}: {bucket} has no le={bound!r}"
