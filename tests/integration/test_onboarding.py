"""A fresh machine, as the README has a new user do it: the commands it shows exist
after `make`, `make` stops when its setup fails, and setup leaves no untracked files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import BIN

pytestmark = pytest.mark.process  # every test runs make or a fresh-machine script

ROOT = Path(__file__).resolve().parents[2]
SHELL_WORDS = {"make", "export", ".", "source", "cd", "git"}
# Programs of Debian packages that scripts/bootstrap.sh installs (`make images`, `make test`),
# by package: the README runs them after `make images`.
SYSTEM_PROGRAMS = {"docker-compose": "docker-compose"}


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
            if line.split("#")[0].strip()]  # fmt: skip


def test_every_readme_command_runs_without_uv_on_the_path() -> None:
    """uv is only in .tools/bin on a fresh machine: no command may start with `uv`."""
    commands = _readme_commands()
    assert len(commands) > 10
    for command in commands:
        words = [w for w in command.split() if not re.match(r"^[A-Z_]+=", w)]  # VAR=value
        program = words[0]
        if program in SYSTEM_PROGRAMS:
            assert SYSTEM_PROGRAMS[program] in _bootstrap_packages(), command
            assert shutil.which(program), command  # this suite ran `make test`'s setup
            continue
        assert program in SHELL_WORDS or (BIN / program).exists(), command


def _bootstrap_packages() -> set[str]:
    script = (ROOT / "scripts/bootstrap.sh").read_text()
    return {word for line in re.findall(r"PACKAGES=\((.*?)\)", script) for word in line.split()}


def test_make_stops_when_setup_fails(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "scripts").mkdir()
    failing = tmp_path / "scripts" / "bootstrap.sh"
    failing.write_text("#!/bin/sh\necho 'bootstrap: no network' >&2\nexit 1\n")
    failing.chmod(0o755)
    # Not the variables of a `make test` this suite may run under (MAKEFLAGS carries its
    # UV=... to every make below it): a fresh machine has none.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    for target in ("demo", "test"):
        made = subprocess.run(["make", target], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False, env=env)  # fmt: skip
        assert made.returncode != 0, made.stdout
        assert "failed (its message is above); nothing was run" in made.stderr, made.stderr
        assert "No such file" not in made.stderr and "run --locked" not in made.stdout


def test_setup_directories_are_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".tools/" in ignored and ".venv/" in ignored
