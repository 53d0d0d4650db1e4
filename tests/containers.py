"""Driving the Docker engine and docker-compose from tests: the same clients and the same
engine start as `make images` (scripts/docker-cli.sh, scripts/dockerd.sh).

Everything goes through the Docker socket and `docker exec`, never through container
addresses, so the tests work from inside a network namespace too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Debian's docker.io client first: a newer client without buildx has no BuildKit --secret.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
COMPOSE = ["docker-compose"] if shutil.which("docker-compose") else [DOCKER, "compose"]


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run the docker client; its stdout, or an AssertionError with what it said."""
    done = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


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


@dataclass
class Compose:
    """One compose project of the repository's docker-compose.yml."""

    project: str
    env: dict[str, str]
    _ids: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        done = subprocess.run(
            [*COMPOSE, "-p", self.project, *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def container(self, service: str) -> str:
        """The service's container ID (looked up once: stop and start keep it; compose
        1.29 takes a second or more to start, so each lookup would cost that)."""
        if service not in self._ids:
            self._ids.update(self._containers())
        assert service in self._ids, f"no container for {service}"
        return self._ids[service]

    def _containers(self) -> dict[str, str]:
        ids = self.run("ps", "-q").split()
        if not ids:
            return {}
        label = '{{index .Config.Labels "com.docker.compose.service"}} {{.Id}}'
        return dict(line.split() for line in docker("inspect", "-f", label, *ids).splitlines())

    def exec(self, service: str, *command: str, timeout: float = 120) -> str:
        return docker("exec", self.container(service), *command, timeout=timeout)

    def state(self, service: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(
            docker("inspect", "-f", "{{json .State}}", self.container(service))
        )
        return state

    def logs(self, service: str) -> str:
        """The container's stdout then its stderr (nodes log JSON lines on stderr)."""
        done = subprocess.run(
            [DOCKER, "logs", self.container(service)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return done.stdout + done.stderr

    def wait_healthy(self, services: list[str], timeout: float = 240) -> None:
        """Every service's container healthy; a container that exits fails at once."""
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            ids = [self.container(service) for service in pending]
            states = [json.loads(line) for line in
                      docker("inspect", "-f", "{{json .State}}", *ids).splitlines()]  # fmt: skip
            for service, state in zip(list(pending), states, strict=True):
                if not state["Running"]:
                    raise AssertionError(
                        f"{service} exited {state['ExitCode']}:\n{self.logs(service)[-3000:]}"
                    )
                if state.get("Health", {}).get("Status") == "healthy":
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"not healthy after {timeout:.0f} s: {pending}")
            time.sleep(1)
