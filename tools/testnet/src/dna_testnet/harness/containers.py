"""The compose driver: nodes as the containers of one docker-compose project (the
repository's docker-compose.yml, generated from the same topology as `dna-testnet`).

It drives Debian's docker.io client and docker-compose 1.29 (or `docker compose` v2 where
there is no docker-compose), through the Docker socket and `docker exec`, never through
container addresses: it works from inside a network namespace too. A node's address is
its service name on the compose network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dna_testnet.compose import redis_url
from dna_testnet.harness.driver import Cluster, NodeAddress
from dna_testnet.topology import Topology

__all__ = ["COMPOSE", "DOCKER", "ComposeDriver", "DockerError", "compose_cluster", "docker"]

# Debian's docker.io client first: a newer client without buildx has no BuildKit --secret.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
COMPOSE = ["docker-compose"] if shutil.which("docker-compose") else [DOCKER, "compose"]


class DockerError(RuntimeError):
    """A docker or compose command failed; the message has what it said."""


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run the docker client; its stdout, or a DockerError with what it said."""
    done = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise DockerError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


PAUSE_ATTEMPTS = 10


class ComposeDriver:
    """The `Driver` over one compose project of the compose file in ``workdir``. Given the
    ``topology`` the file was generated from, `wipe` also empties a Redis-backed node's
    database (its mailboxes live there, not on its volume)."""

    def __init__(
        self,
        project: str,
        env: Mapping[str, str],
        workdir: Path,
        *,
        topology: Topology | None = None,
    ) -> None:
        self.project, self.env, self.workdir = project, dict(env), workdir
        self.topology = topology
        self._ids: dict[str, str] = {}

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        """docker-compose ``args`` on this project; its stdout."""
        done = subprocess.run(
            [*COMPOSE, "-p", self.project, *args],
            cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise DockerError(
                f"compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
        return done.stdout

    # --- the Driver -------------------------------------------------------------------

    def start(self, name: str) -> None:
        """`start` the service's container, or create it again (`up --no-deps`) after a wipe."""
        if name in self._ids:
            self.run("start", name)
        else:
            self.run("up", "-d", "--no-deps", name)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        self.run("stop", "-t", str(round(timeout)), name, timeout=timeout + 60)

    def kill(self, name: str) -> None:
        """SIGKILL, then wait until the container has stopped (so it can be wiped at once)."""
        docker("kill", "-s", "KILL", self.container(name))
        docker("wait", self.container(name))

    def restart(self, name: str) -> None:
        self.run("restart", name)

    def pause(self, name: str, attempts: int = PAUSE_ATTEMPTS) -> None:
        """`docker pause`, tried again when the freeze fails: runc's cgroup freeze gives up
        ("unable to freeze") when a process is being started in the container at that
        moment, which the healthcheck's `exec` does every few seconds."""
        for attempt in range(attempts):
            try:
                docker("pause", self.container(name))
                return
            except DockerError as error:
                if "unable to freeze" not in str(error) or attempt == attempts - 1:
                    raise
                time.sleep(0.5)

    def resume(self, name: str) -> None:
        docker("unpause", self.container(name))

    def wipe(self, name: str) -> None:
        """Remove the stopped container and its named volumes (`<service>-data`): `start`
        creates a fresh container on an empty volume. A Redis-backed node (by the topology)
        loses its database too."""
        if self.state(name)["Running"]:
            raise DockerError(f"{name} is running: stop or kill it before wiping its disk")
        volumes = self.volumes(name)  # read before the container that names them goes
        docker("rm", "-f", self.container(name))
        self._ids.pop(name)
        for volume in volumes:
            docker("volume", "rm", volume)
        database = self._redis_database(name)
        if database is not None:
            self.exec("redis", "redis-cli", "-n", database, "FLUSHDB")

    def _redis_database(self, name: str) -> str | None:
        """The number of the node's database on the Redis service, if it is on Redis."""
        if self.topology is None:
            return None
        spec = next((n for n in self.topology.storage if n.name == name), None)
        url = None if spec is None else redis_url(self.topology, spec)
        return None if url is None else url.rsplit("/", 1)[1]

    def address(self, name: str) -> NodeAddress:
        return NodeAddress(name)

    def is_running(self, name: str) -> bool:
        return bool(self.state(name)["Running"])

    def is_ready(self, name: str) -> bool:
        """The container's healthcheck (the image's, on /readyz) says healthy, and it is not
        paused (a paused container's health keeps its last status: no check runs)."""
        state = self.state(name)
        health: dict[str, Any] = state.get("Health", {})
        return not state["Paused"] and health.get("Status") == "healthy"

    def logs(self, name: str) -> str:
        """The container's stdout then its stderr (nodes log JSON lines on stderr)."""
        done = subprocess.run(
            [DOCKER, "logs", self.container(name)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return done.stdout + done.stderr

    # --- more than a Driver: what compose tests use -----------------------------------

    def container(self, service: str) -> str:
        """The service's container ID (looked up once: stop and start keep it; compose
        1.29 takes a second or more to start, so each lookup would cost that)."""
        if service not in self._ids:
            self._ids.update(self._containers())
        if service not in self._ids:
            raise DockerError(f"no container for {service} in project {self.project}")
        return self._ids[service]

    def _containers(self) -> dict[str, str]:
        ids = self.run("ps", "-q").split()
        if not ids:
            return {}
        label = '{{index .Config.Labels "com.docker.compose.service"}} {{.Id}}'
        return dict(line.split() for line in docker("inspect", "-f", label, *ids).splitlines())

    def volumes(self, service: str) -> list[str]:
        """The project's named volumes mounted by the service's container."""
        mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", self.container(service)))
        return [m["Name"] for m in mounts if m.get("Type") == "volume"]

    def exec(self, service: str, *command: str, timeout: float = 120) -> str:
        return docker("exec", self.container(service), *command, timeout=timeout)

    def state(self, service: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(
            docker("inspect", "-f", "{{json .State}}", self.container(service))
        )
        return state

    def wait_healthy(self, services: Sequence[str], timeout: float = 240) -> None:
        """Every service's container healthy; a container that exits fails at once."""
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            ids = [self.container(service) for service in pending]
            states = [json.loads(line) for line in
                      docker("inspect", "-f", "{{json .State}}", *ids).splitlines()]  # fmt: skip
            for service, state in zip(list(pending), states, strict=True):
                if not state["Running"]:
                    raise DockerError(
                        f"{service} exited {state['ExitCode']}:\n{self.logs(service)[-3000:]}"
                    )
                if state.get("Health", {}).get("Status") == "healthy":
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                raise DockerError(f"not healthy after {timeout:.0f} s: {pending}")
            time.sleep(1)


def compose_cluster(
    topology: Topology, project: str, env: Mapping[str, str], workdir: Path
) -> Cluster[ComposeDriver]:
    """``topology``'s nodes as the services of compose project ``project`` (the compose
    file in ``workdir`` must be the one generated from ``topology``)."""
    return Cluster(topology, ComposeDriver(project, env, workdir))
