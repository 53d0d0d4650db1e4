"""The goal lines the data-path benches print (issue 15): the ratio against the baseline a
goal names (not only the first), its direction by unit, PASS/MISS/NO DATA, and the mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _load_harness() -> ModuleType:
    """``bench/harness.py`` by path: on the tests' path, ``bench`` is this directory."""
    path = Path(__file__).resolve().parents[2] / "bench" / "harness.py"
    spec = importlib.util.spec_from_file_location("bench_harness", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_harness"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
Goal = harness.Goal


def line(
    bench: str, unit: str, ours: float, baseline: dict[str, float], mode: str
) -> dict[str, Any]:
    return {"bench": bench, "unit": unit, "ours": ours, "baseline": baseline, "ratio": 0.0,
            "n": 10, "params": {"mode": mode, "failures": {"ours": 0}}}  # fmt: skip


LINES = [
    line("storage.put", "ops/s", 100.0, {"opendht-signed": 50.0, "opendht": 400.0}, "seq"),
    line("storage.put.p50", "ms", 4.0, {"opendht-signed": 8.0, "opendht": 1.0}, "seq"),
    line("storage.put", "ops/s", 300.0, {"opendht-signed": 60.0, "opendht": 1200.0}, "c32"),
    line("storage.put.cpu", "ms", 2.0, {"opendht": 1.5}, "seq"),
]


def test_goals_judge_each_named_baseline_in_the_right_direction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    goals = [
        Goal("storage.put", "opendht-signed", 1.0, "seq"),  # 100 / 50 = 2.0
        Goal("storage.put", "opendht", 0.5, "seq"),  # 100 / 400 = 0.25
        Goal("storage.put.p50", "opendht-signed", 1.0, "seq"),  # latency: 8 / 4 = 2.0
        Goal("storage.put.p50", "opendht", 0.5, "seq"),  # 1 / 4 = 0.25
        Goal("storage.put", "opendht", 1.0, "c32"),  # the c32 line: 300 / 1200
        Goal("storage.put.cpu", "opendht", 0.5, "seq"),  # a cost: 1.5 / 2 = 0.75
        Goal("storage.put.cpu", "redis", 0.5, "seq"),  # no such baseline on the line
        Goal("storage.fetch", "opendht", 0.5, "seq"),  # no such figure
    ]
    got = harness.report_goals(LINES, goals)
    assert [(g["ratio"], g["status"]) for g in got] == [
        (2.0, "PASS"), (0.25, "MISS"), (2.0, "PASS"), (0.25, "MISS"),
        (0.25, "MISS"), (0.75, "PASS"), (None, "NO DATA"), (None, "NO DATA"),
    ]  # fmt: skip
    printed = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert [p["goal"] for p in printed] == got  # one {"goal": ...} line each, as returned


def test_a_goal_without_a_mode_takes_the_first_matching_line_and_lists_the_others() -> None:
    goal = Goal("storage.put", "opendht-signed", 1.0)
    (entry,) = harness.report_goals(LINES, [goal])
    assert entry["ratio"] == 2.0 and entry["other_ratios"] == [5.0]


def test_cpu_lines_need_our_figure_and_compare_costs_as_latencies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert harness.report_cpu("x.cpu", None, {"opendht": 1.0}, 10, {}) == []
    (cpu,) = harness.report_cpu("x.cpu", 4.0, {"opendht": 1.0, "kademlia": None}, 10, {})
    assert cpu["baseline"] == {"opendht": 1.0} and cpu["ratio"] == 0.25
    assert json.loads(capsys.readouterr().out) == cpu
