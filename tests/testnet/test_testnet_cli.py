"""`dna-testnet` as a person runs it: up, status, down, on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
    return subprocess.run(
        [str(BIN / "dna-testnet"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def test_up_status_down(tmp_path: Path) -> None:
    up = run("up", cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        status = run("status", cwd=tmp_path)
        rows = [line.split() for line in status.stdout.splitlines()[1:]]
        assert len(rows) == 9
        assert [r[1] for r in rows].count("bootstrap") == 3
        assert [r[1] for r in rows].count("storage") == 6
        assert all(r[3] == "yes" and int(r[4]) > 0 for r in rows), status.stdout
        assert (tmp_path / ".dna-testnet" / "state.json").exists()
    finally:
        down = run("down", cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    after = run("status", cwd=tmp_path)
    assert all(line.endswith("down") for line in after.stdout.splitlines()[1:]), after.stdout


def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    demo = run("demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "bob got: 'Hi Bob! Sent while you were away.'" in out
    assert "delivered: True" in out
    assert "both devices hold the same history: True" in out
    assert out.rstrip().endswith("demo complete")
    assert not any(tmp_path.iterdir())  # the network lived in a temporary directory
