"""The deploy/ files the tests check, and the tools that check them (helm, promtool).

A missing tool fails the test with how to install it: `make test` installs them
(scripts/bootstrap.sh test), so a missing one is a broken machine, never a reason to skip.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
RULES = DEPLOY / "prometheus" / "rules"
RULE_TESTS = DEPLOY / "prometheus" / "tests"
CHART = DEPLOY / "helm" / "dna"

_INSTALL = {
    "promtool": "Debian package prometheus (scripts/bootstrap.sh test installs it)",
    "helm": "scripts/install_helm.sh (run by scripts/bootstrap.sh test)",
    "kubectl": "scripts/install_helm.sh (run by scripts/bootstrap.sh test)",
}


def tool(name: str) -> str:
    """The path of ``name``: the project's .tools/bin first, then PATH; else fail loudly."""
    local = ROOT / ".tools" / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: install it with {_INSTALL[name]}")
    return found


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, and the variables' queries."""
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            yield f"variable {variable['name']}", variable["query"]


def rule_exprs() -> Iterator[tuple[str, str]]:
    """(rule name, PromQL) for every rule of every rules file."""
    for path in sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                yield rule.get("alert") or rule["record"], rule["expr"]


# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions
    (followed by ``(``), keywords, label names (inside ``{}`` or a ``by (...)`` clause),
    Grafana variables, durations or string contents."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings, e.g. "$instance"
    text = re.sub(  # label_values(series, label): the series (matchers and all)
        r"label_values\(\s*([A-Za-z_:][\w:]*(?:\{[^}]*\})?)\s*,\s*\w+\s*\)", r"\1", text
    )
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, [5m] or [$__rate_interval]
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text
    )  # grouping label lists
    text = re.sub(r"\$\w+", "", text)
    names = set()
    for match in _IDENT.finditer(text):
        word, rest = match.group(), text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", word) or (
            match.start() and text[match.start() - 1].isdigit()
        ):
            continue
        names.add(word)
    return names


def bucket_bounds(expr: str) -> set[str]:
    """The ``le`` values an expression selects (they must match the exporter's format)."""
    return set(re.findall(r'(?<![\w])le="([^"]*)"', expr))
