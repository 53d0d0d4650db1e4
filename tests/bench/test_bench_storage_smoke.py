"""Smoke run of bench.storage's flood and memory sections (tiny sizes, ~40 s): both print
BENCH.md lines with their baselines, and every node process is gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # every test runs a benchmark as a process

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"bench", "unit", "ours", "baseline", "ratio", "n", "params"}
FIGURES = {
    "storage.flood.p50": "unloaded",
    "storage.flood.p99": "unloaded",
    "storage.memory.rss": "small_node",
    "storage.memory.fetch.p50": "small_node",
    "storage.memory.fetch.p99": "small_node",
}


def test_storage_bench_flood_and_memory_sections_quick() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.storage", "--sections", "flood,memory", "--quick",
         "--rounds", "1", "--ops", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    figures = {line["bench"]: line for line in lines if "bench" in line}
    assert set(figures) == set(FIGURES), done.stdout[-3000:]
    for name, baseline in FIGURES.items():
        figure = figures[name]
        assert set(figure) == KEYS, figure
        assert figure["ours"] > 0 and figure["ratio"] > 0, figure
        assert set(figure["baseline"]) == {baseline} and figure["baseline"][baseline] > 0
    flood = figures["storage.flood.p99"]["params"]
    assert flood["client_errors"] == {}, flood  # the clients were never refused
    assert flood["flood_outcomes"]["RESOURCE_EXHAUSTED"] > 0, flood  # the flood was
    assert figures["storage.memory.rss"]["params"]["failures"] == 0
    leftovers = subprocess.run(
        ["pgrep", "-f", "bench.storage_flood|flood-node.toml|big.toml|small.toml"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert leftovers.stdout == "", leftovers.stdout
