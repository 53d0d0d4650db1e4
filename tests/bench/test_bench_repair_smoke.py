"""Smoke run of the repair benchmark: both figures print, and each refill made the wiped
replica whole (the bench fails otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # runs the benchmark as a process (its nodes in it)

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"bench", "unit", "ours", "baseline", "ratio", "n", "params"}


def test_repair_bench_quick_measures_a_pass_and_a_refill_on_sessions_and_unary() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.repair", "--quick", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    figures = {line["bench"]: line for line in lines if "bench" in line}
    assert set(figures) == {"storage.repair.pass", "storage.repair.refill"}, sorted(figures)
    for name, figure in figures.items():
        assert set(figure) == KEYS and figure["ours"] > 0, name
        assert set(figure["baseline"]) == {"unary"} and figure["baseline"]["unary"] > 0, name


def test_repair_bench_burst_in_sync_mailboxes_are_compared_not_exchanged() -> None:
    """The burst pass over mailboxes the same on every node: each is compared with each
    of the 4 peers and found the same, and none is exchanged (no rate wait, no failure)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.repair", "--quick", "--sections", "burst"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    details = [json.loads(line)["detail"] for line in done.stdout.splitlines()
               if "detail" in line]  # fmt: skip
    [burst] = [d for d in details if d["section"] == "storage.repair.burst"]
    assert burst["compared"] == {"same": 4 * burst["mailboxes"]}, burst
    assert burst["failed_exchanges"] == {} and burst["rate_waits"] == {}, burst
