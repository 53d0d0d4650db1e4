"""A node's key file is written whole or not at all: a node killed at any step of minting it
(a real process, SIGKILLed by the test-only DNA_TEST_KILL_AT_STEP hook) starts next time
with a key it can read, never a torn one, and the file is its owner's only."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dna_core.files import TEST_KILL_ENV
from dna_core.ops.node_key import load_or_create_node_key

MINT = "import sys; from pathlib import Path; from dna_core.ops.node_key import create_node_key; "
MINT += "create_node_key(Path(sys.argv[1]), 4)"


@pytest.mark.process
def test_a_node_killed_while_minting_its_key_starts_with_a_whole_one(tmp_path: Path) -> None:
    for step in (1, 2, 3):  # a torn temporary file, a whole one not in place, in place
        path = tmp_path / f"step{step}" / "node.key"
        env = {**os.environ, TEST_KILL_ENV: str(step)}
        killed = subprocess.run([sys.executable, "-c", MINT, str(path)], env=env, check=False)
        assert killed.returncode == -signal.SIGKILL, step
        node, created = load_or_create_node_key(path, 4)
        assert created == (step < 3), step  # minted again unless it was already in place
        assert path.read_bytes() == node.seed()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
