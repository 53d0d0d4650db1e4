"""Smoke run of the TURN benchmark: both servers relay, every figure prints, nothing is left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # runs the benchmark, dna-stun and coturn as processes

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"bench", "unit", "ours", "baseline", "ratio", "n", "params"}


def _running(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (the run's scratch dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in argv:
                found.append(argv)
    return found


def test_turn_bench_quick_relays_through_ours_and_coturn_and_stops_both() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.turn", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    figures = {line["bench"]: line for line in lines if "bench" in line}
    expected = {
        f"turn.relay.{direction}.{size}{suffix}"
        for direction in ("up", "down") for size in (120, 1200)
        for suffix in ("", ".throughput", ".cpu")
    }  # fmt: skip
    assert set(figures) == expected, sorted(figures)
    for name, figure in figures.items():
        assert set(figure) == KEYS and figure["ours"] > 0, name
        assert set(figure["baseline"]) == {"coturn"} and figure["baseline"]["coturn"] > 0, name
    assert not _running("dna-bench-turn-"), "a server outlived the benchmark"
