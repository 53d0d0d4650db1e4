"""Smoke run of the crypto benchmark: tiny sizes, checks only the output format (BENCH.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"bench", "unit", "ours", "baseline", "ratio", "n", "params"}
FIGURES = {"crypto.seal", "crypto.open", "crypto.sign", "crypto.verify", "crypto.pow_verify"}


def test_crypto_bench_quick_prints_bench_md_json_lines() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.crypto", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) > 1, done.stdout
    assert "machine" in json.loads(lines[0])

    throughputs = set()
    for line in lines[1:]:
        figure = json.loads(line)
        assert set(figure) == KEYS, line
        assert isinstance(figure["ours"], int | float) and figure["ours"] > 0, line
        assert figure["baseline"], line
        assert all(value > 0 for value in figure["baseline"].values()), line
        assert figure["ratio"] > 0, line
        assert isinstance(figure["n"], int) and figure["n"] > 0, line
        assert isinstance(figure["params"], dict), line
        if figure["unit"] == "ops/s":
            throughputs.add(figure["bench"])
    assert throughputs == FIGURES
