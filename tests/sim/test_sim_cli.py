"""`dna-sim` as a real process: seed and replay command first, JSON summary last, and a
replay in a fresh interpreter (another hash seed) reproduces the summary exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.process  # every test runs dna-sim

BIN = Path(sys.executable).parent
ARGS = ("--nodes", "200", "--lookups", "60", "--seed", "3", "--crash", "0.1", "--quiet")


def _run(*args: str, hash_seed: str = "0") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dna-sim"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )


def _last_json(stdout: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return summary


def _replayable(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "cpu_seconds")}


def test_cli_prints_seed_first_and_json_last(tmp_path: Path) -> None:
    out = _run(*ARGS)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "seed: 3"
    assert lines[1] == "replay: dna-sim --nodes 200 --lookups 60 --seed 3 --crash 0.1"
    summary = _last_json(out.stdout)
    assert summary["seed"] == 3 and summary["nodes"] == 200 and summary["lookups"] == 60
    for key in ("success_rate", "hops_median", "messages_per_lookup", "latency_ms_p50"):
        assert key in summary
    assert "crashed_success_ge_0.99" in summary["targets"]

    # The same run in another interpreter with another hash seed: identical figures.
    again = _run(*ARGS, hash_seed="12345")
    assert _replayable(_last_json(again.stdout)) == _replayable(summary)

    recorded = tmp_path / "run.txt"
    recorded.write_text(out.stdout)
    replay = _run("--replay", str(recorded), "--quiet")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "replay: identical to the recorded summary" in replay.stdout


def test_cli_replay_detects_a_different_summary(tmp_path: Path) -> None:
    out = _run(*ARGS)
    summary = _last_json(out.stdout)
    summary["success_rate"] = 0.5
    recorded = tmp_path / "tampered.json"
    recorded.write_text(json.dumps(summary))
    replay = _run("--replay", str(recorded), "--quiet")
    assert replay.returncode == 1
    assert "replay: DIFFERENT" in replay.stdout
