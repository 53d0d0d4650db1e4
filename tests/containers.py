"""Driving the Docker engine and docker-compose from tests: the same clients and the same
engine start as `make images` (scripts/docker-cli.sh, scripts/dockerd.sh), and the
harness's compose driver (`dna_testnet.harness.containers`) on this repository.

Everything goes through the Docker socket and `docker exec`, never through container
addresses, so the tests work from inside a network namespace too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from dna_testnet.harness.containers import COMPOSE, DOCKER, ComposeDriver, DockerError, docker

__all__ = ["COMPOSE", "DOCKER", "ROOT", "Compose", "DockerError", "build_images", "docker",
           "ensure_engine"]  # fmt: skip

ROOT = Path(__file__).resolve().parent.parent


def ensure_engine() -> None:
    """A Docker engine answers, started here if need be; fails loudly when it cannot."""
    done = subprocess.run(
        [str(ROOT / "scripts/dockerd.sh")], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"no Docker engine: {done.stderr}"


def build_images() -> str:
    """`make images`' builds (cached); what it printed (each image and its size)."""
    done = subprocess.run(
        [str(ROOT / "scripts/images.sh")], capture_output=True, text=True, timeout=1200, check=False
    )
    assert done.returncode == 0, f"scripts/images.sh failed:\n{done.stderr[-4000:]}"
    return done.stderr + done.stdout


class Compose(ComposeDriver):
    """The harness's compose driver on the repository's docker-compose.yml."""

    def __init__(self, project: str, env: dict[str, str]) -> None:
        super().__init__(project, env, ROOT)
